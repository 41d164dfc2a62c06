"""
train.py: train a cross-layer transcoder on cached or streamed activations, on one process or many.

Data flow. cache.py wrote mlp_in / mlp_out rows (N, L, d) of a model (with --corpus, no cache:
cache.ActivationStream computes them as training goes). Every DP rank reads its share of each
global batch, normalized per layer; each TP rank encodes it with its F/tp features per layer
and decodes a partial reconstruction that one all-reduce over TP completes. Losses -> backward ->
DP's gradient average -> ONE all-reduce of the bookkeeping (metrics, gradient norm, fired features)
-> global-norm clip -> Adam; metrics reach the host at log steps only. Every --eval-every steps the
CLT is spliced into the GPT on held-out contexts; the end saves it in circuit-tracer's layout.

    python train.py                                  # the default CLT of models/tiny (CPU, minutes)
    python train.py --cache runs/cache --steps 50 --features 256 --eval-every -1  # tiny CPU run
    python train.py --corpus toy --steps 50 --features 256 --eval-every -1  # no cache: streamed
    python train.py --resume --out runs/clt          # continue it (forge/checkpoint.py: the rules)
    torchrun --nproc_per_node=4 train.py --tp 2      # one node: dp = 4 / 2 = 2 (NCCL; gloo on CPU)
    torchrun --nnodes=N --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT \\
        --rdzv-id=JOB train.py ...                   # several nodes: one cache and --out, shared
Keep each TP group (ranks r·tp .. r·tp + tp − 1) inside a node. Logging: forge/runlog.py.

Losses (normalized activations, E||x|| = sqrt(d) per layer; mean over tokens), the LOSSES registry:
a term added there is trained, logged under its name and summed into the loss.
    mse       Σ_l ||ŷ_l − y_l||²                            summed over layers (Ameisen et al. 2025)
    sparsity  λ_S(t) Σ_{l,f} tanh(c · a_lf · ||W_dec,lf||)  jumprelu, relu; λ_S ramps up (Anthropic)
    preact    λ_P Σ_{l,f} relu(θ_lf − h_lf) · ||W_dec,lf||  jumprelu: pulls dead features to θ
    aux       α ||ê − e||², ê: the residual e = y − ŷ rebuilt by the top k_aux dead features (AuxK:
              topk, batchtopk; Gao et al. 2024, A.2). ||W_dec,lf||: over every layer f writes to.

References: Ameisen et al. 2025 ("Circuit Tracing"); Anthropic's Jan 2025 update; Rajamanoharan et
al. 2024 (JumpReLU); Gao et al. 2024 (TopK, AuxK); Bussmann et al. 2024 (BatchTopK); Shoeybi et al.
2019 (Megatron TP); the loop follows nanoGPT / llm.c, the set-up nanochat and picotron. Differences:
- one JSON + safetensors checkpoint per TP rank, never a pickle; every file whole or not at all;
- a BatchTopK batch is one DP rank's (as in the references): with DP > 1 not one process's;
- the step's bookkeeping is one all-reduce and no host sync (nanoGPT reads the loss every step): a
  non-finite loss is caught at the next log step or checkpoint; no checkpoint holds later weights.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record

from cache import ActivationCache, ActivationStream, CacheConfig, build_cache
from clt import CLTConfig, CrossLayerTranscoder
from forge import checkpoint, files
from forge.cli import arg, run_main
from forge.runlog import RunLog, to_host
from model import load_model
from parallel import all_reduce_sum, average_gradients, compute_init, make_mesh, mesh_sum


@dataclass
class TrainConfig:
    cache: str = arg("runs/cache", "activation cache written by cache.py", group="data and model")
    model: str = arg("", 'GPT of the spliced loss; "" = the model named in the cache manifest')
    out: str = arg("runs/clt", "the run's folder: the export, metrics.jsonl and checkpoints/")
    shuffle: bool = arg(True, "shuffle the rows (--no-shuffle: in their order, e.g. to compare)")
    corpus: str = arg("", "no cache: stream --model's activations over this corpus", group="stream")
    text_field: str = arg("text", "its text field or column (cache.py's --corpus and --text-field)")
    ctx: int = arg(64, "context length, BOS included")
    contexts: int = arg(64, "contexts per forward pass of the model")
    buffer_tokens: int = arg(65536, "rows in each DP rank's shuffle buffer, drained, then refilled")
    features: int = arg(1024, "F: features per layer (all TP ranks together)", group="the CLT")
    activation: str = arg("jumprelu", "jumprelu | topk | batchtopk | relu")
    k: int = arg(16, "topk / batchtopk: active features per token and layer")
    threshold_init: float = arg(0.03, "jumprelu: initial threshold")
    bandwidth: float = arg(1.0, "jumprelu: straight-through kernel width ε")
    decoder: str = arg("cross-layer", "cross-layer (a CLT) | per-layer (a PLT: writes its layer)")
    skip: bool = arg(False, "add an affine skip connection mlp_in[l] @ W_skip[l] to each layer")
    steps: int = arg(1000, "optimizer steps in the whole run", group="optimization")
    batch_size: int = arg(1024, "tokens per step, all DP ranks together")
    lr: float = arg(1e-3, "peak learning rate (Adam)")
    warmup: int = arg(100, "linear warmup steps")
    decay_frac: float = arg(0.2, "final fraction of the run where the lr decays linearly to 0")
    weight_decay: float = arg(0.0, "AdamW decoupled weight decay")
    grad_clip: float = arg(1.0, "global gradient-norm clip over all shards; -1 = disable")
    seed: int = arg(0, "CLT init and data order")
    sparsity: float = arg(0.7, "λ_S, final value of the tanh sparsity penalty", group="losses")
    sparsity_c: float = arg(4.0, "c inside tanh(c · a · ||W_dec||)")
    preact: float = arg(1e-3, "λ_P of the pre-activation penalty (jumprelu); 0 leaves ~40% dead")
    aux_coef: float = arg(1 / 32, "α of AuxK (topk, batchtopk)")
    aux_k: int = arg(-1, "k_aux dead features per token for AuxK; -1 = d_model / 2")
    dead_tokens: int = arg(100_000, "a feature not fired in this many tokens counts as dead")
    eval_every: int = arg(
        500,
        "spliced-loss evaluation every this many steps (and at the end); -1 = never",
        group="evaluation, logging and checkpoints",
    )
    eval_contexts: int = arg(64, "held-out contexts for the spliced loss")
    log_every: int = arg(10, "metrics.jsonl row (a host sync) every this many steps, and at eval")
    ckpt_every: int = arg(500, "checkpoint every this many steps (and at the end); -1 = at the end")
    wandb: str = arg("", 'also log to this Weights & Biases project (pip install wandb); "" = off')
    resume: bool = arg(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = arg(False, "start a new run in an --out holding another, removing its files")
    stop_at: int = arg(-1, "end this invocation at this step, with a checkpoint; -1 = --steps")
    tp: int = arg(1, "tensor-parallel size; dp = world size / tp", group="parallelism")
    timeout_s: int = arg(300, "collective timeout: a crashed or stuck rank ends the run")
    device: str = arg("auto", "auto | cpu | cuda")
    autocast: str = arg("cuda", "bf16 autocast, fp32 master weights: cuda (only) | always | never")


# -----------------------------------------------------------------------------
# the step: the losses, backward, ONE bookkeeping all-reduce, clip, step


@dataclass
class Forward:
    """One rank's forward pass on its batch, what every loss term reads (normalized activations)."""

    clt: CrossLayerTranscoder
    step: int
    y: torch.Tensor  # (B, L, d) the normalized target
    pre: torch.Tensor  # (B, L, F/tp) pre-activations of this rank's features
    acts: torch.Tensor  # (B, L, F/tp) their activations
    err: torch.Tensor  # (B, L, d) reconstruction − y, complete (decode sums over TP)
    sse: torch.Tensor  # (B, L) ||ŷ_l − y_l||², float32
    dec: torch.Tensor  # (L, F/tp) ||W_dec,lf|| over every layer f writes to: a leaf (see below)
    dead: torch.Tensor  # (L, F/tp) bool: this rank's dead features
    n_dead: torch.Tensor | None  # dead features of all ranks (0-dim); None: none can be yet


def clt_losses(clt, mlp_in, mlp_out, c, step, dead, n_dead):
    """Encode and decode this rank's batch (mlp_in, mlp_out (B, L, d) raw) -> (Forward, {name: the
    term of LOSSES}). Terms over_features are this rank's share; the others are whole."""
    y = mlp_out * clt.output_scale[:, None]  # (B, L, d)
    pre = clt.pre_acts(mlp_in)  # (B, L, F/tp)
    acts = clt.activate(pre)  # (B, L, F/tp)
    sparse = c.activation in ("topk", "batchtopk")  # k of F active by construction: decode ∝ k
    err = clt.decode(acts, sparse, normalized=True, mlp_in=mlp_in) - y  # a skip path included
    sse = err.float().pow(2).sum(-1)  # (B, L)
    dec = clt.decoder_norms().detach().requires_grad_()  # its gradient: decoder_norm_backward
    fwd = Forward(clt, step, y, pre, acts, err, sse, dec, dead, n_dead)
    return fwd, {name: term(fwd, c) for name, (term, _) in LOSSES.items()}


def train_step(c, clt, opt, batch, state, mesh, device, sync=True):
    """One optimizer step on this rank's batch (mlp_in, mlp_out), each (B/dp, L, d). sync: return
    the global batch's metrics, brought to the host (the one sync point, before the update)."""
    step = state["step"]
    lr = lr_at(step, c)
    for group in opt.param_groups:
        group["lr"] = lr
    mine = slice(mesh.tp_rank * clt.F_local, (mesh.tp_rank + 1) * clt.F_local)  # this rank's F/tp
    dead = state["since_fired"] >= c.dead_tokens  # (L, F) all features' clocks, on every rank
    n_dead = dead.sum(1)  # (L,)
    # clocks start at 0 and grow by one batch a step: before this step none can have run out
    n = n_dead.sum() if step * c.batch_size >= c.dead_tokens else None  # a host fact: no sync
    bf16 = c.autocast == "always" or (c.autocast == "cuda" and device.type == "cuda")
    # 1. the losses: every term of LOSSES on this rank's forward pass
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):  # fp32 master weights
        fwd, terms = clt_losses(clt, *batch, c, step, dead[:, mine], n)
    sums = batch_sums(fwd, terms, mine, mesh)  # small: fwd's activations go with the backward
    dec = fwd.dec
    del fwd
    # 2. backward, and DP's gradient average
    sum(terms.values()).backward()
    decoder_norm_backward(clt, dec)
    average_gradients(list(clt.parameters()), mesh.dp_group)
    # 3. the bookkeeping: ONE all-reduce of a small named float64 vector over the whole mesh
    s = mesh_sum(dict(sums, **grad_sums(clt, mesh)))
    grad_norm = (s["grad_sq"] + s["grad_sq_replicated"]).sqrt()
    N = s["n"]  # tokens in the global batch
    means = {name: s[name] / N for name in LOSSES}
    sst = s["y_sq"] - s["y_sum"].pow(2).sum(-1) / N  # (L,) Σ ||y − ȳ||² per layer
    fvu = s["sse"] / sst.clamp_min(1e-12)
    m = dict(loss=sum(means.values()), **means, fvu=fvu, l0=s["l0"] / N, sse=s["sse"])
    fine = torch.isfinite(m["loss"]) | (state["first_bad"] >= 0)
    state["first_bad"] = torch.where(fine, state["first_bad"], step)  # the first non-finite step
    host = None
    if sync:  # the step's one sync point: every metric in one device-to-host copy
        host = to_host(dict(m, grad_norm=grad_norm, dead=n_dead, first_bad=state["first_bad"]))
        checkpoint.check_finite(host, step, c.out, ["loss", *LOSSES])  # before the update
        host["lr"] = lr
    # 4. clip to the global norm (on the device), step
    if c.grad_clip > 0:
        coef = (c.grad_clip / (grad_norm.float() + 1e-6)).clamp(max=1.0)
        for g in [p.grad for p in clt.parameters() if p.grad is not None]:
            g.mul_(coef)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if c.activation == "batchtopk":  # its JumpReLU threshold for inference, averaged over DP
        clt.update_batchtopk_threshold((s["batch_threshold"] / mesh.dp).float(), step)
    state["since_fired"] = torch.where(s["fired"] > 0, 0, state["since_fired"] + c.batch_size)
    state["step"] = step + 1
    return host


def decoder_norm_backward(clt, dec):
    """W_dec.grad += ∂L/∂||w|| · w / ||w|| (dec (L, F/tp)) in one pass: autograd's div, mul, add
    of decoder-sized tensors took ~16 % of a GPT-2-small step. A zero norm: no gradient."""
    if dec.grad is None:  # no term read the norms (topk, batchtopk)
        return
    coef = torch.where(dec > 0, dec.grad / dec, 0.0)  # (L, F/tp)
    for l, W in enumerate(clt.W_dec):
        W.grad.addcmul_(W, coef[l][:, None, None])


def lr_at(step, c):
    """Linear warmup, constant, then a linear decay to 0 over the final decay_frac of the run."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    decay_start = c.steps * (1 - c.decay_frac)
    return c.lr if step < decay_start else c.lr * (c.steps - step) / (c.steps - decay_start)


def once(t, here):
    """The bookkeeping's addends, summed over the mesh, give the global batch's sums: what every TP
    rank holds whole is sent by TP rank 0 alone, what every DP replica holds by DP rank 0."""
    return t if here else torch.zeros_like(t)  # the others send zeros (exact)


def batch_sums(fwd, terms, mine, mesh):
    """Sums over this rank's tokens and features; fired (L, F): its own slice set where it fired."""
    B = fwd.sse.size(0)
    y = fwd.y.float()
    acts = fwd.acts.detach()  # (B, L, F/tp), never negative
    tp0 = mesh.tp_rank == 0
    s = dict(n=y.new_full((), B), sse=fwd.sse.detach().sum(0), y_sum=y.sum(0))
    s["y_sq"] = y.pow(2).sum((0, 2))
    s = {k: once(v, tp0) for k, v in s.items()}  # (), (L,), (L, d), (L,)
    s["l0"] = torch.count_nonzero(acts, dim=(0, 2))  # (L,) over this rank's features
    s.update({k: once(terms[k].detach() * B, tp0 or over) for k, (_, over) in LOSSES.items()})
    s["fired"] = fwd.dead.new_zeros(fwd.dead.size(0), fwd.clt.config.n_features)  # (L, F)
    s["fired"][:, mine] = acts.amax(0) > 0  # summed: on how many DP ranks each feature fired
    if fwd.clt.config.activation == "batchtopk":  # (L,) the global B·k-th value, per DP rank
        s["batch_threshold"] = once(fwd.clt.batch_threshold, tp0)
    return s


def grad_sums(clt, mesh):
    """Squared gradient norms after DP's average: of this TP rank's feature shards (sent by DP rank
    0), and of the replicated b_dec and W_skip (sent by rank 0 alone)."""
    rep = [p for p in (clt.b_dec, clt.W_skip) if p is not None and p.grad is not None]
    shards = [p for p in clt.parameters() if p.grad is not None and all(p is not r for r in rep)]
    norms = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in shards])  # no (F,) temp
    rep_norms = torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in rep])
    dp0 = mesh.dp_rank == 0
    grad_sq_replicated = once(rep_norms.pow(2).sum(), dp0 and mesh.tp_rank == 0)
    return dict(grad_sq=once(norms.pow(2).sum(), dp0), grad_sq_replicated=grad_sq_replicated)


# -----------------------------------------------------------------------------
# the loss terms: LOSSES maps a name to (term(fwd, c) -> a scalar, over_features)


def mse(f, c):
    return f.sse.mean(0).sum()  # summed over layers, mean over tokens


def sparsity(f, c):
    if c.activation not in ("jumprelu", "relu"):
        return f.sse.new_zeros(())
    lam = c.sparsity * min(1.0, (f.step + 1) / c.steps)  # λ_S ramps up over the whole run
    return lam * torch.tanh(f.acts * (c.sparsity_c * f.dec)).float().sum((1, 2)).mean()


def preact(f, c):
    if c.activation != "jumprelu":
        return f.sse.new_zeros(())
    # Σ_b Σ_lf relu(θ − h)·||W_dec|| = Σ_lf ||W_dec||·Σ_b relu(θ − h): the batch sum first: cheaper
    gap = F.relu(f.clt.threshold - f.pre).float().sum(0)  # (L, F/tp)
    return c.preact * (gap * f.dec).sum() / f.pre.size(0)


def aux(f, c):
    """AuxK: the top k_aux dead features (over all TP ranks) model the residual."""
    if c.activation not in ("topk", "batchtopk") or f.n_dead is None:
        return f.sse.new_zeros(())
    k_aux = min(f.clt.config.d_model // 2 if c.aux_k < 0 else c.aux_k, f.clt.config.n_features)
    aux_acts = f.clt.topk(f.pre.masked_fill(~f.dead, 0.0), k_aux)  # (B, L, F/tp)
    e_hat = f.clt.decode(aux_acts, sparse=True, normalized=True, bias=False)  # (B, L, d)
    # sparsify's scaling, on the device (no sync): no dead features, no AuxK (the term is exactly 0)
    scale = (f.n_dead.float() / k_aux).clamp(max=1.0)
    return c.aux_coef * scale * (e_hat - f.err.detach()).float().pow(2).sum((1, 2)).mean()


# over_features: a sum over this rank's features only, so the bookkeeping sums it over TP as well
LOSSES = dict(mse=(mse, False), sparsity=(sparsity, True), preact=(preact, True), aux=(aux, False))


# -----------------------------------------------------------------------------
# evaluation: the spliced loss


@torch.no_grad()
def evaluate(gpt, clt, contexts, batch=16):
    """The CLT in inference mode (BatchTopK as its JumpReLU) on held-out contexts (n, T): FVU and L0
    per layer; next-token CE with the GPT's MLP outputs replaced by the CLT's (ce_spliced) against
    the clean GPT's and the zeroed MLPs' (recovered: the share of that gap closed). Spliced is the
    replacement model: each encoder reads the spliced run's own mlp_in, so errors compound; pass i
    reconstructs layers < i exactly, L − 1 passes reach the fixed point (ce_open: the first). The
    BOS keeps its clean MLP outputs (the cache drops it: the CLT never saw its outliers)."""
    clt.eval()
    L, d = gpt.config.n_layer, gpt.config.n_embd
    sums = torch.zeros(8, dtype=torch.float64, device=contexts.device)  # (CE, KL) x 4 runs, summed
    rec = {k: torch.zeros(L, device=contexts.device) for k in ("l0", "sse", "y_sq")}
    rec["y_sum"] = torch.zeros(L, d, device=contexts.device)  # sums over the tokens, as in training
    for idx in contexts.split(batch):
        B, T = idx.shape
        logits, acts = gpt.run_with_acts(idx)
        clean_logp = logits[:, 1:-1].float().log_softmax(-1)  # (B, T-2, V) the scored positions
        bos = acts.mlp_out[:, :1]  # (B, 1, L, d)
        y = acts.mlp_out[:, 1:].flatten(0, 1)  # (B·(T-1), L, d) what the cache holds
        a, y_hat = clt(clt.input_of(acts)[:, 1:].flatten(0, 1))
        rec["l0"] += (a > 0).sum((0, 2))
        rec["sse"] += (y_hat - y).pow(2).sum((0, 2))
        rec["y_sum"] += y.sum(0)
        rec["y_sq"] += y.pow(2).sum((0, 2))
        hat = torch.cat([bos, y_hat.view(B, T - 1, L, d)], 1)  # (B, T, L, d)
        first = hat  # the open pass: every layer reads the clean run's mlp_in
        for _ in range(L - 1):
            mlp_in = clt.input_of(gpt.run_with_acts(idx, mlp_out=hat)[1])  # (B, T, L, d)
            hat = torch.cat([bos, clt(mlp_in[:, 1:].flatten(0, 1))[1].view(B, T - 1, L, d)], 1)
        zero = torch.cat([bos, torch.zeros_like(hat[:, 1:])], 1)  # the MLPs zeroed, the BOS's kept
        for i, h in enumerate([None, first, hat, zero]):  # clean, open, spliced, zero; BOS unscored
            # (B, T-2, V), one run at a time (clean: already at hand): summed CE and KL(clean ‖ it)
            logp = clean_logp if h is None else gpt(idx, mlp_out=h)[:, 1:-1].float().log_softmax(-1)
            sums[2 * i] += F.nll_loss(logp.flatten(0, 1), idx[:, 2:].flatten(), reduction="sum")
            sums[2 * i + 1] += F.kl_div(logp, clean_logp, log_target=True, reduction="sum")
    clt.train()
    N = contexts.size(0) * (contexts.size(1) - 1)
    all_reduce_sum(rec["l0"], clt.mesh.tp_group)  # each TP rank counted its own features
    sst = rec["y_sq"] - rec["y_sum"].pow(2).sum(-1) / N  # (L,)
    clean, _, open_, _, spliced, kl_spliced, zero, kl_zero = (sums / (N - len(contexts))).tolist()
    gap = zero - clean  # what zeroing the MLPs costs
    m = dict(fvu=(rec["sse"] / sst).tolist(), l0=(rec["l0"] / N).tolist(), ce_clean=clean)
    m.update(ce_spliced=spliced, ce_open=open_, ce_zero=zero, recovered=(zero - spliced) / gap)
    m.update(recovered_open=(zero - open_) / gap, delta_ce=spliced - clean)
    return dict(m, kl_spliced=kl_spliced, kl_zero=kl_zero)


# -----------------------------------------------------------------------------
# the run


def open_data(c, meta, device):
    """The activations: the cache (the default built if missing), or --corpus's, streamed."""
    if c.corpus:  # what a cache of these activations would say, and where to begin
        model = c.model or CacheConfig.model
        cfg = CacheConfig(model, c.corpus, c.text_field, ctx=c.ctx, batch_size=c.contexts)
        return ActivationStream(cfg, c.buffer_tokens, c.eval_contexts, meta, device, c.shuffle)
    if checkpoint.default_cache_missing(c.cache, TrainConfig.cache):  # another missing one: refused
        print(f"no cache at {c.cache}: building the default one ({CacheConfig().tokens} tokens)")
        build_cache(CacheConfig(out=c.cache))
    return ActivationCache(c.cache, shuffle=c.shuffle)


def build(c, cache, mesh, device):
    """The CLT shard of this rank, with the cache's normalization, and its optimizer."""
    keys = ("activation", "k", "threshold_init", "bandwidth", "decoder", "skip")
    shared = dict({k: getattr(c, k) for k in keys}, model=c.model or cache.manifest["model"])
    sha256 = cache.manifest.get("identity", {}).get("model_sha256", "")  # graph.py refuses others
    config = CLTConfig(cache.n_layers, cache.d_model, c.features, model_sha256=sha256, **shared)
    clt = CrossLayerTranscoder(config, c.seed, mesh)
    norm_in, norm_out = cache.norms(mesh)  # (L,) each; a stream's: from its first fill
    with torch.no_grad():  # E||x|| = sqrt(d) per layer (Ameisen et al. 2025), from the mean norms
        clt.input_scale.copy_(cache.d_model**0.5 / norm_in)
        clt.output_scale.copy_(cache.d_model**0.5 / norm_out)
    clt.to(device).train()
    return clt, optimizer(clt, c)


def optimizer(clt, c):
    """AdamW, fused: one pass over each parameter and its moments instead of ~ten (CPU and CUDA)."""
    adam = dict(lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay, fused=True)
    return torch.optim.AdamW(clt.parameters(), **adam)


def train(config: TrainConfig, given=None):
    """Train (or resume) a CLT as config says; returns the last step's metrics (every rank).
    given: the flags the user typed (parse_args; None = those that differ from the defaults)."""
    c, meta = checkpoint.resolve(config, given)  # on --resume: the checkpoint's config and meta
    ddp, rank, local_rank, world, device = compute_init(c.device, c.timeout_s)
    master = rank == 0
    cache = open_data(c, meta, device)  # a cache, or with --corpus activations streamed
    checkpoint.check_resume(c, meta, world, cache.manifest, device)  # and the same on every rank
    mesh = make_mesh(ddp, world, c.tp, device)
    checkpoint.check_flags(c, cache, mesh)
    gpt, contexts = checkpoint.eval_inputs(c, cache, load_model, device)
    clt, opt = build(c, cache, mesh, device)
    clocks = torch.zeros(cache.n_layers, c.features, dtype=torch.long, device=device)  # (L, F)
    state = dict(step=0, since_fired=clocks, first_bad=torch.tensor(-1, device=device))
    metrics, ids = checkpoint.resume_or_claim(c, meta, clt, opt, state, mesh, master, cache)
    start = state["step"]
    end = c.steps if c.stop_at < 0 else min(c.stop_at, c.steps)
    log = RunLog(c, ids["wandb_id"], start, end, mesh, device)  # metrics.jsonl, wandb, the bar
    # this DP rank's share of each global batch from `start` on: the whole data position
    stream = cache.batches(c.batch_size // mesh.dp, c.seed, mesh.dp_rank, mesh.dp, start_step=start)
    with contextlib.closing(stream):  # its reader threads stop even when a step raises
        for step in log.bar:  # the bar shows the ETA, its postfix the last log step's line
            done = step + 1
            evaluating = c.eval_every > 0 and (done % c.eval_every == 0 or done == c.steps)
            saving = (c.ckpt_every > 0 and done % c.ckpt_every == 0) or done == end
            sync = step % c.log_every == 0 or evaluating or saving
            batch = cache.dequantize(next(stream), device)  # on the device: 4x less to move (int8)
            m = train_step(c, clt, opt, batch, state, mesh, device, sync)
            if not sync:
                continue
            metrics = log.timed(m, step)  # ms and tok/s per step since the last sync
            if evaluating:
                metrics["eval"] = evaluate(gpt, clt, contexts)
            log.log(metrics)
            if saving:
                checkpoint.save(c, clt, opt, state, mesh, cache, dict(ids, metrics=metrics))
            log.lap(done)  # the next row's clock starts after the evaluation and the checkpoint
    checkpoint.finish(c, clt, metrics, meta, end, mesh, master)
    log.finish()
    return metrics


def parse_args(argv=None):
    """The command line -> (TrainConfig, the names of the flags typed: --resume checks them)."""
    return checkpoint.parse_args(__doc__, TrainConfig, argv)


@record  # torchrun's failure summary then shows the failing rank's traceback
def main(argv=None):
    config, given = parse_args(argv)
    with checkpoint.explained_timeouts(config.timeout_s):  # a crashed or stuck rank
        with files.one_writer(config.out, "train.py"):  # global rank 0 holds --out's lock
            train(config, given)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)

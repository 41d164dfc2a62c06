"""
train.py: train a cross-layer transcoder on an activation cache, on one process or many.

Data flow. cache.py wrote mlp_in / mlp_out rows (N, L, d) of a GPT-2 to disk. Each step, every DP
rank reads its share of a global batch, normalizes it by the manifest's per-layer scales, encodes
with its F/tp features per layer (TP), decodes a partial reconstruction, and one all-reduce over TP
sums the partials. Losses -> backward -> gradients averaged over DP -> ONE all-reduce over the
whole mesh for the step's bookkeeping (metrics, gradient norm, which features fired) -> global norm
clipping -> Adam. The metrics reach the host only at log steps. Every --eval-every steps the CLT is
spliced into the GPT on held-out contexts (the "replacement model"); at the end the TP shards are
consolidated, the normalization folded in, and the CLT saved to --out in circuit-tracer's layout.

    python train.py --help
    python train.py                                  # the default CLT of models/tiny (CPU, minutes)
    python train.py --cache runs/cache --steps 50 --features 256 --eval-every -1  # tiny CPU run
    python train.py --activation topk --k 16 --out runs/clt-topk
    python train.py --resume --out runs/clt          # continue the run in runs/clt
    python train.py --wandb my-project               # also log to Weights & Biases
    torchrun --nproc_per_node=4 train.py --tp 2 ...  # one node: dp = 4 / 2 = 2 (NCCL; gloo on CPU)
    torchrun --nproc_per_node=2 train.py --tp 2 --device cpu --features 256 --steps 50  # TP, CPU
    torchrun --nnodes=N --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT \\
        --rdzv-id=JOB train.py ...                   # several nodes: the same command on each

Several nodes (HOST:PORT on one of them) read one cache (a shared filesystem, or a copy at the same
path: `python cache.py verify`) and write one shared --out; every rank's flags and cache manifest
must hash the same. Keep each TP group (ranks r·tp .. r·tp + tp − 1) inside a node: then only DP's
gradient average and the bookkeeping all-reduce cross the network. --resume continues the run in
--out (forge/checkpoint.py: what resumes, what is refused); logging: forge/runlog.py.

Losses (on normalized activations, E||x|| = sqrt(d) per layer; mean over tokens), the LOSSES
registry: a term added there is trained, logged under its name and summed into the loss.
    mse       Σ_l ||ŷ_l − y_l||²                         summed over layers (Ameisen et al. 2025)
    sparsity  λ_S(t) Σ_{l,f} tanh(c · a_lf · ||W_dec,lf||)  jumprelu and relu; λ_S ramps up over the
              run; ||W_dec,lf|| over every layer feature f writes to (Anthropic, Jan 2025 update)
    preact    λ_P Σ_{l,f} relu(θ_lf − h_lf) · ||W_dec,lf||  jumprelu: pulls dead features'
              pre-activations h back towards their threshold θ (Anthropic, Jan 2025 update)
    aux       α ||ê − e||², ê the reconstruction of the residual e = y − ŷ by the top k_aux dead
              features (AuxK: topk and batchtopk; Gao et al. 2024, sec. A.2)

References: Ameisen et al. 2025 ("Circuit Tracing"); Rajamanoharan et al. 2024 (JumpReLU); Gao et
al. 2024 (TopK, AuxK); Bussmann et al. 2024 (BatchTopK); Shoeybi et al. 2019 (Megatron TP); the
loop follows nanoGPT / llm.c, the distributed set-up nanochat and picotron. Differences:
- one JSON + safetensors checkpoint per TP rank, never a pickle; every file whole or not at all;
- a BatchTopK batch is one DP rank's (as in the references): with DP > 1 not one process's;
- the step's bookkeeping is one all-reduce and no host sync (nanoGPT reads the loss every step): a
  non-finite loss is caught at the next log step or checkpoint, and no checkpoint holds weights
  after it.
"""

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from cache import MANIFEST, ActivationCache, CacheConfig, build_cache
from clt import CLTConfig, CrossLayerTranscoder
from forge import checkpoint
from forge.cli import arg, run_main
from forge.hub import load_tokenizer
from forge.runlog import RunLog, step_line, to_host
from model import GPT
from parallel import all_reduce_sum, average_gradients, check_same_everywhere, compute_init
from parallel import make_mesh, mesh_sum

DEFAULT_CACHE = os.path.join("runs", "cache")


@dataclass
class TrainConfig:
    cache: str = arg(DEFAULT_CACHE, "activation cache written by cache.py", group="data and model")
    model: str = arg("", 'GPT of the spliced loss; "" = the model named in the cache manifest')
    out: str = arg("runs/clt", "the run's folder: the export, metrics.jsonl and checkpoints/")
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
# the losses: LOSSES maps a name to (term(fwd, c) -> a scalar, over_features)


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
    dec: torch.Tensor  # (L, F/tp) ||W_dec,lf|| over every layer feature f writes to
    dead: torch.Tensor  # (L, F/tp) bool: this rank's dead features
    n_dead: Optional[torch.Tensor]  # dead features of all ranks (0-dim); None: none can be yet


def clt_losses(clt, mlp_in, mlp_out, c, step, dead, n_dead):
    """Encode and decode this rank's batch (mlp_in, mlp_out (B, L, d) raw) -> (Forward, {name: the
    term of LOSSES}). Terms over_features are this rank's share; the others are whole."""
    y = mlp_out * clt.output_scale[:, None]  # (B, L, d)
    pre = clt.pre_acts(mlp_in)  # (B, L, F/tp)
    acts = clt.activate(pre)  # (B, L, F/tp)
    sparse = c.activation in ("topk", "batchtopk")  # k of F active by construction: decode ∝ k
    err = clt.decode(acts, sparse, normalized=True, mlp_in=mlp_in) - y  # a skip path included
    sse = err.float().pow(2).sum(-1)  # (B, L)
    fwd = Forward(clt, step, y, pre, acts, err, sse, clt.decoder_norms(), dead, n_dead)
    return fwd, {name: term(fwd, c) for name, (term, _) in LOSSES.items()}


def mse_loss(f, c):
    return f.sse.mean(0).sum()  # summed over layers, mean over tokens


def sparsity_loss(f, c):
    if c.activation not in ("jumprelu", "relu"):
        return f.sse.new_zeros(())
    lam = c.sparsity * min(1.0, (f.step + 1) / c.steps)  # λ_S ramps up over the whole run
    return lam * torch.tanh(f.acts * (c.sparsity_c * f.dec)).float().sum((1, 2)).mean()


def preact_loss(f, c):
    if c.activation != "jumprelu":
        return f.sse.new_zeros(())
    # Σ_b Σ_lf relu(θ − h)·||W_dec|| = Σ_lf ||W_dec||·Σ_b relu(θ − h): the batch sum first: cheaper
    gap = F.relu(f.clt.threshold - f.pre).float().sum(0)  # (L, F/tp)
    return c.preact * (gap * f.dec).sum() / f.pre.size(0)


def aux_loss(f, c):
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
LOSSES = {
    "mse": (mse_loss, False),
    "sparsity": (sparsity_loss, True),
    "preact": (preact_loss, True),
    "aux": (aux_loss, False),
}


# -----------------------------------------------------------------------------
# the step: losses, backward, ONE bookkeeping all-reduce, clip, step


def lr_at(step, c):
    """Linear warmup, constant, then a linear decay to 0 over the final decay_frac of the run."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    decay_start = c.steps * (1 - c.decay_frac)
    return c.lr if step < decay_start else c.lr * (c.steps - step) / (c.steps - decay_start)


def train_step(c, clt, opt, batch, state, mesh, device, sync=True):
    """One optimizer step on this rank's batch (mlp_in, mlp_out), each (B/dp, L, d). sync=True: the
    global batch's metrics come to the host (the one sync point, before the update) and are
    returned; else nothing leaves the device and None is returned."""
    step = state["step"]
    lr = lr_at(step, c)
    for group in opt.param_groups:
        group["lr"] = lr
    mine = slice(mesh.tp_rank * clt.F_local, (mesh.tp_rank + 1) * clt.F_local)  # this rank's F/tp
    dead = state["since_fired"] >= c.dead_tokens  # (L, F) all features' clocks, on every rank
    n_dead = dead.sum(1)  # (L,)
    # clocks start at 0 and grow by one batch a step: before this step none can have run out
    maybe_dead = step * c.batch_size >= c.dead_tokens  # a host fact: no sync
    bf16 = c.autocast == "always" or (c.autocast == "cuda" and device.type == "cuda")
    # 1. the losses: every term of LOSSES on this rank's forward pass
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):  # fp32 master weights
        n = n_dead.sum() if maybe_dead else None
        fwd, terms = clt_losses(clt, *batch, c, step, dead[:, mine], n)
    sums = batch_sums(fwd, terms, mine, mesh)  # small: fwd's activations go with the backward
    del fwd
    # 2. backward, and DP's gradient average
    sum(terms.values()).backward()
    average_gradients(list(clt.parameters()), mesh.dp_group)
    # 3. the bookkeeping: ONE all-reduce of a small named float64 vector over the whole mesh
    s = mesh_sum(dict(sums, **grad_sums(clt, mesh)), mesh)
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
        del host["first_bad"]
        host["lr"] = lr
    # 4. clip to the global norm (on the device), step
    if c.grad_clip > 0:
        coef = (c.grad_clip / (grad_norm.float() + 1e-6)).clamp(max=1.0)
        for p in clt.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if c.activation == "batchtopk":  # its JumpReLU threshold for inference, averaged over DP
        clt.update_batchtopk_threshold((s["batch_threshold"] / mesh.dp).float(), step)
    state["since_fired"] = torch.where(s["fired"] > 0, 0, state["since_fired"] + c.batch_size)
    state["step"] = step + 1
    return host


# The bookkeeping's addends: summed over the mesh, the ranks' give the global batch's sums. What
# every TP rank holds whole (token sums, terms not over_features) is sent by TP rank 0 alone, what
# every DP replica holds (an averaged gradient) by DP rank 0: the others send zeros (exact).


def once(t, here):
    return t if here else torch.zeros_like(t)


def batch_sums(fwd, terms, mine, mesh):
    """Sums over this rank's tokens and features; fired (L, F): its own slice set where it fired."""
    B = fwd.sse.size(0)
    y = fwd.y.float()
    acts = fwd.acts.detach()  # (B, L, F/tp), never negative
    tp0 = mesh.tp_rank == 0
    n = torch.full((), float(B), device=y.device)
    s = dict(n=n, sse=fwd.sse.detach().sum(0), y_sum=y.sum(0), y_sq=y.pow(2).sum((0, 2)))
    s = {k: once(v, tp0) for k, v in s.items()}  # (), (L,), (L, d), (L,)
    s["l0"] = torch.count_nonzero(acts, dim=(0, 2))  # (L,) over this rank's features
    s.update({k: once(terms[k].detach() * B, tp0 or over) for k, (_, over) in LOSSES.items()})
    s["fired"] = fwd.dead.new_zeros(fwd.dead.size(0), fwd.clt.config.n_features)  # (L, F)
    s["fired"][:, mine] = acts.amax(0) > 0  # summed: on how many DP ranks each feature fired
    if fwd.clt.config.activation == "batchtopk":  # (L,) the global B·k-th value, per DP rank
        s["batch_threshold"] = once(fwd.clt.batch_threshold, tp0)
    return s


def grad_sums(clt, mesh):
    """Squared gradient norms after DP's average: of this TP rank's feature shards, and of the
    replicated b_dec and W_skip (from rank 0 alone)."""
    replicated = [p for p in (clt.b_dec, clt.W_skip) if p is not None and p.grad is not None]
    shards = [p for p in clt.parameters() if p.grad is not None]
    shards = [p for p in shards if all(p is not r for r in replicated)]
    norms = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in shards])  # no (F,) temp
    zero = norms.new_zeros((), dtype=torch.float64)
    rep = sum((torch.linalg.vector_norm(p.grad.double()).pow(2) for p in replicated), zero)
    rank0 = mesh.tp_rank == 0 and mesh.dp_rank == 0
    grad_sq = once(norms.pow(2).sum(), mesh.dp_rank == 0)
    return dict(grad_sq=grad_sq, grad_sq_replicated=once(rep, rank0))


# -----------------------------------------------------------------------------
# data: the activation cache


def open_cache(c):
    """The cache at c.cache; the default one is built first if it is missing (the tiny model)."""
    if not os.path.exists(os.path.join(c.cache, MANIFEST)):
        if os.path.normpath(c.cache) != os.path.normpath(DEFAULT_CACHE) or dist.is_initialized():
            build = "python cache.py build --model models/tiny --corpus toy --tokens 1000000"
            msg = f"no activation cache at {c.cache}: build one first, e.g.\n  {build}"
            msg += f" --out {c.cache}"
            raise FileNotFoundError(msg)
        print(f"no cache at {c.cache}: building the default one ({CacheConfig().tokens} tokens)")
        build_cache(CacheConfig(out=c.cache))
    return ActivationCache(c.cache)


def train_batches(cache, c, mesh, start_step, device):
    """This DP rank's share of every global batch from `start_step` on: (mlp_in, mlp_out), each
    (B/dp, L, d). The cache stripes each global batch over the ranks, so the union does not depend
    on dp, and starts at a global step without reading what it skips: the whole data position."""
    B = c.batch_size // mesh.dp
    stream = cache.batches(B, c.seed, mesh.dp_rank, mesh.dp, start_step=start_step)
    with contextlib.closing(stream):  # its reader threads stop when this generator is closed
        for rows in stream:
            yield cache.dequantize(rows, device)  # on the device: 4x less to move for int8 rows


def heldout_contexts(cache, n, bos):
    """Whole held-out contexts (n, ctx) rebuilt from the cache's held-out rows: each context stored
    ctx − 1 consecutive rows (positions 1..ctx−1; its BOS was dropped), so we put the BOS back."""
    m = cache.manifest
    lo, hi = cache.split_range("heldout")
    R = m["ctx"] - (0 if m["keep_bos"] else 1)
    n = min(n, (hi - lo) // R)
    if n == 0:
        msg = f"the cache has no held-out context (heldout rows {lo}..{hi})"
        raise ValueError(f"{msg}: build it with --heldout > 0")
    _, _, tokens, _, pos = cache.read(lo, lo + n * R)
    tokens, pos = tokens.view(n, R), pos.view(n, R)  # (n, R)
    if not (pos == pos[0]).all() or pos[0, -1] != m["ctx"] - 1:
        positions = f"(positions {pos[0].tolist()[:8]}...)"
        raise ValueError(f"held-out rows of {cache.path} are not whole contexts {positions}")
    if m["keep_bos"]:
        return tokens
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), tokens], dim=1)  # (n, ctx)


# -----------------------------------------------------------------------------
# evaluation: the spliced loss


@torch.no_grad()
def evaluate(gpt, clt, contexts, batch=16):
    """Held-out contexts (n, T), the CLT in inference mode (BatchTopK runs as its JumpReLU): FVU
    and L0 per layer of its reconstruction of the MLP outputs, and the next-token cross-entropy with
    the GPT's MLP outputs replaced by the CLT's (ce_spliced), against the clean GPT's and the zeroed
    MLPs' (recovered: the share of the zero-ablation gap closed, near 1 on a small model, so
    delta_ce = ce_spliced − ce_clean and kl_spliced = KL(clean ‖ spliced) come beside it).

    Spliced is the replacement model: each encoder reads the mlp_in of the spliced run itself, so
    errors compound. One GPT pass gives only the clean mlp_in, so we iterate: pass i reconstructs
    layers < i exactly; L − 1 passes reach the fixed point ("open": the first pass). The BOS keeps
    its clean MLP outputs (the cache drops it: the CLT never saw its outliers); it is not scored."""
    was_training = clt.training
    clt.eval()
    L, d = gpt.config.n_layer, gpt.config.n_embd
    sums = torch.zeros(6, dtype=torch.float64, device=contexts.device)  # CE x4, KL x2, summed
    rec = {k: torch.zeros(L, device=contexts.device) for k in ("l0", "sse", "y_sq")}
    rec["y_sum"] = torch.zeros(L, d, device=contexts.device)  # sums over the tokens, as in training
    for idx in contexts.split(batch):
        B, T = idx.shape
        logits, acts = gpt.run_with_acts(idx)
        clean_logp = logits[:, 1:-1].float().log_softmax(-1)  # (B, T-2, V) the scored positions
        bos = acts.mlp_out[:, :1]  # (B, 1, L, d)
        y = acts.mlp_out[:, 1:].flatten(0, 1)  # (B·(T-1), L, d) what the cache holds
        a, y_hat = clt(acts.mlp_in[:, 1:].flatten(0, 1))
        rec["l0"] += (a > 0).sum((0, 2))
        rec["sse"] += (y_hat - y).pow(2).sum((0, 2))
        rec["y_sum"] += y.sum(0)
        rec["y_sq"] += y.pow(2).sum((0, 2))
        hat = torch.cat([bos, y_hat.view(B, T - 1, L, d)], 1)  # (B, T, L, d)
        open_ce = next_token_ce(gpt(idx, mlp_out=hat), idx)
        for _ in range(L - 1):
            mlp_in = gpt.run_with_acts(idx, mlp_out=hat)[1].mlp_in  # (B, T, L, d)
            hat = torch.cat([bos, clt(mlp_in[:, 1:].flatten(0, 1))[1].view(B, T - 1, L, d)], 1)
        spliced_logits = gpt(idx, mlp_out=hat)
        zero_logits = gpt(idx, mlp_out=torch.cat([bos, torch.zeros_like(hat[:, 1:])], 1))
        ces = [next_token_ce(x, idx) for x in (logits, spliced_logits)]
        ces += [open_ce, next_token_ce(zero_logits, idx)]
        kls = [next_token_kl(x, clean_logp) for x in (spliced_logits, zero_logits)]
        sums += torch.stack(ces + kls).double()
    clt.train(was_training)
    N = contexts.size(0) * (contexts.size(1) - 1)
    all_reduce_sum(rec["l0"], clt.mesh.tp_group)  # each TP rank counted its own features
    sst = rec["y_sq"] - rec["y_sum"].pow(2).sum(-1) / N  # (L,)
    clean, spliced, open_, zero, kl_spliced, kl_zero = (sums / (N - contexts.size(0))).tolist()
    m = dict(fvu=(rec["sse"] / sst).tolist(), l0=(rec["l0"] / N).tolist(), ce_clean=clean)
    m.update(ce_spliced=spliced, ce_open=open_, ce_zero=zero)
    m.update(
        recovered=(zero - spliced) / (zero - clean), recovered_open=(zero - open_) / (zero - clean)
    )
    return dict(m, delta_ce=spliced - clean, kl_spliced=kl_spliced, kl_zero=kl_zero)


def next_token_ce(logits, idx):
    """Summed next-token loss of positions 1..T-2 (the BOS is not scored)."""
    targets = idx[:, 2:].flatten()
    return F.cross_entropy(logits[:, 1:-1].flatten(0, 1).float(), targets, reduction="sum")


def next_token_kl(logits, clean):
    """Summed KL(clean ‖ these logits) of the next-token distributions at the positions of ce."""
    return F.kl_div(
        logits[:, 1:-1].float().log_softmax(-1), clean, log_target=True, reduction="sum"
    )


# -----------------------------------------------------------------------------
# the run


def train(config: TrainConfig, given=None):
    """Train (or resume) a CLT as config says; returns the last step's metrics (every rank).
    given: the flags the user typed (parse_args; None = those that differ from the defaults)."""
    c, meta = checkpoint.resolve(config, given)  # on --resume: the checkpoint's config and meta
    ddp, rank, local_rank, world, device = compute_init(c.device, c.timeout_s)
    master = rank == 0
    cache = open_cache(c)
    same = json.dumps([asdict(c), cache.manifest], sort_keys=True)
    check_same_everywhere(same, "command line or cache", device)
    checkpoint.check_resume(c, meta, world, cache.manifest)  # the same mesh, the same cache
    mesh = make_mesh(ddp, world, c.tp, device)
    checkpoint.check_flags(c, cache, mesh)
    if master:
        where = f"world {world} = dp {mesh.dp} x tp {mesh.tp} | device {device}"
        print(f"train.py | {where} | {asdict(c)}")
    gpt, contexts = eval_set(c, cache, device)
    clt, opt = build(c, cache, mesh, device)
    clocks = torch.zeros(cache.n_layers, c.features, dtype=torch.long, device=device)  # (L, F)
    state = dict(step=0, since_fired=clocks, first_bad=torch.tensor(-1, device=device))
    # the run's identity, kept in every checkpoint: its wandb run id and its cache's identity
    metrics, ids = checkpoint.resume_or_claim(
        c, meta, clt, opt, state, mesh, master, cache.manifest
    )
    log = RunLog(c, ids["wandb_id"], state["step"], master)
    start = state["step"]
    end = c.steps if c.stop_at < 0 else min(c.stop_at, c.steps)
    bar = tqdm(range(start, end), initial=start, total=c.steps, disable=not master, desc="train")
    t_last, last_sync = time.perf_counter(), start
    # closing(): the cache's reader threads stop even when a step raises (one left reading aborts)
    with contextlib.closing(train_batches(cache, c, mesh, start, device)) as batches:
        for step in bar:  # the bar shows the ETA, its postfix the last log step's line
            done = step + 1
            evaluating = c.eval_every > 0 and (done % c.eval_every == 0 or done == c.steps)
            saving = (c.ckpt_every > 0 and done % c.ckpt_every == 0) or done == end
            sync = step % c.log_every == 0 or evaluating or saving
            m = train_step(c, clt, opt, next(batches), state, mesh, device, sync)
            if not sync:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t_last) / (done - last_sync)  # per step since the last sync
            metrics = dict(m, step=step, ms=1000 * dt, tok_per_s=c.batch_size / dt)
            if evaluating:
                metrics["eval"] = evaluate(gpt, clt, contexts)
            log.log(metrics)
            bar.set_postfix_str(step_line(metrics), refresh=False)
            if saving:
                checkpoint.save(c, clt, opt, state, mesh, master, dict(ids, metrics=metrics))
            t_last, last_sync = time.perf_counter(), done
    checkpoint.finish(c, clt, metrics, meta, end, mesh, master)
    log.finish()
    return metrics


def eval_set(c, cache, device):
    """The GPT of the spliced loss (refused unless it made the cache) and the held-out contexts."""
    if c.eval_every <= 0 and not c.model:
        return None, None
    gpt = GPT.from_pretrained(c.model or cache.manifest["model"]).to(device)
    checkpoint.check_cache_model(c, cache, gpt)
    if c.eval_every <= 0:
        return gpt, None
    bos = load_tokenizer(gpt.name_or_path).eot_token
    return gpt, heldout_contexts(cache, c.eval_contexts, bos).to(device)


def build(c, cache, mesh, device):
    """The CLT shard of this rank, with the cache's normalization, and its optimizer."""
    shared = {k: getattr(c, k) for k in ("activation", "k", "threshold_init", "bandwidth")}
    shared.update(decoder=c.decoder, skip=c.skip, model=c.model or cache.manifest["model"])
    sha256 = cache.manifest.get("identity", {}).get("model_sha256", "")  # graph.py refuses others
    config = CLTConfig(cache.n_layers, cache.d_model, c.features, model_sha256=sha256, **shared)
    clt = CrossLayerTranscoder(config, c.seed, mesh)
    with torch.no_grad():  # E||x|| = sqrt(d) per layer (Ameisen et al. 2025), from the mean norms
        clt.input_scale.copy_(cache.d_model**0.5 / cache.norm_in)
        clt.output_scale.copy_(cache.d_model**0.5 / cache.norm_out)
    clt = clt.to(device).train()
    return clt, optimizer(clt, c)


def optimizer(clt, c):
    """AdamW, fused: one pass over each parameter and its moments instead of ~ten (CPU and CUDA)."""
    adam = dict(lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay, fused=True)
    return torch.optim.AdamW(clt.parameters(), **adam)


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    """The command line -> (TrainConfig, the names of the flags typed: --resume checks them)."""
    return checkpoint.parse_args(__doc__, TrainConfig, argv)


@record  # torchrun's failure summary then shows the failing rank's traceback
def main(argv=None):
    config, given = parse_args(argv)
    try:
        train(config, given)
    except RuntimeError as e:  # gloo says "Timed out waiting ...", NCCL's watchdog "timeout"
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        waited = f"a collective waited longer than --timeout-s {config.timeout_s}"
        why = "another rank crashed or is stuck (torchrun names it below)"
        raise RuntimeError(f"rank {os.environ.get('RANK', 0)}: {waited}: {why}") from e
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)

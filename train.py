"""
train.py: train a cross-layer transcoder on an activation cache, on one process or many.

Data flow. cache.py wrote mlp_in / mlp_out rows (N, L, d) of a GPT-2 to disk. Each step, every DP rank
reads its share of a global batch, normalizes it by the manifest's per-layer scales, encodes with
its F/T features per layer (TP), decodes a partial reconstruction, and one all-reduce over TP sums
the partials. Losses -> backward -> gradients averaged over DP -> global norm clipping -> Adam.
Every --eval-every steps the CLT is spliced into the GPT on held-out contexts (the "replacement
model"); at the end the TP shards are consolidated, the normalization folded in, and the CLT saved
to --out in circuit-tracer's layout (clt.CrossLayerTranscoder.from_pretrained loads it).

    python train.py --help
    python train.py                                           # the default CLT of models/tiny (CPU, minutes)
    python train.py --activation topk --k 16 --out runs/clt-topk
    torchrun --nproc_per_node=4 train.py --tp 2 ...           # dp = 4 / 2 = 2, NCCL on GPUs, gloo on CPU
    torchrun --nproc_per_node=2 train.py --tp 2 --device cpu --features 256 --steps 50   # TP on a CPU
    python train.py --cache runs/cache --steps 50 --features 256 --eval-every -1   # a tiny CPU run
    python train.py --resume                                  # continue from --out/checkpoints/latest.json

Losses (all on normalized activations, E||x|| = sqrt(d) per layer; mean over tokens):
    mse       Σ_l ||ŷ_l − y_l||²                         summed over layers (Ameisen et al. 2025)
    sparsity  λ_S(t) Σ_{l,f} tanh(c · a_lf · ||W_dec,lf||)  jumprelu and relu; λ_S ramps up linearly over
              the run; ||W_dec,lf|| is the norm over every layer feature f writes to (Anthropic, Jan 2025 update)
    preact    λ_P Σ_{l,f} relu(θ_lf − h_lf) · ||W_dec,lf||  jumprelu: pulls dead features' pre-activations
              h back towards their threshold θ (Anthropic, Jan 2025 update)
    auxk      α ||ê − e||², ê the reconstruction of the residual e = y − ŷ by the top k_aux dead features
              (topk and batchtopk; Gao et al. 2024, sec. A.2)

References: Ameisen et al. 2025 ("Circuit Tracing") for the CLT and its losses; Rajamanoharan et al. 2024
(JumpReLU); Gao et al. 2024 (TopK, AuxK); Bussmann et al. 2024 (BatchTopK); Shoeybi et al. 2019 (Megatron
tensor parallelism); the loop follows nanoGPT / llm.c, the distributed set-up nanochat and picotron.
Differences: one JSON + safetensors checkpoint per TP rank, never a pickle; a BatchTopK batch is the
batch of one DP rank (as in the references), so BatchTopK with DP > 1 is not the same as one process.
"""
import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import clt as C

DEFAULT_CACHE = os.path.join("runs", "cache")

# -----------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    # data and model
    cache: str = DEFAULT_CACHE  # activation cache directory written by cache.py
    model: str = ""  # GPT for the spliced loss; "" = the model named in the cache manifest
    out: str = "runs/clt"  # export (circuit-tracer layout), metrics.jsonl and checkpoints/
    # the CLT
    features: int = 1024  # F: features per layer (all TP ranks together)
    activation: str = "jumprelu"  # jumprelu | topk | batchtopk | relu
    k: int = 16  # topk / batchtopk: active features per token and layer
    threshold_init: float = 0.03  # jumprelu: initial threshold
    bandwidth: float = 1.0  # jumprelu: straight-through kernel width ε
    # optimization
    steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 1024  # tokens per step, all DP ranks together
    lr: float = 1e-3  # peak learning rate (Adam)
    warmup: int = 100  # linear warmup steps
    decay_frac: float = 0.2  # final fraction of the run over which the lr decays linearly to 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global gradient-norm clip over all shards; -1 = disable
    seed: int = 0  # CLT init and data order
    # losses
    sparsity: float = 0.7  # λ_S, final value of the tanh sparsity penalty (jumprelu, relu)
    sparsity_c: float = 4.0  # c inside tanh(c · a · ||W_dec||)
    preact: float = 1e-3  # λ_P of the pre-activation penalty (jumprelu); 0 leaves ~40% of features dead here
    aux_coef: float = 1 / 32  # α of AuxK (topk, batchtopk)
    aux_k: int = -1  # k_aux dead features per token for AuxK; -1 = d_model / 2 (Gao et al. 2024)
    dead_tokens: int = 100_000  # a feature that has not fired in this many tokens counts as dead
    # evaluation, logging and checkpoints
    eval_every: int = 500  # spliced-loss evaluation every this many steps (and at the end); -1 = never
    eval_contexts: int = 64  # held-out contexts for the spliced loss
    ckpt_every: int = 500  # checkpoint every this many steps (and at the end); -1 = only at the end
    resume: bool = False  # continue from out/checkpoints/latest.json
    stop_at: int = -1  # end this invocation after this many steps, with a checkpoint (a job time limit); -1 = --steps
    # parallelism
    tp: int = 1  # tensor-parallel size; dp = world size / tp
    timeout_s: int = 300  # collective timeout: a crashed or stuck rank ends the run with an error
    device: str = "auto"  # auto | cpu | cuda


# -----------------------------------------------------------------------------
# gradient clipping over the shards (the collectives themselves live in clt.py's mesh section)


def clip_gradients(clt, max_norm, mesh):
    """Clip by the norm of the whole (unsharded) gradient: squared norms of the feature shards are
    summed over TP, the replicated b_dec counted once. After DP averaging every DP rank agrees."""
    sharded = [p.grad for p in clt.parameters() if p.grad is not None and p is not clt.b_dec]
    sq = C.all_reduce_sum(torch.stack([g.float().pow(2).sum() for g in sharded]).sum(), mesh.tp_group)
    norm = (sq + clt.b_dec.grad.float().pow(2).sum()).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in clt.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


# -----------------------------------------------------------------------------
# schedules and losses


def lr_at(step, c):
    """Linear warmup, constant, then a linear decay to 0 over the final decay_frac of the run."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    decay_start = c.steps * (1 - c.decay_frac)
    return c.lr if step < decay_start else c.lr * (c.steps - step) / (c.steps - decay_start)


def clt_losses(clt, mlp_in, mlp_out, c, step, dead, n_dead):
    """One rank's losses on its batch. mlp_in, mlp_out (B, L, d) raw; dead (L, F/T) bool; n_dead the
    number of dead features over all ranks. Terms over features (sparsity, preact) are this rank's
    share; the reconstruction terms are complete (decode sums over TP).
    -> (loss to backward, parts: sums for the metrics, fired (L, F/T): which features fired)."""
    y = mlp_out * clt.output_scale[:, None]  # (B, L, d) the normalized target
    pre = clt.pre_acts(mlp_in)  # (B, L, F/T)
    acts = clt.activate(pre)  # (B, L, F/T)
    sparse = c.activation in ("topk", "batchtopk")  # k of F active by construction: decode ∝ k, not F
    err = clt.decode(acts, sparse, normalized=True) - y  # (B, L, d)
    sse = err.float().pow(2).sum(-1)  # (B, L)
    dec = clt.decoder_norms()  # (L, F/T) over every layer a feature writes to
    zero = sse.new_zeros(())
    sparsity, preact, aux = zero, zero, zero
    if c.activation in ("jumprelu", "relu"):  # λ_S ramps up linearly over the whole run (Anthropic)
        lam = c.sparsity * min(1.0, (step + 1) / c.steps)
        sparsity = lam * torch.tanh(acts * (c.sparsity_c * dec)).float().sum((1, 2)).mean()
    if c.activation == "jumprelu":
        # Σ_b Σ_lf relu(θ − h)·||W_dec|| = Σ_lf ||W_dec||·Σ_b relu(θ − h): summing the batch first saves passes
        preact = c.preact * (F.relu(clt.threshold - pre).float().sum(0) * dec).sum() / pre.size(0)
    if sparse and n_dead > 0:  # AuxK: the dead features model the residual (n_dead is global: no rank skips alone)
        k_aux = min(clt.config.d_model // 2 if c.aux_k < 0 else c.aux_k, clt.config.n_features)
        aux_acts = clt.topk(pre.masked_fill(~dead, 0.0), k_aux)  # global top k_aux over TP
        e_hat = clt.decode(aux_acts, sparse=True, normalized=True, bias=False)  # (B, L, d)
        scale = min(n_dead / k_aux, 1.0)  # sparsify's scaling: no dead features, no AuxK
        aux = c.aux_coef * scale * (e_hat - err.detach()).float().pow(2).sum((1, 2)).mean()
    mse = sse.mean(0).sum()  # summed over layers, mean over tokens
    B, y32 = sse.size(0), y.float()
    a = acts.detach()  # (B, L, F/T), never negative
    parts = dict(n=torch.tensor(float(B), device=y.device), l0=torch.count_nonzero(a, dim=(0, 2)),
                 sse=sse.detach().sum(0), y_sum=y32.sum(0), y_sq=y32.pow(2).sum((0, 2)),  # sums over this rank's tokens
                 mse=mse.detach() * B, sparsity=sparsity.detach() * B, preact=preact.detach() * B, aux=aux.detach() * B)
    return mse + sparsity + preact + aux, parts, a.amax(0) > 0


def reduce_sums(parts, group):
    """Sum a dict of tensors over `group` with one all-reduce."""
    flat = C.all_reduce_sum(torch.cat([v.double().flatten() for v in parts.values()]), group)
    return {k: t.view_as(v) for (k, v), t in zip(parts.items(), flat.split([v.numel() for v in parts.values()]))}


def reduce_metrics(parts, mesh):
    """Per-layer FVU and L0, and the loss terms, of the global batch: feature-local sums (L0 and the
    penalties) over TP first, then everything over DP. The .cpu() is its sync point."""
    local = ("l0", "sparsity", "preact")
    parts = {**parts, **reduce_sums({k: parts[k] for k in local}, mesh.tp_group)}
    s = {k: v.cpu() for k, v in reduce_sums(parts, mesh.dp_group).items()}
    N = s["n"].item()
    sst = s["y_sq"] - s["y_sum"].pow(2).sum(-1) / N  # (L,) Σ ||y − ȳ||² per layer
    m = {k: s[k].item() / N for k in ("mse", "sparsity", "preact", "aux")}
    return dict(loss=sum(m.values()), **m, fvu=(s["sse"] / sst.clamp_min(1e-12)).tolist(),
                l0=(s["l0"] / N).tolist(), sse=s["sse"].tolist())


# -----------------------------------------------------------------------------
# data: the activation cache


def open_cache(c, print0):
    """The cache at c.cache; the default one is built first if it is missing (cache.py, tiny model)."""
    import cache as cache_lib
    if not os.path.exists(os.path.join(c.cache, cache_lib.MANIFEST)):
        if os.path.normpath(c.cache) != os.path.normpath(DEFAULT_CACHE) or dist.is_initialized():
            raise FileNotFoundError(f"no activation cache at {c.cache}: build one first, e.g.\n  python cache.py build "
                                    f"--model models/tiny --corpus toy --tokens 1000000 --out {c.cache}")
        print0(f"no cache at {c.cache}: building the default one (cache.py, {cache_lib.CacheConfig().tokens} tokens)")
        cache_lib.build_cache(cache_lib.CacheConfig(out=c.cache))
    return cache_lib.ActivationCache(c.cache)


def train_batches(cache, c, mesh, start_step, device):
    """This DP rank's share of every global batch from `start_step` on: (mlp_in, mlp_out) (B/dp, L, d).

    The cache stripes each global batch over the ranks, so the union does not depend on dp, and it
    starts at a global step without reading what it skips: that is the whole data position."""
    if cache.batches_per_epoch(c.batch_size // mesh.dp, mesh.dp) == 0:
        lo, hi = cache.split_range("train")
        raise ValueError(f"the cache's train split has {hi - lo} rows, fewer than one global batch of {c.batch_size}")
    stream = cache.batches(c.batch_size // mesh.dp, c.seed, mesh.dp_rank, mesh.dp, start_step=start_step)

    def dequantized():  # on `device`: the stored rows move there, 4x less than float32 for int8
        with contextlib.closing(stream):
            for rows in stream:
                yield cache.dequantize(rows, device)
    return dequantized()


def heldout_contexts(cache, n, bos):
    """Whole held-out contexts (n, ctx) rebuilt from the cache's held-out rows: each context stored
    ctx − 1 consecutive rows (positions 1..ctx−1; its BOS was dropped), so we put the BOS back."""
    m = cache.manifest
    lo, hi = cache.split_range("heldout")
    R = m["ctx"] - (0 if m["keep_bos"] else 1)
    n = min(n, (hi - lo) // R)
    if n == 0:
        raise ValueError(f"the cache has no held-out context (heldout rows {lo}..{hi}): build it with --heldout > 0")
    _, _, tokens, _, pos = cache.read(lo, lo + n * R)
    tokens, pos = tokens.view(n, R), pos.view(n, R)  # (n, R)
    if not (pos == pos[0]).all() or pos[0, -1] != m["ctx"] - 1:
        raise ValueError(f"held-out rows of {cache.path} are not whole contexts (positions {pos[0].tolist()[:8]}...)")
    if m["keep_bos"]:
        return tokens
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), tokens], dim=1)  # (n, ctx)


# -----------------------------------------------------------------------------
# evaluation: the spliced loss


@torch.no_grad()
def evaluate(gpt, clt, contexts, batch=16):
    """Held-out contexts (n, T), the CLT in inference mode (BatchTopK then runs as its JumpReLU):
    per-layer FVU and L0 of its reconstruction of the clean MLP outputs, and the spliced loss, the
    next-token cross-entropy of the GPT with its MLP outputs replaced by the CLT's (ce_spliced),
    against the clean GPT and the GPT with those MLP outputs zeroed (recovered = the fraction of the
    zero-ablation loss gap closed).

    Spliced is the replacement model: each layer's CLT encoder reads the mlp_in of the spliced run
    itself, so errors compound across layers. One GPT pass gives only the clean mlp_in, so we iterate:
    pass i reconstructs layers < i exactly, and L − 1 passes reach the fixed point. "open" is the
    first pass: every encoder reads the clean mlp_in. The BOS position keeps its clean MLP outputs
    (the cache drops it, so the CLT never saw its outlier activations) and is not scored.
    """
    was_training = clt.training
    clt.eval()
    L, d = gpt.config.n_layer, gpt.config.n_embd
    dev = contexts.device
    ce_sums = torch.zeros(4, dtype=torch.float64, device=dev)
    rec = dict(l0=torch.zeros(L, device=dev), sse=torch.zeros(L, device=dev), y_sum=torch.zeros(L, d, device=dev),
               y_sq=torch.zeros(L, device=dev))  # sums over the held-out tokens, as in reduce_metrics
    for idx in contexts.split(batch):
        B, T = idx.shape
        ce = lambda logits: F.cross_entropy(logits[:, 1:-1].flatten(0, 1).float(), idx[:, 2:].flatten(),
                                            reduction="sum")
        logits, acts = gpt.run_with_acts(idx)
        bos = acts.mlp_out[:, :1]  # (B, 1, L, d)
        y = acts.mlp_out[:, 1:].flatten(0, 1)  # (B·(T-1), L, d) what the cache holds for these tokens
        splice = lambda mlp_in: clt(mlp_in[:, 1:].flatten(0, 1))  # -> (acts, mlp_out_hat (B·(T-1), L, d))
        with_bos = lambda y_hat: torch.cat([bos, y_hat.view(B, T - 1, L, d)], 1)  # (B, T, L, d)
        a, y_hat = splice(acts.mlp_in)
        for k, v in dict(l0=(a > 0).sum((0, 2)), sse=(y_hat - y).pow(2).sum((0, 2)), y_sum=y.sum(0),
                         y_sq=y.pow(2).sum((0, 2))).items():
            rec[k] += v
        hat = with_bos(y_hat)
        open_ce = ce(gpt(idx, mlp_out=hat))
        for _ in range(L - 1):
            hat = with_bos(splice(gpt.run_with_acts(idx, mlp_out=hat)[1].mlp_in)[1])
        zero = torch.cat([bos, torch.zeros_like(hat[:, 1:])], 1)
        ce_sums += torch.stack([ce(logits), ce(gpt(idx, mlp_out=hat)), open_ce, ce(gpt(idx, mlp_out=zero))]).double()
    clt.train(was_training)
    N = contexts.size(0) * (contexts.size(1) - 1)
    C.all_reduce_sum(rec["l0"], clt.mesh.tp_group)  # each TP rank counted its own features
    sst = rec["y_sq"] - rec["y_sum"].pow(2).sum(-1) / N  # (L,)
    clean, spliced, open_, zero = (ce_sums / (contexts.size(0) * (contexts.size(1) - 2))).tolist()
    return dict(fvu=(rec["sse"] / sst).tolist(), l0=(rec["l0"] / N).tolist(), ce_clean=clean, ce_spliced=spliced,
                ce_open=open_, ce_zero=zero, recovered=(zero - spliced) / (zero - clean),
                recovered_open=(zero - open_) / (zero - clean))


# -----------------------------------------------------------------------------
# checkpoints: one safetensors shard per TP rank + one JSON, marked complete by an atomic rename

CKPT_DIR, LATEST = "checkpoints", "latest.json"


def shard_name(mesh):
    return f"tp{mesh.tp_rank}-mesh{mesh.dp}x{mesh.tp}.safetensors"


def save_checkpoint(c, clt, opt, state, mesh, master):
    """Every TP rank of DP replica 0 writes its shard (weights, Adam moments, dead-feature clocks);
    after a barrier rank 0 writes latest.json by an atomic rename: only then does the checkpoint
    exist. Older step directories are removed after that, so a good checkpoint is always on disk."""
    root = os.path.join(c.out, CKPT_DIR)
    step_dir = os.path.join(root, f"step_{state['step']:06d}")
    if mesh.dp_rank == 0:  # the DP replicas hold identical copies
        os.makedirs(step_dir, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in clt.state_dict().items()}
        for name, p in clt.named_parameters():
            tensors.update({f"optim.{name}.{k}": v for k, v in opt.state.get(p, {}).items()})
        tensors["since_fired"] = state["since_fired"]
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(step_dir, shard_name(mesh)))
    C.barrier()
    if master:
        meta = dict(step=state["step"], mesh=[mesh.dp, mesh.tp], dir=os.path.basename(step_dir),
                    train_config=asdict(c), clt_config=asdict(clt.config), rng=torch.get_rng_state().tolist(),
                    data=dict(next_step=state["step"], global_batch=c.batch_size, seed=c.seed))
        with open(os.path.join(root, LATEST + ".tmp"), "w") as f:
            json.dump(meta, f)
        os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
        for name in os.listdir(root):
            if name.startswith("step_") and name != meta["dir"]:
                shutil.rmtree(os.path.join(root, name))
    C.barrier()  # every rank returns only once the checkpoint is complete


def read_checkpoint_meta(out):
    path = os.path.join(out, CKPT_DIR, LATEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no complete checkpoint at {path}")
    with open(path) as f:
        return json.load(f)


def load_checkpoint(c, clt, opt, state, mesh, device):
    meta = read_checkpoint_meta(c.out)
    if meta["mesh"] != [mesh.dp, mesh.tp]:
        raise ValueError(f"the checkpoint in {c.out} was written by a (dp, tp) = {tuple(meta['mesh'])} mesh, this run "
                         f"is {(mesh.dp, mesh.tp)}: resume with the same torchrun --nproc_per_node and --tp (to change "
                         f"the TP size, load the exported CLT with CrossLayerTranscoder.from_pretrained(path, mesh))")
    tensors = load_file(os.path.join(c.out, CKPT_DIR, meta["dir"], shard_name(mesh)))
    clt.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    for name, p in clt.named_parameters():
        moments = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim.{name}.")}
        if moments:  # Adam keeps its step count on the CPU, the moments beside the parameter
            opt.state[p] = {k: v if k == "step" else v.to(device) for k, v in moments.items()}
    state.update(step=meta["step"], since_fired=tensors["since_fired"].to(device))
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))


# -----------------------------------------------------------------------------
# the training loop

RUN_FIELDS = ("steps", "stop_at", "eval_every", "eval_contexts", "ckpt_every", "resume", "timeout_s", "device",
              "cache", "model")  # what a resumed run takes from the command line rather than the checkpoint


def build(c, cache, mesh, device):
    """The CLT shard of this rank, with the cache's normalization, and its optimizer."""
    m = cache.manifest
    config = C.CLTConfig(n_layers=cache.n_layers, d_model=cache.d_model, n_features=c.features, activation=c.activation,
                         k=c.k, threshold_init=c.threshold_init, bandwidth=c.bandwidth, model=c.model or m["model"])
    clt = C.CrossLayerTranscoder(config, c.seed, mesh)
    with torch.no_grad():  # E||x|| = sqrt(d) per layer (Ameisen et al. 2025), from the manifest's mean norms
        clt.input_scale.copy_(cache.d_model ** 0.5 / cache.norm_in)
        clt.output_scale.copy_(cache.d_model ** 0.5 / cache.norm_out)
    clt = clt.to(device).train()
    opt = torch.optim.AdamW(clt.parameters(), lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)
    return clt, opt


def load_gpt(c, cache, device):
    gpt = C.GPT.from_pretrained(c.model or cache.manifest["model"]).to(device)
    if (gpt.config.n_layer, gpt.config.n_embd) != (cache.n_layers, cache.d_model):
        raise ValueError(f"the cache {c.cache} has L={cache.n_layers}, d={cache.d_model} but the model "
                         f"{c.model or cache.manifest['model']} has L={gpt.config.n_layer}, d={gpt.config.n_embd}")
    return gpt


def check_config(c, cache, mesh):
    if c.features <= 0 or c.features % mesh.tp:
        raise ValueError(f"--features {c.features} must be positive and divisible by --tp {mesh.tp}")
    if c.activation in ("topk", "batchtopk") and not 0 < c.k <= c.features:
        raise ValueError(f"--k {c.k} must be in 1..--features {c.features}")
    if c.batch_size <= 0 or c.batch_size % mesh.dp:
        raise ValueError(f"--batch-size {c.batch_size} must be positive and divisible by dp = {mesh.dp}")
    if c.steps <= 0 or c.lr <= 0 or not 0 <= c.decay_frac <= 1:
        raise ValueError(f"need --steps > 0, --lr > 0 and 0 <= --decay-frac <= 1, "
                         f"got {c.steps}, {c.lr}, {c.decay_frac}")


def train(config: TrainConfig):
    """Train (or resume) a CLT as config says; returns the last step's metrics (every rank)."""
    ddp, rank, local_rank, world, device = C.compute_init(config.device, config.timeout_s)
    mesh = C.make_mesh(ddp, world, config.tp, device)
    master = rank == 0
    print0 = lambda *a: print(*a, flush=True) if master else None
    c = config
    if c.resume:  # the shape of the run comes from the checkpoint; only the run-control fields from the command line
        saved = read_checkpoint_meta(c.out)["train_config"]
        c = TrainConfig(**{**saved, **{k: getattr(config, k) for k in RUN_FIELDS}})
    print0(f"train.py | world {world} = dp {mesh.dp} x tp {mesh.tp} | device {device} | {asdict(c)}")
    cache = open_cache(c, print0)
    check_config(c, cache, mesh)
    gpt = load_gpt(c, cache, device) if c.eval_every != -1 else None
    contexts = heldout_contexts(cache, c.eval_contexts, C.load_tokenizer(gpt.name_or_path).eot_token) if gpt else None
    clt, opt = build(c, cache, mesh, device)
    state = dict(step=0, since_fired=torch.zeros(cache.n_layers, clt.F_local, dtype=torch.long, device=device))
    if c.resume:
        load_checkpoint(c, clt, opt, state, mesh, device)
    os.makedirs(c.out, exist_ok=True)
    log = open_log(c, state["step"], master)
    end = c.steps if c.stop_at < 0 else min(c.stop_at, c.steps)
    metrics = {}
    # closing(): the cache's reader threads stop even when a step raises (a thread left reading at exit aborts)
    bar = tqdm(range(state["step"], end), initial=state["step"], total=c.steps, disable=not master, desc="train")
    with contextlib.closing(train_batches(cache, c, mesh, state["step"], device)) as batches:
        for step in bar:
            t0 = time.perf_counter()
            metrics = train_step(c, clt, opt, next(batches), state, mesh, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            metrics.update(step=step, ms=1000 * dt, tok_per_s=c.batch_size / dt)
            if gpt is not None and ((step + 1) % c.eval_every == 0 or step + 1 == c.steps):
                metrics["eval"] = evaluate(gpt, clt, contexts.to(device))
            log(metrics)
            bar.set_postfix_str(step_line(metrics), refresh=False)
            if c.ckpt_every > 0 and (step + 1) % c.ckpt_every == 0 or step + 1 == end:
                save_checkpoint(c, clt, opt, state, mesh, master)
    if end == c.steps and metrics:  # the run is over (not stopped early, not already finished)
        export(c, clt, metrics, master)
    return metrics


def train_step(c, clt, opt, batch, state, mesh, device):
    """One optimizer step on this rank's (mlp_in, mlp_out); returns the global batch's metrics."""
    step = state["step"]
    lr = lr_at(step, c)
    for group in opt.param_groups:
        group["lr"] = lr
    dead = state["since_fired"] >= c.dead_tokens  # (L, F/T)
    n_dead = C.all_reduce_sum(dead.sum(1).float(), mesh.tp_group)  # (L,) over all features
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):  # fp32 master weights
        loss, parts, fired = clt_losses(clt, *batch, c, step, dead, n_dead.sum().item())
    loss.backward()
    C.average_gradients(list(clt.parameters()), mesh.dp_group)
    m = reduce_metrics(parts, mesh)
    if not math.isfinite(m["loss"]):  # before the update: the weights and the last checkpoint stay good
        bad = [l for l, s in enumerate(m["sse"]) if not math.isfinite(s)]
        raise FloatingPointError(f"non-finite loss {m['loss']} at step {step} (layers {bad or 'none'} have a "
                                 f"non-finite reconstruction error; terms {m}); the last good checkpoint is in "
                                 f"{os.path.join(c.out, CKPT_DIR)}: lower --lr or resume from it")
    m["grad_norm"] = clip_gradients(clt, c.grad_clip, mesh).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if c.activation == "batchtopk":  # its JumpReLU threshold for inference, averaged over DP
        clt.update_batchtopk_threshold(C.all_reduce_sum(clt.batch_threshold.clone(), mesh.dp_group) / mesh.dp, step)
    fired = C.all_reduce_sum(fired.float(), mesh.dp_group) > 0  # (L, F/T) on any DP rank
    state["since_fired"] = torch.where(fired, 0, state["since_fired"] + c.batch_size)
    state["step"] = step + 1
    return dict(m, lr=lr, dead=n_dead.tolist())


def step_line(m):
    """The tqdm postfix: one line, fields split by |."""
    mean = lambda xs: sum(xs) / len(xs)
    line = (f"loss {m['loss']:.4f} | fvu {mean(m['fvu']):.3f} | l0 {mean(m['l0']):.1f} | dead {int(sum(m['dead']))} | "
            f"gnorm {m['grad_norm']:.2f} | lr {m['lr']:.2e} | {m['ms']:.0f} ms | {m['tok_per_s']:.0f} tok/s")
    if "eval" in m:
        line += f" | recovered {m['eval']['recovered']:.3f}"
    return line


def open_log(c, start_step, master):
    """metrics.jsonl writer; a resumed run drops the lines of steps it will redo."""
    path = os.path.join(c.out, "metrics.jsonl")
    if not master:
        return lambda m: None
    lines = []
    if start_step > 0 and os.path.exists(path):
        with open(path) as f:
            lines = [ln for ln in f if json.loads(ln)["step"] < start_step]
    with open(path, "w") as f:
        f.writelines(lines)

    def log(m):
        with open(path, "a") as f:
            f.write(json.dumps({k: v for k, v in m.items() if k != "sse"}) + "\n")
    return log


def export(c, clt, metrics, master):
    """Consolidate the TP shards (every TP rank takes part) and save the CLT in circuit-tracer's layout."""
    full = clt.consolidated()
    if master:
        full.save_pretrained(c.out)
        with open(os.path.join(c.out, "training.json"), "w") as f:
            json.dump(dict(train_config=asdict(c), final=metrics), f, indent=1)
        print(f"saved the CLT to {c.out}: {step_line(metrics)}", flush=True)
    C.barrier()


# -----------------------------------------------------------------------------
# command line


@record  # torchrun's failure summary then shows the failing rank's traceback
def main(argv=None):
    config = C.parse_config(__doc__, TrainConfig, argv)
    try:
        train(config)
    except RuntimeError as e:  # gloo says "Timed out waiting ...", NCCL's watchdog "timeout"
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise RuntimeError(f"rank {os.environ.get('RANK', 0)}: a collective waited longer than --timeout-s "
                           f"{config.timeout_s}: another rank crashed or is stuck (torchrun names it below)") from e
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    C.run_main(main)

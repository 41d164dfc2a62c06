"""
train.py: train a cross-layer transcoder on an activation cache, on one process or many.

Data flow. cache.py wrote mlp_in / mlp_out rows (N, L, d) of a GPT-2 to disk. Each step, every DP rank
reads its share of a global batch, normalizes it by the manifest's per-layer scales, encodes with
its F/tp features per layer (TP), decodes a partial reconstruction, and one all-reduce over TP sums
the partials. Losses -> backward -> gradients averaged over DP -> one all-reduce over the whole mesh
for the step's bookkeeping (metrics, gradient norm, which features fired) -> global norm clipping ->
Adam. The metrics stay on the device; they reach the host only at log steps. Every --eval-every steps
the CLT is spliced into the GPT on held-out contexts (the "replacement model"); at the end the TP
shards are consolidated, the normalization folded in, and the CLT saved to --out in circuit-tracer's
layout (CrossLayerTranscoder.from_pretrained loads it).

    python train.py --help
    python train.py                                           # the default CLT of models/tiny (CPU, minutes)
    python train.py --activation topk --k 16 --out runs/clt-topk
    torchrun --nproc_per_node=4 train.py --tp 2 ...           # dp = 4 / 2 = 2, NCCL on GPUs, gloo on CPU
    torchrun --nproc_per_node=2 train.py --tp 2 --device cpu --features 256 --steps 50   # TP on a CPU
    python train.py --cache runs/cache --steps 50 --features 256 --eval-every -1   # a tiny CPU run
    python train.py --resume --out runs/clt                   # continue the run in runs/clt
    python train.py --wandb my-project                        # also log to Weights & Biases (pip install wandb)

Resuming (--resume). A run is its --out folder: checkpoints/latest.json names the last complete
checkpoint, and the folder may be moved or copied (the command line's --out is where it resumes and
writes). The run's shape and optimizer (--features, --activation, --lr, --batch-size, --seed, --tp, ...)
come from the checkpoint; giving one that differs is an error naming the flag. What may change:
--steps, --eval-every, --eval-contexts, --ckpt-every, --log-every, --wandb, --cache and --model (a moved
copy of the same cache and model: both are checked), and this invocation's --stop-at, --device,
--timeout-s. A flag not given takes the checkpoint's value, except those of the invocation. A run at its
last step whose export is missing, incomplete or mixed (a crash during the export) is exported again;
the command exits 0 only once the export is whole. metrics.jsonl keeps the rows before the checkpoint.
A new run (no --resume) refuses an --out that holds another run's checkpoint or export: pass --resume,
another --out, or --overwrite, which removes that run's files before the new run starts (so a new run
killed before its first checkpoint can never be resumed as the old one).

Logging. metrics.jsonl gets a row every --log-every steps and at every evaluation and checkpoint: the
loop's only host syncs. --wandb PROJECT sends the same rows from rank 0 (per-layer lists as fvu/0, fvu/1,
...; the evaluation as eval/...); a resumed run logs into the run id its checkpoint keeps (an offline
run: `wandb sync OUT/wandb/offline-run-*`).

Several machines. On every node run `torchrun --nnodes=N --nproc-per-node=G --rdzv-backend=c10d
--rdzv-endpoint=HOST:PORT --rdzv-id=JOB train.py ...` (HOST:PORT on one of the nodes; c10d numbers the
nodes: --node-rank is for the static --master-addr rendezvous). Every node must run the same flags on
the same cache: each rank compares a sha256 of its flags and of the cache's manifest (which lists
every shard's sha256) with the others' before anything is built, and all refuse if one differs. The
cache must be on a filesystem every node sees, or be copied to the same path on every node (`python
cache.py verify` checks a copy's shards against the manifest). --out must be shared: DP replica 0's TP
ranks write the checkpoint shards there, rank 0 the rest, and every rank reads them on --resume. Keep
each TP group inside a node (tp <= G; ranks r·tp .. r·tp + tp − 1 form TP group r): then only DP's
gradient all-reduce and the bookkeeping all-reduce cross the network.

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
Differences:
- one JSON + safetensors checkpoint per TP rank, never a pickle; every file written whole or not at all;
- a BatchTopK batch is the batch of one DP rank (as in the references), so BatchTopK with DP > 1 is not
  the same as one process;
- the per-step bookkeeping is one all-reduce and no host sync (nanoGPT reads the loss every step):
  a non-finite loss is caught at the next log step or checkpoint, whichever comes first, and no
  checkpoint ever holds weights after it.
"""
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm
from clt import CLTConfig, CrossLayerTranscoder
from forge.cli import arg, run_main
from forge import checkpoint
from forge.hub import load_tokenizer
from forge.runlog import RunLog, check_wandb, step_line
from model import GPT
from parallel import all_reduce_sum, average_gradients, check_same_everywhere, compute_init, make_mesh, mesh_sum


DEFAULT_CACHE = os.path.join("runs", "cache")

# -----------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    cache: str = arg(DEFAULT_CACHE, 'activation cache directory written by cache.py', group='data and model')
    model: str = arg("", 'GPT for the spliced loss; "" = the model named in the cache manifest')
    out: str = arg("runs/clt", "the run's folder: export (circuit-tracer layout), metrics.jsonl and checkpoints/")
    features: int = arg(1024, 'F: features per layer (all TP ranks together)', group='the CLT')
    activation: str = arg("jumprelu", 'jumprelu | topk | batchtopk | relu')
    k: int = arg(16, 'topk / batchtopk: active features per token and layer')
    threshold_init: float = arg(0.03, 'jumprelu: initial threshold')
    bandwidth: float = arg(1.0, 'jumprelu: straight-through kernel width ε')
    decoder: str = arg("cross-layer", 'cross-layer (a CLT) | per-layer (a PLT: each feature writes to its own layer only)')
    skip: bool = arg(False, "add an affine skip connection mlp_in[l] @ W_skip[l] to each layer's reconstruction")
    steps: int = arg(1000, 'optimizer steps in the whole run', group='optimization')
    batch_size: int = arg(1024, 'tokens per step, all DP ranks together')
    lr: float = arg(1e-3, 'peak learning rate (Adam)')
    warmup: int = arg(100, 'linear warmup steps')
    decay_frac: float = arg(0.2, 'final fraction of the run over which the lr decays linearly to 0')
    weight_decay: float = arg(0.0, 'AdamW decoupled weight decay')
    grad_clip: float = arg(1.0, 'global gradient-norm clip over all shards; -1 = disable')
    seed: int = arg(0, 'CLT init and data order')
    sparsity: float = arg(0.7, 'λ_S, final value of the tanh sparsity penalty (jumprelu, relu)', group='losses')
    sparsity_c: float = arg(4.0, 'c inside tanh(c · a · ||W_dec||)')
    preact: float = arg(1e-3, 'λ_P of the pre-activation penalty (jumprelu); 0 leaves ~40% of features dead here')
    aux_coef: float = arg(1 / 32, 'α of AuxK (topk, batchtopk)')
    aux_k: int = arg(-1, 'k_aux dead features per token for AuxK; -1 = d_model / 2 (Gao et al. 2024)')
    dead_tokens: int = arg(100_000, 'a feature that has not fired in this many tokens counts as dead')
    eval_every: int = arg(500, 'spliced-loss evaluation every this many steps (and at the end); -1 = never', group='evaluation, logging and checkpoints')
    eval_contexts: int = arg(64, 'held-out contexts for the spliced loss')
    log_every: int = arg(10, 'metrics.jsonl row (the one host sync) every this many steps, and at eval and checkpoints')
    ckpt_every: int = arg(500, 'checkpoint every this many steps (and at the end); -1 = only at the end')
    wandb: str = arg("", 'also log to this Weights & Biases project (rank 0; needs `pip install wandb`); "" = off')
    resume: bool = arg(False, 'continue the run in --out from its last checkpoint (see "Resuming" above)')
    overwrite: bool = arg(False, "start a new run in an --out that holds another run, removing that run's files")
    stop_at: int = arg(-1, 'end this invocation after this many steps, with a checkpoint (a job time limit); -1 = --steps')
    tp: int = arg(1, 'tensor-parallel size; dp = world size / tp', group='parallelism')
    timeout_s: int = arg(300, 'collective timeout: a crashed or stuck rank ends the run with an error')
    device: str = arg("auto", 'auto | cpu | cuda')
    autocast: str = arg("cuda", 'bf16 autocast of the step, fp32 master weights: cuda (on CUDA only) | always (CPU too) | never')


# -----------------------------------------------------------------------------
# schedules and losses


def lr_at(step, c):
    """Linear warmup, constant, then a linear decay to 0 over the final decay_frac of the run."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    decay_start = c.steps * (1 - c.decay_frac)
    return c.lr if step < decay_start else c.lr * (c.steps - step) / (c.steps - decay_start)


def clt_losses(clt, mlp_in, mlp_out, c, step, dead, n_dead):
    """One rank's losses on its batch. mlp_in, mlp_out (B, L, d) raw; dead (L, F/tp) bool; n_dead the
    number of dead features over all ranks, a 0-dim tensor, or None where none can be dead yet (AuxK is
    skipped). Terms over features (sparsity, preact) are this rank's share; the reconstruction terms
    are complete (decode sums over TP).
    -> (loss to backward, parts: sums for the metrics, fired (L, F/tp): which features fired)."""
    y = mlp_out * clt.output_scale[:, None]  # (B, L, d) the normalized target
    pre = clt.pre_acts(mlp_in)  # (B, L, F/tp)
    acts = clt.activate(pre)  # (B, L, F/tp)
    sparse = c.activation in ("topk", "batchtopk")  # k of F active by construction: decode ∝ k, not F
    err = clt.decode(acts, sparse, normalized=True, mlp_in=mlp_in) - y  # (B, L, d), a skip connection included
    sse = err.float().pow(2).sum(-1)  # (B, L)
    dec = clt.decoder_norms()  # (L, F/tp) over every layer a feature writes to
    zero = sse.new_zeros(())
    sparsity, preact, aux = zero, zero, zero
    if c.activation in ("jumprelu", "relu"):  # λ_S ramps up linearly over the whole run (Anthropic)
        lam = c.sparsity * min(1.0, (step + 1) / c.steps)
        sparsity = lam * torch.tanh(acts * (c.sparsity_c * dec)).float().sum((1, 2)).mean()
    if c.activation == "jumprelu":
        # Σ_b Σ_lf relu(θ − h)·||W_dec|| = Σ_lf ||W_dec||·Σ_b relu(θ − h): summing the batch first saves passes
        preact = c.preact * (F.relu(clt.threshold - pre).float().sum(0) * dec).sum() / pre.size(0)
    if sparse and n_dead is not None:  # AuxK: the dead features model the residual (n_dead is global)
        k_aux = min(clt.config.d_model // 2 if c.aux_k < 0 else c.aux_k, clt.config.n_features)
        aux_acts = clt.topk(pre.masked_fill(~dead, 0.0), k_aux)  # global top k_aux over TP
        e_hat = clt.decode(aux_acts, sparse=True, normalized=True, bias=False)  # (B, L, d)
        # sparsify's scaling, on the device (no sync): no dead features, no AuxK (the term is exactly 0)
        scale = (n_dead.float() / k_aux).clamp(max=1.0)
        aux = c.aux_coef * scale * (e_hat - err.detach()).float().pow(2).sum((1, 2)).mean()
    mse = sse.mean(0).sum()  # summed over layers, mean over tokens
    B = sse.size(0)
    y32 = y.float()
    a = acts.detach()  # (B, L, F/tp), never negative
    # n by a fill kernel: torch.tensor(B, device="cuda") would copy from the host and wait for the GPU
    parts = dict(n=torch.full((), float(B), device=y.device), l0=torch.count_nonzero(a, dim=(0, 2)),
                 sse=sse.detach().sum(0), y_sum=y32.sum(0), y_sq=y32.pow(2).sum((0, 2)),  # sums over this rank's tokens
                 mse=mse.detach() * B, sparsity=sparsity.detach() * B, preact=preact.detach() * B, aux=aux.detach() * B)
    return mse + sparsity + preact + aux, parts, a.amax(0) > 0


# -----------------------------------------------------------------------------
# a step's bookkeeping: one all-reduce, on the device; the host reads it at log steps only

FEATURE_SUMS = ("l0", "sparsity", "preact")  # over this rank's features: summed over TP as well as DP


def reduce_step(clt, parts, fired, batchtopk):
    """Everything a step reports or keeps, over the mesh, in one all-reduce (mesh_sum): the metric
    sums of the global batch; the squared gradient norm (the feature shards' summed over TP, after DP
    averaging; b_dec and W_skip, replicated, added once); per feature, on how many DP ranks it fired,
    fired (L, F) for every feature (each rank keeps every feature's dead clock: n_dead needs no
    collective); the BatchTopK thresholds summed over DP. -> {name: float64 tensor}, grad_norm included."""
    replicated = [p for p in (clt.b_dec, clt.W_skip) if p is not None and p.grad is not None]
    sharded = [p for p in clt.parameters() if p.grad is not None and all(p is not r for r in replicated)]
    grad_sq = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in sharded]).pow(2).sum()  # no (F, ...) temp
    todo = {k: (v, "all" if k in FEATURE_SUMS else "dp") for k, v in parts.items()}  # token sums: complete per TP rank
    todo.update(grad_sq=(grad_sq, "tp"), fired=(fired, "tp_slices"))
    if batchtopk:
        todo["batch_threshold"] = (clt.batch_threshold, "dp")  # (L,) the global B·k-th value, per DP rank
    sums = mesh_sum(todo, clt.mesh)
    once = sum(torch.linalg.vector_norm(p.grad.double()).pow(2) for p in replicated)
    sums["grad_norm"] = (sums.pop("grad_sq") + once).sqrt()
    return sums


def clip_gradients(clt, max_norm, norm):
    """Scale every gradient by max_norm / norm where the global norm exceeds it (a device op, no sync)."""
    if max_norm <= 0:
        return
    coef = (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)
    for p in clt.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)


def step_metrics(s):
    """The global batch's metrics from the reduced sums, on the device: the loss and its terms (means
    over tokens), per-layer FVU (of the normalized target) and L0."""
    N = s["n"]
    sst = s["y_sq"] - s["y_sum"].pow(2).sum(-1) / N  # (L,) Σ ||y − ȳ||² per layer
    terms = {k: s[k] / N for k in ("mse", "sparsity", "preact", "aux")}
    return dict(loss=sum(terms.values()), **terms, fvu=s["sse"] / sst.clamp_min(1e-12), l0=s["l0"] / N, sse=s["sse"])


def to_host(tensors):
    """{name: tensor} -> {name: float or list}, in one device-to-host copy: the step's sync point."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors.values()]).cpu()
    out = {}
    for (name, t), v in zip(tensors.items(), flat.split([t.numel() for t in tensors.values()])):
        out[name] = v.item() if t.dim() == 0 else v.view(t.shape).tolist()
    return out


def check_finite(m, step, c):
    """Raise at a sync step if any step since the last one had a non-finite loss (m["first_bad"] >= 0).
    This runs before the update and before every checkpoint: no checkpoint holds weights after it."""
    if m["first_bad"] < 0:
        return
    bad = [l for l, s in enumerate(m["sse"]) if not math.isfinite(s)]
    terms = {k: m[k] for k in ("loss", "mse", "sparsity", "preact", "aux")}
    raise FloatingPointError(f"non-finite loss {m['loss']} at step {int(m['first_bad'])} (layers {bad or 'none'} have "
                             f"a non-finite reconstruction error at step {step}; terms {terms}); the last good "
                             f"checkpoint is in {os.path.join(c.out, checkpoint.CKPT_DIR)}: lower --lr or resume from it")


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
    zero-ablation loss gap closed). recovered saturates near 1 on a small model, so two measures in nats
    come beside it: delta_ce = ce_spliced − ce_clean, and kl_spliced, the mean KL(clean ‖ spliced) of the
    next-token distributions (kl_zero: the same for the zero-ablated MLPs, its scale).

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
    ce_sums = torch.zeros(6, dtype=torch.float64, device=dev)
    rec = dict(l0=torch.zeros(L, device=dev), sse=torch.zeros(L, device=dev), y_sum=torch.zeros(L, d, device=dev),
               y_sq=torch.zeros(L, device=dev))  # sums over the held-out tokens, as in clt_losses
    for idx in contexts.split(batch):
        B, T = idx.shape

        def ce(logits):  # summed next-token loss of positions 1..T-2 (the BOS is not scored)
            return F.cross_entropy(logits[:, 1:-1].flatten(0, 1).float(), idx[:, 2:].flatten(), reduction="sum")

        def kl(logits):  # summed KL(clean || these logits) of the next-token distributions, the positions of ce
            return F.kl_div(logits[:, 1:-1].float().log_softmax(-1), clean_logp, log_target=True, reduction="sum")

        def splice(mlp_in):  # -> (acts, mlp_out_hat (B·(T-1), L, d)) of the positions after the BOS
            return clt(mlp_in[:, 1:].flatten(0, 1))

        def with_bos(y_hat):  # (B·(T-1), L, d) -> (B, T, L, d), the BOS keeping its clean MLP outputs
            return torch.cat([bos, y_hat.view(B, T - 1, L, d)], 1)

        logits, acts = gpt.run_with_acts(idx)
        clean_logp = logits[:, 1:-1].float().log_softmax(-1)  # (B, T-2, V)
        bos = acts.mlp_out[:, :1]  # (B, 1, L, d)
        y = acts.mlp_out[:, 1:].flatten(0, 1)  # (B·(T-1), L, d) what the cache holds for these tokens
        a, y_hat = splice(acts.mlp_in)
        for k, v in dict(l0=(a > 0).sum((0, 2)), sse=(y_hat - y).pow(2).sum((0, 2)), y_sum=y.sum(0),
                         y_sq=y.pow(2).sum((0, 2))).items():
            rec[k] += v
        hat = with_bos(y_hat)
        open_ce = ce(gpt(idx, mlp_out=hat))
        for _ in range(L - 1):
            hat = with_bos(splice(gpt.run_with_acts(idx, mlp_out=hat)[1].mlp_in)[1])
        zero = torch.cat([bos, torch.zeros_like(hat[:, 1:])], 1)
        spliced_logits = gpt(idx, mlp_out=hat)
        zero_logits = gpt(idx, mlp_out=zero)
        ce_sums += torch.stack([ce(logits), ce(spliced_logits), open_ce, ce(zero_logits), kl(spliced_logits),
                                kl(zero_logits)]).double()
    clt.train(was_training)
    N = contexts.size(0) * (contexts.size(1) - 1)
    all_reduce_sum(rec["l0"], clt.mesh.tp_group)  # each TP rank counted its own features
    sst = rec["y_sq"] - rec["y_sum"].pow(2).sum(-1) / N  # (L,)
    n_scored = contexts.size(0) * (contexts.size(1) - 2)
    clean, spliced, open_, zero, kl_spliced, kl_zero = (ce_sums / n_scored).tolist()
    return dict(fvu=(rec["sse"] / sst).tolist(), l0=(rec["l0"] / N).tolist(), ce_clean=clean, ce_spliced=spliced,
                ce_open=open_, ce_zero=zero, recovered=(zero - spliced) / (zero - clean),
                recovered_open=(zero - open_) / (zero - clean), delta_ce=spliced - clean, kl_spliced=kl_spliced,
                kl_zero=kl_zero)


# -----------------------------------------------------------------------------
# the training loop


def build(c, cache, mesh, device):
    """The CLT shard of this rank, with the cache's normalization, and its optimizer."""
    m = cache.manifest
    config = CLTConfig(n_layers=cache.n_layers, d_model=cache.d_model, n_features=c.features, activation=c.activation,
                         k=c.k, threshold_init=c.threshold_init, bandwidth=c.bandwidth, decoder=c.decoder, skip=c.skip,
                         model=c.model or m["model"],
                         model_sha256=m.get("identity", {}).get("model_sha256", ""))  # graph/interp refuse others
    clt = CrossLayerTranscoder(config, c.seed, mesh)
    with torch.no_grad():  # E||x|| = sqrt(d) per layer (Ameisen et al. 2025), from the manifest's mean norms
        clt.input_scale.copy_(cache.d_model ** 0.5 / cache.norm_in)
        clt.output_scale.copy_(cache.d_model ** 0.5 / cache.norm_out)
    clt = clt.to(device).train()
    return clt, optimizer(clt, c)


def optimizer(clt, c):
    """AdamW, fused: one pass over each parameter and its moments instead of about ten (CPU and CUDA)."""
    return torch.optim.AdamW(clt.parameters(), lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay, fused=True)


def load_gpt(c, cache, device):
    """The GPT of the spliced loss; refused unless it is the model the cache was made from."""
    gpt = GPT.from_pretrained(c.model or cache.manifest["model"]).to(device)
    checkpoint.check_cache_model(c, cache, gpt)
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
    if c.log_every <= 0:
        raise ValueError(f"--log-every {c.log_every} must be positive")
    if c.autocast not in ("cuda", "always", "never"):
        raise ValueError(f"--autocast {c.autocast} must be cuda, always or never")
    check_wandb(c.wandb)


def train(config: TrainConfig, given=None):
    """Train (or resume) a CLT as config says; returns the last step's metrics (every rank).

    given: the names of the fields the user chose (parse_args); None = those that differ from
    TrainConfig's defaults. A resumed run checks them against its checkpoint."""
    c, meta = checkpoint.resolve(config, given)  # meta: the checkpoint's latest.json on --resume
    ddp, rank, local_rank, world, device = compute_init(c.device, c.timeout_s)
    checkpoint.check_same_mesh(c, meta, world)
    mesh = make_mesh(ddp, world, c.tp, device)
    master = rank == 0

    def print0(*a):
        if master:
            print(*a, flush=True)

    print0(f"train.py | world {world} = dp {mesh.dp} x tp {mesh.tp} | device {device} | {asdict(c)}")
    cache = open_cache(c, print0)
    check_same_everywhere(json.dumps([asdict(c), cache.manifest], sort_keys=True), "command line or cache", device)
    checkpoint.check_same_cache(c, cache.manifest, meta)
    check_config(c, cache, mesh)
    gpt = load_gpt(c, cache, device) if c.eval_every > 0 or c.model else None
    contexts = None
    if c.eval_every > 0:
        contexts = heldout_contexts(cache, c.eval_contexts, load_tokenizer(gpt.name_or_path).eot_token)
    clt, opt = build(c, cache, mesh, device)
    state = dict(step=0, since_fired=torch.zeros(cache.n_layers, c.features, dtype=torch.long, device=device),
                 first_bad=torch.tensor(-1, device=device))  # (L, F) every feature's clock, on every rank
    metrics = checkpoint.resume_or_claim(c, meta, clt, opt, state, mesh, master)
    run_id = checkpoint.run_id(meta)
    log = RunLog(c, run_id, state["step"], master)
    extra = dict(wandb_id=run_id if c.wandb else None, cache_identity=cache.manifest.get("identity"))
    end = c.steps if c.stop_at < 0 else min(c.stop_at, c.steps)
    t_last, last_sync = time.perf_counter(), state["step"]
    # closing(): the cache's reader threads stop even when a step raises (a thread left reading at exit aborts)
    bar = tqdm(range(state["step"], end), initial=state["step"], total=c.steps, disable=not master, desc="train")
    with contextlib.closing(train_batches(cache, c, mesh, state["step"], device)) as batches:
        for step in bar:
            evaluating = c.eval_every > 0 and ((step + 1) % c.eval_every == 0 or step + 1 == c.steps)
            saving = (c.ckpt_every > 0 and (step + 1) % c.ckpt_every == 0) or step + 1 == end
            sync = step % c.log_every == 0 or evaluating or saving
            m = train_step(c, clt, opt, next(batches), state, mesh, device, sync)
            if not sync:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t_last) / (step + 1 - last_sync)  # per step since the last sync
            metrics = dict(m, step=step, ms=1000 * dt, tok_per_s=c.batch_size / dt)
            if evaluating:
                metrics["eval"] = evaluate(gpt, clt, contexts.to(device))
            log.log(metrics)
            bar.set_postfix_str(step_line(metrics), refresh=False)
            if saving:
                checkpoint.save(c, clt, opt, state, mesh, master, dict(extra, metrics=metrics))
            t_last, last_sync = time.perf_counter(), step + 1
    checkpoint.finish(c, clt, metrics, meta, end, mesh, master)
    log.finish()
    return metrics


def train_step(c, clt, opt, batch, state, mesh, device, sync=True):
    """One optimizer step on this rank's (mlp_in, mlp_out). Its collectives: the TP sums inside the
    CLT, DP's gradient average, and one all-reduce of the bookkeeping (reduce_step). With sync=True the
    global batch's metrics come to the host (the step's one sync point, before the update) and are
    returned; else nothing leaves the device and None is returned."""
    step = state["step"]
    lr = lr_at(step, c)
    for group in opt.param_groups:
        group["lr"] = lr
    mine = slice(mesh.tp_rank * clt.F_local, (mesh.tp_rank + 1) * clt.F_local)
    dead = state["since_fired"] >= c.dead_tokens  # (L, F) over all features, the same on every rank
    n_dead = dead.sum(1)  # (L,)
    # clocks start at 0 and grow by one batch a step: before this step none can have run out (a host fact)
    maybe_dead = step * c.batch_size >= c.dead_tokens
    bf16 = c.autocast == "always" or (c.autocast == "cuda" and device.type == "cuda")
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):  # fp32 master weights
        loss, parts, fired = clt_losses(clt, *batch, c, step, dead[:, mine], n_dead.sum() if maybe_dead else None)
    loss.backward()
    average_gradients(list(clt.parameters()), mesh.dp_group)
    sums = reduce_step(clt, parts, fired, c.activation == "batchtopk")
    m = step_metrics(sums)
    fine = torch.isfinite(m["loss"]) | (state["first_bad"] >= 0)
    state["first_bad"] = torch.where(fine, state["first_bad"], step)  # the first non-finite step, on the device
    host = None
    if sync:
        host = to_host(dict(m, grad_norm=sums["grad_norm"], dead=n_dead, first_bad=state["first_bad"]))
        check_finite(host, step, c)
        host = dict(host, lr=lr)
        del host["first_bad"]
    clip_gradients(clt, c.grad_clip, sums["grad_norm"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    if c.activation == "batchtopk":  # its JumpReLU threshold for inference, averaged over DP
        clt.update_batchtopk_threshold((sums["batch_threshold"] / mesh.dp).float(), step)
    state["since_fired"] = torch.where(sums["fired"] > 0, 0, state["since_fired"] + c.batch_size)
    state["step"] = step + 1
    return host


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
        raise RuntimeError(f"rank {os.environ.get('RANK', 0)}: a collective waited longer than --timeout-s "
                           f"{config.timeout_s}: another rank crashed or is stuck (torchrun names it below)") from e
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)

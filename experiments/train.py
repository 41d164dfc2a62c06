"""
experiments/train.py: train.py's step as a FLOP rate against plain matmul at the step's own shapes,
and the sparse decode against the dense one, each timed in the same run (ratios > 1 = faster).

    python experiments/train.py                  # models/tiny's CLT and a GPT-2-small-shape one
    python experiments/train.py --quick          # the tiny shape only
    python experiments/train.py --device cuda
"""

import functools
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from clt import CLTConfig, CrossLayerTranscoder
from experiments.common import Bench, median_seconds, run_study, sync
from forge.cli import arg, run_main
from parallel import Mesh


@dataclass
class TrainBench(Bench):
    """CLT training step vs matmul FLOP rate; sparse vs dense decode"""

    reps: int = arg(5, "timed repetitions (the median is reported)")
    decode_features: int = arg(16384, "F of the decode benchmark")
    density: float = arg(0.01, "fraction of active features in the decode benchmark")
    topk_features: int = arg(
        24576, "F of the TopK/BatchTopK decode benchmark (32 d at GPT-2 small)"
    )
    topk_k: int = arg(32, "k of the TopK/BatchTopK decode benchmark")
    topk_depth: int = arg(2, "layers of the TopK/BatchTopK decode benchmark (reduced: memory)")


def run(cfg):
    """Step FLOP rate over matmul's at the same shapes; sparse over dense decode."""
    cuda = str(cfg.device).startswith("cuda")
    shapes = [("tiny", 4, 128, 1024, 1024)]  # the default CLT of models/tiny (F = 8 d)
    if not cfg.quick:
        big = (6144, 4096) if cuda else (3072, 512)
        shapes += [("gpt2-small", 12, 768, *big)]
    rows = [
        step_vs_matmul(*s, a, cfg.device, cfg.reps) for s in shapes for a in ("jumprelu", "topk")
    ]
    rows += sparse_vs_dense_decode(
        4, 128, cfg.decode_features, 256, cfg.density, cfg.device, cfg.reps
    )
    topk_shape = (4, 128, 1024) if cfg.quick else (cfg.topk_depth, 768, cfg.topk_features)
    for activation in ("topk", "batchtopk"):
        rows += sparse_vs_dense_topk(*topk_shape, 512, cfg.topk_k, activation, cfg.device, cfg.reps)
    if cuda and not cfg.quick:
        rows += sparse_vs_dense_decode(
            12, 768, cfg.decode_features, 256, cfg.density, cfg.device, cfg.reps
        )
    return rows


def clt_matmuls(B, L, d, F):
    """The matmul shapes (m, k, n) of one CLT training step: per layer the encoder forward and
    its weight gradient (mlp_in needs no gradient), the decoder forward, its weight and input
    gradients."""
    shapes = []
    for l in range(L):
        w = (L - l) * d  # layer l's features write to L - l layers
        shapes += [(B, d, F), (d, B, F), (B, F, w), (F, B, w), (B, w, F)]
    return shapes


def step_fixture(L, d, F, B, activation, device, mesh=None):
    """A CLT (or this rank's TP shard), its optimizer, a fixed batch and train.py's step on them."""
    import train

    mesh = mesh or Mesh()
    cfg = train.TrainConfig(activation=activation, features=F, k=16, steps=10**6)
    model = CrossLayerTranscoder(CLTConfig(L, d, F, activation, k=16), 0, mesh)
    model = model.to(device).train()
    opt = train.optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randn(B, L, d, generator=g).to(device) for _ in range(2)]
    state = dict(
        step=0,
        since_fired=torch.zeros(L, F, dtype=torch.long, device=device),
        first_bad=torch.tensor(-1, device=device),
    )

    def step():  # a step between log steps: nothing read back to the host
        train.train_step(cfg, model, opt, batch, state, mesh, torch.device(device), sync=False)

    return model, opt, step


def step_vs_matmul(name, L, d, F, B, activation, device, reps):
    """One optimizer step of train.py on a fixed batch against plain torch.matmul at the step's own
    shapes and dtype, timed as reps interleaved (step, matmul) pairs in one run: the ratio is the
    median of the pairs' (so a load spike hits both of a pair), its FLOPs 3 × the forward's
    matmuls; plus one profiled step's share of time outside the matmuls (profile_share)."""
    _, _, step = step_fixture(L, d, F, B, activation, device)
    cuda = str(device).startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32  # what autocast gives the step
    shapes = clt_matmuls(B, L, d, F)
    mats = [
        (
            torch.randn(m, k, device=device, dtype=dtype),
            torch.randn(k, n, device=device, dtype=dtype),
        )
        for m, k, n in shapes
    ]

    def matmuls():
        return [a @ b for a, b in mats]

    step()  # warm-ups: the allocator, lazy inits
    matmuls()
    pairs = [(wall(step, device), wall(matmuls, device)) for _ in range(reps)]
    flops = 3 * forward_flops(B, L, d, F)  # what the step is credited with
    mm_flops = sum(2 * m * k * n for m, k, n in shapes)  # what the matmuls do (no encoder dx)
    ratios = sorted(flops / t_step / (mm_flops / t_mm) for t_step, t_mm in pairs)
    t_step = sorted(p[0] for p in pairs)[reps // 2]
    t_mm = sorted(p[1] for p in pairs)[reps // 2]
    outside = profile_share(step, device)
    rates = (
        f"{flops / 1e12 / t_step:.3g} vs {mm_flops / 1e12 / t_mm:.3g} TFLOP/s (medians); "
        f"pair ratios {min(ratios):.0%}..{max(ratios):.0%}; {outside:.0%} of the profiled step "
        f"outside matmuls; load {os.getloadavg()[0]:.1f}"
    )
    shape = f"{name}: L{L} d{d} F{F} B{B}"
    row = versus(f"{activation} train step", shape, t_step, "matmul, same shapes", t_mm, rates)
    return dict(row, ratio=ratios[reps // 2])


def forward_flops(B, L, d, F):
    """The CLT forward's matmul FLOPs: 2BLdF for the encoder, 2BdF·L(L+1)/2 for the decoder."""
    return 2 * B * L * d * F + 2 * B * d * F * L * (L + 1) // 2


def wall(fn, device):
    """Wall seconds of one fn() call, the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm")


def profile_share(step, device):
    """The share of one step's time (torch.profiler: self time of every op, the device's on a GPU)
    spent outside matmul ops or kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    if cuda:  # kernels: cuBLAS / CUTLASS GEMMs by name
        times = {e.key: e.self_device_time_total for e in events}
        is_mm = [k for k in times if any(s in k.lower() for s in ("gemm", "xmma", "cutlass"))]
    else:
        times = {e.key: e.self_cpu_time_total for e in events}
        is_mm = [k for k in times if k in MATMUL_OPS]
    return 1 - sum(times[k] for k in is_mm) / sum(times.values())


def versus(bench, shape, t, baseline, t_base, detail):
    """A row: t seconds against a baseline's t_base, timed in the same run (ratio > 1: faster)."""
    return dict(
        bench=bench,
        shape=shape,
        ms=1e3 * t,
        baseline=baseline,
        baseline_ms=1e3 * t_base,
        ratio=t_base / t,
        detail=detail,
    )


def sparse_vs_dense_decode(L, d, F, B, density, device, reps):
    """decode (dense, cost ∝ F) against decode_sparse from a sparse COO tensor and dense acts."""
    model = CrossLayerTranscoder(CLTConfig(L, d, F, "relu"), 0).to(device).eval()
    g = torch.Generator().manual_seed(0)
    values = torch.rand(B, L, F, generator=g)
    acts = (values * (torch.rand(B, L, F, generator=g) < density)).to(device)
    coo = acts.to_sparse()
    shape = f"L{L} d{d} F{F} B{B}, {density:.0%} active"
    with torch.no_grad():
        dense = model.decode(acts)
        torch.testing.assert_close(model.decode(coo, sparse=True), dense, atol=1e-4, rtol=1e-4)
        t_dense = median_seconds(lambda: model.decode(acts), device, reps)
        rows = []
        for what, x in (("decode_sparse (COO acts)", coo), ("decode_sparse (dense acts)", acts)):
            t = median_seconds(lambda: model.decode(x, sparse=True), device, reps)
            nonzeros = f"{int(acts.count_nonzero())} nonzeros"
            rows.append(versus(what, shape, t, "decode (dense)", t_dense, nonzeros))
    return rows


def sparse_vs_dense_topk(L, d, F, B, k, activation, device, reps):
    """train.py's decode of TopK / BatchTopK activations, sparse (decode_sparse, cost ∝ k: what
    training uses for them) against dense, forward alone and forward + backward (the gradients of
    W_dec and of the activations)."""
    model = CrossLayerTranscoder(CLTConfig(L, d, F, activation, k=k), 0).to(device).train()
    mlp_in = torch.randn(B, L, d, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        acts = model.activate(model.pre_acts(mlp_in))  # (B, L, F), k per token and layer (topk)

    def decode(sparse, backward):
        a = acts.clone().requires_grad_(backward)
        out = model.decode(a, sparse, normalized=True)
        if backward:
            out.pow(2).sum().backward()
            model.zero_grad(set_to_none=True)

    rows = []
    shape = f"L{L} d{d} F{F} B{B} k{k}, {activation}"
    nonzeros = f"{int(acts.count_nonzero()) / (B * L):.0f} active per token and layer"
    for backward in (False, True):
        with torch.set_grad_enabled(backward):
            t_dense = median_seconds(functools.partial(decode, False, backward), device, reps)
            t_sparse = median_seconds(functools.partial(decode, True, backward), device, reps)
        what = "forward + backward" if backward else "forward"
        rows.append(versus(f"decode_sparse, {what}", shape, t_sparse, "dense", t_dense, nonzeros))
    return rows


def main(argv=None):
    return run_study(__doc__, "train", run, TrainBench, argv)


if __name__ == "__main__":
    run_main(main)

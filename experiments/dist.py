"""
experiments/dist.py: tensor and data parallelism of the CLT. Memory per rank against the TP size
(measured on real shards), the CPU step time with T = 2 TP ranks over T = 1 (gloo, a process per
rank, one thread each), bytes communicated per FLOP, and 8-GPU meshes of GPT-2 small and xl CLTs on
paper (--busbw, --tflops). MB = fp32 parameters + gradients + Adam moments (16 bytes per parameter).

    python experiments/dist.py
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clt import CLTConfig, CrossLayerTranscoder
from experiments.common import Bench, median_seconds, on_tp_ranks, run_study
from experiments.train import clt_matmuls, step_fixture
from forge.cli import arg, run_main
from parallel import Mesh


@dataclass
class DistBench(Bench):
    """TP/DP: memory per rank, step time T=2/T=1, bytes per FLOP, 8 GPUs on paper"""

    reps: int = arg(5, "timed repetitions (the median is reported)")
    busbw: float = arg(300e9, "paper model: all-reduce bus bandwidth per GPU, bytes/s")
    tflops: float = arg(400.0, "paper model: sustained bf16 TFLOP/s per GPU")


def run(cfg):
    """The measured rows of the tiny CLT, then the paper rows of GPT-2 small and xl CLTs."""
    rows = []
    L, d, F, B = 4, 128, 1024, 1024  # the default CLT of models/tiny
    n1 = clt_params_per_rank(L, d, F, 1)
    for T in (1, 2, 4):
        shard = CrossLayerTranscoder(CLTConfig(L, d, F), 0, Mesh(tp=T, tp_rank=0))
        n = sum(p.numel() for p in shard.parameters())
        assert n == clt_params_per_rank(L, d, F, T), (n, clt_params_per_rank(L, d, F, T))
        setting = f"tiny CLT L{L} d{d} F{F}, T={T} (measured shard)"
        rows.append(dist_row(setting, mb=16 * n / 1e6, note=f"{n / n1:.3f} of T=1"))
    t1 = measured_step_seconds(1, (L, d, F, B), cfg.reps, cfg.out)
    t2 = measured_step_seconds(2, (L, d, F, B), cfg.reps, cfg.out)
    for T, t in ((1, t1), (2, t2)):
        tp_reduce, _, _, _, flops = per_step_traffic(L, d, F, B, T, 1)
        rows.append(
            dist_row(
                f"tiny CLT, B{B}, T={T}, CPU gloo, 1 thread/rank",
                ms=1e3 * t,
                comm_mb=tp_reduce / 1e6,
                flop_per_byte=flops / tp_reduce if tp_reduce else None,
                note=f"step time {t / t1:.2f} of T=1" if T > 1 else "",
            )
        )
    big = (("gpt2-small", (12, 768, 32768, 4096)), ("gpt2-xl", (48, 1600, 8192, 4096)))
    for name, (L, d, F, B) in big:
        for T, D in ((1, 8), (2, 4), (4, 2), (8, 1)):
            rows.append(paper_row(name, L, d, F, B, T, D, cfg))
    return rows


def clt_params_per_rank(L, d, F, T):
    """Parameters on one TP rank: F/T features' encoders, b_enc, thresholds, decoders; b_dec
    replicated."""
    f = F // T
    return L * d * f + 2 * L * f + f * d * L * (L + 1) // 2 + L * d


def per_step_traffic(L, d, F, B, T, D, activation="jumprelu", k=16):
    """Per rank and step: bytes all-reduced over TP and over DP, bytes all-gathered over TP, bytes
    of the one bookkeeping all-reduce over the mesh, matmul FLOPs. TP: the fp32 partial
    reconstruction (B/D, L, d), twice with AuxK; TopK gathers k candidates per token and layer,
    BatchTopK (B/D)·k per layer. DP: the fp32 gradient of this rank's shard. Bookkeeping (train.py's
    one all-reduce of a step): float64 metric sums (~L·d) and which of all L·F features fired."""
    b = B // D
    topk = activation in ("topk", "batchtopk")
    tp_reduce = (4 * b * L * d * (2 if topk else 1)) if T > 1 else 0
    tp_gather = (4 * b * L * k * T) if topk and T > 1 else 0
    dp_reduce = 4 * clt_params_per_rank(L, d, F, T) if D > 1 else 0
    bookkeeping = 8 * (L * F + L * d + 5 * L + 8) if T * D > 1 else 0
    flops = sum(2 * m * kk * n for m, kk, n in clt_matmuls(b, L, d, F // T))
    return tp_reduce, tp_gather, dp_reduce, bookkeeping, flops


def tp_step_seconds(mesh, shape, reps):
    """On one rank of `mesh`: the median time of train.py's step on this rank's shard."""
    _, _, step = step_fixture(*shape, "jumprelu", "cpu", mesh)
    return median_seconds(step, "cpu", reps)


def measured_step_seconds(T, shape, reps, out_dir):
    """Median step time with T TP ranks, each a process with one thread (gloo on CPU)."""
    return on_tp_ranks(tp_step_seconds, T, (shape, reps), 1, out_dir)[0]


def dist_row(setting, mb=None, ms=None, comm_mb=None, flop_per_byte=None, note=""):
    """One table row; a figure that does not apply to the setting is "-"."""

    def fmt(x, spec=".4g"):
        return "-" if x is None else format(x, spec)

    return dict(
        setting=setting,
        MB_per_rank=fmt(mb),
        step_ms=fmt(ms),
        comm_MB_per_step=fmt(comm_mb),
        FLOP_per_comm_byte=fmt(flop_per_byte, ".0f"),
        note=note,
    )


def paper_row(name, L, d, F, B, T, D, cfg):
    """One 8-GPU mesh on paper: memory per GPU, and compute and ring all-reduce time per step."""
    tp_reduce, _, dp_reduce, bookkeeping, flops = per_step_traffic(L, d, F, B, T, D)

    def ring(n, nbytes):  # seconds of a ring all-reduce of nbytes over n GPUs
        return 2 * (n - 1) / n * nbytes / cfg.busbw

    t_flops = flops / (cfg.tflops * 1e12)
    t_comm = ring(T, tp_reduce) + ring(D, dp_reduce) + ring(T * D, bookkeeping)
    comm = tp_reduce + dp_reduce + bookkeeping
    return dist_row(
        f"{name} CLT L{L} d{d} F{F}, B{B}: tp{T} x dp{D} (paper)",
        mb=16 * clt_params_per_rank(L, d, F, T) / 1e6,
        ms=1e3 * (t_flops + t_comm),
        comm_mb=comm / 1e6,
        flop_per_byte=flops / comm,
        note=f"compute {1e3 * t_flops:.1f} ms + comm {1e3 * t_comm:.1f} ms",
    )


def main(argv=None):
    return run_study(__doc__, "dist", run, DistBench, argv)


if __name__ == "__main__":
    run_main(main)

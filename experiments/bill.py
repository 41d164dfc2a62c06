"""
experiments/bill.py: what a GPT-2-small CLT of F = 32 d = 24,576 per layer trained on 10^9 tokens
costs: FLOPs, disk per cache format (and streaming's 0), memory per TP rank, H100 time. Every row is
a formula over its inputs, each input a constant named here or a measurement: the step's share of
matmul speed (experiments/train.py's <out>/train.json), zstd's saving on int8 shards
(experiments/quantization.py's <out>/quantization.json), streamed vs cached tokens/s
(experiments/stream.py's <out>/stream.json) and the activation bytes of a step per (token, layer,
feature) (measured here, one step at reduced depth in a fresh process).

    python experiments/train.py && python experiments/quantization.py && python experiments/stream.py
    python experiments/bill.py
"""

import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import GiB, Bench, fresh_process, run_study
from experiments.dist import clt_params_per_rank
from experiments.scale import rank_peak
from experiments.train import forward_flops
from forge import shards
from forge.cli import arg, run_main
from parallel import Mesh

L, D, CTX = 12, 768, 1024  # GPT-2 small: layers, width, context
H100_BF16 = 989e12  # FLOP/s, dense bf16, H100 SXM datasheet (1,979 "with sparsity" halved)


@dataclass
class BillBench(Bench):
    """the bill of a GPT-2-small CLT, F = 24,576, 10^9 tokens"""

    bill_tokens: float = arg(1e9, "training tokens")
    bill_features: int = arg(24576, "F per layer (32 d)")
    bill_batch: int = arg(4096, "tokens per step (the activations' memory)")
    bill_gemm_efficiency: float = arg(0.7, "assumed: an H100's large bf16 GEMMs, share of peak")
    bill_depth: int = arg(2, "layers of the step whose activation bytes are measured")


def run(cfg):
    """The bill's rows: setting, value, and where the value comes from."""
    F, N = cfg.bill_features, cfg.bill_tokens
    step = measured(cfg.out, "train.json", bench="jumprelu train step", shape="gpt2-small")
    zstd = measured(cfg.out, "quantization.json", scheme="int8, ours (one scale per row) + zstd")
    flops = 3 * forward_flops(1, L, D, F)  # per token
    gpt = 2 * 12 * L * D * D + 4 * L * CTX * D  # GPT-2's forward per token without the logits
    rows = [
        line(
            "FLOPs, CLT", f"{flops / 1e9:.2f} GFLOP/token", N * flops, "3 x (2LdF + 2dF L(L+1)/2)"
        ),
        line(
            "FLOPs, GPT-2 forward (streaming)",
            f"{gpt / 1e9:.2f} GFLOP/token",
            N * gpt,
            "2 x 12Ld^2 + 4L ctx d",
        ),
    ]
    meta = 12  # token id, document id, position (int32 each)
    for dtype in ("fp32", "fp16", "int8", "int4"):
        b = shards.row_bytes(dtype, L, D) + meta
        rows.append(line(f"disk, {dtype} cache", f"{b} B/token", N * b, "shards.row_bytes + meta"))
    b = shards.row_bytes("int8", L, D) + meta
    saving = zstd.get("zstd_saving", float("nan"))
    note = f"zstd saved {saving:.1%} of the tiny model's int8 shards (quantization.json)"
    rows.append(
        line("disk, int8 + zstd", f"{b * (1 - saving):.0f} B/token", N * b * (1 - saving), note)
    )
    rows.append(line("disk, streaming", "0 B/token", 0, "train.py --corpus: nothing stored"))
    per_elem = activation_bytes(cfg)
    for T in (1, 2, 4, 8):
        n = clt_params_per_rank(L, D, F, T)
        acts = per_elem * cfg.bill_batch * L * F / T
        for name, b in (("fp32 Adam", 16), ("bf16 Adam", 8)):
            value = f"{(b * n + acts) / GiB:.1f} GiB"
            how = f"{n / 1e9:.3g}B params/rank x {b} B + {acts / GiB:.1f} GiB activations"
            rows.append(line(f"memory per rank, TP={T}, {name}", value, b * n + acts, how))
    mfu = step["ratio"] * cfg.bill_gemm_efficiency
    seconds = N * flops / (mfu * H100_BF16)
    how = (
        f"MFU {mfu:.0%} = step/matmul {step['ratio']:.0%} (train.json, CPU) x GEMM efficiency "
        f"{cfg.bill_gemm_efficiency:.0%} (assumed) of 989 TFLOP/s"
    )
    rows.append(line("time, one H100", f"{seconds / 3600:.1f} h", seconds, how))
    hours = " / ".join(f"{seconds / 3600 / T:.2g}" for T in (2, 4, 8))
    how = "the FLOPs split over the ranks (total: H100-seconds, any TP), communication not counted"
    rows.append(line("time per rank, TP=2 / 4 / 8 H100s", f"{hours} h", seconds, how))
    streamed = measured(cfg.out, "stream.json", bench="train.py, streamed")
    cached = measured(cfg.out, "stream.json", bench="train.py, cached")
    value = f"{streamed['tok_per_s']:.1f} vs {cached['tok_per_s']:.1f}"
    how = f"stream.json (CPU, F = 3072): {streamed['detail']}"
    rows.append(line("streamed vs cached tok/s", value, 0, how))
    return rows


def line(item, value, total, source):
    return dict(item=item, value=value, total=f"{total:.3g}", source=source)


def measured(out, name, **match):
    """The first row of <out>/<name> (a study's JSON) whose values start with `match`'s."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: run the study that writes it first (see --help)")
    with open(path) as f:
        rows = json.load(f)["results"]
    return next(r for r in rows if all(str(r[k]).startswith(v) for k, v in match.items()))


def activation_bytes(cfg):
    """Bytes a training step holds beyond 16 per parameter, per (token, layer, feature): one step
    of train.py at bill_depth layers, F = bill_features, 512 tokens, in a fresh process."""
    B = 512
    shape = (cfg.bill_depth, D, cfg.bill_features, B)
    r = fresh_process(rank_peak, Mesh(), shape, 2)
    extra = r["above"] * GiB - 16 * r["params"]
    return max(extra, 0) / (B * cfg.bill_depth * cfg.bill_features)


def main(argv=None):
    return run_study(__doc__, "bill", run, BillBench, argv)


if __name__ == "__main__":
    run_main(main)

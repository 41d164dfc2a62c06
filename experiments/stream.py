"""
experiments/stream.py: training without a cache. train.py's tokens/s streamed (--corpus: the model
runs in every fill of the shuffle buffer) against cached (an int8 cache of the same model and corpus),
same flags, on a random GPT-2 small; and, at TP = 2, a fill computed by TP rank 0 and broadcast
(train.py's way) against each TP rank computing it (gloo, a process and one thread per rank).

    python experiments/stream.py              # GPT-2-small shape, F = 3072: ~15 min on 2 busy cores
    python experiments/stream.py --quick      # the tiny shape (L4 d128), F = 1024: a minute

tokens/s is over the whole train() call, after a one-step warm-up of each: the streamed run also
loads the GPT and reads its held-out contexts, the cached one opens its cache (built beforehand).
"FLOPs predict": step / (step + forward), the forward at 2 FLOPs per weight (attention aside).
"""

import os
import sys
import time
from dataclasses import dataclass
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from cache import ActivationStream, CacheConfig, build_cache
from experiments.common import (
    GPT2_SMALL_SHAPE,
    TINY_SHAPE,
    Bench,
    on_tp_ranks,
    random_model_dir,
    run_study,
    synthetic_corpus,
    timed,
)
from forge.cli import arg, run_main
from parallel import Mesh


@dataclass
class StreamBench(Bench):
    """train.py streamed vs cached tokens/s; TP fills: broadcast vs each rank computing"""

    features: int = arg(3072, "F of the CLT (--quick: 1024)")
    batch_tokens: int = arg(512, "tokens per step")
    steps: int = arg(6, "training steps per run")
    fills: int = arg(3, "buffer fills per streamed run (the buffer: steps / fills batches)")
    ctx: int = arg(128, "context length")
    reps: int = arg(1, "cached/streamed pairs, interleaved (the median is reported)")
    fill_reps: int = arg(3, "TP = 2 fills of each kind, interleaved (the median is reported)")


def run(cfg):
    shape = TINY_SHAPE if cfg.quick else GPT2_SMALL_SHAPE
    name = "tiny" if cfg.quick else "gpt2-small"
    F = 1024 if cfg.quick else cfg.features
    root = os.path.join(cfg.out, "stream")
    model = random_model_dir(os.path.join(root, name), **shape)
    corpus = synthetic_corpus(os.path.join(root, "corpus.txt"), 400)
    cache = os.path.join(root, f"cache-{name}")
    B = cfg.batch_tokens
    contexts = 4
    tokens = B * cfg.steps * 2
    build = dict(tokens=tokens, ctx=cfg.ctx, out=cache, batch_size=contexts, device=cfg.device)
    build_cache(CacheConfig(model, corpus, **build))
    rows = train_rows(cfg, name, shape, F, model, corpus, cache, contexts)
    args = (model, corpus, B, cfg.ctx, contexts, cfg.fill_reps)
    ranks = on_tp_ranks(fill_seconds, 2, args, 1, root)
    t = {way: max(r[way] for r in ranks) for way in ranks[0]}  # a fill ends with its slowest rank
    setting = f"{name}, a fill of {B} rows, TP = 2, CPU gloo, 1 thread/rank"
    rows.append(row("TP fill: rank 0 computes + broadcast", setting, t["broadcast"], B))
    rows.append(row("TP fill: each rank computes", setting, t["each"], B))
    return rows


def train_rows(cfg, name, shape, F, model, corpus, cache, contexts):
    """train.py from the cache and streamed, same flags, interleaved; median tokens/s of each."""
    import train

    B = cfg.batch_tokens
    flags = dict(features=F, steps=cfg.steps, batch_size=B, warmup=1, eval_every=-1)
    flags.update(log_every=cfg.steps, ckpt_every=-1, device=cfg.device, overwrite=True)
    stream = dict(corpus=corpus, model=model, ctx=cfg.ctx, contexts=contexts, eval_contexts=1)
    stream.update(buffer_tokens=B * cfg.steps // cfg.fills)
    runs = dict(cached=dict(cache=cache), streamed=stream)
    seconds = {k: [] for k in runs}
    for rep in range(-1, cfg.reps):  # rep -1: a warm-up of one step (lazy initialization)
        for kind, more in runs.items():
            out = os.path.join(cfg.out, "stream", f"run-{kind}")
            c = train.TrainConfig(
                out=out, **{**flags, **more, "steps": cfg.steps if rep >= 0 else 1}
            )
            t = timed(partial(train.train, c))[0]
            seconds[kind] += [t] if rep >= 0 else []
    L, d = shape["n_layer"], shape["n_embd"]
    step_flop = 3 * (2 * L * d * F + 2 * d * F * L * (L + 1) // 2)  # per token
    forward_flop = 2 * 12 * L * d * d  # per token: attention and MLP weights, 2 FLOPs each
    setting = f"{name} L{L} d{d} F{F}, B{B}, {cfg.steps} steps, CPU"
    out = []
    for kind, ts in seconds.items():
        t = sorted(ts)[len(ts) // 2]
        r = row(f"train.py, {kind}", setting, t, B * cfg.steps)
        if kind == "streamed":
            base = sorted(seconds["cached"])[len(ts) // 2]
            predicted = step_flop / (step_flop + forward_flop)
            r["detail"] = f"{base / t:.3f} of cached (FLOPs predict {predicted:.3f})"
        out.append(r)
    return out


def fill_seconds(mesh, model, corpus, rows, ctx, contexts, reps):
    """On each TP rank: median seconds of a fill of `rows` rows, train.py's way (TP rank 0 computes
    and broadcasts) and each rank computing it alone (a mesh of its own: no broadcast)."""
    cfg = CacheConfig(model, corpus, ctx=ctx, batch_size=contexts)
    stream = ActivationStream(cfg, rows, 0, None, "cpu")
    stream.norms(mesh)  # fill 0: the warm-up
    times = dict(broadcast=[], each=[])
    for rep in range(reps):
        for i, (way, m) in enumerate((("broadcast", mesh), ("each", Mesh()))):
            stream.mesh = m
            torch.distributed.barrier()
            t0 = time.perf_counter()
            stream.fill(1 + 2 * rep + i)
            torch.distributed.barrier()  # a fill is ready once every rank has it
            times[way].append(time.perf_counter() - t0)
    return {way: sorted(ts)[len(ts) // 2] for way, ts in times.items()}


def row(bench, setting, seconds, tokens):
    return dict(bench=bench, setting=setting, s=seconds, tok_per_s=tokens / seconds, detail="")


def main(argv=None):
    return run_study(__doc__, "stream", run, StreamBench, argv)


if __name__ == "__main__":
    run_main(main)

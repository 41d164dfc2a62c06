"""
experiments/interp.py: interp.py's two passes (train + held-out, with explanations) against one
plain in-order read of the same cache: runs/clt on runs/cache (after `python demo.py`), or else a
random CLT (~3 % density) of a random model of the tiny shape on a cache of a generated corpus.

    python experiments/interp.py
    python experiments/interp.py --quick --device cuda
"""

import os
import shutil
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import (
    TINY_SHAPE,
    Bench,
    random_clt,
    random_model_dir,
    run_study,
    sync,
    synthetic_corpus,
)
from forge.cli import arg, run_main


@dataclass
class InterpBench(Bench):
    """autointerp: both passes over the cache vs one plain read"""

    interp_tokens: int = arg(200_000, "tokens of the random-CLT cache (tiny shape)")
    interp_chunk: int = arg(4096, "interp.py --chunk-size")


def run(cfg):
    """One row: the passes' time, the plain read's, their ratio."""
    import interp

    trained = os.path.join("runs", "clt"), os.path.join("runs", "cache")
    files = zip(trained, ("config.json", "manifest.json"))
    if all(os.path.exists(os.path.join(p, f)) for p, f in files):
        name, (clt_dir, cache_dir), model_dir = "tiny, trained CLT", trained, ""
    else:
        print("note: runs/clt or runs/cache is missing: timing a random CLT on a random model")
        name, (model_dir, clt_dir, cache_dir) = "tiny-shape, random CLT", random_setup(cfg)
    icfg = interp.InterpConfig(
        model=model_dir,
        clt=clt_dir,
        cache=cache_dir,
        device=cfg.device,
        chunk_size=cfg.interp_chunk,
        out=os.path.join(cfg.out, "interp"),
    )
    model_dir, model, enc, c, ca = interp.load_inputs(icfg)
    reads = []
    for _ in range(3):  # the first warms the page cache
        t0 = time.perf_counter()
        for _ in ca.iter_chunks(icfg.chunk_size, split="all"):
            pass
        reads.append(time.perf_counter() - t0)
    sync(cfg.device)
    t0 = time.perf_counter()
    stats, *_ = interp.interpret(model, enc, c, ca, icfg)
    sync(cfg.device)
    t = time.perf_counter() - t0
    read = min(reads[1:])
    features = stats.L * stats.F
    return [
        dict(
            setup=name,
            tokens=ca.n_tokens,
            features=features,
            chunk=icfg.chunk_size,
            plain_read_s=read,
            interp_s=t,
            ratio=t / read,
            tok_per_s=ca.n_tokens / t,
        )
    ]


def random_setup(cfg):
    """A random model of the tiny shape, a cache of it and a random CLT whose thresholds are each
    feature's 97th percentile pre-activation (density ~3 %, like a trained CLT's)."""
    import cache

    model_dir = random_model_dir(os.path.join(cfg.out, "interp_model"), **TINY_SHAPE)
    corpus = synthetic_corpus(os.path.join(cfg.out, "corpus.txt"), 4000)
    cache_dir = os.path.join(cfg.out, "interp_cache")
    clt_dir = os.path.join(cfg.out, "interp_clt")
    build = cache.CacheConfig(
        model=model_dir,
        corpus=corpus,
        tokens=cfg.interp_tokens,
        ctx=64,
        device=cfg.device,
        out=cache_dir,
        heldout=0.02,
        overwrite=True,
    )
    cache.build_cache(build)
    shutil.rmtree(clt_dir, ignore_errors=True)  # random_clt keeps a CLT it finds
    random_clt(model_dir, cache_dir, clt_dir, 1024, density=0.03)
    return model_dir, clt_dir, cache_dir


def main(argv=None):
    return run_study(__doc__, "interp", run, InterpBench, argv)


if __name__ == "__main__":
    run_main(main)

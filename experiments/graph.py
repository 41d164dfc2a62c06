"""
experiments/graph.py: attribution time and peak memory against the number of active features, on the
tiny model (or a random model of its shape) and on a random GPT-2-small shape, each with a random
CLT tuned to fire on exactly n features. On a CPU each graph runs in a fresh process, so the peak
RSS above the setup's is that graph's own memory. Prints the log-log slope of time against active
features (1 = linear).

    python experiments/graph.py
    python experiments/graph.py --quick          # the first three counts
    python experiments/graph.py --device cuda
"""

import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from experiments.common import (
    GPT2_SMALL_SHAPE,
    TINY_SHAPE,
    Bench,
    clt_with_n_active,
    fresh_process,
    peak_bytes,
    peak_reset,
    run_study,
    set_threads,
    sync,
)
from forge.cli import arg, run_main
from forge.hub import DEFAULT_MODEL
from model import GPT, GPTConfig


@dataclass
class GraphBench(Bench):
    """attribution graphs: time and peak memory vs active features"""

    graph_features: str = arg("250,500,1000,2000,4000", "active-feature counts to time")
    graph_prompt_len: int = arg(32, "prompt tokens, BOS included")
    graph_batch: int = arg(256, "targets per pass of graph.py's transposed model")
    graph_n_features: int = arg(4096, "features per layer of the random CLTs")


def run(cfg):
    """A row per model and active-feature count."""
    counts = [int(n) for n in cfg.graph_features.split(",")][: 3 if cfg.quick else None]
    have_tiny = os.path.exists(os.path.join(DEFAULT_MODEL, "model.safetensors"))
    tiny = "tiny" if have_tiny else "tiny-shape (random)"
    results = []
    for name in (tiny, "gpt2-small-shape (random)"):
        for n in counts:
            if str(cfg.device).startswith("cuda"):
                results.append(graph_point(name, n, cfg))
            else:  # a fresh process per graph: a peak RSS of its own
                results.append(fresh_process(graph_point, name, n, cfg))
            print(results[-1])
        rows = [r for r in results if r["model"] == name]
        if len(rows) > 1:  # log-log slope of time vs active features: 1 = linear
            first, last = rows[0], rows[-1]
            ratio = np.log(last["attribute_s"] / first["attribute_s"])
            slope = ratio / np.log(last["n_active"] / first["n_active"])
            span = f"{first['n_active']}..{last['n_active']}"
            print(f"{name}: attribution time ~ n_active^{slope:.2f} over {span}")
    return results


def graph_point(name, n_active, cfg):
    """Time and peak memory of one attribution graph of a random prompt."""
    import graph

    set_threads(cfg.threads)
    torch.manual_seed(0)
    if name == "tiny":
        model = GPT.from_pretrained()
    else:
        shape = TINY_SHAPE if name.startswith("tiny") else GPT2_SMALL_SHAPE
        model = GPT(GPTConfig(**dict(shape, n_ctx=1024)))
    model = model.to(cfg.device).eval()
    V = model.config.vocab_size
    idx = torch.randint(0, V - 1, (1, cfg.graph_prompt_len), device=cfg.device)
    idx[0, 0] = V - 1  # BOS: <|endoftext|> is the last id in GPT-2's layout
    t = clt_with_n_active(model, idx, cfg.graph_n_features, n_active)
    base = peak_reset(cfg.device)
    t0 = time.perf_counter()
    rep = graph.local_replacement(model, t, idx)
    g = graph.attribute(model, t, rep, batch_size=cfg.graph_batch)
    sync(cfg.device)
    t1 = time.perf_counter()
    graph.prune(g)
    graph.scores(g)
    t2 = time.perf_counter()
    peak = peak_bytes(cfg.device, base)
    err, scale = graph.exactness(model, t, rep, g)
    return dict(
        model=name,
        n_active=len(rep.feats),
        nodes=len(g.adjacency),
        attribute_s=t1 - t0,
        prune_s=t2 - t1,
        ms_per_feature=1e3 * (t1 - t0) / len(rep.feats),
        peak_MB=peak / 2**20,
        adjacency_MB=g.adjacency.numel() * 4 / 2**20,
        rel_exactness=err / scale,
    )


def main(argv=None):
    return run_study(__doc__, "graph", run, GraphBench, argv)


if __name__ == "__main__":
    run_main(main)

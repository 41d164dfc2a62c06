"""
experiments/llama.py: the pipeline at Llama-3.2-1B's shape on a CPU, random weights, reduced depth:
cache build, one training step against matmul, a capped graph; then the memory per TP rank of the
published 524k-feature CLT (mntss/clt-llama-3.2-1b-524k: 16 layers x 32,768 features) on paper.

The model is model.Llama at LlamaConfig's defaults (d = 2048, GQA 32/8, head 64, MLP 8192, vocab
128,256, tied, Llama 3's rope scaling) but --llama-layers of its 16 layers, with a 300-token
byte-level tokenizer (ids below the vocabulary); the corpus is random words. Each stage runs in a
fresh process, so the peak RSS it reports is its own.

    python experiments/llama.py                  # ~5 CPU-minutes at 2 layers
    python experiments/llama.py --llama-layers 16 --llama-features 32768   # the real thing
"""

import os
import shutil
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from experiments.common import (
    GiB,
    Bench,
    fresh_process,
    peak_bytes,
    random_llama_dir,
    run_study,
    set_threads,
    synthetic_corpus,
)
from experiments.dist import clt_params_per_rank
from experiments.scale import SCALE_PROMPT, scale_graph, scale_row
from experiments.train import step_vs_matmul
from forge.cli import arg, run_main
from model import LlamaConfig

PUBLISHED = dict(L=16, F=32768)  # mntss/clt-llama-3.2-1b-524k: 524,288 features in all


@dataclass
class LlamaBench(Bench):
    """the pipeline at Llama-3.2-1B's shape on CPU, reduced depth; the 524k CLT's memory"""

    llama_layers: int = arg(2, "layers of the random Llama-3.2-1B-shape model (16 = full depth)")
    llama_tokens: int = arg(4096, "tokens in the cache")
    llama_features: int = arg(8192, "CLT features per layer: training step and graph")
    llama_batch: int = arg(512, "tokens per training step")
    llama_reps: int = arg(3, "timed training steps (the median is reported)")
    llama_max_features: int = arg(256, "graph.py --max-features of the capped graph")


def run(cfg):
    """The stages in order, each in a fresh process; one row each (see the module docstring)."""
    out = os.path.join(cfg.out, "llama")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    load0 = os.getloadavg()[0]
    corpus = synthetic_corpus(os.path.join(out, "corpus.txt"), 4000)
    with open(corpus) as f:
        docs = f.read().split("<|endoftext|>")[:500]
    model_dir = os.path.join(out, "model")
    fresh_process(random_llama_dir, model_dir, docs, cfg.llama_layers)
    L, d, F = cfg.llama_layers, LlamaConfig.n_embd, cfg.llama_features
    cache_dir = os.path.join(out, "cache")
    r = fresh_process(llama_cache, model_dir, corpus, cache_dir, cfg.llama_tokens, cfg.threads)
    shape = f"L{L} of 16, d{d}, GQA 32/8, V 128256"
    rate = f"{r['tokens'] / r['seconds']:.0f} tok/s"
    note = f"peak RSS of the build; model {r['model']:.2f} GiB fp32"
    rows = [scale_row("cache build (int8)", shape, r["seconds"], rate, r["peak"], note)]
    args = ("llama-3.2-1b", L, d, F, cfg.llama_batch, "jumprelu", "cpu", cfg.llama_reps)
    r = fresh_process(step_vs_matmul, *args)
    note = f"{r['ratio']:.0%} of the same-run matmul FLOP rate at the step's shapes"
    rate = "step vs matmul: " + r["detail"]
    rows.append(scale_row("CLT train step (jumprelu)", r["shape"], r["ms"] / 1e3, rate, "-", note))
    clt_dir = os.path.join(out, "clt")
    args = (model_dir, cache_dir, clt_dir, F, cfg.llama_max_features, cfg.threads, "cpu")
    r = fresh_process(scale_graph, *args, SCALE_PROMPT * 4)
    cap = cfg.llama_max_features
    setting = f"{r['tokens']} tokens, {r['n_active']} active, --max-features {cap}"
    note = "replacement + attribution + pruning; GiB above the loaded model and CLT"
    rows.append(scale_row("graph (capped)", setting, r["seconds"], "-", r["above"], note))
    rows += published_clt_rows()
    threads = cfg.threads or torch.get_num_threads()
    load = f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    setting = f"{os.cpu_count()} cores, torch threads {threads}"
    rows.append(scale_row("machine", setting, "-", "-", "-", load))
    shutil.rmtree(out)
    return rows


def llama_cache(model_dir, corpus, out, tokens, threads):
    """cache.py with its defaults (int8, 64-token contexts, 64 per forward) on the Llama."""
    import cache

    set_threads(threads)
    cfg = cache.CacheConfig(model=model_dir, corpus=corpus, tokens=tokens, out=out, device="cpu")
    m = cache.build_cache(cfg)
    c = LlamaConfig(**m["model_config"])
    per_layer = c.n_embd * (2 * c.n_head * c.head_dim + 2 * c.n_kv_head * c.head_dim)
    per_layer += 3 * c.n_embd * c.n_inner
    model = 4 * (c.vocab_size * c.n_embd + c.n_layer * per_layer)
    return dict(
        tokens=m["n_tokens"], seconds=m["seconds"], peak=peak_bytes() / GiB, model=model / GiB
    )


def published_clt_rows():
    """Per TP rank, on paper: the 524k CLT's weights (bf16 as published, fp32 as graph.py reads
    them) and its training state (fp32 Adam: 16 bytes per parameter)."""
    L, F, d = PUBLISHED["L"], PUBLISHED["F"], LlamaConfig.n_embd
    rows = []
    for T in (1, 2, 4, 8):
        n = clt_params_per_rank(L, d, F, T)
        note = (
            f"on paper: {n / 1e9:.3g}B params/rank; weights {2 * n / GiB:.3g} GiB bf16, "
            f"{4 * n / GiB:.3g} GiB fp32; training {16 * n / GiB:.3g} GiB (fp32 Adam)"
        )
        setting = f"L{L} d{d} F{F} (524k), TP={T}"
        rows.append(scale_row("published CLT per rank", setting, "-", "-", 16 * n / GiB, note))
    return rows


def main(argv=None):
    return run_study(__doc__, "llama", run, LlamaBench, argv)


if __name__ == "__main__":
    run_main(main)

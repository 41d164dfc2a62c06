"""
experiments/scale.py: the whole pipeline at GPT-2-small shape on a CPU: cache build, training step,
memory per TP rank, interp and a capped graph, then the memory limit of an F = 32 d CLT. One table.

Each stage runs in a fresh process, so the peak RSS it reports (VmHWM) is its own. The model is a
random GPT-2 small made and saved by transformers (its init, its save_pretrained), with a
byte-level tokenizer; the corpus is random words. Memory per TP rank is measured with gloo, one
process per rank, and computed from clt_params_per_rank: fp32 Adam holds 16 bytes per parameter
(weight, gradient, two moments).

    python experiments/scale.py             # ~7 CPU-minutes
"""

import os
import shutil
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from experiments.common import (
    GiB,
    Bench,
    cuda_peak_gib,
    fresh_process,
    hf_random_model_dir,
    on_tp_ranks,
    peak_bytes,
    peak_reset,
    random_clt,
    run_study,
    set_threads,
    sync,
    synthetic_corpus,
)
from experiments.dist import clt_params_per_rank
from experiments.train import step_fixture, step_vs_matmul
from forge import shards
from forge.cli import arg, run_main
from forge.hub import load_tokenizer
from model import load_model

SCALE_PROMPT = "the old market by the river bridge"  # 35 byte tokens + BOS for the capped graph


@dataclass
class ScaleBench(Bench):
    """the pipeline at GPT-2-small shape on CPU; memory at F = 32 d"""

    scale_tokens: int = arg(8192, "tokens in the GPT-2-small-shape cache")
    scale_features: int = arg(3072, "CLT features per layer: training, interp, graph")
    scale_batch: int = arg(512, "tokens per training step")
    scale_reps: int = arg(3, "timed training steps (the median is reported)")
    scale_max_features: int = arg(256, "graph.py --max-features of the capped graph")
    scale_limit_depth: int = arg(2, "layers of the F = 32 d CLTs measured per rank")
    scale_limit_tp: str = arg("1,2,4", "TP sizes measured at that depth (gloo, a process each)")


def run(cfg):
    """The stages in order, each in a fresh process; one row each (see the module docstring)."""
    out = os.path.join(cfg.out, "scale")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    load0 = os.getloadavg()[0]
    model_dir = fresh_process(hf_random_model_dir, os.path.join(out, "gpt2_small_random"))
    rows = cache_and_train_rows(cfg, out, model_dir)
    rows += interp_and_graph_rows(cfg, out, model_dir)
    d = 768
    F_limit = 32 * d
    measured = {}
    for T in (int(t) for t in cfg.scale_limit_tp.split(",")):
        shape = (cfg.scale_limit_depth, d, F_limit, cfg.scale_batch)
        measured[T] = rank_memory(shape, T, 1, out)
    rows += memory_limit_rows(12, d, F_limit, (1, 2, 4, 8), cfg.scale_limit_depth, measured)
    threads = cfg.threads or torch.get_num_threads()
    load = f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    setting = f"{os.cpu_count()} cores, torch threads {threads}"
    rows.append(scale_row("machine", setting, "-", "-", "-", load))
    shutil.rmtree(out)
    return rows


def scale_row(stage, setting, time_s, rate, GiB_per_rank, note=""):
    """One row of the table, printed as it comes."""
    row = dict(stage=stage, setting=setting, time_s=time_s, rate=rate, GiB_per_rank=GiB_per_rank)
    row["note"] = note
    print(row)
    return row


def cache_and_train_rows(cfg, out, model_dir):
    """The cache build, the training step against matmul, the CLT's memory per TP rank."""
    corpus = synthetic_corpus(os.path.join(out, "corpus.txt"), 4000)
    cache_dir = os.path.join(out, "cache")
    L, d, F, B = 12, 768, cfg.scale_features, cfg.scale_batch
    r = fresh_process(scale_cache, model_dir, corpus, cache_dir, cfg.scale_tokens, cfg.threads)
    rows = [
        scale_row(
            "cache build (int8)",
            f"{r['tokens']} tokens, 64 x 64 per forward",
            r["seconds"],
            f"{r['tokens'] / r['seconds']:.0f} tok/s",
            r["peak"],
            f"peak RSS of the build; model {r['model']:.2f} GiB + one batch's mlp_in/out "
            f"{r['acts']:.2f} GiB; {r['shards']} shards, manifest {r['manifest'] / 1e3:.0f} kB",
        )
    ]
    r = fresh_process(scale_train, (L, d, F, B), cfg.scale_reps, cfg.threads)
    note = f"{r['ratio']:.0%} of the same-run matmul FLOP rate at the step's shapes"
    rate = "step vs matmul: " + r["detail"]
    rows.append(scale_row("CLT train step (jumprelu)", r["shape"], r["ms"] / 1e3, rate, "-", note))
    for T in (1, 2):
        above, n = rank_memory((L, d, F, B), T, 1, out)
        note = f"measured; {n / 1e6:.1f}M params/rank, fp32 Adam 16 B each = {16 * n / GiB:.2f} GiB"
        setting = f"L{L} d{d} F{F} B{B}, TP={T}, gloo"
        rows.append(scale_row("CLT memory per rank", setting, "-", "-", above, note))
    n = clt_params_per_rank(L, d, F, 4)
    note = f"on paper: {n / 1e6:.1f}M params/rank x 16 B"
    rows.append(
        scale_row("CLT memory per rank", f"L{L} d{d} F{F}, TP=4", "-", "-", 16 * n / GiB, note)
    )
    return rows


def interp_and_graph_rows(cfg, out, model_dir):
    """interp.py's two passes and a capped graph, with one random CLT of ~1 % density."""
    cache_dir = os.path.join(out, "cache")
    clt_dir = os.path.join(out, "clt")
    F = cfg.scale_features
    interp_out = os.path.join(out, "interp")
    r = fresh_process(scale_interp, model_dir, cache_dir, clt_dir, interp_out, F, cfg.threads)
    setting = f"{r['tokens']} tokens, {r['features']} features"
    rate = f"{r['tokens'] / r['seconds']:.0f} tok/s"
    note = "random CLT, ~1% density; GiB above the loaded inputs"
    rows = [scale_row("interp (both passes)", setting, r["seconds"], rate, r["above"], note)]
    args = (model_dir, cache_dir, clt_dir, F, cfg.scale_max_features, cfg.threads)
    r = fresh_process(scale_graph, *args)
    setting = (
        f"{r['tokens']} tokens, {r['n_active']} active, --max-features {cfg.scale_max_features}"
    )
    rate = f"{r['kept']} features kept"
    note = "replacement + attribution + pruning"
    rows.append(scale_row("graph (capped)", setting, r["seconds"], rate, r["above"], note))
    return rows


# -----------------------------------------------------------------------------
# the stages, each run in a fresh process (gpu.py runs them on a GPU too)


def scale_cache(model_dir, corpus, out, tokens, threads, device="cpu"):
    """cache.py with its defaults (int8, 64-token contexts, 64 per forward): the rate of the corpus
    -> shards loop, and the peak RSS of the whole build (model load, fingerprint, channel scales,
    writer); on CUDA also the allocator's peak (cuda_peak)."""
    import cache

    set_threads(threads)
    cfg = cache.CacheConfig(
        model=model_dir, corpus=corpus, tokens=tokens, out=out, device=device, overwrite=True
    )
    m = cache.build_cache(cfg)
    c = m["model_config"]
    # one forward's mlp_in + mlp_out, fp32
    acts = 2 * cfg.batch_size * cfg.ctx * c["n_layer"] * c["n_embd"] * 4
    model = 4 * (
        (c["vocab_size"] + c["n_ctx"]) * c["n_embd"] + c["n_layer"] * 12 * c["n_embd"] ** 2
    )
    return dict(
        tokens=m["n_tokens"],
        seconds=m["seconds"],
        peak=peak_bytes() / GiB,
        model=model / GiB,
        acts=acts / GiB,
        shards=len(m["shards"]),
        manifest=os.path.getsize(os.path.join(out, shards.MANIFEST)),
        cuda_peak=cuda_peak_gib(device),
    )


def scale_train(shape, reps, threads):
    """experiments/train.py's step-vs-matmul measurement at one shape."""
    set_threads(threads)
    return step_vs_matmul("gpt2-small", *shape, "jumprelu", "cpu", reps)


def rank_peak(mesh, shape, steps):
    """On one rank of `mesh`: its parameters, and its peak RSS over `steps` training steps above its
    RSS before the CLT existed (weights, gradients, Adam moments, activations), GiB."""
    base = peak_reset()
    model, _, step = step_fixture(*shape, "jumprelu", "cpu", mesh)
    for _ in range(steps):
        step()
    return dict(
        params=sum(p.numel() for p in model.parameters()), above=peak_bytes("cpu", base) / GiB
    )


def rank_memory(shape, T, steps, out_dir):
    """(max over ranks of the peak GiB above the start, parameters per rank) of a T-way TP mesh."""
    threads = max(1, (os.cpu_count() or 1) // T)
    ranks = on_tp_ranks(rank_peak, T, (shape, steps), threads, out_dir)
    return max(r["above"] for r in ranks), ranks[0]["params"]


def scale_interp(model_dir, cache_dir, clt_dir, out, F, threads, device="cpu"):
    """interp.py's two passes (train, held-out) over the cache with a random CLT of F per layer."""
    import interp

    set_threads(threads)
    random_clt(model_dir, cache_dir, clt_dir, F)
    cfg = interp.InterpConfig(model=model_dir, clt=clt_dir, cache=cache_dir, device=device, out=out)
    _, model, enc, c, ca = interp.load_inputs(cfg)
    base = peak_reset()
    t0 = time.perf_counter()
    interp.interpret(model, enc, c, ca, cfg)
    sync(device)
    return dict(
        seconds=time.perf_counter() - t0,
        tokens=ca.n_tokens,
        features=c.config.n_layers * F,
        above=peak_bytes("cpu", base) / GiB,
        cuda_peak=cuda_peak_gib(device),
    )


def scale_graph(
    model_dir, cache_dir, clt_dir, F, max_features, threads, device="cpu", prompt=SCALE_PROMPT
):
    """graph.py on `prompt` with --max-features: replacement model, capped attribution, pruning,
    with a random CLT of F per layer (experiments/llama.py's too)."""
    import clt
    import graph

    set_threads(threads)
    random_clt(model_dir, cache_dir, clt_dir, F)
    model = load_model(model_dir).to(device)
    c = clt.CrossLayerTranscoder.from_pretrained(clt_dir).to(device)
    enc = load_tokenizer(model_dir)
    idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(device)
    base = peak_reset()
    t0 = time.perf_counter()
    rep = graph.local_replacement(model, c, idx)
    g = graph.attribute(model, c, rep, prompt, max_features=max_features)
    graph.prune(g)
    sync(device)
    return dict(
        seconds=time.perf_counter() - t0,
        tokens=idx.size(1),
        n_active=len(rep.feats),
        kept=len(g.feats),
        above=peak_bytes("cpu", base) / GiB,
        cuda_peak=cuda_peak_gib(device),
    )


def memory_limit_rows(L, d, F, Ts, depth, measured):
    """Memory per TP rank of an F-per-layer CLT, computed: fp32 Adam (16 bytes per parameter: what
    train.py keeps, bf16 autocast or not) and what bf16 storage would save; then `measured`
    {T: (GiB, params per rank)} of the same CLT at `depth` layers, against the same formula."""
    stage = "memory limit, F = 32 d"
    rows = []
    for T in Ts:
        n = clt_params_per_rank(L, d, F, T)
        note = (
            f"computed: {n / 1e9:.3g}B params/rank x 16 B; bf16 weights + grads, fp32 moments "
            f"(12 B): {12 * n / GiB:.3g} GiB; all bf16 (8 B): {8 * n / GiB:.3g} GiB"
        )
        setting = f"L{L} d{d} F{F}, TP={T}"
        rows.append(scale_row(stage, setting, "-", "-", 16 * n / GiB, note))
    for T, (above, n) in measured.items():
        note = (
            f"measured; {n / 1e6:.1f}M params/rank x 16 B = {16 * n / GiB:.3g} GiB: "
            f"{above / (16 * n / GiB):.2f}x of it (the rest: activations, gloo, allocator)"
        )
        setting = f"L{depth} d{d} F{F}, TP={T}, gloo"
        rows.append(scale_row(stage, setting, "-", "-", above, note))
    return rows


def main(argv=None):
    return run_study(__doc__, "scale", run, ScaleBench, argv)


if __name__ == "__main__":
    run_main(main)

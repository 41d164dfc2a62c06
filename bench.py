"""
bench.py: clt-forge's benchmarks, one subcommand each. Every figure that goes into the README's
results table is a ratio measured within one run, because the machines are noisy: a baseline is
timed in the same process, next to the thing it is compared with.

    python bench.py --help
    python bench.py cache              # activation cache on the tiny model and a random GPT-2-small shape
    python bench.py cache --quick      # the same, small (a couple of minutes on a 2-core CPU)
    python bench.py cache --device cuda
    python bench.py vs-circuit-tracer --threads 1  # graph.py beside circuit-tracer's attribute() (installed)
    python bench.py compactness        # CLT vs PLT graphs on models/tiny (~15 min on a loaded 2-core CPU)
    python bench.py scale              # the pipeline at GPT-2-small shape on CPU (random weights), ~7 CPU-minutes
    python bench.py recovery           # planted concepts a CLT recovers vs its size and sparsity -> assets/recovery.png
    python bench.py faithfulness       # pruned graphs' predicted logit changes vs ablations -> assets/faithfulness.png
    python bench.py gpu --out runs/bench    # the GPU path in one run, at most 8 minutes -> runs/bench/gpu.json
    python bench.py gpu --device cpu --quick  # every line of it at the tiny shape on a CPU (~2 min on 2 cores)

Adding a benchmark: write `bench_<name>(cfg) -> list of result dicts` and its flags as a dataclass
`<Name>Bench(Bench)` (a `# comment` on each field is its --help), and put both in BENCHMARKS. Results
print as a markdown table and go to <out>/<name>.json.

The cache benchmark measures, per model and dtype:
- bytes/token: all shard bytes / tokens (activations, scales, token/doc/position), and x fp32;
- NMSE = ||x - x_hat||^2 / ||x||^2 of what was stored (from the manifest, summed over all rows);
- writer overhead: (corpus -> shards loop) / (the same loop with only the forward pass) - 1, in
  wall time and in CPU time (all threads; on a shared machine the fairer of the two);
- read: shuffled batches (steady state, bytes of activations+scales per second) against a raw
  sequential read of the shard files (file bytes per second), both from the page cache; dequantized
  to fp32 on the CPU, and raw (the stored rows, what a GPU run moves before dequantizing there);
  and reading the cache in order with dequantization (iter_chunks);
- the crc32 checks: the rate of a crc32 pass over the shards, and what it adds to the first epoch
  of a reader (each chunk is checked the first time a row of it is read, never again): raw read
  rate / crc32 rate, in CPU time.

The gpu benchmark is the script to run whenever a GPU is lent: cache.py on CUDA at GPT-2-small shape
(tokens/s, peak CUDA memory), train.py with bf16 autocast and in fp32 over 200 steps from the same seed
on the same batches (the largest loss gap in units of the fp32 curve's step-to-step noise, the median
|loss[t] - loss[t-1]|; step time; MFU = the step's matmul FLOPs / step time / the GPU's dense bf16 peak,
--peak-tflops or PEAK_TFLOPS by device name), the bf16 run's first 20 steps under `torchrun
--nproc_per_node=1` with NCCL (its losses against the in-process ones), train.py's step alone against
matmul, and graph.py (capped) and interp.py on CUDA with a random CLT. Each part runs in a fresh process
with a time limit: a part that fails or hangs is its own row's error and the rest still run; no part
starts in the last minute of --budget-s (480 s). The rows so far are in <out>/gpu_partial.json after
every part, the loss curves in <out>/gpu_curves.json. Without a GPU its rows are unmeasured: on a CPU
it runs at the tiny shape only as a test of itself (train.py --autocast always puts bf16 on the CPU,
torchrun uses gloo).

The recovery benchmark trains CLTs of F = 2d, 8d, 32d per layer at train.py's default sparsity
and a --sparsity sweep at 8d, each for --recovery-steps on one small cache of models/tiny, and scores them
with interp.py's concept scores on two evaluation sets of toyworld.eval_corpus (seeds 1 and 2): per label
family the share of concepts some feature matches with F1 >= 0.8 and the mean best F1, beside the MLP
neurons and a random CLT of each size. The recipe with the best headline (category, entity, latent) on
the first set is named; every number in the table and the plot is from the second. Sized for a CPU: a
150k-token cache and 300 steps of 1024 tokens, not the 1000 steps of the README's recipe; trained runs are
reused by a rerun with the same flags.

The faithfulness benchmark asks whether a pruned graph predicts what removing its features does. A CLT
of models/tiny (--faithfulness-clt, or TopK trained here through the compactness trainer), then over
--faithfulness-per-family prompts of every toy-world family: the k most influential feature nodes of
each pruned graph and k random active features of the same layers; for each, the change of the top
logit node (the most likely token's logit minus the mean logit) predicted by the graph's linear system
(all paths, the pruned graph's edges, the direct edge) against graph.intervene's ablation in the real
model (freeze="none") and in the replacement model's view (freeze="all": the direct edge, exactly).
"""
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from importlib.util import find_spec

import numpy as np
import torch

import cache
from clt import CLTConfig, CrossLayerTranscoder, load_transcoder
from forge.cli import arg, parse_config, run_main
from forge.files import atomic_path, check_same_model, write_json
from forge.formats import save_circuit_tracer
from forge.hub import DEFAULT_MODEL, ENDOFTEXT, bytes_to_unicode, load_tokenizer
from model import GPT, GPTConfig
from parallel import Mesh, compute_init, make_mesh

# -----------------------------------------------------------------------------
# helpers shared by benchmarks

@dataclass
class Bench:
    """the flags every benchmark has"""
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", 'cpu, cuda, ...')
    threads: int = arg(0, "torch CPU threads; 0 = torch's default")
    out: str = arg(os.path.join("runs", "bench"), 'scratch space and <name>.json')
    quick: bool = arg(False, 'a small run: every *_tokens size divided by 4')


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def random_model_dir(path, n_layer, n_embd, n_head, n_ctx, vocab_size, seed=0):
    """A random GPT-2 of the given shape in the hub layout, with a byte-level tokenizer (256 bytes +
    <|endoftext|>, no merges): no download, and any shape (e.g. GPT-2 small's 12 x 768)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ctx=n_ctx, vocab_size=vocab_size))
    model.save_pretrained(path)
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab[ENDOFTEXT] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return path


def synthetic_corpus(path, n_docs, seed=0):
    """Documents of random words, separated by <|endoftext|> (for models without their own corpus)."""
    rng = random.Random(seed)
    words = ("the of and to in is was for on that with as by at from his her it an were which are this be "
             "city river capital north south language people old new market bridge road year king").split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 300))) for _ in range(n_docs)]
    with open(path, "w") as f:
        f.write(ENDOFTEXT.join(docs))
    return path


def print_table(rows):
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


# -----------------------------------------------------------------------------
# cache


@dataclass
class CacheBench(Bench):
    """activation cache: bytes/token, NMSE, writer overhead, read rate"""
    tiny_tokens: int = arg(200_000, 'tokens per cache on the tiny model')
    gpt2_tokens: int = arg(8192, 'tokens per cache on the GPT-2-small shape')
    read_batch: int = arg(4096, 'batch size of the shuffled read')


def bare_forward_seconds(cfg):
    """The writer's loop without the writer: the same contexts, batches and forward pass.
    Returns (wall seconds, CPU seconds of all threads)."""
    model = GPT.from_pretrained(cfg.model).to(cfg.device)
    enc = load_tokenizer(cfg.model)
    sync(cfg.device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for _, idx, _ in cache.iter_batches(cfg, enc, cfg.tokens):
            model.run_with_acts(idx.to(cfg.device), logits=False)
    sync(cfg.device)
    return time.perf_counter() - t0, time.process_time() - c0


def timed(fn):
    """(wall seconds, CPU seconds of all threads) of fn(). On a shared machine the CPU time is the
    fairer cost: other processes do not count in it."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def sequential_read(files):
    """Read every file front to back into one reused buffer: the raw rate of the disk/page cache."""
    buf = bytearray(max(os.path.getsize(f) for f in files))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            fh.readinto(memoryview(buf)[:os.path.getsize(f)])


def read_rates(path, batch_size, epochs=2):
    """Rates in MB/s of stored bytes, all from the page cache, as (wall, cpu) pairs: a raw sequential
    read of the shard files; shuffled batches dequantized to fp32 on the CPU; shuffled stored rows
    (what a GPU run moves, dequantizing on the device); in-order chunks, dequantized; a crc32
    pass over every shard (what a reader adds in its first epoch: each chunk is checked once).

    The shuffled rates are the steady state a training loop sees: `epochs` epochs of an endless
    stream, timed from the first batch on (the first window's load is a one-time start-up cost).
    """
    c = cache.ActivationCache(path)
    files = [os.path.join(path, s["file"]) for s in c.manifest["shards"]]
    file_bytes = sum(os.path.getsize(f) for f in files)
    sequential_read(files)  # warm the page cache: every rate below is then from RAM
    seq = min(timed(lambda: sequential_read(files)) for _ in range(3))
    n_batches = epochs * c.batches_per_epoch(batch_size, split="all")

    def shuffled(dequantize):
        stream = c.batches(batch_size, seed=0, split="all")
        next(stream)
        if dequantize:
            t = timed(lambda: all(c.dequantize(next(stream)) is not None for _ in range(n_batches)))
        else:
            t = timed(lambda: all(next(stream) is not None for _ in range(n_batches)))  # keeps no batch alive
        stream.close()
        return t
    def rate(nbytes, t):  # MB/s in wall time and in CPU time
        return nbytes / t[0] / 1e6, nbytes / t[1] / 1e6
    shuffled_bytes = n_batches * batch_size * c.row_bytes()
    inorder = timed(lambda: all(chunk is not None for chunk in c.iter_chunks(batch_size, split="all")))
    crc = timed(lambda: all(not cache._check_shard(path, c.manifest, i, "crc32") for i in range(len(files))))
    return dict(seq=rate(file_bytes, seq), shuffled=rate(shuffled_bytes, shuffled(True)),
                shuffled_raw=rate(shuffled_bytes, shuffled(False)),
                inorder=rate(c.n_tokens * c.row_bytes(), inorder), crc32=rate(file_bytes, crc))


def bench_cache_model(name, cfg, read_batch):
    """bytes/token, NMSE, writer overhead and read rates for each dtype on one model."""
    results, bare = [], [bare_forward_seconds(cfg)]
    for dtype in ("int8", "fp16", "fp32"):
        out = f"{cfg.out}_{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        m = cache.build_cache(replace(cfg, dtype=dtype, out=out))
        bare.append(bare_forward_seconds(cfg))  # the baseline right before and after each build
        wall, cpu = [(a + b) / 2 for a, b in zip(bare[-2], bare[-1])]
        fp32_bytes = 2 * m["n_layers"] * m["d_model"] * 4 + 12
        per_token = sum(s["bytes"] for s in m["shards"]) / m["n_tokens"]
        r = read_rates(out, min(read_batch, m["n_tokens"] // 8))
        results.append(dict(model=name, dtype=dtype, tokens=m["n_tokens"], bytes_per_token=per_token,
                            x_fp32=per_token / fp32_bytes, nmse_in=m["nmse_total"][0], nmse_out=m["nmse_total"][1],
                            nmse_worst_layer=max(m["nmse_in"] + m["nmse_out"]),
                            write_overhead_wall=m["seconds"] / wall - 1, write_overhead_cpu=m["cpu_seconds"] / cpu - 1,
                            seq_MBps=r["seq"][0], shuffled_MBps=r["shuffled"][0],
                            shuffled_vs_seq_wall=r["shuffled"][0] / r["seq"][0],
                            shuffled_vs_seq_cpu=r["shuffled"][1] / r["seq"][1],
                            raw_vs_seq_wall=r["shuffled_raw"][0] / r["seq"][0],
                            raw_vs_seq_cpu=r["shuffled_raw"][1] / r["seq"][1],
                            inorder_vs_seq_wall=r["inorder"][0] / r["seq"][0],
                            crc32_MBps=r["crc32"][0], raw_MBps=r["shuffled_raw"][0],
                            crc_cost_first_epoch_cpu=r["shuffled_raw"][1] / r["crc32"][1]))
        shutil.rmtree(out)
    return results


def bench_cache(cfg):
    device = cfg.device
    setups = []
    if os.path.exists(os.path.join(DEFAULT_MODEL, "model.safetensors")):
        setups.append(("tiny", DEFAULT_MODEL, "toy", cfg.tiny_tokens))
    else:
        print(f"note: {DEFAULT_MODEL} is missing: using a random model of the tiny shape (4 x 128)")
        path = random_model_dir(os.path.join(cfg.out, "tiny_random"), 4, 128, 4, 128, 4096)
        setups.append(("tiny-shape (random)", path, synthetic_corpus(os.path.join(cfg.out, "corpus.txt"), 4000), cfg.tiny_tokens))
    gpt2 = random_model_dir(os.path.join(cfg.out, "gpt2_small_random"), 12, 768, 12, 1024, 50257)
    corpus = synthetic_corpus(os.path.join(cfg.out, "corpus.txt"), 4000)
    setups.append(("gpt2-small-shape (random)", gpt2, corpus, cfg.gpt2_tokens))
    results = []
    for name, model_dir, corpus, tokens in setups:
        build = cache.CacheConfig(model=model_dir, corpus=corpus, tokens=tokens, ctx=64, device=device,
                                  out=os.path.join(cfg.out, name.split()[0]), heldout=0.0)
        print(f"{name}: {tokens} tokens per cache on {device}, torch threads {torch.get_num_threads()}")
        results += bench_cache_model(name, build, cfg.read_batch)
    shutil.rmtree(gpt2)
    return results


# -----------------------------------------------------------------------------
# graph: attribution time and peak memory vs active features; circuit-tracer side by side


@dataclass
class GraphBench(Bench):
    """attribution graphs: time and peak memory vs active features"""
    graph_features: str = arg("250,500,1000,2000,4000", 'active-feature counts to time')
    graph_prompt_len: int = arg(32, 'prompt tokens, BOS included')
    graph_batch: int = arg(256, "targets per pass of graph.py's transposed model")
    graph_n_features: int = arg(4096, 'features per layer of the random CLTs')
    graph_clt: str = arg(os.path.join("runs", "clt"), 'a trained CLT of models/tiny: two-hop study')
    graph_two_hop: int = arg(60, 'two-hop prompts in the study; 0 = skip it')


def proc_status_kb(key):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def clt_with_n_active(model, idx, n_features, n_active, seed=0):
    """A random CLT whose b_enc makes exactly n_active (position, layer, feature) fire on idx (BOS
    excluded): the JumpReLU threshold falls between the n-th and (n+1)-th largest x·W_enc."""
    c = model.config
    t = CrossLayerTranscoder(CLTConfig(n_layers=c.n_layer, d_model=c.n_embd, n_features=n_features), seed)
    t = t.to(idx.device).eval()
    with torch.no_grad():
        pre = t.pre_acts(model.run_with_acts(idx)[1].mlp_in[0])[1:]  # (T-1, L, F), b_enc = 0
        top = pre.flatten().topk(n_active + 1).values
        t.b_enc.fill_((t.threshold[0, 0] - (top[-2] + top[-1]) / 2).item())
    return t


def graph_point(name, n_active, cfg):
    """Time and peak memory of one attribution graph. On CPU it runs in a fresh process (see
    bench_graph), so the peak RSS above the setup's RSS is this graph's own memory."""
    import graph
    set_threads(cfg.threads)
    torch.manual_seed(0)
    shape = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=4096) if name.startswith("tiny") else \
        dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)
    model = GPT.from_pretrained() if name == "tiny" else GPT(GPTConfig(n_ctx=1024, **shape))
    model = model.to(cfg.device).eval()
    idx = torch.randint(0, model.config.vocab_size - 1, (1, cfg.graph_prompt_len), device=cfg.device)
    idx[0, 0] = model.config.vocab_size - 1  # BOS: <|endoftext|> is the last id in GPT-2's layout
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
    return dict(model=name, n_active=len(rep.feats), nodes=len(g.adjacency), attribute_s=t1 - t0,
                prune_s=t2 - t1, ms_per_feature=1e3 * (t1 - t0) / len(rep.feats), peak_MB=peak / 2**20,
                adjacency_MB=g.adjacency.numel() * 4 / 2**20, rel_exactness=err / scale)


def bench_graph(cfg):
    """Attribution time and peak memory vs active features, on the tiny model (or its shape, random)
    and on a random GPT-2-small shape, each with a random CLT tuned to fire on n features."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    counts = [int(n) for n in cfg.graph_features.split(",")][: 3 if cfg.quick else None]
    tiny = "tiny" if os.path.exists(os.path.join(DEFAULT_MODEL, "model.safetensors")) else "tiny-shape (random)"
    results = []
    for name in (tiny, "gpt2-small-shape (random)"):
        for n in counts:
            if str(cfg.device).startswith("cuda"):
                results.append(graph_point(name, n, cfg))
            else:
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # a fresh process per graph
                    results.append(pool.submit(graph_point, name, n, cfg).result())
            print(results[-1])
        rows = [r for r in results if r["model"] == name]
        if len(rows) > 1:  # log-log slope of time vs active features: 1 = linear
            slope = np.log(rows[-1]["attribute_s"] / rows[0]["attribute_s"]) / np.log(rows[-1]["n_active"] / rows[0]["n_active"])
            print(f"{name}: attribution time ~ n_active^{slope:.2f} over {rows[0]['n_active']}..{rows[-1]['n_active']}")
    if tiny == "tiny" and cfg.graph_two_hop > 0 and os.path.exists(os.path.join(cfg.graph_clt, "config.json")):
        study = two_hop_study(cfg)
        done = [r for r in study if r["answer_in_logits"]]
        print_table([{k: v for k, v in r.items() if k != "prompt"} for r in done])
        means = {k: float(np.mean([r[k] for r in done])) for k in done[0] if k not in ("prompt", "answer_in_logits")}
        print(f"two-hop study, {len(done)} of {len(study)} prompts with the answer among the logit nodes; means: {means}")
        with open(os.path.join(cfg.out, "graph_two_hop.json"), "w") as f:
            json.dump(dict(clt=cfg.graph_clt, means=means, prompts=study), f, indent=1)
    return results


def peak_reset(device):
    """Start a peak-memory window: -> the baseline bytes (CUDA: allocated; CPU: resident, Linux)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    return proc_status_kb("VmRSS") * 1024


def peak_bytes(device, base):
    """The peak since peak_reset, above its baseline."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() - base
    return proc_status_kb("VmHWM") * 1024 - base


def hf_random_model_dir(path, n_layer=12, n_head=12, n_embd=768, n_ctx=1024, vocab_size=50257, seed=0):
    """A random GPT-2 made by transformers (its own init, N(0, 0.02) weights) in the hub layout, with a
    byte-level tokenizer (256 bytes, <|endoftext|> = 256): the GPT-2-small shape without a download."""
    from forge import toyworld
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_ctx, vocab_size=vocab_size)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    toyworld.save_tokenizer(path, [])
    return path


def circuit_tracer_model(model_dir, clt_dir, device="cpu"):
    """circuit-tracer's ReplacementModel (TransformerLens backend, offline) of a hub-layout GPT-2 and a
    transcoder load_transcoder reads (a CLT or a PLT), in float32: exported by save_circuit_tracer
    (ln_2's affine map folded in: TransformerLens's ln2.hook_normalized is taken before it) and read back
    by circuit-tracer's own loader of that layout (whose default dtype is bfloat16, hence float32)."""
    import tempfile

    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.utils.caching import load_transcoders_from_cache
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast
    hf = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, n_heads=c.n_head,
                                  d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd, act_fn="gelu_new",
                                  d_vocab=c.vocab_size, eps=c.layer_norm_epsilon, normalization_type="LN",
                                  positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
                                  model_name="gpt2", device=device, dtype=torch.float32, default_prepend_bos=False)
    state = convert_gpt2_weights(hf, cfg)
    ours = GPT.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        save_circuit_tracer(load_transcoder(clt_dir, ours), os.path.join(tmp, "transcoder"), ours)
        transcoder, _ = load_transcoders_from_cache("transcoder", cache_dir=tmp, device=torch.device(device),
                                                    dtype=torch.float32, lazy_decoder=False)
    model = TransformerLensReplacementModel.from_config(cfg, transcoder)
    model.tokenizer = GPT2TokenizerFast(vocab_file=os.path.join(model_dir, "vocab.json"),
                                        merges_file=os.path.join(model_dir, "merges.txt"))
    # the replacement model wraps each MLP and the unembedding: their weights sit one module deeper
    wrapped = {}
    for k, v in state.items():
        wrapped[k.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed.")] = v
    missing, unexpected = model.load_state_dict(wrapped, strict=False)
    missing = [k for k in missing if not k.startswith("transcoders.") and not k.endswith(("IGNORE", "mask", "b_U"))]
    if missing or unexpected:
        raise ValueError(f"circuit-tracer's model did not take the weights: missing {missing}, unexpected {unexpected}")
    return model.eval()


def edge_blocks(graph):
    """{edge type: (rows, columns)} of the targets' rows, in the node order both libraries share."""
    s = graph.slices()
    return {"feature->feature": (s.features, s.features), "error->feature": (s.features, s.errors),
            "token->feature": (s.features, s.tokens), "feature->logit": (s.logits, s.features),
            "error->logit": (s.logits, s.errors), "token->logit": (s.logits, s.tokens)}


def vs_circuit_tracer_point(name, T, n_active, ct_batches, cfg):
    """graph.py and circuit-tracer's attribute() on one model, CLT and prompt, one after the other in
    this process: wall time, peak memory above the setup's, and the edges compared node by node.
    circuit-tracer runs once per batch size in ct_batches: each of its hooks gathers batch x active
    features x d numbers, so its best batch on a CPU is small, and the fastest run is the one compared."""
    import graph
    from circuit_tracer import attribute as ct_attribute
    from circuit_tracer.graph import compute_graph_scores
    set_threads(cfg.threads)
    device = cfg.device
    model_dir = DEFAULT_MODEL
    if name != "tiny":
        model_dir = os.path.join(cfg.out, "gpt2-small-random")
        if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
            hf_random_model_dir(model_dir)
    model = GPT.from_pretrained(model_dir).to(device)
    bos = load_tokenizer(model_dir).encode_single_token(ENDOFTEXT)
    torch.manual_seed(0)
    idx = torch.randint(0, bos, (1, T), device=device)  # tokens the tokenizer knows
    idx[0, 0] = bos
    clt_dir = os.path.join(cfg.out, f"clt-{name}-{T}-{n_active}")
    clt_with_n_active(model, idx, cfg.graph_n_features, n_active).save_pretrained(clt_dir)
    t = CrossLayerTranscoder.from_pretrained(clt_dir).to(device)
    ct = circuit_tracer_model(model_dir, clt_dir, device)
    base = peak_reset(device)
    t0 = time.perf_counter()
    c0 = time.process_time()  # CPU seconds: what a run costs on a machine shared with other jobs
    rep = graph.local_replacement(model, t, idx)
    ours = graph.attribute(model, t, rep, batch_size=cfg.graph_batch)
    sync(device)
    ours_s = time.perf_counter() - t0
    ours_cpu = time.process_time() - c0
    ours_peak = peak_bytes(device, base)
    del rep
    ct_runs = {}  # batch -> (seconds, CPU seconds, peak bytes)
    for batch in ct_batches:
        base = peak_reset(device)
        t0 = time.perf_counter()
        c0 = time.process_time()
        theirs = ct_attribute(idx[0], ct, batch_size=batch)
        sync(device)
        ct_runs[batch] = (time.perf_counter() - t0, time.process_time() - c0, peak_bytes(device, base))
    ct_batch = min(ct_runs, key=lambda b: ct_runs[b][0])
    ct_s, ct_cpu, ct_peak = ct_runs[ct_batch]
    if not torch.equal(theirs.active_features.to(device), ours.feats) or \
            not torch.equal(theirs.logit_token_ids.to(device), ours.logit_ids):
        raise RuntimeError("circuit-tracer found other active features or logit nodes: the models differ")
    A, R = ours.adjacency, theirs.adjacency_matrix.to(device)
    worst = max((A[r, c] - R[r, c]).abs().max().item() / R[r, c].abs().max().clamp(min=1e-30).item()
                for r, c in edge_blocks(ours).values())
    ours_scores = graph.scores(ours)
    ct_scores = compute_graph_scores(theirs)
    return dict(model=name, tokens=T, n_active=len(ours.feats), nodes=len(A), ours_s=ours_s, ct_s=ct_s,
                ratio=ct_s / ours_s, ours_cpu_s=ours_cpu, ct_cpu_s=ct_cpu, cpu_ratio=ct_cpu / ours_cpu,
                ours_peak_MB=ours_peak / 2**20, ct_peak_MB=ct_peak / 2**20,
                ours_batch=cfg.graph_batch, ct_batch=ct_batch, max_rel_edge_diff=worst,
                replacement=f"{ours_scores[0]:.4f} / {ct_scores[0]:.4f}",
                completeness=f"{ours_scores[1]:.4f} / {ct_scores[1]:.4f}",
                ct_s_by_batch=", ".join(f"{b}: {t:.3g}" for b, (t, _, _) in ct_runs.items()))


@dataclass
class CircuitTracerBench(Bench):
    """graph.py beside circuit-tracer's attribute() (installed): same model, CLT, prompt and process"""
    vs_points: str = arg("tiny:64:3471:16/32/64/256,gpt2-small:32:18600:32", 'MODEL:TOKENS:ACTIVE:CT_BATCHES,... (MODEL: tiny or gpt2-small, random); the fastest CT batch counts')
    graph_batch: int = arg(256, "targets per pass of graph.py's transposed model")
    graph_n_features: int = arg(4096, 'features per layer of the random CLTs')


def bench_vs_circuit_tracer(cfg):
    """Each point in a fresh process (peak memory of its own); both libraries fp32, same threads."""
    results = []
    for point in cfg.vs_points.split(","):
        name, T, n_active, ct_batches = point.split(":")
        T, n_active = int(T), int(n_active)
        if cfg.quick:
            T, n_active = max(8, T // 4), max(100, n_active // 16)
        batches = [int(b) for b in ct_batches.split("/")]
        results.append(fresh_process(vs_circuit_tracer_point, name, T, n_active, batches, cfg))
        print(results[-1])
    return results


def two_hop_probes(world, people):
    """(prompt, answer, relation, country, person): "{person} lives in {city}. The language {person}
    speaks is" -> the language of the city's country; template 0 of each two-hop relation."""
    from forge import toyworld
    out = []
    for person in people:
        home = world.lookup["person"][person]["home"]
        bridge = toyworld.TEMPLATES["home"][0].format(person=person, city=home)
        for relation in toyworld.TWO_HOP:
            answer = world.two_hop(person, relation)
            slot = toyworld.SLOT_RE.findall(toyworld.TEMPLATES[relation][0])[-1]
            prompt, answer = toyworld.split_prompt(toyworld.TEMPLATES[relation][0].format(person=person, **{slot: answer}), answer)
            out.append((bridge + " " + prompt, answer, relation, world.country_of(home), person))
    return out


def two_hop_study(cfg):
    """Toy world, two-hop prompts of held-out people ("Batris lives in Fafes. The language Batris speaks
    is" -> Zefekic, through Fafes -> Gregruia, never stated): does the answer's path go through a
    feature of the intermediate entity? A last-token feature is *selective* for the country if it
    fires on (rate same) − (rate other) >= 0.5 of the probes with the same relation: same = other
    people living in that country, other = people of other countries (world labels, 100 people).
    Per prompt: the feature influence share on the answer logit of selective features and of
    features on the city token; how many of them the pruned graph keeps; in the real model, the
    change of log p(answer) and of the answer's logit minus the mean logit of the other countries'
    answers when the 3 most influential selective features, or 3 other last-token ones, are ablated."""
    import graph
    from forge import toyworld
    device = cfg.device
    model, enc, world = GPT.from_pretrained().to(device), load_tokenizer(DEFAULT_MODEL), toyworld.load_world()
    t = CrossLayerTranscoder.from_pretrained(cfg.graph_clt).to(device)
    probes = two_hop_probes(world, [p["name"] for p in world.people])
    with torch.no_grad():  # last-token activations of every probe: (P, L, F)
        last = torch.stack([t.encode(model.run_with_acts(graph.encode_prompt(enc, p[0], model.config.n_ctx).to(device))[1]
                                     .mlp_in[0, -1:])[0] for p in probes]).cpu() > 0
    rows = []
    for prompt, answer, relation, country, person in two_hop_probes(world, world.heldout_people)[:cfg.graph_two_hop]:
        same = torch.tensor([p[2] == relation and p[3] == country and p[4] != person for p in probes])
        other = torch.tensor([p[2] == relation and p[3] != country for p in probes])
        if not same.any():
            continue  # nobody else lives in this country: selectivity is undefined
        selective = last[same].float().mean(0) - last[other].float().mean(0) >= 0.5  # (L, F)
        idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(device)
        city = torch.tensor([i + 1 for i, lab in enumerate(toyworld.label_tokens(prompt, enc, world)) if "role:bridge" in lab])
        rep = graph.local_replacement(model, t, idx)
        g = graph.attribute(model, t, rep, batch_size=cfg.graph_batch)
        fs, ls = g.slices().features, g.slices().logits
        ans = enc.encode(answer)[0]
        hit = (g.logit_ids.cpu() == ans).nonzero()[:, 0]
        if not len(hit):
            rows.append(dict(prompt=prompt, answer_in_logits=False))
            continue
        w = torch.zeros(len(g.adjacency), dtype=g.adjacency.dtype, device=g.adjacency.device)
        w[ls.start + hit[0]] = 1  # influence on the answer logit alone
        A_hat = graph.normalized(g.adjacency)
        infl = graph.influence(A_hat, w, normalize=False)[fs].cpu()
        l, p, f = g.feats.cpu().T
        is_last, at_city = p == idx.size(1) - 1, torch.isin(p, city)
        sel = is_last & selective[l, f]
        kept = graph.prune(g)[0][fs].cpu()  # the pruned graph's feature nodes
        rivals = torch.tensor(sorted({enc.encode(p[1])[0] for p in probes if p[2] == relation} - {ans}))
        ranked = infl.argsort(descending=True)
        dlogp, ddiff = [], []  # log p(answer); answer logit - mean logit of the other countries' answers
        for chosen in (ranked[sel[ranked]][:3], ranked[is_last[ranked] & ~sel[ranked]][:3]):
            ablate = [graph.Intervention(l, p, f, "ablate") for l, p, f in g.feats[chosen.to(g.feats.device)].tolist()]
            clean, new = (x[-1] for x in graph.intervene(model, t, idx, ablate))
            dlogp.append((new.log_softmax(-1)[ans] - clean.log_softmax(-1)[ans]).item())
            ddiff.append(((new[ans] - new[rivals].mean()) - (clean[ans] - clean[rivals].mean())).item())
        rows.append(dict(prompt=prompt, answer_in_logits=True, p_answer=g.logit_probs[hit[0]].item(),
                         replacement_score=graph.scores(g)[0], n_features=len(g.feats), n_selective=int(sel.sum()),
                         selective_share=(infl[sel].sum() / infl.sum()).item(),
                         city_token_share=(infl[at_city].sum() / infl.sum()).item(),
                         pruned_selective=int((kept & sel).sum()), pruned_city_token=int((kept & at_city).sum()),
                         pruned_features=int(kept.sum()),
                         dlogp_ablate_selective3=dlogp[0], dlogp_ablate_other_last3=dlogp[1],
                         ddiff_ablate_selective3=ddiff[0], ddiff_ablate_other_last3=ddiff[1]))
        print(rows[-1])
    return rows


# -----------------------------------------------------------------------------
# interp


@dataclass
class InterpBench(Bench):
    """autointerp: both passes over the cache vs one plain read"""
    interp_tokens: int = arg(200_000, 'tokens of the random-CLT cache (tiny shape)')
    interp_chunk: int = arg(4096, 'interp.py --chunk-size')


def random_interp_setup(cfg):
    """A random model of the tiny shape, a cache of it and a random CLT whose thresholds are each
    feature's 97th percentile pre-activation (density ~3%, like a trained CLT's)."""
    model_dir = random_model_dir(os.path.join(cfg.out, "interp_model"), 4, 128, 4, 128, 4096)
    corpus = synthetic_corpus(os.path.join(cfg.out, "corpus.txt"), 4000)
    cache_dir, clt_dir = os.path.join(cfg.out, "interp_cache"), os.path.join(cfg.out, "interp_clt")
    cache.build_cache(cache.CacheConfig(model=model_dir, corpus=corpus, tokens=cfg.interp_tokens, ctx=64,
                                        device=cfg.device, out=cache_dir, heldout=0.02, overwrite=True))
    c = CrossLayerTranscoder(CLTConfig(n_layers=4, d_model=128, n_features=1024, model=model_dir))
    with torch.no_grad():
        pre = c.pre_acts(cache.ActivationCache(cache_dir).read(0, 4096)[0])  # (N, L, F)
        c.log_threshold.copy_(pre.quantile(0.97, dim=0).clamp_min(1e-3).log())
    c.save_pretrained(clt_dir)
    return model_dir, clt_dir, cache_dir


def bench_interp(cfg):
    """interp.py's two passes (train + held-out, with explanations) against one plain in-order read."""
    import interp
    trained = os.path.join("runs", "clt"), os.path.join("runs", "cache")
    if all(os.path.exists(os.path.join(p, f)) for p, f in zip(trained, ("config.json", "manifest.json"))):
        name, (clt_dir, cache_dir), model_dir = "tiny, trained CLT", trained, ""
    else:
        print("note: runs/clt or runs/cache is missing: timing a random CLT on a random model of the tiny shape")
        name, (model_dir, clt_dir, cache_dir) = "tiny-shape, random CLT", random_interp_setup(cfg)
    icfg = interp.InterpConfig(model=model_dir, clt=clt_dir, cache=cache_dir, device=cfg.device,
                               chunk_size=cfg.interp_chunk, out=os.path.join(cfg.out, "interp"))
    model_dir, model, enc, c, ca = interp.load_inputs(icfg)
    reads = []
    for _ in range(3):  # the first warms the page cache
        t0 = time.perf_counter()
        for _ in ca.iter_chunks(icfg.chunk_size, split="all"):
            pass
        reads.append(time.perf_counter() - t0)
    sync(cfg.device)
    t0 = time.perf_counter()
    stats, *_ = interp.analyze(model, enc, c, ca, icfg)
    sync(cfg.device)
    t = time.perf_counter() - t0
    read = min(reads[1:])
    return [dict(setup=name, tokens=ca.n_tokens, features=stats.L * stats.F, chunk=icfg.chunk_size,
                 plain_read_s=read, interp_s=t, ratio=t / read, tok_per_s=ca.n_tokens / t)]


# -----------------------------------------------------------------------------
# CLT training and decoding


def clt_matmuls(B, L, d, F):
    """The matmul shapes (m, k, n) of one CLT training step: per layer the encoder forward and its
    weight gradient (mlp_in needs no gradient), the decoder forward, its weight and input gradients."""
    shapes = []
    for l in range(L):
        w = (L - l) * d  # layer l's features write to L - l layers
        shapes += [(B, d, F), (d, B, F), (B, F, w), (F, B, w), (B, w, F)]
    return shapes


def median_seconds(fn, device, reps):
    fn()  # warm-up (allocator, autocast caches, lazy init)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


def step_fixture(L, d, F, B, activation, device, tp=None):
    """A CLT (or this rank's TP shard), its optimizer, a fixed batch and train.py's step on them."""
    import train
    mesh = tp or Mesh()
    cfg = train.TrainConfig(activation=activation, features=F, k=16, steps=10 ** 6)
    model = CrossLayerTranscoder(CLTConfig(L, d, F, activation, k=16), 0, mesh)
    model = model.to(device).train()
    opt = train.optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randn(B, L, d, generator=g).to(device) for _ in range(2)]
    state = dict(step=0, since_fired=torch.zeros(L, F, dtype=torch.long, device=device),
                 first_bad=torch.tensor(-1, device=device))

    def step():  # a step between log steps: nothing read back to the host
        train.train_step(cfg, model, opt, batch, state, mesh, torch.device(device), sync=False)

    return model, opt, step


def step_vs_matmul(name, L, d, F, B, activation, device, reps):
    """One optimizer step of train.py on a fixed batch, as a FLOP rate, over the FLOP rate of plain
    torch.matmul at the step's own shapes and dtype, timed in the same run."""
    _, _, step = step_fixture(L, d, F, B, activation, device)
    t_step = median_seconds(step, device, reps)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32  # what autocast gives the step
    shapes = clt_matmuls(B, L, d, F)
    mats = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
            for m, k, n in shapes]
    t_mm = median_seconds(lambda: [a @ b for a, b in mats], device, reps)
    tflops = sum(2 * m * k * n for m, k, n in shapes) / 1e12
    return dict(bench=f"{activation} train step", shape=f"{name}: L{L} d{d} F{F} B{B}", ms=1e3 * t_step,
                baseline="matmul, same shapes", baseline_ms=1e3 * t_mm, ratio=t_mm / t_step,
                detail=f"{tflops / t_step:.3g} vs {tflops / t_mm:.3g} TFLOP/s")


def sparse_vs_dense_decode(L, d, F, B, density, device, reps):
    """decode (dense, cost ∝ F) against decode_sparse from a sparse COO tensor and from dense acts."""
    model = CrossLayerTranscoder(CLTConfig(L, d, F, "relu"), 0).to(device).eval()
    g = torch.Generator().manual_seed(0)
    acts = (torch.rand(B, L, F, generator=g) * (torch.rand(B, L, F, generator=g) < density)).to(device)
    coo = acts.to_sparse()
    shape = f"L{L} d{d} F{F} B{B}, {density:.0%} active"
    with torch.no_grad():
        torch.testing.assert_close(model.decode(coo, sparse=True), model.decode(acts), atol=1e-4, rtol=1e-4)
        t_dense = median_seconds(lambda: model.decode(acts), device, reps)
        rows = []
        for what, x in (("decode_sparse (COO acts)", coo), ("decode_sparse (dense acts)", acts)):
            t = median_seconds(lambda: model.decode(x, sparse=True), device, reps)
            rows.append(dict(bench=what, shape=shape, ms=1e3 * t, baseline="decode (dense)",
                             baseline_ms=1e3 * t_dense, ratio=t_dense / t, detail=f"{int(acts.count_nonzero())} nonzeros"))
    return rows


@dataclass
class TrainBench(Bench):
    """CLT training step vs matmul FLOP rate; sparse vs dense decode"""
    reps: int = arg(5, 'timed repetitions (the median is reported)')
    decode_features: int = arg(16384, 'F of the decode benchmark')
    density: float = arg(0.01, 'fraction of active features in the decode benchmark')


def bench_train(cfg):
    """Step FLOP rate over matmul's at the same shapes; sparse over dense decode (ratios > 1 = faster)."""
    cuda = str(cfg.device).startswith("cuda")
    shapes = [("tiny", 4, 128, 1024, 1024)]  # the default CLT of models/tiny (F = 8 d)
    if not cfg.quick:
        shapes += [("gpt2-small", 12, 768, 6144, 4096)] if cuda else [("gpt2-small", 12, 768, 3072, 512)]
    rows = [step_vs_matmul(*s, a, cfg.device, cfg.reps) for s in shapes for a in ("jumprelu", "topk")]
    rows += sparse_vs_dense_decode(4, 128, cfg.decode_features, 256, cfg.density, cfg.device, cfg.reps)
    if cuda and not cfg.quick:
        rows += sparse_vs_dense_decode(12, 768, cfg.decode_features, 256, cfg.density, cfg.device, cfg.reps)
    return rows


# -----------------------------------------------------------------------------
# tensor and data parallelism


def clt_params_per_rank(L, d, F, T):
    """Parameters on one TP rank: F/T features' encoders, b_enc, thresholds, decoders; b_dec replicated."""
    f = F // T
    return L * d * f + 2 * L * f + f * d * L * (L + 1) // 2 + L * d


def per_step_traffic(L, d, F, B, T, D, activation="jumprelu", k=16):
    """Per rank and step: bytes all-reduced over TP and over DP, bytes all-gathered over TP, bytes of the
    one bookkeeping all-reduce over the mesh, matmul FLOPs. TP: the fp32 partial reconstruction (B/D, L, d),
    twice with AuxK; TopK gathers k candidates per token and layer, BatchTopK (B/D)·k per layer. DP: the
    fp32 gradient of this rank's shard. Bookkeeping (train.reduce_step): float64 metric sums (~L·d) and
    which of all L·F features fired."""
    b = B // D
    topk = activation in ("topk", "batchtopk")
    tp_reduce = (4 * b * L * d * (2 if topk else 1)) if T > 1 else 0
    tp_gather = (4 * b * L * k * T) if topk and T > 1 else 0
    dp_reduce = 4 * clt_params_per_rank(L, d, F, T) if D > 1 else 0
    bookkeeping = 8 * (L * F + L * d + 5 * L + 8) if T * D > 1 else 0
    flops = sum(2 * m * kk * n for m, kk, n in clt_matmuls(b, L, d, F // T))
    return tp_reduce, tp_gather, dp_reduce, bookkeeping, flops


def _dist_worker(rank, world, port, shape, reps, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ddp, _, _, _, device = compute_init("cpu")
    mesh = make_mesh(ddp, world, world, device)
    _, _, step = step_fixture(*shape, "jumprelu", "cpu", mesh)
    t = median_seconds(step, "cpu", reps)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(t, f)
    torch.distributed.destroy_process_group()


def measured_step_seconds(T, shape, reps, out_dir):
    """Median step time with T TP ranks, each a process with one thread (gloo on CPU)."""
    out = os.path.join(out_dir, f"dist_step_T{T}.json")
    torch.multiprocessing.spawn(_dist_worker, args=(T, 29500 + random.randint(0, 5000), shape, reps, out), nprocs=T)
    with open(out) as f:
        return json.load(f)


@dataclass
class DistBench(Bench):
    """TP/DP: memory per rank, step time T=2/T=1, bytes per FLOP, 8 GPUs on paper"""
    reps: int = arg(5, 'timed repetitions (the median is reported)')
    busbw: float = arg(300e9, 'paper model: all-reduce bus bandwidth per GPU, bytes/s')
    tflops: float = arg(400.0, 'paper model: sustained bf16 TFLOP/s per GPU')


def dist_row(setting, mb=None, ms=None, comm_mb=None, flop_per_byte=None, note=""):
    """One table row; a figure that does not apply to the setting is "-"."""
    def fmt(x, spec=".4g"):
        return "-" if x is None else format(x, spec)
    return dict(setting=setting, MB_per_rank=fmt(mb), step_ms=fmt(ms), comm_MB_per_step=fmt(comm_mb),
                FLOP_per_comm_byte=fmt(flop_per_byte, ".0f"), note=note)


def bench_dist(cfg):
    """Memory per rank vs T (real shards), CPU step time T=2 over T=1, bytes communicated per FLOP,
    and 8 GPUs on paper for GPT-2 small and xl CLTs. MB = fp32 parameters + gradients + Adam moments."""
    rows = []
    L, d, F, B = 4, 128, 1024, 1024  # the default CLT of models/tiny
    n1 = clt_params_per_rank(L, d, F, 1)
    for T in (1, 2, 4):
        shard = CrossLayerTranscoder(CLTConfig(L, d, F), 0, Mesh(tp=T, tp_rank=0))
        n = sum(p.numel() for p in shard.parameters())
        assert n == clt_params_per_rank(L, d, F, T), (n, clt_params_per_rank(L, d, F, T))
        rows.append(dist_row(f"tiny CLT L{L} d{d} F{F}, T={T} (measured shard)", mb=16 * n / 1e6,
                             note=f"{n / n1:.3f} of T=1"))
    t1, t2 = (measured_step_seconds(T, (L, d, F, B), cfg.reps, cfg.out) for T in (1, 2))
    for T, t in ((1, t1), (2, t2)):
        tp_reduce, _, _, _, flops = per_step_traffic(L, d, F, B, T, 1)
        rows.append(dist_row(f"tiny CLT, B{B}, T={T}, CPU gloo, 1 thread/rank", ms=1e3 * t, comm_mb=tp_reduce / 1e6,
                             flop_per_byte=flops / tp_reduce if tp_reduce else None,
                             note=f"step time {t / t1:.2f} of T=1" if T > 1 else ""))
    for name, (L, d, F, B) in (("gpt2-small", (12, 768, 32768, 4096)), ("gpt2-xl", (48, 1600, 8192, 4096))):
        for T, D in ((1, 8), (2, 4), (4, 2), (8, 1)):
            rows.append(paper_row(name, L, d, F, B, T, D, cfg))
    return rows


def paper_row(name, L, d, F, B, T, D, cfg):
    """One 8-GPU mesh on paper: memory per GPU, and compute and ring all-reduce time per step."""
    tp_reduce, _, dp_reduce, bookkeeping, flops = per_step_traffic(L, d, F, B, T, D)

    def ring(n, nbytes):  # seconds of a ring all-reduce of nbytes over n GPUs
        return 2 * (n - 1) / n * nbytes / cfg.busbw

    t_flops = flops / (cfg.tflops * 1e12)
    t_comm = ring(T, tp_reduce) + ring(D, dp_reduce) + ring(T * D, bookkeeping)
    comm = tp_reduce + dp_reduce + bookkeeping
    return dist_row(f"{name} CLT L{L} d{d} F{F}, B{B}: tp{T} x dp{D} (paper)",
                    mb=16 * clt_params_per_rank(L, d, F, T) / 1e6, ms=1e3 * (t_flops + t_comm),
                    comm_mb=comm / 1e6, flop_per_byte=flops / comm,
                    note=f"compute {1e3 * t_flops:.1f} ms + comm {1e3 * t_comm:.1f} ms")


# -----------------------------------------------------------------------------
# compactness: cross-layer vs per-layer transcoders, and how compact their graphs are


TRANSCODERS = {"clt": dict(decoder="cross-layer", skip=False), "plt": dict(decoder="per-layer", skip=False),
               "plt-skip": dict(decoder="per-layer", skip=True)}


@dataclass
class CompactnessBench(Bench):
    """CLT vs PLT on models/tiny: how compact their attribution graphs are"""
    compactness_tokens: int = arg(200_000, 'tokens of the models/tiny cache')
    compactness_features: int = arg(512, 'features per layer of every transcoder')
    compactness_k: int = arg(8, 'TopK k of every transcoder: the matched mean L0')
    compactness_steps: int = arg(400, 'training steps of each transcoder')
    compactness_batch: int = arg(1024, 'tokens per training step')
    compactness_per_family: int = arg(6, 'prompts of each toyworld.eval_prompts kind')
    compactness_kinds: str = arg("clt,plt", 'transcoders to compare: clt, plt and/or plt-skip (bench.TRANSCODERS)')
    compactness_figure: str = arg(os.path.join("assets", "compactness.png"), 'the figure')


def train_transcoders(cfg, root):
    """One cache of models/tiny, then each transcoder trained on it with the same recipe: TopK with
    the same k (so the mean L0 is matched by construction), the same features per layer, seed, steps.
    -> {name: (transcoder, train.py's last metrics)}."""
    import train
    path = os.path.join(root, "cache")
    cache.build_cache(cache.CacheConfig(model=DEFAULT_MODEL, corpus="toy", tokens=cfg.compactness_tokens,
                                        out=path, device=cfg.device))
    out = {}
    for name in cfg.compactness_kinds.split(","):
        c = train.TrainConfig(cache=path, out=os.path.join(root, name), features=cfg.compactness_features,
                              activation="topk", k=cfg.compactness_k, steps=cfg.compactness_steps,
                              batch_size=cfg.compactness_batch, lr=3e-3, warmup=min(50, cfg.compactness_steps // 4),
                              eval_every=cfg.compactness_steps, eval_contexts=32, ckpt_every=-1, log_every=50,
                              overwrite=True, device=cfg.device, **TRANSCODERS[name])
        m = train.train(c)
        out[name] = (CrossLayerTranscoder.from_pretrained(c.out).to(cfg.device).eval(), m)
    return out


def family_prompts(world, per_family):
    """{kind: [(prompt, answer)]}: the first per_family held-out prompts of every kind of toyworld.eval_prompts,
    in a fixed shuffled order (seed 0) so each kind mixes relations, people and templates."""
    from forge import toyworld
    out = {}
    for prompt, answer, kind in toyworld.eval_prompts(world):
        out.setdefault(kind, []).append((prompt, answer))
    rng = random.Random(0)
    return {kind: rng.sample(ps, min(per_family, len(ps))) for kind, ps in out.items()}


def country_features(model, enc, t, world, device):
    """{country: (L, F) bool}: the last-token features selective for each country, the planted latent
    of the two-hop prompts. On two-hop probes of every person (with the bridge sentence and without),
    a feature is selective for country c if it fires on (rate on people of c) − (rate on people of
    other countries) >= 0.5 of the probes."""
    import graph
    probes = []
    for prompt, _, _, country, _ in two_hop_probes(world, [p["name"] for p in world.people]):
        probes += [(prompt, country), (prompt[prompt.index(". ") + 2:], country)]  # with and without the bridge
    last = []
    with torch.no_grad():
        for prompt, _ in probes:
            idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(device)
            last.append(t.encode(model.run_with_acts(idx, logits=False)[1].mlp_in[0, -1:])[0].cpu() > 0)  # (L, F)
    last = torch.stack(last).float()  # (P, L, F)
    countries = sorted({c for _, c in probes})
    which = torch.tensor([countries.index(c) for _, c in probes])
    return {c: last[which == i].mean(0) - last[which != i].mean(0) >= 0.5 for i, c in enumerate(countries)}


def path_length(A_hat, w, inputs):
    """The influence-weighted mean number of edges on the paths from the input nodes to the logits:
    the mass of w Â^k that reaches the inputs, over k."""
    cur, total, weighted, k = w @ A_hat, 0.0, 0.0, 1
    while cur.any():
        m = cur[inputs].sum().item()
        total, weighted = total + m, weighted + k * m
        cur, k = cur @ A_hat, k + 1
    return weighted / max(total, 1e-30)


def graph_compactness(model, t, rep, selective):
    """The compactness numbers of one prompt's graph under transcoder t (see bench_compactness)."""
    import graph
    g = graph.attribute(model, t, rep, batch_size=256)
    s = g.slices()
    A_hat, w = graph.normalized(g.adjacency), g.logit_weights()
    infl = graph.influence(A_hat, w, normalize=False)
    replacement, completeness = graph.scores(g)
    nodes, edges, _, _ = graph.prune(g)
    inner = infl[:s.tokens.start].sort(descending=True).values  # features and errors
    cum = inner.cumsum(0) / inner.sum().clamp(min=1e-30)
    row = dict(active=len(g.feats), replacement=replacement, completeness=completeness,
               pruned_nodes=int(nodes[:s.tokens.start].sum()), pruned_edges=int(edges.sum()),
               nodes_to_80=int(torch.searchsorted(cum, 0.8)) + 1,
               path_length=path_length(A_hat, w, torch.arange(s.tokens.start, s.tokens.stop)))
    if selective is not None:
        l, _, f = g.feats.cpu().T
        last = (g.feats[:, 1] == len(g.tokens) - 1).cpu()
        feat = infl[s.features].cpu()
        row["country_share"] = (feat[last & selective[l, f]].sum() / feat.sum().clamp(min=1e-30)).item()
    return row


def compactness_figure(rows, path, kinds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = ["pruned_nodes", "pruned_edges", "nodes_to_80", "path_length", "replacement", "completeness"]
    families = [r["family"] for r in rows if r["transcoder"] == kinds[0]]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    width = 0.8 / len(kinds)
    for ax, metric in zip(axes.flat, metrics):
        for i, kind in enumerate(kinds):
            values = [next(r[metric] for r in rows if r["transcoder"] == kind and r["family"] == fam) for fam in families]
            ax.bar(np.arange(len(families)) + i * width, values, width, label=kind)
        ax.set_title(metric.replace("_", " "))
        ax.set_xticks(np.arange(len(families)) + width * (len(kinds) - 1) / 2)
        ax.set_xticklabels(families, rotation=60, ha="right", fontsize=8)
    axes.flat[0].legend()
    fig.suptitle("models/tiny: graphs of a CLT vs a PLT (same features per layer, TopK: same L0), per prompt family")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def bench_compactness(cfg):
    """Do cross-layer transcoders give more compact attribution graphs than per-layer ones? On
    models/tiny: a CLT and a PLT (and a PLT with a skip connection) trained on one cache with the
    same features per layer and TopK k (matched L0), then the graph of every prompt, per family:
    replacement and completeness scores, feature + error nodes and edges of the pruned graph,
    feature + error nodes needed for 80 % of the logit influence, the influence-weighted mean path
    length from the token embeddings to the logits (in edges), and for two-hop prompts the share of
    the feature influence carried by the last-token features selective for the latent country."""
    import graph
    from forge import toyworld
    root = os.path.join(cfg.out, "compactness")
    model = GPT.from_pretrained().to(cfg.device).eval()
    enc, world = load_tokenizer(DEFAULT_MODEL), toyworld.load_world()
    t0 = time.time()
    print("phase 1: the cache and the transcoders")
    trained = train_transcoders(cfg, root)
    print(f"phase 2: per-country selective features ({time.time() - t0:.0f} s so far)")
    selective = {name: country_features(model, enc, t, world, cfg.device) for name, (t, _) in trained.items()}
    families = family_prompts(world, cfg.compactness_per_family)
    print(f"phase 3: {sum(map(len, families.values()))} prompts x {len(trained)} graphs ({time.time() - t0:.0f} s so far)")
    per_prompt = []
    for kind, prompts in families.items():
        for prompt, answer in prompts:
            idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(cfg.device)
            country = world.country_of(answer.strip()) if kind.startswith("two_hop") else None
            for name, (t, _) in trained.items():
                rep = graph.local_replacement(model, t, idx)
                sel = selective[name].get(country) if country else None
                per_prompt.append(dict(transcoder=name, family=kind, prompt=prompt,
                                       **graph_compactness(model, t, rep, sel)))
    write_json(os.path.join(root, "per_prompt.json"), per_prompt)
    rows = []
    for name, (_, m) in trained.items():
        for fam in list(families) + ["all"]:
            mine = [r for r in per_prompt if r["transcoder"] == name and fam in ("all", r["family"])]
            row = dict(transcoder=name, family=fam, prompts=len(mine), l0="-", fvu="-", recovered="-")
            for key in ("active", "replacement", "completeness", "pruned_nodes", "pruned_edges", "nodes_to_80",
                        "path_length", "country_share"):
                vals = [r[key] for r in mine if key in r]
                row[key] = round(sum(vals) / len(vals), 3) if vals else "-"
            if fam == "all":  # the training run's numbers, on its held-out contexts
                row.update(l0=round(sum(m["eval"]["l0"]) / len(m["eval"]["l0"]), 2),
                           fvu=round(sum(m["eval"]["fvu"]) / len(m["eval"]["fvu"]), 4),
                           recovered=round(m["eval"]["recovered"], 4))
            rows.append(row)
    compactness_figure([r for r in rows if r["family"] != "all"], cfg.compactness_figure, list(trained))
    print(f"done in {time.time() - t0:.0f} s; figure: {cfg.compactness_figure}")
    return rows


# -----------------------------------------------------------------------------
# scale: the whole pipeline at GPT-2-small shape
#
# Each stage runs in a fresh process, so the peak RSS it reports (VmHWM) is its own. The model is a
# random GPT-2 small made and saved by transformers (its init, its save_pretrained), with a
# byte-level tokenizer; the corpus is synthetic_corpus's random words. Memory per TP rank is
# measured with gloo, one process per rank, and computed from clt_params_per_rank: fp32 Adam holds
# 16 bytes per parameter (weight, gradient, two moments).

SCALE_PROMPT = "the old market by the river bridge"  # 35 byte tokens + BOS for the capped graph


@dataclass
class ScaleBench(Bench):
    """the pipeline at GPT-2-small shape on CPU; memory at F = 32 d"""
    scale_tokens: int = arg(8192, 'tokens in the GPT-2-small-shape cache')
    scale_features: int = arg(3072, 'CLT features per layer: training, interp, graph')
    scale_batch: int = arg(512, 'tokens per training step')
    scale_reps: int = arg(3, 'timed training steps (the median is reported)')
    scale_max_features: int = arg(256, 'graph.py --max-features of the capped graph')
    scale_limit_depth: int = arg(2, 'layers of the F = 32 d CLTs measured per rank')
    scale_limit_tp: str = arg("1,2,4", 'TP sizes measured at that depth (gloo, a process each)')


def fresh_process(fn, *args, timeout=None):
    """fn(*args) in a new process (spawned: nothing inherited), which returns fn's result. With a
    timeout (seconds) the process is killed once it runs past it, even inside a CUDA or NCCL wait, and
    concurrent.futures.process.BrokenProcessPool is raised here."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        if timeout is None:
            return pool.submit(fn, *args).result()
        return pool.submit(alarmed, max(1, math.ceil(timeout)), fn, *args).result()


def alarmed(seconds, fn, *args):
    """fn(*args), with SIGALRM due in `seconds`: its default action ends the process at once (no Python
    handler has to run, so a C call that never returns is no refuge)."""
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)


def gib(key="VmRSS"):
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), GiB."""
    return proc_status_kb(key) / 2**20


def set_threads(threads):
    if threads:
        torch.set_num_threads(threads)


def cuda_peak_gib(device):
    """The CUDA allocator's peak in this process so far, GiB (in a fresh process: the stage's own); None on a CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if str(device).startswith("cuda") else None


def hf_gpt2_small(path, seed=0):
    """A random GPT-2 small, initialized and saved by transformers, plus a byte-level tokenizer."""
    from forge import toyworld
    try:
        import transformers
    except ImportError as e:
        raise ValueError("bench.py scale makes its model with transformers: pip install transformers") from e
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(path)
    toyworld.save_tokenizer(path, [])
    return path


def scale_cache(model_dir, corpus, out, tokens, threads, device="cpu"):
    """cache.py with its defaults (int8, 64-token contexts, 64 per forward): the rate of the corpus ->
    shards loop, and the peak RSS of the whole build (model load, fingerprint, channel scales, writer);
    on CUDA also the allocator's peak (cuda_peak)."""
    set_threads(threads)
    cfg = cache.CacheConfig(model=model_dir, corpus=corpus, tokens=tokens, out=out, device=device, overwrite=True)
    m = cache.build_cache(cfg)
    c = m["model_config"]
    acts = 2 * cfg.batch_size * cfg.ctx * c["n_layer"] * c["n_embd"] * 4  # one forward's mlp_in + mlp_out, fp32
    model = 4 * ((c["vocab_size"] + c["n_ctx"]) * c["n_embd"] + c["n_layer"] * 12 * c["n_embd"] ** 2)
    manifest = os.path.getsize(os.path.join(out, cache.MANIFEST))
    return dict(tokens=m["n_tokens"], seconds=m["seconds"], peak=gib("VmHWM"), model=model / 2**30, acts=acts / 2**30,
                shards=len(m["shards"]), manifest=manifest, cuda_peak=cuda_peak_gib(device))


def scale_train(shape, reps, threads):
    """bench.py train's step-vs-matmul measurement at one shape."""
    set_threads(threads)
    return step_vs_matmul("gpt2-small", *shape, "jumprelu", "cpu", reps)


def _scale_rank(rank, world, port, shape, steps, out):
    """One rank of a world-way TP mesh (gloo): its parameters and its peak RSS over `steps` training
    steps above its RSS before the CLT existed (weights, gradients, Adam moments, activations)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ddp, _, _, _, device = compute_init("cpu")
    mesh = make_mesh(ddp, world, world, device)
    base = gib()
    model, _, step = step_fixture(*shape, "jumprelu", "cpu", mesh)
    for _ in range(steps):
        step()
    result = dict(params=sum(p.numel() for p in model.parameters()), above=gib("VmHWM") - base)
    with open(out.format(rank=rank), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def rank_memory(shape, T, steps, out_dir):
    """(max over ranks of the peak GiB above the start, parameters per rank) of a T-way TP mesh."""
    out = os.path.join(out_dir, f"scale_T{T}_rank{{rank}}.json")
    torch.multiprocessing.spawn(_scale_rank, args=(T, 29500 + random.randint(0, 5000), shape, steps, out), nprocs=T)
    ranks = []
    for r in range(T):
        with open(out.format(rank=r)) as f:
            ranks.append(json.load(f))
    return max(r["above"] for r in ranks), ranks[0]["params"]


def random_clt(model_dir, cache_dir, clt_dir, F, density=0.01):
    """A random CLT of the model, thresholds at each feature's (1 - density) quantile of its
    pre-activations on the cache's first rows: each feature fires on ~density of the tokens."""
    ca = cache.ActivationCache(cache_dir)
    model = GPT.from_pretrained(model_dir)
    config = CLTConfig(ca.n_layers, ca.d_model, F, model=model_dir, model_sha256=model.fingerprint())
    c = CrossLayerTranscoder(config)
    with torch.no_grad():
        pre = c.pre_acts(ca.read(0, min(4096, ca.n_tokens))[0])  # (N, L, F)
        # kthvalue, not quantile: torch.quantile refuses inputs over 2^24 elements
        kth = pre.kthvalue(max(1, int(len(pre) * (1 - density))), dim=0).values  # (L, F)
        c.log_threshold.copy_(kth.clamp_min(1e-3).log())
    c.save_pretrained(clt_dir)


def scale_interp(model_dir, cache_dir, clt_dir, out, F, threads, device="cpu"):
    """interp.py's two passes (train, held-out) over the cache with a random CLT of F per layer."""
    import interp
    set_threads(threads)
    random_clt(model_dir, cache_dir, clt_dir, F)
    cfg = interp.InterpConfig(model=model_dir, clt=clt_dir, cache=cache_dir, device=device, out=out)
    _, model, enc, c, ca = interp.load_inputs(cfg)
    base = gib()
    t0 = time.perf_counter()
    interp.analyze(model, enc, c, ca, cfg)
    sync(device)
    return dict(seconds=time.perf_counter() - t0, tokens=ca.n_tokens, features=c.config.n_layers * F,
                above=gib("VmHWM") - base, cuda_peak=cuda_peak_gib(device))


def scale_graph(model_dir, clt_dir, max_features, threads, device="cpu"):
    """graph.py on SCALE_PROMPT with --max-features: replacement model, capped attribution, pruning."""
    import graph
    set_threads(threads)
    model = GPT.from_pretrained(model_dir).to(device)
    c = CrossLayerTranscoder.from_pretrained(clt_dir).to(device)
    idx = graph.encode_prompt(load_tokenizer(model_dir), SCALE_PROMPT, model.config.n_ctx).to(device)
    base = gib()
    t0 = time.perf_counter()
    rep = graph.local_replacement(model, c, idx)
    g = graph.attribute(model, c, rep, SCALE_PROMPT, max_features=max_features)
    graph.prune(g)
    sync(device)
    return dict(seconds=time.perf_counter() - t0, tokens=idx.size(1), n_active=len(rep.feats), kept=len(g.feats),
                above=gib("VmHWM") - base, cuda_peak=cuda_peak_gib(device))


def memory_limit_rows(L, d, F, Ts, depth, measured):
    """Memory per TP rank of an F-per-layer CLT, computed: fp32 Adam (16 bytes per parameter: what
    train.py keeps, bf16 autocast or not) and what bf16 storage would save; then `measured`
    {T: (GiB, params per rank)} of the same CLT at `depth` layers, against the same formula."""
    rows = []
    for T in Ts:
        n = clt_params_per_rank(L, d, F, T)
        note = (f"computed: {n / 1e9:.3g}B params/rank x 16 B; bf16 weights + grads, fp32 moments (12 B): "
                f"{12 * n / 2**30:.3g} GiB; all bf16 (8 B): {8 * n / 2**30:.3g} GiB")
        rows.append(dict(stage="memory limit, F = 32 d", setting=f"L{L} d{d} F{F}, TP={T}", time_s="-", rate="-",
                         GiB_per_rank=16 * n / 2**30, note=note))
    for T, (above, n) in measured.items():
        rows.append(dict(stage="memory limit, F = 32 d", setting=f"L{depth} d{d} F{F}, TP={T}, gloo", time_s="-",
                         rate="-", GiB_per_rank=above,
                         note=f"measured; {n / 1e6:.1f}M params/rank x 16 B = {16 * n / 2**30:.3g} GiB: "
                              f"{above / (16 * n / 2**30):.2f}x of it (the rest: activations, gloo, allocator)"))
    return rows


def bench_scale(cfg):
    """Cache build, training step, memory per TP rank, interp and a capped graph at GPT-2-small shape,
    then the memory limit of an F = 32 d CLT. One markdown table; see the section comment."""
    out = os.path.join(cfg.out, "scale")
    os.makedirs(out, exist_ok=True)
    load0 = os.getloadavg()[0]
    model_dir = fresh_process(hf_gpt2_small, os.path.join(out, "gpt2_small_random"))
    corpus = synthetic_corpus(os.path.join(out, "corpus.txt"), 4000)
    cache_dir = os.path.join(out, "cache")
    L, d, F, B = 12, 768, cfg.scale_features, cfg.scale_batch
    rows = []

    def row(stage, setting, time_s, rate, GiB, note=""):
        rows.append(dict(stage=stage, setting=setting, time_s=time_s, rate=rate, GiB_per_rank=GiB, note=note))
        print(rows[-1])

    r = fresh_process(scale_cache, model_dir, corpus, cache_dir, cfg.scale_tokens, cfg.threads)
    row("cache build (int8)", f"{r['tokens']} tokens, 64 x 64 per forward", r["seconds"],
        f"{r['tokens'] / r['seconds']:.0f} tok/s", r["peak"],
        f"peak RSS of the build; model {r['model']:.2f} GiB + one batch's mlp_in/out {r['acts']:.2f} GiB; "
        f"{r['shards']} shards, manifest {r['manifest'] / 1e3:.0f} kB")
    r = fresh_process(scale_train, (L, d, F, B), cfg.scale_reps, cfg.threads)
    row("CLT train step (jumprelu)", r["shape"], r["ms"] / 1e3, "step vs matmul: " + r["detail"],
        "-", f"{r['ratio']:.0%} of the same-run matmul FLOP rate at the step's shapes")
    for T in (1, 2):
        above, n = rank_memory((L, d, F, B), T, 1, out)
        row("CLT memory per rank", f"L{L} d{d} F{F} B{B}, TP={T}, gloo", "-", "-", above,
            f"measured; {n / 1e6:.1f}M params/rank, fp32 Adam 16 B each = {16 * n / 2**30:.2f} GiB")
    n = clt_params_per_rank(L, d, F, 4)
    row("CLT memory per rank", f"L{L} d{d} F{F}, TP=4", "-", "-", 16 * n / 2**30,
        f"on paper: {n / 1e6:.1f}M params/rank x 16 B")
    r = fresh_process(scale_interp, model_dir, cache_dir, os.path.join(out, "clt"), os.path.join(out, "interp"), F,
                      cfg.threads)
    row("interp (both passes)", f"{r['tokens']} tokens, {r['features']} features", r["seconds"],
        f"{r['tokens'] / r['seconds']:.0f} tok/s", r["above"], "random CLT, ~1% density; GiB above the loaded inputs")
    r = fresh_process(scale_graph, model_dir, os.path.join(out, "clt"), cfg.scale_max_features, cfg.threads)
    row("graph (capped)", f"{r['tokens']} tokens, {r['n_active']} active, --max-features {cfg.scale_max_features}",
        r["seconds"], f"{r['kept']} features kept", r["above"], "replacement + attribution + pruning")
    F_limit = 32 * d
    measured = {}
    for T in (int(t) for t in cfg.scale_limit_tp.split(",")):
        measured[T] = rank_memory((cfg.scale_limit_depth, d, F_limit, B), T, 1, out)
    rows += memory_limit_rows(L, d, F_limit, (1, 2, 4, 8), cfg.scale_limit_depth, measured)
    row("machine", f"{os.cpu_count()} cores, torch threads {cfg.threads or torch.get_num_threads()}", "-", "-", "-",
        f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    shutil.rmtree(out)
    return rows


# -----------------------------------------------------------------------------
# gpu: the GPU path in one prepared run
#
# What it measures is in the module docstring. How it runs: every part in a fresh process (spawned),
# killed at the end of the budget, so a part that fails (a CUDA error spoils its process) or hangs (an
# NCCL wait) is one row with its error and the parts after it still run. Parts that need an earlier
# one's output (the cache, the bf16 curve) fail or say so in their own rows when it is missing.

GPT2_SMALL_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, n_ctx=1024, vocab_size=50257)
TINY_SHAPE = dict(n_layer=4, n_head=4, n_embd=128, n_ctx=128, vocab_size=4096)  # models/tiny's, larger vocab
QUICK_GPU = dict(gpu_features=256, gpu_batch=256, gpu_steps=20, gpu_torchrun_steps=5,
                 gpu_max_features=64)  # --quick: the tiny shape and these sizes, where not given (tokens: / 4)
PART_MIN_S = 60  # no part starts with less of the budget left

# Dense bf16 tensor-core peaks in TFLOP/s, first match in torch.cuda.get_device_name(): NVIDIA's
# datasheets give twice these, "with sparsity" (H200 and H100 SXM: 1,979; H100 PCIe: 1,513; A100: 624).
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


@dataclass
class GpuBench(Bench):
    """the GPU path on one GPU in 8 minutes: cache, bf16 vs fp32 training, torchrun + NCCL, graph, interp"""
    gpu_tokens: int = arg(65_536, "tokens in the GPT-2-small-shape cache (--quick: a quarter, the tiny shape, QUICK_GPU's sizes)")
    gpu_features: int = arg(3072, 'CLT features per layer: training, graph, interp')
    gpu_batch: int = arg(4096, 'tokens per training step')
    gpu_steps: int = arg(200, 'training steps of the bf16 run and of the fp32 run')
    gpu_torchrun_steps: int = arg(20, "steps of the torchrun run, compared with the bf16 run's first steps")
    gpu_max_features: int = arg(256, 'graph.py --max-features of the capped graph')
    peak_tflops: float = arg(0.0, "the GPU's dense bf16 peak for MFU, TFLOP/s; 0 = PEAK_TFLOPS by GPU name (H200: 989)")
    budget_s: float = arg(480.0, 'wall-time budget: no part starts in its last 60 s, a running part is killed at its end')


def gpu_setup(path, shape, device):
    """What the parts run on (the device's name, torch, CUDA and NCCL versions, CPUs) and the random GPT-2
    they share, in `path` (gpu_model_dir)."""
    cuda = str(device).startswith("cuda")
    nccl = torch.cuda.nccl.version() if cuda else None  # a tuple in recent torch, an int before
    return dict(name=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
                cpus=os.cpu_count(), made=gpu_model_dir(path, shape))


def gpu_model_dir(path, shape):
    """A random GPT-2 of `shape` in the hub layout with a byte-level tokenizer, no download: made by
    transformers (as bench.py scale makes it), or by random_model_dir (GPT's init) where transformers
    is not installed or fails. -> which of the two made it, and why."""
    why = "transformers is not installed"
    if find_spec("transformers") is not None:
        try:  # a GPU session may be the only one: an init that is not what is measured must not end it
            hf_random_model_dir(path, **shape)
            return "transformers init"
        except Exception as e:
            why = f"transformers failed: {type(e).__name__}: {e}".splitlines()[0][:200]
            shutil.rmtree(path, ignore_errors=True)
    random_model_dir(path, shape["n_layer"], shape["n_embd"], shape["n_head"], shape["n_ctx"], shape["vocab_size"])
    return f"GPT init ({why})"


def gpu_train_config(cache_dir, out, cfg, autocast, stop_at=-1):
    """The training run every train part makes: every step logged, no evaluation, one checkpoint at the end."""
    import train
    return train.TrainConfig(cache=cache_dir, out=out, features=cfg.gpu_features, batch_size=cfg.gpu_batch,
                             steps=cfg.gpu_steps, eval_every=-1, log_every=1, ckpt_every=-1, autocast=autocast,
                             device=cfg.device, stop_at=stop_at, timeout_s=60, overwrite=True)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def gpu_train(cache_dir, out, cfg, autocast):
    """train.py in this process: -> the loss curve, the median step time after the first 10 steps, the
    peak memory (CUDA allocator's, else RSS), the last step's FVU and L0. The run's files are removed."""
    import train
    set_threads(cfg.threads)
    t0 = time.perf_counter()
    last = train.train(gpu_train_config(cache_dir, out, cfg, autocast))
    seconds = time.perf_counter() - t0
    rows = read_metrics(out)
    shutil.rmtree(out)  # a 3072-feature GPT-2-small CLT's checkpoint and export: 4 GB
    peak = cuda_peak_gib(cfg.device)
    return dict(loss=[r["loss"] for r in rows], ms=float(np.median([r["ms"] for r in rows[10:]])), seconds=seconds,
                peak=gib("VmHWM") if peak is None else peak, fvu=float(np.mean(last["fvu"])),
                l0=float(np.mean(last["l0"])))


def config_argv(config):
    """The command line that gives dataclass `config`: a flag per field that is not at its default."""
    argv = []
    for f in fields(config):
        value = getattr(config, f.name)
        flag = f.name.replace("_", "-")
        if value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_torchrun(cache_dir, out, cfg, deadline):
    """The bf16 run's first gpu_torchrun_steps under `torchrun --nproc_per_node=1` (NCCL on CUDA, gloo on a
    CPU), ended by --stop-at so the schedules match: -> its losses, wall seconds, the NCCL version its log
    names (NCCL_DEBUG=VERSION; None when NCCL never started). Killed with its workers before the deadline."""
    c = gpu_train_config(cache_dir, out, cfg, "always", stop_at=cfg.gpu_torchrun_steps)
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", os.path.join(here, "train.py"), *config_argv(c)]
    env = dict(os.environ, NCCL_DEBUG="VERSION")  # NCCL prints "NCCL version X" once it starts
    t0 = time.perf_counter()
    # its own session: on a timeout the launcher and its worker are killed together
    p = subprocess.Popen(cmd, cwd=here, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=max(1.0, deadline - time.time() - 5))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise TimeoutError(f"torchrun ran past the budget: killed after {time.perf_counter() - t0:.0f} s")
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"torchrun exited with {p.returncode}: " + " / ".join(log.strip().splitlines()[-3:]))
    nccl = [line.split("NCCL version", 1)[1].split()[0] for line in log.splitlines() if "NCCL version" in line]
    losses = [r["loss"] for r in read_metrics(out)]
    shutil.rmtree(out)
    return dict(loss=losses, seconds=seconds, nccl=nccl[0] if nccl else None)


def gpu_graph(model_dir, cache_dir, clt_dir, cfg):
    """scale_graph on the device, with a random CLT of gpu_features per layer made for it."""
    random_clt(model_dir, cache_dir, clt_dir, cfg.gpu_features)
    return scale_graph(model_dir, clt_dir, cfg.gpu_max_features, cfg.threads, cfg.device)


def loss_gap(curve, reference):
    """max_t |curve[t] - reference[t]| over the shared steps, and the reference's step-to-step noise:
    the median |reference[t] - reference[t - 1]| (every step sees a new batch, so consecutive losses
    differ by batch-to-batch variation, plus the trend)."""
    n = min(len(curve), len(reference))
    gap = np.abs(np.array(curve[:n]) - np.array(reference[:n]))
    return float(gap.max()), float(np.median(np.abs(np.diff(reference))))


def step_flops(cfg, shape):
    """Matmul FLOPs of one training step at the run's shape (clt_matmuls: what bench.py train counts)."""
    shapes = clt_matmuls(cfg.gpu_batch, shape["n_layer"], shape["n_embd"], cfg.gpu_features)
    return sum(2 * m * k * n for m, k, n in shapes)


class GpuParts:
    """bench.py gpu's rows, and its runner of parts: each in a fresh process, killed at the deadline;
    a part that fails or is skipped leaves a row that says so, and the run goes on."""

    def __init__(self, deadline, partial, min_left=PART_MIN_S):
        self.deadline = deadline  # time.time() at the end of --budget-s
        self.partial = partial  # the rows so far, rewritten after each row: what a kill from outside leaves
        self.min_left = min_left  # seconds of the budget a part needs left to start
        self.rows = []
        self.spent = {}  # part -> wall seconds of its process, start-up included

    def row(self, part, setting, time_s="-", rate="-", GiB_peak="-", note="", status="ok"):
        self.rows.append(dict(part=part, status=status, setting=setting, time_s=time_s, rate=rate, GiB_peak=GiB_peak,
                              part_s=self.spent.get(part, "-"), note=note))
        print(self.rows[-1], flush=True)
        write_json(self.partial, self.rows)

    def run(self, part, setting, fn, *args):
        """fn(*args) in a fresh process -> its result, or None after a row saying why there is none."""
        from concurrent.futures.process import BrokenProcessPool
        left = self.deadline - time.time()
        if left < self.min_left:
            self.row(part, setting, status=f"skipped: {max(left, 0):.0f} s of --budget-s left")
            return None
        t0 = time.perf_counter()
        try:  # any failure is this part's row, not the end of the run: the other parts still run
            result = fresh_process(fn, *args, timeout=left)
        except BrokenProcessPool:
            waited = time.perf_counter() - t0
            killed = waited >= left - 1
            why = "killed at the end of --budget-s" if killed else "its process died (a signal, out of memory?)"
            result = None
            status = f"error: {why} after {waited:.0f} s"
        except Exception as e:
            traceback.print_exception(type(e), e, e.__traceback__)  # with the part's own: the pool chains it
            result = None
            status = "error: " + f"{type(e).__name__}: {e}".splitlines()[0][:300]
        self.spent[part] = round(time.perf_counter() - t0, 1)
        if result is None:
            self.row(part, setting, status=status)
        return result


def gpu_prepare(parts, cfg, shape, root):
    """The machine, the random GPT-2 and its cache: -> (model dir, cache dir, the bf16 peak or None)."""
    model_dir = os.path.join(root, "model")
    cache_dir = os.path.join(root, "cache")
    setting = f"random GPT-2, {shape['n_layer']} x {shape['n_embd']}, vocab {shape['vocab_size']}"
    machine = parts.run("machine and model", setting, gpu_setup, model_dir, shape, cfg.device)
    peak = cfg.peak_tflops or None
    if machine is not None:
        peak = peak or next((v for k, v in PEAK_TFLOPS.items() if k in machine["name"]), None)
        parts.row("machine and model", f"{machine['name']}; {setting}",
                  rate=f"bf16 peak {peak:g} TFLOP/s" if peak else "no bf16 peak: pass --peak-tflops",
                  note=f"torch {machine['torch']}, CUDA {machine['cuda']}, NCCL {machine['nccl']}, "
                       f"{machine['cpus']} CPUs; model: {machine['made']}")
    corpus = synthetic_corpus(os.path.join(root, "corpus.txt"), 4000)
    setting = f"{cfg.gpu_tokens} tokens, int8, 64 x 64 per forward, {cfg.device}"
    r = parts.run("cache build", setting, scale_cache, model_dir, corpus, cache_dir, cfg.gpu_tokens, cfg.threads,
                  cfg.device)
    if r is not None:
        what = f"CUDA allocator peak; peak RSS {r['peak']:.2f} GiB" if r["cuda_peak"] is not None else "peak RSS"
        parts.row("cache build", setting, r["seconds"], f"{r['tokens'] / r['seconds']:.0f} tok/s",
                  r["peak"] if r["cuda_peak"] is None else r["cuda_peak"],
                  f"{what}; model {r['model']:.2f} GiB + one batch's mlp_in/out {r['acts']:.2f} GiB; "
                  f"{r['shards']} shards")
    return model_dir, cache_dir, peak


def mfu_text(flops, seconds, peak):
    return f"MFU {flops / seconds / (peak * 1e12):.1%}" if peak else "MFU - (no peak)"


def gpu_training(parts, cfg, shape, root, cache_dir, peak):
    """train.py with bf16 autocast and in fp32, and their loss curves compared: -> the curves."""
    setting = f"L{shape['n_layer']} d{shape['n_embd']} F{cfg.gpu_features}, {cfg.gpu_batch} tokens/step, " \
              f"{cfg.gpu_steps} steps"
    curves = {}
    for name, autocast in (("bf16", "always"), ("fp32", "never")):
        part = f"train.py {name}" + (" autocast" if name == "bf16" else "")
        r = parts.run(part, setting, gpu_train, cache_dir, os.path.join(root, f"train_{name}"), cfg, autocast)
        if r is None:
            continue
        curves[name] = r["loss"]
        s = r["ms"] / 1e3
        parts.row(part, setting, s, f"{cfg.gpu_batch / s:.0f} tok/s, {mfu_text(step_flops(cfg, shape), s, peak)}",
                  r["peak"], f"median step after 10; last loss {r['loss'][-1]:.5g}, FVU {r['fvu']:.3f}, "
                  f"L0 {r['l0']:.1f}; run {r['seconds']:.0f} s with start-up, checkpoint, export; every step "
                  "logged (a host sync each)")
    if len(curves) < 2:
        parts.row("bf16 vs fp32 loss", "-", status="skipped: needs both runs")
        return curves
    gap, noise = loss_gap(curves["bf16"], curves["fp32"])
    verdict = "within" if gap <= noise else "beyond"
    parts.row("bf16 vs fp32 loss", f"same seed and batches, {cfg.gpu_steps} steps",
              rate=f"max |Δ| = {gap / noise if noise > 0 else math.inf:.3g} x noise",
              note=f"{verdict} noise: max |Δ| {gap:.4g}; noise {noise:.4g} = median |Δ| between consecutive fp32 "
                   f"steps; last {curves['bf16'][-1]:.6g} vs {curves['fp32'][-1]:.6g}")
    return curves


def gpu_launch(parts, cfg, shape, root, cache_dir, peak, curves):
    """The bf16 run's first steps under torchrun (NCCL), against the in-process run; the step alone vs matmul."""
    backend = "nccl" if str(cfg.device).startswith("cuda") else "gloo"
    setting = f"torchrun --nproc_per_node=1, {backend}, first {cfg.gpu_torchrun_steps} steps of the bf16 run"
    r = parts.run("torchrun", setting, gpu_torchrun, cache_dir, os.path.join(root, "torchrun"), cfg, parts.deadline)
    if r is not None:
        curves["torchrun"] = r["loss"]
        seen = f"NCCL {r['nccl']} started" if r["nccl"] else "no NCCL version line in its log"
        rate = "-"
        note = f"no bf16 run to compare with; {seen}"
        if "bf16" in curves:
            n = len(r["loss"])
            rel = max(abs(a - b) / abs(b) for a, b in zip(r["loss"], curves["bf16"][:n]))
            rate = f"max rel |Δloss| {rel:.2g} vs in-process"
            note = ("equal (<= 1e-5)" if rel <= 1e-5 else "DIFFERS (> 1e-5)") + f" over {n} steps; {seen}"
        parts.row("torchrun", setting, r["seconds"], rate, note=note)
    L = shape["n_layer"]
    d = shape["n_embd"]
    setting = f"L{L} d{d} F{cfg.gpu_features} B{cfg.gpu_batch}, jumprelu"
    r = parts.run("train step alone", setting, step_vs_matmul, "gpu", L, d, cfg.gpu_features, cfg.gpu_batch,
                  "jumprelu", cfg.device, 5)
    if r is not None:
        s = r["ms"] / 1e3
        parts.row("train step alone", setting, s, f"{r['detail']}; {mfu_text(step_flops(cfg, shape), s, peak)}",
                  note=f"{r['ratio']:.0%} of the same-run matmul FLOP rate (train.train_step on a fixed batch: "
                       "no loader)")


def gpu_attribution(parts, cfg, root, model_dir, cache_dir):
    """graph.py (capped) and interp.py on the device, each with a random CLT of ~1 % density."""
    setting = f"{SCALE_PROMPT!r}, --max-features {cfg.gpu_max_features}"
    r = parts.run("graph.py", setting, gpu_graph, model_dir, cache_dir, os.path.join(root, "clt_graph"), cfg)
    if r is not None:
        parts.row("graph.py", f"{r['tokens']} tokens, {r['n_active']} active, --max-features {cfg.gpu_max_features}",
                  r["seconds"], f"{r['kept']} features kept", r["above"] if r["cuda_peak"] is None else r["cuda_peak"],
                  "replacement + attribution + pruning; " + ("CUDA allocator peak" if r["cuda_peak"] is not None
                                                             else "peak RSS above the loaded inputs"))
    setting = f"cache of {cfg.gpu_tokens} tokens, {cfg.gpu_features} features per layer"
    r = parts.run("interp.py", setting, scale_interp, model_dir, cache_dir, os.path.join(root, "clt_interp"),
                  os.path.join(root, "interp"), cfg.gpu_features, cfg.threads, cfg.device)
    if r is not None:
        parts.row("interp.py", f"{r['tokens']} tokens, {r['features']} features", r["seconds"],
                  f"{r['tokens'] / r['seconds']:.0f} tok/s", r["above"] if r["cuda_peak"] is None else r["cuda_peak"],
                  "both passes; " + ("CUDA allocator peak" if r["cuda_peak"] is not None
                                     else "peak RSS above the loaded inputs"))


def bench_gpu(cfg):
    """The GPU path (see the section comment): one row per part, a failure or a skip in its own row;
    the loss curves (bf16, fp32, torchrun) go to <out>/gpu_curves.json."""
    deadline = time.time() + cfg.budget_s
    if cfg.quick:  # the quick sizes for the flags left at their defaults
        default = GpuBench()
        cfg = replace(cfg, **{k: v for k, v in QUICK_GPU.items() if getattr(cfg, k) == getattr(default, k)})
    shape = TINY_SHAPE if cfg.quick else GPT2_SMALL_SHAPE
    root = os.path.abspath(os.path.join(cfg.out, "gpu"))  # absolute: torchrun's train.py runs from the repository
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    parts = GpuParts(deadline, os.path.join(cfg.out, "gpu_partial.json"))
    model_dir, cache_dir, peak = gpu_prepare(parts, cfg, shape, root)
    curves = gpu_training(parts, cfg, shape, root, cache_dir, peak)
    gpu_launch(parts, cfg, shape, root, cache_dir, peak, curves)
    write_json(os.path.join(cfg.out, "gpu_curves.json"), curves)
    gpu_attribution(parts, cfg, root, model_dir, cache_dir)
    shutil.rmtree(root)
    return parts.rows


# -----------------------------------------------------------------------------
# recovery: how much of the planted world a CLT of size F finds


@dataclass
class RecoveryBench(Bench):
    """planted concepts recovered per family vs CLT size and sparsity"""
    recovery_tokens: int = arg(150_000, "rows of the tiny model's training cache")
    recovery_steps: int = arg(300, 'CLT training steps of 1024 tokens (train.py: 1000)')
    recovery_sizes: str = arg("2,8,32", 'F per layer / d_model, at the default sparsity')
    recovery_sparsity: str = arg("0.2,0.7,2.5", 'train.py --sparsity values swept at F = 8 d')
    recovery_support: int = arg(24, 'toyworld.eval_corpus support of both evaluation sets')
    recovery_seeds: str = arg("1,2", 'evaluation-set seeds: pick the recipe on the first, report on the second')
    recovery_plot: str = arg(os.path.join("assets", "recovery.png"), 'where the plot goes')


FAMILY_ORDER = ("category", "entity", "latent", "output")


def recipes(cfg, d):
    """{name: (features, sparsity, sweep)}: the size sweep at train.py's default sparsity, then the sparsity
    sweep at 8 d (the default's point is shared)."""
    import train
    default = train.TrainConfig.sparsity
    out = {f"F={m}d": (int(m) * d, default, "size") for m in cfg.recovery_sizes.split(",")}
    for s in cfg.recovery_sparsity.split(","):
        if float(s) != default:
            out[f"F=8d, sparsity {s}"] = (8 * d, float(s), "sparsity")
    return out


def trained_clt(root, cache_dir, name, features, sparsity, cfg):
    """Train one recipe with train.py (or reuse the run a previous invocation left): (CLT, seconds, metrics)."""
    import train
    out = os.path.join(root, "clt_" + name.replace("=", "").replace(", ", "_").replace(" ", ""))
    tcfg = train.TrainConfig(cache=cache_dir, out=out, features=features, sparsity=sparsity,
                             steps=cfg.recovery_steps, eval_every=-1, ckpt_every=-1, device=cfg.device)
    marker = out + ".json"  # beside the run: what it was trained with and how long it took
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        if done["config"] == asdict(tcfg):
            return CrossLayerTranscoder.from_pretrained(out), done["seconds"], done["final"]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    final = train.train(tcfg)
    seconds = time.perf_counter() - t0
    write_json(marker, dict(config=asdict(tcfg), seconds=seconds, final={k: final[k] for k in ("fvu", "l0")}))
    return CrossLayerTranscoder.from_pretrained(out), seconds, final


def bench_recovery(cfg):
    """Recovery per label family vs dictionary size (F = 2d, 8d, 32d) and vs sparsity, with the MLP-neuron and
    random-CLT baselines and the token-identity oracle (a ceiling for token detectors), on two generated
    evaluation sets: the recipe is chosen on the first, reported on the second. Sized for a 2-core CPU: a
    small training cache and few steps (see the arguments)."""
    import interp
    from forge import toyworld
    t_start = time.perf_counter()
    root = os.path.join(cfg.out, "recovery")
    model_dir = DEFAULT_MODEL
    model = GPT.from_pretrained(model_dir).to(cfg.device)
    enc = load_tokenizer(model_dir)
    world = toyworld.load_world(model_dir)
    d = model.config.n_embd
    cache_dir = os.path.join(root, "cache")
    cache.build_cache(cache.CacheConfig(tokens=cfg.recovery_tokens, out=cache_dir, device=cfg.device))
    train_cache = cache.ActivationCache(cache_dir, model=model)
    evals = {}
    for seed in (int(s) for s in cfg.recovery_seeds.split(",")):
        icfg = interp.InterpConfig(out=root, concept_cache=os.path.join(root, f"concepts_seed{seed}"),
                                   concept_seed=seed, concept_support=cfg.recovery_support, device=cfg.device,
                                   chunk_size=2048)  # its own name: cfg (the bench's) is read again below
        ccache = interp.concept_cache(model_dir, model, world, train_cache, icfg)
        evals[seed] = (icfg, ccache, interp.ConceptLabels(ccache, world, enc, icfg))
    print(f"recovery: caches and labels in {time.perf_counter() - t_start:.0f} s")
    sample = train_cache.read(0, 4096)[0].to(cfg.device)  # training rows: the random CLTs' thresholds
    sets = {"MLP neurons (4d)": partial(interp.neuron_preacts, model)}
    runs = {}
    for name, (features, sparsity, sweep) in recipes(cfg, d).items():
        t, seconds, final = trained_clt(root, cache_dir, name, features, sparsity, cfg)
        t = t.to(cfg.device)
        runs[name] = dict(features=features, sparsity=sparsity, sweep=sweep, seconds=seconds, fvu=final["fvu"])
        sets[name] = partial(interp.clt_acts, t)
        if sweep == "size":  # one random twin per size
            sets[f"random {name}"] = partial(interp.clt_acts, interp.random_like(t, sample))
    rows = []
    heads = {}
    oracle = "token identity (oracle)"  # feature t fires on token t: the ceiling of a token detector
    for seed, (icfg, ccache, labels) in evals.items():
        scores = interp.score_concepts(sets, ccache, labels, icfg)
        scores[oracle] = interp.token_scores(ccache, labels, model.config.vocab_size, icfg)
        n_labeled = int(labels.labeled.sum())
        for name, s in scores.items():
            layers = 1 if name == oracle else model.config.n_layer
            F_ = s.n_fires.numel() // layers
            per_concept, _ = interp.best_features(s, labels, F_, icfg)
            table = interp.family_table(per_concept, labels, s, icfg)
            heads[name, seed] = dict(interp.headline(table, icfg), table=table,
                                     l0=s.n_fires.sum().item() / n_labeled / layers)
    select, report = list(evals)
    chosen = max(runs, key=lambda n: (heads[n, select]["share_recovered"], heads[n, select]["mean_best_f1"]))
    for name in [*sets, oracle]:
        r = runs.get(name, {})
        h = heads[name, report]
        rows.append(dict(features=name, F=r.get("features", ""), sparsity=r.get("sparsity", ""),
                         l0_per_layer=round(h["l0"], 1), train_s=round(r["seconds"]) if r else "",
                         **{fam: interp.share_cell(h["table"].get(fam)) for fam in FAMILY_ORDER},
                         headline_select=f"{100 * heads[name, select]['share_recovered']:.1f} %",
                         headline_report=interp.share_cell(dict(share=h["share_recovered"],
                                                                mean_best_f1=h["mean_best_f1"])),
                         chosen="yes" if name == chosen else ""))
    plot_recovery(cfg.recovery_plot, runs, sets, heads, report, d)
    seconds = time.perf_counter() - t_start
    print(f"recovery: chosen on evaluation set {select}: {chosen}; on set {report} it recovers "
          f"{heads[chosen, report]['recovered']}/{heads[chosen, report]['n']} of the "
          f"{evals[report][0].families} concepts with F1 >= {evals[report][0].concept_f1}; "
          f"{seconds:.0f} s in all; plot: {cfg.recovery_plot}")
    return rows


def plot_recovery(path, runs, sets, heads, seed, d):
    """Per family, the share recovered (top) and the mean best F1 (bottom) vs F/d (CLTs solid, their random
    twins dashed, the MLP neurons as squares at 4d) and vs L0 (the sparsity sweep at 8d), on set `seed`."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 7.5))
    ax = fig.subplots(2, 2)
    colours = dict(zip(FAMILY_ORDER, ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1")))
    sizes = [n for n in runs if runs[n]["sweep"] == "size"]
    sweep = sorted((n for n in runs if runs[n]["features"] == 8 * d), key=lambda n: heads[n, seed]["l0"])
    x = [runs[n]["features"] / d for n in sizes]
    for row, key in enumerate(("share", "mean_best_f1")):
        for fam, colour in colours.items():
            def value(name):
                return (heads[name, seed]["table"].get(fam) or {}).get(key) or 0.0
            ax[row, 0].plot(x, [value(n) for n in sizes], "o-", color=colour, label=fam)
            ax[row, 0].plot(x, [value(f"random {n}") for n in sizes], "x--", color=colour, alpha=0.6)
            ax[row, 0].plot([4], [value("MLP neurons (4d)")], "s", color=colour, alpha=0.6)
            ax[row, 1].plot([heads[n, seed]["l0"] for n in sweep], [value(n) for n in sweep], "o-", color=colour)
        label = "share of concepts with F1 >= 0.8" if key == "share" else "mean best F1"
        ax[row, 0].set(xscale="log", ylabel=label, ylim=(-0.02, 1.02))
        ax[row, 0].set_xticks(x + [4], [f"{v:g}" for v in x] + ["4"])
        ax[row, 0].minorticks_off()
        ax[row, 1].set(ylim=(-0.02, 1.02))
    ax[0, 0].set_title("vs dictionary size (dashed: random CLT; squares: MLP neurons)", fontsize=10)
    ax[0, 1].set_title("vs sparsity (train.py --sparsity sweep at F = 8d)", fontsize=10)
    ax[1, 0].set_xlabel("features per layer / d")
    ax[1, 1].set_xlabel("L0 per layer on the evaluation set")
    ax[0, 0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


# -----------------------------------------------------------------------------
# faithfulness: does a pruned graph predict what ablating its features does?
#
# A graph is a linear system: A[t, s] is what source s, at its activation a_s, adds to target t's input.
# Removing feature s moves each target by -A[t, s]; a feature target passes its change on (an active
# feature's activation moves one for one with its pre-activation under JumpReLU, ReLU and TopK alike),
# so per unit of activation the system is M = A D^-1 (D = diag(a) on the feature columns), and the logit
# node j moves by
#     total:  -a_s [(I - M)^-1]_{j, s}   every path through the features: the graph's prediction
#     direct: -A[j, s]                   the edge alone: every other MLP output held
# graph.intervene measures the same removal: freeze="none" is the real model (attention, LayerNorm and
# the later MLPs respond), freeze="all" holds every MLP output, the attention patterns and the LayerNorm
# scales (the graph's own view: it must give the direct prediction to float precision).


@dataclass
class FaithfulnessBench(Bench):
    """pruned graphs' predicted logit changes vs ablations in the real model"""
    faithfulness_clt: str = arg("", 'a trained CLT of models/tiny (e.g. runs/clt); "" = train one as compactness does')
    faithfulness_tokens: int = arg(200_000, 'tokens of the models/tiny cache that CLT is trained on')
    faithfulness_features: int = arg(512, 'its features per layer (TopK, k = 8)')
    faithfulness_steps: int = arg(200, 'its training steps of 1024 tokens')
    faithfulness_per_family: int = arg(6, 'prompts of each toyworld.eval_prompts kind')
    faithfulness_k: int = arg(5, 'features per pruned graph: its k most influential, and k random active ones')
    faithfulness_floor: float = arg(0.05, '|measured| below this (logits) counts as this in relative errors')
    faithfulness_seed: int = arg(0, 'seed of the random control features')
    faithfulness_figure: str = arg(os.path.join("assets", "faithfulness.png"), 'the scatter plot')


def removal_effects(g, chosen, target=0, edges=None):
    """What the graph's linear system predicts when each feature node of chosen (m,) is removed on its
    own (the total effect above) -> (the change of logit node `target` (m,), 0: the most likely token;
    the change of every feature node's activation (n, m)). edges: an (N, N) bool mask, e.g. prune's,
    to predict from the pruned graph's edges alone."""
    A = g.adjacency.double()
    A = A if edges is None else A * edges
    n = len(g.feats)
    acts = g.acts.to(A.device, torch.float64)
    per_unit = A[:, :n] / acts  # (N, n) M: what a unit of each feature's activation adds to each input
    step = torch.zeros(n, len(chosen), dtype=torch.float64, device=A.device)  # (n, m)
    step[chosen, torch.arange(len(chosen), device=A.device)] = -acts[chosen]
    change = step.clone()
    for _ in range(g.n_layers):  # a feature feeds only higher layers: paths have at most L edges
        step = per_unit[:n] @ step  # (n, m) the last step's changes passed on along one more edge
        change += step
    assert not step.any(), "the feature-to-feature edges have a cycle: is this an attribution graph?"
    return per_unit[g.slices().logits.start + target] @ change, change


def ablation_changes(model, t, idx, feats, token, freeze):
    """(m,) the measured change of `token`'s logit minus the mean logit (a logit node's quantity) at
    the last position when each feature of feats (m, 3) (layer, pos, id) is ablated on its own."""
    import graph
    out = []
    for l, p, f in feats.tolist():
        clean, new = graph.intervene(model, t, idx, [graph.Intervention(l, p, f, "ablate")], freeze=freeze)
        change = (new[-1, token] - new[-1].mean()) - (clean[-1, token] - clean[-1].mean())
        out.append(change.item())
    return torch.tensor(out, dtype=torch.float64)


def control_features(g, top, rng):
    """For each node in top, a random other active feature of its layer (none of top, none twice)."""
    taken = set(top.tolist())
    out = []
    for i in top.tolist():
        pool = [j for j in (g.feats[:, 0] == g.feats[i, 0]).nonzero()[:, 0].tolist() if j not in taken]
        if pool:
            out.append(rng.choice(pool))
            taken.add(out[-1])
    return torch.tensor(out, dtype=torch.long, device=top.device)


def faithfulness_points(model, t, idx, k, rng):
    """One prompt: its graph and pruned graph, the k most influential feature nodes of the pruned graph
    and as many random active ones of the same layers; per feature the predicted and measured changes
    of the top logit node when it is removed -> ([dict per feature], the top logit node's token)."""
    import graph
    rep = graph.local_replacement(model, t, idx)
    g = graph.attribute(model, t, rep, batch_size=1024)  # one batch per layer at this size: no progress bar
    nodes, edges, _, infl = graph.prune(g)
    n = len(g.feats)
    kept = nodes[:n].nonzero()[:, 0]
    top = kept[infl[kept].argsort(descending=True)[:k]]
    token = int(g.logit_ids[0])
    points = []
    for which, chosen in (("top", top), ("random", control_features(g, top, rng))):
        total, change = removal_effects(g, chosen)
        # the linear response leaves the features' linear range where it drives an activation below zero
        overshoot = (g.acts.to(change.device, change.dtype)[:, None] + change < 0).sum(0)  # (m,)
        predicted = dict(total=total, pruned=removal_effects(g, chosen, edges=edges)[0],
                         direct=-g.adjacency[g.slices().logits.start, chosen].double())
        measured = dict(real=ablation_changes(model, t, idx, g.feats[chosen], token, "none"),
                        frozen=ablation_changes(model, t, idx, g.feats[chosen], token, "all"))
        for j, i in enumerate(chosen.tolist()):
            points.append(dict(features=which, feature="/".join(map(str, g.feats[i].tolist())),
                               activation=g.acts[i].item(), influence=infl[i].item(), overshoot=int(overshoot[j]),
                               **{f"predicted_{key}": v[j].item() for key, v in predicted.items()},
                               **{f"measured_{key}": v[j].item() for key, v in measured.items()}))
    return points, token


def agreement(predicted, measured, floor):
    """(Pearson r, median |measured - predicted| / max(|measured|, floor), share of the changes with
    |measured| >= floor whose predicted sign is right); nan where undefined (under 3 points, no spread)."""
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    r = float(np.corrcoef(p, m)[0, 1]) if len(p) >= 3 and p.std() > 0 and m.std() > 0 else float("nan")
    rel = float(np.median(np.abs(m - p) / np.maximum(np.abs(m), floor))) if len(p) else float("nan")
    big = np.abs(m) >= floor
    sign = float(np.mean(np.sign(p[big]) == np.sign(m[big]))) if big.any() else float("nan")
    return r, rel, sign


# (prediction, measurement) pairs of the "all" rows; each family's rows have the first two
FAITHFULNESS_PAIRS = (("total", "real"), ("direct", "real"), ("pruned", "real"), ("total", "frozen"),
                      ("direct", "frozen"))


FAITHFULNESS_SETS = ("top", "random", "top, stays linear", "top, overshoots")  # feature sets of the rows


def in_set(q, which):
    """Whether point q is in feature set `which`: top or random; a top feature whose removal, in the
    linear system, leaves every other feature's activation >= 0 (stays linear) or not (overshoots)."""
    if which in ("top", "random"):
        return q["features"] == which
    return q["features"] == "top" and (q["overshoot"] > 0) == (which == "top, overshoots")


def faithfulness_rows(points, families, floor):
    """Per family and feature set: the graph's total and direct predictions against the real model;
    over all families also the top features split by whether their linear response stays linear,
    the pruned graph's prediction, and the total and direct ones against the frozen model."""
    rows = []
    for fam in list(families) + ["all"]:
        for which in FAITHFULNESS_SETS if fam == "all" else FAITHFULNESS_SETS[:2]:
            mine = [q for q in points if in_set(q, which) and fam in ("all", q["family"])]
            overshoot_share = float(np.mean([q["overshoot"] > 0 for q in mine])) if mine else float("nan")
            for pred, meas in FAITHFULNESS_PAIRS if fam == "all" else FAITHFULNESS_PAIRS[:2]:
                p = [q[f"predicted_{pred}"] for q in mine]
                m = [q[f"measured_{meas}"] for q in mine]
                r, rel, sign = agreement(p, m, floor)
                rows.append(dict(family=fam, features=which, predicted=pred, measured=meas, n=len(mine),
                                 overshoot_share=overshoot_share,
                                 mean_abs_measured=float(np.mean(np.abs(m))) if m else float("nan"),
                                 pearson=r, median_rel_error=rel, sign_agreement=sign,
                                 max_abs_error=float(np.max(np.abs(np.subtract(m, p)))) if m else float("nan")))
    return rows


def faithfulness_figure(points, families, path):
    """Predicted (the graph's total effect) vs measured (the real model) change of the top logit, one
    colour per family: the top-k features of the pruned graphs, and the random control; open circles
    where the linear response drives some other feature's activation below zero."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 5))
    axes = fig.subplots(1, 2)
    colours = {fam: f"C{i}" for i, fam in enumerate(families)}
    for ax, which, title in zip(axes, ("top", "random"), ("top-k features of each pruned graph",
                                                         "random active features of the same layers")):
        mine = [q for q in points if q["features"] == which]
        for fam in families:
            for over in (False, True):  # open circles: the linear response overshoots (drives a feature below 0)
                xs = [q["predicted_total"] for q in mine if q["family"] == fam and (q["overshoot"] > 0) == over]
                ys = [q["measured_real"] for q in mine if q["family"] == fam and (q["overshoot"] > 0) == over]
                ax.scatter(xs, ys, s=14, alpha=0.75, label=None if over else fam,
                           facecolors="none" if over else colours[fam], edgecolors=colours[fam])
        lim = max([abs(q[key]) for q in mine for key in ("predicted_total", "measured_real")] + [1e-3]) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xlabel("predicted by the graph (total effect), logits")
        ax.set_ylabel("measured: ablated in the real model, logits")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("models/tiny: change of the top logit (minus the mean) when one feature is removed "
                 "(open: the linear response drives another feature below 0)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")


def faithfulness_clt(cfg, model, root):
    """The CLT under test: cfg.faithfulness_clt, or one trained here by train_transcoders (TopK) -> (CLT, what)."""
    if cfg.faithfulness_clt:
        t = load_transcoder(cfg.faithfulness_clt, model)
        check_same_model(model, t.config.model_sha256, f"the CLT {cfg.faithfulness_clt}")
        return t.to(cfg.device).eval(), cfg.faithfulness_clt
    recipe = CompactnessBench(device=cfg.device, compactness_tokens=cfg.faithfulness_tokens,
                              compactness_features=cfg.faithfulness_features,
                              compactness_steps=cfg.faithfulness_steps, compactness_kinds="clt")
    t, m = train_transcoders(recipe, root)["clt"]
    fvu = sum(m["eval"]["fvu"]) / len(m["eval"]["fvu"])
    return t, (f"TopK k={recipe.compactness_k}, F={cfg.faithfulness_features}, {cfg.faithfulness_steps} steps: "
               f"held-out FVU {fvu:.3f}, loss recovered {m['eval']['recovered']:.3f}")


def bench_faithfulness(cfg):
    """Does a pruned graph predict what removing its features does? Over faithfulness_per_family prompts
    of every toy-world family: per prompt the graph (unpruned, for the predictions) and the pruned graph
    (for the choice of features), its faithfulness_k most influential feature nodes and as many random
    active features of the same layers; for each, the change of the top logit node (the most likely
    token's logit minus the mean logit: what the graph explains, the answer or not) predicted by the
    graph and measured by ablating it (graph.intervene). Per family: Pearson r, median relative error
    (|measured| floored at faithfulness_floor) and sign agreement (over |measured| >= the floor)."""
    import graph
    from forge import toyworld
    t0 = time.time()
    root = os.path.join(cfg.out, "faithfulness")
    os.makedirs(root, exist_ok=True)
    model = GPT.from_pretrained().to(cfg.device).eval()
    enc = load_tokenizer(DEFAULT_MODEL)
    world = toyworld.load_world()
    print("phase 1: the CLT")
    t, what = faithfulness_clt(cfg, model, root)
    families = family_prompts(world, cfg.faithfulness_per_family)
    print(f"phase 2: {sum(map(len, families.values()))} prompts, CLT {what} ({time.time() - t0:.0f} s so far)")
    rng = random.Random(cfg.faithfulness_seed)
    points = []
    top_is_answer = {}  # family -> [whether the top logit node is the prompt's answer]
    for fam, prompts in families.items():
        for prompt, answer in prompts:
            idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(cfg.device)
            mine, token = faithfulness_points(model, t, idx, cfg.faithfulness_k, rng)
            points += [dict(family=fam, prompt=prompt, **q) for q in mine]
            top_is_answer.setdefault(fam, []).append(token == enc.encode(answer)[0])
    write_json(os.path.join(root, "points.json"), dict(clt=what, points=points))
    rows = faithfulness_rows(points, families, cfg.faithfulness_floor)
    for row in rows:
        shares = top_is_answer.get(row["family"], sum(top_is_answer.values(), []))
        row["top_is_answer"] = sum(shares) / len(shares)
    faithfulness_figure(points, list(families), cfg.faithfulness_figure)
    print(f"done in {time.time() - t0:.0f} s; CLT: {what}; figure: {cfg.faithfulness_figure}")
    return rows


# -----------------------------------------------------------------------------
# main

BENCHMARKS = {"cache": (bench_cache, CacheBench),
              "graph": (bench_graph, GraphBench),
              "vs-circuit-tracer": (bench_vs_circuit_tracer, CircuitTracerBench),
              "interp": (bench_interp, InterpBench),
              "train": (bench_train, TrainBench),
              "dist": (bench_dist, DistBench),
              "compactness": (bench_compactness, CompactnessBench),
              "scale": (bench_scale, ScaleBench),
              "recovery": (bench_recovery, RecoveryBench),
              "faithfulness": (bench_faithfulness, FaithfulnessBench),
              "gpu": (bench_gpu, GpuBench)}


def main(argv=None):
    name, cfg = parse_config(__doc__, {name: config for name, (_, config) in BENCHMARKS.items()}, argv)
    set_threads(cfg.threads)
    if cfg.quick:
        smaller = {f.name: getattr(cfg, f.name) // 4 for f in fields(cfg) if f.name.endswith("_tokens")}
        cfg = replace(cfg, **smaller)
    print(asdict(cfg))
    os.makedirs(cfg.out, exist_ok=True)
    results = BENCHMARKS[name][0](cfg)
    print_table(results)
    meta = dict(args=asdict(cfg), torch=torch.__version__, device=cfg.device, threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if str(cfg.device).startswith("cuda") else None)
    write_json(os.path.join(cfg.out, f"{name}.json"), dict(meta=meta, results=results))
    return 0


if __name__ == "__main__":
    run_main(main)

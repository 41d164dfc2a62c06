"""
experiments/cache.py: the activation cache on the tiny model and on a random GPT-2-small shape,
per dtype (int8, fp16, fp32):
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

    python experiments/cache.py              # the tiny model and a random GPT-2-small shape
    python experiments/cache.py --quick      # the same, small (a couple of minutes on a 2-core CPU)
    python experiments/cache.py --device cuda
"""

import os
import shutil
import sys
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import cache
from experiments.common import (
    GPT2_SMALL_SHAPE,
    TINY_SHAPE,
    Bench,
    random_model_dir,
    run_study,
    sync,
    synthetic_corpus,
    timed,
)
from forge import shards
from forge.cli import arg, run_main
from forge.hub import DEFAULT_MODEL, load_tokenizer
from model import GPT


@dataclass
class CacheBench(Bench):
    """activation cache: bytes/token, NMSE, writer overhead, read rate"""

    tiny_tokens: int = arg(200_000, "tokens per cache on the tiny model")
    gpt2_tokens: int = arg(8192, "tokens per cache on the GPT-2-small shape")
    read_batch: int = arg(4096, "batch size of the shuffled read")


def run(cfg):
    """The rows of models/tiny (or a random model of its shape) and of a random GPT-2 small."""
    corpus = synthetic_corpus(os.path.join(cfg.out, "corpus.txt"), 4000)
    if os.path.exists(os.path.join(DEFAULT_MODEL, "model.safetensors")):
        setups = [("tiny", DEFAULT_MODEL, "toy", cfg.tiny_tokens)]
    else:
        print(f"note: {DEFAULT_MODEL} is missing: using a random model of the tiny shape (4 x 128)")
        path = random_model_dir(os.path.join(cfg.out, "tiny_random"), **TINY_SHAPE)
        setups = [("tiny-shape (random)", path, corpus, cfg.tiny_tokens)]
    gpt2 = random_model_dir(os.path.join(cfg.out, "gpt2_small_random"), **GPT2_SMALL_SHAPE)
    setups.append(("gpt2-small-shape (random)", gpt2, corpus, cfg.gpt2_tokens))
    results = []
    for name, model_dir, text, tokens in setups:
        out = os.path.join(cfg.out, name.split()[0])
        build = cache.CacheConfig(
            model=model_dir,
            corpus=text,
            tokens=tokens,
            ctx=64,
            device=cfg.device,
            out=out,
            heldout=0.0,
        )
        threads = torch.get_num_threads()
        print(f"{name}: {tokens} tokens per cache on {cfg.device}, torch threads {threads}")
        results += model_rows(name, build, cfg.read_batch)
    shutil.rmtree(gpt2)
    return results


def model_rows(name, cfg, read_batch):
    """bytes/token, NMSE, writer overhead and read rates for each dtype on one model."""
    results = []
    bare = [bare_forward_seconds(cfg)]
    for dtype in ("int8", "fp16", "fp32"):
        out = f"{cfg.out}_{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        m = cache.build_cache(replace(cfg, dtype=dtype, out=out))
        bare.append(bare_forward_seconds(cfg))  # the baseline right before and after each build
        wall, cpu = [(a + b) / 2 for a, b in zip(bare[-2], bare[-1])]
        fp32_bytes = 2 * m["n_layers"] * m["d_model"] * 4 + 12
        per_token = sum(s["bytes"] for s in m["shards"]) / m["n_tokens"]
        r = read_rates(out, min(read_batch, m["n_tokens"] // 8))
        results.append(
            dict(
                model=name,
                dtype=dtype,
                tokens=m["n_tokens"],
                bytes_per_token=per_token,
                x_fp32=per_token / fp32_bytes,
                nmse_in=m["nmse_total"][0],
                nmse_out=m["nmse_total"][1],
                nmse_worst_layer=max(m["nmse_in"] + m["nmse_out"]),
                write_overhead_wall=m["seconds"] / wall - 1,
                write_overhead_cpu=m["cpu_seconds"] / cpu - 1,
                seq_MBps=r["seq"][0],
                shuffled_MBps=r["shuffled"][0],
                shuffled_vs_seq_wall=r["shuffled"][0] / r["seq"][0],
                shuffled_vs_seq_cpu=r["shuffled"][1] / r["seq"][1],
                raw_vs_seq_wall=r["shuffled_raw"][0] / r["seq"][0],
                raw_vs_seq_cpu=r["shuffled_raw"][1] / r["seq"][1],
                inorder_vs_seq_wall=r["inorder"][0] / r["seq"][0],
                crc32_MBps=r["crc32"][0],
                raw_MBps=r["shuffled_raw"][0],
                crc_cost_first_epoch_cpu=r["shuffled_raw"][1] / r["crc32"][1],
            )
        )
        shutil.rmtree(out)
    return results


def bare_forward_seconds(cfg):
    """The writer's loop without the writer: the same contexts, batches and forward pass.
    Returns (wall seconds, CPU seconds of all threads)."""
    model = GPT.from_pretrained(cfg.model).to(cfg.device)
    enc = load_tokenizer(cfg.model)

    @torch.inference_mode()
    def forward_loop():
        for _, idx, _ in cache.iter_batches(cfg, enc, cfg.tokens):
            model.run_with_acts(idx.to(cfg.device), logits=False)
        sync(cfg.device)

    sync(cfg.device)
    return timed(forward_loop)


def sequential_read(files):
    """Read every file front to back into one reused buffer: the raw rate of the disk/page cache."""
    buf = bytearray(max(os.path.getsize(f) for f in files))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            fh.readinto(memoryview(buf)[: os.path.getsize(f)])


def read_rates(path, batch_size, epochs=2):
    """Rates in MB/s of stored bytes, all from the page cache, as (wall, cpu) pairs: a raw
    sequential read of the shard files; shuffled batches dequantized to fp32 on the CPU; shuffled
    stored rows (what a GPU run moves, dequantizing on the device); in-order chunks, dequantized; a
    crc32 pass over every shard (what a reader adds in its first epoch: each chunk is checked once).

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
        else:  # keeps no batch alive
            t = timed(lambda: all(next(stream) is not None for _ in range(n_batches)))
        stream.close()
        return t

    def rate(nbytes, t):  # MB/s in wall time and in CPU time
        return nbytes / t[0] / 1e6, nbytes / t[1] / 1e6

    def crc32_pass():
        return all(not shards.check_shard(path, c.manifest, i, "crc32") for i in range(len(files)))

    shuffled_bytes = n_batches * batch_size * c.row_bytes()
    chunks = c.iter_chunks(batch_size, split="all")
    inorder = timed(lambda: all(chunk is not None for chunk in chunks))
    return dict(
        seq=rate(file_bytes, seq),
        shuffled=rate(shuffled_bytes, shuffled(True)),
        shuffled_raw=rate(shuffled_bytes, shuffled(False)),
        inorder=rate(c.n_tokens * c.row_bytes(), inorder),
        crc32=rate(file_bytes, timed(crc32_pass)),
    )


def main(argv=None):
    return run_study(__doc__, "cache", run, CacheBench, argv)


if __name__ == "__main__":
    run_main(main)

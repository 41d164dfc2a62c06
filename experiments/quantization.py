"""
experiments/quantization.py: is a coarser cache as good to train on? int4 (per-group scales),
CLT-Forge's scheme (one scale per layer per split per file) and zstd against fp32 and our int8,
judged by what matters: the held-out FVU and loss recovered of a CLT trained from each.

The tiny model's real activations (models/tiny, its toy corpus) are cached once in fp32 (and in int8
for the read rate and zstd); each scheme's round trip (encode, decode) is applied to the training
rows, and the same recipe (train.build, train.train_step, the cache's own shuffled order of row ids)
trains one CLT from each, which train.evaluate scores on held-out contexts run through the GPT (not
the cache). NMSE: Σ||x̂ − x||² / Σ||x||² over the training rows, mlp_in / mlp_out. Bytes per token:
the format's activations and scales (int8: shards.row_bytes); + zstd: level 3, ~1 MB chunks, measured.
Read rate: shuffled batches of 1024 rows -> float32, tok/s: fp32 and int8 from the caches on disk
(ActivationCache.batches + dequantize); the others' decode of stored bytes held in memory (what
they add to a read), zstd's decompression included.

    python experiments/quantization.py             # 75k tokens, 5 CLTs: ~30 min on 2 shared cores
    python experiments/quantization.py --quick     # a smaller cache and fewer steps
zstd needs `pip install zstandard` (a study-only dependency; its rows say so when missing).
"""

import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

import cache as K
import train
from experiments.common import Bench, run_study
from forge import checkpoint, shards
from forge.cli import arg, run_main
from forge.hub import DEFAULT_MODEL, load_tokenizer
from model import load_model
from parallel import Mesh


@dataclass
class QuantizationBench(Bench):
    """fp32 / int8 / int4 / CLT-Forge's scheme / zstd caches, judged by the CLT trained from each"""

    quant_tokens: int = arg(75_000, "tokens of the tiny model's caches (fp32 and int8)")
    quant_steps: int = arg(250, "training steps of each CLT (1024 tokens each)")
    quant_features: int = arg(1024, "CLT features per layer (train.py's default)")
    quant_groups: str = arg("8,16,32,64,128", "int4 group sizes measured (NMSE, bytes)")
    quant_group: int = arg(32, "the int4 group size trained (chosen from the measured ones)")
    quant_contexts: int = arg(128, "held-out contexts of the evaluation")


def run(cfg):
    """NMSE and bytes of every scheme; a CLT trained from each lossy one; zstd's rows."""
    if cfg.quick:
        cfg.quant_steps //= 4
    fp32 = K.ActivationCache(build(cfg, "fp32"))
    int8 = K.ActivationCache(build(cfg, "int8"))
    lo, hi = fp32.split_range("train")
    x_in, x_out = fp32.read(lo, hi)[:2]  # (N, L, d) each, the training rows
    L, d = fp32.n_layers, fp32.d_model
    file_rows = fp32.manifest["shard_tokens"]  # CLT-Forge: one scale per layer per split per file
    rows = []
    for g in (int(s) for s in cfg.quant_groups.split(",")):  # the group size's measurement
        x_hat = [int4(x, int8.channel_scale[j], g)[0] for j, x in enumerate((x_in, x_out))]
        rows.append(row(f"int4, group {g} (NMSE only)", int4_bytes(L, d, g), x_in, x_out, x_hat))
    g = cfg.quant_group
    ours8 = "int8, ours (one scale per row)"
    forge8 = "int8, CLT-Forge (per layer, split, file)"
    schemes = {
        "fp32": (4 * 2 * L * d, identity),
        ours8: (shards.row_bytes("int8", L, d), ours_int8),
        f"int4, ours (group {g})": (int4_bytes(L, d, g), partial(int4, group=g)),
        forge8: (2 * L * d, partial(forge, bits=8, file_rows=file_rows)),
        "int4, CLT-Forge (per layer, split, file)": (
            L * d,
            partial(forge, bits=4, file_rows=file_rows),
        ),
    }
    gpt = load_model(DEFAULT_MODEL)
    bos = load_tokenizer(gpt.name_or_path).eot_token
    contexts = checkpoint.heldout_contexts(fp32, cfg.quant_contexts, bos)
    for name, (nbytes, codec) in schemes.items():
        coded = [codec(x, int8.channel_scale[j]) for j, x in enumerate((x_in, x_out))]
        x_hat = [c[0] for c in coded]
        r = row(name, nbytes, x_in, x_out, x_hat)
        r.update(trained(cfg, fp32, x_hat, lo, gpt, contexts))
        r["read_tok_s"] = read_rate(fp32 if name == "fp32" else int8, coded, name)
        rows.append(r)
        if name == ours8:  # zstd on the shard files themselves
            rows.append(zstd_row(name, int8, r))
        elif name != "fp32":
            rows.append(zstd_row(name, coded, r))
        del coded, x_hat
    keys = list(dict.fromkeys(k for r in rows for k in r))  # print_table: the same keys in each
    return [{k: r.get(k, "-") for k in keys} for r in rows]


def build(cfg, dtype):
    """The tiny model's cache in `dtype` under <out>/quantization (reused when complete)."""
    out = os.path.join(cfg.out, "quantization", dtype)
    c = K.CacheConfig(tokens=cfg.quant_tokens, dtype=dtype, out=out, heldout=0.05)
    K.build_cache(c)
    return out


# -----------------------------------------------------------------------------
# the schemes: x (n, L, d) float32 -> (x̂ float32, the stored arrays)


def identity(x, channel):
    return x, [x.numpy()]


def ours_int8(x, channel):
    """cache.py's int8: x / channel, one bf16 absmax scale per (token, layer)."""
    q, bits, _, _ = K.quantize_rows(x, "int8", channel)
    return K.dequantize(q, bits, channel), [q.numpy(), bits]


def int4(x, channel, group):
    """cache.py's int4 at any group size (shards.INT4_GROUP: what --dtype int4 stores): x / channel,
    one bf16 absmax scale per `group` channels of a (token, layer), q in -7..7, two per byte."""
    n, L, d = x.shape
    y = (x / channel).view(n, L, d // group, group)
    q, scale, s = K.quantize_(y, 7)  # y now holds q as floats
    x_hat = y.mul_(s).view(n, L, d) * channel
    packed = shards.pack_int4(q.view(n, L, d))  # (n, L, d/2)
    return x_hat, [packed.numpy(), scale[..., None].view(torch.int16).numpy()]


def int4_bytes(L, d, group):
    return 2 * (L * d // 2 + 2 * L * d // group)  # in and out: nibbles and bf16 scales


def forge(x, channel, bits, file_rows):
    """CLT-Forge's scheme: per file of file_rows rows, one absmax scale per layer (per split)."""
    levels = 2 ** (bits - 1) - 1
    x_hat, stored = [], []
    for chunk in x.split(file_rows):  # (r, L, d)
        s = chunk.abs().amax((0, 2), keepdim=True).clamp_min(1e-30) / levels  # (1, L, 1)
        q = (chunk / s).round_().clamp_(-levels, levels)
        x_hat.append(q * s)
        q8 = q.to(torch.int8)
        stored.append((shards.pack_int4(q8) if bits == 4 else q8).numpy())
    return torch.cat(x_hat), [np.concatenate(stored)]


# -----------------------------------------------------------------------------
# measurements


def row(name, nbytes, x_in, x_out, x_hat):
    nmse = [float((h - x).pow(2).sum() / x.pow(2).sum()) for x, h in zip((x_in, x_out), x_hat)]
    return dict(scheme=name, bytes_token=nbytes, nmse_in=nmse[0], nmse_out=nmse[1])


def trained(cfg, fp32, x_hat, lo, gpt, contexts):
    """train.py's recipe on the decoded rows x̂ (in, out), in the fp32 cache's shuffled order of row
    ids (the normalization from its manifest); train.evaluate on held-out contexts."""
    c = train.TrainConfig(
        cache=fp32.path, features=cfg.quant_features, steps=cfg.quant_steps, eval_every=-1
    )
    mesh = Mesh()
    device = torch.device("cpu")
    clt, opt = train.build(c, fp32, mesh, device)
    clocks = torch.zeros(fp32.n_layers, c.features, dtype=torch.long)
    state = dict(step=0, since_fired=clocks, first_bad=torch.tensor(-1))
    stream = fp32.batches(c.batch_size, c.seed)
    t0 = time.perf_counter()
    for step in range(c.steps):
        ids = next(stream).ids - lo  # the rows train.py would read at this step
        batch = (x_hat[0][ids], x_hat[1][ids])
        train.train_step(c, clt, opt, batch, state, mesh, device, sync=step == c.steps - 1)
    stream.close()
    seconds = time.perf_counter() - t0
    m = train.evaluate(gpt, clt, contexts)
    fvu = sum(m["fvu"]) / len(m["fvu"])
    return dict(fvu=fvu, recovered=m["recovered"], l0=sum(m["l0"]), train_s=seconds)


def read_rate(cache, coded, name, batches=20):
    """Shuffled batches of 1024 rows -> float32, tok/s: from disk for fp32 and int8 (real caches),
    else the decode of the stored arrays in memory (gathered rows, decoded as the scheme would)."""
    if name == "fp32" or name.startswith("int8, ours"):
        stream = cache.batches(1024, seed=1)
        t0 = time.perf_counter()
        for _ in range(batches):
            cache.dequantize(next(stream))
        stream.close()
        return batches * 1024 / (time.perf_counter() - t0)
    stored = [c[1] for c in coded]  # per split, the arrays the scheme stores
    n = len(stored[0][0])
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for _ in range(batches):
        ids = np.sort(rng.choice(n, 1024, replace=False))
        for arrays in stored:
            decode([a[ids] for a in arrays])
    return batches * 1024 / (time.perf_counter() - t0)


def decode(arrays):
    """Stored arrays of one split's rows -> float32 (as a reader would): unpack nibbles, scale."""
    q = torch.from_numpy(arrays[0])
    x = (shards.unpack_int4(q) if q.dtype == torch.uint8 else q).float()
    if len(arrays) > 1:  # per-group bf16 scales
        s = torch.from_numpy(arrays[1]).view(torch.bfloat16).float()  # (n, L, d/g, 1)
        x = (x.view(*s.shape[:-1], -1) * s).flatten(-2)
    return x


def zstd_row(name, source, base, level=3, chunk=1 << 20):
    """+ zstd (level 3, ~1 MB chunks, as a reader would decompress them): bytes/token measured,
    NMSE and the CLT's scores those of `base` (lossless); read rate: decompression + decode."""
    r = dict(base, scheme=f"{name} + zstd")
    try:
        import zstandard
    except ImportError:
        missing = "pip install zstandard"
        return dict(r, bytes_token=missing, read_tok_s=missing)
    if isinstance(source, K.ActivationCache):  # the real shard files, whole (headers, meta too)
        files = [os.path.join(source.path, s["file"]) for s in source.manifest["shards"]]
        blobs = [Path(f).read_bytes() for f in files]
        n = source.n_tokens
    else:
        blobs = [a.tobytes() for c in source for a in c[1]]
        n = len(source[0][1][0])
    comp = zstandard.ZstdCompressor(level=level)
    pieces = [comp.compress(b[i : i + chunk]) for b in blobs for i in range(0, len(b), chunk)]
    raw = sum(len(b) for b in blobs)
    packed = sum(len(p) for p in pieces)
    dec = zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    for p in pieces[:64]:
        dec.decompress(p)
    seconds = (time.perf_counter() - t0) * len(pieces) / min(64, len(pieces))
    per_token = packed / n
    rate = n / (seconds + n / base["read_tok_s"])  # decompress everything, then read as before
    return dict(r, bytes_token=per_token, read_tok_s=rate, zstd_saving=1 - packed / raw)


def main(argv=None):
    return run_study(__doc__, "quantization", run, QuantizationBench, argv)


if __name__ == "__main__":
    run_main(main)

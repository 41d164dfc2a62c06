"""
cache.py: the activation cache. Run GPT-2 over a corpus once, store every layer's MLP input and
output for each token in memory-mapped shards, and serve them to CLT training shuffled, per rank.

Data flow.  corpus -> documents -> tokens, packed into contexts [<|endoftext|>, t1 .. t_{ctx-1}]
-> GPT.run_with_acts(logits=False) -> mlp_in, mlp_out (B, T, L, d) -> drop position 0 (the BOS,
whose activations are outliers) -> rows (N, L, d) -> int8 (x / channel scale, then one absmax scale
per token, layer and in/out) or fp16 / fp32 -> fixed-size shard files + manifest.json (a sha256 per
shard, a crc32 per chunk of rows)
==>  ActivationCache(path).batches(...) -> Rows: the stored rows of each shuffled batch and their
row ids, read and crc-checked on background threads; ActivationCache.dequantize(rows, device) ->
(mlp_in, mlp_out) float32 (B, L, d) on the consumer's device. read / iter_chunks give rows in order.

    python cache.py --help
    python cache.py --model models/tiny --corpus toy --tokens 1000000 --out runs/cache   # ~1 GB int8
    python cache.py --tokens 20000 --out runs/cache_cpu   # the tiny model and its toy corpus, seconds
    python cache.py build --model gpt2 --corpus hf:HuggingFaceFW/fineweb:sample-10BT --tokens 10000000
    python cache.py verify runs/cache       # sizes, headers and sha256 of every shard
    python cache.py stats runs/cache        # tokens, bytes/token, per-layer norms, quantization error
    torchrun: build once with one process; every training rank opens the same cache and reads
    its own share: ActivationCache(path).batches(batch_size, seed, rank, world)

Corpora (--corpus): "toy" (toyworld.toy_corpus); a .txt file (documents separated by <|endoftext|>); a
.jsonl (one object per line) or a .json list (of strings or objects); a .parquet file; a folder of
.txt / .jsonl / .parquet files (sorted by path); hf:NAME[:config][:split], a Hugging Face dataset,
streamed (split defaults to train). --text-field names the field or column holding the text.

Re-running the same command resumes after a crash (even kill -9) from the last shard the manifest
lists (a few shards back at most, see MANIFEST_RATIO), and repairs: it first checks every listed
shard (size, header, the crc32 of each chunk of rows) and rewrites the damaged ones. Both give a
byte-identical cache: every shard is a deterministic function of the arguments, because the
contexts come in a fixed grid of forward batches (the same batch shapes give the same floats).
--overwrite starts again from nothing.

Where we follow and where we differ. CLT-Forge (LLM-Interp/CLT-Forge) also caches and quantizes
activations; it keeps one scale per layer per file and loads whole files into RAM. Here:
- one int8 scale per (token, layer, in/out): NMSE ~ (max|x| / rms x)^2 / (12 * 127^2) per row;
  outlier channels are first evened out by a fixed per-channel scale (SmoothQuant-style, computed
  on the first batch and kept in the manifest): on the tiny model the worst layer's NMSE goes from
  2e-4 to ~4e-5;
- scales are bfloat16 (the fp32 range, 2 bytes): q is computed with the rounded scale, so the
  error bound |x - q*s| <= s/2 holds exactly as with fp32 scales;
- shards are numpy.memmap'd, each with a magic/version header (llm.c's `_peek_data_shard`); the
  manifest holds each shard's size, sha256 (`verify` reads whole files) and a crc32 per ~1 MB chunk
  of rows, and running totals of the statistics (~1 KB per shard at GPT-2-small shape). It is
  rewritten atomically after a finished shard once the shards since its last write hold
  MANIFEST_RATIO times its size: rewriting stays a small share of the writes at any length (a
  rewrite per shard would be quadratic: 27k shards at 100M tokens of GPT-2 small). The reader
  checks a chunk's crc32 the first time it reads a row of it, on its worker threads: training
  never sees a damaged row, at the price of one crc32 pass, ~2 GB/s per thread, over the chunks a
  process touches (a rank touches nearly all of them in its first epoch, whatever the world size,
  and nothing after);
- the reader shuffles globally (random unit order x random rows inside a window of units), reads
  each batch's rows straight from the memmaps (no copy of the window), and stripes each global
  batch over ranks: the union of the ranks' batches does not depend on the world size, and every
  rank gets the same number of batches. It yields stored rows; the consumer dequantizes them where
  it computes (4x less to move to a GPU for int8).
"""
import hashlib
import json
import os
import queue
import shlex
import shutil
import sys
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm
from forge import corpora
from forge.cli import arg, parse_config, run_main
from forge.files import atomic_path, check_same_model, write_json
from forge.hub import DEFAULT_MODEL, load_tokenizer, resolve_model_dir
from model import GPT


# -----------------------------------------------------------------------------
# on-disk format

FORMAT = "clt-forge-activation-cache"
VERSION = 2  # 2: a crc32 per chunk of rows in the manifest
MAGIC = 20251126  # header[0] of every shard file
HEADER_INTS = 32  # the header is 32 int64 = 256 bytes, see shard_layout
ALIGN = 64  # every section starts on a 64-byte boundary
DTYPES = {"fp32": (0, np.float32), "fp16": (1, np.float16), "int8": (2, np.int8)}
SECTIONS = ("mlp_in", "mlp_out", "scales", "meta")  # after the header, in file order
MANIFEST = "manifest.json"
CHECK_BYTES = 1 << 20  # a crc32 covers about this many stored bytes of consecutive rows
MAX_OPEN_SHARDS = 256  # memmaps a reader keeps open at once
MANIFEST_RATIO = 64  # rewrite the manifest once the shards since its last write hold 64x its bytes
STATS = ("norm", "sq", "err")  # the manifest's running totals, each (2, L) float64: see _ShardBuffer.add


def _pad(n):
    return -(-n // ALIGN) * ALIGN


def shard_name(i):
    return f"shard_{i:05d}.bin"


def shard_layout(dtype, rows, L, d):
    """Byte offsets and total size of one shard file. The file is, in order:

    header   (32,) int64   [MAGIC, VERSION, dtype code, rows, L, d, off_in, off_out, off_scales,
                            off_meta, file bytes, 0...]
    mlp_in   (rows, L, d)  dtype; for int8 q = round(x / (channel * scale)) in [-127, 127], where
                           channel (L, d) is the manifest's channel_scale[0] (see channel_scales)
    mlp_out  (rows, L, d)  dtype
    scales   (rows, 2, L)  int16 = the bits of a bfloat16 scale; [:, 0] for mlp_in, [:, 1] for
                           mlp_out (int8 only; empty otherwise)
    meta     (rows, 3)     int32: token id, document id, position in its context
    """
    isz = np.dtype(DTYPES[dtype][1]).itemsize
    acts = _pad(rows * L * d * isz)
    scales = _pad(rows * 2 * L * 2) if dtype == "int8" else 0
    off_in = _pad(HEADER_INTS * 8)
    off = dict(mlp_in=off_in, mlp_out=off_in + acts, scales=off_in + 2 * acts, meta=off_in + 2 * acts + scales)
    return off, off["meta"] + _pad(rows * 3 * 4)


def row_bytes(dtype, L, d):
    """Stored bytes of one row's activations and scales (without its 12 bytes of token/doc/position)."""
    return 2 * L * d * np.dtype(DTYPES[dtype][1]).itemsize + (4 * L if dtype == "int8" else 0)


def _header(dtype, rows, L, d):
    off, size = shard_layout(dtype, rows, L, d)
    h = np.zeros(HEADER_INTS, dtype=np.int64)
    h[:11] = [MAGIC, VERSION, DTYPES[dtype][0], rows, L, d, off["mlp_in"], off["mlp_out"],
              off["scales"], off["meta"], size]
    return h


def _sections(buf, dtype, rows, L, d):
    """The sections of one shard file's bytes (a uint8 memmap) as numpy views; scales None unless int8."""
    off, _ = shard_layout(dtype, rows, L, d)
    act = DTYPES[dtype][1]
    specs = dict(mlp_in=(act, (rows, L, d)), mlp_out=(act, (rows, L, d)), meta=(np.int32, (rows, 3)))
    if dtype == "int8":  # fp16 / fp32 shards have no scales section (it has 0 bytes)
        specs["scales"] = (np.int16, (rows, 2, L))
    views = dict(scales=None)
    for key, (kind, shape) in specs.items():
        n = int(np.prod(shape)) * np.dtype(kind).itemsize
        views[key] = buf[off[key]:off[key] + n].view(kind).reshape(shape)
    return views


def _crc32(sections, a, b):
    """crc32 of rows a..b-1 of one shard: their mlp_in, mlp_out, scales and meta, in that order.
    The writer computes it from its buffers, the reader from the memmapped file."""
    crc = 0
    for key in SECTIONS:
        if sections[key] is not None:
            crc = zlib.crc32(sections[key][a:b], crc)
    return crc


def _open_manifest(path):
    """Read path/manifest.json and check what every user of it relies on: format, version, and shard
    names that stay inside the cache directory. Returns the manifest."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"{path} has no {MANIFEST}: not an activation cache (build one with cache.py)")
    with open(mpath) as f:
        try:
            m = json.load(f)
        except json.JSONDecodeError as e:  # manifests are written whole: this one was edited or damaged
            raise ValueError(f"{mpath} is not valid JSON ({e}): rebuild the cache with "
                             "`python cache.py ... --overwrite`") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(f"{mpath} is format {m.get('format')} version {m.get('version')}, this cache.py reads "
                         f"{FORMAT} version {VERSION}: rebuild the cache with `python cache.py ... --overwrite`")
    for i, s in enumerate(m["shards"]):
        if s.get("file") != shard_name(i):  # never open a path a manifest names: only our own files
            raise ValueError(f"{mpath} lists shard {i} as {s.get('file')!r}, not {shard_name(i)!r}: the manifest "
                             f"was edited or damaged; rebuild the cache with `python cache.py ... --overwrite`")
    return m


def _check_shard(path, m, i, content=""):
    """What is wrong with shard i of manifest m ("" if nothing): missing, size, header (cheap);
    content="crc32" also checks each chunk's crc32, content="sha256" the whole file's sha256."""
    s = m["shards"][i]
    p = os.path.join(path, s["file"])
    if not os.path.exists(p):
        return f"{s['file']}: missing"
    if os.path.getsize(p) != s["bytes"]:
        return f"{s['file']}: {os.path.getsize(p)} bytes, manifest says {s['bytes']}"
    h = np.fromfile(p, dtype=np.int64, count=HEADER_INTS)
    if h[0] != MAGIC or h[1] != VERSION:
        return (f"{s['file']}: magic {h[0]}, version {h[1]}, expected magic {MAGIC}, version {VERSION}: "
                "not written by this cache.py, or damaged")
    want = _header(m["dtype"], s["rows"], m["n_layers"], m["d_model"])
    if not np.array_equal(h, want):
        return (f"{s['file']}: header {h[:11].tolist()} disagrees with the manifest {want[:11].tolist()} "
                "([magic, version, dtype, rows, L, d, offsets..., bytes])")
    if content == "sha256":
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        if digest.hexdigest() != s["sha256"]:
            return f"{s['file']}: sha256 {digest.hexdigest()[:16]}... != manifest {s['sha256'][:16]}..."
    if content == "crc32":
        views = _sections(np.memmap(p, dtype=np.uint8, mode="r"), m["dtype"], s["rows"], m["n_layers"], m["d_model"])
        C = m["check_rows"]
        for j, crc in enumerate(s["crc32"]):
            if _crc32(views, j * C, (j + 1) * C) != crc:
                return f"{s['file']}: rows {j * C}..{min((j + 1) * C, s['rows']) - 1} fail their crc32 check"
    return ""


def repair_command(path, m):
    """The build command that made the cache at `path`: rerun, it rewrites damaged shards."""
    made = dict(m["identity"], model=m["model"], device=m["device"], out=path)
    args = ["python", "cache.py", "build"]
    for f in fields(CacheConfig):
        value = made.get(f.name, f.default)
        if value != f.default and isinstance(value, bool):
            args.append(f"--{'' if value else 'no-'}{f.name.replace('_', '-')}")
        elif value != f.default:
            args += [f"--{f.name.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(args)


# -----------------------------------------------------------------------------
# quantization: symmetric absmax, one scale per (token, layer)


def quantize(x):
    """x (n, L, d) float32 -> q (n, L, d) int8, scale (n, L) bfloat16 with x ~ q * scale.

    scale = max|x| / 127 rounded to bf16 (relative error <= 2^-8), and q = round(x / scale) with that
    rounded scale, clamped to +-127: |x - q*scale| <= scale/2 for every element.
    """
    q, scale, _ = _quantize_(x.clone())
    return q, scale


def _quantize_(y):
    """quantize, overwriting y (n, L, d) with q as floats: one big temporary fewer, for the writer."""
    absmax = torch.maximum(y.amax(-1), -y.amin(-1))  # (n, L); 25x faster than vector_norm(ord=inf) on CPU
    scale = (absmax / 127).to(torch.bfloat16)  # (n, L)
    s = scale.float().clamp_min(1e-30)[..., None]  # an all-zero row has scale 0 and q = 0
    y.div_(s).round_().clamp_(-127, 127)
    return y.to(torch.int8), scale, s  # (n, L, d), (n, L), (n, L, 1)


def channel_scales(x):
    """x (..., L, d) -> (L, d) float32 c = sqrt(rms over tokens of each channel), floored at 1e-3 of
    the layer's mean: int8 stores x / c. Trained models have outlier channels (max|x| ~ 8 rms on the
    tiny model) that make one scale per row coarse for every other channel; dividing by c first
    evens them out, with SmoothQuant's migration strength 0.5 (Xiao et al. 2023)."""
    rms = x.pow(2).mean(tuple(range(x.dim() - 2))).sqrt()  # (L, d); one float32 temporary of x's size
    return rms.clamp_min(1e-3 * rms.mean(-1, keepdim=True)).clamp_min(1e-30).sqrt().float()


def bf16_bits(scale):
    """(..) bfloat16 tensor -> its bits as an int16 numpy array (numpy has no bfloat16)."""
    return scale.cpu().view(torch.int16).numpy()


def empty(shape, dtype=torch.float32, device="cpu"):
    """torch.empty, but on the CPU through numpy: numpy asks Linux for transparent huge pages for
    large arrays (madvise), so first touching a fresh batch costs one page fault per 2 MB, not per
    4 kB: 4x faster fresh batches on our VMs. Every big per-batch buffer of this file comes from here."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


def dequantize(q, scale_bits=None, channel=None):
    """Stored rows -> float32 torch on q's device. q (n, L, d) int8, fp16 or fp32 (numpy or torch);
    for int8 also scale bits (n, L) int16 and channel scales (L, d): x = q * scale * channel.

    Convert, then scale in place: vectorized passes beat torch's mixed-dtype int8*float kernel 3x.
    """
    q = torch.as_tensor(q)
    x = q if q.dtype == torch.float32 else empty(q.shape, device=q.device).copy_(q)
    if scale_bits is None:
        return x
    s = torch.as_tensor(scale_bits).to(x.device).view(torch.bfloat16)  # (n, L)
    return x.mul_(s.float()[..., None]).mul_(channel.to(x.device))  # (n, L, d)


# -----------------------------------------------------------------------------
# corpus: documents -> packed contexts


def iter_contexts(docs, enc, ctx):
    """Pack documents into contexts: yield (tokens (ctx,), doc ids (ctx,)) int32.

    The token stream is doc0 <|eot|> doc1 <|eot|> ...; each context is [<|eot|>] + the next ctx-1
    stream tokens, so every context starts with the same BOS. A separator belongs to the document
    it ends; the BOS gets the document of the token after it.
    """
    eot = enc.eot_token
    toks, ids = [], []
    for doc_id, doc in enumerate(docs):
        t = enc.encode_ordinary(doc) + [eot]
        toks += t
        ids += [doc_id] * len(t)
        while len(toks) >= ctx - 1:
            out_t = np.array([eot] + toks[:ctx - 1], dtype=np.int32)
            out_i = np.array([ids[0]] + ids[:ctx - 1], dtype=np.int32)
            del toks[:ctx - 1], ids[:ctx - 1]
            yield out_t, out_i


def iter_batches(cfg, enc, n_rows):
    """Yield (first row, idx (B, ctx) int64, meta (B*R, 3) int32) on a fixed grid of batch_size
    contexts, until n_rows rows; R = rows kept per context. The grid makes resume byte-exact."""
    R = rows_per_context(cfg)
    drop = 0 if cfg.keep_bos else 1
    pos = np.arange(drop, cfg.ctx, dtype=np.int32)
    contexts = iter_contexts(corpora.iter_documents(cfg.corpus, cfg.seed, cfg.text_field), enc, cfg.ctx)
    row = 0
    while row < n_rows:
        batch = [c for _, c in zip(range(cfg.batch_size), contexts)]
        if not batch:
            return
        tok = np.stack([t for t, _ in batch])  # (B, ctx)
        doc = np.stack([i for _, i in batch])  # (B, ctx)
        meta = np.stack([tok[:, drop:], doc[:, drop:], np.broadcast_to(pos, tok[:, drop:].shape)], -1)
        yield row, torch.from_numpy(tok).long(), meta.reshape(-1, 3)  # (B*R, 3)
        row += len(batch) * R


def rows_per_context(cfg):
    return cfg.ctx if cfg.keep_bos else cfg.ctx - 1


def tokenizer_fingerprint(model_dir):
    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(model_dir, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# writer: build_cache, then its helpers in the order it calls them


@dataclass
class CacheConfig:
    """build or resume a cache, or repair a damaged one (the default when no subcommand is given)"""
    model: str = arg(DEFAULT_MODEL, 'model directory in the hub layout (or a hub id)', group='what to run')
    corpus: str = arg("toy", 'toy | a .txt, .jsonl, .json or .parquet file | a folder of them | hf:NAME[:config][:split]')
    text_field: str = arg("text", 'the field (.jsonl, .json) or column (.parquet, hf:) that holds each document')
    seed: int = arg(0, 'seed of the toy corpus')
    tokens: int = arg(200_000, 'rows to store (tokens kept after dropping the BOS); ~15 s, 210 MB on the tiny model')
    ctx: int = arg(64, "context length, BOS included; at most the model's n_ctx")
    keep_bos: bool = arg(False, 'keep position 0 (the BOS) instead of dropping it')
    dtype: str = arg("int8", 'int8 (per-row absmax) | fp16 | fp32', group='how to store it')
    out: str = arg("runs/cache", 'output directory')
    heldout: float = arg(0.02, 'fraction of rows (whole contexts, at the end) held out for evaluation')
    shard_tokens: int = arg(0, 'rows per shard file; 0 = about 64 MB of activations per shard')
    batch_size: int = arg(64, "contexts per forward pass (part of the cache's identity: it fixes the floats)")
    device: str = arg("auto", 'auto | cpu | cuda | ...; resume on the same device for byte-identical shards')
    overwrite: bool = arg(False, 'delete the cache in --out (made with any arguments) and build it again')


def build_cache(cfg: CacheConfig):
    """Build, resume or repair the cache cfg describes; returns the finished manifest.

    The returned dict also carries "seconds" and "cpu_seconds" (all threads): the wall and CPU time
    of the corpus -> shards loop alone (0 when there was nothing to write).
    """
    model_dir = resolve_model_dir(cfg.model)
    device = _resolve_device(cfg.device)
    model = GPT.from_pretrained(model_dir).to(device)
    _check_config(cfg, model)
    enc = load_tokenizer(model_dir)
    L, d = model.config.n_layer, model.config.n_embd
    if cfg.shard_tokens == 0:
        cfg = replace(cfg, shard_tokens=max(1, (64 << 20) // row_bytes(cfg.dtype, L, d)))
    identity = _identity(cfg, model.fingerprint(), tokenizer_fingerprint(model_dir))
    name = os.path.realpath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # what readers load
    header = dict(model=name, model_config=asdict(model.config), n_layers=L, d_model=d, dtype=cfg.dtype,
                  ctx=cfg.ctx, keep_bos=cfg.keep_bos, shard_tokens=cfg.shard_tokens, device=device,
                  check_rows=max(1, CHECK_BYTES // row_bytes(cfg.dtype, L, d)),
                  channel_scale=_first_batch_channel_scales(cfg, model, enc))
    manifest = _open_out_dir(cfg, identity, header)
    repairs = _damaged_shards(cfg.out, manifest)
    uncounted = _uncounted_shards(manifest)
    resume = sys.maxsize if manifest["complete"] else len(manifest["shards"])  # new shards start here
    if manifest["complete"] and not repairs:
        print(f"{cfg.out} is already complete ({manifest['n_tokens']} tokens; every shard's size, header and "
              "crc32 checked): nothing to do")
        return dict(manifest, seconds=0.0, cpu_seconds=0.0)
    _check_disk(cfg, L, d, resume)
    t0 = time.perf_counter()
    c0 = time.process_time()
    _write_rows(cfg, model, enc, manifest, set(repairs), resume, uncounted)
    if uncounted:  # listed shards whose statistics the totals lack: forward them again (same bytes, checked)
        _write_rows(cfg, model, enc, manifest, set(uncounted), sys.maxsize, uncounted)
    _finalize(manifest, cfg)
    write_json(os.path.join(cfg.out, MANIFEST), manifest)
    if manifest["n_tokens"] < cfg.tokens:
        print(f"note: corpus {cfg.corpus} ran out after {manifest['n_tokens']} of the {cfg.tokens} tokens asked for")
    return dict(manifest, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)


def _resolve_device(device):
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_config(cfg, model):
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}: choose one of {list(DTYPES)}")
    if not 2 <= cfg.ctx <= model.config.n_ctx:
        raise ValueError(f"ctx={cfg.ctx} must be in 2..n_ctx={model.config.n_ctx} of {cfg.model}")
    if cfg.tokens <= 0 or cfg.shard_tokens < 0 or cfg.batch_size <= 0:
        raise ValueError(f"tokens, shard_tokens, batch_size must be positive, got {cfg.tokens}, "
                         f"{cfg.shard_tokens}, {cfg.batch_size}")
    if not 0 <= cfg.heldout < 1:
        raise ValueError(f"heldout must be in [0, 1), got {cfg.heldout}")


def _identity(cfg, model_sha, tok_sha):
    """What determines the cache's bytes: a rerun resumes only if all of these agree."""
    local = cfg.corpus != "toy" and not cfg.corpus.startswith("hf:")
    return dict(model_sha256=model_sha, tokenizer_sha256=tok_sha,
                corpus=os.path.realpath(cfg.corpus) if local else cfg.corpus, text_field=cfg.text_field,
                tokens=cfg.tokens, ctx=cfg.ctx, dtype=cfg.dtype, keep_bos=cfg.keep_bos, heldout=cfg.heldout,
                shard_tokens=cfg.shard_tokens, batch_size=cfg.batch_size, seed=cfg.seed)


@torch.inference_mode()
def _first_batch_channel_scales(cfg, model, enc):
    """int8 only: channel scales (2, L, d) as nested lists, from the first forward batch of the grid."""
    if cfg.dtype != "int8":
        return None
    _, idx, _ = next(iter_batches(cfg, enc, cfg.tokens), (None, None, None))
    if idx is None:
        raise ValueError(f"corpus {cfg.corpus} gave no context of {cfg.ctx - 1} tokens: it is empty or too short")
    _, acts = model.run_with_acts(idx.to(next(model.parameters()).device), logits=False)
    drop = 0 if cfg.keep_bos else 1
    scales = [channel_scales(acts.mlp_in[:, drop:]), channel_scales(acts.mlp_out[:, drop:])]  # 2 x (L, d)
    return torch.stack(scales).cpu().tolist()


def _open_out_dir(cfg, identity, header):
    """Create the output directory or resume in it: returns the manifest to continue from."""
    path = os.path.join(cfg.out, MANIFEST)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the cache directory {cfg.out}: {e}") from e
    if os.path.exists(path) and not cfg.overwrite:
        old = _open_manifest(cfg.out)
        diff = {k: (old["identity"].get(k), v) for k, v in identity.items() if old["identity"].get(k) != v}
        if diff:
            raise ValueError(f"{cfg.out} holds a cache made with other arguments ({{field: (cache, now)}}: {diff}); "
                             "pass --overwrite to replace it, or choose another --out")
        if old["channel_scale"] != header["channel_scale"]:
            raise ValueError(f"{cfg.out}: the first batch now gives other int8 channel scales than when the cache was "
                             "started: the corpus or the device changed; resume where it began, or pass --overwrite")
        return old
    if not os.path.exists(path) and any(not _is_cache_file(n) for n in os.listdir(cfg.out)):
        raise ValueError(f"{cfg.out} exists, is not empty and has no {MANIFEST}: choose another --out")
    _remove_cache_files(cfg.out)  # --overwrite, or shards whose manifest was deleted
    manifest = dict(format=FORMAT, version=VERSION, complete=False, identity=identity, **header, shards=[])
    try:
        write_json(path, manifest)
    except OSError as e:
        raise ValueError(f"cannot write to {cfg.out}: {e}") from e
    return manifest


def _is_cache_file(name):
    return name.startswith(("shard_", MANIFEST))


def _remove_cache_files(out):
    for name in os.listdir(out):  # only our own files: never a user's
        if _is_cache_file(name):
            os.remove(os.path.join(out, name))


def _damaged_shards(out, manifest):
    """The finished shards that fail a check (size, header, crc32 of each chunk), to be rewritten.
    This reads every finished shard once, at crc32 speed: far less than the forward passes that made them."""
    listed = len(manifest["shards"])
    damaged = []
    for i in tqdm(range(listed), desc="check", unit="shard", disable=None if listed > 1 else True):
        problem = _check_shard(out, manifest, i, "crc32")
        if problem:
            print(f"repairing {problem}")
            damaged.append(i)
    return damaged


def _uncounted_shards(manifest):
    """The listed shards missing from the running totals: none, unless the manifest was cut or edited
    by hand (its totals then cover other shards than it lists). The totals then restart from zero and
    all listed shards are counted again."""
    sums = manifest.get("sums")
    if sums is not None and sums["shards"] == len(manifest["shards"]):
        return set()
    manifest["sums"] = dict(shards=0, **{k: np.zeros((2, manifest["n_layers"])).tolist() for k in STATS})  # (2, L)
    return set(range(len(manifest["shards"])))


def _check_disk(cfg, L, d, resume):
    _, one = shard_layout(cfg.dtype, cfg.shard_tokens, L, d)
    need = max(0, -(-cfg.tokens // cfg.shard_tokens) - resume) * one
    free = shutil.disk_usage(cfg.out).free
    if need > free:
        raise ValueError(f"the cache needs {need / 1e9:.2f} GB more but {cfg.out} has {free / 1e9:.2f} GB free")


@torch.inference_mode()
def _write_rows(cfg, model, enc, manifest, repairs, resume, uncounted):
    """The main loop: forward the batches that hold rows of the shards to write (those in `repairs`
    and those from `resume` on; the other batches are only tokenized), drop the BOS, add the rows to
    shard buffers; the writer lists each finished shard in the manifest and adds the statistics of
    new shards and `uncounted` ones to its totals."""
    L, d, S = model.config.n_layer, model.config.n_embd, cfg.shard_tokens
    drop = 0 if cfg.keep_bos else 1
    dev = next(model.parameters()).device
    last = max(repairs, default=-1) if resume == sys.maxsize else sys.maxsize  # the last shard to write
    writer = _ShardWriter(cfg.out, manifest, uncounted)
    channel = torch.tensor(manifest["channel_scale"]) if manifest["channel_scale"] else None  # (2, L, d)
    buf = None
    row = 0
    before = None  # the previous batch's meta
    n_new = max(0, -(-cfg.tokens // S) - resume)
    pbar = tqdm(total=min((len(repairs) + n_new) * S, cfg.tokens), unit="tok", desc="cache", disable=None)
    try:
        for row0, idx, meta in iter_batches(cfg, enc, cfg.tokens):
            hi = min(row0 + len(meta), cfg.tokens)
            row = hi
            if row0 // S > last:
                break
            shards = [k for k in range(row0 // S, (hi - 1) // S + 1) if k in repairs or k >= resume]
            if not shards:
                before = meta  # only tokenized, never run
                continue
            if shards[0] == resume > 0 and resume - 1 not in repairs and row0 <= resume * S:
                _check_resume_tokens(cfg, manifest, meta[:resume * S - row0] if row0 < resume * S else before)
            x_in, x_out = _forward_rows(model, idx.to(dev), drop)
            for k in shards:  # the batch's rows, split at shard boundaries
                a = max(k * S, row0) - row0
                b = min((k + 1) * S, hi) - row0
                if buf is None:
                    buf = writer.buffer(k, cfg, L, d, channel)
                buf.add(x_in[a:b], x_out[a:b], meta[a:b])
                pbar.update(b - a)
                if buf.rows == S:
                    writer.put(buf)
                    buf = None
            del x_in, x_out  # before the next forward pass, not after it: memory is bounded by one batch
            before = meta
        if row == 0:
            raise ValueError(f"corpus {cfg.corpus} gave no context of {cfg.ctx - 1} tokens: it is empty or too short")
        if buf is not None:
            writer.put(buf)
    finally:
        pbar.close()
        writer.close()


def _forward_rows(model, idx, drop):
    """idx (B, T) -> the rows to store, mlp_in and mlp_out (B*R, L, d), R = T - drop. Each source is let
    go as soon as it is copied: three (B, T, L, d)-sized tensors at most live at once, not five."""
    _, acts = model.run_with_acts(idx, logits=False)
    mlp_in = acts.mlp_in
    mlp_out = acts.mlp_out
    del acts  # and with it the attention patterns (B, nh, T, T) of every layer
    L, d = mlp_in.shape[2:]
    x_in = mlp_in[:, drop:].reshape(-1, L, d)  # (B*R, L, d), a copy without the BOS
    del mlp_in
    x_out = mlp_out[:, drop:].reshape(-1, L, d)  # (B*R, L, d)
    return x_in, x_out


def _check_resume_tokens(cfg, manifest, meta):
    """meta (n, 3): what the corpus now gives for the rows just before the resume point; compare it
    with the end of the last finished shard."""
    s = manifest["shards"][-1]
    path = os.path.join(cfg.out, s["file"])
    views = _sections(np.memmap(path, dtype=np.uint8, mode="r"), cfg.dtype, s["rows"], manifest["n_layers"],
                      manifest["d_model"])
    n = min(len(meta), s["rows"])
    if not np.array_equal(views["meta"][-n:], meta[-n:]):
        raise ValueError(f"{cfg.out}: the corpus {cfg.corpus} now gives other tokens than those stored in "
                         f"{s['file']}: it changed since the cache was started; pass --overwrite to rebuild")


class _ShardBuffer:
    """One shard's rows being filled in RAM, plus float64 sums for the manifest's statistics."""

    def __init__(self, index, cfg, L, d, channel):
        S = cfg.shard_tokens
        dt = DTYPES[cfg.dtype][1]
        self.dtype = cfg.dtype
        self.channel = channel  # (2, L, d)
        self.mlp_in = np.empty((S, L, d), dt)  # (S, L, d)
        self.mlp_out = np.empty((S, L, d), dt)  # (S, L, d)
        self.scales = np.empty((S, 2, L), np.int16) if cfg.dtype == "int8" else None  # (S, 2, L)
        self.meta = np.empty((S, 3), np.int32)  # (S, 3)
        self.reset(index)

    def reset(self, index):
        """Start shard `index` in this buffer (buffers are recycled: fresh 64 MB costs page faults)."""
        self.index = index
        self.rows = 0
        self.sums = {k: torch.zeros(2, self.mlp_in.shape[1], dtype=torch.float64) for k in ("norm", "sq", "err")}

    def sections(self):
        """The filled rows, section by section in file order (as `_sections` reads them back)."""
        n = self.rows
        return dict(mlp_in=self.mlp_in[:n], mlp_out=self.mlp_out[:n],
                    scales=None if self.scales is None else self.scales[:n], meta=self.meta[:n])

    def add(self, x_in, x_out, meta):
        """Append rows (n, L, d) float32 of mlp_in and mlp_out; quantize/convert, record statistics."""
        a, b = self.rows, self.rows + len(meta)
        for j, (x, dst) in enumerate(((x_in, self.mlp_in), (x_out, self.mlp_out))):
            norm = torch.linalg.vector_norm(x, dim=-1).double()  # (n, L); inf/NaN if any element is
            if not torch.isfinite(norm).all():
                raise ValueError(f"non-finite activations (NaN/inf) in rows {a}.. of shard {self.index}: "
                                 "the model is broken; no shard holding them is written")
            if self.dtype == "int8":  # in place where possible: big temporaries are what this costs
                c = self.channel[j].to(x.device)  # (L, d)
                y = torch.div(x, c, out=empty(x.shape, device=x.device))  # (n, L, d)
                q, scale, s = _quantize_(y)
                self.scales[a:b, j] = bf16_bits(scale)
                err = y.mul_(s).mul_(c).sub_(x)  # x_hat - x, computed as `dequantize` does
            elif self.dtype == "fp16":
                absmax = torch.maximum(x.amax(), -x.amin()).item()
                if absmax > torch.finfo(torch.float16).max:
                    raise ValueError(f"activations overflow fp16 (max |x| = {absmax:.3g}): use --dtype int8 or fp32")
                q = x.half()
                err = q.float().sub_(x)  # (n, L, d)
            else:
                q, err = x, None  # fp32 is exact
            dst[a:b] = q.cpu().numpy()
            self.sums["norm"][j] += norm.sum(0).cpu()
            self.sums["sq"][j] += norm.pow(2).sum(0).cpu()
            if err is not None:
                self.sums["err"][j] += torch.linalg.vector_norm(err, dim=-1).double().pow(2).sum(0).cpu()
        self.meta[a:b] = meta
        self.rows = b


class _ShardWriter:
    """Writes full shard buffers on background threads (sha256 and crc32s as it writes, then
    atomic_path: fsync, rename), so the forward pass overlaps the disk; the main thread then
    lists each shard in the manifest, in order, so a listed shard is always whole on disk, and adds
    its statistics to the manifest's totals (new shards, and `uncounted` ones: each once)."""

    def __init__(self, out, manifest, uncounted, threads=2):
        self.out = out
        self.manifest = manifest
        self.uncounted = uncounted
        self.path = os.path.join(out, MANIFEST)
        self.saved_bytes = os.path.getsize(self.path)  # the manifest as last written
        self.unsaved_bytes = 0  # shard bytes committed since then
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads)
        self.pending = []
        self.free = queue.SimpleQueue()

    def buffer(self, index, cfg, L, d, channel):
        """A written buffer reset for shard `index`, or a new one when none is free yet."""
        try:
            buf = self.free.get_nowait()
        except queue.Empty:
            return _ShardBuffer(index, cfg, L, d, channel)
        buf.reset(index)
        return buf

    def put(self, buf):
        self.pending.append(self.pool.submit(self._write, buf))
        while self.pending and (self.pending[0].done() or len(self.pending) > self.threads):
            self._commit(*self.pending.pop(0).result())  # waits when all threads are busy: bounded memory

    def close(self):
        try:
            while self.pending:
                self._commit(*self.pending.pop(0).result())
        finally:
            self.pool.shutdown(cancel_futures=True)
            if self.unsaved_bytes:  # also after an error: the shards committed so far stay listed
                self._save()

    def _write(self, buf):
        m = self.manifest
        n = buf.rows
        name = shard_name(buf.index)
        path = os.path.join(self.out, name)
        _, size = shard_layout(m["dtype"], n, m["n_layers"], m["d_model"])
        sections = buf.sections()
        C = m["check_rows"]
        crc = [_crc32(sections, a, a + C) for a in range(0, n, C)]
        arrays = [_header(m["dtype"], n, m["n_layers"], m["d_model"])] + [v for v in sections.values() if v is not None]
        h = hashlib.sha256()
        written = 0
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                for arr in arrays:
                    mv = memoryview(np.ascontiguousarray(arr)).cast("B")
                    pad = b"\0" * (_pad(written + len(mv)) - written - len(mv))
                    for chunk in (mv, pad):
                        h.update(chunk)
                        f.write(chunk)
                    written += len(mv) + len(pad)
                assert written == size, f"wrote {written} bytes, layout says {size}"
        except OSError as e:
            raise ValueError(f"writing {path} failed: {e} (disk full or unwritable?). Finished shards are "
                             "kept: free space and rerun the same command to resume") from e
        entry = dict(file=name, rows=n, bytes=size, sha256=h.hexdigest(), crc32=crc)
        sums = {k: v.numpy().copy() for k, v in buf.sums.items()}  # (2, L) each; buf is reused at once
        self.free.put(buf)
        return buf.index, entry, sums

    def _commit(self, index, entry, sums):
        shards = self.manifest["shards"]
        new = index >= len(shards)
        if new:
            assert index == len(shards), f"shard {index} committed after {len(shards)} listed ones"
            shards.append(entry)
        else:  # a repair: the shard must come out as it was first written
            if entry["sha256"] != shards[index]["sha256"]:
                raise ValueError(f"{entry['file']} was rebuilt with other bytes than when the cache was made: the "
                                 "corpus, the device or torch changed; rebuild the cache with --overwrite")
            shards[index] = entry
        if new or index in self.uncounted:
            self.uncounted.discard(index)
            totals = self.manifest["sums"]
            for k in STATS:  # float64 sums in shard order: what JSON holds, it gives back exactly
                totals[k] = (np.array(totals[k]) + sums[k]).tolist()
            totals["shards"] += 1
        self.unsaved_bytes += entry["bytes"]
        if self.unsaved_bytes >= MANIFEST_RATIO * self.saved_bytes:
            self._save()

    def _save(self):
        write_json(self.path, self.manifest)
        self.saved_bytes = os.path.getsize(self.path)
        self.unsaved_bytes = 0


def _finalize(manifest, cfg):
    """Totals for the manifest: token count, splits, per-layer mean norms and quantization NMSE."""
    n_rows = sum(s["rows"] for s in manifest["shards"])
    R = rows_per_context(cfg)
    train = n_rows
    if cfg.heldout > 0:
        train = min(max(int(round(n_rows * (1 - cfg.heldout) / R)) * R, R), n_rows - 1)
    tot = {k: np.array(manifest["sums"][k]) for k in STATS}  # (2, L)
    nmse = tot["err"] / np.maximum(tot["sq"], 1e-300)
    manifest.update(complete=True, n_tokens=n_rows, splits=dict(train=[0, train], heldout=[train, n_rows]),
                    norm_in=(tot["norm"][0] / n_rows).tolist(), norm_out=(tot["norm"][1] / n_rows).tolist(),
                    nmse_in=nmse[0].tolist(), nmse_out=nmse[1].tolist(),
                    nmse_total=[float(tot["err"][j].sum() / tot["sq"][j].sum()) for j in (0, 1)])


# -----------------------------------------------------------------------------
# reader

PREFETCH = 4  # batches a reader keeps ready ahead of the consumer


@dataclass
class Rows:
    """Stored rows as they lie in the shards, and their global row ids: what `batches` yields.
    `ActivationCache.dequantize(rows, device)` turns them into float32 on the consumer's device."""
    mlp_in: torch.Tensor  # (n, L, d) int8 | float16 | float32, as stored
    mlp_out: torch.Tensor  # (n, L, d)
    scales: Optional[torch.Tensor]  # (n, 2, L) int16 bits of the bfloat16 row scales (int8 only)
    ids: torch.Tensor  # (n,) int64 global row ids, ascending


class ActivationCache:
    """A finished cache, opened read-only. Opening checks the manifest and each shard's size and
    header (cheap); reading checks each chunk's crc32 the first time a row of it is read; `verify`
    checks whole files against their sha256. Pass model= to refuse a cache made by another model.

    unit_rows, window_mb: the granularity of the shuffle (see `batches`); part of a training run's
    data order, like the seed. workers: threads that read and check batches."""

    def __init__(self, path, model=None, unit_rows=1024, window_mb=512, workers=2):
        self.manifest = m = _open_manifest(path)
        if not m.get("complete"):
            raise ValueError(f"{path} is unfinished ({len(m['shards'])} shards): rerun the command that built it "
                             f"to resume: {repair_command(path, m)}")
        if model is not None:
            check_same_model(model, m["identity"]["model_sha256"], f"the cache {path} (made by model {m['model']})")
        self.path = path
        self.dtype = m["dtype"]
        self.n_layers = m["n_layers"]
        self.d_model = m["d_model"]
        self.n_tokens = m["n_tokens"]
        self.unit_rows = unit_rows
        self.window_mb = window_mb
        self.workers = workers
        self.norm_in = torch.tensor(m["norm_in"])  # (L,)
        self.norm_out = torch.tensor(m["norm_out"])  # (L,)
        self.channel_scale = torch.tensor(m["channel_scale"]) if m["channel_scale"] else None  # (2, L, d)
        self.starts = np.cumsum([0] + [s["rows"] for s in m["shards"]])  # first row of each shard
        assert self.starts[-1] == self.n_tokens, f"shards hold {self.starts[-1]} rows, manifest says {self.n_tokens}"
        for i in range(len(m["shards"])):
            problem = _check_shard(path, m, i)
            if problem:
                raise ValueError(f"{path}: {problem}: repair it by rerunning its build, `{repair_command(path, m)}` "
                                 "(add --overwrite to rebuild it all)")
        self._checked = [np.zeros(len(s["crc32"]), bool) for s in m["shards"]]  # crc32 chunks read and found good
        self._check_locks = [threading.Lock() for _ in m["shards"]]
        self._maps = OrderedDict()
        self._lock = threading.Lock()

    def row_bytes(self):
        """Stored bytes of one row's activations and scales (what a reader moves per token)."""
        return row_bytes(self.dtype, self.n_layers, self.d_model)

    def split_range(self, split):
        """(lo, hi) rows of "train", "heldout" (the last contexts) or "all"."""
        if split == "all":
            return 0, self.n_tokens
        if split not in self.manifest["splits"]:
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        return tuple(self.manifest["splits"][split])

    def dequantize(self, rows: Rows, device=None):
        """Stored rows -> (mlp_in, mlp_out) float32 (n, L, d) on `device` (None: where they are). The
        stored rows move first and are dequantized there: 4x less to copy for int8."""
        x_in = rows.mlp_in.to(device)
        x_out = rows.mlp_out.to(device)
        if rows.scales is None:
            return dequantize(x_in), dequantize(x_out)
        s = rows.scales.to(device)  # (n, 2, L)
        c = self.channel_scale  # (2, L, d)
        return dequantize(x_in, s[:, 0], c[0]), dequantize(x_out, s[:, 1], c[1])

    def read(self, lo, hi, device=None):
        """Rows lo..hi in order: (mlp_in (n, L, d), mlp_out (n, L, d)) float32, (tokens, doc_ids,
        positions) (n,) int64."""
        ids = np.arange(lo, hi)
        raw = {k: torch.from_numpy(v) for k, v in self._take(ids, SECTIONS).items()}
        meta = raw.pop("meta").long()
        rows = Rows(raw["mlp_in"], raw["mlp_out"], raw.get("scales"), torch.from_numpy(ids))
        return *self.dequantize(rows, device), meta[:, 0], meta[:, 1], meta[:, 2]

    def iter_chunks(self, chunk_size, split="all", device=None):
        """Stream a split in order: yields (mlp_in, mlp_out, tokens, doc_ids, positions) as `read`."""
        lo, hi = self.split_range(split)
        gen = (self.read(a, min(a + chunk_size, hi), device) for a in range(lo, hi, chunk_size))
        return _background(gen, depth=2)

    def batches_per_epoch(self, batch_size, world=1, split="train"):
        lo, hi = self.split_range(split)
        return (hi - lo) // (batch_size * world)

    def batches(self, batch_size, seed=0, rank=0, world=1, split="train", start_step=0, epochs=None):
        """Yield this rank's batches of a shuffled stream: Rows of batch_size stored rows (dequantize
        them with `dequantize(rows, device)` where they are used).

        The stream of epoch e: the split's rows cut into units of `unit_rows` consecutive rows, the
        units in a random order (seed, e), consecutive units grouped into windows of ~window_mb
        stored MB, the rows of each window in a random order (seed, e, window). Global step g is
        stream[g*B*W : (g+1)*B*W]; rank r gets the rows of its slice [r*B : (r+1)*B] (in row order: a
        batch is a set): disjoint, equal shares, whose union does not depend on the world size W.
        An epoch has `batches_per_epoch` steps (the last < B*W rows are dropped), so no rank ever
        waits on another. Rows are read straight from the memmapped shards: the pages in use at
        any time are a window's units (~window_mb), so the page cache serves most reads.
        start_step=k starts at global step k (counting across epochs) without reading what it skips;
        epochs=None streams forever, else stops after `epochs` epochs in all. A rank reads only its
        rows, on `workers` threads, PREFETCH batches ahead of the consumer.
        """
        B, W = batch_size, world
        if not 0 <= rank < W or B <= 0:
            raise ValueError(f"need 0 <= rank < world and batch_size > 0, got rank={rank}, world={W}, B={B}")
        lo, hi = self.split_range(split)
        nb = self.batches_per_epoch(B, W, split)
        if nb == 0:
            raise ValueError(f"split {split!r} has {hi - lo} rows, fewer than one global batch of {B}x{W}")
        window_units = max(1, int(self.window_mb * 2 ** 20) // (self.row_bytes() * self.unit_rows))
        e0, j0 = divmod(start_step, nb)
        epoch_ids = range(e0, sys.maxsize if epochs is None else epochs)

        def selections():  # per window: this rank's global row ids, in stream order
            for e in epoch_ids:
                p0 = j0 * B * W if e == e0 else 0
                for s, size, rows in self._windows(lo, hi, seed, e, window_units):
                    p = np.arange(max(s, p0), min(s + size, nb * B * W))
                    p = p[(p // B) % W == rank]
                    if len(p):
                        yield rows()[p - s]

        def assemble(ids):  # on a worker thread
            rows = np.sort(ids)  # a batch is a set: sorted, its rows come off the memmaps in file order
            raw = {k: torch.from_numpy(v) for k, v in self._take(rows, ("mlp_in", "mlp_out", "scales")).items()}
            return Rows(raw["mlp_in"], raw["mlp_out"], raw.get("scales"), torch.from_numpy(rows))

        return _background(_ordered_map(assemble, _cut(selections(), B), self.workers), PREFETCH)

    def _windows(self, lo, hi, seed, epoch, window_units):
        """Yield (stream position, rows, rows()) per window of the epoch; rows() builds the window's
        permuted global row ids only when asked (a skipped window costs nothing)."""
        U = self.unit_rows
        starts = np.arange(lo, hi, U)
        order = np.random.default_rng([seed, epoch]).permutation(len(starts))
        pos = 0
        for w, g in enumerate(range(0, len(order), window_units)):
            units = starts[order[g:g + window_units]]
            size = int(np.minimum(units + U, hi).sum() - units.sum())

            def rows(units=units, w=w):
                r = np.concatenate([np.arange(u, min(u + U, hi)) for u in units])
                return r[np.random.default_rng([seed, epoch, w]).permutation(len(r))]
            yield pos, size, rows
            pos += size

    def _take(self, rows, keys):
        """Stored arrays of the given rows (sorted global ids), read shard by shard from the memmaps;
        each crc32 chunk is checked the first time one of its rows is read."""
        first = self._shard(0)
        out = {k: np.empty((len(rows),) + first[k].shape[1:], first[k].dtype) for k in keys if first[k] is not None}
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]) if len(rows) else ():
            i = int(shard_of[a])
            local = rows[a:b] - self.starts[i]
            src = self._shard(i)
            self._check_chunks(i, src, local)
            runs = np.flatnonzero(np.diff(local) != 1) + 1  # where runs of consecutive rows break
            if len(runs) <= (b - a) // 64:  # long runs (whole units): plain sequential copies
                for ra, rb in zip(np.r_[0, runs], np.r_[runs, b - a]):
                    for k in out:
                        out[k][a + ra:a + rb] = src[k][local[ra]:local[rb - 1] + 1]
            else:
                for k in out:
                    np.take(src[k], local, axis=0, out=out[k][a:b])
        return out

    def _check_chunks(self, i, src, local):
        """Check the crc32 of each chunk of shard i that rows `local` fall in and no read has checked
        yet. One thread checks a shard at a time: the others wait rather than check it twice."""
        C = self.manifest["check_rows"]
        chunks = np.unique(local // C)
        if self._checked[i][chunks].all():
            return
        with self._check_locks[i]:
            for j in chunks[~self._checked[i][chunks]]:
                if _crc32(src, j * C, (j + 1) * C) != self.manifest["shards"][i]["crc32"][j]:
                    s = self.manifest["shards"][i]
                    raise ValueError(f"{self.path}: {s['file']} rows {j * C}..{min((j + 1) * C, s['rows']) - 1} "
                                     "fail their crc32 check (the file is damaged): repair it by rerunning its "
                                     f"build, `{repair_command(self.path, self.manifest)}`")
                self._checked[i][j] = True

    def _shard(self, i):
        """The memmapped sections of shard i: dict of numpy views, shared by threads. At most
        MAX_OPEN_SHARDS stay mapped (each mapping holds a file descriptor); views in use keep theirs."""
        with self._lock:
            if i in self._maps:
                self._maps.move_to_end(i)
            else:
                s = self.manifest["shards"][i]
                mm = np.memmap(os.path.join(self.path, s["file"]), dtype=np.uint8, mode="r")
                self._maps[i] = _sections(mm, self.dtype, s["rows"], self.n_layers, self.d_model)
                if len(self._maps) > MAX_OPEN_SHARDS:
                    self._maps.popitem(last=False)
            return self._maps[i]


def _background(gen, depth):
    """Run the generator `gen` on a daemon thread up to `depth` items ahead; re-raise its errors here.
    When the consumer stops early (break, close), the thread stops too and closes `gen`."""
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):  # False once the consumer has gone
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in gen:
                if not put(("item", item)):
                    return gen.close()
            put(("done", None))
        except BaseException as e:
            put(("error", e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()  # it ends within one item: put() gives up once stop is set


def _cut(id_arrays, B):
    """Cut a stream of row-id arrays into batches of exactly B ids, carrying leftovers over."""
    carry = np.empty(0, dtype=np.int64)
    for ids in id_arrays:
        ids = np.concatenate([carry, ids])
        n = len(ids) // B * B
        yield from ids[:n].reshape(-1, B)
        carry = ids[n:]


def _ordered_map(fn, items, workers):
    """Yield fn(item) in order, computed by `workers` threads at most 2*workers items ahead."""
    with ThreadPoolExecutor(workers) as ex:
        futures = []
        for item in items:
            futures.append(ex.submit(fn, item))
            if len(futures) > 2 * workers:
                yield futures.pop(0).result()
        for f in futures:
            yield f.result()


# -----------------------------------------------------------------------------
# verify and stats


def verify(path):
    """Check every listed shard's size, header and sha256; returns the problems found (empty: all good)."""
    m = _open_manifest(path)
    bad = [] if m.get("complete") else [f"{MANIFEST}: unfinished (rerun the build command to resume)"]
    for i in tqdm(range(len(m["shards"])), desc="verify", unit="shard", disable=None):
        problem = _check_shard(path, m, i, "sha256")
        if problem:
            bad.append(problem)
    return bad


def stats(path):
    """A printable summary: tokens, bytes per token, per-layer norms and quantization error."""
    c = ActivationCache(path)
    m = c.manifest
    total = sum(s["bytes"] for s in m["shards"])
    fp32 = 2 * c.n_layers * c.d_model * 4
    lines = [f"{path}: {c.n_tokens} tokens | dtype {c.dtype} | L={c.n_layers} d={c.d_model} | ctx {m['ctx']} | "
             f"{len(m['shards'])} shards | train {m['splits']['train']} heldout {m['splits']['heldout']}",
             f"bytes/token {total / c.n_tokens:.1f} (activations+scales {c.row_bytes()}, +12 token/doc/pos) | "
             f"{total / c.n_tokens / (fp32 + 12):.4f}x fp32 | total {total / 1e6:.1f} MB",
             f"quantization NMSE ||x - x_hat||^2/||x||^2: mlp_in {m['nmse_total'][0]:.3g} | mlp_out {m['nmse_total'][1]:.3g}",
             "layer | mean ||mlp_in|| | mean ||mlp_out|| | NMSE in | NMSE out"]
    for l in range(c.n_layers):
        lines.append(f"{l:5d} | {m['norm_in'][l]:15.4f} | {m['norm_out'][l]:16.4f} | "
                     f"{m['nmse_in'][l]:.3g} | {m['nmse_out'][l]:.3g}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line


@dataclass
class VerifyConfig:
    """check sizes, headers and sha256 of every shard"""
    paths: list = arg([], 'cache directories')


@dataclass
class StatsConfig:
    """tokens, bytes/token, per-layer norms, quantization error"""
    paths: list = arg([], 'cache directories')


def main(argv=None):
    commands = {"build": CacheConfig, "verify": VerifyConfig, "stats": StatsConfig}
    command, cfg = parse_config(__doc__, commands, argv, default="build")
    if command == "build":
        print(asdict(cfg))
        m = build_cache(cfg)
        print(f"{cfg.out}: {m['n_tokens']} tokens in {len(m['shards'])} shards | {m['seconds']:.1f} s | "
              f"NMSE in {m['nmse_total'][0]:.3g} out {m['nmse_total'][1]:.3g}")
        return 0
    if not cfg.paths:
        raise ValueError(f"`cache.py {command}` needs a cache directory, e.g. `python cache.py {command} runs/cache`")
    failed = 0
    for path in cfg.paths:
        if command == "stats":
            print(stats(path))
            continue
        bad = verify(path)
        print("\n".join(["BAD " + b for b in bad] or [f"{path}: all shards OK"]))
        if bad:
            print(f"repair (rewrites only what is damaged or missing): {repair_command(path, _open_manifest(path))}")
        failed += bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # verify's status: 1 when a cache is damaged

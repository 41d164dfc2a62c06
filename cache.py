"""
cache.py: the activation cache. Run GPT-2 over a corpus once, store every layer's MLP input and
output for each token in memory-mapped shards, and serve them to CLT training shuffled, per rank.

Data flow.  corpus -> documents -> tokens, packed into contexts [<|endoftext|>, t1 .. t_{ctx-1}]
-> GPT.run_with_acts -> mlp_in, mlp_out (B, T, L, d) -> drop position 0 (the BOS, whose
activations are outliers) -> rows (N, L, d) -> int8 (x / channel scale, then one absmax scale per
token, layer and in/out) or fp16 / fp32 -> fixed-size shard files + manifest.json
==>  ActivationCache(path).batches(...) -> (mlp_in, mlp_out) float32 (B, L, d), read from the
memmaps and dequantized on background threads; .iter_chunks(...) streams them in order.

    python cache.py --help
    python cache.py --model models/tiny --corpus toy --tokens 1000000 --out runs/cache   # ~1 GB int8
    python cache.py --tokens 20000 --out runs/cache_cpu   # the tiny model and its toy corpus, seconds
    python cache.py verify runs/cache       # sizes, headers and sha256 of every shard
    python cache.py stats runs/cache        # tokens, bytes/token, per-layer norms, quantization error
    torchrun: build once with one process; every training rank opens the same cache and reads
    its own share: ActivationCache(path).batches(batch_size, seed, rank, world)

Re-running the same command after a crash (even kill -9) resumes from the last finished shard and
gives a byte-identical cache: every shard is a deterministic function of the arguments, because
the contexts come in a fixed grid of forward batches (the same batch shapes give the same floats).

Where we follow and where we differ. CLT-Forge (LLM-Interp/CLT-Forge) also caches and quantizes
activations; it keeps one scale per layer per file and loads whole files into RAM. Here:
- one int8 scale per (token, layer, in/out): NMSE ~ (max|x| / rms x)^2 / (12 * 127^2) per row;
  outlier channels are first evened out by a fixed per-channel scale (SmoothQuant-style, computed
  on the first batch and kept in the manifest): on the tiny model the worst layer's NMSE goes from
  2e-4 to ~4e-5;
- scales are bfloat16 (the fp32 range, 2 bytes): q is computed with the rounded scale, so the
  error bound |x - q*s| <= s/2 holds exactly as with fp32 scales;
- shards are numpy.memmap'd, each with a magic/version header (llm.c's `_peek_data_shard`) and a
  sha256 in the manifest; the manifest is rewritten atomically after every finished shard;
- the reader shuffles globally (random unit order x random rows inside a window of units), reads
  each batch's rows straight from the memmaps (no copy of the window), and stripes each global
  batch over ranks: the union of the ranks' batches does not depend on the world size, and every
  rank gets the same number of batches.
"""
import argparse
import hashlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

import clt

# -----------------------------------------------------------------------------
# on-disk format

FORMAT = "clt-forge-activation-cache"
VERSION = 1
MAGIC = 20251126  # header[0] of every shard file
HEADER_INTS = 32  # the header is 32 int64 = 256 bytes, see shard_layout
ALIGN = 64  # every section starts on a 64-byte boundary
DTYPES = {"fp32": (0, np.float32), "fp16": (1, np.float16), "int8": (2, np.int8)}
MANIFEST = "manifest.json"
MAX_OPEN_SHARDS = 256  # memmaps a reader keeps open at once


def _pad(n):
    return -(-n // ALIGN) * ALIGN


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


def check_header(path, dtype, rows, L, d):
    """Read a shard's 256-byte header and compare it with what the manifest promises."""
    h = np.fromfile(path, dtype=np.int64, count=HEADER_INTS)
    if len(h) < HEADER_INTS or h[0] != MAGIC or h[1] != VERSION:
        found = "a truncated header" if len(h) < 2 else f"magic {h[0]}, version {h[1]}"
        raise ValueError(f"{path}: {found}, expected magic {MAGIC}, version {VERSION}. It was not written "
                         f"by this cache.py (or is damaged): rebuild it with `python cache.py ... --overwrite`")
    want = _header(dtype, rows, L, d)
    if not np.array_equal(h, want):
        raise ValueError(f"{path}: header {h[:11].tolist()} disagrees with the manifest {want[:11].tolist()} "
                         f"([magic, version, dtype, rows, L, d, offsets..., bytes]); rebuild with --overwrite")


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
    """x (n, L, d) -> (L, d) float32 c = sqrt(rms over tokens of each channel), floored at 1e-3 of the
    layer's mean: int8 stores x / c. Trained models have outlier channels (max|x| ~ 8 rms on the
    tiny model) that make one scale per row coarse for every other channel; dividing by c first
    evens them out, with SmoothQuant's migration strength 0.5 (Xiao et al. 2023)."""
    rms = x.double().pow(2).mean(0).sqrt()  # (L, d)
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

TOY_CHUNK = 1000  # the toy corpus is drawn in chunks of this many documents, each with its own seed


def iter_documents(corpus, seed=0):
    """Yield document strings: "toy" (tiny.toy_corpus), a .jsonl with a "text" field, a text file
    whose documents are separated by <|endoftext|>, or a directory of such .txt files (sorted)."""
    if corpus == "toy":
        try:
            import tiny  # imported lazily: only the toy corpus needs it
        except ModuleNotFoundError as e:
            raise ValueError("--corpus toy needs tiny.py (tiny.toy_corpus), which this checkout lacks: "
                             "pass --corpus PATH to a .txt file, a directory of .txt files or a .jsonl") from e
        for chunk in range(sys.maxsize):  # endless: stops when the writer has enough tokens
            yield from tiny.toy_corpus(TOY_CHUNK, seed * 1_000_003 + chunk)
    elif os.path.isdir(corpus):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(corpus) for f in fs if f.endswith(".txt"))
        for path in files:
            yield from _split_text_file(path)
    elif not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus {corpus} does not exist (a .txt file, a directory of .txt, a .jsonl or 'toy')")
    elif corpus.endswith(".jsonl"):
        with open(corpus, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ValueError(f"{corpus} line {i + 1}: expected an object with a string 'text' field")
                    yield row["text"]
    else:
        yield from _split_text_file(corpus)


def _split_text_file(path, block=1 << 20):
    """Documents of a text file separated by <|endoftext|>, read in 1 MB blocks (files may be huge)."""
    with open(path, encoding="utf-8") as f:
        tail = ""
        while block_text := f.read(block):
            *docs, tail = (tail + block_text).split(clt.ENDOFTEXT)
            yield from (d for d in docs if d.strip())
        if tail.strip():
            yield tail


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
    R, drop = rows_per_context(cfg), 0 if cfg.keep_bos else 1
    pos = np.arange(drop, cfg.ctx, dtype=np.int32)
    contexts = iter_contexts(iter_documents(cfg.corpus, cfg.seed), enc, cfg.ctx)
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


# -----------------------------------------------------------------------------
# fingerprints: which model and tokenizer made a cache


def model_fingerprint(model):
    """sha256 of the model's config and every weight (name, shape, float32 bytes), in name order."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(model_dir):
    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(model_dir, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# writer


@dataclass
class CacheConfig:
    model: str = clt.DEFAULT_MODEL  # model directory in the hub layout (or a hub id)
    corpus: str = "toy"  # .txt file, directory of .txt files, .jsonl with "text", or "toy" (tiny.py)
    tokens: int = 200_000  # rows to store (tokens kept after dropping the BOS); ~15 s, 210 MB on the tiny model
    ctx: int = 64  # context length, BOS included; at most the model's n_ctx
    dtype: str = "int8"  # int8 | fp16 | fp32
    out: str = "runs/cache"  # output directory
    keep_bos: bool = False  # keep position 0 (the BOS) instead of dropping it
    heldout: float = 0.02  # fraction of rows (whole contexts, at the end) held out for evaluation
    shard_tokens: int = 0  # rows per shard file; 0 = about 64 MB of activations per shard
    batch_size: int = 64  # contexts per forward pass (part of the cache's identity: it fixes the floats)
    seed: int = 0  # seed of the toy corpus
    device: str = "auto"  # auto | cpu | cuda | ...; resume on the same device for byte-identical shards
    overwrite: bool = False  # replace an existing cache made with other arguments


def _identity(cfg, model_sha, tok_sha):
    """What determines the cache's bytes: a rerun resumes only if all of these agree."""
    corpus = cfg.corpus if cfg.corpus == "toy" else os.path.realpath(cfg.corpus)
    return dict(model_sha256=model_sha, tokenizer_sha256=tok_sha, corpus=corpus, tokens=cfg.tokens,
                ctx=cfg.ctx, dtype=cfg.dtype, keep_bos=cfg.keep_bos, heldout=cfg.heldout,
                shard_tokens=cfg.shard_tokens, batch_size=cfg.batch_size, seed=cfg.seed)


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


def _write_json_atomic(path, obj):
    """Temp file, fsync, rename, fsync the directory: a crash leaves the old or the new file, never half."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path):
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_out_dir(cfg, identity, header):
    """Create the output directory or resume in it: returns the manifest to continue from."""
    path = os.path.join(cfg.out, MANIFEST)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the cache directory {cfg.out}: {e}") from e
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get("identity", {}).get(k), v) for k, v in identity.items()
                if old.get("identity", {}).get(k) != v}
        if not diff and old.get("version") == VERSION:
            return old
        if not cfg.overwrite:
            raise ValueError(f"{cfg.out} holds a cache made with other arguments ({{field: (cache, now)}}: {diff}); "
                             "pass --overwrite to replace it, or choose another --out")
        _remove_cache_files(cfg.out)
    elif any(not _is_cache_file(n) for n in os.listdir(cfg.out)):
        raise ValueError(f"{cfg.out} exists, is not empty and has no {MANIFEST}: choose another --out")
    manifest = dict(format=FORMAT, version=VERSION, complete=False, identity=identity, **header, shards=[])
    try:
        _write_json_atomic(path, manifest)
    except OSError as e:
        raise ValueError(f"cannot write to {cfg.out}: {e}") from e
    return manifest


def _is_cache_file(name):
    return name.startswith(("shard_", MANIFEST))


def _remove_cache_files(out):
    for name in os.listdir(out):  # only our own files: never a user's
        if _is_cache_file(name):
            os.remove(os.path.join(out, name))


class _ShardBuffer:
    """One shard's rows being filled in RAM, plus float64 sums for the manifest's statistics."""

    def __init__(self, index, cfg, L, d, channel):
        S, dt = cfg.shard_tokens, DTYPES[cfg.dtype][1]
        self.dtype, self.channel = cfg.dtype, channel  # channel (2, L, d)
        self.mlp_in, self.mlp_out = np.empty((S, L, d), dt), np.empty((S, L, d), dt)  # (S, L, d)
        self.scales = np.empty((S, 2, L), np.int16) if cfg.dtype == "int8" else None  # (S, 2, L)
        self.meta = np.empty((S, 3), np.int32)  # (S, 3)
        self.reset(index)

    def reset(self, index):
        """Start shard `index` in this buffer (buffers are recycled: fresh 64 MB costs page faults)."""
        self.index, self.rows = index, 0
        self.sums = {k: torch.zeros(2, self.mlp_in.shape[1], dtype=torch.float64) for k in ("norm", "sq", "err")}

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
    """Writes full shard buffers on background threads (sha256 as it writes, fsync, rename), so the
    forward pass overlaps the disk; the main thread then lists each shard in the manifest, in order,
    so a finished manifest entry always means shards 0..k are all on disk."""

    def __init__(self, out, manifest, threads=2):
        self.out, self.manifest, self.threads = out, manifest, threads
        self.pool, self.pending, self.free = ThreadPoolExecutor(threads), [], queue.SimpleQueue()

    def buffer(self, index, make):
        """A written buffer reset for shard `index`, or make() when none is free yet."""
        try:
            buf = self.free.get_nowait()
        except queue.Empty:
            return make()
        buf.reset(index)
        return buf

    def put(self, buf):
        self.pending.append(self.pool.submit(self._write, buf))
        while self.pending and (self.pending[0].done() or len(self.pending) > self.threads):
            self._commit(self.pending.pop(0).result())  # waits when all threads are busy: bounded memory

    def close(self):
        try:
            while self.pending:
                self._commit(self.pending.pop(0).result())
        finally:
            self.pool.shutdown(cancel_futures=True)

    def _commit(self, entry):
        self.manifest["shards"].append(entry)
        _write_json_atomic(os.path.join(self.out, MANIFEST), self.manifest)

    def _write(self, buf):
        m, n = self.manifest, buf.rows
        name = f"shard_{buf.index:05d}.bin"
        path, tmp = os.path.join(self.out, name), os.path.join(self.out, name + ".tmp")
        off, size = shard_layout(m["dtype"], n, m["n_layers"], m["d_model"])
        sections = [_header(m["dtype"], n, m["n_layers"], m["d_model"]), buf.mlp_in[:n], buf.mlp_out[:n]]
        sections += [buf.scales[:n]] if buf.scales is not None else []
        sections += [buf.meta[:n]]
        h, written = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                for arr in sections:
                    mv = memoryview(np.ascontiguousarray(arr)).cast("B")
                    pad = b"\0" * (_pad(written + len(mv)) - written - len(mv))
                    for chunk in (mv, pad):
                        h.update(chunk)
                        f.write(chunk)
                    written += len(mv) + len(pad)
                f.flush()
                os.fsync(f.fileno())
            assert written == size, f"wrote {written} bytes, layout says {size}"
            os.replace(tmp, path)
            _fsync_dir(self.out)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise ValueError(f"writing {path} failed: {e} (disk full or unwritable?). Finished shards are "
                             "kept: free space and rerun the same command to resume") from e
        entry = dict(file=name, rows=n, bytes=size, sha256=h.hexdigest(), **{k: v.tolist() for k, v in buf.sums.items()})
        self.free.put(buf)
        return entry


def _finalize(manifest, n_rows, cfg):
    """Totals for the manifest: token count, splits, per-layer mean norms and quantization NMSE."""
    R = rows_per_context(cfg)
    train = n_rows
    if cfg.heldout > 0:
        train = min(max(int(round(n_rows * (1 - cfg.heldout) / R)) * R, R), n_rows - 1)
    tot = {k: np.sum([s[k] for s in manifest["shards"]], axis=0) for k in ("norm", "sq", "err")}  # (2, L)
    nmse = tot["err"] / np.maximum(tot["sq"], 1e-300)
    manifest.update(complete=True, n_tokens=n_rows, splits=dict(train=[0, train], heldout=[train, n_rows]),
                    norm_in=(tot["norm"][0] / n_rows).tolist(), norm_out=(tot["norm"][1] / n_rows).tolist(),
                    nmse_in=nmse[0].tolist(), nmse_out=nmse[1].tolist(),
                    nmse_total=[float(tot["err"][j].sum() / tot["sq"][j].sum()) for j in (0, 1)])


def _resolve_device(device):
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def build_cache(cfg: CacheConfig):
    """Build (or resume, or confirm) the cache cfg describes; returns the finished manifest.

    The returned dict also carries "seconds" and "cpu_seconds" (all threads): the wall and CPU time
    of the corpus -> shards loop alone.
    """
    model_dir = clt.resolve_model_dir(cfg.model)
    model = clt.GPT.from_pretrained(model_dir).to(_resolve_device(cfg.device))
    _check_config(cfg, model)
    enc = clt.load_tokenizer(model_dir)
    L, d = model.config.n_layer, model.config.n_embd
    if cfg.shard_tokens == 0:
        cfg = replace(cfg, shard_tokens=max(1, (64 << 20) // row_bytes(cfg.dtype, L, d)))
    identity = _identity(cfg, model_fingerprint(model), tokenizer_fingerprint(model_dir))
    name = os.path.realpath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # what readers load
    header = dict(model=name, model_config=asdict(model.config), n_layers=L, d_model=d, dtype=cfg.dtype,
                  ctx=cfg.ctx, keep_bos=cfg.keep_bos, shard_tokens=cfg.shard_tokens,
                  channel_scale=_first_batch_channel_scales(cfg, model, enc))
    manifest = _open_out_dir(cfg, identity, header)
    if manifest["channel_scale"] != header["channel_scale"]:
        raise ValueError(f"{cfg.out}: the first batch now gives other int8 channel scales than when the cache was "
                         "started: the corpus or the device changed; resume where it began, or pass --overwrite")
    if manifest.get("complete"):
        print(f"{cfg.out} is already complete ({manifest['n_tokens']} tokens): nothing to do")
        return dict(manifest, seconds=0.0, cpu_seconds=0.0)
    start = len(manifest["shards"]) * cfg.shard_tokens  # resume at the first unfinished shard
    _check_disk(cfg, L, d, start)
    t0, c0 = time.perf_counter(), time.process_time()
    n_rows = _write_rows(cfg, model, enc, manifest, start)
    _finalize(manifest, n_rows, cfg)
    _write_json_atomic(os.path.join(cfg.out, MANIFEST), manifest)
    return dict(manifest, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)


@torch.inference_mode()
def _first_batch_channel_scales(cfg, model, enc):
    """int8 only: channel scales (2, L, d) as nested lists, from the first forward batch of the grid."""
    if cfg.dtype != "int8":
        return None
    _, idx, _ = next(iter_batches(cfg, enc, cfg.tokens), (None, None, None))
    if idx is None:
        raise ValueError(f"corpus {cfg.corpus} gave no context of {cfg.ctx - 1} tokens: it is empty or too short")
    _, acts = model.run_with_acts(idx.to(next(model.parameters()).device))
    drop = 0 if cfg.keep_bos else 1
    x = torch.stack([acts.mlp_in[:, drop:], acts.mlp_out[:, drop:]]).flatten(1, 2)  # (2, B*R, L, d)
    return torch.stack([channel_scales(x[0]), channel_scales(x[1])]).cpu().tolist()


def _check_resume_tokens(cfg, manifest, meta):
    """meta (n, 3): what the corpus now gives for the rows just before the resume point; compare it
    with the end of the last finished shard."""
    s = manifest["shards"][-1]
    off, _ = shard_layout(cfg.dtype, s["rows"], manifest["n_layers"], manifest["d_model"])
    stored = np.fromfile(os.path.join(cfg.out, s["file"]), np.int32, s["rows"] * 3, offset=off["meta"])
    n = min(len(meta), s["rows"])
    if not np.array_equal(stored.reshape(-1, 3)[-n:], meta[-n:]):
        raise ValueError(f"{cfg.out}: the corpus {cfg.corpus} now gives other tokens than those stored in "
                         f"{s['file']}: it changed since the cache was started; pass --overwrite to rebuild")


def _check_disk(cfg, L, d, start):
    _, one = shard_layout(cfg.dtype, cfg.shard_tokens, L, d)
    need = -(-(cfg.tokens - start) // cfg.shard_tokens) * one
    free = shutil.disk_usage(cfg.out).free
    if need > free:
        raise ValueError(f"the cache needs {need / 1e9:.2f} GB more but {cfg.out} has {free / 1e9:.2f} GB free")


@torch.inference_mode()
def _write_rows(cfg, model, enc, manifest, start):
    """The main loop: forward batches, drop the BOS, add rows to shards; returns the row count."""
    L, d, S, drop = model.config.n_layer, model.config.n_embd, cfg.shard_tokens, 0 if cfg.keep_bos else 1
    dev = next(model.parameters()).device
    writer = _ShardWriter(cfg.out, manifest)
    channel = torch.tensor(manifest["channel_scale"]) if manifest["channel_scale"] else None  # (2, L, d)
    buf, row, skipped = _ShardBuffer(start // S, cfg, L, d, channel), start, None
    pbar = tqdm(total=cfg.tokens, initial=start, unit="tok", desc="cache", disable=None)
    try:
        for row0, idx, meta in iter_batches(cfg, enc, cfg.tokens):
            hi = min(row0 + len(meta), cfg.tokens)
            if hi <= start:
                skipped = meta  # before the resume point: only tokenized, never run
                continue
            if start and row == start:  # resuming: the corpus must still give the finished shards' tokens
                _check_resume_tokens(cfg, manifest, meta[:start - row0] if row0 < start else skipped)
            _, acts = model.run_with_acts(idx.to(dev))
            x_in = acts.mlp_in[:, drop:].reshape(-1, L, d)  # (B*R, L, d)
            x_out = acts.mlp_out[:, drop:].reshape(-1, L, d)  # (B*R, L, d)
            a = max(start, row0) - row0
            while row0 + a < hi:  # split the batch's rows at shard boundaries
                b = min(hi - row0, a + S - buf.rows)
                buf.add(x_in[a:b], x_out[a:b], meta[a:b])
                a, row = b, row0 + b
                if buf.rows == S:
                    writer.put(buf)
                    buf = writer.buffer(buf.index + 1, lambda: _ShardBuffer(buf.index + 1, cfg, L, d, channel))
            pbar.update(row - pbar.n)
        if row == 0:
            raise ValueError(f"corpus {cfg.corpus} gave no context of {cfg.ctx - 1} tokens: it is empty or too short")
        if buf.rows:
            writer.put(buf)
    finally:
        pbar.close()
        writer.close()
    if row < cfg.tokens:
        print(f"note: corpus {cfg.corpus} ran out after {row} of the {cfg.tokens} tokens asked for")
    return row


# -----------------------------------------------------------------------------
# reader


def _background(gen, depth):
    """Run the generator `gen` on a daemon thread up to `depth` items ahead; re-raise its errors here.
    When the consumer stops early (break, close), the thread stops too and closes `gen`."""
    q, stop = queue.Queue(maxsize=depth), threading.Event()

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


class ActivationCache:
    """A finished cache, opened read-only. Opening checks the manifest, each shard's size and header
    (cheap); `verify` checks the hashes. Pass model= to refuse a cache made by another model."""

    def __init__(self, path, model=None):
        mpath = os.path.join(path, MANIFEST)
        if not os.path.exists(mpath):
            raise FileNotFoundError(f"{path} has no {MANIFEST}: not an activation cache (build one with cache.py)")
        with open(mpath) as f:
            self.manifest = m = json.load(f)
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ValueError(f"{mpath} is format {m.get('format')} version {m.get('version')}, this cache.py reads "
                             f"{FORMAT} version {VERSION}: rebuild the cache with `python cache.py ... --overwrite`")
        if not m.get("complete"):
            raise ValueError(f"{path} is unfinished ({len(m['shards'])} shards): rerun the command that built it to resume")
        if model is not None and model_fingerprint(model) != m["identity"]["model_sha256"]:
            raise ValueError(f"{path} was made by model {m['model']} (sha256 {m['identity']['model_sha256'][:12]}...), "
                             "not by the model given: rebuild the cache for this model")
        self.path, self.dtype = path, m["dtype"]
        self.n_layers, self.d_model, self.n_tokens = m["n_layers"], m["d_model"], m["n_tokens"]
        self.norm_in, self.norm_out = torch.tensor(m["norm_in"]), torch.tensor(m["norm_out"])  # (L,)
        self.channel_scale = torch.tensor(m["channel_scale"]) if m["channel_scale"] else None  # (2, L, d)
        self.starts = np.cumsum([0] + [s["rows"] for s in m["shards"]])  # first row of each shard
        assert self.starts[-1] == self.n_tokens, f"shards hold {self.starts[-1]} rows, manifest says {self.n_tokens}"
        for s in m["shards"]:
            p = os.path.join(path, s["file"])
            if not os.path.exists(p) or os.path.getsize(p) != s["bytes"]:
                got = os.path.getsize(p) if os.path.exists(p) else "missing"
                raise ValueError(f"{p}: {got} bytes, manifest says {s['bytes']}: run `python cache.py verify {path}`")
            check_header(p, self.dtype, s["rows"], self.n_layers, self.d_model)
        self._maps, self._lock = OrderedDict(), threading.Lock()

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

    def _shard(self, i):
        """The memmapped sections of shard i: dict of numpy views, shared by threads. At most
        MAX_OPEN_SHARDS stay mapped (each mapping holds a file descriptor); views in use keep theirs."""
        with self._lock:
            if i in self._maps:
                self._maps.move_to_end(i)
            else:
                s, L, d = self.manifest["shards"][i], self.n_layers, self.d_model
                mm = np.memmap(os.path.join(self.path, s["file"]), dtype=np.uint8, mode="r")
                off, _ = shard_layout(self.dtype, s["rows"], L, d)
                n, dt = s["rows"], DTYPES[self.dtype][1]
                view = lambda k, dtype, shape: mm[off[k]:off[k] + int(np.prod(shape)) * np.dtype(dtype).itemsize] \
                    .view(dtype).reshape(shape)
                self._maps[i] = dict(mlp_in=view("mlp_in", dt, (n, L, d)), mlp_out=view("mlp_out", dt, (n, L, d)),
                                     scales=view("scales", np.int16, (n, 2, L)) if self.dtype == "int8" else None,
                                     meta=view("meta", np.int32, (n, 3)))
                if len(self._maps) > MAX_OPEN_SHARDS:
                    self._maps.popitem(last=False)
            return self._maps[i]

    def _take(self, rows, keys=("mlp_in", "mlp_out", "scales", "meta")):
        """Stored arrays of the given rows (sorted global ids), read shard by shard from the memmaps."""
        first = self._shard(0)
        out = {k: np.empty((len(rows),) + first[k].shape[1:], first[k].dtype) for k in keys if first[k] is not None}
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]) if len(rows) else ():
            i = int(shard_of[a])
            local, src = rows[a:b] - self.starts[i], self._shard(i)
            runs = np.flatnonzero(np.diff(local) != 1) + 1  # where runs of consecutive rows break
            if len(runs) <= (b - a) // 64:  # long runs (whole units): plain sequential copies
                for ra, rb in zip(np.r_[0, runs], np.r_[runs, b - a]):
                    for k in out:
                        out[k][a + ra:a + rb] = src[k][local[ra]:local[rb - 1] + 1]
            else:
                for k in out:
                    np.take(src[k], local, axis=0, out=out[k][a:b])
        return out

    def read(self, lo, hi, device=None):
        """Rows lo..hi in order: (mlp_in (n, L, d), mlp_out (n, L, d)) float32, (tokens, doc_ids,
        positions) (n,) int64."""
        raw = self._take(np.arange(lo, hi))
        meta = torch.from_numpy(raw["meta"]).long()
        return *self.dequantize_batch(raw, device), meta[:, 0], meta[:, 1], meta[:, 2]

    def dequantize_batch(self, raw, device=None):
        """Stored rows (a dict as `batches(raw=True)` yields) -> (mlp_in, mlp_out) float32 (n, L, d) on
        `device`. The stored rows move first, then are dequantized there: 4x less to copy for int8."""
        s, c = raw.get("scales"), self.channel_scale
        to = lambda a: torch.as_tensor(a) if device is None else torch.as_tensor(a).to(device)
        if s is None:
            return dequantize(to(raw["mlp_in"])), dequantize(to(raw["mlp_out"]))
        s = to(s)
        return dequantize(to(raw["mlp_in"]), s[:, 0], c[0]), dequantize(to(raw["mlp_out"]), s[:, 1], c[1])

    def iter_chunks(self, chunk_size, split="all", device=None):
        """Stream a split in order: yields (mlp_in, mlp_out, tokens, doc_ids, positions) as `read`."""
        lo, hi = self.split_range(split)
        gen = (self.read(a, min(a + chunk_size, hi), device) for a in range(lo, hi, chunk_size))
        return _background(gen, depth=2)

    def batches_per_epoch(self, batch_size, world=1, split="train"):
        lo, hi = self.split_range(split)
        return (hi - lo) // (batch_size * world)

    def batches(self, batch_size, seed=0, rank=0, world=1, split="train", epochs=None, start_step=0,
                window_mb=512, unit_rows=1024, prefetch=4, workers=2, device=None, return_rows=False, raw=False):
        """Yield this rank's batches (mlp_in, mlp_out) float32 (batch_size, L, d) of a shuffled stream.

        The stream of epoch e: the split's rows cut into units of `unit_rows` consecutive rows, the
        units in a random order (seed, e), consecutive units grouped into windows of ~window_mb
        stored MB, the rows of each window in a random order (seed, e, window). Global step g is
        stream[g*B*W : (g+1)*B*W]; rank r gets the rows of its slice [r*B : (r+1)*B] (in row order: a
        batch is a set): disjoint, equal shares, whose union does not depend on the world size W.
        An epoch has `batches_per_epoch` steps (the last < B*W rows are dropped), so no rank ever
        waits on another. Rows are read straight from the memmapped shards: the pages in use at
        any time are a window's units (~window_mb), so the page cache serves most reads.
        start_step=k starts at global step k (counting across epochs) without reading what it skips;
        epochs=None streams forever, else stops after `epochs` epochs in all.
        A rank reads only its rows: `workers` threads read and dequantize batches in parallel,
        `prefetch` batches ahead of the consumer. device=None dequantizes there into CPU tensors; a
        device (e.g. "cuda") moves the stored int8 rows there and dequantizes there (4x less to copy).
        return_rows=True also yields the global row ids (B,) of the batch. raw=True yields the stored
        rows instead, a dict of tensors mlp_in, mlp_out (B, L, d), scales (B, 2, L) (int8), rows (B,),
        for a consumer that dequantizes them itself (`dequantize_batch`).
        """
        B, W = batch_size, world
        if not 0 <= rank < W or B <= 0:
            raise ValueError(f"need 0 <= rank < world and batch_size > 0, got rank={rank}, world={W}, B={B}")
        lo, hi = self.split_range(split)
        nb = self.batches_per_epoch(B, W, split)
        if nb == 0:
            raise ValueError(f"split {split!r} has {hi - lo} rows, fewer than one global batch of {B}x{W}")
        window_units = max(1, int(window_mb * 2 ** 20) // (self.row_bytes() * unit_rows))
        e0, j0 = divmod(start_step, nb)
        epoch_ids = range(e0, sys.maxsize if epochs is None else epochs)

        def selections():  # per window: this rank's global row ids, in stream order
            for e in epoch_ids:
                p0 = j0 * B * W if e == e0 else 0
                for s, size, rows in self._windows(lo, hi, seed, e, unit_rows, window_units):
                    p = np.arange(max(s, p0), min(s + size, nb * B * W))
                    p = p[(p // B) % W == rank]
                    if len(p):
                        yield rows()[p - s]

        def assemble(ids):  # on a worker thread: read the rows, dequantize on the CPU unless told not to
            rows = np.sort(ids)  # a batch is a set: sorted, its rows come off the memmaps in file order
            batch = {k: torch.from_numpy(v) for k, v in self._take(rows, ("mlp_in", "mlp_out", "scales")).items()}
            batch["rows"] = torch.from_numpy(rows)
            return batch if raw or device is not None else (batch, self.dequantize_batch(batch))

        batches = _ordered_map(assemble, _cut(selections(), B), workers)
        for item in _background(batches, prefetch):
            if raw:
                yield item
                continue
            batch, (x_in, x_out) = (item, self.dequantize_batch(item, device)) if device is not None else item
            yield (x_in, x_out, batch["rows"]) if return_rows else (x_in, x_out)

    def _windows(self, lo, hi, seed, epoch, unit_rows, window_units):
        """Yield (stream position, rows, rows()) per window of the epoch; rows() builds the window's
        permuted global row ids only when asked (a skipped window costs nothing)."""
        starts = np.arange(lo, hi, unit_rows)
        order = np.random.default_rng([seed, epoch]).permutation(len(starts))
        pos = 0
        for w, g in enumerate(range(0, len(order), window_units)):
            units = starts[order[g:g + window_units]]
            size = int(np.minimum(units + unit_rows, hi).sum() - units.sum())

            def rows(units=units, w=w):
                r = np.concatenate([np.arange(u, min(u + unit_rows, hi)) for u in units])
                return r[np.random.default_rng([seed, epoch, w]).permutation(len(r))]
            yield pos, size, rows
            pos += size


# -----------------------------------------------------------------------------
# verify and stats


def verify(path):
    """Check every listed shard's size, header and sha256; returns the problems found (empty: all good)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"{path} has no {MANIFEST}: not an activation cache")
    with open(mpath) as f:
        m = json.load(f)
    bad = [] if m.get("complete") else [f"{MANIFEST}: unfinished (rerun the build command to resume)"]
    for s in tqdm(m["shards"], desc="verify", unit="shard", disable=None):
        p = os.path.join(path, s["file"])
        if not os.path.exists(p):
            bad.append(f"{s['file']}: missing")
            continue
        if os.path.getsize(p) != s["bytes"]:
            bad.append(f"{s['file']}: {os.path.getsize(p)} bytes, manifest says {s['bytes']}")
            continue
        try:
            check_header(p, m["dtype"], s["rows"], m["n_layers"], m["d_model"])
        except ValueError as e:
            bad.append(f"{s['file']}: bad header: {e}")
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        if h.hexdigest() != s["sha256"]:
            bad.append(f"{s['file']}: sha256 {h.hexdigest()[:16]}... != manifest {s['sha256'][:16]}...")
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build or resume a cache (the default when no subcommand is given)")
    c = CacheConfig()
    # what to run
    b.add_argument("--model", default=c.model, help="GPT-2 directory in the hub layout (or a hub id)")
    b.add_argument("--corpus", default=c.corpus, help="a .txt file (documents split by <|endoftext|>), "
                   "a directory of .txt files, a .jsonl with a 'text' field, or 'toy' (tiny.toy_corpus)")
    b.add_argument("--seed", type=int, default=c.seed, help="seed of the toy corpus")
    b.add_argument("--tokens", type=int, default=c.tokens, help="rows (kept tokens) to store")
    b.add_argument("--ctx", type=int, default=c.ctx, help="context length incl. the BOS; <= the model's n_ctx")
    b.add_argument("--keep-bos", action="store_true", help="keep position 0 (the BOS); dropped by default")
    # how to store it
    b.add_argument("--dtype", default=c.dtype, choices=list(DTYPES), help="int8 (per-row absmax), fp16 or fp32")
    b.add_argument("--out", default=c.out, help="output directory")
    b.add_argument("--heldout", type=float, default=c.heldout, help="fraction held out for evaluation (last contexts)")
    b.add_argument("--shard-tokens", type=int, default=c.shard_tokens, help="rows per shard file; 0 = about 64 MB each")
    b.add_argument("--batch-size", type=int, default=c.batch_size, help="contexts per forward pass")
    b.add_argument("--device", default=c.device, help="auto, cpu, cuda, ...")
    b.add_argument("--overwrite", action="store_true", help="replace a cache built with other arguments")
    for name, text in (("verify", "check sizes, headers and sha256 of every shard"),
                       ("stats", "tokens, bytes/token, per-layer norms, quantization error")):
        sub.add_parser(name, help=text).add_argument("path", help="cache directory")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "verify", "stats", "-h", "--help"):
        argv = ["build"] + argv  # `python cache.py --model ...` builds
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "verify":
        bad = verify(args.path)
        print("\n".join(["BAD " + b for b in bad] or [f"{args.path}: all shards OK"]))
        return 1 if bad else 0
    if args.command == "stats":
        print(stats(args.path))
        return 0
    cfg = CacheConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    print(vars(args))
    m = build_cache(cfg)
    print(f"{cfg.out}: {m['n_tokens']} tokens in {len(m['shards'])} shards | {m['seconds']:.1f} s | "
          f"NMSE in {m['nmse_total'][0]:.3g} out {m['nmse_total'][1]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

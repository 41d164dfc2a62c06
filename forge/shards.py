"""Activation cache files: shard format, manifest, checks, verify/stats, ShardFiles, ShardWriter.

A shard file is a header and four sections, each on a 64-byte boundary (`shard_layout`):
    header   (32,) int64   [MAGIC, VERSION, dtype code, rows, L, d, off_in, off_out, off_scales,
                            off_meta, file bytes, 0...] (checked on read, as llm.c's data shards)
    mlp_in   (rows, L, d)  dtype; int8: q = round(x / (channel * scale)), channel: channel_scale[0]
    mlp_out  (rows, L, d)  dtype (int4: (rows, L, d/2) uint8, q + 8 in two nibbles, low first)
    scales   (rows, 2, L)  int16 bits of bfloat16 scales, [:, 0] mlp_in, [:, 1] mlp_out (int8 only;
                           int4: (rows, 2, L, d/INT4_GROUP), one per group of INT4_GROUP channels)
    meta     (rows, 3)     int32: token id, document id, position in its context

manifest.json holds the build's identity (a rerun resumes only if it agrees), the shapes, per
shard its rows, bytes, sha256 and a crc32 per chunk of check_rows rows (~1 MB), running totals of
the statistics, then the splits, norms and NMSE. Each check lives here once, naming the fix.
"""

import contextlib
import functools
import hashlib
import json
import math
import os
import queue
import shlex
import shutil
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from forge.cli import arg
from forge.files import LOCK, atomic_path, check_same_model, write_json

FORMAT = "clt-forge-activation-cache"
VERSION = 2  # 2: a crc32 per chunk of rows in the manifest
MAGIC = 20251126  # header[0] of every shard file
HEADER_INTS = 32  # the header is 32 int64 = 256 bytes
ALIGN = 64  # every section starts on a 64-byte boundary
DTYPES = {"fp32": (0, np.float32), "fp16": (1, np.float16), "int8": (2, np.int8)}
DTYPES["int4"] = (3, np.uint8)  # two values per byte
INT4_GROUP = 32  # channels per int4 scale: experiments/quantization.py measured the trade-off
SECTIONS = ("mlp_in", "mlp_out", "scales", "meta")  # after the header, in file order
MANIFEST = "manifest.json"
CHECK_BYTES = 1 << 20  # a crc32 covers about this many stored bytes of consecutive rows
STATS = ("norm", "sq", "err")  # the manifest's running totals, each (2, L) float64
MANIFEST_RATIO = 64  # rewrite the manifest once the shards since its last write hold 64x its bytes
MAX_OPEN_SHARDS = 256  # memmaps a reader keeps open at once
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # their sha256 is part of the identity
OVERWRITE = "rebuild the cache with `python cache.py ... --overwrite`"


# -----------------------------------------------------------------------------
# the shard file


def _pad(n):
    return -(-n // ALIGN) * ALIGN


def shard_name(i):
    return f"shard_{i:05d}.bin"


def row_sections(dtype, L, d):
    """{section: (numpy dtype, shape of one row)} of the stored sections but meta."""
    act = DTYPES[dtype][1]
    width = d // 2 if dtype == "int4" else d  # int4: two values per byte
    out = dict(mlp_in=(act, (L, width)), mlp_out=(act, (L, width)))
    if dtype in ("int8", "int4"):  # fp16 / fp32 shards have no scales section (it has 0 bytes)
        out["scales"] = (np.int16, (2, L) if dtype == "int8" else (2, L, d // INT4_GROUP))
    return out


def pack_int4(q):
    """q (..., d) int8 in -7..7 -> (..., d/2) uint8: q + 8 in two nibbles, the even channel low."""
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed):
    """pack_int4's inverse: (..., d/2) uint8 -> (..., d) int8."""
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2).view(torch.int8) - 8


def shard_layout(dtype, rows, L, d):
    """Byte offsets of the sections of one shard file, and the file's size."""
    size = {
        k: _pad(rows * math.prod(shape) * np.dtype(kind).itemsize)
        for k, (kind, shape) in row_sections(dtype, L, d).items()
    }
    off = dict(mlp_in=_pad(HEADER_INTS * 8))
    off["mlp_out"] = off["mlp_in"] + size["mlp_in"]
    off["scales"] = off["mlp_out"] + size["mlp_out"]
    off["meta"] = off["scales"] + size.get("scales", 0)
    return off, off["meta"] + _pad(rows * 3 * 4)


def row_bytes(dtype, L, d):
    """Stored bytes of one row's activations and scales (without its 12 bytes of meta)."""
    sections = row_sections(dtype, L, d).values()
    return sum(math.prod(shape) * np.dtype(kind).itemsize for kind, shape in sections)


def header(dtype, rows, L, d):
    off, size = shard_layout(dtype, rows, L, d)
    h = [MAGIC, VERSION, DTYPES[dtype][0], rows, L, d, *off.values(), size]
    return np.array(h + [0] * (HEADER_INTS - len(h)), dtype=np.int64)


def sections(buf, dtype, rows, L, d):
    """One shard's bytes (uint8) as a numpy view per section; scales None unless int8 / int4."""
    off, _ = shard_layout(dtype, rows, L, d)
    specs = {k: (kind, (rows, *shape)) for k, (kind, shape) in row_sections(dtype, L, d).items()}
    specs["meta"] = (np.int32, (rows, 3))
    views = dict(scales=None)
    for key, (kind, shape) in specs.items():
        views[key] = buf[off[key] :].view(kind)[: math.prod(shape)].reshape(shape)
    return views


def map_shard(path, m, i):
    """The sections of shard i of manifest m in the cache directory `path`, memmapped read-only."""
    s = m["shards"][i]
    mm = np.memmap(os.path.join(path, s["file"]), dtype=np.uint8, mode="r")
    return sections(mm, m["dtype"], s["rows"], m["n_layers"], m["d_model"])


def crc32(views, a, b):
    """crc32 of rows a..b-1 of one shard's sections (buffers or memmap), in file order."""
    crc = 0
    for key in SECTIONS:
        crc = crc if views[key] is None else zlib.crc32(views[key][a:b], crc)
    return crc


def chunk_problem(m, i, views, j):
    """ "" if chunk j of shard i has the crc32 the manifest lists, else what is wrong."""
    s = m["shards"][i]
    C = m["check_rows"]
    if crc32(views, j * C, (j + 1) * C) == s["crc32"][j]:
        return ""
    rows = f"rows {j * C}..{min((j + 1) * C, s['rows']) - 1}"
    return f"{s['file']}: {rows} fail their crc32 check (the file is damaged)"


# -----------------------------------------------------------------------------
# the manifest and the checks on a finished cache


def open_manifest(path):
    """path/manifest.json, checked: format, version, and shard names inside the directory."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        not_one = "not an activation cache (build one with cache.py)"
        raise FileNotFoundError(f"{path} has no {MANIFEST}: {not_one}")
    try:
        m = json.loads(Path(mpath).read_text())
    except json.JSONDecodeError as e:  # written whole: this one was edited or damaged
        raise ValueError(f"{mpath} is not valid JSON ({e}): {OVERWRITE}") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        found = f"{mpath} is format {m.get('format')} version {m.get('version')}"
        raise ValueError(f"{found}, this cache.py reads {FORMAT} version {VERSION}: {OVERWRITE}")
    for i, s in enumerate(m["shards"]):
        if s.get("file") != shard_name(i):  # never open a path a manifest names: only our own
            listed = f"lists shard {i} as {s.get('file')!r}, not {shard_name(i)!r}"
            raise ValueError(f"{mpath} {listed}: the manifest was edited or damaged; {OVERWRITE}")
    return m


def check_shard(path, m, i, content=""):
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
        bad = f"magic {h[0]}, version {h[1]}, expected magic {MAGIC}, version {VERSION}"
        return f"{s['file']}: {bad}: not written by this cache.py, or damaged"
    want = header(m["dtype"], s["rows"], m["n_layers"], m["d_model"])
    if not np.array_equal(h, want):
        found = f"{s['file']}: header {h[:11].tolist()} disagrees with the manifest"
        return f"{found} {want[:11].tolist()} ([magic, version, dtype, rows, L, d, offsets, bytes])"
    if content == "sha256":
        sha = hashlib.sha256()  # read in 8 MB blocks (hashlib.file_digest needs Python 3.11)
        with open(p, "rb") as f:
            for block in iter(functools.partial(f.read, 1 << 23), b""):
                sha.update(block)
        digest = sha.hexdigest()
        if digest != s["sha256"]:
            return f"{s['file']}: sha256 {digest[:16]}... != manifest {s['sha256'][:16]}..."
    if content == "crc32":
        views = map_shard(path, m, i)
        problems = (chunk_problem(m, i, views, j) for j in range(len(s["crc32"])))
        return next((p for p in problems if p), "")
    return ""


def repair_command(path, m, defaults):
    """The build command that made the cache at `path` (it repairs): the flags not at defaults."""
    made = dict(m["identity"], model=m["model"], device=m["device"], out=path)
    args = ["python", "cache.py", "build"]
    for name, default in defaults.items():
        value = made.get(name, default)
        flag = name.replace("_", "-")
        if value != default and isinstance(value, bool):
            args.append(f"--{'' if value else 'no-'}{flag}")
        elif value != default:
            args += [f"--{flag}", shlex.quote(str(value))]
    return " ".join(args)


def problems(path, m, content):
    """[(i, what is wrong)] for the listed shards that fail check_shard(..., content)."""
    n = len(m["shards"])
    bar = tqdm(range(n), desc=content, unit="shard", disable=None if n > 1 else True)
    return [(i, p) for i in bar if (p := check_shard(path, m, i, content))]


def verify(path):
    """Check every listed shard's size, header and sha256: the problems found (empty: all good)."""
    m = open_manifest(path)
    bad = [p for _, p in problems(path, m, "sha256")]
    if not m.get("complete"):
        bad.insert(0, f"{MANIFEST}: unfinished (rerun the build command to resume)")
    return bad


def summary(path, m):
    """A finished cache in a few lines: tokens, bytes per token, per-layer norms and NMSE."""
    n = m["n_tokens"]
    L = m["n_layers"]
    d = m["d_model"]
    total = sum(s["bytes"] for s in m["shards"])
    splits = m["splits"]
    nmse = m["nmse_total"]
    lines = [
        f"{path}: {n} tokens | dtype {m['dtype']} | L={L} d={d} | ctx {m['ctx']} | "
        f"{len(m['shards'])} shards | train {splits['train']} heldout {splits['heldout']}",
        f"bytes/token {total / n:.1f} (activations+scales {row_bytes(m['dtype'], L, d)}, +12 "
        f"token/doc/pos) | {total / n / (8 * L * d + 12):.4f}x fp32 | total {total / 1e6:.1f} MB",
        f"quantization NMSE ||x - x_hat||^2/||x||^2: mlp_in {nmse[0]:.3g} | mlp_out {nmse[1]:.3g}",
        "layer | mean ||mlp_in|| | mean ||mlp_out|| | NMSE in | NMSE out",
    ]
    for i, row in enumerate(zip(m["norm_in"], m["norm_out"], m["nmse_in"], m["nmse_out"])):
        lines.append(f"{i:5d} | {row[0]:15.4f} | {row[1]:16.4f} | {row[2]:.3g} | {row[3]:.3g}")
    return "\n".join(lines)


@dataclass
class VerifyConfig:
    """check sizes, headers and sha256 of every shard"""

    paths: list = arg([], "cache directories")


class StatsConfig(VerifyConfig):
    """tokens, bytes/token, per-layer norms, quantization error"""


def report(command, paths, defaults):
    """`cache.py verify|stats PATH...`: problems and repair command, or summary; 1 if damaged."""
    if not paths:
        example = f"python cache.py {command} runs/cache"
        raise ValueError(f"`cache.py {command}` needs a cache directory, e.g. `{example}`")
    status = 0
    for path in paths:
        if command == "stats":
            print(summary(path, ShardFiles(path, defaults).manifest))
        elif bad := verify(path):
            print("\n".join("BAD " + b for b in bad))
            repair = repair_command(path, open_manifest(path), defaults)
            print(f"repair (rewrites only what is damaged or missing): {repair}")
            status = 1
        else:
            print(f"{path}: all shards OK")
    return status


# -----------------------------------------------------------------------------
# reading: a finished cache's shards, each chunk checked on its first read


class ShardFiles:
    """A finished cache's shards, read-only, thread-safe. Opening checks each size and header;
    `take` checks a chunk's crc32 the first time it reads a row of it. defaults: the build's
    {flag: default}, for the repair command errors name. model: refuse another model's cache."""

    def __init__(self, path, defaults, model=None):
        self.path = path
        self.manifest = m = open_manifest(path)
        if model is not None:
            made = f"the cache {path} (made by model {m['model']})"
            check_same_model(model, m["identity"]["model_sha256"], made)
        self.repair = repair_command(path, m, defaults)
        if not m.get("complete"):
            fix = f"rerun the command that built it to resume: {self.repair}"
            raise ValueError(f"{path} is unfinished ({len(m['shards'])} shards): {fix}")
        self.starts = np.cumsum([0] + [s["rows"] for s in m["shards"]])  # each shard's first row
        assert self.starts[-1] == m["n_tokens"], f"{self.starts[-1]} rows != {m['n_tokens']}"
        for i in range(len(m["shards"])):
            self._refuse(check_shard(path, m, i))
        self._checked = [np.zeros(len(s["crc32"]), bool) for s in m["shards"]]  # chunks found good
        self._check_locks = [threading.Lock() for _ in m["shards"]]
        self._shard = lru_cache(MAX_OPEN_SHARDS)(partial(map_shard, path, m))  # memmaps (fds)

    def _refuse(self, problem):
        if problem:
            fix = f"rerunning its build, `{self.repair}` (add --overwrite to rebuild it all)"
            raise ValueError(f"{self.path}: {problem}: repair it by {fix}")

    def take(self, rows, keys):
        """The stored sections `keys` of the given rows (sorted global ids) as torch tensors, read
        shard by shard; None for a section the shards lack (scales of fp16 / fp32)."""
        first = {k: v for k in keys if (v := self._shard(0)[k]) is not None}
        out = {k: np.empty((len(rows), *v.shape[1:]), v.dtype) for k, v in first.items()}
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]) if len(rows) else ():
            i = int(shard_of[a])
            local = rows[a:b] - self.starts[i]
            src = self._shard(i)
            chunks = np.unique(local // self.manifest["check_rows"])
            with self._check_locks[i]:  # each chunk's crc32 on its first read; other threads wait
                for j in chunks[~self._checked[i][chunks]]:
                    self._refuse(chunk_problem(self.manifest, i, src, j))
                    self._checked[i][j] = True
            runs = np.flatnonzero(np.diff(local) != 1) + 1  # where runs of consecutive rows break
            if len(runs) <= (b - a) // 64:  # long runs (whole units): plain sequential copies
                for ra, rb in zip(np.r_[0, runs], np.r_[runs, b - a]):
                    for k in out:
                        out[k][a + ra : a + rb] = src[k][local[ra] : local[rb - 1] + 1]
            else:
                for k in out:
                    np.take(src[k], local, axis=0, out=out[k][a:b])
        return {k: torch.from_numpy(out[k]) if k in out else None for k in keys}


def ordered_map(fn, items, workers, ahead):
    """Yield fn(item) in order from `workers` threads, at most `ahead` ahead; errors raise here."""
    with ThreadPoolExecutor(workers) as ex:
        futures = []
        for item in items:
            futures.append(ex.submit(fn, item))
            if len(futures) > ahead:
                yield futures.pop(0).result()
        yield from (f.result() for f in futures)


def empty(shape, dtype=torch.float32, device="cpu"):
    """torch.empty, on the CPU through numpy: numpy asks Linux for transparent huge pages (madvise),
    so first touching a fresh batch costs a page fault per 2 MB, not per 4 kB: 4x faster here."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


# -----------------------------------------------------------------------------
# building: the output directory, resume checks, the writer


def check_config(cfg, n_ctx, d):
    """Refuse a build's arguments that cannot make a cache, before anything is written."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}: choose one of {list(DTYPES)}")
    if cfg.dtype == "int4" and d % INT4_GROUP:
        raise ValueError(f"int4 needs d_model divisible by {INT4_GROUP}, got {d}: use --dtype int8")
    if not 2 <= cfg.ctx <= n_ctx:
        raise ValueError(f"ctx={cfg.ctx} must be in 2..n_ctx={n_ctx} of {cfg.model}")
    if min(cfg.tokens, cfg.batch_size) <= 0 or cfg.shard_tokens < 0 or not 0 <= cfg.heldout < 1:
        got = f"{cfg.tokens}, {cfg.batch_size}, {cfg.shard_tokens}, {cfg.heldout}"
        raise ValueError(f"need tokens, batch_size > 0, shard_tokens >= 0, 0 <= heldout < 1: {got}")


def open_out_dir(cfg, made, model_sha, model_dir):
    """Create the cache directory cfg.out, or resume in it (the same identity, unless --overwrite):
    the manifest to continue from. made: model_config, n_layers, d_model, device, channel_scale."""
    gpt2 = os.path.exists(os.path.join(model_dir, "merges.txt"))
    names = TOKENIZER_FILES if gpt2 else ("tokenizer.json",)  # the Llama family's tokenizer
    tok = hashlib.sha256(b"".join(Path(model_dir, n).read_bytes() for n in names))
    local = cfg.corpus != "toy" and not cfg.corpus.startswith("hf:")
    corpus = os.path.realpath(cfg.corpus) if local else cfg.corpus
    keys = ("text_field", "tokens", "ctx", "dtype", "keep_bos", "heldout", "shard_tokens")
    identity = dict(model_sha256=model_sha, tokenizer_sha256=tok.hexdigest(), corpus=corpus)
    identity.update({k: getattr(cfg, k) for k in (*keys, "batch_size", "seed")})  # makes the bytes
    out = cfg.out
    path = os.path.join(out, MANIFEST)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the cache directory {out}: {e}") from e
    if os.path.exists(path) and not cfg.overwrite:
        old = open_manifest(out)
        was = old["identity"]
        if diff := {k: (was.get(k), v) for k, v in identity.items() if was.get(k) != v}:
            other = f"a cache made with other arguments ({{field: (cache, now)}}: {diff})"
            fix = "pass --overwrite to replace it, or choose another --out"
            raise ValueError(f"{out} holds {other}; {fix}")
        if old["channel_scale"] != made["channel_scale"]:
            changed = "the first batch now gives other int8 channel scales than when it was started"
            fix = "the corpus or the device changed; resume where it began, or pass --overwrite"
            raise ValueError(f"{out}: {changed}: {fix}")
        return old
    ours = [n for n in os.listdir(out) if n.startswith(("shard_", MANIFEST))]  # never a user's
    if not os.path.exists(path) and len(ours) < len(set(os.listdir(out)) - {LOCK}):
        raise ValueError(f"{out} exists, is not empty and has no {MANIFEST}: choose another --out")
    for name in ours:  # --overwrite, or shards whose manifest was deleted
        os.remove(os.path.join(out, name))
    m = dict(format=FORMAT, version=VERSION, complete=False, identity=identity)
    m["model"] = os.path.realpath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # loaded
    m.update({k: made[k] for k in ("model_config", "n_layers", "d_model")})
    m.update({k: getattr(cfg, k) for k in ("dtype", "ctx", "keep_bos", "shard_tokens")})
    check_rows = max(1, CHECK_BYTES // row_bytes(cfg.dtype, made["n_layers"], made["d_model"]))
    m.update(device=made["device"], check_rows=check_rows, channel_scale=made["channel_scale"])
    m["shards"] = []
    try:
        write_json(path, m)
    except OSError as e:
        raise ValueError(f"cannot write to {out}: {e}: free space, or choose another --out") from e
    return m


class ShardWriter(contextlib.AbstractContextManager):
    """A build's output: opening creates cfg.out or resumes in it, checks every listed shard and
    plans what to write; `add` fills shard buffers, each full one written on a thread and listed in
    order. Leaving `with` commits every write (the manifest is saved now and then, see _commit)."""

    def __init__(self, cfg, made, model_sha, model_dir, threads=2):
        self.cfg = cfg
        self.path = os.path.join(cfg.out, MANIFEST)
        self.manifest = m = open_out_dir(cfg, made, model_sha, model_dir)
        bad = problems(cfg.out, m, "crc32")  # size, header, crc32s: one read at crc32 speed
        print("".join(f"repairing {p}\n" for _, p in bad), end="")
        damaged = {i for i, _ in bad}
        self.uncounted = set()  # listed shards the totals miss: the manifest was cut or edited
        if (m.get("sums") or {}).get("shards") != len(m["shards"]):  # count them all again
            m["sums"] = dict(shards=0, **{k: np.zeros((2, m["n_layers"])).tolist() for k in STATS})
            self.uncounted = set(range(len(m["shards"])))
        self.complete = m["complete"] and not damaged
        if self.complete:
            print(f"{cfg.out} is already complete: every shard's size, header and crc32 checked")
            return
        S = cfg.shard_tokens
        self.rewrite = damaged | self.uncounted
        self.resume = sys.maxsize if m["complete"] else len(m["shards"])  # the first new shard
        self.last = max(self.rewrite, default=-1) if m["complete"] else sys.maxsize
        r = self.resume  # resuming, the last listed shard's tokens are checked against the corpus
        self.check = r - 1 if 0 < r < sys.maxsize and r - 1 not in damaged else None
        n_new = max(0, -(-cfg.tokens // S) - r)
        need = n_new * shard_layout(cfg.dtype, S, m["n_layers"], m["d_model"])[1]
        if need > (free := shutil.disk_usage(cfg.out).free):
            short = f"{cfg.out} has {free / 1e9:.2f} GB free"
            raise ValueError(f"the cache needs {need / 1e9:.2f} GB more but {short}")
        todo = min((len(self.rewrite) + n_new) * S, cfg.tokens)
        self.pbar = tqdm(total=todo, unit="tok", desc="cache", disable=None)
        self.saved_bytes = os.path.getsize(self.path)  # the manifest as last written
        self.unsaved_bytes = 0  # shard bytes committed since then
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads)
        self.pending = []
        self.free = queue.SimpleQueue()
        self.buf = None
        self.clock = (time.perf_counter(), time.process_time())  # wall, CPU (all threads)

    def batches(self, batches):
        """(row0, idx, meta, pieces) for the batches holding rows of shards to write (others are
        only tokenized); pieces: (a, b) per shard, rows a..b-1 of the batch."""
        S = self.cfg.shard_tokens
        for row0, idx, meta in batches:
            if row0 // S > self.last:
                return
            if self.check is not None:
                self._check_tokens(row0, meta)
            hi = min(row0 + len(meta), self.cfg.tokens)
            ks = range(row0 // S, (hi - 1) // S + 1)
            pieces = [(max(k * S, row0) - row0, min(k * S + S, hi) - row0) for k in ks]
            pieces = [p for k, p in zip(ks, pieces) if k in self.rewrite or k >= self.resume]
            if pieces:
                yield row0, idx, meta, pieces

    def _check_tokens(self, row0, meta):
        """Resuming, the corpus must still give the tokens stored in the last listed shard."""
        k = self.check
        s = self.manifest["shards"][k]
        first = k * self.cfg.shard_tokens
        a = max(first, row0)
        b = min(first + s["rows"], row0 + len(meta))
        if a >= b:
            return
        stored = map_shard(self.cfg.out, self.manifest, k)["meta"][a - first : b - first]
        if not np.array_equal(stored, meta[a - row0 : b - row0]):
            changed = f"now gives other tokens than those stored in {s['file']}"
            fix = "it changed since the cache was started; pass --overwrite to rebuild"
            raise ValueError(f"{self.cfg.out}: the corpus {self.cfg.corpus} {changed}: {fix}")

    def add(self, row, stored, meta):
        """Rows row.. of one shard, and their meta (n, 3); stored: per section j (q, scale bits,
        ||x||, ||x_hat - x||^2) from quantize_rows. Buffers are reused: fresh 64 MB costs faults."""
        if self.buf is None:  # a new shard: a buffer, float64 sums of its statistics
            L = self.manifest["n_layers"]
            args = (self.cfg.dtype, self.cfg.shard_tokens, L, self.manifest["d_model"])
            if self.free.empty():  # a shard file's bytes in RAM, viewed as its sections
                self.free.put(sections(np.empty(shard_layout(*args)[1], np.uint8), *args))
            self.buf = self.free.get()
            self.index = row // self.cfg.shard_tokens
            self.rows = 0
            self.sums = {k: torch.zeros(2, L, dtype=torch.float64) for k in STATS}  # (2, L)
        a = self.rows
        self.rows += len(meta)
        for j, (q, bits, norm, err_sq) in enumerate(stored):
            self.buf[SECTIONS[j]][a : self.rows] = q.cpu().numpy()
            if bits is not None:
                self.buf["scales"][a : self.rows, j] = bits
            self.sums["norm"][j] += norm.sum(0).cpu()
            self.sums["sq"][j] += norm.pow(2).sum(0).cpu()
            self.sums["err"][j] += err_sq.sum(0).cpu()
        self.buf["meta"][a : self.rows] = meta
        self.pbar.update(len(meta))
        if self.rows == self.cfg.shard_tokens:
            self._put()
            self._commit_done(self.threads)  # waits when all threads are busy: bounded memory

    def _put(self):  # hand the shard being filled to a writer thread
        self.pending.append(
            self.pool.submit(self._write, self.index, self.buf, self.rows, self.sums)
        )
        self.buf = None

    def __exit__(self, error, *_):
        """Write the last shard (not after an error), commit every write, save the manifest."""
        try:
            if self.buf is not None and error is None:
                self._put()
            self._commit_done(0)
        finally:
            self.pbar.close()
            self.pool.shutdown(cancel_futures=True)
            if self.unsaved_bytes:  # also after an error: the shards committed so far stay listed
                self._save()

    def finish(self):
        """The manifest with its totals (tokens, splits, mean norms, NMSE), marked complete and
        written; returned with the writing's seconds and cpu_seconds."""
        m = self.manifest
        if self.complete:
            return dict(m, seconds=0.0, cpu_seconds=0.0)
        n_rows = sum(s["rows"] for s in m["shards"])
        R = self.cfg.ctx - (not self.cfg.keep_bos)  # rows per context: held out whole
        train = n_rows
        if self.cfg.heldout > 0:
            train = min(max(int(round(n_rows * (1 - self.cfg.heldout) / R)) * R, R), n_rows - 1)
        tot = {k: np.array(m["sums"][k]) for k in STATS}  # (2, L)
        norm = tot["norm"] / n_rows  # (2, L)
        nmse = tot["err"] / np.maximum(tot["sq"], 1e-300)  # (2, L)
        m.update(
            complete=True, n_tokens=n_rows, splits=dict(train=[0, train], heldout=[train, n_rows])
        )
        m.update(norm_in=norm[0].tolist(), norm_out=norm[1].tolist())
        m.update(nmse_in=nmse[0].tolist(), nmse_out=nmse[1].tolist())
        m.update(nmse_total=[float(tot["err"][j].sum() / tot["sq"][j].sum()) for j in (0, 1)])
        write_json(self.path, m)
        if n_rows < self.cfg.tokens:
            print(f"note: corpus {self.cfg.corpus} ran out after {n_rows} tokens")
        wall = time.perf_counter() - self.clock[0]
        return dict(m, seconds=wall, cpu_seconds=time.process_time() - self.clock[1])

    def _commit_done(self, keep):  # commit finished writes in order, and more while > keep pending
        while self.pending and (self.pending[0].done() or len(self.pending) > keep):
            self._commit(*self.pending.pop(0).result())

    def _commit(self, index, entry, sums):
        listed = self.manifest["shards"]
        new = index >= len(listed)
        if new:
            assert index == len(listed), f"shard {index} committed after {len(listed)} listed ones"
            listed.append(entry)
        elif entry["sha256"] != listed[index]["sha256"]:  # a repair must give the same bytes
            fix = "the corpus, the device or torch changed; rebuild the cache with --overwrite"
            rebuilt = f"{entry['file']} was rebuilt with other bytes than when the cache was made"
            raise ValueError(f"{rebuilt}: {fix}")
        listed[index] = entry
        if new or index in self.uncounted:
            self.uncounted.discard(index)
            totals = self.manifest["sums"]
            for k in STATS:  # float64 sums in shard order: what JSON holds, it gives back exactly
                totals[k] = (np.array(totals[k]) + sums[k].numpy()).tolist()
            totals["shards"] += 1
        self.unsaved_bytes += entry["bytes"]
        if self.unsaved_bytes >= MANIFEST_RATIO * self.saved_bytes:
            self._save()

    def _write(self, index, buf, n, sums):
        """On a thread: write rows ..n of buf as shard `index`, atomically; then buf is free."""
        m = self.manifest
        views = {k: None if v is None else v[:n] for k, v in buf.items()}
        crc = [crc32(views, a, a + m["check_rows"]) for a in range(0, n, m["check_rows"])]
        arrays = [header(m["dtype"], n, m["n_layers"], m["d_model"])]
        arrays += [views[k] for k in SECTIONS if views[k] is not None]
        path = os.path.join(self.cfg.out, shard_name(index))
        h = hashlib.sha256()
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                for arr in arrays:  # each padded to ALIGN bytes
                    mv = memoryview(np.ascontiguousarray(arr)).cast("B")
                    for chunk in (mv, b"\0" * (_pad(len(mv)) - len(mv))):
                        h.update(chunk)
                        f.write(chunk)
                size = shard_layout(m["dtype"], n, m["n_layers"], m["d_model"])[1]
                assert f.tell() == size, f"wrote {f.tell()} bytes, layout says {size}"
        except OSError as e:
            fix = "Finished shards are kept: free space and rerun the same command to resume"
            raise ValueError(f"writing {path} failed: {e} (disk full or unwritable?). {fix}") from e
        self.free.put(buf)
        return (
            index,
            dict(file=shard_name(index), rows=n, bytes=size, sha256=h.hexdigest(), crc32=crc),
            sums,
        )

    def _save(self):
        write_json(self.path, self.manifest)
        self.saved_bytes = os.path.getsize(self.path)
        self.unsaved_bytes = 0

"""The activation cache's files: the shard format, the manifest, and every check on them.

A cache directory holds manifest.json and shard_00000.bin, shard_00001.bin, ... A shard file is, in
order, each section starting on a 64-byte boundary (`shard_layout`; magic + version as in llm.c's
`_peek_data_shard`):

    header   (32,) int64   [MAGIC, VERSION, dtype code, rows, L, d, off_in, off_out, off_scales,
                            off_meta, file bytes, 0...]
    mlp_in   (rows, L, d)  dtype; for int8 q = round(x / (channel * scale)) in [-127, 127], channel
                           (L, d) = the manifest's channel_scale[0]
    mlp_out  (rows, L, d)  dtype
    scales   (rows, 2, L)  int16 = the bits of a bfloat16 scale; [:, 0] for mlp_in, [:, 1] for
                           mlp_out (int8 only; empty otherwise)
    meta     (rows, 3)     int32: token id, document id, position in its context

The manifest (FORMAT, VERSION) holds the build's identity (what determines the bytes: a rerun
resumes only if it agrees), the shapes and channel scales, and per shard its file, rows, bytes,
sha256 and a crc32 per chunk of check_rows rows (~1 MB); running totals of the statistics ("sums");
once complete, the token count, the train / heldout splits, per-layer norms and NMSE.

Each check lives here once, and each message names the fix (the build command, which repairs, or
--overwrite): open_manifest (format, version, shard names inside the directory); check_shard (size
and header; the crc32 of each chunk; the sha256 of the file); ShardFiles, the reader's memmaps (each
chunk's crc32 checked on its first read); for a build, open_out_dir (resume only the same
identity), damaged_shards, uncounted_shards, check_disk, check_tokens. ShardWriter writes shards on
background threads, atomically, and lists a shard in the manifest only once it is whole on disk.
"""

import hashlib
import json
import os
import queue
import shlex
import shutil
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from forge.files import atomic_path, write_json

FORMAT = "clt-forge-activation-cache"
VERSION = 2  # 2: a crc32 per chunk of rows in the manifest
MAGIC = 20251126  # header[0] of every shard file
HEADER_INTS = 32  # the header is 32 int64 = 256 bytes
ALIGN = 64  # every section starts on a 64-byte boundary
DTYPES = {"fp32": (0, np.float32), "fp16": (1, np.float16), "int8": (2, np.int8)}
SECTIONS = ("mlp_in", "mlp_out", "scales", "meta")  # after the header, in file order
MANIFEST = "manifest.json"
CHECK_BYTES = 1 << 20  # a crc32 covers about this many stored bytes of consecutive rows
STATS = ("norm", "sq", "err")  # the manifest's running totals, each (2, L) float64
MANIFEST_RATIO = 64  # rewrite the manifest once the shards since its last write hold 64x its bytes
MAX_OPEN_SHARDS = 256  # memmaps a reader keeps open at once
OVERWRITE = "rebuild the cache with `python cache.py ... --overwrite`"


# -----------------------------------------------------------------------------
# the shard file


def _pad(n):
    return -(-n // ALIGN) * ALIGN


def shard_name(i):
    return f"shard_{i:05d}.bin"


def shard_layout(dtype, rows, L, d):
    """Byte offsets of the sections of one shard file, and the file's size."""
    acts = _pad(rows * L * d * np.dtype(DTYPES[dtype][1]).itemsize)
    scales = _pad(rows * 2 * L * 2) if dtype == "int8" else 0
    off = dict(mlp_in=_pad(HEADER_INTS * 8))
    off["mlp_out"] = off["mlp_in"] + acts
    off["scales"] = off["mlp_out"] + acts
    off["meta"] = off["scales"] + scales
    return off, off["meta"] + _pad(rows * 3 * 4)


def row_bytes(dtype, L, d):
    """Stored bytes of one row's activations and scales (without its 12 bytes of meta)."""
    return 2 * L * d * np.dtype(DTYPES[dtype][1]).itemsize + (4 * L if dtype == "int8" else 0)


def header(dtype, rows, L, d):
    off, size = shard_layout(dtype, rows, L, d)
    h = np.zeros(HEADER_INTS, dtype=np.int64)
    h[:11] = [MAGIC, VERSION, DTYPES[dtype][0], rows, L, d, *off.values(), size]
    return h


def sections(buf, dtype, rows, L, d):
    """One shard's bytes (uint8) as a numpy view per section; scales None unless int8."""
    off, _ = shard_layout(dtype, rows, L, d)
    act = DTYPES[dtype][1]
    specs = dict(mlp_in=(act, (rows, L, d)), mlp_out=(act, (rows, L, d)))
    if dtype == "int8":  # fp16 / fp32 shards have no scales section (it has 0 bytes)
        specs["scales"] = (np.int16, (rows, 2, L))
    specs["meta"] = (np.int32, (rows, 3))
    views = dict(scales=None)
    for key, (kind, shape) in specs.items():
        n = int(np.prod(shape)) * np.dtype(kind).itemsize
        views[key] = buf[off[key] : off[key] + n].view(kind).reshape(shape)
    return views


def map_shard(path, m, i):
    """The sections of shard i of manifest m in the cache directory `path`, memmapped read-only."""
    s = m["shards"][i]
    mm = np.memmap(os.path.join(path, s["file"]), dtype=np.uint8, mode="r")
    return sections(mm, m["dtype"], s["rows"], m["n_layers"], m["d_model"])


def crc32(views, a, b):
    """crc32 of rows a..b-1 of one shard: their mlp_in, mlp_out, scales and meta, in that order.
    The writer computes it from its buffers, the reader from the memmapped file."""
    crc = 0
    for key in SECTIONS:
        if views[key] is not None:
            crc = zlib.crc32(views[key][a:b], crc)
    return crc


def chunk_problem(m, i, views, j):
    """ "" if chunk j of shard i has the crc32 the manifest lists, else what is wrong."""
    s = m["shards"][i]
    C = m["check_rows"]
    if crc32(views, j * C, (j + 1) * C) == s["crc32"][j]:
        return ""
    rows = f"rows {j * C}..{min((j + 1) * C, s['rows']) - 1}"
    return f"{s['file']}: {rows} fail their crc32 check (the file is damaged)"


def write_shard(out, m, index, views):
    """Write shard `index` from the rows of its sections (views), atomically; the sha256 and
    crc32s are computed as it writes. Returns its manifest entry."""
    n = len(views["meta"])
    name = shard_name(index)
    path = os.path.join(out, name)
    C = m["check_rows"]
    crc = [crc32(views, a, a + C) for a in range(0, n, C)]
    arrays = [header(m["dtype"], n, m["n_layers"], m["d_model"])]
    arrays += [views[k] for k in SECTIONS if views[k] is not None]
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
            size = shard_layout(m["dtype"], n, m["n_layers"], m["d_model"])[1]
            assert written == size, f"wrote {written} bytes, layout says {size}"
    except OSError as e:
        raise ValueError(
            f"writing {path} failed: {e} (disk full or unwritable?). Finished shards are "
            "kept: free space and rerun the same command to resume"
        ) from e
    return dict(file=name, rows=n, bytes=written, sha256=h.hexdigest(), crc32=crc)


# -----------------------------------------------------------------------------
# the manifest and the checks on a finished cache


def open_manifest(path):
    """Read path/manifest.json and check what every user of it relies on: format, version, and
    shard names that stay inside the cache directory. Returns the manifest."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise FileNotFoundError(
            f"{path} has no {MANIFEST}: not an activation cache (build one with cache.py)"
        )
    with open(mpath) as f:
        try:
            m = json.load(f)
        except json.JSONDecodeError as e:  # written whole: this one was edited or damaged
            raise ValueError(f"{mpath} is not valid JSON ({e}): {OVERWRITE}") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(
            f"{mpath} is format {m.get('format')} version {m.get('version')}, this cache.py reads "
            f"{FORMAT} version {VERSION}: {OVERWRITE}"
        )
    for i, s in enumerate(m["shards"]):
        if s.get("file") != shard_name(i):  # never open a path a manifest names: only our own
            raise ValueError(
                f"{mpath} lists shard {i} as {s.get('file')!r}, not {shard_name(i)!r}: the "
                f"manifest was edited or damaged; {OVERWRITE}"
            )
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
        return (
            f"{s['file']}: magic {h[0]}, version {h[1]}, expected magic {MAGIC}, version "
            f"{VERSION}: not written by this cache.py, or damaged"
        )
    want = header(m["dtype"], s["rows"], m["n_layers"], m["d_model"])
    if not np.array_equal(h, want):
        return (
            f"{s['file']}: header {h[:11].tolist()} disagrees with the manifest "
            f"{want[:11].tolist()} ([magic, version, dtype, rows, L, d, offsets..., bytes])"
        )
    if content == "sha256":
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        if digest.hexdigest() != s["sha256"]:
            return f"{s['file']}: sha256 {digest.hexdigest()[:16]}... != manifest {s['sha256'][:16]}..."
    if content == "crc32":
        views = map_shard(path, m, i)
        problems = (chunk_problem(m, i, views, j) for j in range(len(s["crc32"])))
        return next((p for p in problems if p), "")
    return ""


def repair_command(path, m, defaults):
    """The build command that made the cache at `path`: rerun, it rewrites damaged shards.
    defaults: the build's flags and their defaults ({name: default}); only others are spelt out."""
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


def verify(path):
    """Check every listed shard's size, header and sha256: the problems found (empty: all good)."""
    m = open_manifest(path)
    bad = (
        [] if m.get("complete") else [f"{MANIFEST}: unfinished (rerun the build command to resume)"]
    )
    for i in tqdm(range(len(m["shards"])), desc="verify", unit="shard", disable=None):
        bad.append(check_shard(path, m, i, "sha256"))
    return [b for b in bad if b]


def summary(path, m):
    """A printable summary of a finished cache: tokens, bytes per token, per-layer norms and
    quantization error."""
    n = m["n_tokens"]
    L = m["n_layers"]
    total = sum(s["bytes"] for s in m["shards"])
    fp32 = 2 * L * m["d_model"] * 4
    lines = [
        f"{path}: {n} tokens | dtype {m['dtype']} | L={L} d={m['d_model']} | ctx {m['ctx']} | "
        f"{len(m['shards'])} shards | train {m['splits']['train']} heldout {m['splits']['heldout']}",
        f"bytes/token {total / n:.1f} (activations+scales {row_bytes(m['dtype'], L, m['d_model'])}"
        f", +12 token/doc/pos) | {total / n / (fp32 + 12):.4f}x fp32 | total {total / 1e6:.1f} MB",
        f"quantization NMSE ||x - x_hat||^2/||x||^2: mlp_in {m['nmse_total'][0]:.3g} | "
        f"mlp_out {m['nmse_total'][1]:.3g}",
        "layer | mean ||mlp_in|| | mean ||mlp_out|| | NMSE in | NMSE out",
    ]
    for i in range(L):
        lines.append(
            f"{i:5d} | {m['norm_in'][i]:15.4f} | {m['norm_out'][i]:16.4f} | "
            f"{m['nmse_in'][i]:.3g} | {m['nmse_out'][i]:.3g}"
        )
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# reading: a finished cache's shards, each chunk checked on its first read


class ShardFiles:
    """The shards of a finished cache, read-only and thread-safe. Opening checks the manifest and
    each shard's size and header (cheap); `take` checks each chunk's crc32 the first time it reads
    a row of it, so no damaged row is ever returned. defaults: the build's flags and their
    defaults, for the repair command errors name."""

    def __init__(self, path, defaults):
        self.path = path
        self.manifest = m = open_manifest(path)
        self.repair = repair_command(path, m, defaults)
        if not m.get("complete"):
            raise ValueError(
                f"{path} is unfinished ({len(m['shards'])} shards): rerun the command that built "
                f"it to resume: {self.repair}"
            )
        self.starts = np.cumsum([0] + [s["rows"] for s in m["shards"]])  # each shard's first row
        assert self.starts[-1] == m["n_tokens"], f"{self.starts[-1]} rows != {m['n_tokens']}"
        for i in range(len(m["shards"])):
            self._refuse(check_shard(path, m, i))
        self._checked = [np.zeros(len(s["crc32"]), bool) for s in m["shards"]]  # chunks found good
        self._check_locks = [threading.Lock() for _ in m["shards"]]
        self._maps = OrderedDict()
        self._lock = threading.Lock()

    def _refuse(self, problem):
        if problem:
            raise ValueError(
                f"{self.path}: {problem}: repair it by rerunning its build, "
                f"`{self.repair}` (add --overwrite to rebuild it all)"
            )

    def take(self, rows, keys):
        """Stored arrays of the given rows (sorted global ids), read shard by shard."""
        first = self._shard(0)
        keys = [k for k in keys if first[k] is not None]  # no scales in fp16 / fp32 shards
        out = {k: np.empty((len(rows), *first[k].shape[1:]), first[k].dtype) for k in keys}
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
                        out[k][a + ra : a + rb] = src[k][local[ra] : local[rb - 1] + 1]
            else:
                for k in out:
                    np.take(src[k], local, axis=0, out=out[k][a:b])
        return out

    def _check_chunks(self, i, src, local):
        """Check the crc32 of each chunk of shard i that rows `local` fall in and no read has
        checked yet. One thread checks a shard at a time: the others wait, not check it twice."""
        chunks = np.unique(local // self.manifest["check_rows"])
        if self._checked[i][chunks].all():
            return
        with self._check_locks[i]:
            for j in chunks[~self._checked[i][chunks]]:
                self._refuse(chunk_problem(self.manifest, i, src, j))
                self._checked[i][j] = True

    def _shard(self, i):
        """The memmapped sections of shard i, shared by threads. At most MAX_OPEN_SHARDS stay
        mapped (each holds a file descriptor); views in use keep theirs."""
        with self._lock:
            if i in self._maps:
                self._maps.move_to_end(i)
            else:
                self._maps[i] = map_shard(self.path, self.manifest, i)
                if len(self._maps) > MAX_OPEN_SHARDS:
                    self._maps.popitem(last=False)
            return self._maps[i]


# -----------------------------------------------------------------------------
# building: the output directory, resume checks, the writer


def identity(cfg, model_sha, model_dir):
    """What determines the cache's bytes: a rerun resumes only if all of these agree."""
    tok = hashlib.sha256()
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(model_dir, name), "rb") as f:
            tok.update(f.read())
    local = cfg.corpus != "toy" and not cfg.corpus.startswith("hf:")
    corpus = os.path.realpath(cfg.corpus) if local else cfg.corpus
    keys = ("text_field", "tokens", "ctx", "dtype", "keep_bos", "heldout", "shard_tokens")
    keys += ("batch_size", "seed")
    made = dict(model_sha256=model_sha, tokenizer_sha256=tok.hexdigest(), corpus=corpus)
    return dict(made, **{k: getattr(cfg, k) for k in keys})


def open_out_dir(out, overwrite, identity, header):
    """Create the cache directory `out`, or resume in it: returns the manifest to continue from.
    A manifest of another identity (or other first-batch channel scales) is refused, unless
    `overwrite`, which deletes the cache files (only those: never a user's)."""
    path = os.path.join(out, MANIFEST)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the cache directory {out}: {e}") from e
    if os.path.exists(path) and not overwrite:
        old = open_manifest(out)
        was = old["identity"]
        diff = {k: (was.get(k), v) for k, v in identity.items() if was.get(k) != v}
        if diff:
            raise ValueError(
                f"{out} holds a cache made with other arguments ({{field: (cache, now)}}: {diff}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        if old["channel_scale"] != header["channel_scale"]:
            raise ValueError(
                f"{out}: the first batch now gives other int8 channel scales than when the cache "
                "was started: the corpus or the device changed; resume where it began, or pass "
                "--overwrite"
            )
        return old
    ours = [n for n in os.listdir(out) if n.startswith(("shard_", MANIFEST))]  # never a user's
    if not os.path.exists(path) and len(ours) < len(os.listdir(out)):
        raise ValueError(f"{out} exists, is not empty and has no {MANIFEST}: choose another --out")
    for name in ours:  # --overwrite, or shards whose manifest was deleted
        os.remove(os.path.join(out, name))
    m = dict(format=FORMAT, version=VERSION, complete=False, identity=identity, **header, shards=[])
    try:
        write_json(path, m)
    except OSError as e:
        raise ValueError(f"cannot write to {out}: {e}") from e
    return m


def damaged_shards(out, m):
    """The listed shards that fail a check (size, header, crc32 of each chunk), to be rewritten.
    This reads every listed shard once, at crc32 speed: far less than the forward passes."""
    damaged = []
    n = len(m["shards"])
    for i in tqdm(range(n), desc="check", unit="shard", disable=None if n > 1 else True):
        problem = check_shard(out, m, i, "crc32")
        if problem:
            print(f"repairing {problem}")
            damaged.append(i)
    return damaged


def uncounted_shards(m):
    """The listed shards missing from the running totals: none, unless the manifest was cut or
    edited by hand (its totals then cover other shards than it lists). The totals then restart
    from zero and all listed shards are counted again."""
    sums = m.get("sums")
    if sums is not None and sums["shards"] == len(m["shards"]):
        return set()
    m["sums"] = dict(shards=0, **{k: np.zeros((2, m["n_layers"])).tolist() for k in STATS})
    return set(range(len(m["shards"])))


def check_disk(out, need):
    free = shutil.disk_usage(out).free
    if need > free:
        raise ValueError(
            f"the cache needs {need / 1e9:.2f} GB more but {out} has {free / 1e9:.2f} GB free"
        )


def check_tokens(out, m, k, row0, meta, corpus):
    """Refuse to resume from a changed corpus: meta (n, 3), what the corpus now gives for rows
    row0.., must equal what the listed shard k stores for the rows both cover."""
    s = m["shards"][k]
    first = k * m["shard_tokens"]
    a = max(first, row0)
    b = min(first + s["rows"], row0 + len(meta))
    if a >= b:
        return
    stored = map_shard(out, m, k)["meta"][a - first : b - first]
    if not np.array_equal(stored, meta[a - row0 : b - row0]):
        raise ValueError(
            f"{out}: the corpus {corpus} now gives other tokens than those stored in {s['file']}: "
            "it changed since the cache was started; pass --overwrite to rebuild"
        )


class ShardWriter:
    """Writes full shard buffers on background threads (write_shard), so the forward pass overlaps
    the disk; the calling thread then lists each shard in the manifest, in order, so a listed shard
    is always whole on disk, and adds its statistics to the manifest's totals (new shards, and
    `uncounted` ones: each once). The manifest is rewritten once the shards since its last write
    hold MANIFEST_RATIO times its bytes: a small share of the writes at any length (a rewrite per
    shard would be quadratic: 27k shards at 100M tokens of GPT-2 small).

    A buffer has .index, .rows, .sums ({STATS: (2, L) float64 tensors}) and .sections() (the
    filled rows of each section); `recycled` hands written buffers back for reuse."""

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

    def recycled(self):
        """A written buffer, or None when none is free yet."""
        return None if self.free.empty() else self.free.get()

    def put(self, buf):
        self.pending.append(self.pool.submit(self._write, buf))
        while self.pending and (self.pending[0].done() or len(self.pending) > self.threads):
            self._commit(*self.pending.pop(0).result())  # waits when all threads are busy

    def close(self):
        try:
            while self.pending:
                self._commit(*self.pending.pop(0).result())
        finally:
            self.pool.shutdown(cancel_futures=True)
            if self.unsaved_bytes:  # also after an error: the shards committed so far stay listed
                self._save()

    def _write(self, buf):
        entry = write_shard(self.out, self.manifest, buf.index, buf.sections())
        sums = {k: v.numpy().copy() for k, v in buf.sums.items()}  # (2, L) each; buf is reused
        index = buf.index
        self.free.put(buf)
        return index, entry, sums

    def _commit(self, index, entry, sums):
        listed = self.manifest["shards"]
        new = index >= len(listed)
        if new:
            assert index == len(listed), f"shard {index} committed after {len(listed)} listed ones"
            listed.append(entry)
        elif entry["sha256"] != listed[index]["sha256"]:  # a repair must give the same bytes
            raise ValueError(
                f"{entry['file']} was rebuilt with other bytes than when the cache was made: the "
                "corpus, the device or torch changed; rebuild the cache with --overwrite"
            )
        listed[index] = entry
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

"""
cache.py: the activation cache. Run the model (GPT-2, Llama, Qwen3) over a corpus once, store every
layer's MLP input and output per token in memory-mapped shards, serve them to training shuffled.

Data flow.  corpus -> documents -> tokens, packed into contexts [<|endoftext|>, t1 .. t_{ctx-1}]
-> GPT.run_with_acts(logits=False) -> mlp_in, mlp_out (B, T, L, d) -> drop position 0 (the BOS,
whose activations are outliers) -> rows (N, L, d) -> int8 (x / channel scale, then one absmax scale
per token, layer and in/out; int4: one per 32 channels, two values a byte) or fp16 / fp32
-> fixed-size shard files + manifest.json
==>  ActivationCache(path).batches(...) -> Rows: the stored rows of each shuffled batch and their
row ids, read and crc-checked on background threads; ActivationCache.dequantize(rows, device) ->
(mlp_in, mlp_out) float32 (B, L, d) on the consumer's device. read / iter_chunks give rows in order.
No disk (train.py --corpus): ActivationStream runs the model as training goes, the same Rows from
a shuffle buffer it refills.

    python cache.py --help
    python cache.py --model models/tiny --corpus toy --tokens 1000000 --out runs/cache  # ~1 GB
    python cache.py --tokens 20000 --out runs/cache_cpu   # the tiny model, its toy corpus: seconds
    python cache.py --model gpt2 --corpus hf:HuggingFaceFW/fineweb:sample-10BT --tokens 10000000
    python cache.py verify runs/cache     # sizes, headers and sha256 of every shard
    python cache.py stats runs/cache      # tokens, bytes/token, per-layer norms, quantization error
    torchrun: build once with one process; every training rank opens the same cache and reads
    its own share: ActivationCache(path).batches(batch_size, seed, rank, world)

Rerunning a command resumes after a crash (even kill -9) and rewrites damaged shards, the same
bytes: a shard is a function of the arguments (the contexts come in a fixed grid of forward
batches). Corpus readers: forge/corpora.py; shard format, manifest and checks: forge/shards.py.

Where we follow and where we differ. CLT-Forge (LLM-Interp/CLT-Forge) also caches and quantizes
activations; it keeps one scale per layer per file and loads whole files into RAM. Here:
- one int8 scale per (token, layer, in/out): NMSE ~ (max|x| / rms x)^2 / (12 * 127^2) per row,
  once a fixed per-channel scale (SmoothQuant-style, from the first batch) evens out outlier
  channels (the tiny model's worst layer: NMSE 2e-4 -> ~4e-5);
- scales are bfloat16 (fp32's range, 2 bytes); q uses the rounded scale: |x - q*s| <= s/2;
- shards are memmapped, with a magic/version header (llm.c's `_peek_data_shard`), a sha256 per
  file and a crc32 per ~1 MB chunk of rows, checked on its first read: no damaged row is trained on;
- the reader shuffles globally, reads each batch's rows straight from the memmaps and stripes each
  global batch over ranks: what a step reads does not depend on the world size (`batches`). It
  yields stored rows, dequantized where they are used (4x less to move to a GPU for int8).
"""

import itertools
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from forge import checkpoint, corpora, files, shards
from forge.cli import arg, parse_config, run_main
from forge.hub import DEFAULT_MODEL, load_tokenizer, resolve_model_dir
from model import load_model
from parallel import all_reduce_sum, broadcast

PREFETCH = 8  # batches a reader reads ahead of the consumer, on its worker threads


# -----------------------------------------------------------------------------
# writer: build_cache, then its helpers in the order it calls them


@dataclass
class CacheConfig:
    """build or resume a cache, or repair a damaged one (the default when no subcommand is given)"""

    model: str = arg(DEFAULT_MODEL, "model directory (hub layout) or hub id", group="what to run")
    corpus: str = arg("toy", "toy | a .txt, .jsonl, .json, .parquet file or folder | hf:NAME")
    text_field: str = arg("text", "the field (.jsonl, .json) or column (.parquet, hf:) of the text")
    seed: int = arg(0, "seed of the toy corpus")
    tokens: int = arg(200_000, "rows to store (tokens but the BOS); ~15 s, 210 MB on models/tiny")
    ctx: int = arg(64, "context length, BOS included; at most the model's n_ctx")
    keep_bos: bool = arg(False, "keep position 0 (the BOS) instead of dropping it")
    dtype: str = arg("int8", "int8 (per-row absmax) | int4 | fp16 | fp32", group="how to store it")
    out: str = arg("runs/cache", "output directory")
    heldout: float = arg(0.02, "share of rows (whole contexts, at the end) held out for evaluation")
    shard_tokens: int = arg(0, "rows per shard file; 0 = about 64 MB of activations per shard")
    batch_size: int = arg(64, "contexts per forward pass (part of the identity: fixes the floats)")
    device: str = arg("auto", "auto | cpu | cuda | ...; resume on the same device: the same bytes")
    overwrite: bool = arg(False, "delete the cache in --out (any arguments) and build it again")


def build_cache(cfg: CacheConfig):
    """Build, resume or repair the cache cfg describes; returns the finished manifest, with the wall
    and CPU time (all threads) of its corpus -> shards loop as "seconds" and "cpu_seconds" (0 when
    there was nothing to write)."""
    model_dir = resolve_model_dir(cfg.model)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir).to(device)
    shards.check_config(cfg, model.config.n_ctx, model.config.n_embd)
    enc = load_tokenizer(model_dir)
    L, d = model.config.n_layer, model.config.n_embd
    if cfg.shard_tokens == 0:  # about 64 MB of activations per shard
        cfg = replace(cfg, shard_tokens=max(1, (64 << 20) // shards.row_bytes(cfg.dtype, L, d)))
    # Phase 1: the output directory, new or resumed (the same identity), every listed shard checked
    channel = _first_batch_channel_scales(cfg, model, enc) if cfg.dtype[:3] == "int" else None
    made = dict(model_config=asdict(model.config), n_layers=L, d_model=d, device=device)
    made.update(channel_scale=None if channel is None else channel.tolist())
    writer = shards.ShardWriter(cfg, made, model.fingerprint(), model_dir)
    if writer.complete:
        return writer.finish()  # nothing to write
    channel = [None, None] if channel is None else channel
    # Phase 2: for each batch of contexts that holds rows of a shard to write (the damaged ones, the
    # new ones; other batches are only tokenized): model forward -> quantize -> shard buffers
    with torch.inference_mode(), writer:
        for row0, idx, meta, pieces in writer.batches(iter_batches(cfg, enc, cfg.tokens)):
            xs = _forward_rows(model, idx.to(device), 0 if cfg.keep_bos else 1)  # in, out
            for a, b in pieces:  # rows a..b-1: one shard's share of the batch
                stored = [quantize_rows(x[a:b], cfg.dtype, c) for x, c in zip(xs, channel)]
                writer.add(row0 + a, stored, meta[a:b])  # a full shard is written on a thread
            del xs  # before the next forward pass, not after it: one batch at a time
    return writer.finish()  # Phase 3: the totals, and the manifest marked complete


@torch.inference_mode()
def _first_batch_channel_scales(cfg, model, enc):
    """The int8 channel scales (2, L, d), from the first forward batch."""
    _, idx, _ = next(iter_batches(cfg, enc, cfg.tokens))
    _, acts = model.run_with_acts(idx.to(next(model.parameters()).device), logits=False)
    drop = 0 if cfg.keep_bos else 1
    return torch.stack([channel_scales(x[:, drop:]) for x in (acts.mlp_in, acts.mlp_out)])


def iter_contexts(docs, enc, ctx, skip=0):
    """Pack documents into contexts: yield (tokens (ctx,), doc ids (ctx,)) int32. The stream
    doc0 <|eot|> doc1 <|eot|> ... is cut into runs of ctx-1 tokens, each behind the same BOS
    <|eot|>. A separator belongs to the document it ends, the BOS to that of the token after it.
    skip: tokens of the first document used already (where a resumed ActivationStream goes on)."""
    eot = enc.eot_token
    toks, ids = [], []
    for doc_id, doc in enumerate(docs):
        t = (enc.encode_ordinary(doc) + [eot])[0 if doc_id else skip :]
        toks += t
        ids += [doc_id] * len(t)
        while len(toks) >= ctx - 1:
            out_t = np.array([eot] + toks[: ctx - 1], dtype=np.int32)
            out_i = np.array([ids[0]] + ids[: ctx - 1], dtype=np.int32)
            del toks[: ctx - 1], ids[: ctx - 1]
            yield out_t, out_i


def iter_batches(cfg, enc, n_rows):
    """Yield (first row, idx (B, ctx) int64, meta (B*R, 3) int32) on a fixed grid of batch_size
    contexts, until n_rows rows; R = rows kept per context. The grid makes resume byte-exact."""
    drop = 0 if cfg.keep_bos else 1
    R = cfg.ctx - drop  # rows kept per context
    pos = np.arange(drop, cfg.ctx, dtype=np.int32)
    docs = corpora.iter_documents(cfg.corpus, cfg.seed, cfg.text_field)
    contexts = iter_contexts(docs, enc, cfg.ctx)
    row = 0
    while row < n_rows:
        batch = [c for _, c in zip(range(cfg.batch_size), contexts)]
        if not batch and row == 0:
            too_short = f"gave no context of {cfg.ctx - 1} tokens: it is empty or too short"
            raise ValueError(f"corpus {cfg.corpus} {too_short}")
        if not batch:
            return
        tok, doc = np.stack(batch, axis=1)  # tokens, doc ids (B, ctx)
        kept = tok[:, drop:]  # (B, R)
        meta = np.stack([kept, doc[:, drop:], np.broadcast_to(pos, kept.shape)], -1)  # (B, R, 3)
        yield row, torch.from_numpy(tok).long(), meta.reshape(-1, 3)  # (B*R, 3)
        row += len(batch) * R


def _forward_rows(model, idx, drop):
    """idx (B, T) -> the rows to store, mlp_in and mlp_out (B*R, L, d), R = T - drop. Each source
    is let go once copied: three (B, T, L, d)-sized tensors at most live at once, not five."""
    _, acts = model.run_with_acts(idx, logits=False)
    mlp_in, mlp_out = acts.mlp_in, acts.mlp_out
    del acts  # and with it the attention patterns (B, nh, T, T) of every layer
    x_in = mlp_in[:, drop:].flatten(0, 1)  # (B*R, L, d), a copy without the BOS
    del mlp_in
    return x_in, mlp_out[:, drop:].flatten(0, 1)  # (B*R, L, d)


# -----------------------------------------------------------------------------
# quantization: symmetric absmax, one scale per (token, layer)


def quantize_rows(x, dtype, channel=None):
    """x (n, L, d) float32 -> what a shard stores, q (n, L, d) and the int8 scales' bits (n, L)
    int16 (else None), and per row ||x|| and ||x_hat - x||^2 (n, L) float64 for the manifest's
    statistics. channel (L, d): the int8 / int4 channel scales. int4: as int8 but a scale per
    shards.INT4_GROUP channels (bits (n, L, d/g)), q in -7..7, two per byte (n, L, d/2)."""
    if dtype in ("int8", "int4"):  # in place where possible: big temporaries are what this costs
        y = torch.div(x, channel, out=shards.empty(x.shape, device=x.device))  # (n, L, d)
        g = shards.INT4_GROUP if dtype == "int4" else x.size(-1)  # channels per scale
        groups = y.view(*x.shape[:2], -1, g)  # (n, L, d/g, g)
        q, scale, s = quantize_(groups, 127 if dtype == "int8" else 7)
        bits = bf16_bits(scale if dtype == "int4" else scale.squeeze(-1))  # (n, L, d/g) | (n, L)
        err = groups.mul_(s).view_as(x).mul_(channel).sub_(x)  # x_hat - x, as `dequantize` does
        q = q.view_as(x) if dtype == "int8" else shards.pack_int4(q.view_as(x))
    else:
        q = x.half() if dtype == "fp16" else x
        bits = None
        err = q.float() - x  # (n, L, d); 0 for fp32, inf where x is past fp16's range
    norm = torch.linalg.vector_norm(x, dim=-1).double()  # (n, L); inf/NaN if any element is
    err_sq = torch.linalg.vector_norm(err, dim=-1).double().pow(2)  # (n, L)
    if not (norm.isfinite().all() and err_sq.isfinite().all()):
        fix = "the model is broken (fp16: use --dtype int8 or fp32); no shard with them is written"
        raise ValueError(f"non-finite activations (NaN/inf, or past fp16's range): {fix}")
    return q, bits, norm, err_sq


def quantize_(y, levels=127):
    """y (..., g) float32 -> q (..., g) int8, scale (...) bfloat16 with y ~ q * scale, and the
    scale as float32 (..., 1); y is overwritten with q as floats (one big temporary fewer).
    scale = max|y| / levels rounded to bf16 (relative error <= 2^-8), and q = round(y / scale) with
    that rounded scale, clamped to +-levels: |y - q*scale| <= scale/2 for every element.
    """
    absmax = torch.maximum(y.amax(-1), -y.amin(-1))  # (...); 25x vector_norm(ord=inf) on CPU
    scale = (absmax / levels).to(torch.bfloat16)  # (...)
    s = scale.float().clamp_min(1e-30)[..., None]  # an all-zero group has scale 0 and q = 0
    y.div_(s).round_().clamp_(-levels, levels)
    return y.to(torch.int8), scale, s  # (..., g), (...), (..., 1)


def channel_scales(x):
    """x (..., L, d) -> (L, d) float32 c = sqrt(rms over tokens of each channel), floored at 1e-3 of
    the layer's mean: int8 stores x / c. Trained models have outlier channels (max|x| ~ 8 rms on the
    tiny model) that make one scale per row coarse for every other channel; dividing by c first
    evens them out, with SmoothQuant's migration strength 0.5 (Xiao et al. 2023)."""
    rms = x.pow(2).mean(tuple(range(x.dim() - 2))).sqrt()  # (L, d); one temporary of x's size
    return rms.clamp_min(1e-3 * rms.mean(-1, keepdim=True)).clamp_min(1e-30).sqrt().float()


def bf16_bits(scale):
    """(..) bfloat16 tensor -> its bits as an int16 numpy array (numpy has no bfloat16)."""
    return scale.cpu().view(torch.int16).numpy()


def dequantize(q, scale_bits=None, channel=None):
    """Stored rows -> float32 torch on q's device. q (n, L, d) int8, fp16, fp32 or packed int4; int8
    / int4 also scale bits (n, L) / (n, L, d/g) and channel scales (L, d): x = q * scale * channel.
    Convert, then scale in place: vectorized passes beat torch's mixed int8*float kernel 3x."""
    q = torch.as_tensor(q)
    q = shards.unpack_int4(q) if q.dtype == torch.uint8 else q  # (n, L, d)
    x = q if q.dtype == torch.float32 else shards.empty(q.shape, device=q.device).copy_(q)
    if scale_bits is None:
        return x
    s = torch.as_tensor(scale_bits).to(x.device).view(torch.bfloat16)  # (n, L) | (n, L, d/g)
    x.view(*s.shape, -1).mul_(s.float()[..., None])  # per row (int8) or per group (int4)
    return x.mul_(channel.to(x.device))  # (n, L, d)


# -----------------------------------------------------------------------------
# reader


@dataclass
class Rows:
    """What `batches` yields: stored rows as they lie in the shards, and their global row ids."""

    mlp_in: torch.Tensor  # (n, L, d) int8 | float16 | float32, as stored
    mlp_out: torch.Tensor  # (n, L, d)
    scales: torch.Tensor | None  # (n, 2, L) int16 bits of bfloat16 scales; int4: (n, 2, L, d/g)
    ids: torch.Tensor  # (n,) int64 global row ids, ascending


class ActivationCache:
    """A finished cache, opened read-only (checked as shards.ShardFiles says). model=: refuse a
    cache made by another model. unit_rows, window_mb, shuffle (False: the rows in order): the
    shuffle (see `batches`), part of a run's data order like the seed. workers: reader threads."""

    def __init__(self, path, model=None, unit_rows=1024, window_mb=512, workers=2, shuffle=True):
        self.files = shards.ShardFiles(path, asdict(CacheConfig()), model)  # checked; model= too
        self.manifest = m = self.files.manifest
        self.path = path
        self.dtype = m["dtype"]
        self.n_layers = m["n_layers"]
        self.d_model = m["d_model"]
        self.n_tokens = m["n_tokens"]
        self.unit_rows = unit_rows
        self.window_mb = window_mb
        self.workers = workers
        self.shuffle = shuffle
        self.norm_in = torch.tensor(m["norm_in"])  # (L,)
        self.norm_out = torch.tensor(m["norm_out"])  # (L,)
        self.channel_scale = torch.tensor(m["channel_scale"]) if m["channel_scale"] else None

    def norms(self, mesh=None):  # the mean ||x|| per layer over the cache's rows, in and out
        return self.norm_in, self.norm_out

    def row_bytes(self):
        """Stored bytes of one row's activations and scales (what a reader moves per token)."""
        return shards.row_bytes(self.dtype, self.n_layers, self.d_model)

    def split_range(self, split):
        """(lo, hi) rows of "train", "heldout" (the last contexts) or "all"."""
        if split == "all":
            return 0, self.n_tokens
        if split not in self.manifest["splits"]:
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        return tuple(self.manifest["splits"][split])

    def dequantize(self, rows: Rows, device=None):
        """Stored rows -> (mlp_in, mlp_out) float32 (n, L, d) on `device` (None: where they are).
        The stored rows move first and are dequantized there: 4x less to copy for int8."""
        xs = (rows.mlp_in.to(device), rows.mlp_out.to(device))  # (n, L, d) each
        if rows.scales is None:
            return tuple(dequantize(x) for x in xs)
        s = rows.scales.to(device)  # (n, 2, L)
        return tuple(dequantize(x, s[:, j], self.channel_scale[j]) for j, x in enumerate(xs))

    def read(self, lo, hi, device=None):
        """Rows lo..hi in order: (mlp_in (n, L, d), mlp_out (n, L, d)) float32, (tokens, doc_ids,
        positions) (n,) int64."""
        ids = np.arange(lo, hi)
        stored = self.files.take(ids, shards.SECTIONS)
        meta = stored.pop("meta").long()  # (n, 3)
        rows = Rows(**stored, ids=torch.from_numpy(ids))
        return *self.dequantize(rows, device), meta[:, 0], meta[:, 1], meta[:, 2]

    def iter_chunks(self, chunk_size, split="all", device=None):
        """A split in order, read a chunk ahead: (mlp_in, mlp_out, tokens, doc_ids, positions)."""
        lo, hi = self.split_range(split)
        spans = [(a, min(a + chunk_size, hi)) for a in range(lo, hi, chunk_size)]
        return shards.ordered_map(lambda span: self.read(*span, device), spans, 1, 2)

    def batches_per_epoch(self, batch_size, world=1, split="train"):
        lo, hi = self.split_range(split)
        return (hi - lo) // (batch_size * world)

    def batches(
        self, batch_size, seed=0, rank=0, world=1, split="train", start_step=0, epochs=None
    ):
        """Yield this rank's batches of a shuffled stream: Rows of batch_size stored rows, to be
        dequantized where they are used. The stream of epoch e: the split's rows cut into units of
        `unit_rows` consecutive rows, the units in a random order (seed, e), grouped into windows of
        ~window_mb stored MB (the pages in use at once), the rows of each window in a random order
        (seed, e, window). Global step g is stream[g*B*W : (g+1)*B*W]; rank r gets the rows of its
        slice [r*B : (r+1)*B], sorted (a batch is a set): disjoint, equal shares whose union does
        not depend on the world size. An epoch has `batches_per_epoch` steps (the last < B*W rows
        are dropped). start_step=k starts at global step k without reading what it skips;
        epochs=None streams forever."""
        B, W = batch_size, world
        if not 0 <= rank < W or B <= 0:  # else no batch ever comes: next() would spin forever
            got = f"rank={rank}, world={W}, B={B}"
            raise ValueError(f"need 0 <= rank < world and batch_size > 0, got {got}")
        lo, hi = self.split_range(split)
        nb = self.batches_per_epoch(B, W, split)
        if nb == 0:
            few = f"{hi - lo} rows, fewer than one global batch of {B}x{W}"
            raise ValueError(f"split {split!r} has {few}")
        window_units = max(1, int(self.window_mb * 2**20) // (self.row_bytes() * self.unit_rows))
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
            rows = np.sort(ids)  # a batch is a set: sorted, its rows come off the memmaps in order
            stored = self.files.take(rows, ("mlp_in", "mlp_out", "scales"))
            return Rows(**stored, ids=torch.from_numpy(rows))

        return shards.ordered_map(assemble, _cut(selections(), B), self.workers, PREFETCH)

    def _windows(self, lo, hi, seed, epoch, window_units):
        """Yield (stream position, rows, rows()) per window of the epoch; rows() builds the window's
        permuted global row ids only when asked (a skipped window costs nothing)."""
        U = self.unit_rows
        starts = np.arange(lo, hi, U)
        order = shuffled(len(starts), self.shuffle, [seed, epoch])
        pos = 0
        for w, g in enumerate(range(0, len(order), window_units)):
            units = starts[order[g : g + window_units]]
            size = int(np.minimum(units + U, hi).sum() - units.sum())

            def rows(units=units, w=w):
                r = np.concatenate([np.arange(u, min(u + U, hi)) for u in units])
                return r[shuffled(len(r), self.shuffle, [seed, epoch, w])]

            yield pos, size, rows
            pos += size


def shuffled(n, shuffle, seed):
    """A random order of range(n) drawn from seed (a list of ints); range(n) without shuffle."""
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


def _cut(id_arrays, B):
    """Cut a stream of row-id arrays into batches of exactly B ids, carrying leftovers over."""
    carry = np.empty(0, dtype=np.int64)
    for ids in id_arrays:
        ids = np.concatenate([carry, ids])
        n = len(ids) // B * B
        yield from ids[:n].reshape(-1, B)
        carry = ids[n:]


# -----------------------------------------------------------------------------
# no cache: activations streamed from the model through a shuffle buffer


class ActivationStream:
    """ActivationCache's interface to training over rows the model computes as training goes. The
    corpus's first contexts are held out (`heldout`); DP rank r of dp packs documents h + r,
    h + r + dp, ... (h: the first after them) as build_cache does. A fill runs the model over its
    next contexts, cfg.batch_size a pass, into a buffer of buffer_tokens rows that batches drain in
    a random order (seed, rank, fill). A rank's position: the corpus cursor (document, token) where
    its fill began; a resumed fill is computed again in the same shapes, the same floats on a CPU
    (on a GPU: with deterministic kernels). TP rank 0 of a group computes a fill, broadcasts it."""

    def __init__(self, cfg: CacheConfig, buffer_tokens, n_heldout, meta, device, shuffle=True):
        model_dir = resolve_model_dir(cfg.model)
        self.model = load_model(model_dir).to(device)
        mc = self.model.config
        shards.check_config(cfg, mc.n_ctx, mc.n_embd)  # cache.py's refusals, word for word
        self.enc = load_tokenizer(model_dir)
        self.cfg = cfg
        self.N = buffer_tokens  # rows per fill, per DP rank
        self.position = meta and meta["stream"]  # meta: a checkpoint's (checkpoint.stream_position)
        self.device = device
        self.shuffle = shuffle
        self.n_layers = self.model.config.n_layer
        self.d_model = self.model.config.n_embd
        self.H = self.position["heldout"] if self.position else n_heldout  # fixed at the start
        self.manifest = checkpoint.stream_manifest(cfg, self.model, model_dir, self.N, self.H)
        self.heldout, self.first_doc = checkpoint.held_out(iter_contexts, self.enc, cfg, self.H)

    def dequantize(self, rows, device=None):  # the rows are float32, on the device already
        return rows.mlp_in, rows.mlp_out

    def norms(self, mesh):
        """(norm_in, norm_out) (L,): the first fill's mean ||x|| over the DP ranks (or the
        checkpoint's), per layer. The stream runs on `mesh` from here on."""
        self.mesh = mesh
        shape = (self.N, self.n_layers, self.d_model)
        self.buf = [torch.empty(shape, device=self.device) for _ in range(2)]  # the fill's in, out
        f, doc, token = checkpoint.stream_start(self.position, self.first_doc, mesh)
        self.starts = {f: (doc, token)}  # this rank's cursor where each fill begins
        self.reader = corpora.contexts_from(iter_contexts, self.enc, self.cfg, doc, token, mesh.dp)
        self.norm = torch.tensor(self.position["norm"]) if self.position else None  # (2, L)
        if self.norm is None:
            self.fill(0)
            norms = [torch.linalg.vector_norm(x, dim=-1).double().sum(0) for x in self.buf]
            sums = all_reduce_sum(torch.stack(norms), mesh.dp_group)  # (2, L) over DP ranks
            self.norm = (sums / (self.N * mesh.dp)).float().cpu()
        return tuple(self.norm)

    def batches(self, batch_size, seed=0, rank=0, world=1, start_step=0):
        """Yield this DP rank's batches (Rows) from global step start_step on: fill f holds the
        steps f·P .. f·P + P − 1 (P = buffer_tokens / batch_size), batch_size rows each, sorted."""
        self.P = P = self.N // batch_size  # whole batches (checkpoint.check_flags)
        f0, j0 = divmod(start_step, P)
        for f in itertools.count(f0):
            if f > f0 or self.position is not None:  # a new run's fill 0: made by norms
                self.fill(f)
            order = shuffled(self.N, self.shuffle, [seed, rank, f])
            for j in range(j0 if f == f0 else 0, P):
                ids = torch.from_numpy(np.sort(order[j * batch_size : (j + 1) * batch_size]))
                rows = [x.index_select(0, ids.to(self.device)) for x in self.buf]  # (B, L, d)
                yield Rows(*rows, None, ids + f * self.N)

    @torch.no_grad()
    def fill(self, f):
        """Fill f: TP rank 0 runs the model over its next contexts, broadcasts the rows (TP)."""
        row = 0
        while self.mesh.tp_rank == 0 and row < self.N:  # ctx - 1 rows a context: no BOS's
            n = min(self.cfg.batch_size, -(-(self.N - row) // (self.cfg.ctx - 1)))  # contexts
            batch = list(itertools.islice(self.reader, n))  # (tokens (ctx,), the cursor after)
            idx = torch.from_numpy(np.stack([t for t, _ in batch])).long().to(self.device)
            xs = _forward_rows(self.model, idx, 1)  # mlp_in, mlp_out (n·(ctx − 1), L, d)
            k = min(len(xs[0]), self.N - row)
            for buf, x in zip(self.buf, xs):
                buf[row : row + k] = x[:k]
            row += k
            self.starts[f + 1] = batch[-1][1]  # the cursor after them: where fill f + 1 begins
        for x in self.buf:
            broadcast(x, self.mesh.tp_group)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    commands = dict(build=CacheConfig, verify=shards.VerifyConfig, stats=shards.StatsConfig)
    command, cfg = parse_config(__doc__, commands, argv, default="build")
    if command != "build":
        return shards.report(command, cfg.paths, asdict(CacheConfig()))  # 1: a cache is damaged
    print(asdict(cfg))
    with files.one_writer(cfg.out, "cache.py"):  # one run at a time in a folder (forge/files.py)
        m = build_cache(cfg)
    nmse = m["nmse_total"]
    made = f"{m['n_tokens']} tokens in {len(m['shards'])} shards | {m['seconds']:.1f} s"
    print(f"{cfg.out}: {made} | NMSE in {nmse[0]:.3g} out {nmse[1]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # verify's status: 1 when a cache is damaged

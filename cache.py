"""
cache.py: the activation cache. Run GPT-2 over a corpus once, store every layer's MLP input and
output for each token in memory-mapped shards, and serve them to CLT training shuffled, per rank.

Data flow.  corpus -> documents -> tokens, packed into contexts [<|endoftext|>, t1 .. t_{ctx-1}]
-> GPT.run_with_acts(logits=False) -> mlp_in, mlp_out (B, T, L, d) -> drop position 0 (the BOS,
whose activations are outliers) -> rows (N, L, d) -> int8 (x / channel scale, then one absmax scale
per token, layer and in/out) or fp16 / fp32 -> fixed-size shard files + manifest.json
==>  ActivationCache(path).batches(...) -> Rows: the stored rows of each shuffled batch and their
row ids, read and crc-checked on background threads; ActivationCache.dequantize(rows, device) ->
(mlp_in, mlp_out) float32 (B, L, d) on the consumer's device. read / iter_chunks give rows in order.

    python cache.py --help
    python cache.py --model models/tiny --corpus toy --tokens 1000000 --out runs/cache  # ~1 GB
    python cache.py --tokens 20000 --out runs/cache_cpu   # the tiny model, its toy corpus: seconds
    python cache.py --model gpt2 --corpus hf:HuggingFaceFW/fineweb:sample-10BT --tokens 10000000
    python cache.py verify runs/cache     # sizes, headers and sha256 of every shard
    python cache.py stats runs/cache      # tokens, bytes/token, per-layer norms, quantization error
    torchrun: build once with one process; every training rank opens the same cache and reads
    its own share: ActivationCache(path).batches(batch_size, seed, rank, world)

Corpus readers (.txt, .jsonl, .json, .parquet, folders, hf:NAME, "toy"): forge/corpora.py; the
shard format, the manifest and every check on them: forge/shards.py. Rerunning a command resumes
after a crash (even kill -9) from the last shard the manifest lists, and repairs: it checks every
listed shard (size, header, crc32s) and rewrites the damaged ones, byte-identical: each shard is a
function of the arguments, as the contexts come in a fixed grid of forward batches (the same batch
shapes give the same floats). --overwrite starts again from nothing.

Where we follow and where we differ. CLT-Forge (LLM-Interp/CLT-Forge) also caches and quantizes
activations; it keeps one scale per layer per file and loads whole files into RAM. Here:
- one int8 scale per (token, layer, in/out): NMSE ~ (max|x| / rms x)^2 / (12 * 127^2) per row;
  outlier channels are first evened out by a fixed per-channel scale (SmoothQuant-style, computed
  on the first batch and kept in the manifest): on the tiny model the worst layer's NMSE goes from
  2e-4 to ~4e-5;
- scales are bfloat16 (the fp32 range, 2 bytes): q is computed with the rounded scale, so the
  error bound |x - q*s| <= s/2 holds exactly as with fp32 scales;
- shards are numpy.memmap'd, with a magic/version header (llm.c's `_peek_data_shard`), a sha256
  per file and a crc32 per ~1 MB chunk of rows, which the reader checks on its first read of the
  chunk: training never sees a damaged row, for one crc32 pass (~2 GB/s per thread);
- the reader shuffles globally, reads each batch's rows straight from the memmaps, and stripes
  each global batch over ranks: what a step reads does not depend on the world size (`batches`).
  It yields stored rows, dequantized where they are used (4x less to move to a GPU for int8).
"""

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from forge import corpora, shards
from forge.cli import arg, parse_config, run_main
from forge.files import check_same_model, write_json
from forge.hub import DEFAULT_MODEL, load_tokenizer, resolve_model_dir
from forge.shards import MANIFEST, verify
from model import GPT

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
    dtype: str = arg("int8", "int8 (per-row absmax) | fp16 | fp32", group="how to store it")
    out: str = arg("runs/cache", "output directory")
    heldout: float = arg(0.02, "share of rows (whole contexts, at the end) held out for evaluation")
    shard_tokens: int = arg(0, "rows per shard file; 0 = about 64 MB of activations per shard")
    batch_size: int = arg(64, "contexts per forward pass (part of the identity: fixes the floats)")
    device: str = arg("auto", "auto | cpu | cuda | ...; resume on the same device: the same bytes")
    overwrite: bool = arg(False, "delete the cache in --out (any arguments) and build it again")


def build_cache(cfg: CacheConfig):
    """Build, resume or repair the cache cfg describes; returns the finished manifest.

    The returned dict also carries "seconds" and "cpu_seconds" (all threads): the wall and CPU time
    of the corpus -> shards loop alone (0 when there was nothing to write).
    """
    model_dir = resolve_model_dir(cfg.model)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT.from_pretrained(model_dir).to(device)
    _check_config(cfg, model)
    enc = load_tokenizer(model_dir)
    L = model.config.n_layer
    d = model.config.n_embd
    row_bytes = shards.row_bytes(cfg.dtype, L, d)
    if cfg.shard_tokens == 0:  # about 64 MB of activations per shard
        cfg = replace(cfg, shard_tokens=max(1, (64 << 20) // row_bytes))
    # Phase 1: the output directory, new or resumed (same identity), every listed shard checked
    identity = shards.identity(cfg, model.fingerprint(), model_dir)
    name = os.path.realpath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # readers load it
    header = dict(model=name, model_config=asdict(model.config), n_layers=L, d_model=d)
    header.update({k: getattr(cfg, k) for k in ("dtype", "ctx", "keep_bos", "shard_tokens")})
    header.update(device=device, check_rows=max(1, shards.CHECK_BYTES // row_bytes))
    header.update(channel_scale=_first_batch_channel_scales(cfg, model, enc))
    manifest = shards.open_out_dir(cfg.out, cfg.overwrite, identity, header)
    damaged = shards.damaged_shards(cfg.out, manifest)
    uncounted = shards.uncounted_shards(manifest)
    if manifest["complete"] and not damaged:
        print(f"{cfg.out} is already complete: every shard's size, header and crc32 checked")
        return dict(manifest, seconds=0.0, cpu_seconds=0.0)
    resume = len(manifest["shards"]) if not manifest["complete"] else sys.maxsize  # new shards
    n_new = max(0, -(-cfg.tokens // cfg.shard_tokens) - resume)
    shards.check_disk(cfg.out, n_new * shards.shard_layout(cfg.dtype, cfg.shard_tokens, L, d)[1])
    # Phase 2: forward the batches that hold rows of the shards to write; quantize; write
    t0 = time.perf_counter()
    c0 = time.process_time()
    _write_rows(cfg, model, enc, manifest, damaged, uncounted, resume)
    # Phase 3: the totals, and the manifest marked complete
    _finalize(manifest, cfg)
    write_json(os.path.join(cfg.out, MANIFEST), manifest)
    if manifest["n_tokens"] < cfg.tokens:
        print(f"note: corpus {cfg.corpus} ran out after {manifest['n_tokens']} tokens")
    return dict(manifest, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)


def _check_config(cfg, model):
    if cfg.dtype not in shards.DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}: choose one of {list(shards.DTYPES)}")
    if not 2 <= cfg.ctx <= model.config.n_ctx:
        raise ValueError(f"ctx={cfg.ctx} must be in 2..n_ctx={model.config.n_ctx} of {cfg.model}")
    if cfg.tokens <= 0 or cfg.shard_tokens < 0 or cfg.batch_size <= 0:
        got = f"{cfg.tokens}, {cfg.shard_tokens}, {cfg.batch_size}"
        raise ValueError(f"tokens, shard_tokens, batch_size must be positive, got {got}")
    if not 0 <= cfg.heldout < 1:
        raise ValueError(f"heldout must be in [0, 1), got {cfg.heldout}")


@torch.inference_mode()
def _first_batch_channel_scales(cfg, model, enc):
    """int8 only: channel scales (2, L, d) as nested lists, from the first forward batch."""
    if cfg.dtype != "int8":
        return None
    _, idx, _ = next(iter_batches(cfg, enc, cfg.tokens))
    _, acts = model.run_with_acts(idx.to(next(model.parameters()).device), logits=False)
    drop = 0 if cfg.keep_bos else 1
    scales = [channel_scales(acts.mlp_in[:, drop:]), channel_scales(acts.mlp_out[:, drop:])]
    return torch.stack(scales).cpu().tolist()  # (2, L, d)


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
        tok = np.stack([t for t, _ in batch])  # (B, ctx)
        doc = np.stack([i for _, i in batch])  # (B, ctx)
        kept = tok[:, drop:]  # (B, R)
        meta = np.stack([kept, doc[:, drop:], np.broadcast_to(pos, kept.shape)], -1)  # (B, R, 3)
        yield row, torch.from_numpy(tok).long(), meta.reshape(-1, 3)  # (B*R, 3)
        row += len(batch) * R


@torch.inference_mode()
def _write_rows(cfg, model, enc, manifest, damaged, uncounted, resume):
    """The main loop: forward the batches that hold rows of the shards to write (the damaged and
    uncounted ones, and those from `resume` on; other batches are only tokenized), drop the BOS,
    quantize the rows into shard buffers and hand each full one to the writer."""
    S = cfg.shard_tokens
    rewrite = set(damaged) | uncounted
    last = max(rewrite, default=-1) if resume == sys.maxsize else sys.maxsize  # last shard to write
    check = resume - 1 if 0 < resume < sys.maxsize and resume - 1 not in damaged else None
    dev = next(model.parameters()).device
    n_new = max(0, -(-cfg.tokens // S) - resume)
    todo = min((len(rewrite) + n_new) * S, cfg.tokens)
    pbar = tqdm(total=todo, unit="tok", desc="cache", disable=None)
    writer = shards.ShardWriter(cfg.out, manifest, uncounted)
    buf = None
    try:
        for row0, idx, meta in iter_batches(cfg, enc, cfg.tokens):
            hi = min(row0 + len(meta), cfg.tokens)
            if row0 // S > last:
                break
            if check is not None:  # resuming: the corpus must still give the tokens stored
                shards.check_tokens(cfg.out, manifest, check, row0, meta, cfg.corpus)
            ks = [k for k in range(row0 // S, (hi - 1) // S + 1) if k in rewrite or k >= resume]
            if not ks:
                continue  # only tokenized, never run
            x_in, x_out = _forward_rows(model, idx.to(dev), 0 if cfg.keep_bos else 1)
            for k in ks:  # the batch's rows, split at shard boundaries
                a = max(k * S, row0) - row0
                b = min((k + 1) * S, hi) - row0
                if buf is None:
                    buf = writer.recycled() or _ShardBuffer(cfg, manifest)
                    buf.reset(k)
                buf.add(x_in[a:b], x_out[a:b], meta[a:b])
                pbar.update(b - a)
                if buf.rows == S:
                    writer.put(buf)
                    buf = None
            del x_in, x_out  # before the next forward pass, not after it: one batch at a time
        if buf is not None:
            writer.put(buf)
    finally:
        pbar.close()
        writer.close()


def _forward_rows(model, idx, drop):
    """idx (B, T) -> the rows to store, mlp_in and mlp_out (B*R, L, d), R = T - drop. Each source
    is let go once copied: three (B, T, L, d)-sized tensors at most live at once, not five."""
    _, acts = model.run_with_acts(idx, logits=False)
    mlp_in = acts.mlp_in
    mlp_out = acts.mlp_out
    del acts  # and with it the attention patterns (B, nh, T, T) of every layer
    L, d = mlp_in.shape[2:]
    x_in = mlp_in[:, drop:].reshape(-1, L, d)  # (B*R, L, d), a copy without the BOS
    del mlp_in
    x_out = mlp_out[:, drop:].reshape(-1, L, d)  # (B*R, L, d)
    return x_in, x_out


class _ShardBuffer:
    """One shard's rows being filled in RAM, plus float64 sums for the manifest's statistics.
    Buffers are recycled (fresh 64 MB costs page faults): reset(index) starts shard `index`."""

    def __init__(self, cfg, m):
        S = cfg.shard_tokens
        L = m["n_layers"]
        d = m["d_model"]
        dt = shards.DTYPES[cfg.dtype][1]
        self.dtype = cfg.dtype
        self.channel = torch.tensor(m["channel_scale"]) if m["channel_scale"] else None  # (2, L, d)
        self.mlp_in = np.empty((S, L, d), dt)  # (S, L, d)
        self.mlp_out = np.empty((S, L, d), dt)  # (S, L, d)
        self.scales = np.empty((S, 2, L), np.int16) if cfg.dtype == "int8" else None  # (S, 2, L)
        self.meta = np.empty((S, 3), np.int32)  # (S, 3)

    def reset(self, index):
        self.index = index
        self.rows = 0
        L = self.mlp_in.shape[1]
        self.sums = {k: torch.zeros(2, L, dtype=torch.float64) for k in shards.STATS}  # (2, L)

    def sections(self):
        """The filled rows of each section, as `shards.sections` reads them back."""
        views = dict(mlp_in=self.mlp_in, mlp_out=self.mlp_out, scales=self.scales, meta=self.meta)
        return {k: None if v is None else v[: self.rows] for k, v in views.items()}

    def add(self, x_in, x_out, meta):
        """Append rows (n, L, d) float32 of mlp_in and mlp_out: quantize, sum the statistics."""
        a, b = self.rows, self.rows + len(meta)
        for j, (x, dst) in enumerate(((x_in, self.mlp_in), (x_out, self.mlp_out))):
            norm = torch.linalg.vector_norm(x, dim=-1).double()  # (n, L); inf/NaN if any element is
            if not torch.isfinite(norm).all():
                where = f"in rows {a}.. of shard {self.index}"
                fix = "the model is broken; no shard holding them is written"
                raise ValueError(f"non-finite activations (NaN/inf) {where}: {fix}")
            if self.dtype == "int8":  # in place where possible: big temporaries are what this costs
                c = self.channel[j].to(x.device)  # (L, d)
                y = torch.div(x, c, out=empty(x.shape, device=x.device))  # (n, L, d)
                q, scale, s = quantize_(y)
                self.scales[a:b, j] = bf16_bits(scale)
                err = y.mul_(s).mul_(c).sub_(x)  # x_hat - x, computed as `dequantize` does
            elif self.dtype == "fp16":
                absmax = torch.maximum(x.amax(), -x.amin()).item()
                if absmax > torch.finfo(torch.float16).max:
                    too_big = f"activations overflow fp16 (max |x| = {absmax:.3g})"
                    raise ValueError(f"{too_big}: use --dtype int8 or fp32")
                q = x.half()
                err = q.float().sub_(x)  # (n, L, d)
            else:
                q, err = x, None  # fp32 is exact
            dst[a:b] = q.cpu().numpy()
            self.sums["norm"][j] += norm.sum(0).cpu()
            self.sums["sq"][j] += norm.pow(2).sum(0).cpu()
            if err is not None:
                err_sq = torch.linalg.vector_norm(err, dim=-1).double().pow(2)  # (n, L)
                self.sums["err"][j] += err_sq.sum(0).cpu()
        self.meta[a:b] = meta
        self.rows = b


def _finalize(manifest, cfg):
    """Totals for the manifest: token count, splits, per-layer mean norms and quantization NMSE."""
    n_rows = sum(s["rows"] for s in manifest["shards"])
    R = cfg.ctx if cfg.keep_bos else cfg.ctx - 1  # rows per context: held out whole
    train = n_rows
    if cfg.heldout > 0:
        train = min(max(int(round(n_rows * (1 - cfg.heldout) / R)) * R, R), n_rows - 1)
    tot = {k: np.array(manifest["sums"][k]) for k in shards.STATS}  # (2, L)
    norm = tot["norm"] / n_rows  # (2, L)
    nmse = tot["err"] / np.maximum(tot["sq"], 1e-300)  # (2, L)
    manifest.update(complete=True, n_tokens=n_rows)
    manifest.update(splits=dict(train=[0, train], heldout=[train, n_rows]))
    manifest.update(norm_in=norm[0].tolist(), norm_out=norm[1].tolist())
    manifest.update(nmse_in=nmse[0].tolist(), nmse_out=nmse[1].tolist())
    manifest.update(nmse_total=[float(tot["err"][j].sum() / tot["sq"][j].sum()) for j in (0, 1)])


# -----------------------------------------------------------------------------
# quantization: symmetric absmax, one scale per (token, layer)


def quantize_(y):
    """y (n, L, d) float32 -> q (n, L, d) int8, scale (n, L) bfloat16 with y ~ q * scale, and the
    scale as float32 (n, L, 1); y is overwritten with q as floats (one big temporary fewer).
    scale = max|y| / 127 rounded to bf16 (relative error <= 2^-8), and q = round(y / scale) with
    that rounded scale, clamped to +-127: |y - q*scale| <= scale/2 for every element.
    """
    absmax = torch.maximum(y.amax(-1), -y.amin(-1))  # (n, L); 25x vector_norm(ord=inf) on CPU
    scale = (absmax / 127).to(torch.bfloat16)  # (n, L)
    s = scale.float().clamp_min(1e-30)[..., None]  # an all-zero row has scale 0 and q = 0
    y.div_(s).round_().clamp_(-127, 127)
    return y.to(torch.int8), scale, s  # (n, L, d), (n, L), (n, L, 1)


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


def empty(shape, dtype=torch.float32, device="cpu"):
    """torch.empty, on the CPU through numpy: numpy asks Linux for transparent huge pages (madvise),
    so first touching a fresh batch costs a page fault per 2 MB, not per 4 kB: 4x faster here."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


def dequantize(q, scale_bits=None, channel=None):
    """Stored rows -> float32 torch on q's device. q (n, L, d) int8, fp16 or fp32 (numpy or torch);
    for int8 also scale bits (n, L) int16 and channel scales (L, d): x = q * scale * channel.
    Convert, then scale in place: vectorized passes beat torch's mixed int8*float kernel 3x."""
    q = torch.as_tensor(q)
    x = q if q.dtype == torch.float32 else empty(q.shape, device=q.device).copy_(q)
    if scale_bits is None:
        return x
    s = torch.as_tensor(scale_bits).to(x.device).view(torch.bfloat16)  # (n, L)
    return x.mul_(s.float()[..., None]).mul_(channel.to(x.device))  # (n, L, d)


# -----------------------------------------------------------------------------
# reader


@dataclass
class Rows:
    """What `batches` yields: stored rows as they lie in the shards, and their global row ids."""

    mlp_in: torch.Tensor  # (n, L, d) int8 | float16 | float32, as stored
    mlp_out: torch.Tensor  # (n, L, d)
    scales: torch.Tensor | None  # (n, 2, L) int16 bits of the bfloat16 row scales (int8 only)
    ids: torch.Tensor  # (n,) int64 global row ids, ascending


class ActivationCache:
    """A finished cache, opened read-only (checked as shards.ShardFiles says). model=: refuse a
    cache made by another model. unit_rows, window_mb: the granularity of the shuffle (see
    `batches`), part of a run's data order like the seed. workers: threads that read batches."""

    def __init__(self, path, model=None, unit_rows=1024, window_mb=512, workers=2):
        self.files = shards.ShardFiles(path, asdict(CacheConfig()))  # the repair command's defaults
        self.manifest = m = self.files.manifest
        if model is not None:
            made = f"the cache {path} (made by model {m['model']})"
            check_same_model(model, m["identity"]["model_sha256"], made)
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
        self.channel_scale = torch.tensor(m["channel_scale"]) if m["channel_scale"] else None

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
        raw = {k: torch.from_numpy(v) for k, v in self.files.take(ids, shards.SECTIONS).items()}
        meta = raw.pop("meta").long()
        rows = Rows(raw["mlp_in"], raw["mlp_out"], raw.get("scales"), torch.from_numpy(ids))
        return *self.dequantize(rows, device), meta[:, 0], meta[:, 1], meta[:, 2]

    def iter_chunks(self, chunk_size, split="all", device=None):
        """A split in order, read a chunk ahead: (mlp_in, mlp_out, tokens, doc_ids, positions)."""
        lo, hi = self.split_range(split)
        starts = range(lo, hi, chunk_size)
        return _ordered_map(lambda a: self.read(a, min(a + chunk_size, hi), device), starts, 1, 2)

    def batches_per_epoch(self, batch_size, world=1, split="train"):
        lo, hi = self.split_range(split)
        return (hi - lo) // (batch_size * world)

    def batches(
        self, batch_size, seed=0, rank=0, world=1, split="train", start_step=0, epochs=None
    ):
        """Yield this rank's batches of a shuffled stream: Rows of batch_size stored rows
        (dequantize them with `dequantize(rows, device)` where they are used).

        The stream of epoch e: the split's rows cut into units of `unit_rows` consecutive rows, the
        units in a random order (seed, e), consecutive units grouped into windows of ~window_mb
        stored MB, the rows of each window in a random order (seed, e, window). Global step g is
        stream[g*B*W : (g+1)*B*W]; rank r gets the rows of its slice [r*B : (r+1)*B] (in row order:
        a batch is a set): disjoint, equal shares, whose union does not depend on the world size W.
        An epoch has `batches_per_epoch` steps (the last < B*W rows are dropped), so no rank ever
        waits on another. The pages in use at any time are a window's units (~window_mb): the page
        cache serves most reads. start_step=k starts at global step k (counting across epochs)
        without reading what it skips; epochs=None streams forever, else stops after `epochs`
        epochs in all. A rank reads only its rows, on `workers` threads, PREFETCH batches ahead.
        """
        B = batch_size
        W = world
        if not 0 <= rank < W or B <= 0:
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
            raw = self.files.take(rows, ("mlp_in", "mlp_out", "scales"))
            raw = {k: torch.from_numpy(v) for k, v in raw.items()}
            return Rows(raw["mlp_in"], raw["mlp_out"], raw.get("scales"), torch.from_numpy(rows))

        return _ordered_map(assemble, _cut(selections(), B), self.workers, PREFETCH)

    def _windows(self, lo, hi, seed, epoch, window_units):
        """Yield (stream position, rows, rows()) per window of the epoch; rows() builds the window's
        permuted global row ids only when asked (a skipped window costs nothing)."""
        U = self.unit_rows
        starts = np.arange(lo, hi, U)
        order = np.random.default_rng([seed, epoch]).permutation(len(starts))
        pos = 0
        for w, g in enumerate(range(0, len(order), window_units)):
            units = starts[order[g : g + window_units]]
            size = int(np.minimum(units + U, hi).sum() - units.sum())

            def rows(units=units, w=w):
                r = np.concatenate([np.arange(u, min(u + U, hi)) for u in units])
                return r[np.random.default_rng([seed, epoch, w]).permutation(len(r))]

            yield pos, size, rows
            pos += size


def _cut(id_arrays, B):
    """Cut a stream of row-id arrays into batches of exactly B ids, carrying leftovers over."""
    carry = np.empty(0, dtype=np.int64)
    for ids in id_arrays:
        ids = np.concatenate([carry, ids])
        n = len(ids) // B * B
        yield from ids[:n].reshape(-1, B)
        carry = ids[n:]


def _ordered_map(fn, items, workers, ahead):
    """Yield fn(item) in order, computed by `workers` threads at most `ahead` items ahead; an
    error on a thread is raised here. Stopping early (break, close) stops the threads."""
    with ThreadPoolExecutor(workers) as ex:
        futures = []
        for item in items:
            futures.append(ex.submit(fn, item))
            if len(futures) > ahead:
                yield futures.pop(0).result()
        for f in futures:
            yield f.result()


# -----------------------------------------------------------------------------
# command line


@dataclass
class VerifyConfig:
    """check sizes, headers and sha256 of every shard"""

    paths: list = arg([], "cache directories")


class StatsConfig(VerifyConfig):
    """tokens, bytes/token, per-layer norms, quantization error"""


def main(argv=None):
    commands = {"build": CacheConfig, "verify": VerifyConfig, "stats": StatsConfig}
    command, cfg = parse_config(__doc__, commands, argv, default="build")
    if command == "build":
        print(asdict(cfg))
        m = build_cache(cfg)
        nmse = m["nmse_total"]
        made = f"{m['n_tokens']} tokens in {len(m['shards'])} shards | {m['seconds']:.1f} s"
        print(f"{cfg.out}: {made} | NMSE in {nmse[0]:.3g} out {nmse[1]:.3g}")
        return 0
    if not cfg.paths:
        example = f"python cache.py {command} runs/cache"
        raise ValueError(f"`cache.py {command}` needs a cache directory, e.g. `{example}`")
    failed = 0
    for path in cfg.paths:
        if command == "stats":
            print(shards.summary(path, ActivationCache(path).manifest))
            continue
        bad = verify(path)
        print("\n".join(["BAD " + b for b in bad] or [f"{path}: all shards OK"]))
        if bad:
            repair = shards.repair_command(path, shards.open_manifest(path), asdict(CacheConfig()))
            print(f"repair (rewrites only what is damaged or missing): {repair}")
        failed += bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # verify's status: 1 when a cache is damaged

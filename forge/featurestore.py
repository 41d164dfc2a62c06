"""
forge/featurestore.py: what interp.py's passes stream and keep, in bounded memory.

padded_chunks encodes each chunk of a cache once and yields it between `before` rows of the past
and the rows ahead (Padded); merge_top keeps per feature the k firings of largest key with their
context windows (top-k examples, and with random keys a uniform sample); ngram_keys gives every
n-gram one int64 key (decode_gram reads it back) and SparseCounter counts (feature, n-gram) keys.
Nothing here imports the spine: interp.py passes in the CLT and the cache.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm


@dataclass
class Padded:
    acts: torch.Tensor  # (E, M) activations of all M = L·F features (m = layer·F + f) on E rows
    tok: torch.Tensor  # (E,) token ids
    doc: torch.Tensor  # (E,) document ids
    pos: torch.Tensor  # (E,) positions in their context (they restart at each context)
    lo: int  # this chunk's own rows are [lo, hi); the others are context
    hi: int


def padded(past, own, ahead):
    """[acts, tok, doc, pos] of the rows before a chunk, its own and those after -> Padded."""
    lo = len(past[0])
    return Padded(*[torch.cat(x) for x in zip(past, own, ahead)], lo, lo + len(own[0]))


def padded_chunks(clt, cache, split, cfg):
    """Encode each chunk once; yield it between the `before` rows before it and the rows after."""
    ahead = max(cfg.after, cfg.fuzz_window)  # the future rows that examples and fuzzing need
    lo, hi = cache.split_range(split)
    chunks = cache.iter_chunks(cfg.chunk_size, split=split, device=cfg.device)
    tail = None
    prev = None
    for chunk in tqdm(chunks, total=-(-(hi - lo) // cfg.chunk_size), desc=f"{split} pass"):
        mlp_in, _, tok, doc, pos = chunk  # cache.ActivationCache.iter_chunks: rows in order
        with torch.no_grad():
            acts = clt.encode(mlp_in.to(cfg.device, torch.float32)).flatten(1)  # (N, L·F)
        cur = [acts] + [x.to(cfg.device).long() for x in (tok, doc, pos)]
        if prev is None:
            tail = [x[:0] for x in cur]
        else:
            yield padded(tail, prev, [x[:ahead] for x in cur])
            tail = [x[max(0, len(x) - cfg.before) :] for x in map(torch.cat, zip(tail, prev))]
        prev = cur
    if prev is not None:
        yield padded(tail, prev, [x[:0] for x in prev])


def ngram_keys(p: Padded, n_max, base):
    """(E, n_max) key of the n-gram ending at each row (-1 where it would cross a document start).

    The key of tokens (t_{-n+1}, ..., t_0) is  sum_j (t_{-j} + 1) base^j  with base = V + 1, so
    grams of every length share one integer space and a gram's suffixes are its low digits."""
    E = p.tok.numel()
    keys = torch.full((E, n_max), -1, dtype=torch.long, device=p.tok.device)
    keys[:, 0] = p.tok + 1
    for j in range(1, n_max):
        ok = torch.zeros(E, dtype=torch.bool, device=p.tok.device)
        ok[j:] = (p.doc[j:] == p.doc[:-j]) & (p.pos[j:] == p.pos[:-j] + j) & (keys[j:, j - 1] >= 0)
        keys[j:, j] = keys[j:, j - 1] + (p.tok[:-j] + 1) * base**j
        keys[:, j] = torch.where(ok, keys[:, j], -1)
    return keys


def decode_gram(key, base, enc):
    """Inverse of ngram_keys: an n-gram key -> its text."""
    toks = []
    while key > 0:
        toks.append(key % base - 1)
        key //= base
    return enc.decode(toks[::-1])


def n_digits(keys, base):
    """n-gram keys (numpy) -> n, their number of base-`base` digits."""
    n = np.zeros_like(keys)
    p = 1
    while (keys >= p).any():
        n = n + (keys >= p)
        p = p * base
    return n


class SparseCounter:
    """Exact counts of int64 keys; chunk counts are merged lazily: O(n log n) merging overall.

    Beyond max_pairs stored keys, the rarest are dropped (lossy counting, Manku & Motwani 2002): a
    dropped key restarts from zero, so its counts are lower bounds from then on (summary.json)."""

    def __init__(self, max_pairs):
        self.keys = None  # (K,) sorted keys, their counts: after the first merge
        self.counts = None
        self.pending = []  # (keys, counts) of chunks not merged yet
        self.max_pairs = max_pairs
        self.pruned_below = 0

    def add(self, keys):
        self.pending.append(keys.unique(return_counts=True))
        n_pending = sum(len(k) for k, _ in self.pending)
        if n_pending > max(1 << 20, 0 if self.keys is None else self.keys.numel()):
            self.merge()

    def merge(self):
        parts = self.pending + ([] if self.keys is None else [(self.keys, self.counts)])
        keys, inv = torch.cat([k for k, _ in parts]).unique(return_inverse=True)  # sorted
        self.counts = torch.zeros_like(keys).index_add_(0, inv, torch.cat([c for _, c in parts]))
        self.keys = keys
        self.pending = []
        while self.keys.numel() > self.max_pairs:
            self.pruned_below += 1
            keep = self.counts > self.pruned_below
            self.keys = self.keys[keep]
            self.counts = self.counts[keep]
        return self.keys, self.counts


def empty_top(M, k, W, device):
    """An empty store for merge_top: k slots per feature, key 0 = empty, windows of W tokens."""
    store = {n: torch.zeros(M, k, device=device) for n in ("key", "act")}
    store.update({n: torch.zeros(M, k, dtype=torch.int32, device=device) for n in ("doc", "pos")})
    store.update(win_tok=torch.full((M, k, W), -1, dtype=torch.int32, device=device))
    store.update(win_act=torch.zeros(M, k, W, device=device))
    return store


def merge_top(store, m, r, key, p, cfg):
    """Keep, per feature, the k firings of largest `key` seen so far, with their context windows.

    store: dict of (M, k, ...) tensors (key, act, doc, pos, win_tok, win_act) over all M = L·F
    features, sorted by key, key 0 = empty. m, r, key: (nnz,) the chunk's firings: feature, row -
    lo, key > 0. Only firings above their feature's k-th best are kept as candidates: after the
    first chunks they are few, so this costs little more than reading the firings."""
    k = store["key"].size(1)
    ok = key > store["key"][m, -1]
    order = key[ok].argsort(descending=True)
    m, r, key = (x[ok][order] for x in (m, r, key))
    if m.numel() == 0:
        return
    order = m.argsort(stable=True)  # grouped by feature, best first within a feature
    m, r, key = (x[order] for x in (m, r, key))
    need, counts = m.unique_consecutive(return_counts=True)  # (F',) the features with candidates
    slot = torch.repeat_interleave(torch.arange(len(need), device=m.device), counts)  # into need
    rank = torch.arange(len(m), device=m.device) - (counts.cumsum(0) - counts)[slot]
    keep = rank < k
    cand_key = torch.zeros(len(need), k, device=m.device)  # (F', k) 0 = no candidate
    center = torch.full((len(need), k), p.lo, device=m.device)  # rows of the padded chunk
    cand_key[slot[keep], rank[keep]] = key[keep]
    center[slot[keep], rank[keep]] = r[keep] + p.lo
    rows = center[..., None] + torch.arange(-cfg.before, cfg.after + 1, device=m.device)
    rows_c = rows.clamp(0, p.tok.numel() - 1)  # (F', k, W)
    inside = (rows == rows_c) & (p.doc[rows_c] == p.doc[center][..., None])  # same document
    new = dict(key=cand_key, act=torch.where(cand_key > 0, p.acts[center, need[:, None]], 0.0))
    new.update(doc=p.doc[center], pos=p.pos[center], win_tok=torch.where(inside, p.tok[rows_c], -1))
    new.update(win_act=torch.where(inside, p.acts[rows_c, need[:, None, None]], 0.0))
    both = {n: torch.cat([store[n][need], new[n].to(store[n].dtype)], dim=1) for n in store}
    top = both["key"].topk(k, dim=1).indices  # (F', k)
    for n, t in both.items():
        store[n][need] = torch.take_along_dim(t, top.view(*top.shape, *[1] * (t.dim() - 2)), dim=1)

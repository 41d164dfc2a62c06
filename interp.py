"""
interp.py: LLM-free automated interpretability for a cross-layer transcoder (CLT).

Every feature of every layer gets statistics, examples, an explanation built from those statistics
alone, and scores for that explanation, from one streaming pass over each split of an activation cache:

    train split:    mlp_in --clt.encode--> acts (N, L, F) --> density, histogram, top-k and
                    quantile-sampled examples with context windows, counts of the n-grams where it fires
    weights:        decoder --ln_f (mean scale)--> W_U --> promoted / suppressed tokens (direct logit effect)
    explanation:    the n-grams whose presence best predicts firing (greedy F1 on the train counts)
                    + the top promoted tokens, e.g.  fires on " Tarn", " capital" | promotes " Velorian"
    held-out split: detection and fuzzing scores of each explanation; on the toy world, the
                    ground-truth concept each feature matches best (precision, recall, F1)
    --> out/features.jsonl (one object per feature), out/summary.json, out/summary.png

    python interp.py --help
    python interp.py                                  # models/tiny + runs/clt + runs/cache -> runs/interp
    python interp.py --model models/tiny --clt runs/clt --cache runs/cache --out runs/interp
    python interp.py --device cuda --chunk-size 4096  # one process on a GPU (one pass: no torchrun)
    python interp.py --chunk-size 256 --top-k 8       # a tiny CPU run

References: the detection and fuzzing scores of EleutherAI's delphi (Paulo et al. 2024, "Automatically
Interpreting Millions of Features in Large Language Models"); max-activating and quantile examples and
activation histograms as on Neuronpedia; direct logit effects as in Bricken et al. 2023. Where we differ:
 - explainer and scorer are one predictor, not a language model: "fires on g1, g2" means "one of the
   n-grams g1, g2 ends at this token"; scores are exact counts over every held-out token;
 - detection is per token: each held-out token (with its prefix as context) is a trial, positive when the
   feature fires there; AUROC ranks tokens by the train precision of the n-gram they match;
 - fuzzing keeps only tokens within ±fuzz_window of a firing in the same document (the activating
   contexts) and asks whether the explanation marks exactly the firing ones (balanced accuracy).
Memory is O(L·F·k) for examples and histograms plus the sparse (feature, n-gram) counts (pruned beyond
max_pairs); activations live for two chunks at most, never O(tokens × features).

features.jsonl keys, one line per feature in (layer, feature) order:
    layer, feature              the feature's layer and index
    density, n_fires            firing frequency (acts > 0) and count on the train split
    mean_act, max_act           mean activation when active; the largest activation
    quantiles                   {"q10": a, "q25", "q50", "q75", "q90", "q99"} when active (from the histogram)
    hist                        {"edges": [...], "counts": [...]}: log2-spaced bins of the activation when active
    top_examples                [{"act", "doc", "pos", "tokens": [str], "acts": [float], "center": i}]
                                 max-activating; tokens[center] is the firing token
    quantile_examples           the same plus "quantile": a uniform sample of firings at evenly spaced ranks
    input_ngrams                [{"ngram": str, "count", "corpus_count", "pmi"}] most over-represented where it fires
    promoted, suppressed        [{"token": str, "logit": float}] direct logit effect through ln_f and W_U
    explanation, explanation_ngrams   the explanation string; its n-grams
    detection_auroc, detection_bacc, fuzzing_bacc, heldout_density   held-out scores (null when undefined)
    concept, concept_precision, concept_recall, concept_f1   best toy-world concept (with a world.json only)
"""
import argparse
import inspect
import json
import os
import re
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

from clt import GPT, CrossLayerTranscoder, load_tokenizer

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)

# -----------------------------------------------------------------------------
# config


@dataclass
class InterpConfig:
    model: str = ""  # the GPT (hub layout) of the CLT and the cache; "" = the model in the cache manifest
    clt: str = "runs/clt"  # CLT directory (CrossLayerTranscoder.save_pretrained)
    cache: str = "runs/cache"  # activation cache directory (cache.py)
    out: str = "runs/interp"  # where features.jsonl, summary.json and summary.png go
    device: str = "cpu"  # cpu | cuda
    chunk_size: int = 1024  # cache rows per streamed chunk
    top_k: int = 16  # max-activating examples kept per feature
    n_sampled: int = 32  # uniform reservoir of firings per feature, the pool for quantile examples
    n_quantile_examples: int = 8  # quantile examples reported, at evenly spaced ranks of the reservoir
    before: int = 8  # context tokens shown before the firing token
    after: int = 2  # context tokens shown after it (needs a one-chunk lookahead)
    max_ngram: int = 2  # longest input n-gram counted (1 = single tokens)
    min_count: int = 3  # firings an n-gram needs to be reported or to explain
    n_input: int = 10  # over-represented n-grams reported per feature
    max_terms: int = 4  # n-grams at most in an explanation
    n_logit: int = 8  # promoted and suppressed tokens reported per feature
    n_explain_logit: int = 2  # promoted tokens named in the explanation
    bins_per_octave: int = 4  # histogram resolution: bins of width 2^(1/bins_per_octave)
    log2_range: int = 12  # histogram spans [2^-r, 2^r]; activations outside land in the end bins
    fuzz_window: int = 4  # fuzzing: tokens within this distance of a firing make its context
    dense: float = 0.1  # a feature firing on more than this share of tokens is dense
    interpretable: float = 0.8  # detection AUROC from which a live, non-dense feature is interpretable
    concept_f1: float = 0.8  # a planted concept counts as recovered when a feature reaches this F1
    min_support: int = 20  # held-out tokens a toy-world concept needs to be scored
    max_pairs: int = 20_000_000  # stored (feature, n-gram) counts beyond which rare pairs are pruned
    seed: int = 0  # reservoir sampling
    time_read: bool = False  # also time one plain read of the cache and report the cost ratio

    def __post_init__(self):
        if self.before < max(self.max_ngram - 1, self.fuzz_window) or self.after < 0:
            raise ValueError(f"before={self.before} must be >= max(max_ngram - 1, fuzz_window) and after >= 0")
        if self.chunk_size < self.before + self.after + self.fuzz_window:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= before + after + fuzz_window")
        if self.max_ngram < 1 or self.top_k < 1 or self.n_sampled < 1:
            raise ValueError(f"max_ngram, top_k and n_sampled must be >= 1, got {self}")


# -----------------------------------------------------------------------------
# streaming: each chunk of the cache, encoded, with `before` rows of the past and `after` of the future


@dataclass
class Padded:
    acts: torch.Tensor  # (E, L, F) feature activations of E consecutive cache rows
    tok: torch.Tensor  # (E,) token ids
    doc: torch.Tensor  # (E,) document ids
    pos: torch.Tensor  # (E,) positions in their context (they restart at each context)
    lo: int  # this chunk's own rows are [lo, hi); the others are context
    hi: int


def padded_chunks(clt, cache, split, cfg):
    """Encode each chunk once; yield it between the `before` rows before it and the rows just after it."""
    cat = lambda *parts: [torch.cat(p) for p in zip(*parts)]
    ahead = max(cfg.after, cfg.fuzz_window)  # the future rows that examples and fuzzing contexts need
    tail = prev = None
    for chunk in cache.iter_chunks(cfg.chunk_size, split=split):
        mlp_in, _, tok, doc, pos = chunk  # cache.ActivationCache.iter_chunks: rows in order
        with torch.no_grad():
            acts = clt.encode(mlp_in.to(cfg.device, torch.float32))  # (N, L, F)
        cur = [acts, tok.to(cfg.device).long(), doc.to(cfg.device).long(), pos.to(cfg.device).long()]
        if prev is None:
            tail = [x[:0] for x in cur]
        else:
            yield Padded(*cat(tail, prev, [x[:ahead] for x in cur]), len(tail[0]), len(tail[0]) + len(prev[0]))
            tail = [x[max(0, len(x) - cfg.before):] for x in cat(tail, prev)]
        prev = cur
    if prev is not None:
        yield Padded(*cat(tail, prev), len(tail[0]), len(tail[0]) + len(prev[0]))


def ngram_keys(p: Padded, n_max, base):
    """(E, n_max) key of the n-gram ending at each row (-1 where it would cross a document start).

    The key of tokens (t_{-n+1}, ..., t_0) is  sum_j (t_{-j} + 1) base^j  with base = V + 1, so
    grams of every length share one integer space and a gram's suffixes are its low digits.
    """
    E = p.tok.numel()
    keys = torch.full((E, n_max), -1, dtype=torch.long, device=p.tok.device)
    keys[:, 0] = p.tok + 1
    for j in range(1, n_max):
        ok = torch.zeros(E, dtype=torch.bool, device=p.tok.device)
        ok[j:] = (p.doc[j:] == p.doc[:-j]) & (p.pos[j:] == p.pos[:-j] + j) & (keys[j:, j - 1] >= 0)
        keys[j:, j] = keys[j:, j - 1] + (p.tok[:-j] + 1) * base ** j
        keys[:, j] = torch.where(ok, keys[:, j], -1)
    return keys


def decode_gram(key, base, enc):
    """Inverse of ngram_keys: an n-gram key -> its text."""
    toks = []
    while key > 0:
        toks.append(key % base - 1)
        key //= base
    return enc.decode(toks[::-1])


# -----------------------------------------------------------------------------
# the train pass: densities, histograms, examples, n-gram counts


class SparseCounter:
    """Exact counts of int64 keys; chunk counts are merged lazily, so merging costs O(n log n) overall.

    Beyond max_pairs stored keys, the rarest are dropped (lossy counting, Manku & Motwani 2002): a
    dropped key later restarts from zero, so counts may be low by at most the pruning threshold.
    """

    def __init__(self, max_pairs):
        self.keys = self.counts = None
        self.pending, self.n_pending, self.max_pairs, self.pruned_below = [], 0, max_pairs, 0

    def add(self, keys):
        k, c = keys.unique(return_counts=True)
        self.pending.append((k, c))
        self.n_pending += k.numel()
        if self.n_pending > max(1 << 20, 0 if self.keys is None else self.keys.numel()):
            self.merge()

    def merge(self):
        parts = self.pending + ([] if self.keys is None else [(self.keys, self.counts)])
        keys, inv = torch.cat([k for k, _ in parts]).unique(return_inverse=True)  # sorted
        self.counts = torch.zeros_like(keys).index_add_(0, inv, torch.cat([c for _, c in parts]))
        self.keys, self.pending, self.n_pending = keys, [], 0
        while self.keys.numel() > self.max_pairs:
            self.pruned_below += 1
            keep = self.counts > self.pruned_below
            self.keys, self.counts = self.keys[keep], self.counts[keep]
        return self.keys, self.counts


def merge_top(store, key, p, a_T, cfg):
    """Keep, per feature, the k entries of largest `key` seen so far, with their context windows.

    store: dict of (F, k, ...) tensors (key, act, doc, pos, win_tok, win_act); key: (F, N) for the
    chunk's own rows, -1 where the feature does not fire; a_T: (F, E) this layer's padded activations.
    """
    F_, k = store["key"].shape
    vals, idx = key.topk(min(k, key.size(1)), dim=1)  # (F, k')
    center = idx + p.lo  # (F, k') rows of the padded chunk
    rows = center[..., None] + torch.arange(-cfg.before, cfg.after + 1, device=key.device)  # (F, k', W)
    rows_c = rows.clamp(0, p.tok.numel() - 1)
    inside = (rows == rows_c) & (p.doc[rows_c] == p.doc[center][..., None])  # same document
    new = dict(key=vals, act=a_T.gather(1, center), doc=p.doc[center], pos=p.pos[center],
               win_tok=torch.where(inside, p.tok[rows_c], -1),
               win_act=a_T.gather(1, rows_c.flatten(1)).view(rows.shape) * inside)
    both = {n: torch.cat([store[n], new[n]], dim=1) for n in store}
    top = both["key"].topk(k, dim=1).indices  # (F, k)
    return {n: torch.take_along_dim(t, top.view(F_, k, *[1] * (t.dim() - 2)), dim=1) for n, t in both.items()}


def empty_top(F_, k, W, device):
    z = lambda *s: torch.zeros(*s, device=device)
    return dict(key=z(F_, k) - 1, act=z(F_, k), doc=z(F_, k).long(), pos=z(F_, k).long(),
                win_tok=z(F_, k, W).long() - 1, win_act=z(F_, k, W))


class FeatureStats:
    """Everything the train pass accumulates, per layer: O(F·(k·W + bins)) plus the n-gram counter."""

    def __init__(self, L, F_, V, cfg):
        dev, W = cfg.device, cfg.before + cfg.after + 1
        self.cfg, self.L, self.F, self.base = cfg, L, F_, V + 1
        self.n_bins = 2 * cfg.log2_range * cfg.bins_per_octave
        self.gram_space = self.base ** cfg.max_ngram  # G: keys are feature * G + gram
        if (L * F_ + 1) * self.gram_space >= 2 ** 63:
            raise ValueError(f"(feature, {cfg.max_ngram}-gram) keys overflow int64 for L·F={L * F_}, V={V}: "
                             "lower --max-ngram")
        self.n_rows = 0
        self.n_fires = torch.zeros(L, F_, dtype=torch.long, device=dev)
        self.sum_act = torch.zeros(L, F_, dtype=torch.float64, device=dev)
        self.hist = torch.zeros(L, F_, self.n_bins, dtype=torch.long, device=dev)
        self.top = [empty_top(F_, cfg.top_k, W, dev) for _ in range(L)]
        self.sampled = [empty_top(F_, cfg.n_sampled, W, dev) for _ in range(L)]
        self.grams = SparseCounter(cfg.max_pairs)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)

    def update(self, p: Padded):
        cfg, lo, hi = self.cfg, p.lo, p.hi
        keys = ngram_keys(p, cfg.max_ngram, self.base)[lo:hi]  # (N, n)
        self.n_rows += hi - lo
        corpus = self.L * self.F  # a pseudo-feature that fires everywhere: the corpus counts
        self.grams.add(corpus * self.gram_space + keys[keys >= 0])
        for l in range(self.L):
            a_T = p.acts[:, l].T.contiguous()  # (F, E)
            a = a_T[:, lo:hi]  # (F, N)
            fire = a > 0
            self.n_fires[l] += fire.sum(1)
            self.sum_act[l] += a.sum(1, dtype=torch.float64)
            f, r = fire.nonzero(as_tuple=True)  # the firing (feature, row) pairs only: sparse
            b = (a[f, r].log2() * cfg.bins_per_octave).floor().long() + self.n_bins // 2
            self.hist[l].view(-1).index_add_(0, f * self.n_bins + b.clamp(0, self.n_bins - 1), torch.ones_like(b))
            self.top[l] = merge_top(self.top[l], a.masked_fill(~fire, -1), p, a_T, cfg)
            prio = torch.rand(a.shape, generator=self.gen, device=a.device).masked_fill(~fire, -1)
            self.sampled[l] = merge_top(self.sampled[l], prio, p, a_T, cfg)  # uniform sample (priority)
            g = keys[r]  # (nnz, n) the n-grams ending where each firing is
            m = (l * self.F + f)[:, None].expand_as(g)
            self.grams.add(m[g >= 0] * self.gram_space + g[g >= 0])


# -----------------------------------------------------------------------------
# output side: direct logit effects


@torch.no_grad()
def mean_ln_f_scale(model, tok, pos, bos, max_contexts=8):
    """Mean over tokens of ln_f's 1/sqrt(var + eps), on the first whole contexts of the cache's rows.

    Cache rows come from contexts [BOS, t1, ...] (the BOS row usually dropped): pos restarts at each.
    """
    starts = [0] + ((pos[1:] <= pos[:-1]).nonzero().flatten() + 1).tolist() + [len(pos)]
    scales = []
    for a, b in list(zip(starts[:-1], starts[1:]))[:max_contexts]:
        k = int(pos[a])  # 1: the BOS was dropped, put it back; 0: it is the first row
        if k <= 1:
            idx = torch.cat([torch.full((k,), bos), tok[a:b].cpu()])[None, :model.config.n_ctx]
            _, acts = model.run_with_acts(idx)
            scales.append(acts.frozen.ln_f[0, 1:, 0])  # not the BOS: its activations are outliers
    if not scales:
        raise ValueError("no context starts in the cache's first chunk: cannot measure ln_f's scale")
    return torch.cat(scales).mean().item()


@torch.no_grad()
def logit_effects(clt, model, ln_scale, layer, n, batch=1024):
    """Direct logit effect of each feature of `layer`: (top values, ids), (bottom values, ids), each (F, n).

    A feature writes W_dec[layer][f, j] into mlp_out[layer + j] (raw units: divided by output_scale), all
    of which join the residual stream. Through ln_f with its scale frozen at the mean, adding v to the
    final residual moves the logits by  ((v - mean(v)) · scale · γ) @ W_U, W_U = wte^T.
    """
    W = clt.W_dec[layer] / clt.output_scale[layer:][None, :, None]  # (F, L-l, d)
    v = W.sum(1).float().cpu()  # (F, d) everything the feature writes, summed over target layers
    v = (v - v.mean(-1, keepdim=True)) * ln_scale * model.ln_f.weight
    tops, bots = [], []
    for i in range(0, v.size(0), batch):
        eff = v[i:i + batch] @ model.wte.weight.T  # (b, V)
        tops.append(eff.topk(n, dim=1))
        bots.append((-eff).topk(n, dim=1))
    cat = lambda parts, s: (torch.cat([p.values for p in parts]) * s, torch.cat([p.indices for p in parts]))
    return cat(tops, 1), cat(bots, -1)


# -----------------------------------------------------------------------------
# explanations: built from the train counts alone


def gram_len(key, base):
    n = 0
    while key > 0:
        key, n = key // base, n + 1
    return n


def union_counts(chosen, grams, c, C, base):
    """Firings and tokens matched by a set of n-grams ending at a token.

    Two n-grams ending at the same token both match it only if one is a suffix of the other, so the
    matched sets are nested or disjoint: sum the counts of the grams no other chosen gram contains.
    """
    lens = {i: gram_len(grams[i], base) for i in chosen}
    keep = [i for i in chosen if not any(lens[j] < lens[i] and grams[i] % base ** lens[j] == grams[j]
                                         for j in chosen)]
    return sum(c[i] for i in keep), sum(C[i] for i in keep)


def choose_ngrams(grams, c, C, n_fires, max_terms, base):
    """Greedily pick up to max_terms n-grams maximizing the train F1 of "fires iff one of them ends here".

    grams, c, C: the candidates' keys, firings on them, corpus occurrences. Returns indices, most precise first.
    """
    pool = list(np.argsort(-2 * c / (C + n_fires), kind="stable")[:8 * max_terms])  # best alone first
    chosen, best = [], 0.0
    for _ in range(max_terms):
        trials = []
        for i in pool:
            tp, pp = union_counts(chosen + [i], grams, c, C, base)
            trials.append((2 * tp / (pp + n_fires), -len(trials), i))
        if not trials or max(trials)[0] <= best:
            break
        best, _, i = max(trials)
        chosen.append(i)
        pool.remove(i)
    return sorted(chosen, key=lambda i: -c[i] / C[i])


def gram_table(stats):
    """The n-grams with at least min_count firings: numpy (feature, gram, count, corpus count) + bounds per feature."""
    keys, counts = stats.grams.merge()
    G, M = stats.gram_space, stats.L * stats.F
    m, g = keys // G, keys % G
    corpus = m == M
    ck, cc = g[corpus], counts[corpus]  # sorted by gram
    sel = ~corpus & (counts >= stats.cfg.min_count)
    m, g, c = m[sel], g[sel], counts[sel]
    C = cc[torch.searchsorted(ck, g)]  # a gram where a feature fires occurs in the corpus
    bounds = torch.searchsorted(m, torch.arange(M + 1, device=m.device))
    return [x.cpu().numpy() for x in (g, c, C, bounds)]


def explain_all(stats, promoted_ids, enc):
    """Per feature: explanation string, chosen grams (keys, train precisions) and the input_ngrams list."""
    cfg, base = stats.cfg, stats.base
    g, c, C, bounds = gram_table(stats)
    n_fires = stats.n_fires.flatten().cpu().numpy()
    quote = lambda s: json.dumps(s, ensure_ascii=False)
    out = []
    for m in range(stats.L * stats.F):
        gm, cm, Cm = (x[bounds[m]:bounds[m + 1]] for x in (g, c, C))
        chosen = choose_ngrams(gm, cm, Cm, n_fires[m], cfg.max_terms, base) if len(gm) else []
        pmi = np.log(cm * stats.n_rows / np.maximum(n_fires[m] * Cm, 1))
        top = np.argsort(-pmi, kind="stable")[:cfg.n_input]
        inputs = [dict(ngram=decode_gram(int(gm[i]), base, enc), count=int(cm[i]), corpus_count=int(Cm[i]),
                       pmi=round(float(pmi[i]), 3)) for i in top]
        names = [decode_gram(int(gm[i]), base, enc) for i in chosen]
        promotes = [enc.decode([int(t)]) for t in promoted_ids[m][:cfg.n_explain_logit]]
        if n_fires[m] == 0:
            text = "dead"
        else:
            text = "fires on " + (", ".join(map(quote, names)) if names else "no frequent n-gram")
            text += " | promotes " + ", ".join(map(quote, promotes))
        out.append(dict(explanation=text, explanation_ngrams=names, input_ngrams=inputs,
                        keys=[int(gm[i]) for i in chosen], precision=[float(cm[i] / Cm[i]) for i in chosen]))
    return out


# -----------------------------------------------------------------------------
# the held-out pass: detection, fuzzing and toy-world concept scores


class Scorer:
    """Counts, per feature, how its explanation's n-grams predict firing on held-out tokens."""

    def __init__(self, explanations, L, F_, base, n_concepts, cfg):
        dev, T = cfg.device, cfg.max_terms
        self.cfg, self.L, self.F, self.T, self.base = cfg, L, F_, T, base
        self.grams = torch.full((L * F_, T), -1, dtype=torch.long)  # sorted by train precision, -1 = none
        for m, e in enumerate(explanations):
            self.grams[m, :len(e["keys"])] = torch.tensor(e["keys"], dtype=torch.long)
        self.grams = self.grams.view(L, F_, T).to(dev)
        self.glen = torch.zeros_like(self.grams)  # n-gram lengths, to pick the row key of that length
        for j in range(cfg.max_ngram):
            self.glen += (self.grams >= base ** j).long()
        self.det = torch.zeros(L, F_, T + 1, 2, dtype=torch.long, device=dev)  # (level, fires) counts
        self.fuzz = torch.zeros(L, F_, 2, 2, dtype=torch.long, device=dev)  # (predicted, fires) near firings
        self.n_fires = torch.zeros(L, F_, dtype=torch.long, device=dev)
        self.tp = torch.zeros(L, F_, n_concepts, device=dev)  # firings on each concept's tokens
        self.n_fires_labeled = torch.zeros(L, F_, device=dev)  # firings on rows the labeler could label
        self.concept_n = torch.zeros(n_concepts, device=dev)  # tokens of each concept
        self.n_rows = 0

    def update(self, p: Padded, labels=None):
        """labels: None, or the toy world's (sparse labels (C, N), labeled mask (N,)) of the chunk's rows."""
        lo, hi, T, F_ = p.lo, p.hi, self.T, self.F
        keys = ngram_keys(p, self.cfg.max_ngram, self.base)[lo:hi]  # (N, n)
        self.n_rows += hi - lo
        f_idx = torch.arange(F_, device=keys.device)
        for l in range(self.L):
            fire_ext = p.acts[:, l] > 0  # (E, F)
            fire = fire_ext[lo:hi]
            level = torch.full(fire.shape, T, dtype=torch.long, device=fire.device)  # T = no n-gram matches
            for t in reversed(range(T)):  # the most precise matching n-gram sets the level
                g = self.grams[l, :, t]  # (F,)
                match = (keys[:, (self.glen[l, :, t] - 1).clamp(min=0)] == g) & (g >= 0)  # (N, F)
                level = torch.where(match, t, level)
            fire_l = fire.long()
            self.det[l].view(-1).index_add_(0, ((f_idx * (T + 1) + level) * 2 + fire_l).flatten(),
                                            torch.ones(level.numel(), dtype=torch.long, device=level.device))
            near = near_firing(fire_ext, p.doc, self.cfg.fuzz_window, lo, hi)  # (N, F)
            pred = (level < T).long()
            idx = ((f_idx * 2 + pred) * 2 + fire_l)[near]
            self.fuzz[l].view(-1).index_add_(0, idx, torch.ones_like(idx))
            self.n_fires[l] += fire.sum(0)
            if labels is not None:  # (C, N) sparse: a few labels per token
                fire_lab = (fire & labels[1][:, None]).float()  # (N, F)
                self.tp[l] += torch.sparse.mm(labels[0], fire_lab).T
                self.n_fires_labeled[l] += fire_lab.sum(0)
        if labels is not None:
            self.concept_n += torch.sparse.sum(labels[0], 1).to_dense()

    def results(self):
        """Per feature (L, F): detection AUROC, detection and fuzzing balanced accuracy (NaN where undefined)."""
        neg, pos = self.det[..., 0].double(), self.det[..., 1].double()  # (L, F, T+1), levels by score desc
        P, N = pos.sum(-1), neg.sum(-1)
        neg_below = neg.flip(-1).cumsum(-1).flip(-1) - neg  # negatives scored strictly lower
        auroc = (pos * (neg_below + 0.5 * neg)).sum(-1) / (P * N)  # Mann-Whitney U, ties count half
        det_bacc = 0.5 * ((P - pos[..., -1]) / P + neg[..., -1] / N)
        fz = self.fuzz.double()
        fuzz_bacc = 0.5 * (fz[..., 1, 1] / fz[..., :, 1].sum(-1) + fz[..., 0, 0] / fz[..., :, 0].sum(-1))
        return auroc, det_bacc, fuzz_bacc

    def concepts(self):
        """Per feature (L, F, C): precision, recall, F1 of "fires" against each concept's token labels."""
        tp, nf = self.tp.double(), self.n_fires_labeled[..., None].double()
        precision, recall = tp / nf.clamp(min=1), tp / self.concept_n.double().clamp(min=1)
        return precision, recall, 2 * tp / (nf + self.concept_n.double()).clamp(min=1)


def near_firing(fire_ext, doc, w, lo, hi):
    """(N, F) bool: rows of [lo, hi) within w rows of a firing in the same document (activating contexts)."""
    E = fire_ext.size(0)
    rows = torch.arange(lo, hi, device=fire_ext.device)
    near = torch.zeros(hi - lo, fire_ext.size(1), dtype=torch.bool, device=fire_ext.device)
    for o in range(-w, w + 1):
        src = (rows + o).clamp(0, E - 1)
        ok = (rows + o == src) & (doc[src] == doc[rows])
        near |= fire_ext[src] & ok[:, None]
    return near


# -----------------------------------------------------------------------------
# output: features.jsonl, summary.json, summary.png


def examples(store, f, enc, before, n=None):
    """Feature f's valid entries of a top / sampled store as JSON-ready dicts, by decreasing activation.

    n: keep n of them at evenly spaced ranks (quantile examples), each with its rank as "quantile".
    """
    acts = store["act"][f].tolist()
    keep = sorted((i for i, key in enumerate(store["key"][f].tolist()) if key >= 0), key=lambda i: -acts[i])
    ranks = range(len(keep))
    if n is not None:
        ranks = sorted({int((j + 0.5) * len(keep) / n) for j in range(n)}) if keep else []
    out = []
    for r in ranks:
        i = keep[r]
        toks, win = store["win_tok"][f, i].tolist(), store["win_act"][f, i].tolist()
        inside = [j for j, t in enumerate(toks) if t >= 0]
        ex = dict(act=round(acts[i], 4), doc=store["doc"][f, i].item(), pos=store["pos"][f, i].item(),
                  tokens=[enc.decode([toks[j]]) for j in inside], acts=[round(win[j], 4) for j in inside],
                  center=inside.index(before))
        if n is not None:
            ex["quantile"] = round(1 - (r + 0.5) / len(keep), 3)
        out.append(ex)
    return out


def hist_summary(counts, cfg):
    """Trimmed log2-spaced histogram of a feature's activations and quantiles read off it (bin centres)."""
    nb, bpo = counts.numel(), cfg.bins_per_octave
    nz = counts.nonzero().flatten()
    if nz.numel() == 0:
        return dict(edges=[], counts=[]), {}
    a, b = nz[0].item(), nz[-1].item() + 1
    edge = lambda i: float(2 ** ((i - nb // 2) / bpo))
    cum = counts.cumsum(0).double()
    qs = {f"q{round(q * 100)}": round(edge(torch.searchsorted(cum, q * cum[-1]).item() + 0.5), 4) for q in QUANTILES}
    return dict(edges=[round(edge(i), 5) for i in range(a, b + 1)], counts=counts[a:b].tolist()), qs


def nan_to_none(x):
    return None if x != x else round(float(x), 4)


def write_features(path, stats, expl, effects, scores, concepts, enc, cfg):
    """One JSON object per feature (keys in the module docstring). Returns the per-feature score arrays."""
    auroc, det_bacc, fuzz_bacc, heldout_density = (x.cpu() for x in scores)
    n_fires, sum_act, hist = stats.n_fires.cpu(), stats.sum_act.cpu(), stats.hist.cpu()
    top = [{k: v.cpu() for k, v in t.items()} for t in stats.top]
    sampled = [{k: v.cpu() for k, v in t.items()} for t in stats.sampled]
    with open(path, "w") as fh:
        for l in tqdm(range(stats.L), desc="features.jsonl"):
            (pv, pi), (sv, si) = effects[l]
            for f in range(stats.F):
                n = n_fires[l, f].item()
                h, qs = hist_summary(hist[l, f], cfg)
                rec = dict(layer=l, feature=f, density=n / stats.n_rows, n_fires=n,
                           mean_act=sum_act[l, f].item() / max(n, 1), max_act=max(top[l]["act"][f, 0].item(), 0.0),
                           quantiles=qs, hist=h, top_examples=examples(top[l], f, enc, cfg.before),
                           quantile_examples=examples(sampled[l], f, enc, cfg.before, cfg.n_quantile_examples),
                           promoted=[dict(token=enc.decode([t]), logit=round(v, 4)) for v, t in zip(pv[f].tolist(), pi[f].tolist())],
                           suppressed=[dict(token=enc.decode([t]), logit=round(v, 4)) for v, t in zip(sv[f].tolist(), si[f].tolist())],
                           detection_auroc=nan_to_none(auroc[l, f]), detection_bacc=nan_to_none(det_bacc[l, f]),
                           fuzzing_bacc=nan_to_none(fuzz_bacc[l, f]), heldout_density=heldout_density[l, f].item())
                e = expl[l * stats.F + f]
                rec.update(explanation=e["explanation"], explanation_ngrams=e["explanation_ngrams"],
                           input_ngrams=e["input_ngrams"])
                if concepts is not None:
                    rec.update(concepts[l][f])
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# the toy world: ground-truth labels of the held-out tokens (tiny.label_tokens)


class ConceptLabels:
    """Per held-out row, the toy world's labels ("entity:Tarn", "concept:city", ...), stored sparsely.

    Rows of one document are decoded back to text and relabeled; a document cut by the split's start,
    whose re-encoding differs from its rows, is left unlabeled (excluded from concept scores).
    """

    def __init__(self, cache, world, enc, cfg):
        import tiny  # only the toy world needs it
        tok, doc = [], []
        for _, _, t, d, _ in cache.iter_chunks(cfg.chunk_size, split="heldout"):
            tok.append(t)
            doc.append(d)
        tok, doc = torch.cat(tok), torch.cat(doc)
        self.names, index, pairs = [], {}, []
        self.labeled = torch.zeros(len(tok), dtype=torch.bool)
        bounds = [0] + ((doc[1:] != doc[:-1]).nonzero().flatten() + 1).tolist() + [len(doc)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            ids = tok[a:b].tolist()
            text = enc.decode(ids)
            if enc.encode(text, allowed_special="all") != ids:
                continue
            self.labeled[a:b] = True
            for r, labels in enumerate(tiny.label_tokens(text, enc, world)):
                for name in labels:
                    pairs.append((a + r, index.setdefault(name, len(index))))
        self.names = list(index)
        self.pairs = torch.tensor(pairs, dtype=torch.long).view(-1, 2)  # (row, concept), sorted by row
        self.row_starts = torch.searchsorted(self.pairs[:, 0], torch.arange(len(tok) + 1))

    def rows(self, lo, hi, device):
        """Rows [lo, hi) of the held-out split: (sparse labels (C, N), labeled mask (N,))."""
        a, b = self.row_starts[lo].item(), self.row_starts[hi].item()
        p = self.pairs[a:b]
        lab = torch.sparse_coo_tensor(torch.stack([p[:, 1], p[:, 0] - lo]), torch.ones(len(p)),
                                      (len(self.names), hi - lo), check_invariants=False)
        return lab.to(device), self.labeled[lo:hi].to(device)


def best_concepts(scorer, labels, cfg):
    """Per feature its best concept by F1, and per concept (with >= min_support tokens) its best feature."""
    precision, recall, f1 = scorer.concepts()  # (L, F, C)
    best = f1.argmax(-1)  # (L, F)
    take = lambda x: x.gather(-1, best[..., None])[..., 0].cpu()
    p, r, f = take(precision), take(recall), take(f1)
    per_feature = [[dict(concept=labels.names[best[l, i]], concept_precision=round(p[l, i].item(), 4),
                         concept_recall=round(r[l, i].item(), 4), concept_f1=round(f[l, i].item(), 4))
                    for i in range(scorer.F)] for l in range(scorer.L)]
    flat = f1.flatten(0, 1)  # (L·F, C)
    per_concept = {}
    for c, name in enumerate(labels.names):
        n = int(scorer.concept_n[c].item())
        if n >= cfg.min_support:
            m = flat[:, c].argmax().item()
            per_concept[name] = dict(support=n, layer=m // scorer.F, feature=m % scorer.F,
                                     f1=round(flat[m, c].item(), 4), precision=round(precision.flatten(0, 1)[m, c].item(), 4),
                                     recall=round(recall.flatten(0, 1)[m, c].item(), 4))
    return per_feature, per_concept


# -----------------------------------------------------------------------------
# summary


def summarize(stats, scores, per_concept, cfg):
    """Counts per layer (dead / dense / interpretable), score distributions, toy-world recovery."""
    auroc, det_bacc, fuzz_bacc = (x.cpu() for x in scores)
    n_fires, density = stats.n_fires.cpu(), stats.n_fires.cpu() / stats.n_rows
    live, dense = n_fires > 0, density > cfg.dense
    good = live & (auroc >= cfg.interpretable)  # NaN compares False
    per_layer = [dict(layer=l, features=stats.F, dead=int((~live[l]).sum()), dense=int(dense[l].sum()),
                      live=int(live[l].sum()), interpretable=int((good[l] & ~dense[l]).sum()))
                 for l in range(stats.L)]
    dist = lambda x: {f"q{round(q * 100)}": round(float(x.quantile(q)), 4) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} \
        if x.numel() else {}
    valid = lambda x: x[live & ~x.isnan()]
    out = dict(n_train_tokens=stats.n_rows, per_layer=per_layer, detection_threshold=cfg.interpretable,
               share_live_detection_above=float(good.sum() / live.sum().clamp(min=1)),
               detection_auroc=dist(valid(auroc)), detection_bacc=dist(valid(det_bacc)),
               fuzzing_bacc=dist(valid(fuzz_bacc)), density=dist(density[live]))
    if per_concept is not None:
        families = {}
        for name, c in per_concept.items():
            fam = families.setdefault(name.split(":")[0], dict(concepts=0, recovered=0))
            fam["concepts"] += 1
            fam["recovered"] += c["f1"] >= cfg.concept_f1
        n_rec = sum(f["recovered"] for f in families.values())
        out["concepts"] = dict(f1_threshold=cfg.concept_f1, min_support=cfg.min_support, n=len(per_concept),
                               recovered=n_rec, share_recovered=n_rec / max(len(per_concept), 1),
                               by_family=families, per_concept=per_concept)
    return out


def plot_summary(path, stats, scores, per_concept):
    """Score distributions as a PNG: density per layer, detection AUROC, fuzzing, concept F1."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    live = stats.n_fires.cpu() > 0
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    for l in range(stats.L):
        d = stats.n_fires[l].cpu()[live[l]].double() / stats.n_rows
        ax[0, 0].hist(d.log10().numpy(), bins=40, histtype="step", label=f"layer {l}")
    ax[0, 0].set(title="firing density (live features)", xlabel="log10 density")
    ax[0, 0].legend(fontsize=7)
    for a, x, name in ((ax[0, 1], scores[0], "detection AUROC"), (ax[1, 0], scores[2], "fuzzing balanced accuracy")):
        x = x.cpu()[live]
        a.hist(x[~x.isnan()].numpy(), bins=40, range=(0, 1))
        a.set(title=f"{name} (live features)", xlabel=name)
    if per_concept:
        ax[1, 1].hist([c["f1"] for c in per_concept.values()], bins=40, range=(0, 1))
        ax[1, 1].set(title="toy world: best feature F1 per concept", xlabel="F1")
    else:
        ax[1, 1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# main


def same_model(a, b):
    norm = lambda x: os.path.realpath(x) if os.path.isdir(x) else x
    return norm(str(a)) == norm(str(b))


def load_inputs(cfg):
    """The GPT, its tokenizer, the CLT and the cache; refuses a CLT or cache made from another model."""
    from cache import ActivationCache
    model_dir = cfg.model or ActivationCache(cfg.cache).manifest["model"]
    model, enc = GPT.from_pretrained(model_dir), load_tokenizer(model_dir)
    cache = ActivationCache(cfg.cache, model=model)  # checks the model's sha256 against the manifest
    clt = CrossLayerTranscoder.from_pretrained(cfg.clt).to(cfg.device)
    c = clt.config
    if (c.n_layers, c.d_model) != (cache.n_layers, cache.d_model):
        raise ValueError(f"CLT {cfg.clt} has n_layers={c.n_layers}, d_model={c.d_model} but cache {cfg.cache} "
                         f"has n_layers={cache.n_layers}, d_model={cache.d_model}: they come from different models")
    if c.model and not same_model(c.model, model_dir):
        raise ValueError(f"CLT {cfg.clt} was trained on model {c.model!r} but cache {cfg.cache} comes from "
                         f"{model_dir!r}: pass a CLT and a cache of the same model")
    return model_dir, model, enc, clt, cache


def analyze(model, enc, clt, cache, cfg, world=None):
    """The train pass, logit effects, explanations and the held-out pass (scored against `world`, a
    tiny.World, if given). Returns (stats, explanations, effects, scorer, labels)."""
    L, F_ = clt.config.n_layers, clt.config.n_features
    stats, first = FeatureStats(L, F_, model.config.vocab_size, cfg), None
    for p in tqdm(padded_chunks(clt, cache, "train", cfg), total=n_chunks(cache, "train", cfg), desc="train pass"):
        stats.update(p)
        first = first or (p.tok[p.lo:p.hi], p.pos[p.lo:p.hi])
    if stats.n_rows == 0:
        raise ValueError("the cache's train split is empty: nothing to interpret")
    ln_scale = mean_ln_f_scale(model, *first, bos=enc.eot_token)
    effects = [logit_effects(clt, model, ln_scale, l, cfg.n_logit) for l in range(L)]
    expl = explain_all(stats, torch.cat([e[0][1] for e in effects]), enc)
    labels = ConceptLabels(cache, world, enc, cfg) if world is not None else None
    scorer, row = Scorer(expl, L, F_, stats.base, len(labels.names) if labels else 0, cfg), 0
    for p in tqdm(padded_chunks(clt, cache, "heldout", cfg), total=n_chunks(cache, "heldout", cfg), desc="held-out pass"):
        scorer.update(p, labels and labels.rows(row, row + p.hi - p.lo, cfg.device))
        row += p.hi - p.lo
    if scorer.n_rows == 0:
        raise ValueError("the cache's held-out split is empty: rebuild it with cache.py --heldout > 0")
    return stats, expl, effects, scorer, labels


def n_chunks(cache, split, cfg):
    lo, hi = cache.split_range(split)
    return -(-(hi - lo) // cfg.chunk_size)


def run(cfg: InterpConfig):
    """Load, analyze, write every output; returns the summary dict (also written to out/summary.json)."""
    torch.manual_seed(cfg.seed)
    model_dir, model, enc, clt, cache = load_inputs(cfg)
    world = None
    if os.path.exists(os.path.join(model_dir, "world.json")):  # the toy world: score against the truth
        import tiny
        world = tiny.load_world(model_dir)
    t0 = time.perf_counter()
    stats, expl, effects, scorer, labels = analyze(model, enc, clt, cache, cfg, world)
    seconds = time.perf_counter() - t0
    scores = scorer.results()
    per_feature, per_concept = best_concepts(scorer, labels, cfg) if labels else (None, None)
    os.makedirs(cfg.out, exist_ok=True)
    write_features(os.path.join(cfg.out, "features.jsonl"), stats, expl, effects,
                   (*scores, scorer.n_fires / scorer.n_rows), per_feature, enc, cfg)
    summary = summarize(stats, scores, per_concept, cfg)
    summary.update(n_heldout_tokens=scorer.n_rows, seconds_passes=round(seconds, 3), config=asdict(cfg))
    if cfg.time_read:  # one plain read of the whole cache, for the cost ratio
        t = time.perf_counter()
        for _ in cache.iter_chunks(cfg.chunk_size, split="all"):
            pass
        summary.update(seconds_plain_read=round(time.perf_counter() - t, 3))
        summary.update(ratio_to_plain_read=round(seconds / summary["seconds_plain_read"], 2))
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_summary(os.path.join(cfg.out, "summary.png"), stats, scores, per_concept)
    return summary


def parse_args(argv=None):
    """Every InterpConfig field is a flag (--chunk-size for chunk_size); the help is the field's comment."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(InterpConfig), re.M))
    for f in fields(InterpConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action="store_true", help=comments[f.name])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"{comments[f.name]} (default {f.default})")
    return InterpConfig(**vars(parser.parse_args(argv)))


def main(argv=None):
    summary = run(parse_args(argv))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "concepts")}, indent=1))
    if "concepts" in summary:
        c = summary["concepts"]
        print(f"concepts recovered (F1 >= {c['f1_threshold']}): {c['recovered']}/{c['n']} | by family: {c['by_family']}")


if __name__ == "__main__":
    main()

"""
interp.py: LLM-free automated interpretability for a cross-layer transcoder (CLT).

Every feature of every layer gets statistics, examples, an explanation built from those statistics
alone, and scores for that explanation, from one streaming pass over each split of an activation cache:

    train split:    mlp_in --clt.encode--> acts (N, L, F) --> density, histogram, top-k and
                    quantile-sampled examples with context windows, counts of the n-grams where it fires
    weights:        decoder --ln_f (mean scale)--> W_U --> promoted / suppressed tokens (direct logit effect)
    explanation:    the n-grams whose presence best predicts firing (greedy F1 on the train counts)
                    + the top promoted tokens, e.g.  fires on " Tarn", " capital" | promotes " Velorian"
    held-out split: detection and fuzzing scores of each explanation
    toy world:      toyworld.eval_corpus -> cache.py (as the training cache) -> OUT/concept_cache, labeled by
                    toyworld.label_tokens; per concept its best feature by F1, for the CLT and two baselines
    --> out/features.jsonl (one object per feature), out/summary.json, out/summary.png

    python interp.py --help
    python interp.py                                  # models/tiny + runs/clt + runs/cache -> runs/interp
    python interp.py --model models/tiny --clt runs/clt --cache runs/cache --out runs/interp
    python interp.py --device cuda                    # one process on a GPU (streaming passes: no torchrun)
    python interp.py --chunk-size 256 --top-k 8 --n-sampled 8   # a tiny CPU run

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
max_pairs); activations live for two chunks at most, never O(tokens × features). Each chunk is cut down
to its firings right after encoding, so the pass costs about twice a read + encode of the cache.
On the toy world (a model directory with forge/toyworld.py's world.json) features are scored against ground truth
on a dedicated evaluation set, not on the held-out split (a few thousand tokens there give most entities
no support): toyworld.eval_corpus generates documents until every concept of every label family has
--concept-support labeled tokens (32: ~107k tokens, ~1000 concepts, each scored from --min-support 20
on), and cache.py stores their activations exactly as it stored the training rows. A concept is
recovered when some feature's "fires" (activation > 0) has F1 >= --concept-f1 against its tokens; the
headline is the share recovered and the mean best F1 per family (toyworld.label_tokens documents them:
input = entity and category, output = the next token the model must say, latent = the country behind
a two-hop question), the --families together, and the same numbers for two baselines scored the same
way, since the best of thousands of features grows with their number: the model's MLP neurons (a neuron
fires where its GELU input is > 0) and a CLT of the same size with random weights whose features fire
as often as the trained ones of their layer; and a ceiling, the token-identity oracle (feature t fires
on token t: F1 ~1 on entities, ~0 on latent and output concepts, which no token detector can match).

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
    explanation, explanation_ngrams   the explanation string; all its n-grams, most frequent first
    detection_auroc, detection_bacc, fuzzing_bacc, heldout_density   held-out scores (null when undefined)
    concept, concept_precision, concept_recall, concept_f1   best toy-world concept (with a world.json only)
summary.json: per_layer dead / dense / live / interpretable counts, share_live_detection_above (AUROC >=
--interpretable), score quantiles, seconds_passes (and the plain-read ratio with --time-read); on the toy
world "concepts": eval_set, f1_threshold, min_support, families, n / recovered / share_recovered /
mean_best_f1 (the headline), by_family {family: kind, concepts, recovered, share, mean_best_f1, unscored},
per_concept {label: support, layer, feature, f1, precision, recall}, baselines {mlp_neurons, random_clt,
token_identity: the headline and by_family}.
"""
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from clt import CrossLayerTranscoder
from forge.cli import arg, parse_config, run_main
from forge.files import atomic_path, check_same_model, write_json
from forge.hub import load_tokenizer
from model import GPT

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)

# -----------------------------------------------------------------------------
# config


@dataclass
class InterpConfig:
    model: str = arg("", 'the GPT (hub layout) of the CLT and the cache; "" = the model in the cache manifest')
    clt: str = arg("runs/clt", 'CLT directory (CrossLayerTranscoder.save_pretrained)')
    cache: str = arg("runs/cache", 'activation cache directory (cache.py)')
    out: str = arg("runs/interp", 'where features.jsonl, summary.json and summary.png go')
    device: str = arg("cpu", 'cpu | cuda')
    chunk_size: int = arg(4096, 'cache rows per streamed chunk (memory ~ 3 x chunk_size x L·F floats)')
    top_k: int = arg(16, 'max-activating examples kept per feature')
    n_sampled: int = arg(32, 'uniform reservoir of firings per feature, the pool for quantile examples')
    n_quantile_examples: int = arg(8, 'quantile examples reported, at evenly spaced ranks of the reservoir')
    before: int = arg(8, 'context tokens shown before the firing token')
    after: int = arg(2, 'context tokens shown after it (needs a one-chunk lookahead)')
    max_ngram: int = arg(2, 'longest input n-gram counted (1 = single tokens)')
    min_count: int = arg(3, 'firings an n-gram needs to be reported or to explain')
    n_input: int = arg(10, 'over-represented n-grams reported per feature')
    max_terms: int = arg(64, 'n-grams at most in an explanation (a feature of a whole category needs many)')
    show_terms: int = arg(6, 'n-grams named in the explanation string, most frequent first; the rest are counted')
    n_logit: int = arg(8, 'promoted and suppressed tokens reported per feature')
    n_explain_logit: int = arg(2, 'promoted tokens named in the explanation')
    bins_per_octave: int = arg(4, 'histogram resolution: bins of width 2^(1/bins_per_octave)')
    log2_range: int = arg(12, 'histogram spans [2^-r, 2^r]; activations outside land in the end bins')
    fuzz_window: int = arg(4, 'fuzzing: tokens within this distance of a firing make its context')
    dense: float = arg(0.1, 'a feature firing on more than this share of tokens is dense')
    interpretable: float = arg(0.8, 'detection AUROC from which a live, non-dense feature is interpretable')
    concept_cache: str = arg("", 'where the evaluation set\'s activation cache goes; "" = OUT/concept_cache', group="the toy world (a model directory with forge/toyworld.py's world.json): concept scores on a labeled evaluation set")
    concept_seed: int = arg(2, 'seed of the evaluation set (toyworld.eval_corpus); bench.py recovery picks recipes on 1')
    concept_support: int = arg(32, 'labeled tokens the evaluation set gives every concept (toyworld.eval_corpus)')
    concept_f1: float = arg(0.8, 'a planted concept counts as recovered when a feature reaches this F1')
    min_support: int = arg(20, 'labeled tokens a concept needs to be scored')
    families: str = arg("category,entity,latent", 'label families whose recovery is the headline (all are listed)')
    baselines: bool = arg(True, 'also score the MLP neurons, a random CLT of the same size and the token-identity oracle')
    max_pairs: int = arg(20_000_000, 'stored (feature, n-gram) counts beyond which rare pairs are pruned')
    seed: int = arg(0, 'reservoir sampling')
    time_read: bool = arg(False, 'also time one plain read of the cache and report the cost ratio')

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
    acts: torch.Tensor  # (E, M) activations of all M = L·F features (m = layer·F + f) on E consecutive rows
    tok: torch.Tensor  # (E,) token ids
    doc: torch.Tensor  # (E,) document ids
    pos: torch.Tensor  # (E,) positions in their context (they restart at each context)
    lo: int  # this chunk's own rows are [lo, hi); the others are context
    hi: int


def cat(*parts):
    """Lists of tensors [acts, tok, doc, pos], one list per part -> one list of the parts concatenated."""
    return [torch.cat(p) for p in zip(*parts)]


def padded_chunks(clt, cache, split, cfg):
    """Encode each chunk once; yield it between the `before` rows before it and the rows just after it."""
    ahead = max(cfg.after, cfg.fuzz_window)  # the future rows that examples and fuzzing contexts need
    tail = None
    prev = None
    for chunk in cache.iter_chunks(cfg.chunk_size, split=split, device=cfg.device):
        mlp_in, _, tok, doc, pos = chunk  # cache.ActivationCache.iter_chunks: rows in order
        with torch.no_grad():
            acts = clt.encode(mlp_in.to(cfg.device, torch.float32)).flatten(1)  # (N, L·F)
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
    dropped key restarts from zero, so from then on counts are lower bounds (summary.json says when).
    """

    def __init__(self, max_pairs):
        self.keys = None  # (K,) sorted keys, their counts: after the first merge
        self.counts = None
        self.pending = []
        self.n_pending = 0
        self.max_pairs = max_pairs
        self.pruned_below = 0

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
        self.keys = keys
        self.pending = []
        self.n_pending = 0
        while self.keys.numel() > self.max_pairs:
            self.pruned_below += 1
            keep = self.counts > self.pruned_below
            self.keys = self.keys[keep]
            self.counts = self.counts[keep]
        return self.keys, self.counts


def merge_top(store, m, r, key, p, cfg):
    """Keep, per feature, the k firings of largest `key` seen so far, with their context windows.

    store: dict of (M, k, ...) tensors (key, act, doc, pos, win_tok, win_act) over all M = L·F features,
    sorted by key, key 0 = empty. m, r, key: (nnz,) the chunk's firings: feature, row - lo, key > 0.
    Only firings above their feature's k-th best are kept as candidates: after the first chunks they are
    few, so this costs little more than reading the firings.
    """
    k = store["key"].size(1)
    ok = key > store["key"][m, -1]
    m = m[ok]
    r = r[ok]
    key = key[ok]
    if m.numel() == 0:
        return
    order = key.argsort(descending=True)
    order = order[m[order].argsort(stable=True)]  # grouped by feature, best first within a feature
    m = m[order]
    r = r[order]
    key = key[order]
    need, counts = m.unique_consecutive(return_counts=True)  # (F',) the features with candidates
    slot = torch.repeat_interleave(torch.arange(len(need), device=m.device), counts)  # (n,) into need
    rank = torch.arange(len(m), device=m.device) - (counts.cumsum(0) - counts)[slot]
    keep = rank < k
    cand_key = torch.zeros(len(need), k, device=m.device)  # (F', k) 0 = no candidate
    center = torch.zeros(len(need), k, dtype=torch.long, device=m.device) + p.lo  # rows of the padded chunk
    cand_key[slot[keep], rank[keep]] = key[keep]
    center[slot[keep], rank[keep]] = r[keep] + p.lo
    rows = center[..., None] + torch.arange(-cfg.before, cfg.after + 1, device=m.device)  # (F', k, W)
    rows_c = rows.clamp(0, p.tok.numel() - 1)
    inside = (rows == rows_c) & (p.doc[rows_c] == p.doc[center][..., None])  # same document
    new = dict(key=cand_key, act=torch.where(cand_key > 0, p.acts[center, need[:, None]], 0.0), doc=p.doc[center],
               pos=p.pos[center], win_tok=torch.where(inside, p.tok[rows_c], -1),
               win_act=torch.where(inside, p.acts[rows_c, need[:, None, None]], 0.0))
    both = {n: torch.cat([store[n][need], new[n].to(store[n].dtype)], dim=1) for n in store}
    top = both["key"].topk(k, dim=1).indices  # (F', k)
    for n, t in both.items():
        store[n][need] = torch.take_along_dim(t, top.view(*top.shape, *[1] * (t.dim() - 2)), dim=1)


def empty_top(M, k, W, device):
    """An empty store for merge_top: k slots per feature, key 0 = empty, windows of W tokens (-1 = none)."""
    i32 = torch.int32
    return dict(key=torch.zeros(M, k, device=device), act=torch.zeros(M, k, device=device),
                doc=torch.zeros(M, k, dtype=i32, device=device), pos=torch.zeros(M, k, dtype=i32, device=device),
                win_tok=torch.full((M, k, W), -1, dtype=i32, device=device),
                win_act=torch.zeros(M, k, W, device=device))


class FeatureStats:
    """Everything the train pass accumulates: O(L·F·(k·W + bins)) plus the n-gram counter.

    Each chunk is reduced to its firings (the nonzero activations, a few percent) right after encoding;
    every statistic is then an index_add or a sort over those, never a dense (rows × features) pass.
    """

    def __init__(self, L, F_, V, cfg):
        dev = cfg.device
        W = cfg.before + cfg.after + 1
        M = L * F_
        self.cfg = cfg
        self.L = L
        self.F = F_
        self.base = V + 1
        self.n_bins = 2 * cfg.log2_range * cfg.bins_per_octave
        self.gram_space = self.base ** cfg.max_ngram  # G: keys are feature * G + gram
        if (M + 1) * self.gram_space >= 2 ** 63:
            raise ValueError(f"(feature, {cfg.max_ngram}-gram) keys overflow int64 for L·F={M}, V={V}: "
                             "lower --max-ngram")
        self.n_rows = 0
        self.n_fires = torch.zeros(M, dtype=torch.long, device=dev)  # feature m = layer·F + f
        self.sum_act = torch.zeros(M, dtype=torch.float64, device=dev)
        self.hist = torch.zeros(M, self.n_bins, dtype=torch.long, device=dev)
        self.top = empty_top(M, cfg.top_k, W, dev)  # max-activating examples
        self.sampled = empty_top(M, cfg.n_sampled, W, dev)  # a uniform sample of each feature's firings
        self.grams = SparseCounter(cfg.max_pairs)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)

    def update(self, p: Padded):
        cfg = self.cfg
        lo = p.lo
        hi = p.hi
        keys = ngram_keys(p, cfg.max_ngram, self.base)[lo:hi]  # (N, n)
        self.n_rows += hi - lo
        corpus = self.L * self.F  # a pseudo-feature that fires everywhere: the corpus counts
        self.grams.add(corpus * self.gram_space + keys[keys >= 0])
        r, m = (p.acts[lo:hi] > 0).nonzero(as_tuple=True)  # the firings; sparse from here on
        a = p.acts[lo:hi][r, m]  # (nnz,)
        self.n_fires.index_add_(0, m, torch.ones_like(m))
        self.sum_act.index_add_(0, m, a.double())
        b = (a.log2() * cfg.bins_per_octave).floor().long().clamp(-self.n_bins // 2, self.n_bins // 2 - 1)
        self.hist.view(-1).index_add_(0, m * self.n_bins + b + self.n_bins // 2, torch.ones_like(m))
        merge_top(self.top, m, r, a, p, cfg)
        prio = 1 - torch.rand(a.shape, generator=self.gen, device=a.device)  # in (0, 1]: the sample's keys
        merge_top(self.sampled, m, r, prio, p, cfg)
        g = keys[r]  # (nnz, n) the n-grams ending where each firing is
        m = m[:, None].expand_as(g)
        self.grams.add(m[g >= 0] * self.gram_space + g[g >= 0])


# -----------------------------------------------------------------------------
# output side: direct logit effects


@torch.no_grad()
def mean_ln_f_scale(model, tok, pos, bos, max_contexts=8):
    """Mean over tokens of ln_f's 1/sqrt(var + eps), on the first whole contexts of the cache's rows.

    Cache rows come from contexts [BOS, t1, ...] (the BOS row usually dropped): pos restarts at each.
    """
    starts = [0] + ((pos[1:] <= pos[:-1]).nonzero().flatten() + 1).tolist() + [len(pos)]
    spans = [(a, b) for a, b in zip(starts[:-1], starts[1:]) if pos[a] <= 1 and b - a == starts[1]]  # whole ones
    if not spans:
        raise ValueError("no whole context in the cache's first chunk: cannot measure ln_f's scale")
    idx = torch.stack([tok[a:b].cpu() for a, b in spans[:max_contexts]])  # (B, T)
    if pos[0] == 1:  # the BOS was dropped: put it back
        idx = torch.cat([torch.full((len(idx), 1), bos), idx], 1)
    _, acts = model.run_with_acts(idx[:, :model.config.n_ctx])
    return acts.frozen.ln_f[:, 1:].mean().item()  # not the BOS: its activations are outliers


@torch.no_grad()
def logit_effects(clt, model, ln_scale, n, n_vocab, batch=1024):
    """Direct logit effect of every feature: (promoted values, ids, suppressed values, ids), each (M, n).

    Feature f of layer l writes into mlp_out[l:] (clt.decoder_writes at activation 1), all of which joins
    the residual stream. Through ln_f with its scale frozen at the mean, adding v to the final residual
    moves the logits by  ((v - mean(v)) · scale · γ) @ W_U, W_U = wte^T. Only the tokenizer's n_vocab
    tokens count (a model's vocabulary may be padded past them).
    """
    per_layer = []
    for l, W in enumerate(clt.W_dec):
        ids = torch.arange(W.size(0), device=W.device)
        per_layer.append(clt.decoder_writes(l, ids, torch.ones(len(ids), device=W.device)).sum(1))  # (F, d)
    v = torch.cat(per_layer).float().cpu()  # (M, d) each feature's total write into the residual stream
    v = (v - v.mean(-1, keepdim=True)) * ln_scale * model.ln_f.weight
    parts = []
    for i in range(0, len(v), batch):
        eff = v[i:i + batch] @ model.wte.weight[:n_vocab].T  # (b, V)
        tv, ti = eff.topk(n, dim=1)
        bv, bi = (-eff).topk(n, dim=1)
        parts.append((tv, ti, -bv, bi))
    return [torch.cat(x) for x in zip(*parts)]


# -----------------------------------------------------------------------------
# explanations: built from the train counts alone


def n_digits(keys, base):
    """n-gram keys (numpy) -> n, their number of base-`base` digits."""
    n = np.zeros_like(keys)
    p = 1
    while (keys >= p).any():
        n = n + (keys >= p)
        p = p * base
    return n


def choose_ngrams(grams, c, C, n_fires, max_terms, base):
    """Greedily pick up to max_terms n-grams maximizing the train F1 of "fires iff one of them ends here".

    grams, c, C: numpy arrays of the candidates' keys, firings on them and corpus occurrences. Two
    n-grams ending at one token both match it only if one is a suffix of the other, so once a gram is
    chosen the grams nested with it leave the pool: the chosen ones match disjoint tokens and their
    counts add up. Returns indices into grams, most precise first.
    """
    pool = np.argsort(-2 * c / (C + n_fires), kind="stable")[:4 * max_terms]  # the best ones alone
    g = grams[pool]
    c = c[pool]
    C = C[pool]
    mod = base ** n_digits(g, base)  # g % mod[j] == grams[j] iff grams[j] is a suffix of g
    left = np.ones(len(pool), dtype=bool)
    chosen = []
    tp = 0
    pp = 0
    best = 0.0
    while left.any() and len(chosen) < max_terms:
        f1 = np.where(left, 2 * (tp + c) / (pp + C + n_fires), -1.0)
        j = int(f1.argmax())
        if f1[j] <= best:
            break
        chosen.append(j)
        tp = tp + c[j]
        pp = pp + C[j]
        best = f1[j]
        left &= (g % mod[j] != g[j]) & (g[j] % mod != g)  # drop the grams nested with it, either way
    return [int(pool[j]) for j in sorted(chosen, key=lambda j: -c[j] / C[j])]


def gram_table(stats):
    """The n-grams with at least min_count firings: numpy (feature, gram, count, corpus count) + bounds per feature."""
    keys, counts = stats.grams.merge()
    G = stats.gram_space
    M = stats.L * stats.F
    m = keys // G
    g = keys % G
    corpus = m == M
    ck = g[corpus]  # sorted by gram
    cc = counts[corpus]
    sel = ~corpus & (counts >= stats.cfg.min_count)
    m = m[sel]
    g = g[sel]
    c = counts[sel]
    C = cc[torch.searchsorted(ck, g)]  # a gram where a feature fires occurs in the corpus
    bounds = torch.searchsorted(m, torch.arange(M + 1, device=m.device))
    return [x.cpu().numpy() for x in (g, c, C, bounds)]


def explain_all(stats, promoted_ids, enc):
    """Per feature: explanation string, its n-grams (as text, and as keys by train precision), input_ngrams."""
    cfg = stats.cfg
    base = stats.base
    g, c, C, bounds = gram_table(stats)
    n_fires = stats.n_fires.cpu().numpy()
    out = []
    for m in range(stats.L * stats.F):
        gm, cm, Cm = (x[bounds[m]:bounds[m + 1]] for x in (g, c, C))
        chosen = choose_ngrams(gm, cm, Cm, n_fires[m], cfg.max_terms, base) if len(gm) else []
        pmi = np.log(cm / Cm * (stats.n_rows / max(n_fires[m], 1)))  # log P(gram | fires) / P(gram)
        top = np.lexsort((-cm, -pmi))[:cfg.n_input]  # by PMI, ties (often: all of a gram's uses fire) by count
        inputs = [dict(ngram=decode_gram(int(gm[i]), base, enc), count=int(cm[i]), corpus_count=int(Cm[i]),
                       pmi=round(float(pmi[i]), 3)) for i in top]
        names = [decode_gram(int(gm[i]), base, enc) for i in sorted(chosen, key=lambda i: -cm[i])]
        promotes = [enc.decode([int(t)]) for t in promoted_ids[m][:cfg.n_explain_logit]]
        if n_fires[m] == 0:
            text = "dead"
        else:
            more = f" (+{len(names) - cfg.show_terms} more)" if len(names) > cfg.show_terms else ""
            quoted = [json.dumps(n, ensure_ascii=False) for n in names[:cfg.show_terms]]
            text = "fires on " + (", ".join(quoted) + more if names else "no frequent n-gram")
            text += " | promotes " + ", ".join(json.dumps(t, ensure_ascii=False) for t in promotes)
        out.append(dict(explanation=text, explanation_ngrams=names, input_ngrams=inputs,
                        keys=[int(gm[i]) for i in chosen]))  # keys: most precise first, the scorer's ranking
    return out


# -----------------------------------------------------------------------------
# the held-out pass: detection, fuzzing and toy-world concept scores


class Scorer:
    """Counts, per feature, how its explanation's n-grams predict firing on held-out tokens.

    The predictor's score at a token is the rank of the n-gram of the explanation that ends there (the
    most precise on train first); an explanation's n-grams are never nested, so at most one matches.
    """

    def __init__(self, explanations, L, F_, base, gram_space, cfg):
        dev = cfg.device
        T = cfg.max_terms
        M = L * F_
        self.cfg = cfg
        self.L = L
        self.F = F_
        self.T = T
        self.base = base
        self.G = gram_space
        pairs = sorted((m * gram_space + k, t) for m, e in enumerate(explanations) for t, k in enumerate(e["keys"]))
        self.ekeys = torch.tensor([k for k, _ in pairs] + [2 ** 63 - 1], dtype=torch.long, device=dev)  # (K+1,)
        self.elevel = torch.tensor([t for _, t in pairs] + [T], dtype=torch.long, device=dev)  # rank in its list
        self.det = torch.zeros(M, T + 1, 2, dtype=torch.long, device=dev)  # (level, fires); level T = no match
        self.fuzz = torch.zeros(M, 2, 2, dtype=torch.long, device=dev)  # (predicted, fires) near firings
        self.n_fires = torch.zeros(M, dtype=torch.long, device=dev)
        self.n_rows = 0

    def update(self, p: Padded):
        lo = p.lo
        hi = p.hi
        T = self.T
        F_ = self.F
        keys = ngram_keys(p, self.cfg.max_ngram, self.base)[lo:hi]  # (N, n)
        self.n_rows += hi - lo
        for sl in (slice(l * F_, (l + 1) * F_) for l in range(self.L)):  # a layer at a time: (N, F) memory
            fire_ext = p.acts[:, sl] > 0  # (E, F)
            fire = fire_ext[lo:hi]
            m = torch.arange(sl.start, sl.stop, device=fire.device)  # (F,)
            level = torch.full(fire.shape, T, dtype=torch.long, device=fire.device)
            for j in range(keys.size(1)):  # the n-gram of each length ending at each row
                q = m * self.G + keys[:, j:j + 1]  # (N, F) (feature, n-gram) keys
                i = torch.searchsorted(self.ekeys, q)
                level = torch.where((self.ekeys[i] == q) & (keys[:, j:j + 1] >= 0), self.elevel[i], level)
            f_idx = m - sl.start
            fire_l = fire.long()
            self.det[sl].view(-1).index_add_(0, ((f_idx * (T + 1) + level) * 2 + fire_l).flatten(),
                                             torch.ones_like(level).flatten())
            near = near_firing(fire_ext, p.doc, self.cfg.fuzz_window, lo, hi)  # (N, F)
            idx = ((f_idx * 2 + (level < T).long()) * 2 + fire_l)[near]
            self.fuzz[sl].view(-1).index_add_(0, idx, torch.ones_like(idx))
            self.n_fires[sl] += fire.sum(0)

    def results(self):
        """Per feature (M,): detection AUROC, detection and fuzzing balanced accuracy (NaN where undefined)."""
        neg = self.det[..., 0].double().cpu()  # (M, T+1), best level first
        pos = self.det[..., 1].double().cpu()
        P = pos.sum(-1)
        N = neg.sum(-1)
        neg_below = neg.flip(-1).cumsum(-1).flip(-1) - neg  # negatives at a lower-scored level
        auroc = (pos * (neg_below + 0.5 * neg)).sum(-1) / (P * N)  # Mann-Whitney U, ties count half
        det_bacc = 0.5 * ((P - pos[:, -1]) / P + neg[:, -1] / N)
        fz = self.fuzz.double().cpu()
        fuzz_bacc = 0.5 * (fz[:, 1, 1] / fz[:, :, 1].sum(-1) + fz[:, 0, 0] / fz[:, :, 0].sum(-1))
        return auroc, det_bacc, fuzz_bacc


def near_firing(fire_ext, doc, w, lo, hi):
    """(N, F) bool: rows of [lo, hi) within w rows of a firing in the same document (activating contexts)."""
    near = torch.zeros(hi - lo, fire_ext.size(1), dtype=torch.bool, device=fire_ext.device)
    for o in range(-w, w + 1):  # row i looks at row i + o
        a = max(lo + o, 0)  # source rows
        b = min(hi + o, len(doc))
        same = doc[a:b] == doc[a - o:b - o]
        near[a - o - lo:b - o - lo] |= fire_ext[a:b] & same[:, None]
    return near


# -----------------------------------------------------------------------------
# output: features.jsonl, summary.json, summary.png


def examples(store, m, enc, before, n=None):
    """Feature m's valid entries of a top / sampled store as JSON-ready dicts, by decreasing activation.

    n: keep n of them at evenly spaced ranks (quantile examples), each with its rank as "quantile".
    """
    key, act, doc, pos, win_tok, win_act = (store[k][m].tolist()
                                            for k in ("key", "act", "doc", "pos", "win_tok", "win_act"))
    keep = sorted((i for i in range(len(key)) if key[i] > 0), key=lambda i: -act[i])
    if n is None:
        ranks = range(len(keep))
    else:  # evenly spaced ranks; fewer when the reservoir holds fewer than n firings
        ranks = sorted({int((j + 0.5) * len(keep) / n) for j in range(n)}) if keep else []
    out = []
    for r in ranks:
        i = keep[r]
        inside = [j for j, t in enumerate(win_tok[i]) if t >= 0]  # the window's rows in the same document
        out.append(dict(act=r4(act[i]), doc=doc[i], pos=pos[i], tokens=[enc.decode([win_tok[i][j]]) for j in inside],
                        acts=[r4(win_act[i][j]) for j in inside], center=inside.index(before)))
        if n is not None:
            out[-1]["quantile"] = round(1 - (r + 0.5) / len(keep), 3)
    return out


def hist_summary(counts, cfg):
    """Trimmed log2-spaced histogram of a feature's activations and quantiles read off it (bin centres)."""
    nb = counts.numel()
    bpo = cfg.bins_per_octave
    nz = counts.nonzero().flatten()
    if nz.numel() == 0:
        return dict(edges=[], counts=[]), {}
    a = nz[0].item()
    b = nz[-1].item() + 1
    edges = [2 ** ((i - nb // 2) / bpo) for i in range(nb + 1)]  # bin i is [edges[i], edges[i + 1])
    cum = counts.cumsum(0).double()
    qs = {}
    for q in QUANTILES:
        i = torch.searchsorted(cum, q * cum[-1]).item()
        qs[f"q{round(q * 100)}"] = round(2 ** ((i + 0.5 - nb // 2) / bpo), 4)  # the bin's centre (log scale)
    return dict(edges=[round(e, 5) for e in edges[a:b + 1]], counts=counts[a:b].tolist()), qs


def r4(x):
    """A JSON-ready float: 4 decimals, NaN -> None, -0.0 -> 0.0."""
    x = float(x)
    return None if x != x else round(x, 4) + 0.0


def token_logits(values, ids, enc):
    """[{"token", "logit"}] of a feature's promoted or suppressed tokens."""
    return [dict(token=enc.decode([i]), logit=r4(x)) for x, i in zip(values, ids)]


def write_features(path, stats, expl, effects, scores, concepts, enc, cfg):
    """One JSON object per feature, keys as in the module docstring."""
    pv, pi, sv, si = (x.tolist() for x in effects)
    auroc, det_bacc, fuzz_bacc, heldout_density = (x.tolist() for x in scores)
    n_fires = stats.n_fires.tolist()
    sum_act = stats.sum_act.tolist()
    hist = stats.hist.cpu()
    top, sampled = ({k: v.cpu() for k, v in t.items()} for t in (stats.top, stats.sampled))
    with atomic_path(path) as tmp, open(tmp, "w") as fh:  # whole or not at all: viz.py and graph.py read it
        for m in tqdm(range(stats.L * stats.F), desc="features.jsonl"):
            n = n_fires[m]
            e = expl[m]
            h, qs = hist_summary(hist[m], cfg)
            rec = dict(layer=m // stats.F, feature=m % stats.F, density=n / stats.n_rows, n_fires=n,
                       mean_act=r4(sum_act[m] / max(n, 1)), max_act=r4(top["act"][m, 0]), quantiles=qs, hist=h,
                       top_examples=examples(top, m, enc, cfg.before),
                       quantile_examples=examples(sampled, m, enc, cfg.before, cfg.n_quantile_examples),
                       promoted=token_logits(pv[m], pi[m], enc), suppressed=token_logits(sv[m], si[m], enc),
                       detection_auroc=r4(auroc[m]), detection_bacc=r4(det_bacc[m]), fuzzing_bacc=r4(fuzz_bacc[m]),
                       heldout_density=heldout_density[m], explanation=e["explanation"],
                       explanation_ngrams=e["explanation_ngrams"], input_ngrams=e["input_ngrams"])
            rec.update(concepts[m] if concepts else {})
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# the toy world: a labeled evaluation set, concept scores, and the baselines scored the same way


def concept_cache(model_dir, model, world, train_cache, cfg):
    """The evaluation set toyworld.eval_corpus(world, concept_seed, concept_support) as an activation cache, made
    by cache.py exactly as the training cache was (its ctx, dtype, BOS handling): --concept-cache, or
    OUT/concept_cache. Reused while its documents, model and layout are the same; rebuilt otherwise."""
    from forge import toyworld
    from cache import ActivationCache, CacheConfig, build_cache
    out = cfg.concept_cache or os.path.join(cfg.out, "concept_cache")
    docs = toyworld.eval_corpus(world, cfg.concept_seed, cfg.concept_support)
    text = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    corpus = out.rstrip("/") + ".jsonl"  # beside the cache: cache.py refuses foreign files inside it
    fresh = True
    if os.path.exists(corpus):
        with open(corpus, encoding="utf-8") as f:
            fresh = f.read() != text
    if fresh:
        os.makedirs(os.path.dirname(os.path.abspath(corpus)), exist_ok=True)
        with atomic_path(corpus) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    m = train_cache.manifest
    enc = load_tokenizer(model_dir)
    stream = sum(len(t) + 1 for t in enc.encode_ordinary_batch(docs))  # + the <|endoftext|> after each
    rows = stream // (m["ctx"] - 1) * (m["ctx"] - (0 if m["keep_bos"] else 1))  # whole contexts only
    c = CacheConfig(model=model_dir, corpus=corpus, tokens=rows, ctx=m["ctx"], keep_bos=m["keep_bos"],
                    dtype=m["dtype"], out=out, heldout=0.0, device=cfg.device)
    manifest = os.path.join(out, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            old = json.load(f)["identity"]
        want = dict(model_sha256=model.fingerprint(), tokens=rows, ctx=c.ctx, dtype=c.dtype, keep_bos=c.keep_bos)
        fresh = fresh or any(old.get(k) != v for k, v in want.items())
    build_cache(replace(c, overwrite=fresh))
    return ActivationCache(out, model=model)


class ConceptLabels:
    """Per row of a cache split, the toy world's labels (toyworld.label_tokens), stored sparsely.

    The labeler sees what the model saw: each run of rows of one document inside one context (cache.py
    packs documents into contexts, so a document cut by a context boundary gives two runs, the second
    without the text before it) is decoded back to text and labeled alone. A run whose re-encoding
    differs from its tokens is left unlabeled (not scored).
    """

    def __init__(self, cache, world, enc, cfg, split="all"):
        from forge import toyworld  # only the toy world needs it
        tok = []
        doc = []
        pos = []
        for _, _, t, d, p in cache.iter_chunks(cfg.chunk_size, split=split):
            tok.append(t)
            doc.append(d)
            pos.append(p)
        tok = torch.cat(tok)
        doc = torch.cat(doc)
        pos = torch.cat(pos)
        cut = (doc[1:] != doc[:-1]) | (pos[1:] != pos[:-1] + 1)  # a new document or a new context
        bounds = [0] + (cut.nonzero().flatten() + 1).tolist() + [len(tok)]
        index = {}  # label -> its column
        pairs = []
        self.labeled = torch.zeros(len(tok), dtype=torch.bool)
        for a, b in zip(bounds[:-1], bounds[1:]):
            ids = tok[a:b].tolist()
            text = enc.decode(ids)
            if enc.encode(text, allowed_special="all") != ids:
                continue
            self.labeled[a:b] = True
            for r, labels in enumerate(toyworld.label_tokens(text, enc, world)):
                for name in labels:
                    pairs.append((a + r, index.setdefault(name, len(index))))
        self.names = list(index)
        self.pairs = torch.tensor(pairs, dtype=torch.long).view(-1, 2)  # (row, concept), sorted by row
        self.row_starts = torch.searchsorted(self.pairs[:, 0].contiguous(), torch.arange(len(tok) + 1))

    def rows(self, lo, hi, device):
        """Rows [lo, hi) of the split: (sparse labels (C, N), labeled mask (N,))."""
        a = self.row_starts[lo].item()
        b = self.row_starts[hi].item()
        p = self.pairs[a:b]
        lab = torch.sparse_coo_tensor(torch.stack([p[:, 1], p[:, 0] - lo]), torch.ones(len(p)),
                                      (len(self.names), hi - lo), check_invariants=False)
        return lab.to(device), self.labeled[lo:hi].to(device)


class ConceptScores:
    """Per concept and feature, counts of "fires" (activation > 0) on labeled rows: on the concept's tokens
    (tp, (C, M)), anywhere (n_fires, (M,)); and each concept's tokens (support, (C,))."""

    def __init__(self, C, M, device):
        self.tp = torch.zeros(C, M, device=device)  # exact: float32 counts below 2^24 rows
        self.n_fires = torch.zeros(M, device=device)
        self.support = torch.zeros(C, device=device)

    def update(self, acts, labels, labeled):
        """acts (N, M) of one chunk of rows; labels (C, N) sparse and labeled (N,) as ConceptLabels.rows."""
        fire = ((acts > 0) & labeled[:, None]).float()  # (N, M)
        self.tp += torch.sparse.mm(labels, fire)
        self.n_fires += fire.sum(0)
        self.support += torch.sparse.sum(labels, 1).to_dense()

    def f1(self):
        """(precision, recall, F1), each (C, M) float64 on the CPU."""
        tp = self.tp.double().cpu()
        nf = self.n_fires.double().cpu()
        n = self.support.double().cpu()[:, None]
        return tp / nf.clamp(min=1), tp / n.clamp(min=1), 2 * tp / (nf + n).clamp(min=1)


def clt_acts(clt, mlp_in):
    """A CLT's feature activations, mlp_in (N, L, d) -> (N, L·F); feature m = layer·F + f."""
    return clt.encode(mlp_in).flatten(1)


def neuron_preacts(model, mlp_in):
    """The model's own MLP neurons as features, mlp_in (N, L, d) -> pre-activations (N, L·4d). A neuron
    "fires" where its GELU input is > 0 (GELU is positive exactly there): the one threshold without a
    choice; neurons are dense, which is what a dictionary of sparse features is meant to fix."""
    return torch.cat([block.mlp.c_fc(mlp_in[:, l]) for l, block in enumerate(model.h)], 1)  # (N, L·4d)


@torch.no_grad()
def random_like(clt, mlp_in, seed=1):
    """The random baseline: a CLT of the same size with its init's random weights (another seed), whose
    features fire as often on mlp_in (N, L, d) as the trained CLT's features of their layer do on average
    (each one's bias set at its own quantile). TopK stays TopK with the same k; every other activation
    becomes a JumpReLU. The best F1 of many random features is far from 0: this is the floor."""
    c = clt.config
    rand = CrossLayerTranscoder(replace(c, activation="topk" if c.activation == "topk" else "jumprelu"), seed=seed)
    rand = rand.to(mlp_in.device)
    if c.activation == "topk":
        return rand
    N = len(mlp_in)
    density = (clt.encode(mlp_in) > 0).float().mean((0, 2))  # (L,) the trained CLT's mean firing rate
    pre = rand.pre_acts(mlp_in)  # (N, L, F)
    eps = 1e-6
    for l in range(c.n_layers):
        k = int(N * (1 - density[l])) if density[l] > 0 else N  # fires above its k-th smallest value
        rand.b_enc[l] += eps - pre[:, l].kthvalue(max(k, 1), dim=0).values
    rand.log_threshold.fill_(math.log(eps / 2))
    return rand


def score_concepts(feature_sets, cache, labels, cfg):
    """One pass over the labeled cache: {name: ConceptScores} of each feature set {name: fn(mlp_in) -> acts}."""
    scores = {}
    row = 0
    lo, hi = cache.split_range("all")
    for mlp_in, _, tok, _, _ in tqdm(cache.iter_chunks(cfg.chunk_size, split="all", device=cfg.device),
                                     total=-(-(hi - lo) // cfg.chunk_size), desc="concept pass"):
        lab, labeled = labels.rows(row, row + len(tok), cfg.device)
        x = mlp_in.float()  # (N, L, d)
        for name, fn in feature_sets.items():
            with torch.no_grad():
                acts = fn(x)  # (N, M)
            if name not in scores:
                scores[name] = ConceptScores(len(labels.names), acts.size(1), cfg.device)
            scores[name].update(acts, lab, labeled)
        row += len(tok)
    return scores


def token_scores(cache, labels, n_vocab, cfg):
    """The token-identity oracle, scored as a feature set: feature t fires exactly where the token is t
    (ConceptScores with M = n_vocab, one "layer"). Its best F1 is the ceiling of a pure token detector:
    ~1 for an entity (every name is one token), ~0 for a latent or output concept (their tokens, "is",
    "speaks", "to", are shared by every answer): what no token-level feature can reach."""
    scores = ConceptScores(len(labels.names), n_vocab, cfg.device)
    row = 0
    for _, _, tok, _, _ in cache.iter_chunks(cfg.chunk_size, split="all", device=cfg.device):
        lab, labeled = labels.rows(row, row + len(tok), cfg.device)
        scores.update(torch.nn.functional.one_hot(tok, n_vocab).float(), lab, labeled)  # (N, V)
        row += len(tok)
    return scores


def best_features(scores: ConceptScores, labels, n_per_layer, cfg):
    """Per concept with >= min_support tokens: its best feature by F1 {support, layer, feature, f1,
    precision, recall}; and per feature its best concept (the features.jsonl keys)."""
    precision, recall, f1 = scores.f1()  # (C, M)
    per_concept = {}
    best = f1.argmax(1).tolist()
    for c, m in enumerate(best):
        n = int(scores.support[c])
        if n >= cfg.min_support:
            per_concept[labels.names[c]] = dict(support=n, layer=m // n_per_layer, feature=m % n_per_layer,
                                                f1=r4(f1[c, m]), precision=r4(precision[c, m]),
                                                recall=r4(recall[c, m]))
    per_feature = []
    for m, c in enumerate(f1.argmax(0).tolist()):
        per_feature.append(dict(concept=labels.names[c], concept_precision=r4(precision[c, m]),
                                concept_recall=r4(recall[c, m]), concept_f1=r4(f1[c, m])))
    return per_concept, per_feature


def family_table(per_concept, labels, scores, cfg):
    """{family: {kind, concepts, recovered, share, mean_best_f1, unscored}}: recovered = best F1 >= concept_f1;
    unscored = the family's labels with fewer than min_support tokens (not counted)."""
    from forge import toyworld
    out = {}
    for name, n in zip(labels.names, scores.support.tolist()):
        family = toyworld.family_of(name)
        fam = out.setdefault(family, dict(kind=toyworld.FAMILIES.get(family, "other"), concepts=0, recovered=0,
                                          share=None, mean_best_f1=None, unscored=0, f1s=[]))
        if n < cfg.min_support:
            fam["unscored"] += 1
            continue
        fam["concepts"] += 1
        fam["recovered"] += per_concept[name]["f1"] >= cfg.concept_f1
        fam["f1s"].append(per_concept[name]["f1"])
    for fam in out.values():
        f1s = fam.pop("f1s")
        if f1s:
            fam["share"] = r4(fam["recovered"] / len(f1s))
            fam["mean_best_f1"] = r4(sum(f1s) / len(f1s))
    return dict(sorted(out.items()))


def headline(table, cfg):
    """The share and mean best F1 over the concepts of --families together (each concept counts once)."""
    fams = [table[f] for f in cfg.families.split(",") if f in table and table[f]["concepts"]]
    n = sum(f["concepts"] for f in fams)
    rec = sum(f["recovered"] for f in fams)
    mean = sum(f["mean_best_f1"] * f["concepts"] for f in fams) / max(n, 1)
    return dict(n=n, recovered=rec, share_recovered=r4(rec / max(n, 1)), mean_best_f1=r4(mean))


def toy_world_concepts(model_dir, model, enc, clt, cache, world, cfg):
    """Score the CLT, the model's MLP neurons and a random CLT of the same size on the labeled evaluation
    set: (per_feature of the CLT, summary["concepts"])."""
    ccache = concept_cache(model_dir, model, world, cache, cfg)
    labels = ConceptLabels(ccache, world, enc, cfg)
    sets = {"clt": partial(clt_acts, clt)}
    if cfg.baselines:
        with contextlib.closing(cache.iter_chunks(cfg.chunk_size, split="train", device=cfg.device)) as chunks:
            sample = next(iter(chunks))[0].float()  # training rows: the random CLT's thresholds are set there
        sets["mlp_neurons"] = partial(neuron_preacts, model.to(cfg.device))
        sets["random_clt"] = partial(clt_acts, random_like(clt, sample))
    scores = score_concepts(sets, ccache, labels, cfg)
    if cfg.baselines:
        scores["token_identity"] = token_scores(ccache, labels, model.config.vocab_size, cfg)
    out = dict(eval_set=dict(kind="toyworld.eval_corpus", seed=cfg.concept_seed, support=cfg.concept_support,
                             cache=ccache.path, tokens=ccache.n_tokens, labeled_tokens=int(labels.labeled.sum())),
               f1_threshold=cfg.concept_f1, min_support=cfg.min_support, families=cfg.families)
    per_feature = None
    baselines = {}
    for name, s in scores.items():
        n_per_layer = dict(mlp_neurons=4 * model.config.n_embd, token_identity=model.config.vocab_size)
        n_per_layer = n_per_layer.get(name, clt.config.n_features)
        per_concept, pf = best_features(s, labels, n_per_layer, cfg)
        table = family_table(per_concept, labels, s, cfg)
        if name == "clt":
            per_feature = pf
            out.update(headline(table, cfg), by_family=table, per_concept=per_concept)
        else:
            baselines[name] = dict(headline(table, cfg), features=s.n_fires.numel(), by_family=table)
    out["baselines"] = baselines
    return per_feature, out


# -----------------------------------------------------------------------------
# summary


def quantiles(x):
    """{"q10": ..., "q90": ...} of the defined (non-NaN) values of x; {} if there are none."""
    x = x[~x.isnan()].double()
    return {f"q{round(q * 100)}": r4(x.quantile(q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if x.numel() else {}


def summarize(stats, scores, concepts, cfg):
    """Counts per layer (dead / dense / interpretable), score distributions, toy-world recovery (concepts:
    toy_world_concepts' summary, or None)."""
    auroc, det_bacc, fuzz_bacc = scores
    density = stats.n_fires.cpu() / stats.n_rows  # (M,)
    live = density > 0
    dense = density > cfg.dense
    good = live & (auroc >= cfg.interpretable)  # NaN compares False
    per_layer = [dict(layer=l, features=stats.F, **{k: int(v.view(stats.L, -1)[l].sum()) for k, v in
                      dict(dead=~live, dense=dense, live=live, interpretable=good & ~dense).items()})
                 for l in range(stats.L)]
    out = dict(n_train_tokens=stats.n_rows, per_layer=per_layer, detection_threshold=cfg.interpretable,
               share_live_detection_above=r4(good.sum() / live.sum().clamp(min=1)),
               detection_auroc=quantiles(auroc[live]), detection_bacc=quantiles(det_bacc[live]),
               fuzzing_bacc=quantiles(fuzz_bacc[live]), density=quantiles(density[live]),
               ngram_counts_pruned_below=stats.grams.pruned_below)  # 0: every n-gram count is exact
    if concepts is not None:
        out["concepts"] = concepts
    return out


def plot_summary(path, stats, scores, summary):
    """The summary as four small plots in one PNG (viz.py's index shows it): detection AUROC and fuzzing
    per layer, the firing-density histogram, and toy-world concept recovery per family (without a toy
    world: each layer's dead / dense / interpretable counts)."""
    from matplotlib.figure import Figure  # no pyplot: an Agg canvas, no window, no global backend
    density = (stats.n_fires.cpu() / stats.n_rows).view(stats.L, -1)  # (L, F)
    live = density > 0
    fig = Figure(figsize=(10, 7))
    ax = fig.subplots(2, 2)
    for a, x, name in ((ax[0, 0], scores[0], "detection AUROC"), (ax[0, 1], scores[2], "fuzzing balanced accuracy")):
        per_layer = [v[ok & ~v.isnan()].numpy() for v, ok in zip(x.view(stats.L, -1), live)]  # L arrays
        a.boxplot([v if len(v) else [float("nan")] for v in per_layer])
        a.set_xticks(range(1, stats.L + 1), [str(l) for l in range(stats.L)])
        a.set(title=f"{name} per layer (live features)", xlabel="layer", ylim=(0, 1.02))
    for l in range(stats.L):
        ax[1, 0].hist(density[l][live[l]].log10().numpy(), bins=40, histtype="step", label=f"layer {l}")
    ax[1, 0].set(title="firing density (live features)", xlabel="log10 density", ylabel="features")
    ax[1, 0].legend(fontsize=7)
    concepts = summary.get("concepts")
    if concepts:
        names = [n for n, f in concepts["by_family"].items() if f["kind"] != "structure" and f["concepts"]]
        sets = {"CLT": concepts["by_family"], **{k: v["by_family"] for k, v in concepts["baselines"].items()}}
        width = 0.8 / len(sets)
        for i, (label, table) in enumerate(sets.items()):
            shares = [(table.get(n) or {}).get("share") or 0.0 for n in names]
            ax[1, 1].bar(np.arange(len(names)) + (i - (len(sets) - 1) / 2) * width, shares, width, label=label)
        ax[1, 1].set_xticks(range(len(names)), [f"{n}\n({concepts['by_family'][n]['concepts']})" for n in names])
        ax[1, 1].set(title=f"planted concepts with a feature of F1 >= {concepts['f1_threshold']}",
                     ylabel="share recovered", ylim=(0, 1.02))
        ax[1, 1].legend(fontsize=7)
    else:
        layers = summary["per_layer"]
        ax[1, 1].bar(range(stats.L), [r["dead"] for r in layers], color="#c53030", label="dead")
        ax[1, 1].bar(range(stats.L), [r["interpretable"] for r in layers], bottom=[r["dead"] for r in layers],
                     color="#2b6cb0", label="interpretable")
        ax[1, 1].set(title="features per layer", xlabel="layer", xticks=range(stats.L))
        ax[1, 1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # the temporary name has no .png to infer the format from


# -----------------------------------------------------------------------------
# main


def same_path(a, b):
    """Do two model names (paths or hub ids) name the same model? Directories compare by real path."""
    return _real(str(a)) == _real(str(b))


def _real(name):
    return os.path.realpath(name) if os.path.isdir(name) else name


def load_inputs(cfg):
    """The GPT, its tokenizer, the CLT and the cache; refuses a CLT or cache made from another model."""
    from cache import ActivationCache
    model_dir = cfg.model or ActivationCache(cfg.cache).manifest["model"]
    model = GPT.from_pretrained(model_dir)
    enc = load_tokenizer(model_dir)
    cache = ActivationCache(cfg.cache, model=model)  # checks the model's sha256 against the manifest
    clt = CrossLayerTranscoder.from_pretrained(cfg.clt).to(cfg.device)
    c = clt.config
    if (c.n_layers, c.d_model) != (cache.n_layers, cache.d_model):
        raise ValueError(f"CLT {cfg.clt} has n_layers={c.n_layers}, d_model={c.d_model} but cache {cfg.cache} "
                         f"has n_layers={cache.n_layers}, d_model={cache.d_model}: they come from different models")
    if c.model_sha256:  # the CLT records its model's fingerprint (train.py): the weights decide, not the path
        check_same_model(model, c.model_sha256, f"the CLT {cfg.clt}")
    elif c.model and not same_path(c.model, model_dir):  # a CLT saved before fingerprints: its model's name
        raise ValueError(f"CLT {cfg.clt} was trained on model {c.model!r} but cache {cfg.cache} comes from "
                         f"{model_dir!r}: pass a CLT and a cache of the same model")
    return model_dir, model, enc, clt, cache


def analyze(model, enc, clt, cache, cfg):
    """The train pass, logit effects, explanations and the held-out pass. Returns (stats, explanations,
    effects, scorer)."""
    L = clt.config.n_layers
    F_ = clt.config.n_features
    stats = FeatureStats(L, F_, model.config.vocab_size, cfg)
    first = None
    for p in tqdm(padded_chunks(clt, cache, "train", cfg), total=n_chunks(cache, "train", cfg), desc="train pass"):
        stats.update(p)
        first = first or (p.tok[p.lo:p.hi], p.pos[p.lo:p.hi])
    if stats.n_rows == 0:
        raise ValueError("the cache's train split is empty: nothing to interpret")
    ln_scale = mean_ln_f_scale(model, *first, bos=enc.eot_token)
    effects = logit_effects(clt, model, ln_scale, cfg.n_logit, enc.n_vocab)
    expl = explain_all(stats, effects[1], enc)
    scorer = Scorer(expl, L, F_, stats.base, stats.gram_space, cfg)
    for p in tqdm(padded_chunks(clt, cache, "heldout", cfg), total=n_chunks(cache, "heldout", cfg),
                  desc="held-out pass"):
        scorer.update(p)
    if scorer.n_rows == 0:
        raise ValueError("the cache's held-out split is empty: rebuild it with cache.py --heldout > 0")
    return stats, expl, effects, scorer


def n_chunks(cache, split, cfg):
    lo, hi = cache.split_range(split)
    return -(-(hi - lo) // cfg.chunk_size)


def run(cfg: InterpConfig):
    """Load, analyze, write every output; returns the summary dict (also written to out/summary.json)."""
    torch.manual_seed(cfg.seed)
    model_dir, model, enc, clt, cache = load_inputs(cfg)
    world = None
    if os.path.exists(os.path.join(model_dir, "world.json")):  # the toy world: score against the truth
        from forge import toyworld
        world = toyworld.load_world(model_dir)
    t0 = time.perf_counter()
    stats, expl, effects, scorer = analyze(model, enc, clt, cache, cfg)
    seconds = time.perf_counter() - t0
    scores = scorer.results()
    per_feature = None
    concepts = None
    if world is not None:
        per_feature, concepts = toy_world_concepts(model_dir, model, enc, clt, cache, world, cfg)
    os.makedirs(cfg.out, exist_ok=True)
    write_features(os.path.join(cfg.out, "features.jsonl"), stats, expl, effects,
                   (*scores, scorer.n_fires.cpu() / scorer.n_rows), per_feature, enc, cfg)
    summary = summarize(stats, scores, concepts, cfg)
    summary.update(n_heldout_tokens=scorer.n_rows, seconds_passes=round(seconds, 3), config=asdict(cfg))
    if cfg.time_read:  # one plain read of the whole cache, for the cost ratio
        t = time.perf_counter()
        for _ in cache.iter_chunks(cfg.chunk_size, split="all"):
            pass
        summary.update(seconds_plain_read=round(time.perf_counter() - t, 3))
        summary.update(ratio_to_plain_read=round(seconds / summary["seconds_plain_read"], 2))
    plot_summary(os.path.join(cfg.out, "summary.png"), stats, scores, summary)
    write_json(os.path.join(cfg.out, "summary.json"), summary)  # last: a run with a summary.json is complete
    return summary


def main(argv=None):
    summary = run(parse_config(__doc__, InterpConfig, argv))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "concepts")}, indent=1))
    if "concepts" in summary:
        print(concept_table(summary["concepts"]))


def share_cell(fam):
    """A family_table row (or None) as "share recovered % / mean best F1"."""
    f = fam or {}
    return f"{100 * (f.get('share') or 0):.1f} % / {f.get('mean_best_f1') or 0:.2f}"


def concept_rows(c):
    """summary["concepts"] as rows, one per scored family and one for the headline: the CLT's and each
    baseline's "share recovered / mean best F1" (the feature index shows them too: viz.py)."""
    sets = {"CLT": c, **c["baselines"]}
    rows = []
    for name, fam in c["by_family"].items():
        if fam["kind"] == "structure" or not fam["concepts"]:
            continue
        row = dict(family=name, kind=fam["kind"], concepts=fam["concepts"])
        for label, s in sets.items():
            row[label] = share_cell(s["by_family"].get(name))
        rows.append(row)
    head = dict(family=c["families"], kind="headline", concepts=c["n"])
    for label, s in sets.items():
        head[label] = share_cell(dict(share=s["share_recovered"], mean_best_f1=s["mean_best_f1"]))
    return rows + [head]


def concept_table(c):
    """summary["concepts"] as a markdown table (concept_rows)."""
    rows = concept_rows(c)
    lines = [f"toy-world concepts recovered by a feature with F1 >= {c['f1_threshold']}: share / mean best F1",
             "| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)

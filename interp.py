"""
interp.py: LLM-free automated interpretability for a cross-layer transcoder (CLT).

Every feature of every layer gets statistics, examples, an explanation built from those statistics
alone, and scores for that explanation, from one streaming pass over each split of an activation
cache. Data flow:

    train split:    mlp_in --clt.encode--> acts (N, L, F) --> density, histogram, top-k and
                    quantile-sampled examples with context windows, the n-grams where it fires
    weights:        decoder --ln_f (mean scale)--> W_U --> promoted / suppressed tokens
    explanation:    the n-grams whose presence best predicts firing (greedy F1 on the train counts)
                    + the top promoted tokens: fires on " Tarn", " capital" | promotes " Velorian"
    held-out split: how each explanation predicts firing --> SCORES (detection, fuzzing)
    toy world:      forge/concepts.py: per planted concept its best feature by F1 on a labeled
                    evaluation set, for the CLT and for baselines scored the same way
    --> out/features.jsonl (one object per feature), out/summary.json, out/summary.png

    python interp.py --help
    python interp.py                        # models/tiny + runs/clt + runs/cache -> runs/interp
    python interp.py --model models/tiny --clt runs/clt --cache runs/cache --out runs/interp
    python interp.py --device cuda          # one process on a GPU (streaming passes: no torchrun)
    python interp.py --chunk-size 256 --top-k 8 --n-sampled 8   # a tiny CPU run

References: the detection and fuzzing scores of EleutherAI's delphi (Paulo et al. 2024,
"Automatically Interpreting Millions of Features in Large Language Models"); max-activating and
quantile examples and activation histograms as on Neuronpedia; direct logit effects as in Bricken
et al. 2023. Differences from EleutherAI's delphi:
 - explainer and scorer are one predictor, not a language model: "fires on g1, g2" means "one of
   the n-grams g1, g2 ends at this token"; scores are exact counts over every held-out token;
 - detection is per token: each held-out token (with its prefix as context) is a trial, positive
   when the feature fires there; AUROC ranks tokens by the train precision of the n-gram they match;
 - fuzzing keeps only tokens within ±fuzz_window of a firing in the same document (the activating
   contexts) and asks whether the explanation marks exactly the firing ones (balanced accuracy).
Memory is O(L·F·k) for examples and histograms plus the sparse (feature, n-gram) counts (pruned
beyond max_pairs); activations live for two chunks at most, never O(tokens × features). Each chunk
is cut down to its firings right after encoding, so the pass costs about twice a read + encode.

features.jsonl, one object per feature in (layer, feature) order: layer, feature, density and
n_fires (acts > 0, train split), mean_act, max_act, quantiles {"q10", ..., "q99"} and hist {"edges",
"counts"} (log2 bins) when active, top_examples and quantile_examples (+ "quantile") [{"act", "doc",
"pos", "tokens", "acts", "center": the firing token's index}], input_ngrams [{"ngram", "count",
"corpus_count", "pmi"}], promoted and suppressed [{"token", "logit"}], explanation,
explanation_ngrams, each score of SCORES (null: undefined), heldout_density; on the toy world
concept, concept_precision, concept_recall, concept_f1 (its best concept). summary.json: per_layer
dead / dense / live / interpretable counts, share_live_detection_above (AUROC >= --interpretable),
each score's quantiles, seconds_passes (and the plain-read ratio with --time-read); on the toy
world "concepts" (forge/concepts.py lists its keys).
"""

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from cache import ActivationCache, CacheConfig, build_cache
from clt import CrossLayerTranscoder
from forge.cli import arg, parse_config, run_main
from forge import toyworld
from forge.concepts import concept_table, plot_recovery, toy_world_concepts
from forge.files import atomic_path, check_same_model, write_json
from forge.hub import load_tokenizer
from model import GPT

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)

# -----------------------------------------------------------------------------
# config

TOY_WORLD = "the toy world (a model directory with forge/toyworld.py's world.json)"


@dataclass
class InterpConfig:
    model: str = arg("", 'the GPT (hub layout); "" = the model named in the cache manifest')
    clt: str = arg("runs/clt", "CLT directory (CrossLayerTranscoder.save_pretrained)")
    cache: str = arg("runs/cache", "activation cache directory (cache.py)")
    out: str = arg("runs/interp", "where features.jsonl, summary.json and summary.png go")
    device: str = arg("cpu", "cpu | cuda")
    chunk_size: int = arg(4096, "cache rows per streamed chunk (memory ~ 3 x chunk x L·F floats)")
    top_k: int = arg(16, "max-activating examples kept per feature")
    n_sampled: int = arg(32, "a uniform reservoir of firings per feature: quantile examples")
    n_quantile_examples: int = arg(8, "quantile examples reported, at evenly spaced ranks")
    before: int = arg(8, "context tokens shown before the firing token")
    after: int = arg(2, "context tokens shown after it (needs a one-chunk lookahead)")
    max_ngram: int = arg(2, "longest input n-gram counted (1 = single tokens)")
    min_count: int = arg(3, "firings an n-gram needs to be reported or to explain")
    n_input: int = arg(10, "over-represented n-grams reported per feature")
    max_terms: int = arg(64, "n-grams at most in an explanation (a whole category needs many)")
    show_terms: int = arg(6, "n-grams named in the explanation (most frequent); the rest counted")
    n_logit: int = arg(8, "promoted and suppressed tokens reported per feature")
    n_explain_logit: int = arg(2, "promoted tokens named in the explanation")
    bins_per_octave: int = arg(4, "histogram resolution: bins of width 2^(1/bins_per_octave)")
    log2_range: int = arg(12, "histogram spans [2^-r, 2^r]; values outside land in the end bins")
    fuzz_window: int = arg(4, "fuzzing: tokens within this distance of a firing make its context")
    dense: float = arg(0.1, "a feature firing on more than this share of tokens is dense")
    interpretable: float = arg(0.8, "detection AUROC from which a feature is interpretable")
    concept_cache: str = arg("", "evaluation set's cache; '' = OUT/concept_cache", group=TOY_WORLD)
    concept_seed: int = arg(2, "seed of the evaluation set (toyworld.eval_corpus)")
    concept_support: int = arg(32, "labeled tokens the evaluation set gives every concept")
    concept_f1: float = arg(0.8, "a planted concept is recovered when a feature reaches this F1")
    min_support: int = arg(20, "labeled tokens a concept needs to be scored")
    families: str = arg("category,entity,latent", "label families whose recovery is the headline")
    baselines: bool = arg(True, "also score MLP neurons, a random CLT and the token oracle")
    max_pairs: int = arg(20_000_000, "stored (feature, n-gram) counts beyond which rare ones go")
    seed: int = arg(0, "reservoir sampling")
    time_read: bool = arg(False, "also time one plain read of the cache and report the cost ratio")

    def __post_init__(self):
        if self.before < max(self.max_ngram - 1, self.fuzz_window) or self.after < 0:
            raise ValueError(f"need before >= max(max_ngram - 1, fuzz_window), after >= 0: {self}")
        if self.chunk_size < self.before + self.after + self.fuzz_window:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= before+after+fuzz_window")
        if self.max_ngram < 1 or self.top_k < 1 or self.n_sampled < 1:
            raise ValueError(f"max_ngram, top_k and n_sampled must be >= 1, got {self}")


# -----------------------------------------------------------------------------
# the procedure: statistics, explanations, scores
def interpret(model, enc, clt, cache, cfg: InterpConfig):
    """Statistics, an explanation and its scores for every feature of `clt` over `cache`.

    Returns (stats: FeatureStats of the train split, explanations: one dict per feature, effects:
    (promoted values, ids, suppressed values, ids), scorer: the held-out Scorer)."""
    # Phase 1: the train pass; each chunk's firings update densities, histograms, examples, n-grams
    stats = FeatureStats(clt.config.n_layers, clt.config.n_features, model.config.vocab_size, cfg)
    first = None
    for p in padded_chunks(clt, cache, "train", cfg):
        stats.update(p)
        first = first or (p.tok[p.lo : p.hi], p.pos[p.lo : p.hi])
    if stats.n_rows == 0:
        raise ValueError("the cache's train split is empty: nothing to interpret")
    # Phase 2: the output side, each feature's direct effect on the logits
    ln_scale = mean_ln_f_scale(model, *first, bos=enc.eot_token)
    effects = logit_effects(clt, model, ln_scale, cfg.n_logit, enc.n_vocab)
    # Phase 3: the explanations, from the train counts alone
    expl = explain_all(stats, effects[1], enc)
    # Phase 4: the held-out pass counts how each explanation predicts firing; SCORES read the counts
    scorer = Scorer(expl, stats)
    for p in padded_chunks(clt, cache, "heldout", cfg):
        scorer.update(p)
    if scorer.n_rows == 0:
        raise ValueError("the cache's held-out split is empty: rebuild it with cache.py --heldout")
    return stats, expl, effects, scorer


# -----------------------------------------------------------------------------
# explanations: built from the train counts alone
def explain_all(stats, promoted_ids, enc):
    """Per feature: the explanation string, its n-grams (as text, and as keys by train precision)
    and the input_ngrams."""
    cfg = stats.cfg
    base = stats.base
    g, c, C, bounds = gram_table(stats)
    n_fires = stats.n_fires.cpu().numpy()
    out = []
    for m in range(stats.L * stats.F):
        gm, cm, Cm = (x[bounds[m] : bounds[m + 1]] for x in (g, c, C))
        chosen = choose_ngrams(gm, cm, Cm, n_fires[m], cfg.max_terms, base) if len(gm) else []
        pmi = np.log(cm / Cm * (stats.n_rows / max(n_fires[m], 1)))  # log P(gram | fires) / P(gram)
        top = np.lexsort((-cm, -pmi))[: cfg.n_input]  # by PMI, ties (often) by count
        inputs = []
        for i in top:
            gram = decode_gram(int(gm[i]), base, enc)
            pmi_i = round(float(pmi[i]), 3)
            inputs.append(dict(ngram=gram, count=int(cm[i]), corpus_count=int(Cm[i]), pmi=pmi_i))
        names = [decode_gram(int(gm[i]), base, enc) for i in sorted(chosen, key=lambda i: -cm[i])]
        promotes = [enc.decode([int(t)]) for t in promoted_ids[m][: cfg.n_explain_logit]]
        more = f" (+{len(names) - cfg.show_terms} more)" if len(names) > cfg.show_terms else ""
        quoted = [json.dumps(n, ensure_ascii=False) for n in names[: cfg.show_terms]]
        text = "fires on " + (", ".join(quoted) + more if names else "no frequent n-gram")
        text += " | promotes " + ", ".join(json.dumps(t, ensure_ascii=False) for t in promotes)
        text = "dead" if n_fires[m] == 0 else text
        keys = [int(gm[i]) for i in chosen]  # most precise first: the scorer's ranking
        out.append(dict(explanation=text, explanation_ngrams=names, input_ngrams=inputs, keys=keys))
    return out


def choose_ngrams(grams, c, C, n_fires, max_terms, base):
    """Greedily pick up to max_terms n-grams maximizing the train F1 of "one of them ends here".

    grams, c, C: numpy arrays of the candidates' keys, firings on them and corpus occurrences. Two
    n-grams ending at one token both match it only if one is a suffix of the other, so once a gram
    is chosen the grams nested with it leave the pool: the chosen ones match disjoint tokens and
    their counts add up. Returns indices into grams, most precise first."""
    pool = np.argsort(-2 * c / (C + n_fires), kind="stable")[: 4 * max_terms]  # the best alone
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
        left &= (g % mod[j] != g[j]) & (g[j] % mod != g)  # drop the grams nested with it
    return [int(pool[j]) for j in sorted(chosen, key=lambda j: -c[j] / C[j])]


def n_digits(keys, base):
    """n-gram keys (numpy) -> n, their number of base-`base` digits."""
    n = np.zeros_like(keys)
    p = 1
    while (keys >= p).any():
        n = n + (keys >= p)
        p = p * base
    return n


def gram_table(stats):
    """The n-grams with at least min_count firings: numpy (gram, count, corpus count) sorted by
    feature, and each feature's bounds in them."""
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


def decode_gram(key, base, enc):
    """Inverse of ngram_keys: an n-gram key -> its text."""
    toks = []
    while key > 0:
        toks.append(key % base - 1)
        key //= base
    return enc.decode(toks[::-1])


# -----------------------------------------------------------------------------
# scores: each reads the held-out counts of a Scorer -> (M,) float64, NaN where undefined.
# A new score is one function and one line in SCORES; features.jsonl and summary.json follow.
def detection_auroc(s):
    """AUROC of the explanation's rank (its matched n-gram's train precision) as a predictor of
    firing over every held-out token: Mann-Whitney U, ties count half."""
    neg = s.det[..., 0].double().cpu()  # (M, T+1) tokens per matched level, best level first
    pos = s.det[..., 1].double().cpu()
    neg_below = neg.flip(-1).cumsum(-1).flip(-1) - neg  # negatives at a lower-scored level
    return (pos * (neg_below + 0.5 * neg)).sum(-1) / (pos.sum(-1) * neg.sum(-1))


def detection_bacc(s):
    """Balanced accuracy of "fires iff an n-gram of the explanation ends here", every token."""
    neg = s.det[..., 0].double().cpu()  # level T (the last): no n-gram matched
    pos = s.det[..., 1].double().cpu()
    P = pos.sum(-1)
    return 0.5 * ((P - pos[:, -1]) / P + neg[:, -1] / neg.sum(-1))


def fuzzing_bacc(s):
    """The same balanced accuracy on the activating contexts only (tokens near a firing)."""
    fz = s.fuzz.double().cpu()  # (M, predicted, fires)
    return 0.5 * (fz[:, 1, 1] / fz[:, :, 1].sum(-1) + fz[:, 0, 0] / fz[:, :, 0].sum(-1))


SCORES = dict(
    detection_auroc=detection_auroc, detection_bacc=detection_bacc, fuzzing_bacc=fuzzing_bacc
)


class Scorer:
    """Counts, per feature, how its explanation's n-grams predict firing on held-out tokens.

    The predictor's score at a token is the rank of the n-gram of the explanation that ends there
    (the most precise on train first); an explanation's n-grams are never nested, so at most one
    matches. det (M, T+1, 2): tokens per (level, fires), level T = no match; fuzz (M, 2, 2): tokens
    near a firing per (predicted, fires)."""

    def __init__(self, explanations, stats):
        self.stats = stats  # the train pass's shapes and n-gram keys: L, F, base, gram_space, cfg
        dev = stats.cfg.device
        T = stats.cfg.max_terms
        M = stats.L * stats.F
        G = stats.gram_space
        expl = enumerate(explanations)
        pairs = sorted((m * G + k, t) for m, e in expl for t, k in enumerate(e["keys"]))
        end = 2**63 - 1  # a sentinel past every key
        self.ekeys = torch.tensor([k for k, _ in pairs] + [end], dtype=torch.long, device=dev)
        self.elevel = torch.tensor([t for _, t in pairs] + [T], dtype=torch.long, device=dev)
        self.det = torch.zeros(M, T + 1, 2, dtype=torch.long, device=dev)
        self.fuzz = torch.zeros(M, 2, 2, dtype=torch.long, device=dev)
        self.n_rows = 0

    def update(self, p: "Padded"):
        lo = p.lo
        hi = p.hi
        cfg = self.stats.cfg
        T = cfg.max_terms
        F_ = self.stats.F
        keys = ngram_keys(p, cfg.max_ngram, self.stats.base)[lo:hi]  # (N, n)
        self.n_rows += hi - lo
        for l in range(self.stats.L):  # a layer at a time: (N, F) memory
            sl = slice(l * F_, (l + 1) * F_)
            fire_ext = p.acts[:, sl] > 0  # (E, F)
            fire = fire_ext[lo:hi]
            m = torch.arange(sl.start, sl.stop, device=fire.device)  # (F,)
            level = torch.full(fire.shape, T, dtype=torch.long, device=fire.device)
            for j in range(keys.size(1)):  # the n-gram of each length ending at each row
                q = m * self.stats.gram_space + keys[:, j : j + 1]  # (N, F) (feature, gram) keys
                i = torch.searchsorted(self.ekeys, q)
                hit = (self.ekeys[i] == q) & (keys[:, j : j + 1] >= 0)
                level = torch.where(hit, self.elevel[i], level)
            f_idx = m - sl.start
            fire_l = fire.long()
            idx = ((f_idx * (T + 1) + level) * 2 + fire_l).flatten()
            self.det[sl].view(-1).index_add_(0, idx, torch.ones_like(idx))
            near = near_firing(fire_ext, p.doc, cfg.fuzz_window, lo, hi)  # (N, F)
            idx = ((f_idx * 2 + (level < T).long()) * 2 + fire_l)[near]
            self.fuzz[sl].view(-1).index_add_(0, idx, torch.ones_like(idx))

    def results(self):
        """{name: (M,) values} of every score in SCORES."""
        return {name: score(self) for name, score in SCORES.items()}


def near_firing(fire_ext, doc, w, lo, hi):
    """(N, F) bool: rows of [lo, hi) within w rows of a firing in the same document."""
    near = torch.zeros(hi - lo, fire_ext.size(1), dtype=torch.bool, device=fire_ext.device)
    for o in range(-w, w + 1):  # row i looks at row i + o
        a = max(lo + o, 0)  # source rows
        b = min(hi + o, len(doc))
        same = doc[a:b] == doc[a - o : b - o]
        near[a - o - lo : b - o - lo] |= fire_ext[a:b] & same[:, None]
    return near


# -----------------------------------------------------------------------------
# streaming: each chunk of the cache, encoded, between `before` rows of the past and `after` ahead
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


# -----------------------------------------------------------------------------
# the train pass: densities, histograms, examples, n-gram counts
class FeatureStats:
    """Everything the train pass accumulates: O(L·F·(k·W + bins)) plus the n-gram counter, each
    statistic an index_add or a sort over the firings, never a dense (rows × features) pass."""

    def __init__(self, L, F_, V, cfg):
        dev = cfg.device
        W = cfg.before + cfg.after + 1
        M = L * F_
        self.cfg = cfg
        self.L = L
        self.F = F_
        self.base = V + 1
        self.n_bins = 2 * cfg.log2_range * cfg.bins_per_octave
        self.gram_space = self.base**cfg.max_ngram  # G: keys are feature * G + gram
        if (M + 1) * self.gram_space >= 2**63:
            raise ValueError(f"n-gram keys overflow int64 at L·F={M}, V={V}: lower --max-ngram")
        self.n_rows = 0
        self.n_fires = torch.zeros(M, dtype=torch.long, device=dev)  # feature m = layer·F + f
        self.sum_act = torch.zeros(M, dtype=torch.float64, device=dev)
        self.hist = torch.zeros(M, self.n_bins, dtype=torch.long, device=dev)
        self.top = empty_top(M, cfg.top_k, W, dev)  # max-activating examples
        self.sampled = empty_top(M, cfg.n_sampled, W, dev)  # a uniform sample of the firings
        self.grams = SparseCounter(cfg.max_pairs)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)

    def update(self, p: Padded):
        cfg = self.cfg
        own = slice(p.lo, p.hi)  # the chunk's own rows; the others are context
        keys = ngram_keys(p, cfg.max_ngram, self.base)[own]  # (N, n)
        self.n_rows += p.hi - p.lo
        corpus = self.L * self.F  # a pseudo-feature that fires everywhere: the corpus counts
        self.grams.add(corpus * self.gram_space + keys[keys >= 0])
        r, m = (p.acts[own] > 0).nonzero(as_tuple=True)  # the firings; sparse from here on
        a = p.acts[own][r, m]  # (nnz,)
        self.n_fires.index_add_(0, m, torch.ones_like(m))
        self.sum_act.index_add_(0, m, a.double())
        half = self.n_bins // 2
        b = (a.log2() * cfg.bins_per_octave).floor().long().clamp(-half, half - 1)
        self.hist.view(-1).index_add_(0, m * self.n_bins + b + half, torch.ones_like(m))
        merge_top(self.top, m, r, a, p, cfg)
        prio = 1 - torch.rand(a.shape, generator=self.gen, device=a.device)  # in (0, 1]
        merge_top(self.sampled, m, r, prio, p, cfg)  # the largest random keys: a uniform sample
        g = keys[r]  # (nnz, n) the n-grams ending where each firing is
        m = m[:, None].expand_as(g)
        self.grams.add(m[g >= 0] * self.gram_space + g[g >= 0])


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
        k, c = keys.unique(return_counts=True)
        self.pending.append((k, c))
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


def empty_top(M, k, W, device):
    """An empty store for merge_top: k slots per feature, key 0 = empty, windows of W tokens."""
    i32 = torch.int32
    store = dict(key=torch.zeros(M, k, device=device), act=torch.zeros(M, k, device=device))
    store.update(doc=torch.zeros(M, k, dtype=i32, device=device))
    store.update(pos=torch.zeros(M, k, dtype=i32, device=device))
    store.update(win_tok=torch.full((M, k, W), -1, dtype=i32, device=device))
    store.update(win_act=torch.zeros(M, k, W, device=device))
    return store


# -----------------------------------------------------------------------------
# output side: direct logit effects
@torch.no_grad()
def mean_ln_f_scale(model, tok, pos, bos, max_contexts=8):
    """Mean over tokens of ln_f's 1/sqrt(var + eps), on the first whole contexts of the cache (rows
    of contexts [BOS, t1, ...], the BOS row often dropped: pos restarts at each)."""
    starts = [0] + ((pos[1:] <= pos[:-1]).nonzero().flatten() + 1).tolist() + [len(pos)]
    spans = [(a, b) for a, b in zip(starts[:-1], starts[1:]) if pos[a] <= 1]
    spans = [(a, b) for a, b in spans if b - a == starts[1]]  # whole contexts only
    if not spans:
        raise ValueError("no whole context in the cache's first chunk: cannot measure ln_f's scale")
    idx = torch.stack([tok[a:b].cpu() for a, b in spans[:max_contexts]])  # (B, T)
    if pos[0] == 1:  # the BOS was dropped: put it back
        idx = torch.cat([torch.full((len(idx), 1), bos), idx], 1)
    _, acts = model.run_with_acts(idx[:, : model.config.n_ctx])
    return acts.frozen.ln_f[:, 1:].mean().item()  # not the BOS: its activations are outliers


@torch.no_grad()
def logit_effects(clt, model, ln_scale, n, n_vocab, batch=1024):
    """Direct logit effect of every feature: (promoted values, ids, suppressed values, ids), (M, n).

    Feature f of layer l writes into mlp_out[l:] (clt.decoder_writes at activation 1), all of which
    joins the residual stream. Through ln_f with its scale frozen at the mean, adding v to the final
    residual moves the logits by  ((v - mean(v)) · scale · γ) @ W_U, W_U = wte^T. Only the
    tokenizer's n_vocab tokens count (a model's vocabulary may be padded past them)."""
    per_layer = []
    for l, W in enumerate(clt.W_dec):
        ids = torch.arange(W.size(0), device=W.device)
        write = clt.decoder_writes(l, ids, torch.ones(len(ids), device=W.device))
        per_layer.append(write.sum(1))  # (F, d)
    v = torch.cat(per_layer).float().cpu()  # (M, d) each feature's total write into the residual
    v = (v - v.mean(-1, keepdim=True)) * ln_scale * model.ln_f.weight
    parts = []
    for i in range(0, len(v), batch):
        eff = v[i : i + batch] @ model.wte.weight[:n_vocab].T  # (b, V)
        tv, ti = eff.topk(n, dim=1)
        bv, bi = (-eff).topk(n, dim=1)
        parts.append((tv, ti, -bv, bi))
    return [torch.cat(x) for x in zip(*parts)]


# -----------------------------------------------------------------------------
# output: features.jsonl, summary.json, summary.png
def write_features(path, stats, expl, effects, scores, heldout_density, concepts, enc, cfg):
    """One JSON object per feature, keys as in the module docstring. scores: {name: (M,)}."""
    pv, pi, sv, si = (x.tolist() for x in effects)
    scores = {name: x.tolist() for name, x in scores.items()}
    heldout_density = heldout_density.tolist()
    n_fires = stats.n_fires.tolist()
    sum_act = stats.sum_act.tolist()
    hist = stats.hist.cpu()
    top, sampled = ({k: v.cpu() for k, v in t.items()} for t in (stats.top, stats.sampled))
    nq = cfg.n_quantile_examples
    text_keys = ("explanation", "explanation_ngrams", "input_ngrams")
    with atomic_path(path) as tmp, open(tmp, "w") as fh:  # whole or not at all: viz.py reads it
        for m in tqdm(range(stats.L * stats.F), desc="features.jsonl"):
            n = n_fires[m]
            h, qs = hist_summary(hist[m], cfg)
            rec = dict(layer=m // stats.F, feature=m % stats.F, density=n / stats.n_rows, n_fires=n)
            rec.update(mean_act=r4(sum_act[m] / max(n, 1)), max_act=r4(top["act"][m, 0]))
            rec.update(quantiles=qs, hist=h, top_examples=examples(top, m, enc, cfg.before))
            rec.update(quantile_examples=examples(sampled, m, enc, cfg.before, nq))
            rec.update(promoted=token_logits(pv[m], pi[m], enc))
            rec.update(suppressed=token_logits(sv[m], si[m], enc))
            rec.update({name: r4(x[m]) for name, x in scores.items()})
            rec.update(heldout_density=heldout_density[m])
            rec.update({k: expl[m][k] for k in text_keys})
            rec.update(concepts[m] if concepts else {})
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def examples(store, m, enc, before, n=None):
    """Feature m's valid entries of a top / sampled store as JSON-ready dicts, by activation.

    n: keep n of them at evenly spaced ranks (quantile examples), each with its "quantile"."""
    names = ("key", "act", "doc", "pos", "win_tok", "win_act")
    key, act, doc, pos, win_tok, win_act = (store[k][m].tolist() for k in names)
    keep = sorted((i for i in range(len(key)) if key[i] > 0), key=lambda i: -act[i])
    if n is None:
        ranks = range(len(keep))
    else:  # evenly spaced ranks; fewer when the reservoir holds fewer than n firings
        ranks = sorted({int((j + 0.5) * len(keep) / n) for j in range(n)}) if keep else []
    out = []
    for r in ranks:
        i = keep[r]
        inside = [j for j, t in enumerate(win_tok[i]) if t >= 0]  # the window in the same document
        tokens = [enc.decode([win_tok[i][j]]) for j in inside]
        acts = [r4(win_act[i][j]) for j in inside]
        ex = dict(act=r4(act[i]), doc=doc[i], pos=pos[i], tokens=tokens, acts=acts)
        out.append(dict(ex, center=inside.index(before)))
        if n is not None:
            out[-1]["quantile"] = round(1 - (r + 0.5) / len(keep), 3)
    return out


def hist_summary(counts, cfg):
    """Trimmed log2-spaced histogram of a feature's activations and quantiles read off it."""
    nb = counts.numel()
    bpo = cfg.bins_per_octave
    nz = counts.nonzero().flatten()
    if nz.numel() == 0:
        return dict(edges=[], counts=[]), {}
    a = nz[0].item()
    b = nz[-1].item() + 1
    edges = [2 ** ((i - nb // 2) / bpo) for i in range(nb + 1)]  # bin i is [edges[i], edges[i+1])
    cum = counts.cumsum(0).double()
    qs = {}
    for q in QUANTILES:
        i = torch.searchsorted(cum, q * cum[-1]).item()
        qs[f"q{round(q * 100)}"] = round(2 ** ((i + 0.5 - nb // 2) / bpo), 4)  # the bin's centre
    return dict(edges=[round(e, 5) for e in edges[a : b + 1]], counts=counts[a:b].tolist()), qs


def r4(x):
    """A JSON-ready float: 4 decimals, NaN -> None, -0.0 -> 0.0."""
    x = float(x)
    return None if x != x else round(x, 4) + 0.0


def token_logits(values, ids, enc):
    """[{"token", "logit"}] of a feature's promoted or suppressed tokens."""
    return [dict(token=enc.decode([i]), logit=r4(x)) for x, i in zip(values, ids)]


def quantiles(x):
    """{"q10": ..., "q90": ...} of the defined (non-NaN) values of x; {} if there are none."""
    x = x[~x.isnan()].double()
    return {f"q{round(q * 100)}": r4(x.quantile(q)) for q in QUANTILES[:-1]} if x.numel() else {}


def summarize(stats, scores, cfg):
    """Counts per layer (dead / dense / interpretable) and the distribution of every score."""
    density = stats.n_fires.cpu() / stats.n_rows  # (M,)
    live = density > 0
    dense = density > cfg.dense
    good = live & (scores["detection_auroc"] >= cfg.interpretable)  # NaN compares False
    counts = dict(dead=~live, dense=dense, live=live, interpretable=good & ~dense)
    per_layer = []
    for l in range(stats.L):
        row = {k: int(v.view(stats.L, -1)[l].sum()) for k, v in counts.items()}
        per_layer.append(dict(layer=l, features=stats.F, **row))
    out = dict(n_train_tokens=stats.n_rows, per_layer=per_layer)
    out.update(detection_threshold=cfg.interpretable)
    out.update(share_live_detection_above=r4(good.sum() / live.sum().clamp(min=1)))
    out.update({name: quantiles(x[live]) for name, x in scores.items()})
    out.update(density=quantiles(density[live]))
    out.update(ngram_counts_pruned_below=stats.grams.pruned_below)  # 0: every count is exact
    return out


def plot_summary(path, stats, scores, summary):
    """The summary as four small plots in one PNG (viz.py's index shows it): detection AUROC and
    fuzzing per layer, the firing-density histogram, and toy-world concept recovery per family
    (without a toy world: each layer's dead / dense / interpretable counts)."""
    from matplotlib.figure import Figure  # no pyplot: an Agg canvas, no window, no global backend

    density = (stats.n_fires.cpu() / stats.n_rows).view(stats.L, -1)  # (L, F)
    live = density > 0
    fig = Figure(figsize=(10, 7))
    ax = fig.subplots(2, 2)
    boxes = dict(detection_auroc="detection AUROC", fuzzing_bacc="fuzzing balanced accuracy")
    for a, (key, name) in zip(ax[0], boxes.items()):
        x = scores[key].view(stats.L, -1)
        per_layer = [v[ok & ~v.isnan()].numpy() for v, ok in zip(x, live)]  # L arrays
        a.boxplot([v if len(v) else [float("nan")] for v in per_layer])
        a.set_xticks(range(1, stats.L + 1), [str(l) for l in range(stats.L)])
        a.set(title=f"{name} per layer (live features)", xlabel="layer", ylim=(0, 1.02))
    for l in range(stats.L):
        x = density[l][live[l]].log10().numpy()
        ax[1, 0].hist(x, bins=40, histtype="step", label=f"layer {l}")
    ax[1, 0].set(title="firing density (live features)", xlabel="log10 density", ylabel="features")
    ax[1, 0].legend(fontsize=7)
    if summary.get("concepts"):
        plot_recovery(ax[1, 1], summary["concepts"])
    else:
        dead = [r["dead"] for r in summary["per_layer"]]
        good = [r["interpretable"] for r in summary["per_layer"]]
        ax[1, 1].bar(range(stats.L), dead, color="#c53030", label="dead")
        ax[1, 1].bar(range(stats.L), good, bottom=dead, color="#2b6cb0", label="interpretable")
        ax[1, 1].set(title="features per layer", xlabel="layer", xticks=range(stats.L))
    ax[1, 1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # the temporary name has no .png to infer it from


# -----------------------------------------------------------------------------
# main
def load_inputs(cfg):
    """The GPT, its tokenizer, the CLT and the cache; refuses a CLT or cache of another model."""
    model_dir = cfg.model or ActivationCache(cfg.cache).manifest["model"]
    model = GPT.from_pretrained(model_dir)
    enc = load_tokenizer(model_dir)
    cache = ActivationCache(cfg.cache, model=model)  # checks the model's sha256 (manifest)
    clt = CrossLayerTranscoder.from_pretrained(cfg.clt).to(cfg.device)
    c = clt.config
    if (c.n_layers, c.d_model) != (cache.n_layers, cache.d_model):
        raise ValueError(
            f"CLT {cfg.clt} (n_layers={c.n_layers}, d_model={c.d_model}) and cache {cfg.cache} "
            f"(n_layers={cache.n_layers}, d_model={cache.d_model}) come from different models"
        )
    if c.model_sha256:  # the CLT records its model's fingerprint (train.py): the weights decide
        check_same_model(model, c.model_sha256, f"the CLT {cfg.clt}")
    elif c.model and os.path.realpath(c.model) != os.path.realpath(model_dir):  # no fingerprint
        raise ValueError(
            f"CLT {cfg.clt} was trained on model {c.model!r} but cache {cfg.cache} comes from "
            f"{model_dir!r}: pass a CLT and a cache of the same model"
        )
    return model_dir, model, enc, clt, cache


def concept_cache(model_dir, model, cfg, fields, stale):
    """The toy world's evaluation set stored by build_cache (forge/concepts.py writes its corpus
    and picks the fields): reused while build_cache would resume it, rebuilt otherwise."""
    c = CacheConfig(model=model_dir, heldout=0.0, device=cfg.device, **fields)
    try:
        build_cache(replace(c, overwrite=stale))
    except ValueError:  # made with other arguments: build_cache compared its whole identity
        build_cache(replace(c, overwrite=True))
    return ActivationCache(c.out, model=model)


def run(cfg: InterpConfig):
    """Load, interpret, write every output; returns the summary dict (also out/summary.json)."""
    torch.manual_seed(cfg.seed)
    model_dir, model, enc, clt, cache = load_inputs(cfg)
    toy = os.path.exists(os.path.join(model_dir, "world.json"))  # the toy world: the truth is known
    world = toyworld.load_world(model_dir) if toy else None
    t0 = time.perf_counter()
    stats, expl, effects, scorer = interpret(model, enc, clt, cache, cfg)
    seconds = time.perf_counter() - t0
    scores = scorer.results()
    per_feature = None
    concepts = None
    if world is not None:
        build = partial(concept_cache, model_dir, model, cfg)
        per_feature, concepts = toy_world_concepts(model, enc, clt, cache, world, cfg, build)
    os.makedirs(cfg.out, exist_ok=True)
    density = scorer.det[..., 1].sum(-1).cpu() / scorer.n_rows  # held-out firings / tokens
    path = os.path.join(cfg.out, "features.jsonl")
    write_features(path, stats, expl, effects, scores, density, per_feature, enc, cfg)
    summary = summarize(stats, scores, cfg)
    if concepts is not None:
        summary["concepts"] = concepts
    summary.update(n_heldout_tokens=scorer.n_rows, seconds_passes=round(seconds, 3))
    summary.update(config=asdict(cfg))
    if cfg.time_read:  # one plain read of the whole cache, for the cost ratio
        t = time.perf_counter()
        for _ in cache.iter_chunks(cfg.chunk_size, split="all"):
            pass
        summary.update(seconds_plain_read=round(time.perf_counter() - t, 3))
        summary.update(ratio_to_plain_read=round(seconds / summary["seconds_plain_read"], 2))
    plot_summary(os.path.join(cfg.out, "summary.png"), stats, scores, summary)
    write_json(os.path.join(cfg.out, "summary.json"), summary)  # last: marks a complete run
    return summary


def main(argv=None):
    summary = run(parse_config(__doc__, InterpConfig, argv))
    shown = {k: v for k, v in summary.items() if k not in ("config", "concepts")}
    print(json.dumps(shown, indent=1))
    if "concepts" in summary:
        print(concept_table(summary["concepts"]))


if __name__ == "__main__":
    run_main(main)

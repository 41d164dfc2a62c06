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
    short label:    the n-grams it fires on more than the corpus does (smoothed lift, weighted by
                    support) -> the tokens it clearly promotes: " Tarn", " capital" → " Velorian"
    held-out split: how each explanation predicts firing --> SCORES (detection, fuzzing)
    toy world:      forge/concepts.py: per planted concept its best feature by F1 on a labeled
                    evaluation set, for the CLT and for baselines scored the same way
    --> out/features.jsonl, out/summary.json, out/summary.png (forge/interpfile.py: their keys)

    python interp.py --help
    python interp.py                        # models/tiny + runs/clt + runs/cache -> runs/interp
    python interp.py --device cuda          # one process on a GPU (streaming passes: no torchrun)
    python interp.py --chunk-size 256 --top-k 8 --n-sampled 8   # a tiny CPU run

References: the detection and fuzzing scores of EleutherAI's delphi (Paulo et al. 2024,
"Automatically Interpreting Millions of Features in Large Language Models"); examples and
histograms as on Neuronpedia; direct logit effects as in Bricken et al. 2023. Unlike delphi:
 - explainer and scorer are one predictor, not a language model: "fires on g1, g2" means "one of
   the n-grams g1, g2 ends at this token"; scores are exact counts over every held-out token;
 - detection is per token: each held-out token (with its prefix as context) is a trial, positive
   when the feature fires there; AUROC ranks tokens by the train precision of the n-gram they match;
 - fuzzing keeps only tokens within ±fuzz_window of a firing in the same document (the activating
   contexts) and asks whether the explanation marks exactly the firing ones (balanced accuracy).
Memory: O(L·F·k) examples and histograms plus the (feature, n-gram) counts (pruned beyond
max_pairs); activations live two chunks at most, cut to their firings once encoded (a pass costs
about twice a read + encode).
"""

import json
import os
import time
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from cache import ActivationCache, CacheConfig, build_cache
from clt import CrossLayerTranscoder
from forge import files, toyworld
from forge.cli import arg, parse_config, run_main
from forge.concepts import concept_table, toy_world_concepts
from forge.interpfile import Padded, SparseCounter, check_clt, decode_gram, empty_top, merge_top
from forge.interpfile import label_text, n_digits, ngram_keys, padded_chunks, write_outputs
from forge.hub import load_tokenizer
from model import load_model

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
    n_label: int = arg(6, "n-grams named in the short label: the most over-represented")
    clear_logit: float = arg(4.0, "the label names a promoted token this many std above the mean")
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
    (promoted values, ids, suppressed values, ids, z-scores), scorer: the held-out Scorer)."""
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
    expl = explain_all(stats, effects, enc)
    # Phase 4: the held-out pass counts how each explanation predicts firing; SCORES read the counts
    scorer = Scorer(expl, stats)
    for p in padded_chunks(clt, cache, "heldout", cfg):
        scorer.update(p)
    if scorer.n_rows == 0:
        raise ValueError("the cache's held-out split is empty: rebuild it with cache.py --heldout")
    return stats, expl, effects, scorer


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


# -----------------------------------------------------------------------------
# output side: direct logit effects
@torch.no_grad()
def mean_ln_f_scale(model, tok, pos, bos, max_contexts=8):
    """Mean over tokens of ln_f's 1/sqrt(var + eps), on the first whole contexts of the cache (rows
    of contexts [BOS, t1, ...], the BOS row often dropped: pos restarts at each)."""
    starts = [0] + ((pos[1:] <= pos[:-1]).nonzero().flatten() + 1).tolist() + [len(pos)]
    # whole contexts: from a BOS (or the row after it), as long as the first
    spans = [(a, b) for a, b in zip(starts, starts[1:]) if pos[a] <= 1 and b - a == starts[1]]
    if not spans:
        raise ValueError("no whole context in the cache's first chunk: cannot measure ln_f's scale")
    idx = torch.stack([tok[a:b].cpu() for a, b in spans[:max_contexts]])  # (B, T)
    if pos[0] == 1:  # the BOS was dropped: put it back
        idx = torch.cat([torch.full((len(idx), 1), bos), idx], 1)
    _, acts = model.run_with_acts(idx[:, : model.config.n_ctx])
    return acts.frozen.ln_f[:, 1:].mean().item()  # not the BOS: its activations are outliers


@torch.no_grad()
def logit_effects(clt, model, ln_scale, n, n_vocab, batch=1024):
    """Direct logit effect of every feature: (promoted values, ids, suppressed values, ids, the
    promoted values' z-scores over the vocabulary), (M, n) each.

    v = the feature's writes into mlp_out[l:] at activation 1 (clt.decoder_writes), summed; through
    ln_f at its mean scale it moves the logits by ((v - mean(v)) · scale · γ) @ W_U[:n_vocab]^T
    (Llama's RMSNorm: v · scale · γ)."""
    ids = torch.arange(clt.config.n_features, device=clt.W_dec[0].device)
    ones = torch.ones(len(ids), device=ids.device)
    per_layer = [clt.decoder_writes(l, ids, ones).sum(1) for l in range(clt.config.n_layers)]
    v = torch.cat(per_layer).float().cpu()  # (M, d) each feature's total write into the residual
    if model.centers:  # LayerNorm centers, Llama's RMSNorm does not
        v = v - v.mean(-1, keepdim=True)
    v = v * ln_scale * model.ln_f.weight
    parts = []
    for i in range(0, len(v), batch):
        eff = v[i : i + batch] @ model.unembedding()[:n_vocab].T  # (b, V)
        tv, ti = eff.topk(n, dim=1)
        bv, bi = (-eff).topk(n, dim=1)
        z = (tv - eff.mean(1, keepdim=True)) / eff.std(1, keepdim=True)  # over the vocabulary
        parts.append((tv, ti, -bv, bi, z))
    return [torch.cat(x) for x in zip(*parts)]


# -----------------------------------------------------------------------------
# explanations: built from the train counts alone
def explain_all(stats, effects, enc):
    """Per feature: the explanation string, its n-grams (as text, and as keys by train precision),
    the input_ngrams, and the short label: what tells it apart (distinctive) -> clearly promoted."""
    cfg = stats.cfg
    g, c, C, bounds = gram_table(stats)
    n_fires = stats.n_fires.cpu().numpy()
    promoted, z = effects[1], effects[4]  # (M, n) each: logit_effects' promoted ids, z-scores
    out = []
    for m in range(stats.L * stats.F):
        gm, cm, Cm = (x[bounds[m] : bounds[m + 1]] for x in (g, c, C))
        chosen = choose_ngrams(gm, cm, Cm, n_fires[m], cfg.max_terms, stats.base) if len(gm) else []
        pmi = np.log(cm / Cm * (stats.n_rows / max(n_fires[m], 1)))  # log P(gram | fires) / P(gram)
        top = np.lexsort((-cm, -pmi))[: cfg.n_input]  # by PMI, ties (often) by count
        txt = {i: decode_gram(int(gm[i]), stats.base, enc) for i in [*top, *chosen]}
        inp = zip(top, cm[top].tolist(), Cm[top].tolist(), pmi[top].tolist())  # n fires, N occurs
        inputs = [
            dict(ngram=txt[i], count=n, corpus_count=N, pmi=round(x, 3)) for i, n, N, x in inp
        ]
        names = [txt[i] for i in sorted(chosen, key=lambda i: -cm[i])]
        promotes = [enc.decode([int(t)]) for t in promoted[m][: cfg.n_explain_logit]]
        more = f" (+{len(names) - cfg.show_terms} more)" if len(names) > cfg.show_terms else ""
        quoted = [json.dumps(n, ensure_ascii=False) for n in names[: cfg.show_terms]]
        text = "fires on " + (", ".join(quoted) + more if names else "no frequent n-gram")
        text += " | promotes " + ", ".join(json.dumps(t, ensure_ascii=False) for t in promotes)
        text = "dead" if n_fires[m] == 0 else text
        keys = [int(gm[i]) for i in chosen]  # most precise first: the scorer's ranking
        rate = n_fires[m] / stats.n_rows
        said = distinctive(gm, cm, Cm, rate, cfg.n_label, stats.base) if len(gm) else []
        clear = promoted[m][z[m] >= cfg.clear_logit][: cfg.n_explain_logit]
        grams = [decode_gram(int(gm[i]), stats.base, enc) for i in said]
        label = "dead" if n_fires[m] == 0 else label_text(grams, clear.tolist(), enc)
        out.append(dict(explanation=text, explanation_ngrams=names, input_ngrams=inputs, keys=keys))
        out[-1].update(label=label, label_ngrams=grams)
    return out


def distinctive(grams, c, C, rate, k, base):
    """Up to k n-grams, none nested in another, that the feature fires on more than the corpus
    does: the precision p = (c + 1) / (C + 1 / rate), shrunk toward the base rate by one
    pseudo-firing (smoothed, so a rare n-gram needs support), at least rate^(1/3) (two thirds of
    the way from the base rate to always, in log-lift), ranked by support-weighted log-lift
    c·log(p / rate) (a KL term; Monroe et al. 2008's smoothed log-odds). Indices, best first."""
    lift = np.log((c + 1) / (C + 1 / rate) / rate)
    score = np.where(lift >= 2 / 3 * np.log(1 / rate), c * lift, 0.0)
    mod = base ** n_digits(grams, base)
    out = []
    for j in np.argsort(-score, kind="stable")[: 4 * k]:
        nested = [(grams[j] % mod[i] == grams[i]) | (grams[i] % mod[j] == grams[j]) for i in out]
        if score[j] > 0 and not any(nested):
            out.append(int(j))
    return out[:k]


def choose_ngrams(grams, c, C, n_fires, max_terms, base):
    """Greedily pick up to max_terms n-grams maximizing the train F1 of "one of them ends here".

    grams, c, C: numpy arrays of the candidates' keys, firings on them and corpus occurrences. Two
    n-grams ending at one token both match it only if one is a suffix of the other, so once a gram
    is chosen the grams nested with it leave the pool: the chosen ones match disjoint tokens and
    their counts add up. Returns indices into grams, most precise first."""
    pool = np.argsort(-2 * c / (C + n_fires), kind="stable")[: 4 * max_terms]  # the best alone
    g, c, C = (x[pool] for x in (grams, c, C))
    mod = base ** n_digits(g, base)  # g % mod[j] == grams[j] iff grams[j] is a suffix of g
    left = np.ones(len(pool), dtype=bool)
    chosen = []
    tp = pp = 0  # firings on the chosen grams, their occurrences
    best = 0.0
    while left.any() and len(chosen) < max_terms:
        f1 = np.where(left, 2 * (tp + c) / (pp + C + n_fires), -1.0)
        j = int(f1.argmax())
        if f1[j] <= best:
            break
        chosen.append(j)
        tp += c[j]
        pp += C[j]
        best = f1[j]
        left &= (g % mod[j] != g[j]) & (g[j] % mod != g)  # drop the grams nested with it
    return [int(pool[j]) for j in sorted(chosen, key=lambda j: -c[j] / C[j])]


def gram_table(stats):
    """The n-grams with at least min_count firings: numpy (gram, count, corpus count) sorted by
    feature, and each feature's bounds in them."""
    keys, counts = stats.grams.merge()
    M = stats.L * stats.F
    m = keys // stats.gram_space
    g = keys % stats.gram_space
    corpus = m == M  # the pseudo-feature that counts every occurrence, sorted by gram
    sel = ~corpus & (counts >= stats.cfg.min_count)
    C = counts[corpus][torch.searchsorted(g[corpus], g[sel])]  # a gram a feature fires on occurs
    m, g, c = (x[sel] for x in (m, g, counts))
    bounds = torch.searchsorted(m, torch.arange(M + 1, device=m.device))
    return [x.cpu().numpy() for x in (g, c, C, bounds)]


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

    def update(self, p: Padded):
        cfg = self.stats.cfg
        T = cfg.max_terms
        F_ = self.stats.F
        keys = ngram_keys(p, cfg.max_ngram, self.stats.base)[p.lo : p.hi]  # (N, n)
        self.n_rows += p.hi - p.lo
        for l in range(self.stats.L):  # a layer at a time: (N, F) memory
            sl = slice(l * F_, (l + 1) * F_)
            fire_ext = p.acts[:, sl] > 0  # (E, F)
            fire = fire_ext[p.lo : p.hi].long()  # (N, F)
            m = torch.arange(sl.start, sl.stop, device=fire.device)  # (F,)
            level = torch.full(fire.shape, T, dtype=torch.long, device=fire.device)
            for j in range(keys.size(1)):  # the n-gram of each length ending at each row
                q = m * self.stats.gram_space + keys[:, j : j + 1]  # (N, F) (feature, gram) keys
                i = torch.searchsorted(self.ekeys, q)
                hit = (self.ekeys[i] == q) & (keys[:, j : j + 1] >= 0)
                level = torch.where(hit, self.elevel[i], level)
            f_idx = m - sl.start
            idx = ((f_idx * (T + 1) + level) * 2 + fire).flatten()
            self.det[sl].view(-1).index_add_(0, idx, torch.ones_like(idx))
            near = near_firing(fire_ext, p.doc, cfg.fuzz_window, p.lo, p.hi)  # (N, F)
            idx = ((f_idx * 2 + (level < T).long()) * 2 + fire)[near]
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
# main
def load_inputs(cfg):
    """The GPT, its tokenizer, the CLT and the cache; refuses a CLT or cache of another model."""
    model_dir = cfg.model or ActivationCache(cfg.cache).manifest["model"]
    model = load_model(model_dir)
    enc = load_tokenizer(model_dir)
    cache = ActivationCache(cfg.cache, model=model)  # checks the model's sha256 (manifest)
    clt = CrossLayerTranscoder.from_pretrained(cfg.clt).to(cfg.device)
    check_clt(clt.config, cache, model, model_dir, cfg)
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
    concepts = (None, None)  # (per feature, summary["concepts"])
    if world is not None:
        build = partial(concept_cache, model_dir, model, cfg)
        concepts = toy_world_concepts(model, enc, clt, cache, world, cfg, build)
    return write_outputs(cfg, enc, stats, expl, effects, scorer, concepts, cache, seconds)


def main(argv=None):
    cfg = parse_config(__doc__, InterpConfig, argv)
    with files.one_writer(cfg.out, "interp.py"):  # one run at a time in a folder (forge/files.py)
        summary = run(cfg)
    shown = {k: v for k, v in summary.items() if k not in ("config", "concepts")}
    print(json.dumps(shown, indent=1))
    if "concepts" in summary:
        print(concept_table(summary["concepts"]))


if __name__ == "__main__":
    run_main(main)

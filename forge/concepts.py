"""
forge/concepts.py: interp.py's toy-world study, every feature scored against planted ground truth.

On the toy world (a model directory with forge/toyworld.py's world.json) features are scored on a
labeled evaluation set giving every concept of every label family --concept-support tokens:

    toyworld.eval_corpus -> OUT/concept_cache.jsonl -> build(...) -> OUT/concept_cache
      -> ConceptLabels (toyworld.label_tokens per row) -> score_concepts (one pass, every set)
      -> best_features, family_table, headline -> summary.json "concepts", features.jsonl concept_*

A concept (>= --min-support tokens) is recovered when a feature's "fires" (activation > 0) has F1
>= --concept-f1 on its tokens; the headline: the share recovered and the mean best F1 over
--families. Baselines, scored the same way: the MLP neurons, a random CLT as dense as the trained
one, the token oracle. summary.json "concepts": eval_set, f1_threshold, min_support, families, n,
recovered, share_recovered, mean_best_f1 (the headline), by_family {family: kind, concepts,
recovered, share, mean_best_f1, unscored}, per_concept {label: support, layer, feature, f1,
precision, recall}, baselines {mlp_neurons, random_clt, token_identity: the headline, features,
by_family}. Nothing here imports the spine: interp.py passes in the model, CLT, cache, a builder.
"""

import contextlib
import json
import math
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch.nn.functional import one_hot
from tqdm import tqdm

from forge import toyworld
from forge.files import atomic_path
from forge.interpfile import r4


def toy_world_concepts(model, enc, clt, cache, world, cfg, build):
    """Score the CLT, the MLP neurons, a random CLT of its size and the token oracle on the labeled
    evaluation set: (per_feature of the CLT, summary["concepts"]). build(fields, stale): the set's
    cache from CacheConfig fields (corpus, tokens, ctx, keep_bos, dtype, out); stale: rebuild it."""
    ccache = concept_cache(world, enc, cache.manifest, cfg, build)
    labels = ConceptLabels(ccache, world, enc, cfg)
    sets = {"clt": partial(clt_acts, clt)}
    if cfg.baselines:
        chunks = cache.iter_chunks(cfg.chunk_size, split="train", device=cfg.device)
        with contextlib.closing(chunks):
            sample = next(iter(chunks))[0].float()  # training rows: the random CLT's thresholds
        sets["mlp_neurons"] = partial(neuron_preacts, model.to(cfg.device))
        sets["random_clt"] = partial(clt_acts, random_like(clt, sample))
    n_vocab = model.config.vocab_size if cfg.baselines else 0
    scores = score_concepts(sets, ccache, labels, cfg, n_vocab)
    n_per_layer = dict(mlp_neurons=4 * model.config.n_embd, token_identity=n_vocab)
    eval_set = dict(kind="toyworld.eval_corpus", seed=cfg.concept_seed, support=cfg.concept_support)
    n_labeled = int(labels.labeled.sum())
    eval_set.update(cache=ccache.path, tokens=ccache.n_tokens, labeled_tokens=n_labeled)
    out = dict(eval_set=eval_set, f1_threshold=cfg.concept_f1, min_support=cfg.min_support)
    out.update(families=cfg.families)
    per_feature = {}
    baselines = {}
    for name, s in scores.items():
        n_features = n_per_layer.get(name, clt.config.n_features)
        per_concept, per_feature[name] = best_features(s, labels, n_features, cfg)
        table = family_table(per_concept, labels, s, cfg)
        if name == "clt":
            out.update(headline(table, cfg), by_family=table, per_concept=per_concept)
        else:
            baselines[name] = dict(headline(table, cfg), features=len(s.n_fires), by_family=table)
    out["baselines"] = baselines
    return per_feature["clt"], out


def concept_cache(world, enc, manifest, cfg, build):
    """The evaluation set (toyworld.eval_corpus) cached as the training cache was (ctx, dtype, BOS):
    --concept-cache or OUT/concept_cache, reused while its documents and identity are the same."""
    out = cfg.concept_cache or os.path.join(cfg.out, "concept_cache")
    docs = toyworld.eval_corpus(world, cfg.concept_seed, cfg.concept_support)
    text = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    corpus = out.rstrip("/") + ".jsonl"  # beside the cache: cache.py refuses foreign files in it
    stale = not os.path.exists(corpus) or Path(corpus).read_text(encoding="utf-8") != text
    if stale:
        os.makedirs(os.path.dirname(os.path.abspath(corpus)), exist_ok=True)
        with atomic_path(corpus) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    stream = sum(len(t) + 1 for t in enc.encode_ordinary_batch(docs))  # + <|endoftext|> after each
    ctx = manifest["ctx"]
    rows = stream // (ctx - 1) * (ctx - (0 if manifest["keep_bos"] else 1))  # whole contexts only
    fields = {k: manifest[k] for k in ("ctx", "keep_bos", "dtype")}  # the training cache's
    return build(dict(corpus=corpus, tokens=rows, **fields, out=out), stale)


# -----------------------------------------------------------------------------
# labels and counts
class ConceptLabels:
    """Per row of a cache split, the toy world's labels (toyworld.label_tokens), stored sparsely.
    As the model saw it, each run of rows of one document inside one context (a document cut by a
    context boundary gives two runs) is decoded and labeled alone; a run whose re-encoding differs
    from its tokens is left unlabeled (not scored)."""

    def __init__(self, cache, world, enc, cfg, split="all"):
        rows = [chunk[2:] for chunk in cache.iter_chunks(cfg.chunk_size, split=split)]
        tok, doc, pos = (torch.cat(x) for x in zip(*rows))
        cut = (doc[1:] != doc[:-1]) | (pos[1:] != pos[:-1] + 1)  # a new document or a new context
        bounds = [0] + (cut.nonzero().flatten() + 1).tolist() + [len(tok)]
        index = {}  # label -> its column
        pairs = []
        self.labeled = torch.zeros(len(tok), dtype=torch.bool)
        runs = tqdm(zip(bounds[:-1], bounds[1:]), total=len(bounds) - 1, desc="concept labels")
        for a, b in runs:
            ids = tok[a:b].tolist()
            text = enc.decode(ids)
            if enc.encode(text, allowed_special="all") != ids:
                continue
            self.labeled[a:b] = True
            for r, labels in enumerate(toyworld.label_tokens(text, enc, world)):
                pairs += [(a + r, index.setdefault(name, len(index))) for name in labels]
        self.names = list(index)
        self.pairs = torch.tensor(pairs, dtype=torch.long).view(-1, 2)  # (row, concept), by row
        first = self.pairs[:, 0].contiguous()
        self.row_starts = torch.searchsorted(first, torch.arange(len(tok) + 1))  # (N + 1,)

    def rows(self, lo, hi, device):
        """Rows [lo, hi) of the split: (sparse labels (C, N), labeled mask (N,))."""
        p = self.pairs[self.row_starts[lo].item() : self.row_starts[hi].item()]
        idx = torch.stack([p[:, 1], p[:, 0] - lo])  # (2, nnz): concept, row
        shape = (len(self.names), hi - lo)
        lab = torch.sparse_coo_tensor(idx, torch.ones(len(p)), shape, check_invariants=False)
        return lab.to(device), self.labeled[lo:hi].to(device)


class ConceptScores:
    """Per concept and feature, counts of "fires" (activation > 0) on labeled rows: on the concept's
    tokens (tp, (C, M)), anywhere (n_fires, (M,)); and each concept's tokens (support, (C,))."""

    def __init__(self, C, M, device):
        self.tp = torch.zeros(C, M, device=device)  # exact: float32 counts below 2^24 rows
        self.n_fires = torch.zeros(M, device=device)
        self.support = torch.zeros(C, device=device)

    def update(self, acts, labels, labeled):
        """acts (N, M) of one chunk; labels (C, N) sparse and labeled (N,) as ConceptLabels.rows."""
        fire = ((acts > 0) & labeled[:, None]).float()  # (N, M)
        self.tp += torch.sparse.mm(labels, fire)
        self.n_fires += fire.sum(0)
        self.support += torch.sparse.sum(labels, 1).to_dense()

    def f1(self):
        """(precision, recall, F1), each (C, M) float64 on the CPU."""
        tp, nf, n = (x.double().cpu() for x in (self.tp, self.n_fires, self.support[:, None]))
        return tp / nf.clamp(min=1), tp / n.clamp(min=1), 2 * tp / (nf + n).clamp(min=1)


@torch.no_grad()
def score_concepts(feature_sets, cache, labels, cfg, n_vocab=0):
    """One pass over the labeled cache: {name: ConceptScores} of each feature set {name: fn(mlp_in)
    -> acts (N, M)}, and with n_vocab > 0 of the token oracle "token_identity" (feature t fires on
    token t). Its best F1 is a pure token detector's: ~1 for an entity (every name is one token),
    ~0 for a latent or output concept (their tokens, "is", "speaks", "to", are shared by all)."""
    scores = {}
    row = 0
    sets = dict(feature_sets, token_identity=None) if n_vocab else feature_sets
    lo, hi = cache.split_range("all")
    chunks = cache.iter_chunks(cfg.chunk_size, split="all", device=cfg.device)
    chunks = tqdm(chunks, total=-(-(hi - lo) // cfg.chunk_size), desc="concept pass")
    for mlp_in, _, tok, _, _ in chunks:
        lab, labeled = labels.rows(row, row + len(tok), cfg.device)
        x = mlp_in.float()  # (N, L, d)
        for name, fn in sets.items():
            acts = one_hot(tok.long(), n_vocab).float() if fn is None else fn(x)  # (N, M)
            if name not in scores:
                scores[name] = ConceptScores(len(labels.names), acts.size(1), cfg.device)
            scores[name].update(acts, lab, labeled)
        row += len(tok)
    return scores


# -----------------------------------------------------------------------------
# the feature sets: the CLT and its baselines
def clt_acts(clt, mlp_in):
    """A CLT's feature activations, mlp_in (N, L, d) -> (N, L·F); feature m = layer·F + f."""
    return clt.encode(mlp_in).flatten(1)


def neuron_preacts(model, mlp_in):
    """The model's MLP neurons as features, mlp_in (N, L, d) -> pre-activations (N, L·4d): one
    "fires" where its GELU input is > 0 (GELU is positive exactly there), no threshold to choose."""
    return torch.cat([block.mlp.c_fc(mlp_in[:, l]) for l, block in enumerate(model.h)], 1)


@torch.no_grad()
def random_like(clt, mlp_in, seed=1):
    """The random baseline: a CLT of the same size, freshly initialised (another seed), whose
    features fire on mlp_in (N, L, d) as often as the trained CLT's of their layer on average (each
    bias at its own quantile). TopK keeps its k; any other activation becomes a JumpReLU."""
    c = clt.config
    activation = "topk" if c.activation == "topk" else "jumprelu"
    rand = type(clt)(replace(c, activation=activation), seed=seed).to(mlp_in.device)
    if c.activation == "topk":
        return rand
    N = len(mlp_in)
    density = (clt.encode(mlp_in) > 0).float().mean((0, 2))  # (L,) the trained CLT's firing rate
    pre = rand.pre_acts(mlp_in)  # (N, L, F)
    eps = 1e-6
    for l in range(c.n_layers):
        k = int(N * (1 - density[l])) if density[l] > 0 else N  # fires above its k-th smallest
        rand.b_enc[l] += eps - pre[:, l].kthvalue(max(k, 1), dim=0).values
    rand.log_threshold.fill_(math.log(eps / 2))
    return rand


# -----------------------------------------------------------------------------
# tables: best feature per concept, per family, the headline
def best_features(scores: ConceptScores, labels, n_per_layer, cfg):
    """Per concept with >= min_support tokens: its best feature by F1 {support, layer, feature, f1,
    precision, recall}; and per feature its best concept (the features.jsonl keys)."""
    precision, recall, f1 = scores.f1()  # (C, M)
    per_concept = {}
    for c, m in enumerate(f1.argmax(1).tolist()):
        n = int(scores.support[c])
        if n >= cfg.min_support:
            layer, feature = divmod(m, n_per_layer)
            p, r, f = (r4(x[c, m]) for x in (precision, recall, f1))
            best = dict(support=n, layer=layer, feature=feature, f1=f, precision=p, recall=r)
            per_concept[labels.names[c]] = best
    per_feature = []
    for m, c in enumerate(f1.argmax(0).tolist()):
        p, r, f = (r4(x[c, m]) for x in (precision, recall, f1))
        best = dict(concept=labels.names[c], concept_precision=p, concept_recall=r, concept_f1=f)
        per_feature.append(best)
    return per_concept, per_feature


def family_table(per_concept, labels, scores, cfg):
    """{family: {kind, concepts, recovered, share, mean_best_f1, unscored}}: recovered = best F1 >=
    concept_f1; unscored = the family's labels with fewer than min_support tokens (not counted)."""
    out = {}
    for name, n in zip(labels.names, scores.support.tolist()):
        family = toyworld.family_of(name)
        kind = toyworld.FAMILIES.get(family, "other")
        empty = dict(kind=kind, concepts=0, recovered=0, share=None, mean_best_f1=None, unscored=0)
        fam = out.setdefault(family, dict(empty, f1s=[]))
        if n < cfg.min_support:
            fam["unscored"] += 1
            continue
        fam["concepts"] += 1
        fam["recovered"] += per_concept[name]["f1"] >= cfg.concept_f1
        fam["f1s"].append(per_concept[name]["f1"])
    for fam in out.values():
        f1s = fam.pop("f1s")
        if f1s:
            fam.update(share=r4(fam["recovered"] / len(f1s)), mean_best_f1=r4(sum(f1s) / len(f1s)))
    return dict(sorted(out.items()))


def headline(table, cfg):
    """The share and mean best F1 over the concepts of --families together (each counts once)."""
    fams = [table[f] for f in cfg.families.split(",") if f in table and table[f]["concepts"]]
    n = sum(f["concepts"] for f in fams)
    rec = sum(f["recovered"] for f in fams)
    mean = sum(f["mean_best_f1"] * f["concepts"] for f in fams) / max(n, 1)
    return dict(n=n, recovered=rec, share_recovered=r4(rec / max(n, 1)), mean_best_f1=r4(mean))


def share_cell(fam):
    """A family_table row (or None) as "share recovered % / mean best F1"."""
    f = fam or {}
    return f"{100 * (f.get('share') or 0):.1f} % / {f.get('mean_best_f1') or 0:.2f}"


def concept_rows(c):
    """summary["concepts"] as rows, one per scored family and one for the headline: the CLT's and
    each baseline's "share recovered / mean best F1" (the feature index shows them too: viz.py)."""
    sets = {"CLT": c, **c["baselines"]}
    rows = []
    for name, fam in c["by_family"].items():
        if fam["kind"] != "structure" and fam["concepts"]:
            cells = {label: share_cell(s["by_family"].get(name)) for label, s in sets.items()}
            rows.append(dict(family=name, kind=fam["kind"], concepts=fam["concepts"], **cells))
    head = dict(family=c["families"], kind="headline", concepts=c["n"])
    for label, s in sets.items():
        head[label] = share_cell(dict(share=s["share_recovered"], mean_best_f1=s["mean_best_f1"]))
    return rows + [head]


def concept_table(c):
    """summary["concepts"] as a markdown table (concept_rows)."""
    rows = concept_rows(c)
    title = f"toy-world concepts recovered by a feature with F1 >= {c['f1_threshold']}"
    lines = [title + ": share / mean best F1"]
    lines += ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    return "\n".join(lines)

"""
forge/interpfile.py: what interp.py streams in, keeps in bounded memory, and writes out.

In: padded_chunks (each encoded chunk between `before` rows of the past and the rows ahead);
check_clt refuses a CLT and a cache of different models. Kept: ngram_keys (an n-gram as one int64),
SparseCounter ((feature, n-gram) counts), merge_top (per feature the k firings of largest key, with
their context). Out (write_outputs, in --out): features.jsonl, one object per feature in (layer,
feature) order: layer, feature, density and n_fires (acts > 0, train split), mean_act, max_act,
quantiles {"q10", ..., "q99"} and hist {"edges", "counts"} (log2 bins) when active, top_examples
and quantile_examples (+ "quantile") [{"act", "doc", "pos", "tokens", "acts", "center": the firing
token's index}], promoted and suppressed [{"token", "logit"}], each score of SCORES (null:
undefined), heldout_density, explanation, explanation_ngrams, input_ngrams [{"ngram", "count",
"corpus_count", "pmi"}]; on the toy world concept, concept_precision, concept_recall, concept_f1
(its best concept). summary.json: per_layer dead / dense / live / interpretable counts,
share_live_detection_above (AUROC >= --interpretable), each score's quantiles, seconds_passes (and
the plain-read ratio with --time-read); on the toy world "concepts" (forge/concepts.py lists its
keys). summary.png: four small plots of the summary. Nothing here imports the spine.
features.jsonl also holds each feature's short label and label_ngrams (its input side): label_text.
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from forge.files import atomic_path, check_committed, check_finite, check_same_model, commit
from forge.files import new_run_id, read_manifest, transcoder_id, write_json

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


# -----------------------------------------------------------------------------
# in: the cache, streamed with context
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


@torch.no_grad()
def padded_chunks(clt, cache, split, cfg):
    """Encode each chunk once; yield it between the `before` rows before it and the rows after."""
    ahead = max(cfg.after, cfg.fuzz_window)  # the future rows that examples and fuzzing need
    lo, hi = cache.split_range(split)
    chunks = cache.iter_chunks(cfg.chunk_size, split=split, device=cfg.device)
    tail = prev = None
    for chunk in tqdm(chunks, total=-(-(hi - lo) // cfg.chunk_size), desc=f"{split} pass"):
        mlp_in, _, tok, doc, pos = chunk  # cache.ActivationCache.iter_chunks: rows in order
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
        ok = (p.doc[j:] == p.doc[:-j]) & (p.pos[j:] == p.pos[:-j] + j) & (keys[j:, j - 1] >= 0)
        keys[j:, j] = torch.where(ok, keys[j:, j - 1] + (p.tok[:-j] + 1) * base**j, -1)
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
        self.parts = []  # (keys, counts) per chunk; after a merge the first is all merged so far
        self.n_merged = 0
        self.max_pairs = max_pairs
        self.pruned_below = 0

    def add(self, keys):
        self.parts.append(keys.unique(return_counts=True))
        if sum(len(k) for k, _ in self.parts) - self.n_merged > max(1 << 20, self.n_merged):
            self.merge()

    def merge(self):
        """-> (keys (K,) sorted, counts (K,)) of everything added so far."""
        keys, inv = torch.cat([k for k, _ in self.parts]).unique(return_inverse=True)  # sorted
        counts = torch.zeros_like(keys).index_add_(0, inv, torch.cat([c for _, c in self.parts]))
        while len(keys) > self.max_pairs:
            self.pruned_below += 1
            keys = keys[counts > self.pruned_below]
            counts = counts[counts > self.pruned_below]
        self.parts = [(keys, counts)]
        self.n_merged = len(keys)
        return keys, counts


def empty_top(M, k, W, device):
    """An empty store for merge_top: k slots per feature, key 0 = empty, windows of W tokens."""
    store = {n: torch.zeros(M, k, device=device) for n in ("key", "act")}
    store.update({n: torch.zeros(M, k, dtype=torch.int32, device=device) for n in ("doc", "pos")})
    store.update(win_tok=torch.full((M, k, W), -1, dtype=torch.int32, device=device))
    store.update(win_act=torch.zeros(M, k, W, device=device))
    return store


def merge_top(store, m, r, key, p, cfg):
    """Keep, per feature, the k firings of largest `key` seen so far, with their context windows.

    store: empty_top's (M, k, ...) tensors, sorted by key. m, r, key: (nnz,) the chunk's firings:
    feature, row - lo, key > 0. Only those above their feature's k-th best are candidates."""
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


# -----------------------------------------------------------------------------
# out: the checks, features.jsonl, summary.json, summary.png
def check_clt(c, cache, model, model_dir, cfg):
    """Refuse a CLT (config c) and a cache of different models: by shapes, then by the fingerprint
    the CLT records (train.py) or else by the model directory it names."""
    if c.input_hook != "mlp_in":  # cache.py stores mlp_in (ln_2's output) only
        raise ValueError(f"CLT {cfg.clt} reads {c.input_hook}, the cache holds mlp_in only")
    if (c.n_layers, c.d_model) != (cache.n_layers, cache.d_model):
        shapes = f"{c.n_layers}, {c.d_model} and {cache.n_layers}, {cache.d_model}"
        msg = f"CLT {cfg.clt} and cache {cfg.cache} come from different models"
        raise ValueError(f"{msg} (n_layers, d_model = {shapes})")
    if c.model_sha256:
        check_same_model(model, c.model_sha256, f"the CLT {cfg.clt}")
    elif c.model and os.path.realpath(c.model) != os.path.realpath(model_dir):
        msg = f"CLT {cfg.clt} was trained on model {c.model!r} but cache {cfg.cache} comes from"
        raise ValueError(f"{msg} {model_dir!r}: pass a CLT and a cache of the same model")


def write_outputs(cfg, enc, stats, expl, effects, scorer, concepts, cache, seconds):
    """features.jsonl (whole or not at all: viz.py reads it), summary.png, then summary.json (it
    marks a complete run); returns the summary. concepts: (per feature, summary["concepts"]), or
    (None, None) off the toy world."""
    scores = scorer.results()  # {name: (M,)}
    where = f"interp's statistics of the CLT {cfg.clt} on the cache {cfg.cache}"
    check_finite(dict(activations=stats.sum_act, logits=effects[0]), where)  # no NaN explained
    run_id = new_run_id()
    os.makedirs(cfg.out, exist_ok=True)
    heldout_density = (scorer.det[..., 1].sum(-1).cpu() / scorer.n_rows).tolist()  # firings/tokens
    pv, pi, sv, si = (x.tolist() for x in effects[:4])
    logits = dict(promoted=(pv, pi), suppressed=(sv, si))
    score_lists = {name: x.tolist() for name, x in scores.items()}
    n_fires = stats.n_fires.tolist()
    sum_act = stats.sum_act.tolist()
    hist = stats.hist.cpu()
    top, sampled = ({k: v.cpu() for k, v in t.items()} for t in (stats.top, stats.sampled))
    nq = cfg.n_quantile_examples
    text_keys = ("explanation", "explanation_ngrams", "input_ngrams", "label", "label_ngrams")
    with atomic_path(os.path.join(cfg.out, "features.jsonl")) as tmp, open(tmp, "w") as fh:
        for m in tqdm(range(stats.L * stats.F), desc="features.jsonl"):
            n = n_fires[m]
            h, qs = hist_summary(hist[m], cfg)
            rec = dict(layer=m // stats.F, feature=m % stats.F, density=n / stats.n_rows, n_fires=n)
            rec.update(mean_act=r4(sum_act[m] / max(n, 1)), max_act=r4(top["act"][m, 0]))
            rec.update(quantiles=qs, hist=h, top_examples=examples(top, m, enc, cfg.before))
            rec.update(quantile_examples=examples(sampled, m, enc, cfg.before, nq))
            for k, (v, ids) in logits.items():
                rec[k] = [dict(token=enc.decode([i]), logit=r4(x)) for x, i in zip(v[m], ids[m])]
            rec.update({name: r4(x[m]) for name, x in score_lists.items()})
            rec.update(heldout_density=heldout_density[m], **{k: expl[m][k] for k in text_keys})
            rec.update(concepts[0][m] if concepts[0] else {})
            rec.update(run_id=run_id)
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    summary = summarize(stats, scores, cfg)
    summary.update({} if concepts[1] is None else dict(concepts=concepts[1]))
    summary.update(n_heldout_tokens=scorer.n_rows, seconds_passes=round(seconds, 3))
    summary.update(config=asdict(cfg))
    if cfg.time_read:  # one plain read of the whole cache, for the cost ratio
        t = time.perf_counter()
        for _ in cache.iter_chunks(cfg.chunk_size, split="all"):
            pass
        summary.update(seconds_plain_read=round(time.perf_counter() - t, 3))
        summary.update(ratio_to_plain_read=round(seconds / summary["seconds_plain_read"], 2))
    plot_summary(os.path.join(cfg.out, "summary.png"), stats, scores, summary)
    clt = dict(path=cfg.clt, export_id=transcoder_id(cfg.clt))  # which CLT this explains
    summary.update(run_id=run_id, clt=clt)
    write_json(os.path.join(cfg.out, "summary.json"), summary)
    commit(cfg.out, run_id, ["features.jsonl", "summary.json", "summary.png"], clt=clt)  # last
    return summary


# -----------------------------------------------------------------------------
# reading the outputs back: the run that wrote them, the transcoder they explain


def open_features(path, clt_id=None, clt=""):
    """The features.jsonl of interp output `path` (its folder or the file), checked: it is the one
    its folder's commit.json commits, not a killed run's; and, given the export id of the CLT it
    should explain (clt_id, of the CLT at `clt`), it explains that one. Output written before
    manifests passes, with a one-line warning when there was a CLT to check."""
    file = os.path.join(path, "features.jsonl") if os.path.isdir(path) else path
    folder = os.path.dirname(file) or "."
    rerun = f"python interp.py --out {folder}"
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no interp output {file}: write it with `{rerun}`")
    with open(file, "rb") as f:
        first = f.readline()
        f.seek(max(f.seek(0, os.SEEK_END) - 2**20, 0))
        last = f.read().rsplit(b"\n", 1)[-1]  # "" when the file ends a line, as interp.py's does
    if last.strip() and not is_json(last):  # a copy cut short
        raise ValueError(f"{file} is cut short (its last line is not whole): rerun `{rerun}`")
    run_id = json.loads(first).get("run_id") if first.strip().startswith(b"{") else None
    check_committed(file, run_id, rerun)
    made = (read_manifest(folder) or {}).get("clt")
    if made is None and clt_id:
        old = "was written before interp.py recorded its CLT"
        print(f"warning: {file} {old}: not checked against {clt}", file=sys.stderr)
    elif made and clt_id and made.get("export_id") not in (None, clt_id):
        theirs = f"the CLT {made['path']} (export {made['export_id'][:8]})"
        ours = f"the CLT {clt} (export {clt_id[:8]})"
        fix = f"pass the interp output of {clt}, or make it: python interp.py --clt {clt}"
        raise ValueError(f"{file} explains {theirs}, not {ours}: {fix}")
    return file


def is_json(text):
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def check_for_graph(path, given, meta):
    """Refuse interp output `path` named on purpose (given) but not there, or of another CLT than
    the graph's (graph.py's metadata `meta` records its export id); a default one may be absent."""
    if not os.path.exists(path):
        if given:
            raise FileNotFoundError(f"no interp output at --interp {path}: pass interp.py's --out")
        return
    info = meta.get("info") or {}
    if os.path.exists(os.path.join(path, "features.jsonl")):
        open_features(path, info.get("clt_export_id"), info.get("clt"))  # the graph's CLT


def label_text(grams, promoted, enc):
    """A feature's short label: the n-grams it fires on more than the corpus does -> the tokens it
    clearly promotes, e.g. '" Fafes", " Nu" → " Zefekic"' (either side may be empty)."""
    quoted = ", ".join(json.dumps(g, ensure_ascii=False) for g in grams)
    said = ", ".join(json.dumps(enc.decode([t]), ensure_ascii=False) for t in promoted)
    return f"{quoted} → {said}" if said else quoted or "(no distinctive n-gram)"


def examples(store, m, enc, before, n=None):
    """Feature m's valid entries of a top / sampled store as JSON-ready dicts, by activation.

    n: keep n of them at evenly spaced ranks (quantile examples), each with its "quantile"."""
    names = ("key", "act", "doc", "pos", "win_tok", "win_act")
    key, act, doc, pos, win_tok, win_act = (store[k][m].tolist() for k in names)
    keep = sorted((i for i in range(len(key)) if key[i] > 0), key=lambda i: -act[i])
    ranks = range(len(keep))
    if n is not None and keep:  # evenly spaced ranks; fewer when the reservoir holds fewer than n
        ranks = sorted({int((j + 0.5) * len(keep) / n) for j in range(n)})
    out = []
    for r in ranks:
        i = keep[r]
        inside = [j for j, t in enumerate(win_tok[i]) if t >= 0]  # the window in the same document
        tokens = [enc.decode([win_tok[i][j]]) for j in inside]
        acts = [r4(win_act[i][j]) for j in inside]
        ex = dict(act=r4(act[i]), doc=doc[i], pos=pos[i], tokens=tokens, acts=acts)
        q = {} if n is None else dict(quantile=round(1 - (r + 0.5) / len(keep), 3))
        out.append(dict(ex, center=inside.index(before), **q))
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
    bins = {q: torch.searchsorted(cum, q * cum[-1]).item() for q in QUANTILES}  # the q-th's bin
    qs = {f"q{round(q * 100)}": round(2 ** ((i + 0.5 - nb // 2) / bpo), 4) for q, i in bins.items()}
    return dict(edges=[round(e, 5) for e in edges[a : b + 1]], counts=counts[a:b].tolist()), qs


def r4(x):
    """A JSON-ready float: 4 decimals, NaN -> None, -0.0 -> 0.0."""
    x = float(x)
    return None if x != x else round(x, 4) + 0.0


# -----------------------------------------------------------------------------
# summary.json and summary.png
def summarize(stats, scores, cfg):
    """Counts per layer (dead / dense / interpretable) and the distribution of every score."""
    density = stats.n_fires.cpu() / stats.n_rows  # (M,)
    live = density > 0
    dense = density > cfg.dense
    good = live & (scores["detection_auroc"] >= cfg.interpretable)  # NaN compares False
    counts = dict(dead=~live, dense=dense, live=live, interpretable=good & ~dense)
    by_layer = torch.stack(list(counts.values()), 1).view(stats.L, stats.F, -1).sum(1).tolist()
    rows = [dict(layer=l, features=stats.F, **dict(zip(counts, n))) for l, n in enumerate(by_layer)]
    out = dict(n_train_tokens=stats.n_rows, per_layer=rows)
    out.update(detection_threshold=cfg.interpretable)
    out.update(share_live_detection_above=r4(good.sum() / live.sum().clamp(min=1)))
    for name, x in {**scores, "density": density}.items():  # the quantiles of the defined values
        x = x[live & ~x.isnan()].double()
        out[name] = {f"q{round(q * 100)}": r4(x.quantile(q)) for q in QUANTILES[:-1] if x.numel()}
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
    c = summary.get("concepts")
    if c:  # per family, each feature set's share of the planted concepts recovered
        names = [n for n, f in c["by_family"].items() if f["kind"] != "structure" and f["concepts"]]
        sets = {"CLT": c["by_family"], **{k: v["by_family"] for k, v in c["baselines"].items()}}
        width = 0.8 / len(sets)
        for i, (label, table) in enumerate(sets.items()):
            shares = [(table.get(n) or {}).get("share") or 0.0 for n in names]
            x = np.arange(len(names)) + (i - (len(sets) - 1) / 2) * width
            ax[1, 1].bar(x, shares, width, label=label)
        ticks = [f"{n}\n({c['by_family'][n]['concepts']})" for n in names]
        ax[1, 1].set_xticks(range(len(names)), ticks)
        title = f"planted concepts with a feature of F1 >= {c['f1_threshold']}"
        ax[1, 1].set(title=title, ylabel="share recovered", ylim=(0, 1.02))
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

"""
forge/interpfile.py: the files interp.py reads and writes.

check_clt refuses a CLT and a cache of different models. write_outputs writes, into --out:
features.jsonl, one object per feature in (layer, feature) order: layer, feature, density and
n_fires (acts > 0, train split), mean_act, max_act, quantiles {"q10", ..., "q99"} and hist {"edges",
"counts"} (log2 bins) when active, top_examples and quantile_examples (+ "quantile") [{"act", "doc",
"pos", "tokens", "acts", "center": the firing token's index}], promoted and suppressed [{"token",
"logit"}], each score of SCORES (null: undefined), heldout_density, explanation, explanation_ngrams,
input_ngrams [{"ngram", "count", "corpus_count", "pmi"}]; on the toy world concept,
concept_precision, concept_recall, concept_f1 (its best concept). summary.json: per_layer dead /
dense / live / interpretable counts, share_live_detection_above (AUROC >= --interpretable), each
score's quantiles, seconds_passes (and the plain-read ratio with --time-read); on the toy world
"concepts" (forge/concepts.py lists its keys). summary.png: four small plots of the summary.
"""

import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from forge.files import atomic_path, check_same_model, write_json

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def check_clt(clt_config, cache, model, model_dir, cfg):
    """Refuse a CLT and a cache of different models: their shapes, then the model's fingerprint
    the CLT records (train.py), or else the model directory it names."""
    c = clt_config
    if (c.n_layers, c.d_model) != (cache.n_layers, cache.d_model):
        raise ValueError(
            f"CLT {cfg.clt} (n_layers={c.n_layers}, d_model={c.d_model}) and cache {cfg.cache} "
            f"(n_layers={cache.n_layers}, d_model={cache.d_model}) come from different models"
        )
    if c.model_sha256:
        check_same_model(model, c.model_sha256, f"the CLT {cfg.clt}")
    elif c.model and os.path.realpath(c.model) != os.path.realpath(model_dir):
        raise ValueError(
            f"CLT {cfg.clt} was trained on model {c.model!r} but cache {cfg.cache} comes from "
            f"{model_dir!r}: pass a CLT and a cache of the same model"
        )


def write_outputs(cfg, enc, stats, expl, effects, scorer, concepts, cache, seconds):
    """features.jsonl, summary.png, then summary.json (it marks a complete run); returns the
    summary. concepts: (per feature, summary["concepts"]) on the toy world, else (None, None)."""
    scores = scorer.results()
    os.makedirs(cfg.out, exist_ok=True)
    density = scorer.det[..., 1].sum(-1).cpu() / scorer.n_rows  # held-out firings / tokens
    path = os.path.join(cfg.out, "features.jsonl")
    write_features(path, stats, expl, effects, scores, density, concepts[0], enc, cfg)
    summary = summarize(stats, scores, cfg)
    if concepts[1] is not None:
        summary["concepts"] = concepts[1]
    summary.update(n_heldout_tokens=scorer.n_rows, seconds_passes=round(seconds, 3))
    summary.update(config=asdict(cfg))
    if cfg.time_read:  # one plain read of the whole cache, for the cost ratio
        t = time.perf_counter()
        for _ in cache.iter_chunks(cfg.chunk_size, split="all"):
            pass
        summary.update(seconds_plain_read=round(time.perf_counter() - t, 3))
        summary.update(ratio_to_plain_read=round(seconds / summary["seconds_plain_read"], 2))
    plot_summary(os.path.join(cfg.out, "summary.png"), stats, scores, summary)
    write_json(os.path.join(cfg.out, "summary.json"), summary)
    return summary


# -----------------------------------------------------------------------------
# features.jsonl
def write_features(path, stats, expl, effects, scores, heldout_density, concepts, enc, cfg):
    """One JSON object per feature, keys as in the module docstring. scores: {name: (M,)}."""
    pv, pi, sv, si = (x.tolist() for x in effects)
    scores = {name: x.tolist() for name, x in scores.items()}
    heldout_density = heldout_density.tolist()
    n_fires = stats.n_fires.tolist()
    sum_act = stats.sum_act.tolist()
    hist = stats.hist.cpu()
    top, sampled = ({k: v.cpu() for k, v in t.items()} for t in (stats.top, stats.sampled))
    with atomic_path(path) as tmp, open(tmp, "w") as fh:  # whole or not at all: viz.py reads it
        for m in tqdm(range(stats.L * stats.F), desc="features.jsonl"):
            n = n_fires[m]
            h, qs = hist_summary(hist[m], cfg)
            rec = dict(layer=m // stats.F, feature=m % stats.F, density=n / stats.n_rows, n_fires=n)
            rec.update(mean_act=r4(sum_act[m] / max(n, 1)), max_act=r4(top["act"][m, 0]))
            rec.update(quantiles=qs, hist=h, top_examples=examples(top, m, enc, cfg.before))
            rec.update(
                quantile_examples=examples(sampled, m, enc, cfg.before, cfg.n_quantile_examples)
            )
            rec.update(promoted=token_logits(pv[m], pi[m], enc))
            rec.update(suppressed=token_logits(sv[m], si[m], enc))
            rec.update({name: r4(x[m]) for name, x in scores.items()})
            rec.update(heldout_density=heldout_density[m])
            rec.update(
                {k: expl[m][k] for k in ("explanation", "explanation_ngrams", "input_ngrams")}
            )
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
    nz = counts.nonzero().flatten()
    if nz.numel() == 0:
        return dict(edges=[], counts=[]), {}
    a = nz[0].item()
    b = nz[-1].item() + 1
    edges = [
        2 ** ((i - nb // 2) / cfg.bins_per_octave) for i in range(a, b + 1)
    ]  # bin i: [e_i, e_i+1)
    cum = counts.cumsum(0).double()
    qs = {}
    for q in QUANTILES:
        i = torch.searchsorted(cum, q * cum[-1]).item()
        qs[f"q{round(q * 100)}"] = round(
            2 ** ((i + 0.5 - nb // 2) / cfg.bins_per_octave), 4
        )  # centre
    return dict(edges=[round(e, 5) for e in edges], counts=counts[a:b].tolist()), qs


def r4(x):
    """A JSON-ready float: 4 decimals, NaN -> None, -0.0 -> 0.0."""
    x = float(x)
    return None if x != x else round(x, 4) + 0.0


def token_logits(values, ids, enc):
    """[{"token", "logit"}] of a feature's promoted or suppressed tokens."""
    return [dict(token=enc.decode([i]), logit=r4(x)) for x, i in zip(values, ids)]


# -----------------------------------------------------------------------------
# summary.json and summary.png
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


def plot_recovery(ax, c):
    """summary["concepts"] as bars on a matplotlib axis: per family, each set's share recovered."""
    names = [n for n, f in c["by_family"].items() if f["kind"] != "structure" and f["concepts"]]
    sets = {"CLT": c["by_family"], **{k: v["by_family"] for k, v in c["baselines"].items()}}
    width = 0.8 / len(sets)
    for i, (label, table) in enumerate(sets.items()):
        shares = [(table.get(n) or {}).get("share") or 0.0 for n in names]
        x = np.arange(len(names)) + (i - (len(sets) - 1) / 2) * width
        ax.bar(x, shares, width, label=label)
    ax.set_xticks(range(len(names)), [f"{n}\n({c['by_family'][n]['concepts']})" for n in names])
    title = f"planted concepts with a feature of F1 >= {c['f1_threshold']}"
    ax.set(title=title, ylabel="share recovered", ylim=(0, 1.02))

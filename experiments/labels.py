"""
experiments/labels.py: do a graph's feature labels tell its features apart? LLM-free, on a trained
CLT of models/tiny and its interp.py run (python demo.py makes both): the pruned graph of the demo's
prompt and of --labels-per-family prompts of each of the toy world's nine prompt families
(toyworld.eval_prompts), each graph's feature nodes scored on the cache's held-out split.

A label names n-grams; as a predictor it says "the feature fires where one of them ends" (the
explanation's reading in interp.py). For labels i and features j of one graph, score(i, j) is the
balanced accuracy of label i's predictor against feature j's firing over every held-out token.
    identification: the share of the graph's features whose label scores its own feature strictly
                    best of all the graph's features
    detection:      the mean score(i, i): the label as an explanation of its own feature
    distinct:       the share of distinct texts among the graph's labels as its picture shows them
                    (new: each line, what it reads and "→ what it says", cut to 36 characters)
Labels compared: "old box" (the n-grams of the explanation within the 26 characters the picture
showed), "old full" (every n-gram of the explanation: interp.py's F1-greedy choice), "new" (the
short label: label_ngrams; its text also names the clearly promoted tokens).

    python experiments/labels.py --labels-run runs         # after python demo.py (runs/clt, ...)
"""

import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

import graph
import interp
from clt import load_transcoder
from experiments.common import Bench, run_study
from experiments.compactness import family_prompts
from forge import plots, toyworld
from forge.cli import arg, run_main
from forge.graphcli import encode_prompt
from forge.hub import load_tokenizer
from model import load_model

DEMO_PROMPT = "Batris lives in Fafes. The language Batris speaks is"
OLD_BOX = 26  # characters of the explanation the graph's picture showed before the short labels
NEW_BOX = 36  # viz.py graph's --label-chars now


@dataclass
class LabelsBench(Bench):
    """identification, detection and distinctness of graph labels, old vs new"""

    labels_run: str = arg("runs", "python demo.py's --out: its clt/, cache/ and interp/")
    labels_per_family: int = arg(3, "prompts of each toy-world family")
    labels_interp: str = arg("", 'the interp.py run whose labels to score; "" = RUN/interp')


def family_graphs(model, clt, enc, per_family, device):
    """[(family, prompt, Graph, prune's (node_mask, edge_mask, cumulative, influence))]: the demo's
    prompt, then per_family prompts of each family of toyworld.eval_prompts."""
    prompts = [("demo", DEMO_PROMPT)]
    for fam, pairs in family_prompts(toyworld.load_world(), per_family).items():
        prompts += [(fam, p) for p, _ in pairs]
    out = []
    for fam, prompt in prompts:
        idx = encode_prompt(enc, prompt, model.config.n_ctx).to(device)
        rep = graph.local_replacement(model, clt, idx)
        g = graph.attribute(model, clt, rep, prompt, batch_size=1024)
        out.append((fam, prompt, g, [x.cpu() for x in graph.prune(g)]))
    return out


def heldout_firing(model, clt, run, features, device):
    """(fires (N, m) bool of features [(layer, f)], n-gram keys (N, n), base) on the held-out split."""
    from cache import ActivationCache

    cache = ActivationCache(os.path.join(run, "cache"))
    cfg = interp.InterpConfig(chunk_size=4096, device=device)
    F = clt.config.n_features
    cols = torch.tensor([l * F + f for l, f in features])
    fires, keys = [], []
    base = model.config.vocab_size + 1  # interp.py's n-gram keys
    for p in interp.padded_chunks(clt, cache, "heldout", cfg):
        fires.append((p.acts[p.lo : p.hi][:, cols] > 0).cpu())
        keys.append(interp.ngram_keys(p, cfg.max_ngram, base)[p.lo : p.hi].cpu())
    return torch.cat(fires), torch.cat(keys), base


def predictors(labels, keys, base, enc):
    """(N, m) bool: where one of each label's n-grams (texts) ends, matched through the held-out
    keys' texts."""
    uniq = keys[keys >= 0].unique().tolist()
    by_text = {}
    for k in uniq:
        by_text.setdefault(interp.decode_gram(k, base, enc), []).append(k)
    out = torch.zeros(len(keys), len(labels), dtype=torch.bool)
    for j, grams in enumerate(labels):
        wanted = torch.tensor([k for g in grams for k in by_text.get(g, [])], dtype=torch.long)
        out[:, j] = torch.isin(keys, wanted).any(1)
    return out


def balanced_accuracy(pred, fire):
    """(m, m) score[i, j]: predictor i against firing j, NaN where j never fires."""
    p = pred.double()
    f = fire.double()
    N = len(f)
    tp = p.T @ f  # (m, m)
    pos = f.sum(0)[None]
    pp = p.sum(0)[:, None]
    tn = N - pp - pos + tp
    return 0.5 * (tp / pos + tn / (N - pos))


def box_ngrams(rec, chars=OLD_BOX):
    """The explanation's n-grams whose quoted text lay within the first `chars` characters."""
    shown = rec["explanation"][:chars]
    return [
        g for g in rec.get("explanation_ngrams", []) if json.dumps(g, ensure_ascii=False) in shown
    ]


def run(cfg):
    model = load_model(os.path.join("models", "tiny")).to(cfg.device).eval()
    enc = load_tokenizer(os.path.join("models", "tiny"))
    clt = load_transcoder(os.path.join(cfg.labels_run, "clt"), model).to(cfg.device).eval()
    interp_dir = cfg.labels_interp or os.path.join(cfg.labels_run, "interp")
    with open(os.path.join(interp_dir, "features.jsonl")) as f:
        recs = {(r["layer"], r["feature"]): r for r in map(json.loads, f)}
    graphs = family_graphs(model, clt, enc, cfg.labels_per_family, cfg.device)
    feats = [  # each graph's kept features, once each (a feature may be kept at two positions)
        list(dict.fromkeys(map(tuple, g.feats[mask[: len(g.feats)]][:, [0, 2]].tolist())))
        for *_, g, (mask, *_) in graphs
    ]
    union = sorted({x for fs in feats for x in fs})
    col = {x: i for i, x in enumerate(union)}
    fire, keys, base = heldout_firing(model, clt, cfg.labels_run, union, cfg.device)
    kinds = dict(
        old_box=[box_ngrams(recs[x]) for x in union],
        old_full=[recs[x]["explanation_ngrams"] for x in union],
        new=[recs[x]["label_ngrams"] for x in union],
    )
    preds = {k: predictors(v, keys, base, enc) for k, v in kinds.items()}
    texts = dict(
        old_box=[recs[x]["explanation"][:OLD_BOX] for x in union],
        new=["\n".join(plots.label_lines(recs[x]["label"], NEW_BOX)) for x in union],
    )
    texts["old_full"] = texts["old_box"]
    per = []
    for (fam, prompt, *_), fs in zip(graphs, feats):
        idx = [col[x] for x in fs]
        row = dict(family=fam, features=len(idx))
        for k, pred in preds.items():
            s = balanced_accuracy(pred[:, idx], fire[:, idx]).nan_to_num(-1.0)
            own = s.diagonal()
            other = s.masked_fill(torch.eye(len(idx), dtype=torch.bool), -2).max(1).values
            row[f"{k}_ident"] = (own > other).double().mean().item()
            row[f"{k}_det"] = own[own >= 0].mean().item()
            row[f"{k}_distinct"] = len({texts[k][i] for i in idx}) / len(idx)
        per.append(row)
    rows = []
    for fam in dict.fromkeys(r["family"] for r in per):
        mine = [r for r in per if r["family"] == fam]
        rows.append({k: (np.mean([r[k] for r in mine]) if k != "family" else fam) for k in mine[0]})
    rows.append(
        {
            k: (np.mean([r[k] for r in per[1:]]) if k != "family" else "nine families")
            for k in per[0]
        }
    )
    for r in rows:
        r["features"] = float(r["features"])
    return rows


def main(argv=None):
    return run_study(__doc__, "labels", run, LabelsBench, argv)


if __name__ == "__main__":
    run_main(main)

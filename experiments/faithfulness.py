"""
experiments/faithfulness.py: does a pruned graph predict what removing its features does? A CLT of
models/tiny (--faithfulness-clt, or TopK trained here through experiments/compactness.py's trainer),
then over --faithfulness-per-family prompts of every toy-world family: the k most influential
feature nodes of each pruned graph and k random active features of the same layers; for each, the
change of the top logit node (the most likely token's logit minus the mean logit) predicted by the
graph's linear system (all paths, the pruned graph's edges, the direct edge) against
intervene.py's ablation in the real model (freeze="none") and in the replacement model's view
(freeze="all": the direct edge, exactly). Per family: Pearson r, median relative error (|measured|
floored at --faithfulness-floor) and sign agreement (over |measured| >= the floor).

A graph is a linear system: A[t, s] is what source s, at its activation a_s, adds to target t's
input. Removing feature s moves each target by -A[t, s]; a feature target passes its change on (an
active feature's activation moves one for one with its pre-activation under JumpReLU, ReLU and TopK
alike), so per unit of activation the system is M = A D^-1 (D = diag(a) on the feature columns), and
the logit node j moves by
    total:  -a_s [(I - M)^-1]_{j, s}   every path through the features: the graph's prediction
    direct: -A[j, s]                   the edge alone: every other MLP output held
intervene.intervene measures the same removal: freeze="none" is the real model (attention, LayerNorm
and the later MLPs respond), freeze="all" holds every MLP output, the attention patterns and the
LayerNorm scales (the graph's own view: it must give the direct prediction to float precision).

    python experiments/faithfulness.py                            # -> assets/faithfulness.png
    python experiments/faithfulness.py --faithfulness-clt runs/clt
"""

import os
import random
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from clt import load_transcoder
from experiments.common import Bench, run_study, save_png
from experiments.compactness import CompactnessBench, family_prompts, train_transcoders
from forge import toyworld
from forge.cli import arg, run_main
from forge.files import check_same_model, write_json
from forge.hub import DEFAULT_MODEL, load_tokenizer
from intervene import Intervention, intervene
from model import GPT

# (prediction, measurement) pairs of the "all" rows; each family's rows have the first two
PAIRS = (("total", "real"), ("direct", "real"), ("pruned", "real"), ("total", "frozen"))
PAIRS += (("direct", "frozen"),)
SETS = ("top", "random", "top, stays linear", "top, overshoots")  # feature sets of the rows


@dataclass
class FaithfulnessBench(Bench):
    """pruned graphs' predicted logit changes vs ablations in the real model"""

    faithfulness_clt: str = arg(
        "", 'a trained CLT of models/tiny (e.g. runs/clt); "" = train one as compactness does'
    )
    faithfulness_tokens: int = arg(
        200_000, "tokens of the models/tiny cache that CLT is trained on"
    )
    faithfulness_features: int = arg(512, "its features per layer (TopK, k = 8)")
    faithfulness_steps: int = arg(200, "its training steps of 1024 tokens")
    faithfulness_per_family: int = arg(6, "prompts of each toyworld.eval_prompts kind")
    faithfulness_k: int = arg(
        5, "features per pruned graph: its k most influential, and k random active ones"
    )
    faithfulness_floor: float = arg(
        0.05, "|measured| below this (logits) counts as this in relative errors"
    )
    faithfulness_seed: int = arg(0, "seed of the random control features")
    faithfulness_figure: str = arg(os.path.join("assets", "faithfulness.png"), "the scatter plot")


def run(cfg):
    """Per prompt the graph (unpruned, for the predictions) and the pruned graph (for the choice of
    features); the rows per family and feature set, and the figure."""
    import graph

    t0 = time.time()
    root = os.path.join(cfg.out, "faithfulness")
    os.makedirs(root, exist_ok=True)
    model = GPT.from_pretrained().to(cfg.device).eval()
    enc = load_tokenizer(DEFAULT_MODEL)
    world = toyworld.load_world()
    print("phase 1: the CLT")
    t, what = faithfulness_clt(cfg, model, root)
    families = family_prompts(world, cfg.faithfulness_per_family)
    n = sum(map(len, families.values()))
    print(f"phase 2: {n} prompts, CLT {what} ({time.time() - t0:.0f} s so far)")
    rng = random.Random(cfg.faithfulness_seed)
    points = []
    top_is_answer = {}  # family -> [whether the top logit node is the prompt's answer]
    for fam, prompts in families.items():
        for prompt, answer in prompts:
            idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(cfg.device)
            mine, token = faithfulness_points(model, t, idx, cfg.faithfulness_k, rng)
            points += [dict(family=fam, prompt=prompt, **q) for q in mine]
            top_is_answer.setdefault(fam, []).append(token == enc.encode(answer)[0])
    write_json(os.path.join(root, "points.json"), dict(clt=what, points=points))
    rows = faithfulness_rows(points, families, cfg.faithfulness_floor)
    for row in rows:
        shares = top_is_answer.get(row["family"], sum(top_is_answer.values(), []))
        row["top_is_answer"] = sum(shares) / len(shares)
    faithfulness_figure(points, list(families), cfg.faithfulness_figure)
    print(f"done in {time.time() - t0:.0f} s; CLT: {what}; figure: {cfg.faithfulness_figure}")
    return rows


def faithfulness_clt(cfg, model, root):
    """The CLT under test: cfg.faithfulness_clt, or one trained here by train_transcoders (TopK)
    -> (CLT, what)."""
    if cfg.faithfulness_clt:
        t = load_transcoder(cfg.faithfulness_clt, model)
        check_same_model(model, t.config.model_sha256, f"the CLT {cfg.faithfulness_clt}")
        return t.to(cfg.device).eval(), cfg.faithfulness_clt
    recipe = CompactnessBench(
        device=cfg.device,
        compactness_tokens=cfg.faithfulness_tokens,
        compactness_features=cfg.faithfulness_features,
        compactness_steps=cfg.faithfulness_steps,
        compactness_kinds="clt",
    )
    t, m = train_transcoders(recipe, root)["clt"]
    fvu = sum(m["eval"]["fvu"]) / len(m["eval"]["fvu"])
    recipe_text = f"TopK k={recipe.compactness_k}, F={cfg.faithfulness_features}"
    result = f"held-out FVU {fvu:.3f}, loss recovered {m['eval']['recovered']:.3f}"
    return t, f"{recipe_text}, {cfg.faithfulness_steps} steps: {result}"


# -----------------------------------------------------------------------------
# predictions and measurements


def removal_effects(g, chosen, target=0, edges=None):
    """What the graph's linear system predicts when each feature node of chosen (m,) is removed on
    its own (the total effect above) -> (the change of logit node `target` (m,), 0: the most likely
    token; the change of every feature node's activation (n, m)). edges: an (N, N) bool mask, e.g.
    prune's, to predict from the pruned graph's edges alone."""
    A = g.adjacency.double()
    A = A if edges is None else A * edges
    n = len(g.feats)
    acts = g.acts.to(A.device, torch.float64)
    # (N, n) M: what a unit of each feature's activation adds to each input
    per_unit = A[:, :n] / acts
    step = torch.zeros(n, len(chosen), dtype=torch.float64, device=A.device)  # (n, m)
    step[chosen, torch.arange(len(chosen), device=A.device)] = -acts[chosen]
    change = step.clone()
    for _ in range(g.n_layers):  # a feature feeds only higher layers: paths have at most L edges
        step = per_unit[:n] @ step  # (n, m) the last step's changes passed on along one more edge
        change += step
    assert not step.any(), (
        "the feature-to-feature edges have a cycle: is this an attribution graph?"
    )
    return per_unit[g.slices().logits.start + target] @ change, change


def ablation_changes(model, t, idx, feats, token, freeze):
    """(m,) the measured change of `token`'s logit minus the mean logit (a logit node's quantity) at
    the last position when each feature of feats (m, 3) (layer, pos, id) is ablated on its own."""
    out = []
    for l, p, f in feats.tolist():
        clean, new = intervene(model, t, idx, [Intervention(l, p, f, "ablate")], freeze=freeze)
        change = (new[-1, token] - new[-1].mean()) - (clean[-1, token] - clean[-1].mean())
        out.append(change.item())
    return torch.tensor(out, dtype=torch.float64)


def control_features(g, top, rng):
    """For each node in top, a random other active feature of its layer (not in top, not twice)."""
    taken = set(top.tolist())
    out = []
    for i in top.tolist():
        same_layer = (g.feats[:, 0] == g.feats[i, 0]).nonzero()[:, 0].tolist()
        pool = [j for j in same_layer if j not in taken]
        if pool:
            out.append(rng.choice(pool))
            taken.add(out[-1])
    return torch.tensor(out, dtype=torch.long, device=top.device)


def faithfulness_points(model, t, idx, k, rng):
    """One prompt: its graph and pruned graph, the k most influential feature nodes of the pruned
    graph and as many random active ones of the same layers; per feature the predicted and measured
    changes of the top logit node when it is removed -> ([dict per feature], the top logit node's
    token)."""
    import graph

    rep = graph.local_replacement(model, t, idx)
    g = graph.attribute(model, t, rep, batch_size=1024)  # one batch per layer here: no progress bar
    nodes, edges, _, infl = graph.prune(g)
    n = len(g.feats)
    kept = nodes[:n].nonzero()[:, 0]
    top = kept[infl[kept].argsort(descending=True)[:k]]
    token = int(g.logit_ids[0])
    points = []
    for which, chosen in (("top", top), ("random", control_features(g, top, rng))):
        total, change = removal_effects(g, chosen)
        # the linear response leaves the features' linear range where it drives one below 0
        overshoot = (g.acts.to(change.device, change.dtype)[:, None] + change < 0).sum(0)  # (m,)
        predicted = dict(
            total=total,
            pruned=removal_effects(g, chosen, edges=edges)[0],
            direct=-g.adjacency[g.slices().logits.start, chosen].double(),
        )
        measured = dict(
            real=ablation_changes(model, t, idx, g.feats[chosen], token, "none"),
            frozen=ablation_changes(model, t, idx, g.feats[chosen], token, "all"),
        )
        for j, i in enumerate(chosen.tolist()):
            point = dict(features=which, feature="/".join(map(str, g.feats[i].tolist())))
            point.update(activation=g.acts[i].item(), influence=infl[i].item())
            point.update(overshoot=int(overshoot[j]))
            point.update({f"predicted_{key}": v[j].item() for key, v in predicted.items()})
            point.update({f"measured_{key}": v[j].item() for key, v in measured.items()})
            points.append(point)
    return points, token


# -----------------------------------------------------------------------------
# agreement: the table and the figure


def agreement(predicted, measured, floor):
    """(Pearson r, median |measured - predicted| / max(|measured|, floor), share of the changes with
    |measured| >= floor whose predicted sign is right); nan where undefined (under 3 points, no
    spread)."""
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    spread = len(p) >= 3 and p.std() > 0 and m.std() > 0
    r = float(np.corrcoef(p, m)[0, 1]) if spread else float("nan")
    rel = float(np.median(np.abs(m - p) / np.maximum(np.abs(m), floor))) if len(p) else float("nan")
    big = np.abs(m) >= floor
    sign = float(np.mean(np.sign(p[big]) == np.sign(m[big]))) if big.any() else float("nan")
    return r, rel, sign


def in_set(q, which):
    """Whether point q is in feature set `which`: top or random; a top feature whose removal, in
    the linear system, leaves every other feature's activation >= 0 (stays linear) or not
    (overshoots)."""
    if which in ("top", "random"):
        return q["features"] == which
    return q["features"] == "top" and (q["overshoot"] > 0) == (which == "top, overshoots")


def faithfulness_rows(points, families, floor):
    """Per family and feature set: the graph's total and direct predictions against the real model;
    over all families also the top features split by whether their linear response stays linear,
    the pruned graph's prediction, and the total and direct ones against the frozen model."""
    nan = float("nan")
    rows = []
    for fam in list(families) + ["all"]:
        for which in SETS if fam == "all" else SETS[:2]:
            mine = [q for q in points if in_set(q, which) and fam in ("all", q["family"])]
            overshoot_share = float(np.mean([q["overshoot"] > 0 for q in mine])) if mine else nan
            for pred, meas in PAIRS if fam == "all" else PAIRS[:2]:
                p = [q[f"predicted_{pred}"] for q in mine]
                m = [q[f"measured_{meas}"] for q in mine]
                r, rel, sign = agreement(p, m, floor)
                rows.append(
                    dict(
                        family=fam,
                        features=which,
                        predicted=pred,
                        measured=meas,
                        n=len(mine),
                        overshoot_share=overshoot_share,
                        mean_abs_measured=float(np.mean(np.abs(m))) if m else nan,
                        pearson=r,
                        median_rel_error=rel,
                        sign_agreement=sign,
                        max_abs_error=float(np.max(np.abs(np.subtract(m, p)))) if m else nan,
                    )
                )
    return rows


def faithfulness_figure(points, families, path):
    """Predicted (the graph's total effect) vs measured (the real model) change of the top logit,
    one colour per family: the top-k features of the pruned graphs, and the random control; open
    circles where the linear response drives some other feature's activation below zero."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5))
    axes = fig.subplots(1, 2)
    titles = ("top-k features of each pruned graph", "random active features of the same layers")
    for ax, which, title in zip(axes, ("top", "random"), titles):
        mine = [q for q in points if q["features"] == which]
        for i, fam in enumerate(families):
            for over in (False, True):  # open circles: the linear response overshoots
                group = [q for q in mine if q["family"] == fam and (q["overshoot"] > 0) == over]
                xs = [q["predicted_total"] for q in group]
                ys = [q["measured_real"] for q in group]
                face = "none" if over else f"C{i}"
                label = None if over else fam
                ax.scatter(
                    xs, ys, s=14, alpha=0.75, label=label, facecolors=face, edgecolors=f"C{i}"
                )
        values = [abs(q[key]) for q in mine for key in ("predicted_total", "measured_real")]
        lim = max(values + [1e-3]) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xlabel("predicted by the graph (total effect), logits")
        ax.set_ylabel("measured: ablated in the real model, logits")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "models/tiny: change of the top logit (minus the mean) when one feature is removed "
        "(open: the linear response drives another feature below 0)",
        fontsize=10,
    )
    save_png(fig, path, 90)


def main(argv=None):
    return run_study(__doc__, "faithfulness", run, FaithfulnessBench, argv)


if __name__ == "__main__":
    run_main(main)

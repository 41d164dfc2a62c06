"""
experiments/supernodes.py: are graph.py's automated supernodes faithful? On a trained CLT of
models/tiny and its interp.py run (python demo.py makes both), the pruned graphs of the demo's
prompt and of --supernodes-per-family prompts of each of the toy world's nine prompt families
(experiments/labels.py's family_graphs), two groupings of each graph's kept features:
    supernodes:       graph.supernodes (one position, complete linkage on edge profiles + decoders)
    layer, position:  the baseline, every kept feature of one (layer, position) cell together
    random:           a control, for each supernode as many kept features of its position at random
Each group of two or more is ablated in the real model (intervene.py, freeze="none", all members at
once) and the change of the top logit node (its token's logit minus the mean logit) is compared
with the graph's prediction: its linear system's total effect, which for a group is the sum of its
members' (experiments/faithfulness.py's removal_effects). Per family and grouping: Pearson r,
median relative error (|measured| floored at --supernodes-floor), sign agreement, mean |measured|;
and the purity of the groups against the toy world's planted concepts, where two or more members
have a best concept of F1 >= 0.5 (features.jsonl's concept, concept_f1): the share of those members
with the group's most common concept.

    python experiments/supernodes.py --supernodes-run runs      # after python demo.py
"""

import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

import graph
from clt import load_transcoder
from experiments.common import Bench, run_study
from experiments.faithfulness import agreement, removal_effects
from experiments.labels import family_graphs
from forge.cli import arg, run_main
from forge.hub import load_tokenizer
from intervene import Intervention, intervene
from model import load_model

GROUPINGS = ("supernodes", "layer, position", "random, same sizes")
PURE_F1 = 0.5  # a member's best planted concept counts from this F1 on


@dataclass
class SupernodesBench(Bench):
    """group ablations of automated supernodes vs (layer, position) groups: graph vs real model"""

    supernodes_run: str = arg("runs", "python demo.py's --out: its clt/ and interp/")
    supernodes_per_family: int = arg(3, "prompts of each toy-world family")
    supernodes_floor: float = arg(0.05, "|measured| below this (logits) counts as this")
    supernodes_seed: int = arg(0, "seed of the random control groups")


def cell_groups(g, node_mask):
    """The baseline: the kept features grouped by (layer, position)."""
    kept = node_mask[: len(g.feats)].nonzero()[:, 0]
    cells = {}
    for i in kept.tolist():
        cells.setdefault(tuple(g.feats[i, :2].tolist()), []).append(i)
    return [torch.tensor(c) for c in cells.values()]


def random_groups(g, node_mask, groups, rng):
    """The control: for each group, as many kept features drawn at random at its position."""
    kept = node_mask[: len(g.feats)].nonzero()[:, 0].tolist()
    out = []
    for members in groups:
        here = [i for i in kept if g.feats[i, 1] == g.feats[members[0], 1]]
        out.append(torch.tensor(sorted(rng.sample(here, len(members)))))
    return out


def group_points(model, clt, g, groups, concepts):
    """Per group of two or more: (predicted, measured) change of the top logit node, purity."""
    idx = torch.tensor([g.tokens])
    token = int(g.logit_ids[0])
    out = []
    for members in (m for m in groups if len(m) > 1):
        predicted = removal_effects(g, members)[0].sum().item()  # linear: the members' sum
        ablate = [Intervention(l, p, f, "ablate") for l, p, f in g.feats[members].tolist()]
        clean, new = intervene(model, clt, idx, ablate, freeze="none")
        measured = (
            (new[-1, token] - new[-1].mean()) - (clean[-1, token] - clean[-1].mean())
        ).item()
        named = [concepts.get((l, f)) for l, _, f in g.feats[members].tolist()]
        named = [c for c in named if c]
        purity = Counter(named).most_common(1)[0][1] / len(named) if len(named) > 1 else None
        out.append(dict(predicted=predicted, measured=measured, size=len(members), purity=purity))
    return out


def run(cfg):
    model = load_model(os.path.join("models", "tiny")).to(cfg.device).eval()
    enc = load_tokenizer(os.path.join("models", "tiny"))
    clt = load_transcoder(os.path.join(cfg.supernodes_run, "clt"), model).to(cfg.device).eval()
    concepts = {}
    with open(os.path.join(cfg.supernodes_run, "interp", "features.jsonl")) as f:
        for r in map(json.loads, f):
            if (r.get("concept_f1") or 0) >= PURE_F1:
                concepts[r["layer"], r["feature"]] = r["concept"]
    rng = random.Random(cfg.supernodes_seed)
    points = []  # one per group: its family, grouping, prediction and measurement
    for fam, _, g, (mask, edges, _, _) in family_graphs(
        model, clt, enc, cfg.supernodes_per_family, cfg.device
    ):
        g.adjacency = g.adjacency.cpu()
        decoders = graph.decoder_directions(clt, g.feats.to(cfg.device)).cpu()
        groups = graph.supernodes(g, mask, edges, decoders)
        groupings = {
            "supernodes": groups,
            "layer, position": cell_groups(g, mask),
            "random, same sizes": random_groups(g, mask, groups, rng),
        }
        for name, groups in groupings.items():
            mine = group_points(model, clt, g, groups, concepts)
            points += [dict(q, family=fam, grouping=name) for q in mine]
    families = list(dict.fromkeys(q["family"] for q in points)) + ["nine families"]
    return [
        group_row(
            [q for q in points if q["grouping"] == name and in_family(q, fam)], fam, name, cfg
        )
        for fam in families
        for name in GROUPINGS
    ]


def in_family(q, fam):
    return q["family"] == fam or (fam == "nine families" and q["family"] != "demo")


def group_row(mine, fam, name, cfg):
    """One row of the table: the agreement of the groups' predicted and measured changes."""
    nan = float("nan")
    predicted = [q["predicted"] for q in mine]
    measured = [q["measured"] for q in mine]
    r, rel, sign = agreement(predicted, measured, cfg.supernodes_floor)
    pure = [q["purity"] for q in mine if q["purity"] is not None]
    return dict(
        family=fam,
        grouping=name,
        groups=len(mine),
        mean_size=float(np.mean([q["size"] for q in mine])) if mine else nan,
        pearson=r,
        median_rel_error=rel,
        sign_agreement=sign,
        mean_abs_measured=float(np.mean(np.abs(measured))) if mine else nan,
        purity=float(np.mean(pure)) if pure else nan,
        groups_with_concepts=len(pure),
    )


def main(argv=None):
    return run_study(__doc__, "supernodes", run, SupernodesBench, argv)


if __name__ == "__main__":
    run_main(main)

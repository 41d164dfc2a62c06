"""
experiments/compactness.py: do cross-layer transcoders give more compact attribution graphs than
per-layer ones? On models/tiny: a CLT and a PLT (and a PLT with a skip connection) trained on one
cache with the same features per layer and TopK k (matched L0), then the graph of every prompt, per
toy-world family: replacement and completeness scores, feature + error nodes and edges of the pruned
graph, feature + error nodes needed for 80 % of the logit influence, the influence-weighted mean
path length from the token embeddings to the logits (in edges), and for two-hop prompts the share of
the feature influence carried by the last-token features selective for the latent country.

    python experiments/compactness.py    # ~15 min on a loaded 2-core CPU -> assets/compactness.png
    python experiments/compactness.py --compactness-kinds clt,plt,plt-skip
"""

import os
import random
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from clt import CrossLayerTranscoder
from experiments.common import Bench, run_study, save_png
from experiments.two_hop import last_token_firing, two_hop_probes
from forge import toyworld
from forge.cli import arg, run_main
from forge.files import write_json
from forge.hub import DEFAULT_MODEL, load_tokenizer
from model import GPT

TRANSCODERS = {
    "clt": dict(decoder="cross-layer", skip=False),
    "plt": dict(decoder="per-layer", skip=False),
    "plt-skip": dict(decoder="per-layer", skip=True),
}
GRAPH_METRICS = ("active", "replacement", "completeness", "pruned_nodes", "pruned_edges")
GRAPH_METRICS += ("nodes_to_80", "path_length", "country_share")


@dataclass
class CompactnessBench(Bench):
    """CLT vs PLT on models/tiny: how compact their attribution graphs are"""

    compactness_tokens: int = arg(200_000, "tokens of the models/tiny cache")
    compactness_features: int = arg(512, "features per layer of every transcoder")
    compactness_k: int = arg(8, "TopK k of every transcoder: the matched mean L0")
    compactness_steps: int = arg(400, "training steps of each transcoder")
    compactness_batch: int = arg(1024, "tokens per training step")
    compactness_per_family: int = arg(6, "prompts of each toyworld.eval_prompts kind")
    compactness_kinds: str = arg(
        "clt,plt", "transcoders to compare: clt, plt and/or plt-skip (compactness.TRANSCODERS)"
    )
    compactness_figure: str = arg(os.path.join("assets", "compactness.png"), "the figure")


def run(cfg):
    """A row per transcoder and family (and "all"), then the figure."""
    import graph

    root = os.path.join(cfg.out, "compactness")
    model = GPT.from_pretrained().to(cfg.device).eval()
    enc = load_tokenizer(DEFAULT_MODEL)
    world = toyworld.load_world()
    t0 = time.time()
    print("phase 1: the cache and the transcoders")
    trained = train_transcoders(cfg, root)
    print(f"phase 2: per-country selective features ({time.time() - t0:.0f} s so far)")
    selective = {}
    for name, (t, _) in trained.items():
        selective[name] = country_features(model, enc, t, world, cfg.device)
    families = family_prompts(world, cfg.compactness_per_family)
    n = sum(map(len, families.values()))
    print(f"phase 3: {n} prompts x {len(trained)} graphs ({time.time() - t0:.0f} s so far)")
    per_prompt = []
    for kind, prompts in families.items():
        for prompt, answer in prompts:
            idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(cfg.device)
            country = world.country_of(answer.strip()) if kind.startswith("two_hop") else None
            for name, (t, _) in trained.items():
                rep = graph.local_replacement(model, t, idx)
                sel = selective[name].get(country) if country else None
                row = graph_compactness(model, t, rep, sel)
                per_prompt.append(dict(transcoder=name, family=kind, prompt=prompt, **row))
    write_json(os.path.join(root, "per_prompt.json"), per_prompt)
    rows = []
    for name, (_, m) in trained.items():
        for fam in list(families) + ["all"]:
            rows.append(family_row(name, fam, per_prompt, m))
    figure_rows = [r for r in rows if r["family"] != "all"]
    compactness_figure(figure_rows, cfg.compactness_figure, list(trained))
    print(f"done in {time.time() - t0:.0f} s; figure: {cfg.compactness_figure}")
    return rows


def family_row(name, fam, per_prompt, m):
    """The means over one family's prompts (or "all"), with the training run's numbers on its
    held-out contexts in the "all" row."""
    mine = [r for r in per_prompt if r["transcoder"] == name and fam in ("all", r["family"])]
    row = dict(transcoder=name, family=fam, prompts=len(mine), l0="-", fvu="-", recovered="-")
    for key in GRAPH_METRICS:
        vals = [r[key] for r in mine if key in r]
        row[key] = round(sum(vals) / len(vals), 3) if vals else "-"
    if fam == "all":
        ev = m["eval"]
        row.update(
            l0=round(sum(ev["l0"]) / len(ev["l0"]), 2),
            fvu=round(sum(ev["fvu"]) / len(ev["fvu"]), 4),
            recovered=round(ev["recovered"], 4),
        )
    return row


def train_transcoders(cfg, root):
    """One cache of models/tiny, then each transcoder trained on it with the same recipe: TopK with
    the same k (so the mean L0 is matched by construction), the same features per layer, seed,
    steps. -> {name: (transcoder, train.py's last metrics)}."""
    import cache
    import train

    path = os.path.join(root, "cache")
    build = cache.CacheConfig(
        model=DEFAULT_MODEL,
        corpus="toy",
        tokens=cfg.compactness_tokens,
        out=path,
        device=cfg.device,
    )
    cache.build_cache(build)
    out = {}
    for name in cfg.compactness_kinds.split(","):
        c = train.TrainConfig(
            cache=path,
            out=os.path.join(root, name),
            features=cfg.compactness_features,
            activation="topk",
            k=cfg.compactness_k,
            steps=cfg.compactness_steps,
            batch_size=cfg.compactness_batch,
            lr=3e-3,
            warmup=min(50, cfg.compactness_steps // 4),
            eval_every=cfg.compactness_steps,
            eval_contexts=32,
            ckpt_every=-1,
            log_every=50,
            overwrite=True,
            device=cfg.device,
            **TRANSCODERS[name],
        )
        m = train.train(c)
        out[name] = (CrossLayerTranscoder.from_pretrained(c.out).to(cfg.device).eval(), m)
    return out


def family_prompts(world, per_family):
    """{kind: [(prompt, answer)]}: the first per_family held-out prompts of every kind of
    toyworld.eval_prompts, in a fixed shuffled order (seed 0) so each kind mixes relations, people
    and templates."""
    out = {}
    for prompt, answer, kind in toyworld.eval_prompts(world):
        out.setdefault(kind, []).append((prompt, answer))
    rng = random.Random(0)
    return {kind: rng.sample(ps, min(per_family, len(ps))) for kind, ps in out.items()}


def country_features(model, enc, t, world, device):
    """{country: (L, F) bool}: the last-token features selective for each country, the planted
    latent of the two-hop prompts. On two-hop probes of every person (with the bridge sentence and
    without), a feature is selective for country c if it fires on (rate on people of c) − (rate on
    people of other countries) >= 0.5 of the probes."""
    probes = []
    for prompt, _, _, country, _ in two_hop_probes(world, [p["name"] for p in world.people]):
        no_bridge = prompt[prompt.index(". ") + 2 :]
        probes += [(prompt, country), (no_bridge, country)]
    last = last_token_firing(model, enc, t, [p for p, _ in probes], device).float()  # (P, L, F)
    countries = sorted({c for _, c in probes})
    which = torch.tensor([countries.index(c) for _, c in probes])
    return {
        c: last[which == i].mean(0) - last[which != i].mean(0) >= 0.5
        for i, c in enumerate(countries)
    }


def path_length(A_hat, w, inputs):
    """The influence-weighted mean number of edges on the paths from the input nodes to the logits:
    the mass of w Â^k that reaches the inputs, over k."""
    cur = w @ A_hat
    total = 0.0
    weighted = 0.0
    k = 1
    while cur.any():
        m = cur[inputs].sum().item()
        total += m
        weighted += k * m
        cur = cur @ A_hat
        k += 1
    return weighted / max(total, 1e-30)


def graph_compactness(model, t, rep, selective):
    """The compactness numbers of one prompt's graph under transcoder t (the module docstring's)."""
    import graph

    g = graph.attribute(model, t, rep, batch_size=256)
    s = g.slices()
    A_hat = graph.normalized(g.adjacency)
    w = g.logit_weights()
    infl = graph.influence(A_hat, w, normalize=False)
    replacement, completeness = graph.scores(g)
    nodes, edges, _, _ = graph.prune(g)
    inner = infl[: s.tokens.start].sort(descending=True).values  # features and errors
    cum = inner.cumsum(0) / inner.sum().clamp(min=1e-30)
    row = dict(
        active=len(g.feats),
        replacement=replacement,
        completeness=completeness,
        pruned_nodes=int(nodes[: s.tokens.start].sum()),
        pruned_edges=int(edges.sum()),
        nodes_to_80=int(torch.searchsorted(cum, 0.8)) + 1,
        path_length=path_length(A_hat, w, torch.arange(s.tokens.start, s.tokens.stop)),
    )
    if selective is not None:
        l, _, f = g.feats.cpu().T
        last = (g.feats[:, 1] == len(g.tokens) - 1).cpu()
        feat = infl[s.features].cpu()
        share = feat[last & selective[l, f]].sum() / feat.sum().clamp(min=1e-30)
        row["country_share"] = share.item()
    return row


def compactness_figure(rows, path, kinds):
    """Per metric, a bar per family and transcoder."""
    from matplotlib.figure import Figure

    metrics = ["pruned_nodes", "pruned_edges", "nodes_to_80", "path_length", "replacement"]
    metrics.append("completeness")
    families = [r["family"] for r in rows if r["transcoder"] == kinds[0]]
    fig = Figure(figsize=(15, 7))
    axes = fig.subplots(2, 3)
    width = 0.8 / len(kinds)
    x = np.arange(len(families))
    for ax, metric in zip(axes.flat, metrics):
        for i, kind in enumerate(kinds):
            by_family = {r["family"]: r[metric] for r in rows if r["transcoder"] == kind}
            ax.bar(x + i * width, [by_family[fam] for fam in families], width, label=kind)
        ax.set_title(metric.replace("_", " "))
        ax.set_xticks(x + width * (len(kinds) - 1) / 2)
        ax.set_xticklabels(families, rotation=60, ha="right", fontsize=8)
    axes.flat[0].legend()
    fig.suptitle(
        "models/tiny: graphs of a CLT vs a PLT (same features per layer, TopK: same L0), "
        "per prompt family"
    )
    save_png(fig, path, 110)


def main(argv=None):
    return run_study(__doc__, "compactness", run, CompactnessBench, argv)


if __name__ == "__main__":
    run_main(main)

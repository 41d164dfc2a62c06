"""
experiments/two_hop.py: does a two-hop answer go through a feature of the intermediate entity? Toy
world, two-hop prompts of held-out people ("Batris lives in Fafes. The language Batris speaks is" ->
Zefekic, through Fafes -> Gregruia, never stated), with a trained CLT of models/tiny (--graph-clt).

A last-token feature is *selective* for the country if it fires on (rate same) − (rate other) >= 0.5
of the probes with the same relation: same = other people living in that country, other = people of
other countries (world labels, 100 people). Per prompt: the feature influence share on the answer
logit of selective features and of features on the city token; how many of them the pruned graph
keeps; in the real model, the change of log p(answer) and of the answer's logit minus the mean logit
of the other countries' answers when the 3 most influential selective features, or 3 other
last-token ones, are ablated. The table holds the prompts whose answer is among the logit nodes;
<out>/graph_two_hop.json every prompt and the means.

    python experiments/two_hop.py --graph-clt runs/clt       # after `python demo.py` (or train.py)
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from clt import CrossLayerTranscoder
from experiments.common import Bench, run_study
from forge import toyworld
from forge.cli import arg, run_main
from forge.files import write_json
from forge.hub import DEFAULT_MODEL, load_tokenizer
from intervene import Intervention, intervene
from model import GPT


@dataclass
class TwoHopBench(Bench):
    """two-hop prompts: does the answer's path go through the intermediate country's features?"""

    graph_clt: str = arg(os.path.join("runs", "clt"), "a trained CLT of models/tiny")
    graph_two_hop: int = arg(60, "two-hop prompts of held-out people in the study")
    graph_batch: int = arg(256, "targets per pass of graph.py's transposed model")


def run(cfg):
    """Every prompt's row (study); the table: those with the answer among the logit nodes."""
    if not os.path.exists(os.path.join(cfg.graph_clt, "config.json")):
        raise FileNotFoundError(
            f"no CLT in {cfg.graph_clt}: run `python demo.py` or pass --graph-clt"
        )
    study = two_hop_study(cfg)
    done = [r for r in study if r["answer_in_logits"]]
    skip = ("prompt", "answer_in_logits")
    means = {k: float(np.mean([r[k] for r in done])) for k in done[0] if k not in skip}
    print(
        f"two-hop study, {len(done)} of {len(study)} prompts with the answer among the logit nodes"
    )
    print(f"means: {means}")
    write_json(
        os.path.join(cfg.out, "graph_two_hop.json"),
        dict(clt=cfg.graph_clt, means=means, prompts=study),
    )
    return [{k: v for k, v in r.items() if k != "prompt"} for r in done]


def two_hop_probes(world, people):
    """(prompt, answer, relation, country, person): "{person} lives in {city}. The language {person}
    speaks is" -> the language of the city's country; template 0 of each two-hop relation."""
    out = []
    for person in people:
        home = world.lookup["person"][person]["home"]
        bridge = toyworld.TEMPLATES["home"][0].format(person=person, city=home)
        for relation in toyworld.TWO_HOP:
            answer = world.two_hop(person, relation)
            slot = toyworld.answer_slot(relation)
            sentence = toyworld.TEMPLATES[relation][0].format(person=person, **{slot: answer})
            prompt, answer = toyworld.split_prompt(sentence, answer)
            out.append((bridge + " " + prompt, answer, relation, world.country_of(home), person))
    return out


def last_token_firing(model, enc, t, prompts, device):
    """(P, L, F) bool: which features fire at the last token of each prompt."""
    import graph

    out = []
    with torch.no_grad():
        for prompt in prompts:
            idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(device)
            mlp_in = model.run_with_acts(idx, logits=False)[1].mlp_in
            out.append(t.encode(mlp_in[0, -1:])[0].cpu() > 0)  # (L, F)
    return torch.stack(out)


def two_hop_study(cfg):
    """A row per held-out prompt (see the module docstring)."""
    device = cfg.device
    model = GPT.from_pretrained().to(device)
    enc = load_tokenizer(DEFAULT_MODEL)
    world = toyworld.load_world()
    t = CrossLayerTranscoder.from_pretrained(cfg.graph_clt).to(device)
    probes = two_hop_probes(world, [p["name"] for p in world.people])
    last = last_token_firing(model, enc, t, [p[0] for p in probes], device)  # (P, L, F)
    queries = two_hop_probes(world, world.heldout_people)[: cfg.graph_two_hop]
    rows = []
    for prompt, answer, relation, country, person in queries:
        same = torch.tensor(
            [p[2] == relation and p[3] == country and p[4] != person for p in probes]
        )
        other = torch.tensor([p[2] == relation and p[3] != country for p in probes])
        if not same.any():
            continue  # nobody else lives in this country: selectivity is undefined
        selective = last[same].float().mean(0) - last[other].float().mean(0) >= 0.5  # (L, F)
        rivals = sorted({enc.encode(p[1])[0] for p in probes if p[2] == relation})
        rows.append(prompt_row(model, enc, t, world, prompt, answer, selective, rivals, cfg))
        print(rows[-1])
    return rows


def prompt_row(model, enc, t, world, prompt, answer, selective, rivals, cfg):
    """One prompt's graph: the influence shares, what pruning keeps, and the two ablations."""
    import graph

    idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(cfg.device)
    labels = toyworld.label_tokens(prompt, enc, world)
    city = torch.tensor([i + 1 for i, lab in enumerate(labels) if "role:bridge" in lab])
    rep = graph.local_replacement(model, t, idx)
    g = graph.attribute(model, t, rep, batch_size=cfg.graph_batch)
    fs = g.slices().features
    ans = enc.encode(answer)[0]
    hit = (g.logit_ids.cpu() == ans).nonzero()[:, 0]
    if not len(hit):
        return dict(prompt=prompt, answer_in_logits=False)
    w = torch.zeros(len(g.adjacency), dtype=g.adjacency.dtype, device=g.adjacency.device)
    w[g.slices().logits.start + hit[0]] = 1  # influence on the answer logit alone
    infl = graph.influence(graph.normalized(g.adjacency), w, normalize=False)[fs].cpu()
    l, p, f = g.feats.cpu().T
    is_last = p == idx.size(1) - 1
    at_city = torch.isin(p, city)
    sel = is_last & selective[l, f]
    kept = graph.prune(g)[0][fs].cpu()  # the pruned graph's feature nodes
    rivals = torch.tensor([r for r in rivals if r != ans])
    ranked = infl.argsort(descending=True)
    # log p(answer); answer logit - mean logit of the other countries' answers
    dlogp, ddiff = [], []
    for chosen in (ranked[sel[ranked]][:3], ranked[is_last[ranked] & ~sel[ranked]][:3]):
        feats = g.feats[chosen.to(g.feats.device)].tolist()
        clean, new = (
            x[-1] for x in intervene(model, t, idx, [Intervention(*x, "ablate") for x in feats])
        )
        dlogp.append((new.log_softmax(-1)[ans] - clean.log_softmax(-1)[ans]).item())
        margin_new = new[ans] - new[rivals].mean()
        ddiff.append((margin_new - (clean[ans] - clean[rivals].mean())).item())
    return dict(
        prompt=prompt,
        answer_in_logits=True,
        p_answer=g.logit_probs[hit[0]].item(),
        replacement_score=graph.scores(g)[0],
        n_features=len(g.feats),
        n_selective=int(sel.sum()),
        selective_share=(infl[sel].sum() / infl.sum()).item(),
        city_token_share=(infl[at_city].sum() / infl.sum()).item(),
        pruned_selective=int((kept & sel).sum()),
        pruned_city_token=int((kept & at_city).sum()),
        pruned_features=int(kept.sum()),
        dlogp_ablate_selective3=dlogp[0],
        dlogp_ablate_other_last3=dlogp[1],
        ddiff_ablate_selective3=ddiff[0],
        ddiff_ablate_other_last3=ddiff[1],
    )


def main(argv=None):
    return run_study(__doc__, "two_hop", run, TwoHopBench, argv)


if __name__ == "__main__":
    run_main(main)

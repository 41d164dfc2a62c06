"""
experiments/qk.py: QK attributions (graph.py --qk) on the toy world's IOI stories ("When Tam and
Sela went to the park, Tam gave a flute to" -> Sela) and two-hop questions of held-out people, with
a trained CLT of models/tiny (--qk-clt): what `--qk auto:20` costs next to the graph, and why the
head that copies the answer attends where it does.

Per prompt:
- cost: the graph's (local replacement + attribute) and the QK step's (qk_auto + explain_heads +
  naming the pairs), the median CPU seconds of --qk-reps runs each, one thread (--threads 1);
- the answer head: the (layer, head, key j) at the last query i with the largest A_ij dlogit/dA_ij,
  logit = the answer's minus the mean (the frozen replacement model: MLP outputs fixed);
- its contrast c_ij in (query node, key node) pairs: the top query-side node (largest |Q_s · k~|,
  k~ = k_j - the pattern-weighted mean key) and key-side node (|q · K~_t|), the top feature of each
  side (its share: of the features' pulls), the share of the pulls that features carry (the rest:
  errors, tokens, positions, bias);
- ablating the top key-side *feature* t: predicted from the pairs at every key j' (the softmax
  needs them all), s'_j' = (q - Q_t) · (k_j' - K_t,j'), A' = softmax(s'), and the answer's logit
  change = t's direct effect (its edge) + sum_j' (A'_j' - A_j') dlogit/dA_j'; measured in the
  frozen replacement model with that one pattern row live (the prediction's own setting) and in
  the real model (intervene.py's ablation, nothing frozen).

    python experiments/qk.py --threads 1 --qk-clt runs/clt --qk-interp runs/interp  # after demo.py
"""

import math
import os
import sys
from dataclasses import dataclass, replace
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from matplotlib.figure import Figure

import graph
from clt import load_transcoder
from experiments.common import Bench, run_study, save_png, timed
from experiments.compactness import family_prompts
from forge import graphfile, toyworld
from forge.cli import arg, run_main
from forge.files import write_json
from forge.hub import DEFAULT_MODEL, load_tokenizer
from intervene import Intervention, run_intervened
from model import GPT

FAMILIES = ("ioi", "two_hop")


@dataclass
class QKBench(Bench):
    """QK attributions: their cost next to the graph, and the answer head's reasons"""

    qk_clt: str = arg(os.path.join("runs", "clt"), "a trained CLT of models/tiny")
    qk_interp: str = arg(os.path.join("runs", "interp"), "its interp.py output: feature labels")
    qk_prompts: int = arg(10, "prompts per family (ioi, two_hop)")
    qk_reps: int = arg(5, "timed runs of each step per prompt (the median)")
    qk_figure: str = arg(os.path.join("assets", "qk.png"), "predicted vs measured, a PNG")


def run(cfg):
    """A row per family (summary); every prompt's row in <out>/qk_prompts.json; the picture."""
    if not os.path.exists(os.path.join(cfg.qk_clt, "config.json")):
        raise FileNotFoundError(f"no CLT in {cfg.qk_clt}: run `python demo.py` or pass --qk-clt")
    model = GPT.from_pretrained(DEFAULT_MODEL).to(cfg.device).eval()
    clt = load_transcoder(cfg.qk_clt, model).to(cfg.device).eval()
    enc = load_tokenizer(DEFAULT_MODEL)
    labels = graphfile.load_explanations(cfg.qk_interp)
    prompts = family_prompts(toyworld.load_world(), cfg.qk_prompts)
    rows = []
    for family in FAMILIES:
        for prompt, answer in prompts[family]:
            idx = graph.encode_prompt(enc, prompt, model.config.n_ctx).to(cfg.device)
            row = dict(family=family, prompt=prompt, tokens=idx.size(1))
            row |= timings(model, clt, idx, cfg)
            rows.append(row | answer_head(model, clt, enc, labels, idx, answer))
            print(rows[-1])
    write_json(os.path.join(cfg.out, "qk_prompts.json"), rows)
    picture(rows, cfg.qk_figure)
    return [summary([r for r in rows if r["family"] == family]) for family in FAMILIES]


def summary(rows):
    """One family's figures: cost, the answer head, its reasons, the ablation's fit."""
    done = [r for r in rows if r["ablated"] != "-"]  # layer-0 heads: no feature to ablate
    ratio = sorted(r["qk_over_graph"] for r in rows)
    error = [r for r in rows if "_-1_" in r["top_query"].split()[0]]
    out = dict(family=rows[0]["family"], prompts=len(rows), qk_over_graph=ratio[len(ratio) // 2])
    out |= dict(p_answer=mean([r["p_answer"] for r in rows]), rank=mean([r["rank"] for r in rows]))
    out |= dict(pattern=mean([r["pattern"] for r in rows]), top_query_error=len(error) / len(rows))
    out |= dict(top_key_error=mean([float("_-1_" in r["top_key"].split()[0]) for r in rows]))
    out |= dict(query_feature_share=mean([r["query_feature_share"] for r in rows]))
    out |= dict(key_feature_share=mean([r["key_feature_share"] for r in rows]))
    for what in ("pattern", "dlogit"):
        before = [0.0 if what == "dlogit" else r["pattern"] for r in done]
        pred = [r[f"{what}_predicted"] - b for r, b in zip(done, before)]
        out[f"{what}_change"] = mean([abs(x) for x in pred])
        for kind in ("frozen", "real"):
            seen = [r[f"{what}_{kind}"] - b for r, b in zip(done, before)]
            out[f"{what}_err_{kind}"] = mean([abs(x - y) for x, y in zip(pred, seen)])
    return out


def mean(xs):
    return sum(xs) / len(xs) if xs else math.nan


def timings(model, clt, idx, cfg):
    """The graph's seconds and --qk auto:20's, medians, and the active features."""
    rep = graph.local_replacement(model, clt, idx)
    g = graph.attribute(model, clt, rep)
    infl = graph.prune(g)[3]  # pruning runs with or without --qk
    graph_s = median_cpu_seconds(partial(attribution, model, clt, idx), cfg.qk_reps)
    qk_s = median_cpu_seconds(partial(qk_auto_20, model, clt, rep, g, infl), cfg.qk_reps)
    return dict(n_active=len(rep.feats), graph_s=graph_s, qk_s=qk_s, qk_over_graph=qk_s / graph_s)


def median_cpu_seconds(fn, reps):
    """The median CPU time of reps calls of fn() after a warm-up: on a shared machine the fairer
    cost (other processes do not count in it); the study runs with --threads 1."""
    fn()
    return sorted(timed(fn)[1] for _ in range(reps))[reps // 2]


def attribution(model, clt, idx):
    graph.attribute(model, clt, graph.local_replacement(model, clt, idx))


def qk_auto_20(model, clt, rep, g, infl):
    steps = graph.qk_auto(model, clt, rep, g, infl, 20)
    records = graph.explain_heads(model, clt, rep, steps)
    graphfile.qk_records(records, rep.feats, g.tokens, g.n_layers)


def logit_and_pattern_gradients(model, clt, rep, vector):
    """(the logit vector · ln_f's output at the last position, dlogit/dA (L, nh, T, T)) in the
    frozen replacement model: qk_auto's backward with the answer's logit as T."""
    leaves = [a.detach().clone().requires_grad_() for a in rep.frozen.attn]
    free = replace(rep, frozen=replace(rep.frozen, attn=leaves))
    with torch.enable_grad():
        _, logit = graph.target_inputs(model, clt, free, rep.feats[:0], vector[None])
        grads = torch.autograd.grad(logit[0], leaves)
    return logit[0].item(), torch.cat(grads)


def answer_head(model, clt, enc, labels, idx, answer):
    """The answer head, its contrast's top query- and key-side nodes, the key feature's ablation."""
    rep = graph.local_replacement(model, clt, idx)
    a = enc.encode(answer)[0]
    W = model.wte.weight.detach()
    vector = W[a] - W.mean(0)  # the answer's logit minus the mean logit
    logit, dA = logit_and_pattern_gradients(model, clt, rep, vector)
    A = torch.cat(rep.frozen.attn)  # (L, nh, T, T)
    L, nh, T, _ = A.shape
    i = T - 1
    score = (A * dA)[:, :, i]  # (L, nh, T): each key's attribution to the answer's logit
    score[:, :, 0] = -math.inf  # BOS as a key is the sink, not a copy
    spellings = (enc.encode(answer), enc.encode(answer.strip()))  # mid-sentence, first word
    named_keys = [p for ids in spellings for p in answer_positions(idx, ids)]  # two-hop: none
    allowed = score.clone()
    if named_keys:
        allowed[:, :, [p for p in range(T) if p not in named_keys]] = -math.inf
    top = allowed.argmax().item()
    l, h, j = top // (nh * T), top // T % nh, top % T
    rank = int((score > score[l, h, j]).sum()) + 1  # among every head and key at query i
    steps = [(l, h, i, key) for key in range(T)]  # every key: the softmax needs them all
    with torch.no_grad():
        terms = graph.qk_terms(model, clt, rep, steps)
    Q, K, M, measured = terms[j]
    keys = torch.stack([k for _, k, _, _ in terms])  # (T, hs, S + 1) each key's sources
    ids = graphfile.source_ids(rep.feats, idx[0].tolist(), L)
    n = len(rep.feats)
    q_side = Q.T @ (K - M).sum(1)  # (S + 1,) each query source's pull on the contrast
    k_side = (K - M).T @ Q.sum(1)  # each key source's
    text = graphfile.token_str(enc, idx[0, j].item())
    row = dict(head=f"L{l}.H{h}", key=f"{j} {text!r}", rank=rank)
    row |= dict(pattern=measured["pattern"], contrast=measured["contrast"])
    row |= dict(top_query=named(ids, labels, q_side), top_key=named(ids, labels, k_side))
    row |= dict(query_feature_share=share(q_side, n), key_feature_share=share(k_side, n))
    row |= dict(
        query_feature=named(ids, labels, q_side[:n]), key_feature=named(ids, labels, k_side[:n])
    )
    row |= dict(p_answer=model(idx)[0, -1].softmax(-1)[a].item())
    t = k_side[:n].abs().argmax().item()  # the top key-side feature
    if k_side[t] == 0:  # no feature reaches the key (a head of layer 0): nothing to ablate
        nan = ("pattern_predicted", "pattern_frozen", "pattern_real", "dlogit_predicted")
        return (
            row
            | dict(ablated="-")
            | dict.fromkeys(nan + ("dlogit_frozen", "dlogit_real"), math.nan)
        )
    out = ablation(model, clt, rep, (l, h, i, j), Q, keys, dA[l, h, i], vector, logit, t)
    return row | out | real_change(model, clt, rep, a, t, (l, h, i, j))


def ablation(model, clt, rep, step, Q, keys, dA, vector, logit, t):
    """Ablate feature t: the pattern A_ij and the answer's logit, predicted from the pairs at every
    key and measured in the frozen replacement model with the one pattern row live."""
    l, h, i, j = step
    s = keys.sum(2) @ Q.sum(1)  # (T,) the scores from the terms (the model's within 1e-5)
    s_new = (keys.sum(2) - keys[:, :, t]) @ (Q.sum(1) - Q[:, t])  # the pairs without t's
    before, predicted = s.softmax(0), s_new.softmax(0)
    lt, p, f = rep.feats[t].tolist()
    one = slice(t, t + 1)
    writes = graph.reconstruct(clt, rep.feats[one], rep.acts[one], len(rep.token), bias=False)
    mlp_out = rep.mlp_out - rep.skip - writes  # (T, L, d) feature t's writes removed
    off = (rep.feats[:0], vector[None], None, mlp_out)
    with torch.no_grad():
        edge = graph.target_inputs(model, clt, rep, *off)[1][0].item() - logit  # t's direct effect
        q, k = graph.heads_qk(model, [l], graph.target_inputs, model, clt, rep, *off)[l]
        live = (k[h] @ q[h, i] / q.size(-1) ** 0.5).softmax(0)  # (T,) the row recomputed
        attn = [x.clone() for x in rep.frozen.attn]
        attn[l][0, h, i] = live
        moved = replace(rep, frozen=replace(rep.frozen, attn=attn))
        frozen_logit = graph.target_inputs(model, clt, moved, *off)[1][0].item()
    out = dict(ablated=f"{lt}_{f}_{p}", pattern_predicted=predicted[j].item())
    out |= dict(pattern_frozen=live[j].item())
    out |= dict(dlogit_predicted=edge + ((predicted - before) @ dA).item())
    return out | dict(dlogit_frozen=frozen_logit - logit)


def answer_positions(idx, ids):
    """The positions of the answer's tokens ids where they occur in the prompt idx (1, T)."""
    seq = idx[0].tolist()
    n = len(ids)
    return [p + k for p in range(len(seq) - n + 1) if seq[p : p + n] == ids for k in range(n)]


def real_change(model, clt, rep, a, t, step):
    """The answer head's A_ij and the answer's logit minus the mean, their change when feature t
    is ablated in the real model (intervene.py, nothing frozen)."""
    l, h, i, j = step
    lt, p, f = rep.feats[t].tolist()
    out = run_intervened(model, clt, rep.idx, [Intervention(lt, p, f, "ablate")])
    after, before = out.logits[-1], out.clean_logits[-1]
    change = (after[a] - after.mean()) - (before[a] - before.mean())
    return dict(pattern_real=out.acts.frozen.attn[l][0, h, i, j].item(), dlogit_real=change.item())


def named(ids, labels, pulls):
    """The source with the largest |pull|: its id, pull, share of sum |pulls|, label if any."""
    if not pulls.any():  # a head of layer 0 reads no feature
        return "-"
    s = pulls.abs().argmax().item()
    parts = ids[s].split("_")
    is_feature = len(parts) == 3 and parts[1] != "-1" and parts[0] != "E"
    label = labels.get((int(parts[0]), int(parts[1])), "") if is_feature else ""
    part = 100 * pulls[s].abs().item() / pulls.abs().sum().item()
    return f"{ids[s]} {pulls[s].item():+.2f} ({part:.0f} %) {label[:40]}".strip()


def share(pulls, n):
    """The features' share of sum |pulls| (the rest: errors, tokens, positions, bias)."""
    return (pulls[:n].abs().sum() / pulls.abs().sum()).item()


def picture(rows, path):
    """Predicted vs measured changes: the answer head's pattern A_ij and the answer's logit."""
    fig = Figure(figsize=(9, 4))
    axes = fig.subplots(1, 2)
    done = [r for r in rows if r["ablated"] != "-"]
    for ax, what in zip(axes, ("pattern", "dlogit")):
        for family, marker in zip(FAMILIES, "os"):
            mine = [r for r in done if r["family"] == family]
            before = [r["pattern"] if what == "pattern" else 0.0 for r in mine]
            x = [r[f"{what}_predicted"] - b for r, b in zip(mine, before)]
            for kind, color in (("frozen", "#2b6cb0"), ("real", "#c53030")):
                y = [r[f"{what}_{kind}"] - b for r, b in zip(mine, before)]
                ax.scatter(x, y, marker=marker, color=color, label=f"{family}, {kind}", s=18)
        ax.axline((0, 0), slope=1, color="#888888", lw=0.8)
        ax.set(xlabel="predicted from the QK pairs", ylabel="measured")
        what = "the answer head's A_ij" if what == "pattern" else "the answer's logit"
        ax.set_title(f"change of {what}, top key-side feature ablated", fontsize=10)
        ax.legend(fontsize=7)
    save_png(fig, path, 110)


def main(argv=None):
    return run_study(__doc__, "qk", run, QKBench, argv)


if __name__ == "__main__":
    run_main(main)

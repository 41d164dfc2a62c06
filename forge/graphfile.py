"""An attribution graph as data (Graph: the adjacency and its node order; graph.py fills it) and
its files, written whole or not at all (forge/files.py), all in one folder:

    {slug}.json             the pruned graph for circuit-tracer's front end (Neuronpedia format),
                            with graph.py --qk: a "qk" list (its reader ignores the key)
    graph-metadata.json     the folder's graphs: {"graphs": [each graph's metadata]}
    adjacency.safetensors   the unpruned adjacency with influence, masks, features and targets
    nodes.json              every node of the adjacency, with its index and whether it was kept

Nodes carry circuit-tracer's frontend/graph_models.py Node fields; token text is process_token's.
"""

import json
import os
import re
from collections import Counter, namedtuple
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlencode

import torch

from forge.browser import GRAPH_FILES
from forge.files import check_finite, commit, new_run_id, read_json, read_jsonl, save_safetensors
from forge.files import transcoder_id, uncommit, write_json
from forge.interpfile import open_features

ADJACENCY = "adjacency.safetensors"
PT = dict(format="pt")  # its metadata, with the run id
# where each kind of node sits in the node order (positions: empty unless position_nodes)
Slices = namedtuple("Slices", "features errors tokens positions logits")


@dataclass
class Graph:
    """A[target, source] over nodes [features, errors (L·T), tokens, positions (T or 0), logits]."""

    prompt: str
    tokens: list  # the T input token ids
    feats: torch.Tensor  # (n, 3) (layer, pos, id) of the feature nodes
    acts: torch.Tensor  # (n,) their activations
    logit_ids: torch.Tensor  # (k,) the output nodes' tokens (vocab_size + i: a custom target)
    logit_probs: torch.Tensor  # (k,) their weights: the tokens' probabilities, 1 for a custom one
    adjacency: torch.Tensor  # (N, N) rows: targets, columns: sources
    n_layers: int
    n_active: int  # active features before --max-features
    position_nodes: bool = False  # the position embeddings are nodes (after the tokens)
    target_vectors: Optional[torch.Tensor] = None  # (k, d) what each output node reads (ln_f)
    target_labels: list = field(default_factory=list)  # (k,) front-end text, "" for a logit

    def slices(self):
        n, T, L = len(self.feats), len(self.tokens), self.n_layers
        e = n + L * T  # where the tokens start
        p = e + T + (T if self.position_nodes else 0)  # where the logits start
        k = len(self.logit_ids)
        return Slices(slice(0, n), slice(n, e), slice(e, e + T), slice(e + T, p), slice(p, p + k))

    def logit_weights(self):
        w = self.adjacency.new_zeros(len(self.adjacency))
        w[self.slices().logits] = self.logit_probs.to(w.dtype)
        return w


def token_str(enc, t):
    """Token t's text as circuit-tracer's front end shows it (process_token)."""
    if t >= enc.n_vocab:  # a model may pad its vocabulary beyond the tokenizer's
        return f"<{t}>"
    s = enc.decode_single_token_bytes(t).decode("utf-8", errors="replace")
    return s.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def load_explanations(path, clt=""):
    """{(layer, feature): explanation} from interp.py's output `path` (a folder or its
    features.jsonl), refused if it explains another transcoder than the one in `clt`; {} for ""."""
    if not path:
        return {}
    path = open_features(path, transcoder_id(clt) if clt else None, clt)
    rows = read_jsonl(path, f"rerun `python interp.py --out {os.path.dirname(path) or '.'}`")
    return {
        (int(r["layer"]), int(r["feature"])): r.get("label") or r.get("explanation", "")
        for r in rows
    }


def node_record(node_id, feature, layer, ctx_idx, feature_type, js_id, **given):
    """A node in the fields of circuit-tracer's frontend/graph_models.py Node, defaults filled."""
    record = dict(token_prob=0.0, is_target_logit=False, run_idx=0, reverse_ctx_idx=0, clerp="")
    ids = dict(activation=None, node_id=node_id, feature=feature, layer=layer, ctx_idx=ctx_idx)
    return record | ids | dict(feature_type=feature_type, jsNodeId=js_id) | given


def node_records(graph, enc, explanations, cumulative, infl):
    """One dict per node, in the node order of the adjacency."""
    T, L = len(graph.tokens), graph.n_layers
    nodes = []
    for (l, p, f), a in zip(graph.feats.tolist(), graph.acts.tolist()):
        cantor = (l + f) * (l + f + 1) // 2 + f  # circuit-tracer's one number per (layer, id)
        kind = "cross layer transcoder"  # PLTs too: circuit-tracer's label
        ids = (f"{l}_{f}_{p}", cantor, str(l), p, kind, f"{l}_{f}-0")
        nodes.append(node_record(*ids, activation=a, clerp=explanations.get((l, f), "")))
    kind = "mlp reconstruction error"
    errors = [(l, p) for l in range(L) for p in range(T)]
    nodes += [node_record(f"{l}_-1_{p}", -1, str(l), p, kind, f"{l}_{p}-0") for l, p in errors]
    embeddings = [(t, p, token_str(enc, t)) for p, t in enumerate(graph.tokens)]
    # the positions' nodes: token -1, which no token id collides with
    embeddings += [(-1, p, f"position {p}") for p in range(T if graph.position_nodes else 0)]
    for t, p, text in embeddings:
        nodes.append(node_record(f"E_{t}_{p}", p, "E", p, "embedding", f"E_{t}-{p}", clerp=text))
    labels = graph.target_labels or [""] * len(graph.logit_ids)
    logits = zip(graph.logit_ids.tolist(), graph.logit_probs.tolist(), labels)
    for i, (t, prob, label) in enumerate(logits):
        text = label or f'Output "{token_str(enc, t)}" (p={prob:.3f})'
        ids = (f"{L + 1}_{t}_{T - 1}", t, str(L + 1), T - 1, "logit", f"L_{t}-{T - 1}")
        nodes.append(node_record(*ids, token_prob=prob, is_target_logit=i == 0, clerp=text))
    for node, c, r in zip(nodes, cumulative.tolist(), infl.tolist()):
        node.update(influence=c, influence_raw=r)
    return nodes


def top_pairs(Q, K, n, block_elements):
    """graph.explain_heads' n largest |Q[:, s] · K[:, t]| over pairs (s, t) of sources (columns of
    Q, K (hs, S)) -> (values (n,), (s, t) (n, 2)). S² terms do not fit in memory for 10k nodes:
    |Q_s · K_t| <= |Q_s| |K_t| bounds which rows and columns can beat the n-th largest of a first
    guess, and those go at most block_elements terms at a time."""
    qn = Q.square().sum(0).sqrt()  # (S,)
    kn = K.square().sum(0).sqrt()
    m = min(4 * n, len(qn))
    guess = (Q[:, qn.topk(m).indices].T @ K[:, kn.topk(m).indices]).abs().flatten()
    bar = guess.topk(min(n, len(guess))).values[-1] * 0.999  # the n largest reach it (rounding)
    qs = ((qn * kn.max() >= bar) & (qn > 0)).nonzero()[:, 0]  # (zero: fewer than n nonzero terms)
    ks = ((kn * qn.max() >= bar) & (kn > 0)).nonzero()[:, 0]
    step = max(1, block_elements // max(len(ks), 1))  # rows of Q a block
    values = Q.new_zeros(0)
    pairs = qs.new_zeros(0, 2)
    for a in range(0, len(qs), step):
        block = (Q[:, qs[a : a + step]].T @ K[:, ks]).flatten()  # (b·|ks|,)
        top = block.abs().topk(min(n, len(block))).indices
        values = torch.cat([values, block[top]])
        pairs = torch.cat([pairs, torch.stack([qs[a + top // len(ks)], ks[top % len(ks)]], 1)])
        keep = values.abs().topk(min(n, len(values))).indices
        values, pairs = values[keep], pairs[keep]
    return values, pairs


def source_ids(feats, tokens, n_layers):
    """The names of QK's sources (graph.qk_terms' columns), as in nodes.json: the features feats
    (n, 3) (all active ones), errors, tokens; then the position embeddings "pos@{p}", "bias"."""
    T = len(tokens)
    ids = [f"{l}_{f}_{p}" for l, p, f in feats.tolist()]
    ids += [f"{l}_-1_{p}" for l in range(n_layers) for p in range(T)]
    return (
        ids
        + [f"E_{t}_{p}" for p, t in enumerate(tokens)]
        + [f"pos@{p}" for p in range(T)]
        + ["bias"]
    )


def qk_records(steps, feats, tokens, n_layers):
    """graph.explain_heads' entries as the JSON's "qk" list, sources named by source_ids."""
    ids = source_ids(feats, tokens, n_layers)
    keys = ("layer", "head", "query_pos", "key_pos", "pattern", "score", "contrast")
    out = []
    for step in steps:
        record = {k: step[k] for k in keys}
        for name in ("", "contrast_"):
            pairs = step[name + "pairs"]
            record[name + "pairs"] = [dict(query=ids[s], key=ids[t], value=v) for s, t, v in pairs]
            record[name + "rest"] = step[name + "rest"]
        out.append(record)
    return out


QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')  # a JSON string in a label
FRONTEND_PORT = 8041  # `python -m circuit_tracer start-server`'s default --port


def group_label(labels, n_terms=2):
    """A supernode's label from its members' (most influential first): on each side of the arrow
    (interp.py's label_text; " | promotes " in an explanation) the n_terms most common terms."""
    sides = [re.split(r" → | \| promotes ", label, maxsplit=1) + [""] for label in labels]
    common = []
    for k in range(2):  # input side, output side; ties: the most influential member's first
        terms = Counter(t for s in sides for t in dict.fromkeys(QUOTED.findall(s[k])))
        common.append(", ".join(t for t, _ in terms.most_common(n_terms)))
    return f"{common[0]} → {common[1]}" if common[1] else common[0]


def frontend_qparams(nodes, mask, groups):
    """qParams for circuit-tracer's front end: the kept nodes pinned, each group of two or more
    as a supernode [label, member node ids...]; its page reads supernodes from the URL alone
    (init-cg.js replaces qParams.supernodes with the URL's, [] without one): frontend_url."""
    pinned = [node["node_id"] for node, m in zip(nodes, mask) if m]
    supers = []
    for g in (g for g in groups if len(g) > 1):
        members = sorted(g, key=lambda i: -nodes[i]["influence_raw"])
        label = group_label([nodes[i]["clerp"] for i in members]) or f"{len(g)} features"
        while label in (s[0] for s in supers):  # the page names a supernode by its label
            label += "'"
        supers.append([label] + [nodes[i]["node_id"] for i in members])
    return dict(pinnedIds=pinned, supernodes=supers, linkType="both", clickedId="", sg_pos="")


def frontend_url(slug, qparams, port=FRONTEND_PORT):
    """The page with the graph's supernodes, for `python -m circuit_tracer start-server`."""
    query = dict(slug=slug, pinnedIds=",".join(qparams["pinnedIds"]))
    query.update(supernodes=json.dumps(qparams["supernodes"], ensure_ascii=False))
    return f"http://localhost:{port}/index.html?{urlencode(query)}"


def save_graph(graph, enc, cfg, pruned, scores, explanations, qk=(), groups=()):
    """Write the folder cfg.out -> (kept nodes, links, the front end's URL). pruned: prune's
    (node_mask, edge_mask, cumulative, influence) on the CPU; scores: (replacement, completeness);
    qk: qk_records'; groups: graph.py's supernodes, lists of feature node indices."""
    node_mask, edge_mask, cumulative, infl = pruned
    check_finite(dict(adjacency=graph.adjacency, activations=graph.acts), f"the graph of {cfg.clt}")
    run_id = new_run_id()  # every file of this folder's graph carries it; commit.json lists it
    if os.path.isdir(cfg.out):  # viz.py's drawing of the graph this run replaces: no longer its
        uncommit(cfg.out, [cfg.slug + ext for ext in GRAPH_FILES])
    nodes = node_records(graph, enc, explanations, cumulative, infl)
    ids = [node["node_id"] for node in nodes]
    A = graph.adjacency.cpu()
    dst, src = edge_mask.nonzero(as_tuple=True)
    ends = zip(src.tolist(), dst.tolist(), A[dst, src].tolist())
    links = [dict(source=ids[s], target=ids[t], weight=w) for s, t, w in ends]
    targets = [node["clerp"] for node in nodes if node["feature_type"] == "logit"]
    info = dict(model=cfg.model, clt=cfg.clt, clt_export_id=transcoder_id(cfg.clt))
    info |= dict(replacement_score=scores[0])
    info |= dict(completeness_score=scores[1], n_active_features=graph.n_active)
    info |= dict(n_feature_nodes=len(graph.feats), position_nodes=graph.position_nodes)
    thresholds = dict(node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)
    # scan: where circuit-tracer's front end fetches a node's features, {scan}/{feature}.json, its
    # server reading ./data/ from this folder: the files `viz.py graph` writes to {out}/features/
    tokens = [token_str(enc, t) for t in graph.tokens]
    meta = dict(slug=cfg.slug, scan="./data/features", transcoder_list=[], prompt_tokens=tokens)
    meta |= dict(prompt=graph.prompt, node_threshold=cfg.node_threshold, schema_version=1)
    meta |= dict(run_id=run_id)
    meta |= dict(pruning_settings=thresholds, info=info | dict(targets=targets))
    mask = node_mask.tolist()
    qparams = frontend_qparams(nodes, mask, [g.tolist() for g in groups])
    os.makedirs(cfg.out, exist_ok=True)
    kept = [node for node, m in zip(nodes, mask) if m]
    front_end = dict(metadata=meta, qParams=qparams, nodes=kept, links=links)
    front_end |= dict(qk=list(qk)) if qk else {}  # circuit-tracer's reader ignores the key
    write_json(os.path.join(cfg.out, f"{cfg.slug}.json"), front_end, indent=None)
    index_path = os.path.join(cfg.out, "graph-metadata.json")  # the folder's graphs, this one last
    index = {"graphs": []}
    if os.path.exists(index_path):
        index = read_json(index_path, f"delete it and rerun graph.py --out {cfg.out}")
    index["graphs"] = [g for g in index["graphs"] if g["slug"] != cfg.slug] + [meta]
    write_json(index_path, index, indent=2)
    tensors = dict(adjacency=A, influence=infl, node_mask=node_mask, edge_mask=edge_mask)
    tensors |= dict(features=graph.feats, activations=graph.acts)
    tensors |= dict(input_tokens=torch.tensor(graph.tokens), logit_tokens=graph.logit_ids)
    tensors |= dict(logit_probabilities=graph.logit_probs, target_vectors=graph.target_vectors)
    tensors = {k: (t.float() if t.is_floating_point() else t).cpu() for k, t in tensors.items()}
    save_safetensors(os.path.join(cfg.out, ADJACENCY), tensors, metadata=PT | dict(run_id=run_id))
    table = [node | dict(index=i, kept=m) for i, (node, m) in enumerate(zip(nodes, mask))]
    write_json(os.path.join(cfg.out, "nodes.json"), dict(metadata=meta, nodes=table), indent=None)
    commit(cfg.out, run_id, [f"{cfg.slug}.json", "graph-metadata.json", ADJACENCY, "nodes.json"])
    return len(kept), len(links), frontend_url(cfg.slug, qparams)

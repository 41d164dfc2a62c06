"""
graph.py: attribution graphs: which CLT features, through which layers, produce a prediction.

For one prompt we build the local replacement model of Ameisen et al. 2025 ("Circuit Tracing:
Revealing Computational Graphs in Language Models", sec. 3), take the exact direct linear effect
of every node on every other, prune by influence on the logits, and write files that
circuit-tracer's front end (the Neuronpedia graph format) opens.

Data flow:
    prompt -> token ids, BOS (<|endoftext|>) first
      -> GPT.run_with_acts: mlp_in, mlp_out (T, L, d) and Frozen (attention patterns, LN scales)
      -> CLT: active features (none at BOS), reconstruction, error = mlp_out - reconstruction
      -> one frozen forward on batch_size copies of the prompt, kept; one backward per batch of
         targets (row b of the batch holds target b) -> adjacency A (targets x sources)
      -> influence, pruning, scores -> {out}/{slug}.json, graph-metadata.json (front end),
         adjacency.safetensors + nodes.json (the full graph)

    python graph.py --prompt "Batris lives in Fafes. The language Batris speaks is" --out runs/graph
    python graph.py intervene --feature 3/5/123 --scale 0 --prompt "..."  # 0 ablate, -1 flip, 4 steer
    python graph.py --model gpt2 --clt runs/clt-gpt2 --prompt "..."       # any GPT-2 and its CLT
    tiny CPU run: python train.py (writes runs/clt), then python graph.py --max-features 300
    (one process: attribution is a sequence of backward passes, so there is no torchrun path)
    view: python -m circuit_tracer start-server --graph_file_dir runs/graph (circuit-tracer installed)

Definitions (circuit-tracer's: safety-research/circuit-tracer, circuit_tracer/graph.py):
    Nodes, in order: active features sorted by (layer, position, id); error nodes, layer-major
    (index layer*T + pos); one embedding node per position; logit nodes, most likely first: the
    top tokens until cumulative probability 0.95, at most 10, each logit minus the mean logit.
    Edge A[t, s]: the direct effect of source s on target t's input (a feature's pre-activation,
    or a logit): t's input changes by A[t, s] when s is scaled from 0 to its value with every MLP
    output (features, errors) held fixed, so only the frozen residual stream and the attention
    OV paths carry it. A feature of layer l writes a·W_dec[l][f, l'-l] to every mlp_out[l'],
    l' >= l; its edge sums all of them. t's input = sum_s A[t, s] + bias_t exactly, where bias_t
    is t's input with every source at zero (b_dec, b_enc, attention and LayerNorm biases).
    Influence: Â = |A| with rows normalized to sum 1, w = the logit probabilities on the logit
    nodes; influence = w (Â + Â² + ...) = w ((I - Â)^-1 - I); A is nilpotent (edges run up the
    layers) so the series ends after at most L + 2 terms.
    Pruning: keep nodes up to cumulative influence 0.8 (tokens and logits always), then edges by
    Â[t, s] (influence_t + w_t) in the pruned graph up to 0.98, then drop features and errors
    without outgoing edges and features without incoming ones until nothing changes.
    Replacement score = infl(embeddings) / (infl(embeddings) + infl(errors)): the fraction of the
    end-to-end influence of the tokens on the logits that avoids error nodes.
    Completeness score = sum_t (1 - sum_{s error} Â[t, s]) (infl_t + w_t) / sum_t (infl_t + w_t):
    the influence-weighted fraction of the nodes' inputs that comes from non-error nodes.
    Both lie in [0, 1] and are 1 when every error node is zero.

Differences from circuit-tracer:
- An embedding node is the token plus the position embedding (GPT-2 adds both before block 0).
- Gradients are taken against the embeddings and the MLP outputs as leaf tensors of one frozen
  forward (plain autograd), not injected by hooks into a TransformerLens model.
- Error node ids are "{layer}_-1_{pos}" (the feature-node pattern with feature -1): circuit-tracer's
  "0_{layer}_{pos}" collides with the id of feature number `layer` of layer 0 at that position.
- With --max-features, the dropped features' edges are gone (as in circuit-tracer), so a capped
  graph no longer sums exactly to its targets' inputs; the printed exactness check shows by how much.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from clt import DEFAULT_MODEL, ENDOFTEXT, GPT, CrossLayerTranscoder, Frozen, check_same_model, load_tokenizer

# -----------------------------------------------------------------------------
# configuration


@dataclass
class GraphConfig:
    model: str = DEFAULT_MODEL  # GPT-2 directory in the hub layout, or a hub id such as gpt2
    clt: str = "runs/clt"  # CLT directory (CrossLayerTranscoder.save_pretrained; train.py writes it)
    interp: str = "runs/interp"  # interp.py's output: features.jsonl gives the nodes' explanations
    prompt: str = "Batris lives in Fafes. The language Batris speaks is"  # BOS is prepended; a two-hop toy prompt
    out: str = "runs/graph"  # output directory
    slug: str = "graph"  # the graph's name in the front end: {out}/{slug}.json
    max_features: int = -1  # keep at most this many feature nodes, the weakest dropped; -1 = all
    batch_size: int = 64  # targets per backward pass
    max_logits: int = 10  # at most this many logit nodes
    logit_prob: float = 0.95  # logit nodes until this cumulative probability
    node_threshold: float = 0.8  # pruning: keep nodes up to this cumulative influence
    edge_threshold: float = 0.98  # pruning: keep edges up to this cumulative influence
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where to compute
    feature: str = ""  # intervene: the feature LAYER/POS/ID, or several comma-separated
    scale: float = 0.0  # intervene: multiply its decoder writes by this (0 ablate, -1 flip, >1 steer)
    top: int = 10  # intervene: rows of probability changes to print


# -----------------------------------------------------------------------------
# the local replacement model


@dataclass
class Replacement:
    """The local replacement model of one prompt: the frozen GPT, the CLT features and errors."""
    idx: torch.Tensor  # (1, T) token ids, BOS first
    frozen: Frozen  # attention patterns and LayerNorm scales of the prompt's forward pass
    embed: torch.Tensor  # (T, d) token + position embeddings: the embedding nodes
    mlp_out: torch.Tensor  # (T, L, d) the true MLP outputs
    recon: torch.Tensor  # (T, L, d) the CLT's reconstruction from the active features, b_dec included
    error: torch.Tensor  # (T, L, d) mlp_out - recon: the error nodes
    feats: torch.Tensor  # (n, 3) (layer, pos, id) of the active features, sorted
    acts: torch.Tensor  # (n,) their activations
    logits: torch.Tensor  # (V,) the next-token logits


def check_compatible(model, clt):
    c, g = clt.config, model.config
    if (c.n_layers, c.d_model) != (g.n_layer, g.n_embd):
        raise ValueError(f"the CLT was made for another model: it has n_layers={c.n_layers}, "
                         f"d_model={c.d_model}, the GPT has n_layer={g.n_layer}, n_embd={g.n_embd} "
                         f"(the CLT's config names model {c.model!r})")


def encode_prompt(enc, prompt, n_ctx):
    """Text -> (1, T) token ids with BOS first, as circuit-tracer's tokenizers give them."""
    if not prompt.strip():
        raise ValueError(f"the prompt is empty ({prompt!r}): give --prompt some text")
    bos = enc.encode_single_token(ENDOFTEXT)
    ids = enc.encode(prompt, allowed_special={ENDOFTEXT})
    ids = ids if ids[0] == bos else [bos] + ids
    if len(ids) > n_ctx:
        raise ValueError(f"the prompt is {len(ids)} tokens with BOS, longer than the model's n_ctx={n_ctx}")
    return torch.tensor([ids])


def reconstruct(clt, feats, acts, T, bias=True):
    """The CLT's output (T, L, d) from the active features (n, 3) with activations acts (n,),
    summed in the working dtype (clt.decode sums in fp32, for bf16 training), b_dec if bias."""
    out = (clt.b_dec / clt.output_scale[:, None] * bias).detach().expand(T, -1, -1).clone()  # (T, L, d)
    for l in range(clt.config.n_layers):
        mine = feats[:, 0] == l
        out[:, l:].index_add_(0, feats[mine, 1], clt.decoder_writes(l, feats[mine, 2], acts[mine]).detach())
    return out


@torch.no_grad()
def local_replacement(model, clt, idx):
    """Run the GPT once on idx (1, T); encode its MLP inputs with the CLT; split each MLP output
    into the CLT's reconstruction and an error node, so recon + error gives back the model."""
    check_compatible(model, clt)
    model.check_input(idx)
    if idx.size(0) != 1:
        raise ValueError(f"attribute one prompt at a time, got a batch of {idx.size(0)}")
    logits, acts = model.run_with_acts(idx)
    mlp_in, mlp_out = acts.mlp_in[0], acts.mlp_out[0]  # (T, L, d)
    a = clt.encode(mlp_in)  # (T, L, F)
    a[0] = 0  # no features at BOS: its large, constant activations go to its error nodes (circuit-tracer)
    l, p, f = a.transpose(0, 1).nonzero(as_tuple=True)  # sorted by layer, then position, then id
    feats = torch.stack([l, p, f], 1)
    recon = reconstruct(clt, feats, a[p, l, f], idx.size(1))  # (T, L, d)
    return Replacement(idx, acts.frozen, model.embed(idx)[0], mlp_out, recon, mlp_out - recon,
                       feats, a[p, l, f], logits[0, -1])


@torch.no_grad()
def target_inputs(model, clt, rep, feats, logit_ids, resid=None, mlp_out=None):
    """The targets' inputs in the frozen replacement model fed with the given sources (defaults:
    the prompt's): (n,) feature pre-activations and (k,) logits minus the mean logit."""
    resid = rep.embed if resid is None else resid  # (T, d)
    mlp_out = rep.recon + rep.error if mlp_out is None else mlp_out  # (T, L, d)
    logits, acts = model.run_with_acts(rep.idx, mlp_out=mlp_out[None], frozen=rep.frozen, resid=resid[None])
    logits = logits[0, -1]
    pre = clt.pre_acts(acts.mlp_in[0])  # (T, L, F)
    l, p, f = feats.T
    return pre[p, l, f], (logits - logits.mean())[logit_ids]


def salient_logits(logits, max_logits, logit_prob):
    """The most likely tokens until their cumulative probability reaches logit_prob, at most max_logits."""
    probs, ids = logits.softmax(-1).topk(min(max_logits, logits.numel()))
    k = int(torch.searchsorted(probs.cumsum(0), logit_prob)) + 1
    return ids[:k], probs[:k]


# -----------------------------------------------------------------------------
# edges: batched backward passes through the frozen replacement model


class Attribution:
    """One forward of the frozen replacement model on `batch` copies of the prompt, kept for many
    backward passes. Row b of a backward carries target b, so each pass gives `batch` rows of A;
    attention mixes positions only within a row. Cost: (n + k) / batch backward passes of fixed
    cost, so linear in the active features n; contracting the gradients with the n sources adds
    n²·L·d in all (the adjacency is n²), smaller than the backward passes until n ~ 8·T·d."""

    def __init__(self, model, clt, rep, batch):
        T, L, d = rep.mlp_out.shape
        with torch.enable_grad():
            self.resid = rep.embed.expand(batch, T, d).clone().requires_grad_()  # (B, T, d)
            self.mlp_out = (rep.recon + rep.error).expand(batch, T, L, d).clone().requires_grad_()  # (B, T, L, d)
            logits, acts = model.run_with_acts(rep.idx.expand(batch, T), mlp_out=self.mlp_out, frozen=rep.frozen,
                                               resid=self.resid)
            logits = logits[:, -1]  # (B, V)
            self.logits = logits - logits.mean(-1, keepdim=True)  # the (B, T, V) logits are freed here
            self.mlp_in = acts.mlp_in  # (B, T, L, d)
        self.rep, self.batch = rep, batch
        l, p, f = rep.feats.T
        self.enc = (clt.W_enc[l, :, f] * clt.input_scale[l, None]).detach()  # (n, d) encoder rows, raw units
        self.groups = []  # per (layer, position): the features' decoder writes a·W_dec, (n_g, (L-l)·d)
        for l, p in torch.unique(rep.feats[:, :2], dim=0).tolist():
            ids = ((rep.feats[:, 0] == l) & (rep.feats[:, 1] == p)).nonzero()[:, 0]
            self.groups.append((ids, p, l, clt.decoder_writes(l, rep.feats[ids, 2], rep.acts[ids]).detach().flatten(1)))

    def rows(self, objective, n):
        """objective = sum over rows b < n of target b's input -> (n, n_sources) rows of A."""
        with torch.enable_grad():
            g_resid, g_mlp = torch.autograd.grad(objective, [self.resid, self.mlp_out], retain_graph=True,
                                                 allow_unused=True, materialize_grads=True)
        g_resid, g_mlp = g_resid[:n], g_mlp[:n]  # (n, T, d), (n, T, L, d)
        feat = g_mlp.new_zeros(n, len(self.rep.feats))
        for ids, p, l, dec in self.groups:
            feat[:, ids] = g_mlp[:, p, l:].flatten(1) @ dec.T  # every layer the feature writes to
        err = torch.einsum("btld,tld->blt", g_mlp, self.rep.error).flatten(1)  # (n, L·T) layer-major
        emb = torch.einsum("btd,td->bt", g_resid, self.rep.embed)  # (n, T)
        return torch.cat([feat, err, emb], dim=1).detach()

    def feature_rows(self, ids):
        """Rows of A for the feature targets ids (at most `batch`): their pre-activations' inputs."""
        n, b = len(ids), torch.arange(len(ids), device=ids.device)
        l, p = self.rep.feats[ids, 0], self.rep.feats[ids, 1]
        return self.rows((self.mlp_in[b, p, l] * self.enc[ids]).sum(), n)

    def logit_rows(self, token_ids):
        n = len(token_ids)
        return self.rows(self.logits[torch.arange(n, device=token_ids.device), token_ids].sum(), n)


@dataclass
class Graph:
    """A[target, source] over nodes [features, errors (L·T), embeddings (T), logits (k)]."""
    prompt: str
    tokens: list  # the T input token ids
    feats: torch.Tensor  # (n, 3) (layer, pos, id) of the feature nodes
    acts: torch.Tensor  # (n,) their activations
    logit_ids: torch.Tensor  # (k,) the logit nodes' tokens
    logit_probs: torch.Tensor  # (k,) their probabilities
    adjacency: torch.Tensor  # (N, N) rows: targets, columns: sources
    n_layers: int
    n_active: int  # active features before --max-features

    def slices(self):
        n, T, L = len(self.feats), len(self.tokens), self.n_layers
        e = n + L * T
        return slice(0, n), slice(n, e), slice(e, e + T), slice(e + T, e + T + len(self.logit_ids))

    def logit_weights(self):
        w = self.adjacency.new_zeros(len(self.adjacency))
        w[self.slices()[3]] = self.logit_probs.to(w.dtype)
        return w


def attribute(model, clt, rep, prompt="", max_features=-1, batch_size=64, max_logits=10, logit_prob=0.95):
    """The attribution graph of the replacement model rep: logit rows first, then feature rows.
    With max_features, features are taken most influential first, influence being measured on
    the rows computed so far (circuit-tracer's order); the rest are dropped."""
    n, (T, L, _) = len(rep.feats), rep.mlp_out.shape
    cap = n if max_features < 0 else min(max_features, n)
    logit_ids, logit_probs = salient_logits(rep.logits, max_logits, logit_prob)
    k, n_src = len(logit_ids), n + L * T + T
    # A's rows in their final order (features, errors and embeddings: no inputs, logits); feature rows
    # are filled in the order computed, which is feature order unless capped: then no copy is needed
    rows = rep.embed.new_zeros(cap + L * T + T + k, n_src + k)
    row_node = torch.cat([torch.zeros(cap, dtype=torch.long), torch.arange(n, n_src + k)])  # each row's node
    att = Attribution(model, clt, rep, max(k, min(batch_size, cap)))
    rows[-k:, :n_src] = att.logit_rows(logit_ids)
    weights = rows.new_zeros(n_src + k)
    weights[n_src:] = logit_probs.to(rows.dtype)
    todo, done = torch.ones(n, dtype=torch.bool), 0
    for _ in tqdm(range(0, cap, att.batch), desc="feature rows", disable=cap <= att.batch):
        order = todo.nonzero()[:, 0]
        if cap < n:  # circuit-tracer: the remaining features by influence through the rows so far
            infl = influence(normalized(rows), weights, row_node)[:n].cpu()
            order = order[infl[todo].argsort(descending=True, stable=True)]
        ids = order[:min(att.batch, cap - done)]
        rows[done:done + len(ids), :n_src] = att.feature_rows(ids.to(rep.feats.device))
        row_node[done:done + len(ids)], todo[ids] = ids, False
        done += len(ids)
    kept = row_node[:cap].sort()
    if cap < n:  # keep the computed features' rows and columns, in feature order
        cols = torch.cat([kept.values, torch.arange(n, n_src + k)]).to(rows.device)
        rows = rows[torch.cat([kept.indices, torch.arange(cap, len(rows))]).to(rows.device)][:, cols]
    ids = kept.values.to(rep.feats.device)
    return Graph(prompt, rep.idx[0].tolist(), rep.feats[ids], rep.acts[ids], logit_ids, logit_probs, rows, L, n)


@torch.no_grad()
def exactness(model, clt, rep, graph):
    """max over targets of |sum_s A[t, s] + bias_t - input_t|, and the largest |input_t|."""
    feats, logit_ids = graph.feats.to(rep.idx.device), graph.logit_ids.to(rep.idx.device)
    inputs = torch.cat(target_inputs(model, clt, rep, feats, logit_ids))
    b_dec = reconstruct(clt, feats[:0], rep.acts[:0], len(rep.embed))  # (T, L, d) no features: b_dec only
    bias = torch.cat(target_inputs(model, clt, rep, feats, logit_ids, torch.zeros_like(rep.embed), b_dec))
    fs, _, _, ls = graph.slices()
    A = graph.adjacency.to(inputs.device)
    total = torch.cat([A[fs].sum(1), A[ls].sum(1)]) + bias
    return (total - inputs).abs().max().item(), inputs.abs().max().item()


# -----------------------------------------------------------------------------
# influence, pruning, scores (circuit-tracer's definitions, see the module docstring)


def normalized(A):
    """|A| with each row scaled to sum 1 (rows of zeros stay zero)."""
    a = A.abs()
    return a.div_(a.sum(1, keepdim=True).clamp(min=1e-10))


def influence(A_hat, w, row_node=None):
    """w (Â + Â² + ...) = w ((I - Â)^-1 - I), term by term. A_hat may hold only some rows: row i
    is then node row_node[i]'s (circuit-tracer's partial influence, for --max-features)."""
    row_node = torch.arange(len(A_hat), device=A_hat.device) if row_node is None else row_node
    total, cur = torch.zeros_like(w), w[row_node] @ A_hat
    for _ in range(len(w) + 1):  # nilpotent: ends after the longest path, at most L + 2 terms
        if not cur.any():
            return total
        total += cur
        cur = cur[row_node] @ A_hat
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def cumulative_threshold(scores, fraction):
    """The smallest score kept when keeping the largest scores up to `fraction` of their sum."""
    s = scores.flatten().sort(descending=True).values
    if len(s) == 0:
        return scores.new_tensor(float("inf"))
    cum = s.cumsum(0) / s.sum().clamp(min=1e-30)
    return s[min(int(torch.searchsorted(cum, fraction)), len(s) - 1)]


def prune(graph, node_threshold=0.8, edge_threshold=0.98):
    """-> (node_mask (N,), edge_mask (N, N), cumulative influence rank (N,), raw influence (N,))."""
    if not (0 <= node_threshold <= 1 and 0 <= edge_threshold <= 1):
        raise ValueError(f"thresholds must lie in [0, 1], got {node_threshold}, {edge_threshold}")
    fs, es, ts, ls = graph.slices()
    A, w = graph.adjacency, graph.logit_weights()
    infl = influence(normalized(A), w)
    node_mask = infl >= cumulative_threshold(infl, node_threshold)
    node_mask[ts.start:] = True  # embeddings and logits always stay
    edge_score = normalized(A * (node_mask[:, None] & node_mask[None, :]))  # Â of the pruned graph
    edge_score *= (influence(edge_score, w) + w)[:, None]
    edge_mask = edge_score > 0
    edge_mask &= edge_score >= cumulative_threshold(edge_score[edge_mask], edge_threshold)  # the zeros add nothing
    while True:  # features and errors need an outgoing edge, features an incoming one
        old = node_mask.clone()
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        node_mask[:ts.start] &= edge_mask[:, :ts.start].any(0)
        node_mask[fs] &= edge_mask[fs].any(1)
        if torch.equal(old, node_mask):
            break
    order = infl.argsort(descending=True)
    cumulative = torch.empty_like(infl)
    cumulative[order] = infl[order].cumsum(0) / infl.sum().clamp(min=1e-30)
    return node_mask, edge_mask, cumulative, infl


def scores(graph):
    """(replacement score, completeness score), circuit-tracer's definitions (module docstring)."""
    _, es, ts, _ = graph.slices()
    A_hat, w = normalized(graph.adjacency), graph.logit_weights()
    infl = influence(A_hat, w)
    token, error = infl[ts].sum(), infl[es].sum()
    replacement = token / (token + error).clamp(min=1e-30)
    out = infl + w
    completeness = ((1 - A_hat[:, es].sum(1)) * out).sum() / out.sum()
    return replacement.item(), completeness.item()


# -----------------------------------------------------------------------------
# export: circuit-tracer's Neuronpedia JSON, and the full graph in safetensors + JSON


def token_str(enc, t):
    if t >= enc.n_vocab:  # a model may pad its vocabulary beyond the tokenizer's (never predicted once trained)
        return f"<{t}>"
    s = enc.decode_single_token_bytes(t).decode("utf-8", errors="replace")
    return s.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")  # as circuit-tracer's process_token


def load_explanations(path):
    """{(layer, feature): explanation} from interp.py's features.jsonl; {} if there is none."""
    path = os.path.join(path, "features.jsonl") if os.path.isdir(path) else path
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {(int(r["layer"]), int(r["feature"])): r.get("explanation", "") for r in rows}


def node_records(graph, enc, explanations, cumulative, infl):
    """One dict per node, in the fields of circuit-tracer's frontend/graph_models.py Node."""
    T, L, nodes = len(graph.tokens), graph.n_layers, []
    base = lambda **kw: dict(token_prob=0.0, is_target_logit=False, run_idx=0, reverse_ctx_idx=0, clerp="",
                             activation=None, **kw)
    for (l, p, f), a in zip(graph.feats.tolist(), graph.acts.tolist()):
        nodes.append(base(node_id=f"{l}_{f}_{p}", feature=(l + f) * (l + f + 1) // 2 + f, layer=str(l), ctx_idx=p,
                          feature_type="cross layer transcoder", jsNodeId=f"{l}_{f}-0") | dict(
                          activation=a, clerp=explanations.get((l, f), "")))
    for l in range(L):
        for p in range(T):
            nodes.append(base(node_id=f"{l}_-1_{p}", feature=-1, layer=str(l), ctx_idx=p,
                              feature_type="mlp reconstruction error", jsNodeId=f"{l}_{p}-0"))
    for p, t in enumerate(graph.tokens):
        nodes.append(base(node_id=f"E_{t}_{p}", feature=p, layer="E", ctx_idx=p, feature_type="embedding",
                          jsNodeId=f"E_{t}-{p}") | dict(clerp=token_str(enc, t) if enc else ""))
    for i, (t, prob) in enumerate(zip(graph.logit_ids.tolist(), graph.logit_probs.tolist())):
        s = token_str(enc, t) if enc else str(t)
        nodes.append(base(node_id=f"{L + 1}_{t}_{T - 1}", feature=t, layer=str(L + 1), ctx_idx=T - 1,
                          feature_type="logit", jsNodeId=f"L_{t}-{T - 1}") | dict(
                          token_prob=prob, is_target_logit=i == 0, clerp=f'Output "{s}" (p={prob:.3f})'))
    for node, c, r in zip(nodes, cumulative.tolist(), infl.tolist()):
        node.update(influence=c, influence_raw=r)
    return nodes


def save_graph(graph, cfg, enc, model_name, clt_name):
    """Write {slug}.json + graph-metadata.json (the front end) and adjacency.safetensors + nodes.json."""
    node_mask, edge_mask, cumulative, infl = (x.cpu() for x in prune(graph, cfg.node_threshold, cfg.edge_threshold))
    replacement, completeness = scores(graph)
    nodes = node_records(graph, enc, load_explanations(cfg.interp), cumulative, infl)
    A = graph.adjacency.cpu()
    dst, src = edge_mask.nonzero(as_tuple=True)
    links = [dict(source=nodes[s]["node_id"], target=nodes[t]["node_id"], weight=w)
             for s, t, w in zip(src.tolist(), dst.tolist(), A[dst, src].tolist())]
    meta = dict(slug=cfg.slug, scan=os.path.basename(os.path.normpath(clt_name)), transcoder_list=[],
                prompt_tokens=[token_str(enc, t) for t in graph.tokens] if enc else [str(t) for t in graph.tokens],
                prompt=graph.prompt, node_threshold=cfg.node_threshold, schema_version=1,
                pruning_settings=dict(node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold),
                info=dict(model=model_name, clt=clt_name, replacement_score=replacement,
                          completeness_score=completeness, n_active_features=graph.n_active,
                          n_feature_nodes=len(graph.feats)))
    qparams = dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    os.makedirs(cfg.out, exist_ok=True)
    kept = [nd for nd, m in zip(nodes, node_mask.tolist()) if m]
    with open(os.path.join(cfg.out, f"{cfg.slug}.json"), "w") as f:
        json.dump(dict(metadata=meta, qParams=qparams, nodes=kept, links=links), f)
    index_path = os.path.join(cfg.out, "graph-metadata.json")
    index = json.load(open(index_path)) if os.path.exists(index_path) else {"graphs": []}
    index["graphs"] = [g for g in index["graphs"] if g["slug"] != cfg.slug] + [meta]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
    save_file({"adjacency": A.float().contiguous(), "influence": infl.float(), "node_mask": node_mask,
               "edge_mask": edge_mask, "features": graph.feats.cpu().contiguous(), "activations": graph.acts.float().cpu(),
               "input_tokens": torch.tensor(graph.tokens), "logit_tokens": graph.logit_ids.cpu(),
               "logit_probabilities": graph.logit_probs.float().cpu()},
              os.path.join(cfg.out, "adjacency.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(cfg.out, "nodes.json"), "w") as f:
        json.dump(dict(metadata=meta, nodes=[nd | dict(index=i, kept=m) for i, (nd, m) in
                                             enumerate(zip(nodes, node_mask.tolist()))]), f)
    return replacement, completeness, int(node_mask.sum()), len(links)


# -----------------------------------------------------------------------------
# interventions: check a hypothesis read off a graph on the real model


def parse_features(spec, L, T, F_):
    """"LAYER/POS/ID[,LAYER/POS/ID...]" -> (n, 3) long tensor."""
    out = []
    for one in spec.split(","):
        parts = one.strip().split("/")
        if len(parts) != 3 or not all(x.lstrip("-").isdigit() for x in parts):
            raise ValueError(f"--feature must be LAYER/POS/ID (comma-separated for several), e.g. 3/5/123, got {spec!r}")
        l, p, f = map(int, parts)
        if not (0 <= l < L and 0 <= p < T and 0 <= f < F_):
            raise ValueError(f"--feature {one}: need 0 <= layer < {L}, 0 <= pos < {T} (prompt tokens), 0 <= id < {F_}")
        out.append((l, p, f))
    return torch.tensor(out)


@torch.no_grad()
def intervene(model, clt, idx, feats, scale):
    """Run the real model with the decoder writes of features feats (n, 3) (layer, pos, id) times
    scale: MLP output l' >= layer at pos gets (scale - 1)·a·W_dec[layer][id, l' - layer] more, its
    activation a taken from the clean run. Later MLPs and attention respond as they do.
    -> (clean logits (V,), new logits (V,), activations (n,))."""
    check_compatible(model, clt)
    logits, acts = model.run_with_acts(idx)
    a = clt.encode(acts.mlp_in[0])  # (T, L, F)
    l, p, f = feats.to(a.device).T
    for i in (a[p, l, f] == 0).nonzero()[:, 0].tolist():
        here = a[p[i], l[i]]
        top = [f"{j} ({v:.3g})" for v, j in zip(*here.topk(min(5, int((here != 0).sum()))))] if here.any() else []
        raise ValueError(f"feature {l[i]}/{p[i]}/{f[i]} does not fire on this prompt; active there: {top or 'none'}")
    delta = reconstruct(clt, feats.to(a.device), (scale - 1) * a[p, l, f], idx.size(1), bias=False)  # (T, L, d)
    add = lambda layer: lambda module, inputs, out: out + delta[:, layer]
    handles = [block.mlp.register_forward_hook(add(i)) for i, block in enumerate(model.h)]
    try:
        new = model(idx)
    finally:
        for h in handles:
            h.remove()
    return logits[0, -1], new[0, -1], a[p, l, f]


# -----------------------------------------------------------------------------
# command line


def load(cfg):
    if not os.path.exists(os.path.join(cfg.clt, "config.json")):
        raise FileNotFoundError(f"no CLT at {cfg.clt}: train one first, `python cache.py --model models/tiny "
                                f"--corpus toy --out runs/cache && python train.py` (writes runs/clt), or pass --clt DIR")
    model = GPT.from_pretrained(cfg.model).to(cfg.device)
    clt = CrossLayerTranscoder.from_pretrained(cfg.clt).to(cfg.device)
    check_compatible(model, clt)
    check_same_model(model, clt.config.model_sha256, f"the CLT {cfg.clt}")
    enc = load_tokenizer(cfg.model)
    return model, clt, enc, encode_prompt(enc, cfg.prompt, model.config.n_ctx).to(cfg.device)


def run_graph(cfg):
    model, clt, enc, idx = load(cfg)
    t0 = time.perf_counter()
    rep = local_replacement(model, clt, idx)
    graph = attribute(model, clt, rep, cfg.prompt, cfg.max_features, cfg.batch_size, cfg.max_logits, cfg.logit_prob)
    seconds = time.perf_counter() - t0
    err, scale = exactness(model, clt, rep, graph)
    replacement, completeness, n_nodes, n_links = save_graph(graph, cfg, enc, cfg.model, cfg.clt)
    top = ", ".join(f"{token_str(enc, t)!r} {p:.3f}" for t, p in zip(graph.logit_ids.tolist(), graph.logit_probs.tolist()))
    print(f"prompt: {len(graph.tokens)} tokens | active features: {graph.n_active} | feature nodes: {len(graph.feats)}"
          f" | logits: {top}")
    print(f"attribution: {seconds:.2f} s | exactness: max |sum A + bias - input| = {err:.2e} (inputs up to {scale:.2g})"
          + (" [capped: dropped features' edges are missing]" if len(graph.feats) < graph.n_active else ""))
    print(f"replacement score {replacement:.3f} | completeness score {completeness:.3f} | pruned graph: "
          f"{n_nodes} nodes, {n_links} links -> {cfg.out}/{cfg.slug}.json")


def run_intervene(cfg):
    model, clt, enc, idx = load(cfg)
    if not cfg.feature:
        raise ValueError("intervene needs --feature LAYER/POS/ID")
    feats = parse_features(cfg.feature, clt.config.n_layers, idx.size(1), clt.config.n_features)
    clean, new, a = intervene(model, clt, idx, feats, cfg.scale)
    p0, p1 = clean.softmax(-1), new.softmax(-1)
    for (l, p, f), act in zip(feats.tolist(), a.tolist()):
        print(f"feature {l}/{p}/{f}: activation {act:.3g} on {token_str(enc, idx[0, p].item())!r}, decoder writes x {cfg.scale:g}")
    print(f"{'token':>16} | {'p before':>8} | {'p after':>8} | {'change':>8}")
    for t in (p1 - p0).abs().topk(min(cfg.top, len(p0))).indices.tolist():
        print(f"{token_str(enc, t)!r:>16} | {p0[t]:8.4f} | {p1[t]:8.4f} | {p1[t] - p0[t]:+8.4f}")


def parse_args(argv):
    command = "intervene" if argv[:1] == ["intervene"] else "graph"
    argv = argv[1:] if command == "intervene" else argv
    parser = argparse.ArgumentParser(prog=f"graph.py{' intervene' if command == 'intervene' else ''}",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {"model": "GPT-2 directory in the hub layout, or a hub id", "clt": "CLT directory (train.py writes runs/clt)",
             "interp": "interp.py's output dir or features.jsonl (node explanations)", "prompt": "text to attribute",
             "out": "output directory", "slug": "graph name in the front end: OUT/SLUG.json",
             "max_features": "keep at most this many feature nodes, weakest dropped; -1 = all",
             "batch_size": "targets per backward pass", "max_logits": "at most this many logit nodes",
             "logit_prob": "logit nodes up to this cumulative probability",
             "node_threshold": "pruning: keep nodes up to this cumulative influence",
             "edge_threshold": "pruning: keep edges up to this cumulative influence", "device": "cpu or cuda",
             "feature": "intervene: the feature LAYER/POS/ID, or several, comma-separated", "top": "intervene: rows of changes to print",
             "scale": "intervene: multiply the feature's decoder writes by this (0 ablate, -1 flip, >1 steer)"}
    only = {"graph": {"out", "slug", "max_features", "batch_size", "max_logits", "logit_prob", "node_threshold",
                      "edge_threshold", "interp"}, "intervene": {"feature", "scale", "top"}}
    for fd in fields(GraphConfig):
        if fd.name not in only["intervene" if command == "graph" else "graph"]:
            parser.add_argument("--" + fd.name.replace("_", "-"), type=type(fd.default), default=fd.default,
                                help=helps[fd.name] + f" (default: {fd.default})")
    return command, GraphConfig(**vars(parser.parse_args(argv)))


def main(argv=None):
    command, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    print(asdict(cfg))
    (run_intervene if command == "intervene" else run_graph)(cfg)


if __name__ == "__main__":
    main()

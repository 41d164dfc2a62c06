"""
graph.py: attribution graphs: which CLT features, through which layers, produce a prediction.

Data flow (Ameisen et al. 2025, "Circuit Tracing: Revealing Computational Graphs in Language
Models", sec. 3: the local replacement model, exact direct effects, pruning by influence):
    prompt -> token ids, BOS (<|endoftext|>) first
      -> GPT.run_with_acts: mlp_in, mlp_out (T, L, d) and Frozen (attention patterns, LN scales)
      -> CLT: active features (none at BOS), reconstruction, error = mlp_out - reconstruction
      -> rows of the adjacency A (targets x sources), a batch at a time: the model's transpose
      -> influence, pruning, scores -> the front end's JSON, the full graph (forge/graphfile.py)

    python graph.py --prompt "Batris lives in Fafes. The language Batris speaks is" --out runs/graph
    python graph.py --target-diff " Zefekic| Bepaese"     # output node: a logit difference
    python graph.py --qk auto:10     # why the 10 most important attention entries attend there
    torchrun --nproc_per_node=4 graph.py --model gpt2 --clt runs/clt-gpt2  # any GPT-2, its CLT
    tiny CPU run: python train.py (writes runs/clt), then python graph.py --max-features 300
    view: python -m circuit_tracer start-server --graph_file_dir runs/graph; test it: intervene.py

Definitions (circuit-tracer 0.5.0's; tests/test_graph.py checks ours edge by edge):
- Nodes: active features by (layer, position, id), none at BOS; errors, layer-major, zero at BOS;
  token embeddings; outputs (TARGETS): vectors read at ln_f's last position, by default the top
  logits to probability 0.95 (at most 10), each W_U[t] - mean(W_U) weighted by p; custom ones by 1.
- Edge A[t, s]: how t's input moves as s goes from 0 to its value, every MLP output fixed. A
  feature writes every later layer (a PLT's: its own); a skip connection stays live, the errors
  are mlp_out - reconstruction - skip. Exact: t's input = sum_s A[t, s] + bias_t. A transcoder
  reading resid_mid (ln_2's input; circuit-tracer's hook_resid_mid) reads the stream as it is.
- Influence: w (Â + Â² + ...), Â = |A| with rows normalized to sum 1, w the outputs' weights.
- Pruning: nodes to cumulative influence 0.8, edges by Â[t, s] (infl_t + w_t) to 0.98, then
  features and errors without outgoing edges, features without incoming ones, until none is left.
- Replacement score: infl(tokens) / infl(tokens + errors); completeness: the influence-weighted
  share of the nodes' inputs not from errors. --max-features: rounds by the influence so far.
- QK (--qk): with ln_1 frozen too, head h's score s_ij = q_i·k_j / sqrt(hs) is bilinear in the
  nodes: q_i = sum_s Q_s + q_bias, Q_s from hs rows of the same transpose read at ln_1's input
  (k_j likewise), so s_ij = sum over (query node, key node) pairs of Q_s·K_t / sqrt(hs), "bias" a
  node and each position embedding one ("pos@j"); the contrast c_ij = s_ij - sum_j' A_ij' s_ij'
  (what the softmax sees) is q_i·(k_j - sum_j' A_ij' k_j') / sqrt(hs). auto:N picks the entries
  with the largest |A_ij dT/dA_ij|, T = sum_t (w_t + infl_t)·input_t over the graph's targets.
- Llama / Qwen3: as circuit-tracer's (mlp_in after post_attention_layernorm, patterns and RMSNorm
  scales frozen); no position embedding, so --position-nodes adds zero nodes. QK: RoPE at fixed
  positions and Qwen3's q/k norms with frozen scales (Frozen.qk_norm) are linear maps per position,
  q_i = turn_i(W_q x_i); GQA: a head reads its key head; pos@j terms are zero (RoPE is in pairs).

Differences from circuit-tracer:
- Error ids "{layer}_-1_{pos}": its "0_{layer}_{pos}" collides with feature `layer` of layer 0.
- --position-nodes: position embeddings as nodes ("E_-1_{pos}", after the tokens), not biases.
- Rows from a hand-written transpose (Attribution), not gradients hooked into TransformerLens;
  under torchrun each rank computes a share. Memory: the kept rows, a batch's gradients per layer.
- Ties: --max-features takes equal influence in node order; --edge-threshold 1 keeps no zero edge.
- Supernodes (supernodes): grouped automatically, one position and one role each, for our picture
  and its front end's URL; circuit-tracer leaves the grouping to hand (its issue #20).
"""

import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from operator import itemgetter
from typing import Optional

import torch
from tqdm import tqdm

from clt import CrossLayerTranscoder, load_transcoder
from forge import cli, files, graphcli, graphfile
from forge.graphcli import encode_prompt
from forge.graphfile import Graph
from model import GPT, Frozen, load_model
from parallel import Mesh, all_reduce_sum, broadcast, compute_init, make_mesh

# -----------------------------------------------------------------------------
# the local replacement model: the frozen GPT, the CLT's active features, the error nodes


@dataclass
class Replacement:
    """The local replacement model of one prompt."""

    idx: torch.Tensor  # (1, T) token ids, BOS first
    frozen: Frozen  # attention patterns and LayerNorm scales of the prompt's forward pass
    token: torch.Tensor  # (T, d) token embeddings wte[idx]: the embedding nodes
    position: torch.Tensor  # (T, d) position embeddings wpe[:T]: biases, or nodes (position_nodes)
    mlp_out: torch.Tensor  # (T, L, d) the true MLP outputs
    recon: torch.Tensor  # (T, L, d) the CLT's reconstruction from the active features, b_dec too
    skip: torch.Tensor  # (T, L, d) the skip connection's term (zero without one): a path, no node
    error: torch.Tensor  # (T, L, d) mlp_out - recon - skip: the error nodes; zero at BOS
    feats: torch.Tensor  # (n, 3) (layer, pos, id) of the active features, sorted
    acts: torch.Tensor  # (n,) their activations
    logits: torch.Tensor  # (V,) the next-token logits


@torch.no_grad()
def local_replacement(model: GPT, clt: CrossLayerTranscoder, idx: torch.Tensor) -> Replacement:
    """Run the GPT on idx (1, T); each MLP output = the CLT's reconstruction + skip + error."""
    graphcli.check_one_prompt(model, clt, idx, "attribute")
    T = idx.size(1)
    logits, acts = model.run_with_acts(idx)
    mlp_in = clt.input_of(acts)[0]  # (T, L, d) what the CLT reads (CLTConfig.input_hook)
    a = clt.encode(mlp_in)  # (T, L, F)
    a[0] = 0  # BOS: large, constant activations that explain nothing about the prompt
    l, p, f = a.transpose(0, 1).nonzero(as_tuple=True)  # sorted by layer, then position, then id
    feats = torch.stack([l, p, f], 1)  # (n, 3)
    recon = reconstruct(clt, feats, a[p, l, f], T)  # (T, L, d)
    skip = clt.skip(mlp_in)  # (T, L, d)
    error = acts.mlp_out[0] - recon - skip
    error[0] = 0
    token = model.wte.weight[idx[0]].detach()  # (T, d)
    wpe = getattr(model, "wpe", None)  # Llama has none: positions turn its queries and keys
    position = torch.zeros_like(token) if wpe is None else wpe.weight[:T].detach()  # (T, d)
    nodes = (acts.mlp_out[0], recon, skip, error, feats, a[p, l, f])
    return Replacement(idx, acts.frozen, token, position, *nodes, logits[0, -1])


def reconstruct(clt, feats, acts, T, bias=True):
    """clt.decode (T, L, d) of features feats (n, 3), activations acts (n,), as a sparse tensor."""
    ids = feats[:, [1, 0, 2]].T  # (3, n): position, layer, feature
    size = (T, clt.config.n_layers, clt.F_local)
    acts = torch.sparse_coo_tensor(ids, acts, size, check_invariants=True)  # (T, L, F)
    return clt.decode(acts, sparse=True, bias=bias).detach()


def replacement_forward(model, clt, idx, frozen, fixed, resid=None, logits=True):
    """The frozen replacement model on idx: MLP outputs fixed (T, L, d) + skip -> (logits, Acts)."""
    run = partial(model.run_with_acts, idx, frozen=frozen, resid=resid)
    mlp_out = fixed
    # mlp_in[l] depends only on the MLP outputs below l, so L passes settle every layer's skip term
    for _ in range(clt.config.n_layers if clt.W_skip is not None else 0):
        mlp_in = clt.input_of(run(mlp_out=mlp_out[None], logits=False)[1])[0]  # (T, L, d)
        mlp_out = fixed + clt.skip(mlp_in)
    return run(mlp_out=mlp_out[None], logits=logits)


def target_inputs(model, clt, rep, feats, vectors, resid=None, mlp_out=None):
    """Targets' inputs in the replacement model -> feats' (n,) pre-activations, vectors' (k,)."""
    resid = rep.token + rep.position if resid is None else resid  # (T, d)
    fixed = rep.mlp_out - rep.skip if mlp_out is None else mlp_out  # (T, L, d)
    _, acts = replacement_forward(model, clt, rep.idx, rep.frozen, fixed, resid[None])
    pre = clt.pre_acts(clt.input_of(acts)[0])  # (T, L, F)
    l, p, f = feats.T
    return pre[p, l, f], vectors @ acts.ln_f_out[0, -1]


# -----------------------------------------------------------------------------
# the output nodes; TARGETS: their kinds for --target NAME:SPEC, a builder (spec, model, enc, rep)


@dataclass
class Targets:
    """A graph's output nodes: each reads a vector (d,) from ln_f's output at the last position."""

    ids: torch.Tensor  # (k,) token ids; a custom target gets vocab_size + i (circuit-tracer's)
    vectors: torch.Tensor  # (k, d) what each reads: W_U[t] - mean(W_U) for a token's logit
    weights: torch.Tensor  # (k,) their weights in the influence: a token's probability, or 1
    labels: list  # (k,) the nodes' text in the front end; "" = the token's ('Output " x" (p=...)')


def token_targets(model, logits, ids):
    """The logits of tokens ids (k,) minus the mean logit, weighted by their probabilities."""
    W = model.unembedding().detach()  # (V, d)
    return Targets(ids, W[ids] - W.mean(0), logits.softmax(-1)[ids], [""] * len(ids))


def custom_target(model, vector, label):
    """One target reading vector (d,) (a logit difference: W_U[a] - W_U[b]), weight 1."""
    d = model.config.n_embd
    if vector.shape != (d,):
        shape = tuple(vector.shape)
        raise ValueError(f"a target direction must have shape ({d},) (the n_embd), got {shape}")
    W = model.unembedding()
    ids = torch.tensor([model.config.vocab_size], device=W.device)
    return Targets(ids, vector.to(W)[None], W.new_ones(1), [label])


def logit_difference(spec, model, enc, rep):
    """diff:A|B (--target-diff): logit(A) - logit(B), one token each (the mean logit cancels)."""
    a, b = graphcli.spec_tokens(enc, spec, "--target-diff", pair=True)
    W = model.unembedding().detach()
    text = [graphfile.token_str(enc, t) for t in (a, b)]
    return custom_target(model, W[a] - W[b], 'Output "{}" - "{}" (logit difference)'.format(*text))


def token_logits(spec, model, enc, rep):
    """tokens:A|B|... (--target-tokens): these tokens' logits minus the mean, one token each."""
    ids = graphcli.spec_tokens(enc, spec, "--target-tokens")
    return token_targets(model, rep.logits, torch.tensor(ids, device=rep.idx.device))


def direction(spec, model, enc, rep):
    """direction:FILE (--target-direction): a .safetensors of one (d,) tensor, at ln_f's output."""
    label, vector = graphcli.read_direction(spec, model.config.n_embd)
    return custom_target(model, vector.to(rep.idx.device), label)


TARGETS = {"diff": logit_difference, "tokens": token_logits, "direction": direction}


# -----------------------------------------------------------------------------
# attribution: the adjacency A, a batch of rows at a time through the replacement model's transpose


def attribute(
    model: GPT,
    clt: CrossLayerTranscoder,
    rep: Replacement,
    prompt: str = "",
    max_features: int = -1,
    batch_size: int = 256,
    max_logits: int = 10,
    logit_prob: float = 0.95,
    update_interval: int = 4,
    position_nodes: bool = False,
    mesh: Optional[Mesh] = None,
    targets: Optional[Targets] = None,
) -> Graph:
    """The attribution graph of the replacement model rep: a Graph with the (N, N) adjacency.

    Args:
        max_features: at most this many feature nodes (-1: all), chosen by influence in rounds
            of update_interval x batch_size (batch_size: targets per pass of the transpose).
        max_logits, logit_prob: the top logits as output nodes, unless targets are given.
        position_nodes: position embeddings as nodes; mesh: the ranks sharing every round's rows.
    """
    mesh = mesh or Mesh()
    n = len(rep.feats)
    T, L, _ = rep.mlp_out.shape
    cap = n if max_features < 0 else min(max_features, n)
    device = rep.feats.device
    # Phase 0: the output nodes (unless given, the top logits to probability logit_prob)
    if targets is None:
        probs, ids = rep.logits.softmax(-1).topk(min(max_logits, rep.logits.numel()))
        top = int(torch.searchsorted(probs.cumsum(0), logit_prob)) + 1
        targets = token_targets(model, rep.logits, ids[:top])
    att = Attribution(model, clt, rep, position_nodes)
    k = len(targets.ids)
    N = att.n_sources + k
    # Phase 1: the output rows, on every rank (uncapped, rows is A; capped, the targets' rows)
    every = torch.arange(N, device=device)  # errors and embeddings have no inputs: zero rows
    row_node = every if cap == n else torch.cat([every[:cap], every[-k:]])  # each row's node
    rows = rep.mlp_out.new_zeros(len(row_node), N)
    last = torch.full((k,), T - 1, device=device)
    att.rows(torch.full((k,), L, device=device), last, targets.vectors, rows[-k:, : N - k])
    # Phase 2: the feature rows, in rounds by influence; uncapped, one round in node order
    weights = torch.cat([rows.new_zeros(N - k), targets.weights.to(rows.dtype)])  # (N,)
    feature_rows(att, rows, row_node, weights, cap, batch_size, update_interval, mesh)
    # Phase 3: capped, the kept features' rows and columns in node order, in a square A
    kept = row_node[:cap].sort()
    A = rows
    if cap < n:  # one gather per part: no (cap, N) copy
        cols = torch.cat([kept.values, torch.arange(n, N, device=device)])
        A = rows.new_zeros(len(cols), len(cols))
        A[:cap] = rows[kept.indices[:, None], cols]
        A[-k:] = rows[-k:, cols]
    nodes = (rep.feats[kept.values], rep.acts[kept.values], targets.ids, targets.weights, A, L, n)
    out = (position_nodes, targets.vectors, targets.labels)
    return Graph(prompt, rep.idx[0].tolist(), *nodes, *out)


def feature_rows(att, rows, row_node, weights, cap, batch_size, update_interval, mesh):
    """Fill rows[:cap], row_node[:cap] in rounds of the most influential features, ranks sharing."""
    feats = att.rep.feats
    n = len(feats)
    todo = torch.ones(n, dtype=torch.bool, device=feats.device)
    done = 0
    quiet = cap <= batch_size or mesh.dp_rank != 0
    bar = tqdm(total=cap, desc="attribution: feature rows", unit="row", disable=quiet)
    while done < cap:
        queue = todo.nonzero()[:, 0]
        if cap < n:  # the most influential left by the rows so far, in node order (for batches)
            infl = influence(rows, weights, row_node)[:n]
            ranked = queue[infl[todo].argsort(descending=True, stable=True)]
            queue = ranked[: min(update_interval * batch_size, cap - done)].sort().values
            # rank 0's choice for all: two devices may round a sum differently and break a tie apart
            queue = broadcast(queue, mesh.dp_group)
        mine = rank_batches(feats[queue], mesh, batch_size)
        for a, b in mine:
            f = feats[queue[a:b]]  # (B, 3)
            att.rows(f[:, 0], f[:, 1], att.encoders(f), rows[done + a : done + b, : att.n_sources])
            bar.update(b - a)
        bar.update(len(queue) - sum(b - a for a, b in mine))  # the other ranks' share
        all_reduce_sum(rows[done : done + len(queue)], mesh.dp_group)  # others' rows are zero here
        row_node[done : done + len(queue)] = queue
        todo[queue] = False
        done += len(queue)
    bar.close()


def rank_batches(feats, mesh, size):
    """This rank's batches [a, b) of sorted feature targets feats (m, 3): a share of about equal
    work (a row costs ~(layer + 1)·(position + 1)), cut within a layer, at most `size` each."""
    cost = ((feats[:, 0] + 1) * (feats[:, 1] + 1)).double().cumsum(0)
    ends = [0, len(feats)]
    if mesh.dp > 1 and len(cost) > 0:
        at = cost[-1] * torch.arange(1, mesh.dp, device=cost.device) / mesh.dp
        ends = [0, *torch.searchsorted(cost, at).tolist(), len(feats)]
    start, end = ends[mesh.dp_rank], ends[mesh.dp_rank + 1]
    cuts = (feats[start + 1 : end, 0] != feats[start : end - 1, 0]).nonzero()[:, 0] + start + 1
    edges = [start, *cuts.tolist(), end]
    return [(i, min(i + size, b)) for a, b in zip(edges, edges[1:]) for i in range(a, b, size)]


class Attribution:
    """Rows of A: one pass of the linear replacement model's transpose per batch of targets, dotted
    with each source's write; by hand, from the batch's top layer, to its last position."""

    def __init__(self, model, clt, rep, position_nodes=False):
        T, L, _ = rep.mlp_out.shape
        self.clt, self.rep = clt, rep
        self.T = T  # the prompt's length (a pass may stop earlier)
        self.L = L
        fz = rep.frozen
        # attentionᵀ, ln_1ᵀ: g -> scale_1 · P D_w W_Vᵀ patternᵀ W_Oᵀ g per head (P centers)
        self.mix = [a[0].transpose(1, 2) * s[0] for a, s in zip(fz.attn, fz.ln_1)]  # (nh, T, T)
        ov = [model.ov(l) for l in range(L)]  # W_V (nh·hs, C), W_O (C, nh·hs) per layer
        self.W_O = [W_O.detach() for _, W_O in ov]  # y @ W_Oᵀ
        M = [b.ln_1.weight[:, None] * W_V.T for b, (W_V, _) in zip(model.h, ov)]  # D_w W_Vᵀ
        self.center = model.centers  # LayerNorm centers, RMSNorm (Llama) does not
        self.W_V = [(m - m.mean(0) if self.center else m).detach() for m in M]  # P D_w W_Vᵀ
        self.ln = [block.ln_2 for block in model.h] + [model.ln_f]  # what mlp_in[l] reads, l <= L
        self.scale = [s[0] for s in fz.ln_2] + [fz.ln_f[0]]  # their scales, (T, 1) each
        key = rep.feats[:, 0] * (T + 1) + rep.feats[:, 1]  # sorted, as the features are
        grid = torch.arange(L * (T + 1), device=key.device)
        self.starts = torch.searchsorted(key, grid).view(L, T + 1).tolist()  # [l][p]: 1st node
        inputs = torch.stack([rep.token, rep.position][: 1 + position_nodes])  # (1|2, T, d)
        self.written = torch.cat([rep.error.transpose(0, 1), inputs])  # the others' writes
        self.n_sources = len(rep.feats) + len(self.written) * T

    def encoders(self, feats):
        """(B, d) what features feats (B, 3) read from mlp_in, raw units (n·L·d numbers for all)."""
        l, f = feats[:, 0], feats[:, 2]
        return (self.clt.W_enc[l, :, f] * self.clt.input_scale[l, None]).detach()

    @torch.no_grad()
    def rows(self, layers, positions, vectors, out, start=None):
        """out (B, n_sources) = the rows of targets reading vectors (B, d) at (layer, position);
        start (d, T, B): reads of the residual stream before block layers.max() added (QK's)."""
        B, d = vectors.shape
        top = int(layers.max())  # nothing above the highest target reaches any target
        T = int(positions.max()) + 1  # nor any position after the last one (causal attention)
        g = vectors.new_zeros(d, T, B) if start is None else start  # d(targets)/d(residual)
        layers = layers if start is None else torch.full_like(layers, -1)  # QK: none injected
        G = vectors.new_empty(top, d, T, B)  # the same at each mlp_out[l] below the top layer
        written = out[:, len(self.rep.feats) :].view(B, -1, self.T)  # (B, L + 1|2, T)
        self.add_injected(g, self.L, layers, positions, vectors)  # the logits, if any
        for l in reversed(range(min(top + 1, self.L))):
            if l < top:  # x_{l+1} = x_mid + mlp_out[l]: the gradient at mlp_out[l] is the stream's
                torch.div(g, self.clt.output_scale[l], out=G[l])  # the writes: W_dec / output_scale
                written[:, l, :T] = torch.einsum("td,dtb->bt", self.written[l, :T], g)
                self.add_skip_transposed(g, l)
                self.add_attention_transposed(g, l)
            self.add_injected(g, l, layers, positions, vectors)
        self.contract_features(G, out)
        for i in range(self.L, len(self.written)):  # e·g per position
            written[:, i, :T] = torch.einsum("td,dtb->bt", self.written[i, :T], g)

    def add_injected(self, g, l, layers, positions, vectors):
        """g += the targets at mlp_in[l] (l = L: ln_f's output) and what attention l passes down:
        u at p gives position k sum_h mix_h[k, p] · (W_V,hᵀ W_O,hᵀ u), no pass over positions."""
        rows = (layers == l).nonzero()[:, 0]
        p = positions[rows]
        u = self.read_transposed(vectors[rows].T, l, self.scale[l][p].T)  # (C, r)
        if l == self.L or len(rows) == 0:  # the logits: read at the last position, g is zero
            g[:, p, rows] = u
            return
        C, T, B = g.shape
        nh = len(self.mix[l])
        y = (self.W_O[l].T @ u).view(nh, -1, u.size(1))  # (nh, hs, r)
        z = torch.bmm(self.W_V[l].view(C, nh, -1).transpose(0, 1), y)  # (nh, C, r): at ln_1
        spread = torch.bmm(z.permute(2, 1, 0), self.mix[l][:, :T, p].permute(2, 0, 1))  # (r, C, T)
        spread[torch.arange(len(rows), device=p.device), :, p] += u.T  # the residual path: u at p
        g.index_add_(2, rows, spread.permute(1, 2, 0))

    def add_skip_transposed(self, g, l):
        """g (C, T, B) += the transpose of x -> skip(ln_2(x)), skip(h) = (h·s_in) W_skip / s_out
        (skip(x) where the CLT reads resid_mid)."""
        if self.clt.W_skip is None:
            return
        C, T, B = g.shape
        W = self.clt.W_skip[l].detach() * (self.clt.input_scale[l] / self.clt.output_scale[l])
        h = (W @ g.view(C, T * B)).view(C, T, B)  # d(targets)/d(mlp_in[l])
        g += self.read_transposed(h, l, self.scale[l][:T])  # scale (T, 1)

    def read_transposed(self, u, l, scale):
        """u (C, ...) at what layer l's targets read -> at the residual stream: ln_2's transpose
        (ln_f's at l = L), or u itself where the CLT reads resid_mid, the stream before ln_2 (as
        circuit-tracer's hook_resid_mid transcoders do: LayerNorm frozen, none between)."""
        if l < self.L and self.clt.config.input_hook == "resid_mid":
            return u
        return ln_transposed(u, self.ln[l].weight, scale, self.center)

    def add_attention_transposed(self, g, l):
        """g (C, T, B) += the transpose of x -> attn(ln_1(x)), the frozen patterns' OV path only."""
        C, T, B = g.shape
        nh = len(self.mix[l])
        y = (self.W_O[l].T @ g.view(C, T * B)).view(nh, -1, T, B)  # (nh, hs, T, B)
        v = torch.empty_like(y)
        for h in range(nh):  # back to the positions each head read
            torch.matmul(self.mix[l][h, :T, :T], y[h], out=v[h])  # (hs, T, B)
        g.view(C, T * B).addmm_(self.W_V[l], v.view(-1, T * B))

    def contract_features(self, G, out):
        """out[:, s] = a_s · sum_l' W_dec[l_s][f_s, l' - l_s] · G[l', :, p_s], by (l, p) blocks."""
        top, d, T, B = G.shape
        feats, acts = self.rep.feats, self.rep.acts
        for p in range(T):  # position outer: the blocks of one position share G[:, :, p] (cache)
            for l in range(top):
                a, b = self.starts[l][p], self.starts[l][p + 1]
                if a < b:
                    n_w = min(self.clt.n_writes(l), top - l)
                    w = self.clt.W_dec[l][feats[a:b, 2], :n_w].detach().flatten(1)  # (n_lp, n_w·d)
                    out[:, a:b] = (w @ G[l : l + n_w, :, p].flatten(0, 1)).T * acts[a:b]


def ln_transposed(g, weight, scale, center=True):
    """A frozen LayerNorm's transpose applied to g (d, ...): scale·(weight·g - mean(weight·g));
    a frozen RMSNorm's (center=False): scale·weight·g."""
    wg = g * weight.detach().view(-1, *(1,) * (g.dim() - 1))
    return (wg - wg.mean(0) if center else wg) * scale


def bias_inputs(clt, rep, position_nodes):
    """(resid (T, d), mlp_out (T, L, d)) of the replacement model with every node off: its bias."""
    resid = rep.position * (not position_nodes)  # the position embeddings, unless they are nodes
    mlp_out = reconstruct(clt, rep.feats[:0], rep.acts[:0], len(rep.token))  # b_dec alone
    mlp_out[0] = rep.mlp_out[0] - rep.skip[0]  # BOS: its MLP output is bias, but for the skip term
    return resid, mlp_out


# -----------------------------------------------------------------------------
# QK attributions: why a head attends where it does, from the same transpose read at ln_1's input


@torch.no_grad()
def explain_heads(model, clt, rep, steps, n_pairs=20, batch_size=256, mesh=None):
    """Per pattern entry (layer, head, i, j) of steps: the model's pattern A_ij, score s_ij and
    contrast c_ij, and of each the n_pairs largest (query source, key source) terms with the sum of
    the rest; sources: Attribution(position_nodes=True)'s, then the bias (graphfile names them)."""
    out = []
    for step, (Q, K, M, measured) in zip(steps, qk_terms(model, clt, rep, steps, batch_size, mesh)):
        rec = dict(zip(("layer", "head", "query_pos", "key_pos"), step), **measured)
        for name, keys in (("", K), ("contrast_", K - M)):  # c_ij: q_i · (k_j - mean key)
            values, pairs = graphfile.top_pairs(Q, keys, n_pairs, BLOCK_ELEMENTS)
            total = Q.double().sum(1) @ keys.double().sum(1)  # every pair's term: bilinear
            rec[name + "pairs"] = [(*st, v) for st, v in zip(pairs.tolist(), values.tolist())]
            rec[name + "rest"] = total.item() - values.double().sum().item()
        out.append(rec)
    return out


def qk_terms(model, clt, rep, steps, batch_size=256, mesh=None):
    """Per step (layer, head, i, j): Q, K, M (hs, S + 1), each source's part of q_i / sqrt(hs), of
    k_j and of the mean key sum_j' A_ij' k_j', the bias last; and the model's A_ij, s_ij, c_ij."""
    att = Attribution(model, clt, rep, position_nodes=True)  # pos@j: a term of its own
    rows = qk_rows(att, model, steps, batch_size, mesh or Mesh())  # {(l, h, kind, pos): (hs, S)}
    off = (rep.feats[:0], rep.token[:0], *bias_inputs(clt, rep, True))  # every node off
    layers = sorted({l for l, *_ in steps})
    real = heads_qk(model, layers, model, rep.idx)  # {l: (nh, T, hs) q and k}
    bias = heads_qk(model, layers, target_inputs, model, clt, rep, *off)
    out = []
    for l, h, i, j in steps:
        (q, k), (qb, kb) = real[l], bias[l]
        A = rep.frozen.attn[l][0, h]  # (T, T)
        hs = q.size(-1)
        Q = torch.cat([rows[l, h, "q", i], qb[h, i, :, None]], 1) / hs**0.5  # (hs, S + 1)
        K = torch.cat([rows[l, h, "k", j], kb[h, j, :, None]], 1)
        M = torch.cat([rows[l, h, "m", i], (A[i] @ kb[h])[:, None]], 1)
        s = k[h] @ q[h, i] / hs**0.5  # (T,) every key's score at query i (A is 0 after i)
        c = s[j] - A[i] @ s  # the contrast: s_ij minus the pattern-weighted mean score
        out.append((Q, K, M, dict(pattern=A[i, j].item(), score=s[j].item(), contrast=c.item())))
    return out


def qk_rows(att, model, steps, batch_size, mesh):
    """{(layer, head, kind, pos): (hs, S)}: the sources' parts of q at pos (kind "q"), of k at pos
    ("k") and of the mean key at query pos ("m"), in passes of the transpose; ranks share them."""
    kinds = [(l, h, kind, p) for l, h, i, j in steps for kind, p in (("q", i), ("k", j), ("m", i))]
    # by layer (a pass starts at one block), then position (a pass reads positions up to its last
    # read's: causal attention); a total order, the same on every rank (a set's order is not)
    reads = sorted(set(kinds), key=itemgetter(0, 3, 1, 2))
    C = model.config.n_embd
    hs = len(model.qk_weights(0, 0)[0])  # head size (Qwen3's is not C / nh)
    rows = att.rep.mlp_out.new_zeros(len(reads), hs, att.n_sources)
    per = max(1, batch_size // hs)  # reads per pass
    cuts = [n for n in range(1, len(reads)) if reads[n][0] != reads[n - 1][0]]
    edges = [0, *cuts, len(reads)]
    passes = [(a, min(a + per, b)) for a, b in zip(edges, edges[1:]) for a in range(a, b, per)]
    for a, b in passes[mesh.dp_rank :: mesh.dp]:
        T = reads[b - 1][3] + 1
        start = torch.cat([qk_read(model, att, *read)[:, :T] for read in reads[a:b]], 2)
        B = start.size(2)  # start: (C, T, B)
        layer = torch.full((B,), reads[a][0], device=start.device)
        att.rows(layer, layer * 0 + T - 1, start.new_zeros(B, C), rows[a:b].flatten(0, 1), start)
    all_reduce_sum(rows, mesh.dp_group)  # others' reads are zero here
    return dict(zip(reads, rows))


def qk_read(model, att, layer, head, kind, pos):
    """(d, T, hs): how head's q (kind "q") or k ("k") at pos, or its mean key at query pos
    (sum_j A[pos, j] k_j, "m"), reads the residual stream before block layer: ln_1 frozen, and
    the model's turn at each position t (Llama: RoPE, Qwen3's q/k norms frozen), a fixed map."""
    rep, key = att.rep, int(kind != "q")  # 0: q, 1: k
    W = model.qk_weights(layer, head)[key].detach()  # (hs, C)
    u = ln_transposed(W.T, model.h[layer].ln_1.weight, 1, att.center)  # (C, hs)
    at = rep.token.new_zeros(len(rep.token))  # (T,) the positions read: one,
    at[pos] = 1
    at = rep.frozen.attn[layer][0, head, pos] if kind == "m" else at  # or the pattern's row
    read = torch.einsum("ch,t->cth", u, at * rep.frozen.ln_1[layer][0, :, 0])
    return model.qk_turn(layer, head, key, read, rep.frozen)


def heads_qk(model, layers, run, *args):
    """{layer: q, k (nh, T, hs)} of the layers' heads in run(*args), a forward pass of model on a
    prompt: attention's input ln_1(x) and the q/k norms' frozen scales if given (Qwen3), seen by
    hooks; model.qk of those (measured: the transpose never reads them)."""
    seen = {}

    def grab(module, inputs):
        seen[module] = inputs[0][0], inputs[2]  # (T, C): the last pass's, the settled one; norms

    hooks = [model.h[l].attn.register_forward_pre_hook(grab) for l in layers]
    try:
        run(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return {l: model.qk(l, *seen[model.h[l].attn]) for l in layers}


def qk_auto(model, clt, rep, graph, infl, n, mesh=None):
    """The n pattern entries (layer, head, i, j) with the largest |A_ij dT/dA_ij|, T = sum_t (w_t +
    infl_t) input_t over the graph's targets (the weights pruning gives their edges), in the frozen
    replacement model (MLP outputs fixed: the OV paths' direct effects); infl: prune's (N,). One
    backward pass."""
    leaves = [a.detach().clone().requires_grad_() for a in rep.frozen.attn]  # (1, nh, T, T) each
    free = replace(rep, frozen=replace(rep.frozen, attn=leaves))
    w = graph.logit_weights()
    c = infl + w  # (N,)
    s = graph.slices()
    with torch.enable_grad():
        pre, out = target_inputs(model, clt, free, graph.feats, graph.target_vectors)
        grads = torch.autograd.grad(pre @ c[s.features] + out @ c[s.logits], leaves)
    score = torch.cat([a * g for a, g in zip(leaves, grads)]).abs()  # (L, nh, T, T)
    score[:, :, 0] = 0  # BOS's query: its one key has pattern 1 whatever the score
    top = broadcast(score.flatten().topk(min(n, score.numel())).indices, (mesh or Mesh()).dp_group)
    L, nh, T, _ = score.shape
    return [(t // (nh * T * T), t // (T * T) % nh, t // T % T, t % T) for t in top.tolist()]


# -----------------------------------------------------------------------------
# influence, pruning, scores (circuit-tracer's definitions, see the module docstring); exactness

BLOCK_ELEMENTS = 2**22  # influence's blocks of |A|: 16 MB of fp32


def normalized(A):
    """|A| with each row scaled to sum 1 (rows of zeros stay zero)."""
    a = A.abs()
    return a.div_(a.sum(1, keepdim=True).clamp(min=1e-10))


def influence(A, w, row_node=None, normalize=True):
    """w (Â + Â² + ...), a block of A's rows at a time; row i of A is node row_node[i]'s."""
    row_node = torch.arange(len(A), device=A.device) if row_node is None else row_node
    step = max(1, BLOCK_ELEMENTS // max(A.shape[1], 1))
    blocks = [slice(a, a + step) for a in range(0, len(A), step)]
    total = torch.zeros_like(w)
    cur = w
    for _ in range(len(w) + 2):  # nilpotent: ends after the longest path, at most L + 2 terms
        v = cur[row_node]  # (R,) over A's rows
        cur = sum(v[b] @ normalized(A[b]) for b in blocks) if normalize else v @ A  # v Â (N,)
        if not cur.any():
            return total
        total += cur
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
    s = graph.slices()
    inputs = s.tokens.start  # tokens, positions and logits follow: they always stay
    A, w = graph.adjacency, graph.logit_weights()
    infl = influence(A, w)
    node_mask = infl >= cumulative_threshold(infl, node_threshold)
    node_mask[inputs:] = True
    kept = node_mask.nonzero()[:, 0]  # (K,)
    edge_score = normalized(A[kept][:, kept])  # Â of the pruned graph
    edge_score *= (influence(edge_score, w[kept], normalize=False) + w[kept])[:, None]
    edges = edge_score > 0  # the zero edges add nothing: the threshold is over the others
    edges &= edge_score >= cumulative_threshold(edge_score[edges], edge_threshold)
    keep = torch.ones_like(kept, dtype=torch.bool)
    inner = kept < inputs  # features and errors need an outgoing edge
    feature = kept < s.features.stop  # features an incoming one too
    while True:
        old = keep.clone()
        edges &= keep[:, None] & keep[None, :]
        keep[inner] &= edges[:, inner].any(0)
        keep[feature] &= edges[feature].any(1)
        if torch.equal(old, keep):
            break
    node_mask[kept] = keep
    edge_mask = torch.zeros_like(A, dtype=torch.bool)
    edge_mask[kept[:, None], kept[None, :]] = edges
    order = infl.argsort(descending=True)
    cumulative = (infl[order].cumsum(0) / infl.sum().clamp(min=1e-30))[order.argsort()]
    return node_mask, edge_mask, cumulative, infl


def scores(graph):
    """(replacement score, completeness score) (module docstring)."""
    s = graph.slices()
    A_hat, w = normalized(graph.adjacency), graph.logit_weights()
    infl = influence(A_hat, w, normalize=False)
    inputs = infl[s.tokens].sum() + infl[s.positions].sum()
    error = infl[s.errors].sum()
    replacement = inputs / (inputs + error).clamp(min=1e-30)
    out = infl + w
    completeness = ((1 - A_hat[:, s.errors].sum(1)) * out).sum() / out.sum()
    return replacement.item(), completeness.item()


def supernodes(graph, node_mask, edge_mask, decoders=None, threshold=0.5):
    """Group the pruned graph's feature nodes into supernodes, each a hypothesis that its members
    play one role: features at one position are alike when the cosine similarity of their edge
    profiles (the kept edges' weights into them, then out of them, each half at unit norm), averaged
    with that of their decoder directions decoders (n, d) when given, is at least threshold. Groups
    merge by complete linkage (every pair of members alike), the most alike pair first, ties in node
    order: deterministic. A supernode's influence is the sum of its members' in the full graph
    (summed edges would not keep the row-normalized influence). -> [node indices (m,)], singletons
    too, by first member."""
    n = len(graph.feats)
    A = graph.adjacency * edge_mask.to(graph.adjacency.device)
    kept = node_mask[:n].nonzero()[:, 0].to(A.device)  # (k,)
    unit = partial(torch.nn.functional.normalize, dim=1)
    profile = torch.cat([unit(A[kept]), unit(A[:, kept].T)], 1)  # (k, 2N) reads, then writes
    sim = profile @ profile.T / 2  # (k, k) in [-1, 1]
    if decoders is not None:
        d = unit(decoders[kept].to(sim))
        sim = (sim + d @ d.T) / 2
    groups = []
    for p in graph.feats[kept, 1].unique():  # features at one position only
        here = (graph.feats[kept, 1] == p).nonzero()[:, 0]
        groups += [kept[here[g]] for g in complete_linkage(sim[here][:, here], threshold)]
    return sorted(groups, key=lambda g: int(g[0]))


def complete_linkage(sim, threshold):
    """Groups of sim's (k, k) rows: merge the most alike pair of groups (ties: the first) while the
    least alike pair of members across them is at least threshold -> [sorted indices]."""
    sim = sim.clone().fill_diagonal_(-2)
    groups = [[i] for i in range(len(sim))]
    while len(sim) > 1 and sim.max() >= threshold:
        a, b = sorted(divmod(int(sim.argmax()), len(sim)))
        sim[a] = torch.minimum(sim[a], sim[b])  # the least alike pair counts
        sim[:, a] = sim[a]
        sim[a, a] = -2
        sim[b] = -2  # b is gone
        sim[:, b] = -2
        groups[a] += groups[b]
        groups[b] = []
    return [sorted(g) for g in groups if g]


def decoder_directions(clt, feats):
    """(n, d) each feature of feats (n, 3) (layer, position, id): its total write, summed over the
    layers it writes to (supernodes' decoder directions)."""
    one = torch.ones(1, device=feats.device)
    return torch.cat([clt.decoder_writes(l, f[None], one).sum(1) for l, _, f in feats])


@torch.no_grad()
def exactness(model, clt, rep, graph):
    """max over targets of |sum_s A[t, s] + bias_t - input_t|, and the largest |input_t|."""
    feats = graph.feats.to(rep.idx.device)
    vectors = graph.target_vectors.to(rep.idx.device)
    inputs = torch.cat(target_inputs(model, clt, rep, feats, vectors))
    off = bias_inputs(clt, rep, graph.position_nodes)
    bias = torch.cat(target_inputs(model, clt, rep, feats, vectors, *off))
    s = graph.slices()
    A = graph.adjacency.to(inputs.device)
    total = torch.cat([A[s.features].sum(1), A[s.logits].sum(1)]) + bias
    return (total - inputs).abs().max().item(), inputs.abs().max().item()


# -----------------------------------------------------------------------------
# command line (the flags, loading and checks: forge/graphcli.py)


def run_graph(cfg):
    """One process or torchrun: every rank computes a share of the rows, rank 0 writes the files."""
    ddp, rank, _, world, device = compute_init(cfg.device)
    mesh = make_mesh(ddp, world, 1, device)  # all ranks data-parallel: rows split, model whole
    if rank == 0:
        print(asdict(cfg) | dict(world=world))
    model, clt, enc = graphcli.load(cfg, device, load_model, load_transcoder)
    labels = graphcli.explanations(cfg) if rank == 0 else {}  # --interp's, if it explains this CLT
    idx = encode_prompt(enc, cfg.prompt, model.config.n_ctx).to(device)
    n_auto, steps = graphcli.parse_qk(cfg.qk, model.config, idx.size(1))  # entries to explain
    t0 = time.perf_counter()
    rep = local_replacement(model, clt, idx)
    name, spec = graphcli.target_spec(cfg, TARGETS)  # the output nodes; none: the top logits
    targets = TARGETS[name](spec, model, enc, rep) if name else None
    knobs = (cfg.max_features, cfg.batch_size, cfg.max_logits, cfg.logit_prob, cfg.update_interval)
    graph = attribute(model, clt, rep, cfg.prompt, *knobs, cfg.position_nodes, mesh, targets)
    seconds = time.perf_counter() - t0
    pruned = prune(graph, cfg.node_threshold, cfg.edge_threshold) if rank == 0 or n_auto else None
    t1 = time.perf_counter()
    steps = qk_auto(model, clt, rep, graph, pruned[3], n_auto, mesh) if n_auto else steps
    qk = explain_heads(model, clt, rep, steps, cfg.qk_pairs, cfg.batch_size, mesh) if steps else []
    qk = graphfile.qk_records(qk, rep.feats, graph.tokens, graph.n_layers)
    qk_seconds = time.perf_counter() - t1
    if rank == 0:
        pruned = [x.cpu() for x in pruned]
        ratios = scores(graph)
        groups = supernodes(graph, *pruned[:2], decoder_directions(clt, graph.feats.to(device)))
        kept = graphfile.save_graph(graph, enc, cfg, pruned, ratios, labels, qk, groups)
        exact = exactness(model, clt, rep, graph)
        graphcli.print_graph(graph, enc, cfg, seconds, world, exact, ratios, kept)
        graphcli.print_qk(qk, qk_seconds)


def main(argv=None):
    cfg = cli.parse_config(__doc__, graphcli.GraphConfig, argv)
    with files.one_writer(cfg.out, "graph.py"):  # one run at a time in a folder (forge/files.py)
        run_graph(cfg)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli.run_main(main)

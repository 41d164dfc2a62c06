"""Attribution graphs of per-layer transcoders (PLTs), with and without a skip connection: a PLT's
graph is a CLT's whose cross-layer decoders are zero, and the graph stays exact (edges + bias =
every target's input) and measured (each edge is the target's change when its source is scaled),
also when the skip path, linear in the MLP input, carries part of every edge; and it is
circuit-tracer's graph of the same PLT (tests/fixtures/graph_reference_plt.*)."""

import dataclasses

import pytest
import torch

import graph as G
from test_graph import (
    D,
    F_,
    L,
    T,
    V,
    assert_matches_circuit_tracer,
    assert_rows_match,
    circuit_tracer_reference,
)
from clt import CLTConfig, CrossLayerTranscoder
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make(skip=False, dtype=torch.float64, seed=0, input_hook="mlp_in"):
    """A random GPT, and a PLT of it with its twin CLT: the same encoders, same-layer decoders,
    biases, scales (and skip), the CLT's decoders to later layers zero; both read input_hook."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=L, n_head=2, n_embd=D, n_ctx=32, vocab_size=V)).eval().to(dtype)
    config = dict(n_layers=L, d_model=D, n_features=F_, skip=skip, input_hook=input_hook)
    plt = CrossLayerTranscoder(CLTConfig(**config, decoder="per-layer"), seed=seed).eval()
    cross = CrossLayerTranscoder(CLTConfig(**config), seed=seed).eval()
    with torch.no_grad():
        plt.b_enc.fill_(-0.2)  # a random transcoder fires on a fifth of its features here
        # unfolded normalization must be handled
        plt.input_scale.copy_(torch.tensor([1.0, 0.5, 2.0]))
        plt.output_scale.copy_(torch.tensor([2.0, 1.0, 0.5]))
        if skip:  # large enough that the skip path carries a good share of every edge
            plt.W_skip.normal_(0, 0.3 / D**0.5)
        for name, t in plt.state_dict().items():
            if not name.startswith("W_dec"):
                cross.state_dict()[name].copy_(t)
        for l in range(L):
            cross.W_dec[l].zero_()
            cross.W_dec[l][:, :1] = plt.W_dec[l]
    idx = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(seed))
    return model, plt.to(dtype), cross.to(dtype), idx


def graph_of(model, transcoder, idx):
    rep = G.local_replacement(model, transcoder, idx)
    return rep, G.attribute(model, transcoder, rep, batch_size=32)


@pytest.mark.parametrize("skip", [False, True])
def test_a_plt_graph_is_the_graph_of_a_clt_without_cross_layer_decoders(skip):
    model, plt, cross, idx = make(skip)
    rep_p, g_p = graph_of(model, plt, idx)
    rep_c, g_c = graph_of(model, cross, idx)
    assert len(g_p.feats) > 30 and torch.equal(g_p.feats, g_c.feats)
    torch.testing.assert_close(rep_p.error, rep_c.error)
    torch.testing.assert_close(g_p.adjacency, g_c.adjacency, atol=1e-10, rtol=1e-8)
    assert G.scores(g_p) == pytest.approx(G.scores(g_c), abs=1e-8)


def perturbed(model, plt, rep, graph, eps, feature=None, error=None, embed=None):
    """Every target's change when one source is scaled by (1 + eps), by forward passes alone; the
    skip connection stays live in both (target_inputs), as it is in the replacement model."""
    resid = rep.token + rep.position
    # what the nodes and biases write; the skip term is added live
    fixed = rep.mlp_out - rep.skip  # (T, L, d)
    if feature is not None:  # a PLT feature writes to its own layer only
        (l, p, f), a = rep.feats[feature].tolist(), rep.acts[feature]
        fixed[p, l] += eps * a * plt.W_dec[l][f, 0].detach() / plt.output_scale[l]
    if error is not None:
        l, p = divmod(error, T)
        fixed[p, l] += eps * rep.error[p, l]
    if embed is not None:
        resid[embed] += eps * rep.token[embed]
    before = torch.cat(G.target_inputs(model, plt, rep, graph.feats, graph.target_vectors))
    after = torch.cat(
        G.target_inputs(model, plt, rep, graph.feats, graph.target_vectors, resid, fixed)
    )
    return after - before


# resid_mid: a transcoder that reads ln_2's input (EleutherAI's pre_ln_hook conversions): its
# encoder and skip read the residual stream itself, no ln_2 transposed between
@pytest.mark.parametrize(
    "skip, input_hook", [(False, "mlp_in"), (True, "mlp_in"), (True, "resid_mid")]
)
def test_plt_graphs_are_exact_and_measured(skip, input_hook):
    model, plt, _, idx = make(skip, input_hook=input_hook)
    rep, graph = graph_of(model, plt, idx)
    if skip:  # the skip path matters here: the error nodes no longer hold the whole MLP output
        assert rep.skip[1:].abs().max() > 0.1 * rep.mlp_out[1:].abs().max()
    err, scale = G.exactness(model, plt, rep, graph)
    assert scale > 1 and err <= 1e-10 * scale, (err, scale)
    A, s = graph.adjacency, graph.slices()
    targets = torch.cat([A[s.features], A[s.logits]])
    layer = graph.feats[:, 0]
    # across a whole layer
    cross = A[s.features, s.features] * (layer[:, None] >= layer[None, :] + 2)
    sources = dict(
        feature=cross.abs().max(0).values.argmax().item(),
        embed=A[s.logits, s.tokens].abs().max(0).values.argmax().item(),
        error=A[s.features, s.errors].abs().max(0).values.argmax().item(),
    )
    columns = dict(
        feature=sources["feature"],
        embed=s.tokens.start + sources["embed"],
        error=s.errors.start + sources["error"],
    )
    for kind, i in sources.items():
        expected = 1e-3 * targets[:, columns[kind]]
        # the source reaches some target: the check has teeth
        assert expected.abs().max() > 1e-7, kind
        delta = perturbed(model, plt, rep, graph, 1e-3, **{kind: i})
        assert (delta - expected).abs().max() <= 1e-6 * expected.abs().max(), kind


def test_the_skip_path_carries_edges():
    """With a skip connection, a token's edge to a logit also runs through every MLP's skip term: the
    graph differs from the one where the skip output is frozen into the error nodes."""
    model, plt, _, idx = make(skip=True)
    rep, graph = graph_of(model, plt, idx)
    frozen = CrossLayerTranscoder(
        CLTConfig(n_layers=L, d_model=D, n_features=F_, decoder="per-layer")
    )
    frozen = frozen.to(torch.float64).eval()
    frozen.load_state_dict({k: v for k, v in plt.state_dict().items() if k != "W_skip"})
    # its error nodes hold the skip output, as constants
    rep_f = G.local_replacement(model, frozen, idx)
    torch.testing.assert_close(rep_f.error[1:], (rep.error + rep.skip)[1:])
    s = graph.slices()
    no_skip = G.attribute(model, frozen, rep_f, batch_size=32)
    difference = (
        (graph.adjacency[s.logits, s.tokens] - no_skip.adjacency[s.logits, s.tokens]).abs().max()
    )
    assert difference > 1e-3 * graph.adjacency[s.logits, s.tokens].abs().max()


def test_a_resid_mid_plt_with_skip_matches_circuit_tracer():
    """The same PLT reading ln_2's input, as circuit-tracer's hook_resid_mid transcoders do
    (EleutherAI's conversions of mntss's): circuit-tracer's graph of it is ours, edge by edge."""
    assert_matches_circuit_tracer("graph_reference_resid", "plt")
    model, plt, idx, ref, _ = circuit_tracer_reference("graph_reference_resid", "plt")
    assert plt.config.input_hook == "resid_mid"
    as_mlp_in = CrossLayerTranscoder(dataclasses.replace(plt.config, input_hook="mlp_in")).eval()
    as_mlp_in.load_state_dict(plt.state_dict())  # the same weights reading ln_2's output instead
    rep = G.local_replacement(model, as_mlp_in, idx)
    assert not torch.equal(rep.feats, ref["features"])


def test_a_plt_with_skip_matches_circuit_tracer():
    """circuit-tracer's graph of a PLT with a skip connection (tests/fixtures/make_graph_reference.py,
    loaded through save_circuit_tracer as its TranscoderSet) is ours, edge by edge; with the skip
    output frozen into the error nodes instead, it would not be (edges off by ~10x their row's largest)."""
    assert_matches_circuit_tracer("graph_reference_plt", "plt")
    model, plt, idx, ref, _ = circuit_tracer_reference("graph_reference_plt", "plt")
    frozen = CrossLayerTranscoder(dataclasses.replace(plt.config, skip=False)).eval()
    frozen.load_state_dict({k: v for k, v in plt.state_dict().items() if k != "W_skip"})
    graph = G.attribute(model, frozen, G.local_replacement(model, frozen, idx), batch_size=16)
    with pytest.raises(AssertionError):
        assert_rows_match(graph, ref["rows"])

"""experiments/faithfulness.py: its predictions are the graph's own. On toy-world prompts of
models/tiny with a random TopK CLT: ablating a feature in the replacement model's view
(freeze="all") moves the top logit node by the graph's direct prediction, and the total prediction
(every path through the features, removal_effects) equals the replacement model run with its
features responding linearly."""

import random

import pytest
import torch

import graph
from forge import toyworld
from clt import CLTConfig, CrossLayerTranscoder
from experiments.compactness import family_prompts
from experiments.faithfulness import faithfulness_points, removal_effects
from forge.hub import DEFAULT_MODEL, load_tokenizer
from model import GPT

FAMILIES = ("one_hop", "two_hop", "ioi")  # a prompt of each: a short, a long and a story


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def setup():
    """(models/tiny, a random TopK CLT for it, [(family, token ids)] of a prompt of each of
    FAMILIES)."""
    model = GPT.from_pretrained().eval()
    g = model.config
    t = CrossLayerTranscoder(
        CLTConfig(n_layers=g.n_layer, d_model=g.n_embd, n_features=64, activation="topk", k=4),
        seed=0,
    ).eval()
    # random decoders write little: scaled up, features carry the influence and pruning keeps them
    with torch.no_grad():
        for w in t.W_dec:
            w.mul_(30)
    enc, world = load_tokenizer(DEFAULT_MODEL), toyworld.load_world()
    families = family_prompts(world, 1)
    prompts = [(fam, graph.encode_prompt(enc, families[fam][0][0], g.n_ctx)) for fam in FAMILIES]
    return model, t, prompts


def linear_replacement_change(model, t, rep, g, i):
    """The change of logit node 0 when feature node i is removed, in the frozen replacement model
    whose other features respond one for one to their pre-activations (errors held): run layer by
    layer, independently of the adjacency."""
    n_layers = g.n_layers
    pre0, logits0 = graph.target_inputs(model, t, rep, g.feats, g.target_vectors)
    change = torch.zeros_like(g.acts)
    # layer l's features settle in pass l + 1; the last pass reads the logits
    for _ in range(n_layers + 1):
        change[i] = -g.acts[i]
        written = graph.reconstruct(t, g.feats, change, len(g.tokens), bias=False)  # (T, L, d)
        fixed = rep.mlp_out - rep.skip + written  # (T, L, d)
        pre, logits = graph.target_inputs(model, t, rep, g.feats, g.target_vectors, mlp_out=fixed)
        change = pre - pre0
    return (logits - logits0)[0].item()


def test_frozen_ablation_is_the_direct_prediction(setup):
    model, t, prompts = setup
    for fam, idx in prompts:
        points, _ = faithfulness_points(model, t, idx, 3, random.Random(0))
        assert len(points) == 6, fam  # 3 top features and 3 random ones
        measured = torch.tensor([q["measured_frozen"] for q in points])
        predicted = torch.tensor([q["predicted_direct"] for q in points])
        scale = predicted.abs().max().item()
        assert scale > 1e-2, fam
        torch.testing.assert_close(measured, predicted, rtol=1e-4, atol=1e-4 * scale, msg=fam)
        # the real model is not the replacement model: its MLPs respond
        assert max(abs(q["measured_real"] - q["measured_frozen"]) for q in points) > 1e-3, fam


def test_total_prediction_is_the_linear_replacement_model(setup):
    model, t, prompts = setup
    fam, idx = prompts[1]  # the two-hop prompt: the longest, the most paths
    rep = graph.local_replacement(model, t, idx)
    g = graph.attribute(model, t, rep, batch_size=1024)
    low = (g.feats[:, 0] == 0).nonzero()[:, 0]  # layer 0: the longest paths
    total, change = removal_effects(g, low)
    direct = -g.adjacency[g.slices().logits.start, low].double()
    most = (total - direct).abs().topk(3).indices  # the features with the most indirect effect
    assert (total[most] - direct[most]).abs().min() > 1e-3  # paths through features do matter here
    for j in most.tolist():
        i = low[j].item()
        # removed, and others respond
        assert change[i, j] == -g.acts[i] and change[:, j].count_nonzero() > 1
        expected = linear_replacement_change(model, t, rep, g, i)
        got = total[j].item()
        assert abs(got - expected) <= 1e-4 * max(abs(expected), 1e-2), (i, got, expected)

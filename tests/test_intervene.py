"""Interventions, generation under intervention and custom attribution targets: steering a silent
feature adds exactly its decoder writes; in the replacement model's view (freeze="all") the logits
move by exactly what the graph's edges predict; a zero intervention generates what plain greedy
decoding generates; a logit-difference target's row is the difference of the two logit rows; bad
specs fail with a message that names the fix. Small random GPT + random CLT (tests/test_graph.py's)."""

import json

import pytest
import torch

import graph as G
from forge.hub import load_tokenizer
from clt import CLTConfig
from forge.graphcli import check_interventions, parse_interventions, parse_layers
from intervene import FREEZE, Intervention, generate, intervene, run_intervened
from intervene import main as intervene_main
from model import GPT
import test_graph_plt
from test_graph import F_, L, T, build, graph_args, write_model_and_clt

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def silent_feature(rep, layer, pos):
    """A feature of `layer` that does not fire at `pos` on the prompt."""
    active = rep.feats[(rep.feats[:, 0] == layer) & (rep.feats[:, 1] == pos), 2]
    return torch.ones(F_, dtype=torch.bool).index_fill(0, active, False).nonzero()[0, 0].item()


@pytest.mark.parametrize("freeze", ["none", "all"])
def test_steering_a_silent_feature_adds_its_decoder_writes(freeze):
    model, clt, rep, _ = build()
    l, p, value = 1, 4, 3.0
    f = silent_feature(rep, l, p)
    out = run_intervened(model, clt, rep.idx, [Intervention(l, p - T, f, "set", value)], freeze)
    assert out.old.tolist() == [0.0] and out.new.tolist() == [value]
    change = (out.acts.mlp_out - out.clean.mlp_out)[0]  # (T, L, d)
    writes = clt.decoder_writes(l, torch.tensor([f]), torch.tensor([value]))
    writes = writes[0].detach()  # (L - l, d)
    # nothing below the feature's layer or before it
    assert not change[:, :l].any()
    assert not change[:p].any()
    # its own layer's MLP input is clean
    torch.testing.assert_close(change[p, l], writes[0], atol=1e-6, rtol=0)
    if freeze == "all":  # every MLP output held: the change is the writes, exactly, everywhere
        torch.testing.assert_close(change[p, l:], writes, atol=1e-6, rtol=0)
        assert not change[p + 1 :].any()
    else:  # the real model: later MLPs respond to the change, later positions too
        assert (change[p, l + 1 :] - writes[1:]).abs().max() > 1e-4 and change[
            p + 1 :
        ].abs().max() > 1e-4
    assert (out.logits - out.clean_logits)[p:].abs().max() > 1e-4


@pytest.mark.parametrize("transcoder", ["clt", "plt with skip"])
def test_the_replacement_view_moves_the_logits_by_the_graphs_edges(transcoder):
    """Ablating graph features with attention, LayerNorm and MLP outputs frozen is linear: each logit
    node (logit minus the mean logit) and each feature node's pre-activation moves by minus the sum of
    the ablated features' edges into it, to fp32 precision (the skip connection stays live, as in the graph)."""
    if transcoder == "clt":
        model, clt, rep, graph = build()
    else:
        model, clt, _, idx = test_graph_plt.make(skip=True, dtype=torch.float32)
        rep, graph = test_graph_plt.graph_of(model, clt, idx)
    s = graph.slices()
    A = graph.adjacency
    # the 3 features with the largest logit edges
    top = A[s.logits, s.features].abs().sum(0).topk(3).indices
    ivs = [Intervention(*graph.feats[i].tolist(), "ablate") for i in top.tolist()]
    out = run_intervened(model, clt, rep.idx, ivs, freeze="all")
    torch.testing.assert_close(out.old, graph.acts[top])
    new, clean = out.logits[-1], out.clean_logits[-1]
    moved = (new - new.mean() - clean + clean.mean())[graph.logit_ids]  # (k,)
    predicted = -A[s.logits][:, top].sum(1)
    assert predicted.abs().max() > 1e-2
    torch.testing.assert_close(moved, predicted, atol=1e-5, rtol=0)
    l, p, f = graph.feats.T
    pre_change = (clt.pre_acts(out.acts.mlp_in[0]) - clt.pre_acts(out.clean.mlp_in[0]))[
        p, l, f
    ]  # (n,)
    torch.testing.assert_close(pre_change, -A[s.features][:, top].sum(1), atol=1e-5, rtol=0)
    real = intervene(model, clt, rep.idx, ivs, freeze="none")[1][
        -1
    ]  # the real model's MLPs respond
    assert (real - new).abs().max() > 1e-4


def test_freezing_and_layer_ranges():
    model, clt, rep, _ = build()
    l, p, f = rep.feats[(rep.feats[:, 0] == 0) & (rep.feats[:, 1] == 3)][0].tolist()
    ivs = [Intervention(l, p, f, "scale", -2.0)]
    runs = {freeze: run_intervened(model, clt, rep.idx, ivs, freeze) for freeze in FREEZE}
    for a, b in (("none", "attention"), ("attention", "all")):
        assert (runs[a].logits - runs[b].logits).abs().max() > 1e-5  # each frozen part matters
    for freeze, out in runs.items():  # the clean run is the plain forward pass, whatever is frozen
        torch.testing.assert_close(out.clean_logits, model(rep.idx)[0], atol=0, rtol=0)
    later = run_intervened(model, clt, rep.idx, ivs, "all", layers=(1, L))  # not mlp_out[0]
    change = (later.acts.mlp_out - later.clean.mlp_out)[0, p]  # (L, d)
    assert not change[0].any()
    torch.testing.assert_close(
        change[1:],
        (runs["all"].acts.mlp_out - runs["all"].clean.mlp_out)[0, p, 1:],
        atol=1e-6,
        rtol=0,
    )
    _, same = intervene(model, clt, rep.idx, [Intervention(l, p, f, "add", 0.0)], "attention")
    torch.testing.assert_close(same, runs["none"].clean_logits, atol=0, rtol=0)


def test_parse_interventions():
    ivs = parse_interventions("2/-1/7=1.5, 0/3/9*-1,1/2/4+0.25,2/1/3:ablate,0/1/1=0", Intervention)
    assert ivs == [
        Intervention(2, -1, 7, "set", 1.5),
        Intervention(0, 3, 9, "scale", -1.0),
        Intervention(1, 2, 4, "add", 0.25),
        Intervention(2, 1, 3, "ablate", 0.0),
        Intervention(0, 1, 1, "set", 0.0),
    ]
    for bad in ("1-2-3", "1/2/3", "1/2/3=x", "1/2/3:zero", "1/2/3=1,", "a/2/3=1"):
        with pytest.raises(ValueError, match="LAYER/POS/FEATURE=VALUE"):
            parse_interventions(bad, Intervention)
    for bad in (f"{L}/0/0=1", f"0/{T}/0=1", f"0/{-T - 1}/0=1", f"0/0/{F_}=1"):
        with pytest.raises(ValueError, match=f"need 0 <= layer < {L}, -{T} <= pos < {T}"):
            check_interventions(
                parse_interventions(bad, Intervention), T, CLTConfig(n_layers=L, n_features=F_)
            )
    model, clt, rep, _ = build()
    with pytest.raises(ValueError, match="changed twice"):
        intervene(model, clt, rep.idx, parse_interventions(f"0/1/2=1,0/{1 - T}/2*2", Intervention))
    with pytest.raises(ValueError, match="mode 'zero'"):
        intervene(model, clt, rep.idx, [Intervention(0, 1, 2, "zero")])
    with pytest.raises(ValueError, match="freeze='ln'"):
        intervene(model, clt, rep.idx, [], freeze="ln")
    with pytest.raises(ValueError, match="need 0 <= start < end"):
        intervene(model, clt, rep.idx, [], layers=(2, 1))
    with pytest.raises(ValueError, match="START:END"):
        parse_layers("1-3", L)
    assert parse_layers("1:", L) == (1, L) and parse_layers("", L) is None


# -----------------------------------------------------------------------------
# generation under intervention


def test_a_zero_intervention_generates_what_greedy_decoding_does():
    model, clt, rep, _ = build()
    l, p, f = rep.feats[rep.feats[:, 1] == T - 1][0].tolist()
    greedy = model.generate(rep.idx, 8, top_k=1)  # plain greedy decoding (clt.py)
    for ivs in ([], [Intervention(l, -1, f, "scale", 1.0)], [Intervention(l, p, f, "add", 0.0)]):
        clean, steered = generate(model, clt, rep.idx, ivs, 8, every_token=True)
        assert torch.equal(clean, greedy) and torch.equal(steered, greedy)
    sampled = [
        generate(
            model,
            clt,
            rep.idx,
            [Intervention(l, -1, f, "scale", 1.0)],
            8,
            temperature=1.0,
            top_k=20,
            seed=3,
        )
        for _ in range(2)
    ]
    assert torch.equal(sampled[0][0], sampled[0][1]) and torch.equal(sampled[0][0], sampled[1][0])
    steer = [Intervention(0, -1, silent_feature(rep, 0, T - 1), "set", 50.0)]
    once = generate(model, clt, rep.idx, steer, 8)[1]
    every = generate(model, clt, rep.idx, steer, 8, every_token=True)[1]
    # the same first token, then it steers on
    assert once[0, T] == every[0, T]
    assert not torch.equal(once, every)
    assert not torch.equal(every, greedy)
    with pytest.raises(ValueError, match="n_ctx=32"):
        generate(model, clt, rep.idx, [], 32 - T + 1)


def test_command_lines_intervene_and_generate(tmp_path, capsys, make_hub_model):
    model_dir, clt_dir = write_model_and_clt(tmp_path, make_hub_model)
    args = ["--model", model_dir, "--clt", clt_dir, "--prompt", "Tarn is in", "--device", "cpu"]
    intervene_main(
        ["intervene", *args, "--intervene", "1/-1/3=4,0/2/5*2", "--freeze", "all", "--layers", "1:"]
    )
    out = capsys.readouterr().out
    assert "feature 1/-1/3" in out and "-> 4 (set 4)" in out and "p before" in out
    intervene_main(
        ["generate", *args, "--intervene", "2/-1/7+9", "--every-token", "--max-new-tokens", "5"]
    )
    out = capsys.readouterr().out
    assert "clean:" in out and "intervened:" in out and "5 tokens in" in out
    with pytest.raises(ValueError, match="intervene needs --intervene"):
        intervene_main(["intervene", *args])
    with pytest.raises(ValueError, match="need 0 <= layer < 3"):
        intervene_main(["generate", *args, "--intervene", "3/0/0=1"])


# -----------------------------------------------------------------------------
# custom attribution targets


def test_a_logit_difference_row_is_the_difference_of_the_logit_rows():
    model, clt, rep, graph = build()
    a, b = (
        graph.logit_ids[:2].tolist() if len(graph.logit_ids) > 1 else (graph.logit_ids[0].item(), 7)
    )
    both = G.attribute(
        model,
        clt,
        rep,
        batch_size=64,
        targets=G.token_targets(model, rep.logits, torch.tensor([a, b])),
    )
    W = model.wte.weight.detach()
    diff = G.attribute(
        model, clt, rep, batch_size=64, targets=G.custom_target(model, W[a] - W[b], "a - b")
    )
    s2, s1 = both.slices(), diff.slices()
    rows2, row1 = (
        both.adjacency[s2.logits, : s2.logits.start],
        diff.adjacency[s1.logits, : s1.logits.start],
    )
    assert torch.equal(both.feats, diff.feats) and row1.abs().max() > 1e-2
    torch.testing.assert_close(
        row1[0], rows2[0] - rows2[1], atol=1e-5 * rows2.abs().max().item(), rtol=0
    )
    assert diff.logit_ids.tolist() == [model.config.vocab_size] and diff.target_labels == ["a - b"]
    err, scale = G.exactness(model, clt, rep, diff)  # its row + bias = its input, as for a logit
    assert err <= 1e-4 * scale
    replacement, completeness = G.scores(diff)
    assert 0 < replacement < 1 and 0 < completeness < 1 and G.prune(diff)[0][s1.features].any()
    same = G.attribute(
        model, clt, rep, batch_size=64, targets=G.token_targets(model, rep.logits, graph.logit_ids)
    )
    # the default is token targets
    torch.testing.assert_close(same.adjacency, graph.adjacency, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        G.custom_target(model, torch.zeros(3), "bad")


def test_command_line_targets(tmp_path, capsys, make_hub_model):
    from safetensors.torch import load_file, save_file

    model_dir, clt_dir = write_model_and_clt(tmp_path, make_hub_model)
    args = graph_args(model_dir, clt_dir, tmp_path)
    G.main([*args, "--target-diff", "a|b", "--out", str(tmp_path / "diff")])
    assert 'Output "a" - "b" (logit difference)' in capsys.readouterr().out
    data = json.loads((tmp_path / "diff" / "graph.json").read_text())
    outputs = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    label = 'Output "a" - "b" (logit difference)'
    assert [n["clerp"] for n in outputs] == [label] == data["metadata"]["info"]["targets"]
    model, enc = GPT.from_pretrained(model_dir), load_tokenizer(model_dir)
    a, b, c = (enc.encode(x)[0] for x in "abc")
    W = model.wte.weight.detach()
    save_file({"direction": W[a] - W[b]}, str(tmp_path / "dir.safetensors"))
    G.main(
        [
            *args,
            "--target-direction",
            str(tmp_path / "dir.safetensors"),
            "--out",
            str(tmp_path / "dir"),
        ]
    )
    by_diff, by_file = (load_file(tmp_path / w / "adjacency.safetensors") for w in ("diff", "dir"))
    torch.testing.assert_close(by_file["adjacency"], by_diff["adjacency"], atol=1e-6, rtol=0)
    # --target-diff through TARGETS
    G.main([*args, "--target", "diff:a|b", "--out", str(tmp_path / "named")])
    by_name = load_file(tmp_path / "named" / "adjacency.safetensors")
    torch.testing.assert_close(by_name["adjacency"], by_diff["adjacency"], atol=0, rtol=0)
    G.main([*args, "--target-tokens", "a|b|c", "--out", str(tmp_path / "set")])
    logit_tokens = load_file(tmp_path / "set" / "adjacency.safetensors")["logit_tokens"]
    assert logit_tokens.tolist() == [a, b, c]
    save_file({"x": W[0], "y": W[1]}, str(tmp_path / "two.safetensors"))
    save_file({"x": W[:2]}, str(tmp_path / "wide.safetensors"))
    for flags, message in (
        (["--target-diff", "ab|c"], "is 2 tokens"),
        (["--target-diff", "a"], "two tokens as A|B"),
        (["--target-tokens", "a|a"], "twice"),
        (["--target-diff", "a|b", "--target-tokens", "c"], "give one of"),
        (["--target-direction", str(tmp_path / "two.safetensors")], "save exactly one"),
        (["--target-direction", str(tmp_path / "wide.safetensors")], r"shape \(32,\)"),
    ):
        with pytest.raises(ValueError, match=message):
            G.main([*args, *flags, "--out", str(tmp_path / "bad")])
    with pytest.raises(FileNotFoundError, match="save_file"):
        G.main([*args, "--target-direction", str(tmp_path / "none.safetensors")])


def test_a_target_registered_in_TARGETS_alone_is_a_command_line_target(
    tmp_path, make_hub_model, monkeypatch
):
    """A fork adds a kind of output node with one entry in graph.TARGETS; --target NAME:SPEC reaches it."""
    from safetensors.torch import load_file, save_file

    model_dir, clt_dir = write_model_and_clt(tmp_path, make_hub_model)

    # a toy target: token spec's unembedding row, not centered
    def unembedding_row(spec, model, enc, rep):
        return G.custom_target(model, model.wte.weight[int(spec)].detach(), f"toy {spec}")

    monkeypatch.setitem(G.TARGETS, "toy", unembedding_row)
    args = graph_args(model_dir, clt_dir, tmp_path)
    G.main([*args, "--target", "toy:7", "--out", str(tmp_path / "toy")])
    data = json.loads((tmp_path / "toy" / "graph.json").read_text())
    outputs = [n["clerp"] for n in data["nodes"] if n["feature_type"] == "logit"]
    assert outputs == ["toy 7"] == data["metadata"]["info"]["targets"]
    save_file(
        {"row": GPT.from_pretrained(model_dir).wte.weight[7].detach()},
        str(tmp_path / "row.safetensors"),
    )
    G.main(
        [
            *args,
            "--target-direction",
            str(tmp_path / "row.safetensors"),
            "--out",
            str(tmp_path / "row"),
        ]
    )
    toy, by_file = (load_file(tmp_path / w / "adjacency.safetensors") for w in ("toy", "row"))
    assert toy["adjacency"].abs().max() > 0
    torch.testing.assert_close(toy["adjacency"], by_file["adjacency"], atol=0, rtol=0)
    for bad in ("nothing:1", "toy"):
        with pytest.raises(ValueError, match="NAME:SPEC"):
            G.main([*args, "--target", bad, "--out", str(tmp_path / "bad")])

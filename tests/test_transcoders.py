"""Per-layer transcoders and skip connections: a PLT is a CLT without its cross-layer decoders."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import train as T
from test_train import config, read_metrics, small_cache  # noqa: F401 (small_cache is a fixture)
import clt as clt_module
from clt import CLTConfig, CrossLayerTranscoder, load_transcoder, new_transcoder
from forge.formats import from_saelens, save_circuit_tracer, save_saelens


def pair(skip=False, L=3, d=8, F=16, seed=0):
    """A CLT and a PLT with the same encoders, same-layer decoders, biases, scales (and skip)."""
    config = dict(n_layers=L, d_model=d, n_features=F, activation="relu", skip=skip)
    cross = CrossLayerTranscoder(CLTConfig(**config), seed)
    plt = CrossLayerTranscoder(CLTConfig(**config, decoder="per-layer"), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for t in (cross.b_enc, cross.b_dec, cross.input_scale, cross.output_scale):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        if skip:
            cross.W_skip.copy_(torch.randn(cross.W_skip.shape, generator=g) / d)
        names = ["W_enc", "b_enc", "b_dec", "input_scale", "output_scale"] + (
            ["W_skip"] if skip else []
        )
        for name in names:
            getattr(plt, name).copy_(getattr(cross, name))
        for l in range(L):
            plt.W_dec[l].copy_(cross.W_dec[l][:, :1])
            cross.W_dec[l][:, 1:] = 0  # the cross-layer terms, zeroed
    return cross, plt


@pytest.mark.parametrize("skip", [False, True])
def test_a_plt_equals_a_clt_whose_cross_layer_decoders_are_zero(skip):
    cross, plt = pair(skip)
    assert [tuple(W.shape) for W in plt.W_dec] == [(16, 1, 8)] * 3
    mlp_in = torch.randn(20, 3, 8)
    acts, out = plt(mlp_in)
    acts_ref, out_ref = cross(mlp_in)
    torch.testing.assert_close(acts, acts_ref)
    torch.testing.assert_close(out, out_ref)
    sparse = plt.decode(acts, sparse=True, mlp_in=mlp_in)
    torch.testing.assert_close(sparse, out, atol=1e-5, rtol=1e-5)
    ids = torch.tensor([0, 5])
    writes = plt.decoder_writes(1, ids, torch.tensor([1.0, 2.0]))  # (n, 1, d): its own layer only
    cross_writes = cross.decoder_writes(1, ids, torch.tensor([1.0, 2.0]))  # (n, 3, d)
    torch.testing.assert_close(writes, cross_writes[:, :1])


def test_the_skip_connection_is_linear_in_mlp_in_and_folds_into_the_export(tmp_path):
    _, plt = pair(skip=True)
    mlp_in = torch.randn(10, 3, 8)
    acts = plt.encode(mlp_in)
    skip = plt.decode(acts, mlp_in=mlp_in) - plt.decode(acts)  # (B, L, d)
    x = mlp_in * plt.input_scale[:, None]
    expected = torch.einsum("bld,lde->ble", x, plt.W_skip) / plt.output_scale[:, None]
    torch.testing.assert_close(skip, expected, atol=1e-5, rtol=1e-5)
    assert skip.abs().max() > 1e-3  # the skip path is not zero: the test has teeth
    plt.save_pretrained(tmp_path)
    back = CrossLayerTranscoder.from_pretrained(tmp_path)
    assert back.config.decoder == "per-layer" and back.config.skip
    torch.testing.assert_close(back(mlp_in)[1], plt(mlp_in)[1], atol=1e-5, rtol=1e-5)


def test_a_mixed_or_incomplete_export_is_refused(tmp_path):
    cross, _ = pair()
    cross.save_pretrained(tmp_path / "a")
    cross.save_pretrained(tmp_path / "b")
    other = (tmp_path / "b" / "W_dec_1.safetensors").read_bytes()
    (tmp_path / "a" / "W_dec_1.safetensors").write_bytes(other)
    with pytest.raises(ValueError, match="another save.*re-export"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "a")
    (tmp_path / "b" / "W_enc_2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "b")


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="decoder must be one of"):
        CLTConfig(decoder="per_layer")


def perturbed_ln_2(model, seed=3):
    """ln_2 with non-trivial weights and biases, so folding its affine map is tested, not assumed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.h:
            block.ln_2.weight.copy_(torch.rand(block.ln_2.weight.shape, generator=g) + 0.5)
            block.ln_2.bias.copy_(torch.randn(block.ln_2.bias.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("activation, skip", [("relu", False), ("jumprelu", True)])
def test_saelens_layout_computes_our_transcoder_on_transformerlens_inputs(
    hub_model, tmp_path, activation, skip
):
    _, model, _ = hub_model
    model = perturbed_ln_2(copy.deepcopy(model))  # the fixture's model is shared: change a copy
    _, plt = pair(skip, L=2, d=32, F=24)
    plt = CrossLayerTranscoder(dataclasses.replace(plt.config, activation=activation), 0).eval()
    with torch.no_grad():
        plt.b_enc.normal_(0, 0.5)
        if skip:
            plt.W_skip.normal_(0, 0.1)
    save_saelens(plt, tmp_path, model)
    idx = torch.randint(0, 257, (2, 9))
    # (N, L, d) our MLP inputs
    mlp_in = model.run_with_acts(idx, logits=False)[1].mlp_in.flatten(0, 1)
    expected = plt(mlp_in)[1]
    for l, block in enumerate(model.h):
        folder = tmp_path / f"blocks.{l}.ln2.hook_normalized"
        cfg = json.loads((folder / "cfg.json").read_text())
        p = load_file(folder / "sae_weights.safetensors")
        architecture = {"relu": "transcoder", "jumprelu": "jumprelu_skip_transcoder"}[activation]
        assert cfg["architecture"] == architecture
        # TransformerLens's ln2.hook_normalized
        x_hat = (mlp_in[:, l] - block.ln_2.bias) / block.ln_2.weight
        pre = x_hat @ p["W_enc"] + p["b_enc"]
        acts = torch.relu(pre) * (pre > p["threshold"]) if "threshold" in p else torch.relu(pre)
        out = acts @ p["W_dec"] + p["b_dec"] + (x_hat @ p["W_skip"].T if skip else 0)
        torch.testing.assert_close(out, expected[:, l], atol=1e-4, rtol=1e-4)
    back = from_saelens(tmp_path, model, new_transcoder)
    assert back.config.model_sha256 == model.fingerprint()
    torch.testing.assert_close(back(mlp_in)[1], expected, atol=1e-4, rtol=1e-4)


def test_saelens_refuses_what_it_cannot_hold(hub_model, tmp_path):
    _, model, _ = hub_model
    cross = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=32, n_features=8))
    with pytest.raises(ValueError, match="per-layer transcoders; this one is cross-layer"):
        save_saelens(cross, tmp_path, model)
    plt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=32, n_features=8, decoder="per-layer"))
    save_saelens(plt, tmp_path, model)
    (tmp_path / "blocks.1.ln2.hook_normalized" / "cfg.json").unlink()
    with pytest.raises(ValueError, match=r"layers \[0\], the model has 2"):
        from_saelens(tmp_path, model, new_transcoder)


def random_transcoder(decoder, activation, skip, L=2, d=32, F=24):
    """A transcoder that fires on about half its features, with scales other than 1 and a skip path."""
    kind = dict(activation=activation, decoder=decoder, skip=skip)
    t = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=d, n_features=F, **kind), 0).eval()
    with torch.no_grad():
        t.b_enc.normal_(0, 0.5)
        t.b_dec.normal_(0, 0.1)
        t.input_scale.uniform_(0.5, 2)
        t.output_scale.uniform_(0.5, 2)
        if skip:
            t.W_skip.normal_(0, 0.1)
    return t


CIRCUIT_TRACER_CASES = [
    ("per-layer", "jumprelu", True),
    ("per-layer", "relu", False),
    ("per-layer", "batchtopk", True),
    ("cross-layer", "relu", False),
]


@pytest.mark.parametrize("decoder, activation, skip", CIRCUIT_TRACER_CASES)
def test_circuit_tracer_layout_loads_back_identically(
    hub_model, tmp_path, decoder, activation, skip
):
    _, model, _ = hub_model
    model = perturbed_ln_2(copy.deepcopy(model))
    t = random_transcoder(decoder, activation, skip)
    save_circuit_tracer(t, tmp_path / "ct", model)
    config = json.loads((tmp_path / "ct" / "config.yaml").read_text())
    kinds = {"per-layer": "transcoder_set", "cross-layer": "cross_layer_transcoder"}
    assert config["model_kind"] == kinds[decoder]
    assert config["feature_input_hook"] == "ln2.hook_normalized"
    assert config["feature_output_hook"] == "hook_mlp_out"
    back = load_transcoder(str(tmp_path / "ct"), model)
    assert dataclasses.replace(back.config, model_sha256="") == t.config
    idx = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))
    mlp_in = model.run_with_acts(idx, logits=False)[1].mlp_in.flatten(0, 1)  # (N, L, d)
    acts, out = t(mlp_in)
    assert 0 < (acts > 0).float().mean() < 1  # some features fire, not all: thresholds matter
    acts_back, out_back = back(mlp_in)  # float32 rounding of the folds alone: ~1e-7 here
    torch.testing.assert_close(acts_back, acts, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_back, out, atol=1e-6, rtol=1e-6)
    other = perturbed_ln_2(copy.deepcopy(model), seed=4)
    # its ln_2 was folded in: no other model's
    with pytest.raises(ValueError, match="another model"):
        load_transcoder(str(tmp_path / "ct"), other)


def test_circuit_tracer_layout_computes_our_plt_on_transformerlens_inputs(hub_model, tmp_path):
    """The files, read as circuit-tracer's SingleLayerTranscoder reads them (F.linear(x̂, W_enc, b_enc),
    JumpReLU x·(x > θ), acts @ W_dec + b_dec + x̂ @ W_skip.T), give our transcoder's output."""
    _, model, _ = hub_model
    model = perturbed_ln_2(copy.deepcopy(model))
    t = random_transcoder("per-layer", "jumprelu", True)
    save_circuit_tracer(t, tmp_path, model)
    idx = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))
    mlp_in = model.run_with_acts(idx, logits=False)[1].mlp_in.flatten(0, 1)  # (N, L, d)
    expected = t(mlp_in)[1]
    for l, block in enumerate(model.h):
        p = load_file(tmp_path / f"layer_{l}.safetensors")
        threshold = "activation_function.threshold"
        assert set(p) == {"W_enc", "W_dec", "b_enc", "b_dec", threshold, "W_skip"}
        # TransformerLens's ln2.hook_normalized
        x_hat = (mlp_in[:, l] - block.ln_2.bias) / block.ln_2.weight
        pre = torch.nn.functional.linear(x_hat, p["W_enc"], p["b_enc"])
        acts = pre * (pre > p["activation_function.threshold"])
        out = acts @ p["W_dec"] + p["b_dec"] + x_hat @ p["W_skip"].T
        torch.testing.assert_close(out, expected[:, l], atol=1e-5, rtol=1e-5)


def test_circuit_tracer_layout_refuses_what_it_cannot_hold(hub_model, tmp_path):
    _, model, _ = hub_model
    with pytest.raises(ValueError, match="no TopK transcoder"):
        save_circuit_tracer(random_transcoder("per-layer", "topk", False), tmp_path, model)
    with pytest.raises(ValueError, match="reads no skip connection"):
        save_circuit_tracer(random_transcoder("cross-layer", "relu", True), tmp_path, model)
    save_circuit_tracer(random_transcoder("per-layer", "relu", False), tmp_path, model)
    config = json.loads((tmp_path / "config.yaml").read_text())
    resid_mid = {**config, "feature_input_hook": "hook_resid_mid"}  # ln_2's input: read as is
    (tmp_path / "config.yaml").write_text(json.dumps(resid_mid))
    assert load_transcoder(str(tmp_path), model).config.input_hook == "resid_mid"
    resid_pre = {**config, "feature_input_hook": "hook_resid_pre"}  # ln_1's: not an MLP's
    (tmp_path / "config.yaml").write_text(json.dumps(resid_pre))
    with pytest.raises(ValueError, match="only MLP transcoders"):
        load_transcoder(str(tmp_path), model)
    (tmp_path / "config.yaml").write_text("model_kind: transcoder_set\n")  # YAML, as theirs
    with pytest.raises(ValueError, match="only MLP transcoders"):  # read, and its hooks refused
        load_transcoder(str(tmp_path), model)
    (tmp_path / "config.yaml").write_text("model_kind: [transcoder_set\n")
    with pytest.raises(ValueError, match="is not YAML"):
        load_transcoder(str(tmp_path), model)
    (tmp_path / "config.yaml").write_text("transcoders: [hf://a/b/layer_0.npz]\n")
    with pytest.raises(ValueError, match="lists transcoders in other files"):
        load_transcoder(str(tmp_path), model)


# -----------------------------------------------------------------------------
# training a PLT: train.py's loop, evaluation and export, unchanged


@pytest.mark.parametrize("skip", [False, True])
def test_a_short_plt_run_trains_exports_and_loads_back_identically(small_cache, tmp_path, skip):  # noqa: F811
    flags = dict(decoder="per-layer", skip=skip, steps=20, eval_every=20, ckpt_every=-1)
    m = T.train(config(small_cache, tmp_path, **flags))
    first = read_metrics(tmp_path)[0]
    assert sum(m["fvu"]) < sum(first["fvu"]), (first["fvu"], m["fvu"])  # it learned
    assert "recovered" in m["eval"]  # evaluated the same way: the spliced loss
    plt = CrossLayerTranscoder.from_pretrained(tmp_path)
    assert plt.config.decoder == "per-layer" and plt.config.skip == skip
    assert [tuple(W.shape) for W in plt.W_dec] == [(64, 1, 16)] * 2
    if skip:  # the skip connection trained too and went into the export
        assert plt.W_skip.abs().max() > 0
    x = torch.randn(10, 2, 16) * 4
    plt.save_pretrained(tmp_path / "again")
    back = CrossLayerTranscoder.from_pretrained(tmp_path / "again")
    for (name, u), (_, v) in zip(plt.state_dict().items(), back.state_dict().items()):
        assert torch.equal(u, v), name
    torch.testing.assert_close(back(x)[1], plt(x)[1])


def test_graph_py_attributes_saelens_transcoders(hub_model, tmp_path, capsys):
    import graph

    model_dir, model, _ = hub_model
    shape = dict(n_layers=2, d_model=32, n_features=24)
    plt = CrossLayerTranscoder(
        CLTConfig(**shape, activation="relu", decoder="per-layer", skip=True), 0
    )
    with torch.no_grad():
        plt.b_enc.fill_(0.2)  # some features fire on every token
        plt.W_skip.normal_(0, 0.1)
    save_saelens(plt, tmp_path / "saelens", model)
    clt_dir, out = (str(tmp_path / name) for name in ("saelens", "graph"))
    flags = ["--model", model_dir, "--clt", clt_dir, "--prompt", "the cat", "--device", "cpu"]
    graph.main(flags + ["--interp", "", "--out", out])  # no interp output: no labels
    assert "exactness" in capsys.readouterr().out
    nodes = json.loads((tmp_path / "graph" / "graph.json").read_text())["nodes"]
    assert any(n["feature_type"] == "cross layer transcoder" for n in nodes)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a CLT saved by train.py"):
        load_transcoder(str(tmp_path / "empty"), model)


def test_a_new_activation_is_one_registration(small_cache, tmp_path, monkeypatch):  # noqa: F811
    """A fork adds σ with one line in clt.py (ACTIVATIONS); training, export and loading follow."""

    def squared_relu(clt, pre):
        return torch.relu(pre).square()

    monkeypatch.setitem(clt_module.ACTIVATIONS, "squared_relu", squared_relu)
    flags = dict(activation="squared_relu", steps=4, eval_every=-1, ckpt_every=-1)
    T.train(config(small_cache, tmp_path, **flags))
    trained = CrossLayerTranscoder.from_pretrained(tmp_path)
    assert trained.config.activation == "squared_relu"
    x = torch.randn(3, trained.config.n_layers, trained.config.d_model)
    torch.testing.assert_close(trained.encode(x), torch.relu(trained.pre_acts(x)).square())
    monkeypatch.delitem(clt_module.ACTIVATIONS, "squared_relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        CLTConfig(activation="squared_relu")

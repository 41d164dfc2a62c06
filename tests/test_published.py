"""Published transcoders: EleutherAI's sparsify / clt-training layout, hub ids, graph.py on them.

The reference below recomputes what sparsify's CrossLayerRunner.decode computes (clt-training,
branch clt, cf9821f2, sparsify/runner.py and sparse_coder.py), written out per target and source
as that code loops, independently of forge/sparsify.py's mapping onto our CLT."""

import copy
import dataclasses
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from clt import load_transcoder
from conftest import write_hub_model
from forge import hub
from test_transcoders import perturbed_ln_2

L, D, F, K = 3, 32, 24, 6  # three layers: divide_cross_layer's 1/(sources - 1) is then not 1


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    """(directory, model) of a random 3-layer GPT-2 in the hub layout."""
    path = tmp_path_factory.mktemp("model3")
    return str(path), write_hub_model(path, n_layer=L)[0]


def sparsify_config(**kw):
    """cfg.json as SparseCoder.save_to_disk writes it: SparseCoderConfig.to_dict() | d_in."""
    cfg = dict(activation="topk", expansion_factor=32, normalize_decoder=True, num_latents=F, k=K)
    cfg.update(skip_connection=False, transcode=True, n_targets=0, n_sources=0)
    cfg.update(normalize_io=False, divide_cross_layer=False, train_post_encoder=True)
    cfg.update(post_encoder_scale=False, per_source_tied=False, secondary_target_tied=False)
    cfg.update(coalesce_topk="none", topk_coalesced=False, dtype="none", d_in=D)
    return {**cfg, **kw}


def write_sparsify(path, layers, prefix="h"):
    """[(cfg, tensors)] -> {path}/{prefix}.{l}.mlp/{cfg.json, sae.safetensors}."""
    for l, (cfg, tensors) in enumerate(layers):
        folder = os.path.join(path, f"{prefix}.{l}.mlp")
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{folder}/sae.safetensors")
        with open(f"{folder}/cfg.json", "w") as f:
            json.dump(cfg, f)
    return str(path)


def random_layers(kind, skip=False, seed=0):
    """Random sparsify transcoders of L layers: kind per-layer (a PLT), none, per-layer-coalesced,
    concat (CLTs in the runner's three storages)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    layers = []
    for l in range(L):
        n_targets = 0 if kind == "plt" else L - l
        coalesce = {"plt": "none", "none": "none"}.get(kind, kind)
        cfg = sparsify_config(n_targets=n_targets, n_sources=l + 1, coalesce_topk=coalesce)
        cfg.update(skip_connection=skip)
        p = {"encoder.weight": rand(F, D), "encoder.bias": rand(F, scale=0.5)}
        if kind in ("plt", "concat"):
            p.update(W_dec=rand(F, D), b_dec=rand(D))
        elif kind == "per-layer":
            p.update(W_dec=rand((l + 1) * F, D), b_dec=rand(D))
        else:  # each source stores its decoders, one per target; scaled, divided, normalized
            cfg.update(divide_cross_layer=True, post_encoder_scale=True, normalize_io=True)
            for j in range(n_targets):
                p.update({f"W_decs.{j}": rand(F, D), f"b_decs.{j}": rand(D)})
                p[f"post_encs.{j}"] = torch.zeros(F)
                p[f"post_enc_scales.{j}"] = rand(F).abs() + 0.5
            p.update(in_norm=torch.tensor([3.0 + l]), out_norm=torch.tensor([2.0 + l]))
        if skip:
            p["W_skip"] = rand(D, D, scale=0.1)
        layers.append((cfg, p))
    return layers


def reference(layers, mlp_in):
    """mlp_in (N, L, d) -> the runner's output per target (N, L, d), as its code computes it."""
    d = mlp_in.shape[-1]
    x, mids = [], []
    for l, (cfg, p) in enumerate(layers):
        xl = mlp_in[:, l]
        if cfg["normalize_io"]:  # SparseCoder.normalize_input
            xl = xl * (d**0.5 / p["in_norm"])
        pre = torch.relu(xl @ p["encoder.weight"].T + p["encoder.bias"])  # fused_encoder, topk
        vals, idx = pre.topk(cfg["k"], dim=-1)
        x.append(xl)
        mids.append((vals, idx))
    outs = []
    for t, (cfg_t, p_t) in enumerate(layers):
        active = [s for s in range(t + 1) if t - s < max(1, layers[s][0]["n_targets"])]
        out = 0
        if cfg_t["coalesce_topk"] == "none" or cfg_t["n_targets"] == 0:
            earlier = 0
            for s in active:
                cfg_s, p_s = layers[s]
                j, multi = t - s, cfg_s["n_targets"] > 0
                vals, idx = mids[s]
                if cfg_s["post_encoder_scale"]:  # MidDecoder.current_latent_acts
                    vals = vals * p_s[f"post_enc_scales.{j}" if multi else "post_enc_scale"][idx]
                W = p_s[f"W_decs.{j}" if multi else "W_dec"]
                y = (vals[..., None] * W[idx]).sum(1) + p_s[f"b_decs.{j}" if multi else "b_dec"]
                if "W_skip" in p_s and j == 0:
                    y = y + x[s] @ p_s["W_skip"].mT
                if s < t:
                    earlier = earlier + y
                else:
                    divide = max(1, len(active) - 1) if cfg_t["divide_cross_layer"] else 1
                    out = y + earlier / divide
        else:  # coalesced: one decode of every source's latents with the target's W_dec
            for i, s in enumerate(active):
                vals, idx = mids[s]
                offset = i * F if cfg_t["coalesce_topk"] == "per-layer" else 0
                out = out + (vals[..., None] * p_t["W_dec"][idx + offset]).sum(1)
            out = out + p_t["b_dec"] + (x[t] @ p_t["W_skip"].mT if "W_skip" in p_t else 0)
        if cfg_t["normalize_io"]:  # SparseCoder.denormalize_output
            out = out * (p_t["out_norm"] / d**0.5)
        outs.append(out)
    return torch.stack(outs, 1)


CASES = [("plt", True), ("plt", False), ("none", False), ("per-layer", True), ("concat", False)]


@pytest.mark.parametrize("kind, skip", CASES)
def test_sparsify_layouts_compute_what_their_runner_computes(model3, tmp_path, kind, skip):
    _, model = model3
    layers = random_layers(kind, skip)
    t = load_transcoder(write_sparsify(tmp_path, layers), model)
    assert t.config.decoder == ("per-layer" if kind == "plt" else "cross-layer")
    assert (t.config.activation, t.config.k, t.config.skip) == ("topk", K, skip)
    idx = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))
    mlp_in = model.run_with_acts(idx, logits=False)[1].mlp_in.flatten(0, 1)  # (N, L, d)
    acts, out = t(mlp_in)
    assert ((acts > 0).sum(-1) <= K).all() and (acts > 0).any()
    torch.testing.assert_close(out, reference(layers, mlp_in), atol=1e-5, rtol=1e-5)


def test_sparsify_llama_style_folders_load_too(model3, tmp_path):
    _, model = model3
    t = load_transcoder(write_sparsify(tmp_path, random_layers("plt"), "layers"), model)
    assert t.config.decoder == "per-layer"


def refused(tmp_path, model, layers, match, name="sparse"):
    with pytest.raises(ValueError, match=match):
        load_transcoder(write_sparsify(tmp_path / name, layers), model)


def test_sparsify_refuses_what_our_transcoder_cannot_compute(model3, tmp_path):
    _, model = model3
    layers = random_layers("none")
    layers[0][1]["post_encs.1"] = torch.ones(F)
    refused(tmp_path, model, layers, r"post-encoder bias \(post_encs.1\)", "bias")
    layers = random_layers("none")
    layers[0][1]["W_skips.1"] = torch.ones(D, D)
    refused(tmp_path, model, layers, r"skip connection to layer 1 \(W_skips.1\)", "skip")
    layers = random_layers("plt")
    layers[1][0]["activation"] = "groupmax"
    refused(tmp_path, model, layers, "activation='groupmax'; clt-forge computes 'topk'", "gm")
    layers = random_layers("plt")
    layers[0][0]["transcode"] = False
    refused(tmp_path, model, layers, "a sparse autoencoder", "sae")
    write_sparsify(tmp_path / "resid", random_layers("plt"))
    os.rename(tmp_path / "resid" / "h.2.mlp", tmp_path / "resid" / "h.2")
    with pytest.raises(ValueError, match="hooks 'h.2': clt-forge exposes each MLP's"):
        load_transcoder(str(tmp_path / "resid"), model)


def test_what_sparsify_files_read_comes_from_the_caller_cfg_json_or_the_name(model3, tmp_path):
    """EleutherAI's conversions of mntss's transcoders read ln_2's input (pre_ln_hook=True); their
    files cannot say so: the name says it unless cfg.json's pre_ln_hook or the caller does."""
    _, model = model3
    named = write_sparsify(tmp_path / "gpt2-mntss-transcoder-x", random_layers("plt"))
    plain = write_sparsify(tmp_path / "plain", random_layers("plt"))
    assert load_transcoder(named, model).config.input_hook == "resid_mid"
    assert load_transcoder(plain, model).config.input_hook == "mlp_in"
    assert load_transcoder(named, model, pre_ln_hook=False).config.input_hook == "mlp_in"
    assert load_transcoder(plain, model, pre_ln_hook=True).config.input_hook == "resid_mid"
    cfg_path = tmp_path / "plain" / "h.0.mlp" / "cfg.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), pre_ln_hook=True)))
    assert load_transcoder(plain, model).config.input_hook == "resid_mid"


def test_hub_ids_resolve_to_the_downloaded_folder(tmp_path, monkeypatch):
    """The id -> path resolution, the download itself replaced by a local folder in its place."""
    calls = []

    def download(repo_id, revision, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_transcoder_dir("owner/name/sub@v1", download) == str(tmp_path / "sub")
    assert calls == [("owner/name", "v1", ["sub/*.safetensors", "sub/*.json", "sub/*.yaml"])]
    assert hub.resolve_transcoder_dir("owner/name", download) == str(tmp_path)
    assert not hub.is_hub_id("sub/x") and not hub.is_hub_id("./a/b") and hub.is_hub_id("a/b")
    with pytest.raises(FileNotFoundError, match="no folder 'nope'"):
        hub.resolve_transcoder_dir("owner/name/nope", download)
    with pytest.raises(FileNotFoundError, match="not a directory, nor a hub id"):
        hub.resolve_transcoder_dir("sub/missing", download)


# -----------------------------------------------------------------------------
# files the anchors' own code wrote, and what their loaders computed on them
# (tests/fixtures/make_published.py: circuit-tracer 0.5.0, SAELens 6, eai-sparsify 1.3.3,
# EleutherAI/clt-training at 0a0fea24)

PUBLISHED = os.path.join(os.path.dirname(__file__), "fixtures", "published")
READS_X_HAT = [
    "ct_clt",
    "ct_plt",
    "saelens",
    "saelens_relu",
]  # TransformerLens's ln2.hook_normalized
READS_MLP_IN = ["eai_plt", "clt_plt", "clt_none", "clt_per_layer", "clt_concat"]
READS_RESID_MID = ["gpt2-mntss-transcoder-clt", "gpt2-mntss-transcoder-skip"]  # ln_2's input


@pytest.fixture(scope="module")
def theirs():
    return load_file(os.path.join(PUBLISHED, "reference.safetensors"))


@pytest.mark.parametrize("name", READS_X_HAT)
def test_our_load_equals_the_anchors_on_x_hat_layouts(model3, theirs, name):
    """circuit-tracer's and SAELens's loaders read x̂ (before ln_2's affine map); ours reads
    mlp_in = x̂ · w + b of the model's ln_2 (perturbed, so the unfolding is tested)."""
    model = perturbed_ln_2(copy.deepcopy(model3[1]))
    t = load_transcoder(os.path.join(PUBLISHED, name), model)
    x_hat = theirs[f"{name}.x_hat"]  # (L, N, d)
    w = torch.stack([b.ln_2.weight for b in model.h]).detach()[:, None]  # (L, 1, d)
    b = torch.stack([b.ln_2.bias for b in model.h]).detach()[:, None]
    acts, out = t((x_hat * w + b).transpose(0, 1))  # (N, L, F), (N, L, d)
    assert (theirs[f"{name}.acts"] > 0).float().mean().item() > 0.1  # thresholds let some fire
    torch.testing.assert_close(acts.transpose(0, 1), theirs[f"{name}.acts"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.transpose(0, 1), theirs[f"{name}.out"], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", READS_MLP_IN)
def test_our_load_equals_the_anchors_on_sparsify_layouts(model3, theirs, name):
    t = load_transcoder(os.path.join(PUBLISHED, name), model3[1])
    _, out = t(theirs[f"{name}.mlp_in"].transpose(0, 1))  # (N, L, d)
    torch.testing.assert_close(out.transpose(0, 1), theirs[f"{name}.out"], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", READS_RESID_MID)
def test_our_load_equals_the_anchors_on_pre_ln_layouts(model3, theirs, name):
    """EleutherAI's conversions, which attribute runs on ln_2's input: ours reads resid_mid."""
    t = load_transcoder(os.path.join(PUBLISHED, name), model3[1])
    assert t.config.input_hook == "resid_mid"
    _, out = t(theirs[f"{name}.resid_mid"].transpose(0, 1))  # (N, L, d)
    torch.testing.assert_close(out.transpose(0, 1), theirs[f"{name}.out"], atol=2e-5, rtol=1e-4)


def test_a_pre_ln_transcoder_reads_resid_mid_in_graphs_interventions_and_evaluation(model3):
    """graph.py's nodes, intervene.py's clean activations, train.evaluate's FVU: all from
    resid_mid (each would differ from mlp_in's)."""
    import graph
    import train
    from intervene import Intervention, run_intervened

    _, model = model3
    t = load_transcoder(os.path.join(PUBLISHED, READS_RESID_MID[1]), model)  # a skip transcoder
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    acts = model.run_with_acts(idx)[1]
    a = t.encode(acts.resid_mid[0])  # (T, L, F)
    a[0] = 0  # none at BOS
    rep = graph.local_replacement(model, t, idx[:1])
    l, p, f = rep.feats.T
    assert len(rep.feats) == (a > 0).sum() > 0
    torch.testing.assert_close(rep.acts, a[p, l, f])
    old = run_intervened(model, t, idx[:1], [Intervention(*rep.feats[-1].tolist())]).old
    torch.testing.assert_close(old, rep.acts[-1:])
    y = acts.mlp_out[:, 1:].flatten(0, 1)  # (N, L, d)
    err = t(acts.resid_mid[:, 1:].flatten(0, 1))[1] - y
    fvu = err.pow(2).sum((0, 2)) / (y - y.mean(0)).pow(2).sum((0, 2))  # (L,)
    torch.testing.assert_close(torch.tensor(train.evaluate(model, t, idx)["fvu"]), fvu)
    with pytest.raises(ValueError, match="the model records no resid_mid, which this CLT reads"):
        t.input_of(dataclasses.replace(acts, resid_mid=None))  # a family recording mlp_in only


@pytest.mark.parametrize("name", READS_X_HAT + READS_MLP_IN + READS_RESID_MID)
def test_graph_py_attributes_every_published_layout(model3, tmp_path, capsys, name):
    import graph

    flags = ["--model", model3[0], "--clt", os.path.join(PUBLISHED, name), "--device", "cpu"]
    flags += ["--prompt", "the cat", "--interp", ""]
    graph.main(flags + ["--out", str(tmp_path / "graph")])
    out = capsys.readouterr().out
    assert int(re.search(r"feature nodes: (\d+)", out).group(1)) > 0, out
    exactness = float(re.search(r"exactness: [^=]+= (\S+)", out).group(1))
    assert exactness < 1e-4, out  # the graph's edges sum to each node's input
    assert os.path.exists(tmp_path / "graph" / "graph.json")


def test_the_published_fixtures_stay_small():
    size = sum(e.stat().st_size for r, _, fs in os.walk(PUBLISHED) for e in os.scandir(r))
    assert size < 1_000_000, size


def test_saelens_input_normalization_is_refused(model3, tmp_path):
    folder = tmp_path / "saelens"
    shutil.copytree(os.path.join(PUBLISHED, "saelens"), folder)
    cfg_path = folder / "blocks.1.ln2.hook_normalized" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, normalize_activations="layer_norm")))
    with pytest.raises(ValueError, match=r"normalize_activations \['layer_norm', 'none'\]"):
        load_transcoder(str(folder), model3[1])


def test_check_published_measures_a_local_hub_layout_dir(model3, tmp_path, capsys):
    """experiments/check_published.py offline: a transcoder directory in sparsify's layout, the
    model's hub-layout directory and a local corpus."""
    from experiments import check_published

    clt_dir = write_sparsify(tmp_path / "clt", random_layers("per-layer", skip=True))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and then the dog ran far away " * 40)
    flags = ["--model", model3[0], "--corpus", str(corpus), "--contexts", "4", "--ctx", "16"]
    flags += ["--prompts", "the cat|a dog ran", "--max-features", "40", "--device", "cpu"]
    check_published.main([clt_dir, *flags, "--out", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "check_published.json").read_text())["results"]
    figures = {r["figure"]: r["ours"] for r in rows}
    assert set(figures) == {
        "fvu",
        "l0",
        "recovered",
        *(f"{s} {i}" for s in ("replacement", "completeness") for i in (0, 1)),
    }
    assert 0 < figures["l0"] <= L * K and figures["fvu"] > 0
    assert all(0 <= figures[f"completeness {i}"] <= 1 for i in (0, 1))
    assert "| completeness 1 |" in capsys.readouterr().out

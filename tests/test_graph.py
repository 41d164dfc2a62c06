"""Attribution graphs: the replacement model is exact, every edge is a measured direct effect, the
graph sums to its targets' inputs, pruning and scores behave, files open, interventions do what
they say, and bad input fails clearly. Small random GPT + random CLT (b_enc raised so features fire)."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import graph as G
from intervene import Intervention, intervene, run_intervened
from intervene import main as intervene_main
from clt import CLTConfig, CrossLayerTranscoder
from forge.cli import parse_config
from forge.graphcli import GraphConfig
from model import GPT, GPTConfig, Llama, LlamaConfig

L, D, F_, V, T = 3, 32, 64, 300, 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=L, n_head=2, n_embd=D, n_ctx=32, vocab_size=V)).eval().to(dtype)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F_), seed=seed).eval()
    with torch.no_grad():
        # a random CLT fires on a fifth of its features here: a few hundred nodes
        clt.b_enc.fill_(-0.2)
        # unfolded normalization must be handled
        clt.input_scale.copy_(torch.tensor([1.0, 0.5, 2.0]))
        clt.output_scale.copy_(torch.tensor([2.0, 1.0, 0.5]))
    idx = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(seed))
    return model, clt.to(dtype), idx


@functools.lru_cache
def build(dtype=torch.float32):
    """(model, clt, replacement, graph), built once per dtype for the whole file."""
    model, clt, idx = make(dtype)
    rep = G.local_replacement(model, clt, idx)
    return model, clt, rep, G.attribute(model, clt, rep, "random", batch_size=64)


@pytest.fixture
def built():
    return build()


def test_replacement_reproduces_logits(built):
    model, clt, rep, _ = built
    logits, acts = model.run_with_acts(rep.idx)
    frozen = model(
        rep.idx,
        frozen=rep.frozen,
        resid=(rep.token + rep.position)[None],
        mlp_out=rep.mlp_out[None],
    )
    assert (frozen - logits).abs().max() <= 1e-5
    assert len(rep.feats) > 50 and (rep.feats[:, 1] > 0).all()  # features fire, none at BOS
    assert not rep.error[0].any()  # nor errors: the MLP outputs at BOS are bias
    torch.testing.assert_close((rep.recon + rep.error)[1:], rep.mlp_out[1:], atol=1e-6, rtol=0)
    pre, _ = G.target_inputs(model, clt, rep, rep.feats, model.wte.weight[:1])
    l, p, f = rep.feats.T
    torch.testing.assert_close(pre, clt.pre_acts(acts.mlp_in[0])[p, l, f], atol=1e-5, rtol=0)
    a = torch.zeros(T, L, F_)
    a[p, l, f] = rep.acts
    # the library's own decode
    torch.testing.assert_close(rep.recon, clt.decode(a), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edges_sum_to_inputs(dtype):
    model, clt, rep, graph = build(dtype)
    err, scale = G.exactness(model, clt, rep, graph)
    assert scale > 1 and err <= (1e-4 if dtype == torch.float32 else 1e-10)
    fs, es, ts, _, ls = graph.slices()
    assert not graph.adjacency[es.start : ls.start].any()  # errors and embeddings have no inputs
    assert not graph.adjacency[:, es].view(-1, L, T)[:, :, 0].any()  # error nodes at BOS are zero
    layer = graph.feats[:, 0]
    # a feature reads nothing from its own layer or above
    same_or_later = layer[:, None] <= layer[None, :]
    assert not graph.adjacency[fs, fs][same_or_later].any()


def perturbed(model, clt, rep, graph, eps, feature=None, error=None, embed=None, position=None):
    """Every target's change when one source is scaled by (1 + eps) in the frozen replacement model,
    measured with forward passes only (and the CLT's own decode)."""
    resid = rep.token + rep.position
    mlp_out = rep.mlp_out.clone()
    if feature is not None:  # its decoder writes to every layer from its own up
        (l, p, f), a = rep.feats[feature].tolist(), rep.acts[feature]
        mlp_out[p, l:] += eps * a * clt.W_dec[l][f].detach() / clt.output_scale[l:, None]
    if error is not None:
        l, p = divmod(error, T)
        mlp_out[p, l] += eps * rep.error[p, l]
    if embed is not None:  # the token embedding only: the position embedding is bias
        resid[embed] += eps * rep.token[embed]
    if position is not None:
        resid[position] += eps * rep.position[position]
    before = torch.cat(G.target_inputs(model, clt, rep, graph.feats, graph.target_vectors))
    after = torch.cat(
        G.target_inputs(model, clt, rep, graph.feats, graph.target_vectors, resid, mlp_out)
    )
    return after - before


@pytest.mark.parametrize("dtype,eps,tol", [(torch.float64, 1e-3, 1e-6), (torch.float32, 0.2, 1e-3)])
def test_edges_match_perturbations(dtype, eps, tol):
    model, clt, rep, graph = build(dtype)
    A, (fs, es, ts, _, ls) = graph.adjacency, graph.slices()
    targets = torch.cat([A[fs], A[ls]])  # rows of every target: features, then logits
    layer = graph.feats[:, 0]
    # feature -> feature, across a whole layer
    cross = A[fs, fs] * (layer[:, None] >= layer[None, :] + 2)
    s_feat = cross.abs().max(0).values.argmax().item()
    s_emb = A[ls, ts].abs().max(0).values.argmax().item()
    s_err = A[fs, es].abs().max(0).values.argmax().item()
    assert cross[:, s_feat].abs().max() > 1e-3 and A[ls, ts][:, s_emb].abs().max() > 1e-3
    for kw, col in (
        (dict(feature=s_feat), s_feat),
        (dict(embed=s_emb), ts.start + s_emb),
        (dict(error=s_err), es.start + s_err),
    ):
        delta = perturbed(model, clt, rep, graph, eps, **kw)
        expected = eps * targets[:, col]
        rel = (delta - expected).abs().max() / expected.abs().max()
        assert rel <= tol, (kw, rel.item())


def test_position_nodes():
    """--position-nodes moves the position embeddings out of the biases into nodes of their own: the
    other edges stay as they are, the new ones are measured direct effects, and the sums stay exact."""
    model, clt, rep, graph = build()
    with_pos = G.attribute(model, clt, rep, batch_size=64, position_nodes=True)
    s = with_pos.slices()
    assert s.positions.stop - s.positions.start == T and s.logits.stop == len(with_pos.adjacency)
    others = torch.cat(
        [torch.arange(s.positions.start), torch.arange(s.logits.start, s.logits.stop)]
    )
    torch.testing.assert_close(
        with_pos.adjacency[others][:, others], graph.adjacency, atol=0, rtol=0
    )
    err, scale = G.exactness(model, clt, rep, with_pos)
    assert err <= 1e-4 * scale
    A = with_pos.adjacency
    targets = torch.cat([A[s.features], A[s.logits]])
    p = A[s.logits, s.positions].abs().max(0).values.argmax().item()
    delta = perturbed(model, clt, rep, with_pos, 0.2, position=p)
    expected = 0.2 * targets[:, s.positions.start + p]
    assert (delta - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert G.scores(with_pos) != G.scores(graph)  # the positions count as inputs beside the tokens


def test_influence_in_blocks_is_the_matrix_inverse(monkeypatch):
    """influence applies Â a block of rows at a time (a capped graph's rows are its largest tensor):
    with blocks of 3 rows it still equals w ((I - Â)^-1 - I) of a random acyclic graph, on all rows
    or on some rows given with their nodes."""
    monkeypatch.setattr(G, "BLOCK_ELEMENTS", 3 * 12)  # 3 rows of 12
    g = torch.Generator().manual_seed(0)
    # edges from earlier nodes only
    A = torch.randn(12, 12, generator=g, dtype=torch.float64).tril(-1)
    w = torch.rand(12, generator=g, dtype=torch.float64)
    A_hat = G.normalized(A)
    exact = w @ (
        torch.linalg.inv(torch.eye(12, dtype=torch.float64) - A_hat)
        - torch.eye(12, dtype=torch.float64)
    )
    torch.testing.assert_close(G.influence(A, w), exact)
    torch.testing.assert_close(G.influence(A_hat, w, normalize=False), exact)
    # the nodes whose rows are given: as if the others had none
    some = torch.tensor([1, 4, 5, 9, 11])
    has_row = torch.isin(torch.arange(12), some)[:, None]
    torch.testing.assert_close(G.influence(A[some], w, some), G.influence(A * has_row, w))


def test_prune_and_scores(built):
    *_, graph = built
    node_mask, edge_mask, cumulative, infl = G.prune(graph, 0.8, 0.98)
    fs, es, ts, _, ls = graph.slices()
    assert node_mask[ls].all() and node_mask[ts].all()
    assert 0 < node_mask[fs].sum() < len(graph.feats)  # pruning kept some features, not all
    assert not edge_mask[~node_mask].any() and not edge_mask[:, ~node_mask].any()
    kept = node_mask[: ts.start]
    assert (edge_mask.sum(0)[: ts.start][kept] > 0).all()  # kept features/errors have out-edges
    assert ((cumulative >= 0) & (cumulative <= 1 + 1e-6)).all()
    replacement, completeness = G.scores(graph)
    assert 0 <= replacement < 1 and 0 <= completeness < 1  # random CLT: errors carry influence
    with pytest.raises(ValueError, match="thresholds"):
        G.prune(graph, 1.5, 0.98)


def test_zero_error_gives_score_one():
    model, clt, idx = make()
    rep = G.local_replacement(model, clt, idx)
    # a model whose MLPs are exactly the CLT
    rep.mlp_out = rep.recon
    rep.error = torch.zeros_like(rep.error)
    graph = G.attribute(model, clt, rep, batch_size=64)
    replacement, completeness = G.scores(graph)
    assert replacement == pytest.approx(1, abs=1e-6) and completeness == pytest.approx(1, abs=1e-6)
    assert G.exactness(model, clt, rep, graph)[0] <= 1e-4


def test_max_features_keeps_the_most_influential(built):
    model, clt, rep, full = built
    capped = G.attribute(model, clt, rep, max_features=20, batch_size=5)
    assert len(capped.feats) == 20 and capped.n_active == len(rep.feats)
    # capped features in the full graph
    keep = (capped.feats[:, None] == full.feats[None]).all(-1).nonzero()[:, 1]
    n = len(full.feats)
    nodes = torch.cat([keep, torch.arange(n, len(full.adjacency))])
    # same rows, same edges
    torch.testing.assert_close(capped.adjacency, full.adjacency[nodes][:, nodes])
    infl = G.influence(full.adjacency, full.logit_weights())[:n]
    top = infl.argsort(descending=True)[:5]
    assert set(top.tolist()) <= set(keep.tolist())  # the strongest features survive the cap


def test_bad_input(hub_model):
    _, _, enc = hub_model  # 256 bytes, <|endoftext|> = 256
    assert G.encode_prompt(enc, "hi", 32).tolist() == [[256, *enc.encode("hi")]]  # BOS first
    with pytest.raises(ValueError, match="empty"):
        G.encode_prompt(enc, "  ", 32)
    with pytest.raises(ValueError, match="n_ctx=32"):
        G.encode_prompt(enc, "x" * 40, 32)
    model, _, idx = make()
    for n_layer, n_embd in ((2, D), (L, 16)):
        other = CrossLayerTranscoder(CLTConfig(n_layers=n_layer, d_model=n_embd, n_features=8))
        with pytest.raises(ValueError, match="another model"):
            G.local_replacement(model, other, idx)


def write_model_and_clt(path, make_hub_model, seed=0):
    """A random GPT-2 in the hub layout (conftest) and a random CLT of it that fires -> (model dir, CLT dir)."""
    model, _ = make_hub_model(path / "model", seed=seed, n_layer=L, n_embd=D)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F_), seed=seed)
    with torch.no_grad():
        clt.b_enc.fill_(0.0)  # dense enough that pruning keeps some features on a short prompt
    clt.save_pretrained(path / "clt")
    return str(path / "model"), str(path / "clt")


def graph_args(model_dir, clt_dir, tmp_path, prompt="Tarn is in"):
    """graph.py's flags for a CPU run on `prompt` with no interp run."""
    flags = ["--model", model_dir, "--clt", clt_dir, "--prompt", prompt, "--device", "cpu"]
    return flags + ["--interp", ""]


def test_command_line_writes_front_end_files(tmp_path, capsys, make_hub_model):
    model_dir, clt_dir = write_model_and_clt(tmp_path, make_hub_model)
    (tmp_path / "interp").mkdir()
    (tmp_path / "interp" / "features.jsonl").write_text(
        "\n".join(
            json.dumps(dict(layer=l, feature=f, explanation=f"L{l}F{f}"))
            for l in range(L)
            for f in range(F_)
        )
    )
    args = ["--model", model_dir, "--clt", clt_dir, "--prompt", "Tarn is in", "--device", "cpu"]
    G.main(args + ["--interp", str(tmp_path / "interp"), "--out", str(tmp_path / "graph")])
    assert "exactness" in capsys.readouterr().out
    data = json.loads((tmp_path / "graph" / "graph.json").read_text())
    assert data["metadata"]["prompt_tokens"][1:] == list("Tarn␣is␣in".replace("␣", " "))
    assert data["metadata"]["pruning_settings"] == dict(node_threshold=0.8, edge_threshold=0.98)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)) and {l["source"] for l in data["links"]} | {
        l["target"] for l in data["links"]
    } <= set(ids)
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert kinds >= {"cross layer transcoder", "embedding", "logit"}
    for n in data["nodes"]:
        assert {
            "node_id",
            "feature",
            "layer",
            "ctx_idx",
            "feature_type",
            "activation",
            "influence",
            "clerp",
        } <= set(n)
        if n["feature_type"] == "cross layer transcoder":
            l, f, p = map(int, n["node_id"].split("_"))
            assert n["clerp"] == f"L{l}F{f}" and n["layer"] == str(l) and n["ctx_idx"] == p
    assert {n["layer"] for n in data["nodes"] if n["feature_type"] == "logit"} == {str(L + 1)}
    metadata = json.loads((tmp_path / "graph" / "graph-metadata.json").read_text())
    assert metadata["graphs"][0]["slug"] == "graph"
    full = load_file(tmp_path / "graph" / "adjacency.safetensors")
    table = json.loads((tmp_path / "graph" / "nodes.json").read_text())["nodes"]
    assert full["adjacency"].shape == (len(table), len(table)) and sum(
        n["kept"] for n in table
    ) == len(ids)
    l, f, p = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")[
        "node_id"
    ].split("_")
    intervene_main(["intervene"] + args + ["--intervene", f"{l}/{p}/{f}:ablate"])
    assert "p before" in capsys.readouterr().out
    with pytest.raises(ValueError, match="LAYER/POS/FEATURE"):
        intervene_main(["intervene"] + args + ["--intervene", "1-2-3"])
    with pytest.raises(FileNotFoundError, match="python train.py"):
        G.main(args[:2] + ["--clt", str(tmp_path / "nothing")])


def test_torchrun_gives_the_one_process_graph(tmp_path, make_hub_model):
    """Two gloo ranks, each computing a share of every round's rows, write the graph one process writes:
    uncapped (one round) and with --max-features (rounds of update_interval x batch_size). One torchrun
    runs both: this file is its worker (see the end)."""
    model_dir, clt_dir = write_model_and_clt(tmp_path, make_hub_model, seed=1)
    args = graph_args(model_dir, clt_dir, tmp_path, "Tarn is in the north")
    args += ["--batch-size", "16", "--update-interval", "2", "--qk", "auto:3"]  # QK rows shared too
    tasks = [
        args + ["--max-features", cap, "--out", str(tmp_path / f"two{cap}")]
        for cap in ("-1", "100")
    ]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        str(tmp_path / "tasks.json"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("on 2 process(es)") == 2
    for cap in ("-1", "100"):
        G.main(args + ["--max-features", cap, "--out", str(tmp_path / f"one{cap}")])
        a, b = (load_file(tmp_path / f"{w}{cap}" / "adjacency.safetensors") for w in ("one", "two"))
        assert torch.equal(a["features"], b["features"])
        assert torch.equal(a["logit_tokens"], b["logit_tokens"])
        torch.testing.assert_close(b["adjacency"], a["adjacency"], atol=1e-6, rtol=0)
        one, two = (
            json.loads((tmp_path / f"{w}{cap}" / "graph.json").read_text()) for w in ("one", "two")
        )
        assert len(one["qk"]) == 3
        for x, y in zip(one["qk"], two["qk"]):
            step = ("layer", "head", "query_pos", "key_pos")
            assert [x[k] for k in step] == [y[k] for k in step]
            assert [(p["query"], p["key"]) for p in x["pairs"]] == [
                (p["query"], p["key"]) for p in y["pairs"]
            ]
            assert (x["score"], x["rest"]) == pytest.approx((y["score"], y["rest"]), abs=1e-5)
    info = json.loads((tmp_path / "one100" / "graph.json").read_text())["metadata"]["info"]
    assert len(a["features"]) == 100 < info["n_active_features"]


def test_intervention_scales_the_decoder_writes(built):
    model, clt, rep, _ = built
    idx = rep.idx
    last = ((rep.feats[:, 0] == L - 1) & (rep.feats[:, 1] == T - 1)).nonzero()[
        :2, 0
    ]  # they write only to the last MLP
    feats, a = rep.feats[last], rep.acts[last]
    clean, same = intervene(model, clt, idx, [Intervention(*feats[0].tolist(), "scale", 1.0)])
    torch.testing.assert_close(same, clean, atol=0, rtol=0)
    for scale in (0.0, -1.0):  # ablate both, flip both
        out = run_intervened(
            model, clt, idx, [Intervention(*x, "scale", scale) for x in feats.tolist()]
        )
        torch.testing.assert_close(out.old, a)
        one = torch.zeros(T, L, F_)
        one[feats[:, 1], feats[:, 0], feats[:, 2]] = (scale - 1) * a
        # the features' writes rescaled
        mlp_out = rep.mlp_out + clt.decode(one) - clt.decode(torch.zeros_like(one))
        torch.testing.assert_close(
            out.logits[-1], model(idx, mlp_out=mlp_out[None])[0, -1], atol=1e-5, rtol=0
        )
        assert (out.logits - out.clean_logits).abs().max() > 1e-4
    l, p, f = feats[0].tolist()
    with pytest.raises(ValueError, match="changed twice"):
        intervene(model, clt, idx, [Intervention(l, p, f), Intervention(l, p - T, f, "add", 1.0)])


# -----------------------------------------------------------------------------
# circuit-tracer's graphs of the same model, CLT and prompt (tests/fixtures/make_graph_reference.py)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def circuit_tracer_reference(name="graph_reference", key="clt"):
    """(model, transcoder, idx, reference tensors, reference JSON) of a committed circuit-tracer fixture."""
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        meta = json.load(f)
    ref = load_file(os.path.join(FIXTURES, f"{name}.safetensors"))
    llama = "model_type" in meta["gpt"]  # a LlamaConfig (graph_reference_llama)
    model = Llama(LlamaConfig(**meta["gpt"])) if llama else GPT(GPTConfig(**meta["gpt"]))
    model.load_state_dict({k[6:]: v for k, v in ref.items() if k.startswith("model.")})
    clt = CrossLayerTranscoder(CLTConfig(**meta[key]))
    clt.load_state_dict({k[len(key) + 1 :]: v for k, v in ref.items() if k.startswith(f"{key}.")})
    return model.eval(), clt.eval(), ref["tokens"][None], ref, meta


def assert_rows_match(graph, rows, tol=1e-4):
    """Every edge type, target by target: |ours - circuit-tracer's| <= tol x the row's largest |edge|."""
    A = graph.adjacency
    s = graph.slices()
    ours = torch.cat([A[s.features], A[s.logits]])  # the targets' rows
    n = len(graph.feats)
    for name, (r, c) in {
        "feature": (slice(0, n), slice(None)),
        "logit": (slice(n, None), slice(None)),
    }.items():
        scale = rows[r, c].abs().amax(1, keepdim=True)
        assert ((ours[r, c] - rows[r, c]).abs() <= tol * scale).all(), name
    for r, c in [
        (s.features, s.features),
        (s.features, s.errors),
        (s.features, s.tokens),
        (s.logits, s.features),
        (s.logits, s.errors),
        (s.logits, s.tokens),
    ]:
        assert A[r, c].abs().max() > 1e-3  # every edge type is there to compare


def test_matches_circuit_tracer():
    assert_matches_circuit_tracer("graph_reference", "clt")


def assert_matches_circuit_tracer(name, key):
    """Our full and capped graphs of fixture `name` are circuit-tracer's: nodes, edges, scores, pruning."""
    model, clt, idx, ref, meta = circuit_tracer_reference(name, key)
    rep = G.local_replacement(model, clt, idx)
    # a batch size that splits (layer, position) blocks
    graph = G.attribute(model, clt, rep, batch_size=7)
    assert torch.equal(graph.feats, ref["features"]) and torch.equal(
        graph.logit_ids, ref["logit_tokens"]
    )
    torch.testing.assert_close(graph.acts, ref["activations"])
    assert_rows_match(graph, ref["rows"])
    assert G.scores(graph) == pytest.approx(meta["scores"], abs=1e-4)
    # and the pruned graph is theirs
    node_mask, edge_mask, cumulative, _ = G.prune(graph, 0.8, 0.98)
    assert torch.equal(node_mask, ref["node_mask"]) and torch.equal(edge_mask, ref["edge_mask"])
    torch.testing.assert_close(cumulative, ref["cumulative"], atol=1e-5, rtol=0)
    c = meta["capped"]  # circuit-tracer's rounds: the same features, in the same order of choosing
    capped = G.attribute(
        model,
        clt,
        rep,
        max_features=c["max_features"],
        batch_size=c["batch_size"],
        update_interval=c["update_interval"],
    )
    assert torch.equal(capped.feats, ref["features"][ref["capped_features"]])
    assert_rows_match(capped, ref["capped_rows"])
    assert G.scores(capped) == pytest.approx(meta["capped_scores"], abs=1e-4)


if __name__ == "__main__":  # the torchrun worker: graph.py's graph command on each task's flags
    for task in json.loads(open(sys.argv[1]).read()):
        G.run_graph(parse_config(G.__doc__, GraphConfig, task))
    torch.distributed.destroy_process_group()

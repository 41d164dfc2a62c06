"""Every stage on the Llama family: a random Llama 3 (rope scaling, GQA) and Qwen3 (q/k norms, its
own head_dim) in the hub layout through cache.py, train.py (two TP ranks for Llama), interp.py,
graph.py (--qk too), intervene.py and viz.py; and the attribution graph's exactness on them
(RMSNorm's transpose does not center, GQA's value heads are shared, no position embedding), and
its QK terms' (RoPE, GQA's key heads, Qwen3's q/k norms frozen)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cache
import graph as G
import interp
import train
import viz
from clt import CLTConfig, CrossLayerTranscoder
from conftest import docs, write_llama_model
from forge.hub import ENDOFTEXT
from intervene import main as intervene_main
from test_graph import T, assert_matches_circuit_tracer, perturbed
from test_qk import assert_exact, assert_pairs_predict_perturbations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def llama_replacement(tmp_path, model_type, dtype=torch.float64):
    """A random model of the family, a random CLT that fires, the local replacement of a prompt."""
    model, enc = write_llama_model(tmp_path, model_type, tied=model_type == "llama", n_layer=3)
    model = model.to(dtype)
    c = model.config
    clt = CrossLayerTranscoder(CLTConfig(n_layers=c.n_layer, d_model=c.n_embd, n_features=64))
    with torch.no_grad():
        clt.b_enc.fill_(-0.1)
    clt = clt.to(dtype).eval()
    ids = [enc.eot_token] + enc.encode(docs(1, seed=3)[0] + " the cat sat on a mat then")
    idx = torch.tensor([ids[:T]])  # test_graph's perturbed counts error nodes in prompts of T
    return model, clt, G.local_replacement(model, clt, idx)


def llama_graph(tmp_path, model_type, dtype=torch.float64):
    """llama_replacement's model, CLT and replacement, and the graph of its prompt."""
    model, clt, rep = llama_replacement(tmp_path, model_type, dtype)
    return model, clt, rep, G.attribute(model, clt, rep, "p", batch_size=32, position_nodes=True)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_graph_edges_sum_to_inputs_and_match_perturbations(tmp_path, model_type):
    model, clt, rep, graph = llama_graph(tmp_path, model_type)
    err, scale = G.exactness(model, clt, rep, graph)
    assert len(rep.feats) > 20 and scale > 0.1 and err <= 1e-10
    assert not rep.position.any()  # no position embedding: its nodes are zero
    A, (fs, es, ts, _, ls) = graph.adjacency, graph.slices()
    targets = torch.cat([A[fs], A[ls]])
    s_feat = A[fs, fs].abs().max(0).values.argmax().item()  # the feature with the largest edge
    s_emb = A[ls, ts].abs().max(0).values.argmax().item()
    s_err = A[fs, es].abs().max(0).values.argmax().item()
    for kw, col in (
        (dict(feature=s_feat), s_feat),
        (dict(embed=s_emb), ts.start + s_emb),
        (dict(error=s_err), es.start + s_err),
    ):
        eps = 1e-3
        delta = perturbed(model, clt, rep, graph, eps, **kw)
        expected = eps * targets[:, col]
        assert expected.abs().max() > 1e-8
        assert (delta - expected).abs().max() / expected.abs().max() <= 1e-6, kw


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_qk_terms_add_up_and_predict_perturbations(tmp_path, model_type):
    """QK attributions on the family: RoPE a fixed map at each position, a query head's key head
    shared (GQA 4/2: heads 2, 3 read key head 1), Qwen3's q/k norms frozen (Frozen.qk_norm) as
    RMSNorm's scales are: the terms add up to the model's score and contrast (fp32 and fp64), and
    each feature's pairs predict its perturbation in the frozen replacement model, to 2nd order."""
    # layer 0's only pair is token x token (no position embedding, no bias): from layer 1 on
    steps = [(1, 3, T - 1, 2), (2, 1, 6, 6), (1, 2, T - 2, 0), (2, 2, T - 1, 4), (1, 0, 5, 1)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model, clt, rep = llama_replacement(tmp_path / str(dtype), model_type, dtype)
        assert_exact(model, clt, rep, steps, tol)
    for l in range(model.config.n_layer):  # the measured q, k are the forward's: its pattern
        q, k = G.heads_qk(model, [l], model, rep.idx)[l]  # (nh, T, hs) each
        s = (q @ k.transpose(1, 2) / q.size(-1) ** 0.5).tril() - torch.ones(T, T).triu(1) * 1e9
        torch.testing.assert_close(s.softmax(-1), rep.frozen.attn[l][0], rtol=0, atol=1e-12)
    assert_pairs_predict_perturbations(model, clt, rep, steps)


@pytest.mark.parametrize("name, key", [("llama", "clt"), ("qwen3", "plt")])
def test_matches_circuit_tracer(name, key):
    """circuit-tracer 0.5.0's graphs of a Llama with a CLT and a Qwen3 with a PLT and skip
    connection (tests/fixtures/make_llama_graph_reference.py): nodes, edges, scores, pruning."""
    assert_matches_circuit_tracer(f"graph_reference_{name}", key)


def run_torchrun(script, args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", os.path.join(REPO, script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_every_stage_runs_on_a_hub_layout_model(tmp_path, capsys, model_type):
    model_dir, runs = str(tmp_path / "model"), tmp_path / "runs"
    model, enc = write_llama_model(tmp_path / "model", model_type, tied=model_type == "qwen3")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(ENDOFTEXT.join(docs(200)))
    flags = ["--model", model_dir, "--corpus", str(corpus), "--tokens", "3000", "--ctx", "16"]
    flags += ["--shard-tokens", "1024", "--batch-size", "8", "--device", "cpu"]
    cache.main(["build", *flags, "--out", str(runs / "cache")])
    manifest = json.loads((runs / "cache" / "manifest.json").read_text())
    assert manifest["complete"]
    # train.py: two tensor-parallel ranks (Llama), one process (Qwen3)
    args = ["--cache", str(runs / "cache"), "--out", str(runs / "clt"), "--features", "64"]
    args += ["--steps", "12", "--batch-size", "64", "--warmup", "2", "--eval-every", "6"]
    args += ["--eval-contexts", "4", "--device", "cpu"]
    if model_type == "llama":
        run_torchrun("train.py", args + ["--tp", "2"])
    else:
        train.main(args)
    metrics = [
        json.loads(line) for line in (runs / "clt" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("eval" in json.dumps(m) for m in metrics)
    interp.main(
        ["--clt", str(runs / "clt"), "--cache", str(runs / "cache")]
        + ["--out", str(runs / "interp"), "--min-support", "1"]
    )
    assert (runs / "interp" / "features.jsonl").exists()
    prompt = ["--model", model_dir, "--clt", str(runs / "clt"), "--prompt", "the cat sat on"]
    prompt += ["--device", "cpu"]
    G.main(
        prompt + ["--interp", str(runs / "interp"), "--out", str(runs / "graph"), "--qk", "auto:3"]
    )
    out = capsys.readouterr().out
    error = float(out.split("- input| = ")[1].split()[0])
    assert error < 1e-3, out[-2000:]
    data = json.loads((runs / "graph" / "graph.json").read_text())
    assert len(data["qk"]) == 3 and "qk: 3 entries explained" in out  # why heads attend there
    for q in data["qk"]:
        total = sum(p["value"] for p in q["pairs"]) + q["rest"]
        assert total == pytest.approx(q["score"], rel=1e-4, abs=1e-5)
    assert data["metadata"]["prompt_tokens"][0] == enc.decode([enc.eot_token])
    viz.main(["features", str(runs / "interp")])
    viz.main(["graph", str(runs / "graph" / "graph.json")])
    assert (runs / "graph" / "graph.html").exists()
    l, p, f = load_file(runs / "graph" / "adjacency.safetensors")["features"][0].tolist()
    intervene_main(["intervene"] + prompt + ["--intervene", f"{l}/{p}/{f}:ablate"])
    assert "p before" in capsys.readouterr().out
    intervene_main(["generate"] + prompt + ["--intervene", f"{l}/{p}/{f}=0"])
    assert "intervened:" in capsys.readouterr().out

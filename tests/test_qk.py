"""QK attributions (graph.explain_heads): a head's score s_ij and contrast c_ij are sums of (query
node, key node) terms that add up to the model's own values, each pair moves the score as predicted
when its feature is scaled in the frozen replacement model, --qk picks and names entries, and bad
specs fail in one line. A random GPT-2 with a random CLT (test_graph.make) and models/tiny with the
trained CLT of tests/golden/run."""

import functools
import json
import os
import re
import shutil

import pytest
import torch

import graph as G
import viz
from clt import load_transcoder
from forge.graphcli import parse_qk
from forge.hub import DEFAULT_MODEL, load_tokenizer
from model import GPT, GPTConfig
from conftest import chromium
from test_graph import L, graph_args, make, write_model_and_clt
from test_graph_plt import make as make_plt

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
GOLDEN_CLT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "run")
SHAPE = GPTConfig(n_layer=3, n_head=2, n_embd=32)  # for --qk's specs
STEPS = [(1, 0, 9, 3), (2, 1, 5, 5), (0, 1, 7, 0), (2, 0, 9, 2)]  # layer 0, j = i, BOS as key


@functools.lru_cache
def random_setup(dtype=torch.float32):
    model, clt, idx = make(dtype)
    return model, clt, G.local_replacement(model, clt, idx)


@functools.lru_cache
def tiny_setup():
    """models/tiny, the golden trained CLT, a toy-world IOI prompt; steps: its last query's heads
    at the first name (the answer), at BOS and at the query itself."""
    model = GPT.from_pretrained().eval()
    clt = load_transcoder(GOLDEN_CLT, model).eval()
    enc = load_tokenizer(DEFAULT_MODEL)
    prompt = "When Tam and Sela went to the park, Tam gave a flute to"
    rep = G.local_replacement(model, clt, G.encode_prompt(enc, prompt, model.config.n_ctx))
    T = rep.idx.size(1)
    steps = [(l, h, T - 1, j) for l in (1, 3) for h in (0, 3) for j in (0, 2, T - 1)]
    return model, clt, rep, steps


def assert_exact(model, clt, rep, steps, tol):
    """Every decomposition's terms add up to the model's value within tol x (|value| + sum |terms|);
    explain_heads' pairs are the largest |terms| (found in blocks and by bounds), with the rest."""
    terms = G.qk_terms(model, clt, rep, steps, batch_size=64)
    records = G.explain_heads(model, clt, rep, steps, n_pairs=5, batch_size=64)
    for step, (Q, K, M, measured), r in zip(steps, terms, records):
        assert r["pattern"] == measured["pattern"] and 0 < r["pattern"] <= 1, step
        for name, keys in (("score", K), ("contrast", K - M)):
            P = Q.T @ keys  # (S + 1, S + 1) every (query source, key source) term, the bias last
            value = measured[name]
            total = P.sum().item()
            assert abs(total - value) <= tol * (abs(value) + P.abs().sum().item()), (step, name)
            assert P.abs().sum() > 100 * abs(total - value)  # and there is something to add up
            prefix = "" if name == "score" else "contrast_"
            pairs = r[prefix + "pairs"]
            expected = P.abs().flatten().topk(5).values
            torch.testing.assert_close(torch.tensor([abs(v) for *_, v in pairs]).to(P), expected)
            assert [P[s, t].item() for s, t, _ in pairs] == pytest.approx([v for *_, v in pairs])
            assert sum(v for *_, v in pairs) + r[prefix + "rest"] == pytest.approx(total, abs=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_terms_add_up_to_the_models_score_and_contrast(dtype, tol):
    model, clt, rep = random_setup(dtype)
    assert_exact(model, clt, rep, STEPS, tol)


def test_terms_add_up_on_the_tiny_model_with_a_trained_clt(monkeypatch):
    model, clt, rep, steps = tiny_setup()
    assert len(rep.feats) > 20
    monkeypatch.setattr(G, "BLOCK_ELEMENTS", 1000)  # graphfile.top_pairs in many blocks of rows
    assert_exact(model, clt, rep, steps, 1e-5)


def scaled_scores(model, clt, rep, step, feature, eps):
    """(s_ij, c_ij) of step with feature node `feature` scaled by (1 + eps) in the frozen
    replacement model, every other node held (its decoder writes: the library's own decode)."""
    l, h, i, j = step
    one = slice(feature, feature + 1)
    writes = G.reconstruct(clt, rep.feats[one], rep.acts[one], len(rep.token), bias=False)
    mlp_out = rep.mlp_out - rep.skip + eps * writes  # (T, L, d)
    run = (model, clt, rep, rep.feats[:0], rep.token[:0], None, mlp_out)
    q, k = G.heads_qk(model, [l], G.target_inputs, *run)[l]
    s = k[h] @ q[h, i] / q.size(-1) ** 0.5  # (T,)
    return s[j], s[j] - rep.frozen.attn[l][0, h, i] @ s


def assert_pairs_predict_perturbations(model, clt, rep, steps, eps=0.5, tol=1e-8):
    """Scaling feature s by 1 + eps moves the score by eps (row s + column s of the pairs) +
    eps² (pair (s, s)): first order from the odd part of ±eps, second from the even part."""
    n = len(rep.feats)
    with torch.no_grad():
        terms = G.qk_terms(model, clt, rep, steps, batch_size=64)
    for step, (Q, K, M, _) in zip(steps, terms):
        for which, keys in enumerate((K, K - M)):
            P = Q.T @ keys  # (S + 1, S + 1) every pair's term, the bias last
            firsts = P.sum(0) + P.sum(1)
            # a feature on both sides where there is one (a layer-1 head's reach q_i or k_j alone)
            s = (P.diagonal()[:n].abs() * 1e3 + firsts[:n].abs()).argmax().item()
            first = firsts[s]
            assert first.abs() > 1e-6, step
            base, up, down = (
                scaled_scores(model, clt, rep, step, s, x)[which] for x in (0, eps, -eps)
            )
            scale = first.abs() * eps + P[s, s].abs() * eps**2
            assert abs((up - down) / 2 - eps * first) <= tol * scale, (step, which)
            assert abs((up + down) / 2 - base - eps**2 * P[s, s]) <= tol * scale, (step, which)


def test_pairs_predict_feature_perturbations():
    model, clt, rep = random_setup(torch.float64)
    assert_pairs_predict_perturbations(model, clt, rep, [s for s in STEPS if s[0] > 0])


def test_pairs_predict_feature_perturbations_on_the_tiny_model():
    model, clt, rep, steps = tiny_setup()
    rep64 = G.local_replacement(model.double(), clt.double(), rep.idx)
    try:
        assert_pairs_predict_perturbations(model, clt, rep64, [s for s in steps if s[0] > 0])
    finally:
        model.float()
        clt.float()


def test_auto_ranks_entries_by_pattern_times_gradient():
    """qk_auto's A_ij dT/dA_ij: T is affine in one pattern entry (MLP outputs fixed, LN frozen), so
    a finite difference gives it exactly; the chosen entries are the largest, in order."""
    model, clt, rep = random_setup(torch.float64)
    graph = G.attribute(model, clt, rep, batch_size=64)
    w = graph.logit_weights()
    infl = G.influence(graph.adjacency, w)
    steps = G.qk_auto(model, clt, rep, graph, infl, 5)
    c = infl + w
    s = graph.slices()

    def objective(attn):
        moved = G.replace(rep, frozen=G.replace(rep.frozen, attn=attn))
        pre, out = G.target_inputs(model, clt, moved, graph.feats, graph.target_vectors)
        return pre @ c[s.features] + out @ c[s.logits]

    def attribution(step):
        l, h, i, j = step
        attn = [a.clone() for a in rep.frozen.attn]
        attn[l][0, h, i, j] += 1.0  # T is affine in it: the difference is dT/dA_ij
        gradient = objective(attn) - objective(rep.frozen.attn)
        return abs(rep.frozen.attn[l][0, h, i, j] * gradient).item()

    chosen = [attribution(step) for step in steps]
    assert chosen == sorted(chosen, reverse=True) and chosen[-1] > 1e-6
    others = [(l, h, 9, j) for l in range(L) for h in range(2) for j in range(10)]
    assert max(attribution(x) for x in others if x not in steps) <= chosen[-1] * (1 + 1e-9)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("3.0@-1:2", "layers 0..2, heads 0..1"),  # layer out of range
        ("1.2@-1:2", "layers 0..2, heads 0..1"),  # head out of range
        ("1.0@10:2", "positions lie in -10..9"),  # query out of range
        ("1.0@-1:-11", "positions lie in -10..9"),  # key out of range
        ("1.0@3:5", "comes after query 3"),  # a key after its query
        ("1.0@3", "LAYER.HEAD@I:J"),  # not the form
        ("auto:0", "auto:N with N >= 1"),
        ("auto:x", "auto:N with N >= 1"),
    ],
)
def test_bad_qk_specs_fail_in_one_line(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_qk(spec, SHAPE, 10)
    assert "\n" not in str(e.value)


def test_qk_specs():
    assert parse_qk("", SHAPE, 10) == (0, [])
    assert parse_qk("auto", SHAPE, 10) == (20, []) and parse_qk("auto:7", SHAPE, 10) == (7, [])
    assert parse_qk("2.1@-1:-2, 0.0@4:0", SHAPE, 10) == (0, [(2, 1, 9, 8), (0, 0, 4, 0)])


def test_command_line_writes_the_qk_section(tmp_path, make_hub_model, capsys):
    """graph.py --qk: the JSON's "qk" list names nodes as nodes.json does (pruned ones too),
    "pos@J" or "bias", and its pairs plus rest add up to the score."""
    model_dir, clt_dir = write_model_and_clt(tmp_path, make_hub_model)
    args = graph_args(model_dir, clt_dir, tmp_path, "Tarn is in the north") + [
        "--out",
        str(tmp_path / "g"),
    ]
    G.main(args + ["--qk", "2.1@-1:3,1.0@-2:-2", "--qk-pairs", "8"])
    assert "qk L2.H1@20:3" in capsys.readouterr().out
    data = json.loads((tmp_path / "g" / "graph.json").read_text())
    table = json.loads((tmp_path / "g" / "nodes.json").read_text())["nodes"]
    ids = {n["node_id"] for n in table} | {f"pos@{p}" for p in range(21)} | {"bias"}
    assert [(q["layer"], q["head"], q["query_pos"], q["key_pos"]) for q in data["qk"]] == [
        (2, 1, 20, 3),
        (1, 0, 19, 19),
    ]
    for q in data["qk"]:
        for name in ("", "contrast_"):
            pairs = q[name + "pairs"]
            assert (
                len(pairs) == 8 and {p["query"] for p in pairs} | {p["key"] for p in pairs} <= ids
            )
            total = sum(p["value"] for p in pairs) + q[name + "rest"]
            assert total == pytest.approx(q[name.rstrip("_") or "score"], rel=1e-4, abs=1e-5)
    G.main(args + ["--qk", "auto:3"])
    assert len(json.loads((tmp_path / "g" / "graph.json").read_text())["qk"]) == 3
    with pytest.raises(ValueError, match="heads 0..1"):
        G.main(args + ["--qk", "0.5@-1:0"])


def test_graph_page_marks_explained_heads_and_shows_their_pairs(tmp_path, make_hub_model):
    """viz.py graph: each explained head is a node at its layer and query, with a dashed edge from
    its key's token; the page's script fills the panel with the pairs, named, for a clicked head
    (here the link page.html#qk=0) or edge."""
    model_dir, clt_dir = write_model_and_clt(tmp_path, make_hub_model)
    out = tmp_path / "g"
    args = graph_args(model_dir, clt_dir, tmp_path, "Tarn is in the north")
    G.main(args + ["--out", str(out), "--qk", "2.1@-1:3"])
    viz.main(["graph", str(out / "graph.json")])
    svg = (out / "graph.svg").read_text()
    assert "<title>qk_0</title>" in svg and "L2.H1 ← 3" in svg
    assert re.search(r"<title>E_\d+_3&#45;&gt;qk_0</title>", svg)  # from the key's token
    page = (out / "graph.html").read_text()
    assert "var QK = " in page and "id='qk-panel'" in page
    if shutil.which("chromium") is None:
        return
    # the page as it opens at #qk=0, then a click on an edge between two positions
    (out / "clicked.html").write_text(page.replace("</body>", CLICK_AN_EDGE + "</body>"))
    url = f"file://{out / 'clicked.html'}#qk=0"
    dom = chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", url).stdout
    opened = re.search(r'data-opened="([^"]*)"', dom).group(1)
    assert (
        "L2.H1: query 20" in opened and "attends to key 3" in opened and "all other pairs" in opened
    )
    assert "error L" in opened or "token " in opened  # the pairs, with their names
    panel = dom[dom.index('<div id="qk-panel">') :]
    assert (
        "Why the head attends: edge " in panel
    )  # an explained head on its path, or how to add one


# a click on the first edge between two positions, after the panel's first text is kept aside
CLICK_AN_EDGE = """<script>
var panel = document.getElementById("qk-panel");
document.body.setAttribute("data-opened", panel.textContent);
var edges = Array.from(document.querySelectorAll("svg g.edge"));
var hit = edges.filter(function (g) { return g.style.cursor === "pointer"; })[0];
hit.dispatchEvent(new MouseEvent("click", {bubbles: true}));
</script>"""


def test_terms_add_up_through_a_skip_connection():
    """A per-layer transcoder with a skip path (a path, no node: its share goes to the nodes that
    feed it) decomposes as exactly; its features' pairs still predict their perturbations."""
    model, plt, _, idx = make_plt(skip=True)
    rep = G.local_replacement(model, plt, idx)
    steps = [(2, 0, 9, 3), (1, 1, 6, 6)]
    assert_exact(model, plt, rep, steps, 1e-12)
    assert_pairs_predict_perturbations(model, plt, rep, steps)

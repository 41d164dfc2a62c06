"""Supernodes and readable graphs: graph.supernodes groups alike features at one position, a
supernode's influence is the sum of its members' in the full graph, circuit-tracer's front end gets
them in its own format (qParams, the URL its page reads), viz.py draws each as one box, and the SVG
keeps the grid (x by token position, y by layer). Small random GPT + CLT, as in test_graph.py."""

import html
import json
import re
import shutil
import urllib.parse

import pytest
import torch

import graph as G
import viz
from forge import graphfile, plots
from test_graph import build, write_model_and_clt

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def grouped():
    """(graph, prune's masks and influence, the supernodes) of test_graph.py's random graph."""
    *_, graph = build()
    node_mask, edge_mask, _, infl = G.prune(graph)
    return graph, node_mask, edge_mask, infl, G.supernodes(graph, node_mask, edge_mask)


def test_supernodes_partition_the_kept_features_by_position():
    graph, node_mask, edge_mask, infl, groups = grouped()
    members = torch.cat(groups).sort().values
    n = len(graph.feats)
    assert torch.equal(members, node_mask[:n].nonzero()[:, 0])  # each kept feature once
    assert any(len(g) > 1 for g in groups) and len(groups) < len(members)  # some grouping
    for g in groups:
        assert len(set(graph.feats[g, 1].tolist())) == 1  # one position
    again = G.supernodes(graph, node_mask, edge_mask)  # deterministic
    assert all(torch.equal(a, b) for a, b in zip(groups, again)) and len(groups) == len(again)
    # a threshold above every similarity groups nothing; below every one, a group per position
    assert all(len(g) == 1 for g in G.supernodes(graph, node_mask, edge_mask, threshold=1.01))
    coarse = G.supernodes(graph, node_mask, edge_mask, threshold=-1.0)
    assert len(coarse) == len(set(graph.feats[members, 1].tolist()))


def test_complete_linkage_on_hand_made_profiles():
    """Three features at position 1 and one at 2: two read and write alike, one the opposite, the
    fourth alike but elsewhere; decoder directions can split the alike pair."""
    feats = torch.tensor([[0, 1, 0], [0, 1, 1], [1, 1, 2], [0, 2, 3]])
    N = 4 + 2  # the features, one input, one output
    A = torch.zeros(N, N)
    A[[0, 1, 3], 4] = 1.0  # read the input
    A[2, 4] = -1.0
    A[5, [0, 1, 3]] = 2.0  # write the output
    A[5, 2] = -2.0
    graph = G.Graph("", [0, 1, 2], feats, torch.ones(4), torch.tensor([0]), torch.ones(1), A, 2, 4)
    mask = torch.ones(N, dtype=torch.bool)
    edges = A != 0
    assert [g.tolist() for g in G.supernodes(graph, mask, edges)] == [[0, 1], [2], [3]]
    decoders = torch.eye(4, 8)  # orthogonal: the average similarity is 1/2, still alike
    assert [g.tolist() for g in G.supernodes(graph, mask, edges, decoders)][0] == [0, 1]
    decoders[1, 0] = -1.0  # opposite decoders: (1 + cos) / 2 < 1/2
    decoders[1, 1] = 0.0
    assert [g.tolist() for g in G.supernodes(graph, mask, edges, decoders)][:2] == [[0], [1]]


def test_supernode_influence_is_the_sum_of_its_members():
    """What the picture shows for a supernode is its members' summed influence in the full graph;
    merging their columns into one node would not give it (rows are normalized)."""
    graph, node_mask, edge_mask, infl, groups = grouped()
    n = len(graph.feats)
    where = [dict(layer=str(l), ctx_idx=p, feature_type="f") for l, p, _ in graph.feats.tolist()]
    nodes = [dict(node_id=f"n{i}", influence_raw=infl[i].item(), **where[i]) for i in range(n)]
    big = max(groups, key=len)
    ids = [f"n{i}" for i in big.tolist()]
    drawn = plots.collapse_supernodes(
        dict(nodes=nodes, links=[], qParams=dict(supernodes=[["s", *ids]]))
    )
    box = next(n for n in drawn["nodes"] if n["feature_type"] == "supernode")
    assert box["influence_raw"] == pytest.approx(infl[big].sum().item())
    assert len(drawn["nodes"]) == len(nodes) - len(big) + 1
    # influence is linear in the outputs' weights, not in the sources: one merged source differs
    A = graph.adjacency.clone()
    A[:, big[0]] = A[:, big].sum(1)
    A[:, big[1:]] = 0
    merged = G.influence(A, graph.logit_weights())[big[0]]
    assert not torch.isclose(merged, infl[big].sum(), rtol=1e-3)


def test_group_labels_and_the_front_end_parameters():
    labels = ['" Fafes", " Nu" → " Zefekic"', '" Fafes" → " Zefekic", " Bepaese"', '" in"']
    assert graphfile.group_label(labels) == '" Fafes", " Nu" → " Zefekic", " Bepaese"'
    assert graphfile.group_label(['fires on "a", "b" | promotes "c"']) == '"a", "b" → "c"'
    nodes = [dict(node_id=f"0_{i}_1", clerp='"x" → "y"', influence_raw=float(i)) for i in range(4)]
    q = graphfile.frontend_qparams(nodes, [True, True, True, False], [[0, 1], [2], [3, 0]])
    assert q["pinnedIds"] == ["0_0_1", "0_1_1", "0_2_1"]
    assert q["supernodes"] == [['"x" → "y"', "0_1_1", "0_0_1"], ['"x" → "y"\'', "0_3_1", "0_0_1"]]
    url = graphfile.frontend_url("graph", q)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert json.loads(query["supernodes"][0]) == q["supernodes"]  # init-cg.js: JSON.parse
    assert query["pinnedIds"][0].split(",") == q["pinnedIds"] and query["slug"] == ["graph"]


def written_graph(tmp_path, make_hub_model, capsys):
    model_dir, clt_dir = write_model_and_clt(tmp_path, make_hub_model)
    out = tmp_path / "graph"
    args = ["--model", model_dir, "--clt", clt_dir, "--prompt", "Tarn is in the north of"]
    G.main(args + ["--device", "cpu", "--interp", "", "--out", str(out)])
    printed = capsys.readouterr().out
    return json.loads((out / "graph.json").read_text()), printed, out


def test_graph_py_writes_and_prints_the_supernodes(tmp_path, make_hub_model, capsys):
    data, printed, _ = written_graph(tmp_path, make_hub_model, capsys)
    q = data["qParams"]
    kept = {n["node_id"]: n for n in data["nodes"]}
    assert set(q["pinnedIds"]) == set(kept) and q["supernodes"]
    for label, *ids in q["supernodes"]:
        assert len(ids) > 1 and len({kept[i]["ctx_idx"] for i in ids}) == 1
    url = re.search(r"then open (\S+)", printed).group(1)
    assert (
        json.loads(urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["supernodes"][0])
        == (q["supernodes"])
    )
    models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    models.Model(**data)  # circuit-tracer's own schema takes the file, qParams included


def svg_nodes(svg):
    """{node id: (x, y)} of the SVG's nodes: the centre of each one's first text."""
    out = {}
    for title, body in re.findall(
        r'<g id="node\d+" class="node">\s*<title>([^<]*)</title>(.*?)</g>', svg, re.S
    ):
        m = re.search(r'<text[^>]* x="([-\d.]+)" y="([-\d.]+)"', body)
        if m:
            out[html.unescape(title)] = (float(m.group(1)), float(m.group(2)))
    return out


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed")
@pytest.mark.parametrize("supernodes", [True, False])
def test_svg_keeps_positions_left_to_right_and_layers_bottom_up(
    tmp_path, make_hub_model, capsys, supernodes
):
    data, _, out = written_graph(tmp_path, make_hub_model, capsys)
    flag = [] if supernodes else ["--no-supernodes"]
    viz.main(["graph", str(out / "graph.json"), "--max-nodes", "200", *flag])
    svg = (out / "graph.svg").read_text()
    at = svg_nodes(svg)
    drawn = plots.collapse_supernodes(data) if supernodes else data
    nodes = [n for n in drawn["nodes"] if n["node_id"] in at]
    boxes = [n for n in nodes if n["feature_type"] == "supernode"]
    assert bool(boxes) == supernodes
    for b in boxes:  # its member count in the box, their summed influence in its tooltip
        assert f"{len(b['members'])} features" in svg
        assert f"influence {b['influence_raw']:.3g}, its members&#39; sum" in svg
    row = {n["node_id"]: viz.grid_row(n) for n in nodes}
    for a in nodes:
        for b in nodes:
            (xa, ya), (xb, yb) = at[a["node_id"]], at[b["node_id"]]
            if a["ctx_idx"] < b["ctx_idx"]:
                assert xa < xb, (a["node_id"], b["node_id"])
            if row[a["node_id"]] < row[b["node_id"]]:
                assert ya > yb, (a["node_id"], b["node_id"])  # SVG y grows downwards
    # each row labelled once: a crowded layer's extra rows carry no label
    row_labels = re.findall(r"<title>rowlabel_\d+</title>\s*<text[^>]*>([^<]*)</text>", svg)
    assert "Emb" in row_labels and len(row_labels) == len(set(row_labels))
    # the page opens the picture at its left edge (the tokens' start) at any window width
    page = (out / "graph.html").read_text()
    assert "<div class='scroll'>" in page and "rtl" not in page


def test_front_end_reads_supernodes_from_the_url():
    """The lines of circuit-tracer 0.5.0's init-cg.js that frontend_url follows: supernodes come
    from the URL alone (qParams' are replaced, by [] without one), pinned ids from either."""
    server = pytest.importorskip("circuit_tracer.frontend.local_server")
    code = (server.DEFAULT_FRONTEND_DIR / "attribution_graph" / "init-cg.js").read_text()
    assert "const supernodesParam = util.params.get('supernodes');" in code
    assert "let urlSupernodes = [];" in code and "visState.supernodes = urlSupernodes" in code
    assert "var urlPinnedIds = util.params.get('pinnedIds');" in code
    subgraph = (
        server.DEFAULT_FRONTEND_DIR / "attribution_graph" / "init-cg-subgraph.js"
    ).read_text()
    assert ".map(([label, ...nodeIds], i) => {" in subgraph  # [label, member ids...]

"""viz.py on hand-built inputs in the formats of graph.py, interp.py and train.py: the .dot's nodes,
edges and ranks, the grid layout, self-contained and well-formed HTML, plots, and (with Chromium)
screenshots that are not blank."""

import json
import os
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

import viz
from conftest import chromium, needs_chromium
from forge import browser, plots

needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None, reason="graphviz `dot` is not installed"
)

# -----------------------------------------------------------------------------
# hand-built inputs


def node(node_id, layer, pos, ft, **kw):
    return dict(
        node_id=node_id,
        feature=kw.pop("feature", 0),
        layer=layer,
        ctx_idx=pos,
        feature_type=ft,
        clerp=kw.pop("clerp", ""),
        activation=kw.pop("activation", None),
        **kw,
    )


def make_graph():
    """2 layers, 3 tokens, as graph.py writes it: Cantor-paired "feature", cumulative "influence"."""
    tokens = ["<|endoftext|>", "The", " capital"]
    nodes = [node(f"E_{100 + p}_{p}", "E", p, "embedding", feature=p) for p in range(3)]
    nodes += [
        node(
            "0_5_1",
            "0",
            1,
            "cross layer transcoder",
            feature=20,
            clerp="the word The",
            activation=2.0,
            influence=0.3,
            influence_raw=0.5,
        ),
        node(
            "0_7_2",
            "0",
            2,
            "cross layer transcoder",
            feature=35,
            clerp="capital <cities> & co",
            activation=1.0,
            influence=0.6,
            influence_raw=0.2,
        ),
        node(
            "1_3_2",
            "1",
            2,
            "cross layer transcoder",
            feature=13,
            clerp="says a city",
            activation=3.0,
            influence=0.1,
            influence_raw=0.9,
        ),
        node(
            "0_-1_2",
            "0",
            2,
            "mlp reconstruction error",
            feature=-1,
            influence=0.7,
            influence_raw=0.1,
        ),
        node(
            "3_42_2",
            "3",
            2,
            "logit",
            feature=42,
            clerp='Output " Paris" (p=0.700)',
            is_target_logit=True,
        ),
    ]
    links = [
        dict(source="E_101_1", target="0_5_1", weight=1.5),
        dict(source="0_5_1", target="1_3_2", weight=2.0),
        dict(source="E_102_2", target="1_3_2", weight=-1.0),
        dict(source="0_-1_2", target="1_3_2", weight=0.5),
        dict(source="0_7_2", target="1_3_2", weight=-0.25),
        dict(source="1_3_2", target="3_42_2", weight=4.0),
    ]
    meta = dict(
        slug="graph",
        prompt="<|endoftext|>The capital",
        prompt_tokens=tokens,
        node_threshold=0.8,
        info=dict(replacement_score=0.8, completeness_score=0.9),
    )
    return dict(metadata=meta, qParams={}, nodes=nodes, links=links)


def write_graph(tmp_path):
    path = tmp_path / "graph" / "graph.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(make_graph()))
    return path


def feature(layer, f, n_fires=10):
    ex = dict(
        act=3.0,
        doc=0,
        pos=4,
        tokens=["<b>", " Paris", " is", "\n", "&"],
        acts=[0.0, 3.0, 1.5, 0.0, 0.3],
        center=1,
    )
    return dict(
        layer=layer,
        feature=f,
        density=n_fires / 1000,
        n_fires=n_fires,
        mean_act=1.2,
        max_act=3.0 if n_fires else 0.0,
        quantiles={"q10": 0.5, "q50": 1.0},
        hist=dict(edges=[0.25, 0.5, 1.0, 2.0, 4.0], counts=[1, 4, 3, 2] if n_fires else []),
        top_examples=[ex] * (1 if n_fires else 0),
        quantile_examples=[dict(ex, quantile=0.5)],
        input_ngrams=[dict(ngram='" Paris"', count=9, corpus_count=12, pmi=4.1)],
        promoted=[dict(token=" Paris", logit=1.25), dict(token="<", logit=0.5)],
        suppressed=[dict(token=" London", logit=-0.75)],
        detection_auroc=0.91,
        detection_bacc=0.8,
        fuzzing_bacc=None,
        heldout_density=0.01,
        explanation='fires on " Paris" | promotes <cities>',
        explanation_ngrams=['" Paris"'],
    )


def write_interp(tmp_path):
    run = tmp_path / "interp"
    run.mkdir()
    rows = [feature(0, 5), feature(0, 6, n_fires=0), feature(1, 3)]
    (run / "features.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(
        json.dumps(
            dict(
                n_train_tokens=1000,
                per_layer=[
                    dict(layer=0, features=2, dead=1, live=1),
                    dict(layer=1, features=2, dead=1, live=1),
                ],
                detection_auroc={"q50": 0.9},
            )
        )
    )
    fig = Figure(figsize=(2, 1))
    fig.subplots().plot([0, 1], [1, 0])
    fig.savefig(run / "summary.png")
    return run


def write_metrics(run, l0, fvu, steps=20):
    """metrics.jsonl as train.py writes it: per-layer fvu, l0, dead; an "eval" dict every 10 steps."""
    run.mkdir(parents=True)
    rows = []
    for s in range(steps):
        r = dict(
            step=s,
            loss=2.0 / (s + 1),
            mse=1.0 / (s + 1),
            sparsity=0.1,
            preact=0.0,
            aux=0.0,
            lr=1e-3,
            grad_norm=1.0,
            fvu=[fvu, fvu],
            l0=[l0, l0],
            dead=[0, s],
            ms=1.0,
            tok_per_s=1.0,
        )
        if (s + 1) % 10 == 0:
            r["eval"] = dict(
                ce_clean=3.0,
                ce_spliced=3.5,
                ce_open=3.2,
                ce_zero=7.0,
                recovered=0.875,
                recovered_open=0.95,
            )
        rows.append(r)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


# -----------------------------------------------------------------------------
# checks shared by the tests


class TagBalance(HTMLParser):
    """Fails on an end tag that does not close the innermost open element."""

    VOID = {"meta", "br", "img", "hr", "input", "link", "area", "base", "col", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        self.stack.pop()


def check_page(path):
    text = open(path, encoding="utf-8").read()
    assert "http://" not in text and "https://" not in text, f"{path} refers to the network"
    assert not re.search(r'(src|href)="(?!data:|[\w./-]+\.html")', text), (
        f"{path} loads a non-local resource"
    )
    parser = TagBalance()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], f"{path}: unclosed {parser.stack}"
    return text


def parse_dot(source):
    """(visible node ids -> attribute text, visible edges {(a, b): attrs}, {row subgraph: [node ids]})."""
    nodes = {}
    edges = {}
    rows = {}
    row = None
    for line in source.splitlines():
        if m := re.match(r"\s*subgraph (\w+) \{", line):
            row = m.group(1)
            rows[row] = []
        elif line.strip() == "}":
            row = None
        elif m := re.match(r'\s*"?([\w-]+)"? -> "?([\w-]+)"? \[(.*)\]', line):
            if "invis" not in m.group(3):
                edges[m.group(1), m.group(2)] = m.group(3)
        elif m := re.match(r'\s*"?([\w-]+)"? \[(.*)\]', line):
            if row is not None:
                rows[row].append(m.group(1))
            # and dot's default statements
            layout_only = ("rowlabel_", "legend", "cell_", "graph", "node", "edge")
            if "invis" not in m.group(2) and not m.group(1).startswith(layout_only):
                nodes[m.group(1)] = m.group(2)
    return nodes, edges, rows


# -----------------------------------------------------------------------------
# graph


def test_dot_nodes_edges_ranks():
    graph = make_graph()
    g = viz.build_dot(graph, viz.GraphConfig())
    nodes, edges, rows = parse_dot(g.source)
    assert set(nodes) == {n["node_id"] for n in graph["nodes"]}
    assert set(edges) == {(l["source"], l["target"]) for l in graph["links"]}
    assert "rankdir=BT" in g.source
    for r in rows:
        assert "rank=same" in g.source.split(f"subgraph {r} {{")[1].split("}")[0], r
    members = {r: {n for n in ids if n in nodes} for r, ids in rows.items()}  # bottom row first
    assert list(members.values()) == [
        {"E_100_0", "E_101_1", "E_102_2"},
        {"0_5_1", "0_7_2", "0_-1_2"},
        {"1_3_2"},
        {"3_42_2"},
    ]
    for i in range(3):  # rows stacked in order
        assert f"rowlabel_{i} -> rowlabel_{i + 1}" in g.source
    # labels: layer/feature from node_id (not the Cantor-paired "feature"), escaped explanation, tokens
    assert 'label="L0/5\\nthe word The"' in nodes["0_5_1"] and "L1/3" in nodes["1_3_2"]
    assert "octagon" in nodes["0_-1_2"] and "dashed" in nodes["0_-1_2"]
    assert 'label="␣capital"' in nodes["E_102_2"]
    assert plots.POS_COLOR in edges["0_5_1", "1_3_2"]
    assert plots.NEG_COLOR in edges["E_102_2", "1_3_2"]
    widths = {e: float(re.search(r"penwidth=([\d.]+)", a).group(1)) for e, a in edges.items()}
    assert max(widths, key=widths.get) == ("1_3_2", "3_42_2") and min(widths, key=widths.get) == (
        "0_7_2",
        "1_3_2",
    )
    size = {n: float(re.search(r"width=([\d.]+)", a).group(1)) for n, a in nodes.items()}
    assert size["1_3_2"] > size["0_5_1"] > size["0_7_2"] > size["0_-1_2"]  # by influence_raw


def test_max_nodes_and_edges_prune_the_weakest():
    g = viz.build_dot(make_graph(), viz.GraphConfig(max_nodes=2, max_edges=2))
    nodes, edges, _ = parse_dot(g.source)
    assert {n for n in nodes if not n.startswith(("E_", "3_"))} == {
        "1_3_2",
        "0_5_1",
    }  # embeddings/logits always
    assert set(edges) == {("1_3_2", "3_42_2"), ("0_5_1", "1_3_2")}


def test_crowded_cells_wrap_onto_more_ranks():
    _, _, rows = parse_dot(viz.build_dot(make_graph(), viz.GraphConfig(cell_width=1)).source)
    members = [
        {n for n in ids if not n.startswith(("rowlabel_", "cell_", "legend"))}
        for ids in rows.values()
    ]
    assert members[1:3] == [
        {"0_5_1", "0_7_2"},
        {"0_-1_2"},
    ]  # layer 0, its most influential node per cell first


@needs_dot
def test_dot_layout_is_a_grid():
    """Rows bottom to top in layer order; within a row, x follows the token position; a position's
    first node sits straight above the one below it (same x) in every row."""
    graph = make_graph()
    pos = viz.dot_positions(viz.build_dot(graph, viz.GraphConfig(), links=False))
    rows = [
        ["E_100_0", "E_101_1", "E_102_2"],
        ["0_5_1", "0_-1_2"],
        ["cell_2_1", "1_3_2"],
        ["3_42_2"],
    ]
    ys = [pos[r[0]][1] for r in rows]
    assert ys == sorted(ys) and len(set(ys)) == 4
    for r in rows:
        assert len({pos[n][1] for n in r}) == 1 and [pos[n][0] for n in r] == sorted(
            pos[n][0] for n in r
        )
    x = {n: p[0] for n, p in pos.items()}
    assert abs(x["E_101_1"] - x["0_5_1"]) < 1 and abs(x["0_5_1"] - x["cell_2_1"]) < 1
    assert abs(x["E_102_2"] - x["1_3_2"]) < 1 and abs(x["1_3_2"] - x["3_42_2"]) < 1


@needs_dot
def test_angle_brackets_in_text_stay_text():
    """A token like <|endoftext|> in a label or tooltip is text, not one of graphviz's HTML-like labels."""
    graph = make_graph()
    nodes = {n["node_id"]: n for n in graph["nodes"]}
    nodes["E_100_0"]["clerp"] = "<|endoftext|>"  # graph.py names an embedding node by its token
    nodes["0_5_1"]["clerp"] = "<|endoftext|> then <b>"
    g = viz.build_dot(graph, viz.GraphConfig(), links=False)
    assert "E_100_0" in viz.dot_positions(g)  # dot parses it
    assert 'tooltip="L0/5 at position 1, activation 2\\n<|endoftext|> then <b>"' in g.source


@needs_dot
def test_graph_files_link_to_feature_pages(tmp_path):
    path = write_graph(tmp_path)
    pages = tmp_path / "interp" / "html"
    pages.mkdir(parents=True)
    (pages / "L1_F3.html").write_text("<p>page</p>")
    viz.main(["graph", str(path)])
    for ext in ("dot", "svg", "png", "html"):
        assert (path.parent / f"graph.{ext}").stat().st_size > 100
    text = check_page(path.parent / "graph.html")
    # only pages that exist
    assert 'href="../interp/html/L1_F3.html"' in text
    assert "L0_F5.html" not in text
    assert "replacement_score" in text and "<svg" in text and "&lt;|endoftext|&gt;" in text
    # pinned by the dot pass, routed by neato -n2
    assert "pos=" in (path.parent / "graph.dot").read_text()


def test_graph_without_dot_writes_the_dot_file(tmp_path, monkeypatch, capsys):
    path = write_graph(tmp_path)
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    viz.main(["graph", str(path)])
    assert (path.parent / "graph.dot").exists() and not (path.parent / "graph.svg").exists()
    assert "apt-get install graphviz" in capsys.readouterr().out
    # the nodes are still listed, and say how to get the picture
    page = check_page(path.parent / "graph.html")
    assert "<svg" not in page and "apt-get install graphviz" in page and "says a city" in page


def test_graph_page_lists_nodes_by_influence(tmp_path, monkeypatch):
    path = write_graph(tmp_path)
    pages = tmp_path / "interp" / "html"
    pages.mkdir(parents=True)
    (pages / "L1_F3.html").write_text("<p>page</p>")
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)  # the table does not need graphviz
    viz.main(["graph", str(path)])
    page = check_page(path.parent / "graph.html")
    table = page[page.index("<h2>Nodes") :]
    order = [table.index(name) for name in ("L1/3", "L0/5", "L0/7", "err L0")]  # by influence_raw
    assert order == sorted(order)
    assert '<a href="../interp/html/L1_F3.html">L1/3</a>' in table and "L0_F5.html" not in table


def test_bad_graph_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        viz.load_graph(str(tmp_path / "missing.json"))
    (tmp_path / "g.json").write_text(json.dumps({"nodes": []}))
    with pytest.raises(ValueError, match="links"):
        viz.load_graph(str(tmp_path / "g.json"))


# -----------------------------------------------------------------------------
# feature pages


def test_show_token():
    assert browser.show_token(" Paris") == "␣Paris" and browser.show_token("  ") == "␣␣"
    assert browser.show_token("a\n") == "a⏎"
    assert browser.show_token("x ") == "x␣"
    assert browser.show_token("\x00\t") == "␀→"


def test_feature_pages(tmp_path):
    run = write_interp(tmp_path)
    viz.main(["features", str(run)])
    out = run / "html"
    assert sorted(os.listdir(out)) == [
        "L0_F5.html",
        "L1_F3.html",
        "commit.json",
        "index.html",
    ]  # no page for the dead one
    browser.check_pages(out)  # one run's, committed
    index = check_page(out / "index.html")
    assert 'href="L0_F5.html"' in index and "1 dead" in index
    assert 'src="data:image/png;base64,' in index
    page = check_page(out / "L0_F5.html")
    # tokens escaped
    assert "<b>" not in page.replace("<b>Explanation:</b>", "")
    assert "&lt;b&gt;" in page
    assert "␣Paris" in page and "⏎" in page and "promotes &lt;cities&gt;" in page
    # shade = act / max_act
    assert "rgba(255,140,0,1.00)" in page and "rgba(255,140,0,0.50)" in page
    assert "detection_auroc" in page and "0.91" in page and "␣London" in page and "<svg" in page


def test_feature_pages_reject_mismatched_examples(tmp_path):
    run = tmp_path / "interp"
    run.mkdir()
    bad = feature(0, 1)
    bad["top_examples"][0] = dict(bad["top_examples"][0], acts=[1.0])
    (run / "features.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="5 tokens but 1 activations"):
        viz.main(["features", str(run)])
    with pytest.raises(FileNotFoundError):
        viz.main(["features", str(tmp_path / "nowhere")])


def test_pages_are_written_whole_or_not_at_all(tmp_path):
    """A bad record in a chunk: the chunk's pages are neither renamed into place nor left half-written."""
    run = tmp_path / "interp"
    run.mkdir()
    bad = feature(0, 2)
    bad["top_examples"][0] = dict(bad["top_examples"][0], acts=[1.0])
    (run / "features.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (feature(0, 1), bad)))
    with pytest.raises(ValueError, match="5 tokens but 1 activations"):
        viz.main(["features", str(run)])
    assert not (run / "html").exists()  # no page, and the folder the run made is gone
    with browser.FileBatch(max_bytes=10) as batch:  # a flush every file
        for i in range(3):
            batch.add(str(tmp_path / f"{i}.html"), "<p>x</p>")
    assert sorted(p.name for p in tmp_path.glob("*.html*")) == ["0.html", "1.html", "2.html"]


def test_pages_in_worker_processes_keep_the_order(tmp_path, monkeypatch):
    assert list(browser.map_in_order(abs, range(0, -9, -1), workers=2)) == list(range(9))
    monkeypatch.setattr(viz, "PAGE_CHUNK", 16)  # 5 chunks of features.jsonl, for 2 workers
    run = tmp_path / "interp"
    write_synthetic_interp(run, 2, 40, n_top=1, n_quantile=0)
    one = viz.main(["features", str(run), "--out", str(tmp_path / "one"), "--workers", "1"])
    two = viz.main(["features", str(run), "--out", str(tmp_path / "two"), "--workers", "2"])
    assert open(one).read() == open(two).read()
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two"))


def test_index_needs_the_layer_order(tmp_path):
    run = tmp_path / "interp"
    run.mkdir()
    rows = [feature(0, 0), feature(1, 0), feature(0, 1)]
    (run / "features.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="layer 0 again"):
        viz.main(["features", str(run), "--inline-rows", "0"])


# -----------------------------------------------------------------------------
# training curves


def test_train_plots_and_frontier(tmp_path):
    a = write_metrics(tmp_path / "a", l0=8.0, fvu=0.2)
    b = write_metrics(tmp_path / "b", l0=32.0, fvu=0.05)
    written = viz.main(["train", str(a), str(b), "--out", str(tmp_path / "plots"), "--dpi", "50"])
    names = {os.path.relpath(p, tmp_path / "plots") for p in written}
    panels = {"loss", "fvu", "l0", "dead", "spliced", "recovered"}
    assert names == {f"{r}/{p}.png" for r in "ab" for p in panels} | {"frontier.png"}
    for p in written:
        img = imread(p)
        assert img.shape[0] >= 200 and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20
    rows = viz.load_metrics(str(b))
    assert plots.final(rows, "l0") == 32.0 and plots.final(rows, "fvu") == pytest.approx(0.05)
    assert plots.final(rows, "dead") == pytest.approx(np.mean([s / 2 for s in range(10, 20)]))
    assert plots.series(rows, "eval.ce_spliced") == ([9, 19], [3.5, 3.5])


# -----------------------------------------------------------------------------
# screenshots (Chromium, when installed)


@pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("dot") is None,
    reason="needs chromium and graphviz `dot`",
)
def test_screenshots_are_not_blank(tmp_path):
    path = write_graph(tmp_path)
    run = write_interp(tmp_path)
    viz.main(["features", str(run)])
    viz.main(["graph", str(path)])
    for page in (run / "html" / "L0_F5.html", path.parent / "graph.html"):
        png = tmp_path / (page.stem + ".png")
        shot = [f"--screenshot={png}", "--window-size=1200,900"]
        chromium(tmp_path, "--disable-quic", *shot, f"file://{page}")
        img = imread(png)
        assert img.shape[:2] == (900, 1200)
        assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 50, f"{page} looks blank"


# -----------------------------------------------------------------------------
# the feature browser (index.html) in a real browser, when Chromium is installed


def write_browser_interp(tmp_path):
    """Nine features over three layers: "capital" in some explanations, in one's top tokens only, in
    another's case; one dead, one dense, one without an AUROC. Returns (run dir, their (layer, feature))."""
    run = tmp_path / "interp"
    run.mkdir()
    spec = [  # layer, feature, explanation, detection AUROC, density
        (0, 0, 'fires on " capital" | promotes " Tes"', 0.95, 0.02),
        (0, 1, "dead", None, 0.0),
        (0, 2, 'fires on " the" | promotes " of"', 0.6, 0.05),
        (0, 3, 'fires on " city" | promotes " is"', 0.7, 0.01),
        (1, 0, 'fires on " capital", " of" | promotes " Tes"', 0.99, 0.03),
        (1, 1, 'fires on " capital" | promotes " Rig"', None, 0.001),
        (1, 2, 'fires on no frequent n-gram | promotes " the"', 0.55, 0.5),
        (2, 0, 'fires on " Capital" | promotes " Tes"', 0.8, 0.04),
        (2, 1, 'fires on " sat" | promotes " on"', 0.9, 0.02),
    ]
    rows = []
    for layer, f, text, auroc, density in spec:
        rec = feature(layer, f, n_fires=int(density * 1000))
        rec.update(explanation=text, detection_auroc=auroc, density=density)
        if (layer, f) == (0, 3):  # "capital" only in its top tokens
            rec["top_examples"] = [
                dict(rec["top_examples"][0], tokens=[" the", " capital", " of", "\n", "&"])
            ]
        rows.append(rec)
    (run / "features.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, [(layer, f) for layer, f, *_ in spec]


class IndexRows(HTMLParser):
    """The rows of the index's table, in document order: (hidden, [cell texts])."""

    def __init__(self):
        super().__init__()
        self.rows = []
        self.in_body = False
        self.cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.in_body = dict(attrs).get("id") == "features"
        elif tag == "tr" and self.in_body and any(k == "data-layer" for k, _ in attrs):
            self.rows.append(("hidden" in dict(attrs), []))
        elif tag == "td" and self.in_body and self.rows:
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.rows[-1][1].append(self.cell.strip())
            self.cell = None
        elif tag == "table":
            self.in_body = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def chromium_dom(url, tmp_path):
    """The page's DOM after its scripts ran, as headless Chromium dumps it."""
    return chromium(tmp_path, "--dump-dom", url).stdout


def shown(dom):
    """(layer, feature) of the rows the browser shows, top to bottom."""
    return list(browser_rows(dom))


def test_index_has_a_row_per_feature(tmp_path):
    run, features = write_browser_interp(tmp_path)
    viz.main(["features", str(run)])
    index = check_page(run / "html" / "index.html")
    assert shown(index) == features  # in the file, before any script: every feature, dead ones too
    assert "<script>" in index and index.count("<script") == 1  # one inline script, nothing loaded
    parser = IndexRows()
    parser.feed(index)
    flags = {(int(c[0]), int(c[1])): c[-1] for _, c in parser.rows}
    assert flags[0, 1] == "dead" and flags[1, 2] == "dense" and flags[0, 0] == ""
    # dead: no page
    assert 'href="L0_F1.html"' not in index
    assert not (run / "html" / "L0_F1.html").exists()


@needs_chromium
def test_browser_sorts_and_filters_from_the_url(tmp_path):
    run, features = write_browser_interp(tmp_path)
    index = viz.main(["features", str(run)])
    assert shown(chromium_dom(f"file://{index}", tmp_path)) == features
    capital = shown(chromium_dom(f"file://{index}#sort=auroc&q=capital", tmp_path))
    assert capital == [
        (1, 0),
        (0, 0),
        (2, 0),
        (0, 3),
        (1, 1),
    ]  # by AUROC, highest first; no AUROC last
    layer0 = shown(chromium_dom(f"file://{index}#layer=0&sort=density&dir=asc", tmp_path))
    assert layer0 == [(0, 1), (0, 3), (0, 0), (0, 2)]
    by_id = shown(chromium_dom(f"file://{index}#q=capital&sort=feature&dir=desc", tmp_path))
    assert by_id == [(0, 3), (1, 1), (0, 0), (1, 0), (2, 0)]  # ties keep the file's order
    both = shown(chromium_dom(f"file://{index}#q=city+capital", tmp_path))
    assert both == [(0, 3)]  # every word, in the explanation or the top tokens


@needs_chromium
def test_graph_page_links_resolve(tmp_path):
    path = write_graph(tmp_path)
    run = write_interp(tmp_path)
    viz.main(["features", str(run)])
    viz.main(["graph", str(path)])
    dom = chromium_dom(f"file://{path.parent / 'graph.html'}", tmp_path)
    links = re.findall(r'<a[^>]*?\shref="([^"]+)"', dom)
    assert links, "no links on the graph page"
    pages = {os.path.normpath(path.parent / link) for link in links}
    assert all(os.path.isfile(p) for p in pages), pages
    assert pages == {str(run / "html" / "L0_F5.html"), str(run / "html" / "L1_F3.html")}
    if (
        shutil.which("dot") is not None
    ):  # the picture's nodes link too (SVG <a>), with the explanation to hover
        svg = dom[dom.index("<svg") : dom.index("</svg>")]
        assert re.search(
            r'<a[^>]*href="../interp/html/L1_F3.html"[^>]*title="L1/3 at position 2[^"]*says a city',
            svg,
        )


# -----------------------------------------------------------------------------
# the graph's features for circuit-tracer's front end

# circuit-tracer 0.5.0, frontend/feature_models.py: Model and its Example, field by field
FRONTEND_MODEL = dict(
    transcoder_id=str,
    index=int,
    examples_quantiles=list,
    top_logits=list,
    bottom_logits=list,
    act_min=float,
    act_max=float,
    quantile_values=list,
    histogram=list,
    activation_frequency=float,
)
FRONTEND_EXAMPLE = dict(
    tokens_acts_list=list, train_token_ind=int, is_repeated_datapoint=bool, tokens=list
)


def frontend_files(tmp_path, monkeypatch):
    path = write_graph(tmp_path)
    write_interp(tmp_path)
    # the feature files do not need graphviz
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    viz.main(["graph", str(path)])
    return path.parent / "features"


def test_frontend_feature_files_follow_circuit_tracers_schema(tmp_path, monkeypatch):
    folder = frontend_files(tmp_path, monkeypatch)
    # named by the node's "feature" (the Cantor pair the front end asks for); L0/7 has no interp record
    assert sorted(os.listdir(folder)) == ["13.json", "20.json"]
    data = json.loads((folder / "20.json").read_text())  # node 0_5_1: layer 0, feature 5
    assert {k: type(v) for k, v in data.items()} == FRONTEND_MODEL
    for group in data["examples_quantiles"]:
        assert set(group) == {"quantile_name", "examples"}
        assert isinstance(group["quantile_name"], str)
        for ex in group["examples"]:
            assert {k: type(v) for k, v in ex.items()} == FRONTEND_EXAMPLE
            assert len(ex["tokens"]) == len(ex["tokens_acts_list"])
    top = data["examples_quantiles"][0]
    assert top["quantile_name"] == "Top activations" and top["examples"][0]["tokens"][1] == " Paris"
    assert top["examples"][0]["train_token_ind"] == 1
    assert top["examples"][0]["tokens_acts_list"][1] == 3.0
    assert data["index"] == 5
    assert data["top_logits"] == [" Paris", "<"]
    assert data["bottom_logits"] == [" London"]
    assert (data["act_min"], data["act_max"], data["activation_frequency"]) == (0.0, 3.0, 0.01)
    # q[i] is the (i+1)-th percentile: the front end places a node's activation
    q = data["quantile_values"]
    assert len(q) == 100 and q == sorted(q) and 0.25 < q[0] < 0.5 and 2.0 < q[-1] < 4.0
    assert sum(data["histogram"]) == 10 and len(data["histogram"]) == browser.FRONTEND_BINS


def test_frontend_feature_files_load_in_circuit_tracer(tmp_path, monkeypatch):
    feature_models = pytest.importorskip(
        "circuit_tracer.frontend.feature_models",
        reason="circuit-tracer is not installed (pip install circuit-tracer)",
    )
    for path in frontend_files(tmp_path, monkeypatch).iterdir():
        feature_models.Model(**json.loads(path.read_text()))


# -----------------------------------------------------------------------------
# the feature browser at scale: a synthetic interp.py output of any size
#
# By hand, GPT-2-small's CLT (12 layers x 24,576 features, ~2.3 GB of features.jsonl):
#     python -c "import tests.test_viz as t; t.write_synthetic_interp('/tmp/big/interp', 12, 24576)"
#     time python viz.py features /tmp/big/interp

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ter",
    "an",
    "qu",
    "ros",
    "vel",
    "in",
    "ta",
    "bor",
    "se",
    "dun",
    "ph",
    "ex",
    "ul",
]


def write_synthetic_interp(
    run, n_layers, n_features, dead=0.01, seed=0, planted=None, n_top=16, n_quantile=8
):
    """features.jsonl and summary.json as interp.py writes them for n_layers x n_features features, by
    default of the size of a real run's records (16 top and 8 quantile examples of 11 tokens, ~8.8 KB a
    line), with random explanations and scores; a share `dead` never fires. planted: {(layer, feature):
    {key: value}} fields to set, e.g. an explanation to search for. The examples are drawn from a pool
    (fast to write; viz.py reads them all the same)."""
    rng = np.random.default_rng(seed)
    # ~1,500 words
    words = sorted({a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES[::3]})
    pool = []  # example JSON texts, spliced into the records: json.dumps of 24 examples is most of the time
    for i in range(256):
        acts = [round(float(a), 4) for a in rng.exponential(1.0, 11) * (rng.random(11) < 0.6)]
        tokens = [" " + words[w] for w in rng.integers(0, len(words), 11)]
        ex = dict(
            act=max(acts),
            doc=i,
            pos=8 + i % 50,
            tokens=tokens,
            acts=acts,
            center=int(np.argmax(acts)),
        )
        pool.append(json.dumps(ex, ensure_ascii=False))
    edges = [round(2 ** (i / 4 - 5), 5) for i in range(29)]
    planted = planted or {}
    os.makedirs(run, exist_ok=True)
    per_layer = []
    with open(os.path.join(run, "features.jsonl"), "w", encoding="utf-8") as fh:
        for layer in range(n_layers):
            is_dead = rng.random(n_features) < dead
            fires = (10 ** rng.uniform(1, 5, n_features)).astype(int) * ~is_dead
            scores = np.round(rng.uniform(0.4, 1.0, (n_features, 4)), 4).tolist()
            drawn = rng.integers(0, len(words), (n_features, 12)).tolist()
            for f in range(n_features):
                n_fires = int(fires[f])
                grams = [" " + words[w] for w in drawn[f][:4]]
                promotes = [" " + words[w] for w in drawn[f][4:]]
                text = "fires on " + ", ".join(json.dumps(g) for g in grams[: 1 + f % 3])
                text += " | promotes " + ", ".join(json.dumps(t) for t in promotes[:3])
                rec = dict(
                    layer=layer,
                    feature=f,
                    density=n_fires / 10**6,
                    n_fires=n_fires,
                    mean_act=scores[f][0],
                    max_act=round(3 * scores[f][0], 4) if n_fires else 0.0,
                    quantiles={f"q{q}": round(q / 50, 4) for q in (10, 25, 50, 75, 90, 99)}
                    if n_fires
                    else {},
                    hist=dict(
                        edges=edges if n_fires else [],
                        counts=[(f * k) % 500 for k in range(28)] if n_fires else [],
                    ),
                    promoted=[
                        dict(token=t, logit=round(1 - k / 10, 4)) for k, t in enumerate(promotes)
                    ],
                    suppressed=[
                        dict(token=t, logit=round(k / 10 - 1, 4)) for k, t in enumerate(grams * 2)
                    ],
                    detection_auroc=scores[f][1] if n_fires else None,
                    detection_bacc=scores[f][2] if n_fires else None,
                    fuzzing_bacc=scores[f][3] if n_fires else None,
                    heldout_density=n_fires / 10**6,
                    explanation=text if n_fires else "dead",
                    explanation_ngrams=grams if n_fires else [],
                    input_ngrams=[
                        dict(ngram=g, count=9, corpus_count=12, pmi=4.1) for g in grams * 2
                    ],
                )
                rec.update(planted.get((layer, f), {}))
                picks = rng.integers(0, len(pool), n_top + n_quantile) if n_fires else []
                top = ", ".join(pool[i] for i in picks[:n_top])
                quantile = ", ".join(
                    f'{pool[i][:-1]}, "quantile": {1 - j / n_quantile}}}'
                    for j, i in enumerate(picks[n_top:])
                )
                line = json.dumps(rec, ensure_ascii=False)[:-1]
                fh.write(f'{line}, "top_examples": [{top}], "quantile_examples": [{quantile}]}}\n')
            per_layer.append(
                dict(
                    layer=layer,
                    features=n_features,
                    dead=int(is_dead.sum()),
                    dense=0,
                    live=int(n_features - is_dead.sum()),
                    interpretable=0,
                )
            )
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump(
            dict(
                n_train_tokens=10**6,
                per_layer=per_layer,
                detection_threshold=0.8,
                share_live_detection_above=0.5,
                detection_auroc={"q50": 0.7},
            ),
            f,
        )
    return run


def index_records(run):
    """(layer, feature) -> browser.index_record of every feature of an interp folder, in the file's order."""
    with open(run / "features.jsonl", encoding="utf-8") as f:
        return {
            (r["layer"], r["feature"]): browser.index_record(r, viz.DENSE)
            for r in map(json.loads, f)
        }


def first_rows(records, layer=None, key=None, reverse=False, n=200):
    """(layer, feature) of the rows the browser shows first, as its script sorts them: nulls ("-") last
    whichever the direction, ties in the file's order."""
    rows = [k for k in records if layer is None or k[0] == layer]
    if key is not None:
        known = [k for k in rows if records[k][key] != "-"]
        nulls = [k for k in rows if records[k][key] == "-"]
        rows = sorted(known, key=lambda k: float(records[k][key]), reverse=reverse) + nulls
    return rows[:n]


def browser_rows(dom):
    """The cell texts of the rows the browser shows, by (layer, feature)."""
    parser = IndexRows()
    parser.feed(dom)
    return {(int(c[0]), int(c[1])): c for hidden, c in parser.rows if not hidden}


@needs_chromium
def test_browser_at_scale_loads_layers_on_demand(tmp_path):
    """12 layers x 1,024 features (GPT-2-small's CLT has 12 x 24,576) with 1,000 rows in index.html, the
    best; a layer's view, a search and a link's hash read the other rows from index/ on demand."""
    planted = {
        (9, 1000): dict(
            explanation='fires on " zyxquartz" | promotes " Paris"', detection_auroc=0.41
        )
    }
    run = tmp_path / "interp"
    write_synthetic_interp(run, 12, 1024, planted=planted, n_top=2, n_quantile=0)
    index = viz.main(["features", str(run), "--inline-rows", "1000"])
    out = run / "html"
    text = check_page(index)
    records = index_records(run)
    by_auroc = sorted(records, key=lambda k: -float(records[k][6]) if records[k][6] != "-" else 2)
    best = by_auroc[:1000]
    # in the file: the best rows by AUROC, no others
    assert sorted(browser_rows(text)) == sorted(best)
    assert os.path.getsize(index) < 1e6 and "zyxquartz" not in text  # every row inline: ~9 MB
    assert sorted(os.listdir(out / "index")) == [f"layer_{l:02d}.js" for l in range(12)]
    # no hash: the best rows in the file's order, the first 200 shown
    assert shown(chromium_dom(f"file://{index}", tmp_path)) == sorted(best)[:200]
    # a layer: its file is read, every row of it sorted; rows built by the script equal the file's rows
    dom = chromium_dom(f"file://{index}#layer=7&sort=density&dir=asc", tmp_path)
    assert 'data-pending="0"' in dom
    assert shown(dom) == first_rows(records, layer=7, key=4)
    cells = browser_rows(dom)
    assert all(cells[k] == records[k][:11] for k in cells)
    assert any(k not in best for k in cells) and any(k in best for k in cells)
    # a search reads every layer: the planted feature is in none of the rows index.html holds
    dom = chromium_dom(f"file://{index}#q=zyxquartz", tmp_path)
    assert 'data-pending="0"' in dom and shown(dom) == [(9, 1000)]
    assert 'href="L9_F1000.html"' in dom and (out / "L9_F1000.html").is_file()
    # a link reopens its view: layer, sort and direction
    dom = chromium_dom(f"file://{index}#sort=auroc&layer=3", tmp_path)
    assert shown(dom) == first_rows(records, layer=3, key=6, reverse=True)
    assert 'data-key="auroc" data-type="num" data-dir="desc" class="desc"' in dom


def test_browser_opens_on_its_table(tmp_path):
    """The search box, the layer filter and the feature table come first, the summary and its plots
    below; a best concept under F1 0.5 is left blank (it names nothing)."""
    run = tmp_path / "interp"
    run.mkdir()
    rows = [dict(feature(0, 5), concept="country=Fafes", concept_f1=0.9)]
    rows += [dict(feature(1, 3), concept="language=Nu", concept_f1=0.01)]
    (run / "features.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps(dict(n_train_tokens=1000)))
    viz.main(["features", str(run)])
    index = check_page(run / "html" / "index.html")
    at = [index.index(s) for s in ('id="q"', 'id="layer"', 'id="features"', "<h2>Summary")]
    assert at[:2] < [at[2]] * 2 and at[2] < at[3]
    assert "country=Fafes" in index and "language=Nu" not in index

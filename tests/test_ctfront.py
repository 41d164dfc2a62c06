"""Our graph in circuit-tracer's own front end (its local server and its page, circuit-tracer 0.5.0):
graph.py's graph and viz.py's feature files are served at the very URLs that page requests, they
validate against circuit-tracer's pydantic schemas, and in headless Chromium the page's own script asks
our server for them. Skipped without circuit-tracer (CI does not install it) or, for the browser test,
without Chromium.

What the page does (circuit-tracer 0.5.0, frontend/assets/): index.html fetches ./data/graph-metadata.json,
then ./graph_data/{slug}.json; a clicked feature node's examples come from loadFeature(scan, featureIndex)
(feature_examples/init-feature-examples.js), which for a scan starting with "./" fetches
`${scan}/${featureIndex}.json`, featureIndex being the node's "feature" (the Cantor pair). The server
(frontend/local_server.py) answers /data/... and /graph_data/... from --graph_file_dir. The page loads
d3, jetpack, dagre and pako from CDNs: offline it stops right after its first request, so the browser
test checks that request and, only where those CDNs answer, the feature fetch too."""

import functools
import json
import os
import threading
import urllib.request
from urllib.parse import urljoin

import pytest

import graph as G
import viz
from conftest import chromium, needs_chromium
from forge import browser
from test_graph import write_model_and_clt

local_server = pytest.importorskip(
    "circuit_tracer.frontend.local_server",
    reason="circuit-tracer is not installed (pip install circuit-tracer)",
)
from circuit_tracer.frontend import feature_models, graph_models  # noqa: E402 (after the skip)

L, D, F_ = 3, 32, 64
PROMPT = "Tarn is in"


def interp_record(layer, f):
    """One features.jsonl record, as interp.py writes it, with a token that names the feature."""
    name = f" L{layer}F{f}"
    ex = dict(act=2.0, doc=0, pos=1, tokens=[" the", name, " is"], acts=[0.0, 2.0, 0.5], center=1)
    return dict(
        layer=layer,
        feature=f,
        density=0.01,
        max_act=2.0,
        explanation=f"fires on{name}",
        hist=dict(edges=[0.25, 0.5, 1.0, 2.0], counts=[2, 5, 3]),
        top_examples=[ex],
        quantile_examples=[dict(ex, quantile=0.6)],
        promoted=[dict(token=" Paris", logit=1.0)],
        suppressed=[dict(token=" London", logit=-1.0)],
    )


@pytest.fixture
def served(tmp_path, make_hub_model):
    """graph.py + viz.py on a random model and CLT, served by circuit-tracer's own request handler on
    127.0.0.1 -> (base URL, graph folder, the server's log lines)."""
    root = tmp_path / "run"
    write_model_and_clt(root, make_hub_model)
    (root / "interp").mkdir()
    (root / "interp" / "features.jsonl").write_text(
        "".join(json.dumps(interp_record(l, f)) + "\n" for l in range(L) for f in range(F_))
    )
    out = root / "graph"
    G.main(
        [
            "--model",
            str(root / "model"),
            "--clt",
            str(root / "clt"),
            "--prompt",
            PROMPT,
            "--device",
            "cpu",
            "--interp",
            str(root / "interp"),
            "--out",
            str(out),
            "--qk",
            "auto:3",
        ]
    )
    viz.main(["graph", str(out / "graph.json"), "--interp", str(root / "interp")])
    # local_server.serve() with its handler and Server, bound to 127.0.0.1 and a free port instead of ("", 8032)
    handler = functools.partial(
        local_server.CircuitGraphHandler,
        frontend_dir=local_server.DEFAULT_FRONTEND_DIR,
        data_dir=str(out),
    )
    httpd = local_server.ReusableTCPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    server = local_server.Server(httpd, thread)
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", out, server.get_logs()
    server.stop()


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200, url
        return json.loads(r.read())


def test_page_code_reads_what_we_write():
    """The lines of circuit-tracer's page that this file's URLs follow, so a new version that moves
    them fails here rather than silently."""
    assets = local_server.DEFAULT_FRONTEND_DIR
    examples = (assets / "feature_examples" / "init-feature-examples.js").read_text()
    assert "if (scan.startsWith('./')) {" in examples
    assert "util.getFile(`${scan}/${featureIndex}.json`)" in examples
    assert "d.featureIndex = d.feature" in (assets / "attribution_graph" / "util-cg.js").read_text()
    util = (assets / "util.js").read_text()
    # that prefix goes to a CDN: our scan must not use it
    assert "path.startsWith('./features/')" in util
    assert browser.FRONTEND_SCAN.startswith("./data/") and not browser.FRONTEND_SCAN.startswith(
        "./features/"
    )


def test_server_serves_our_graph_and_features(served):
    base, out, _ = served
    page = urljoin(base, "index.html")
    graphs = get_json(urljoin(page, "./data/graph-metadata.json"))["graphs"]
    meta = graph_models.Metadata(**next(g for g in graphs if g["slug"] == "graph"))
    assert meta.scan == browser.FRONTEND_SCAN and meta.prompt == PROMPT
    data = get_json(urljoin(page, "./graph_data/graph.json"))
    assert len(data["qk"]) == 3  # the QK section: the front end's model takes the file as it is
    assert graph_models.Model(**data).nodes and "qk" not in graph_models.Model(**data).model_dump()
    nodes = [graph_models.Node(**n) for n in data["nodes"]]
    feats = [n for n in nodes if n.feature_type == "cross layer transcoder"]
    assert feats and len(os.listdir(out / "features")) == len({n.feature for n in feats})
    for n in feats:  # the URL loadFeature builds, resolved against the page, as the browser does
        feat = feature_models.Model(**get_json(urljoin(page, f"{meta.scan}/{n.feature}.json")))
        layer, index, _ = n.node_id.split("_")
        assert feat.index == int(index) and feat.transcoder_id == "clt"
        assert feat.examples_quantiles[0].examples[0].tokens[1] == f" L{layer}F{index}"


@needs_chromium
def test_page_asks_our_server(served, tmp_path):
    base, out, logs = served
    graph = json.loads((out / "graph.json").read_text())
    node = max(
        (n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"),
        key=lambda n: n["influence_raw"],
    )
    start = len(logs)
    page = f"{base}index.html?slug=graph&clickedId={node['node_id']}"
    logged = ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]
    proc = chromium(tmp_path, *logged, "--dump-dom", page, check=False)
    requests = "\n".join(logs[start:])
    # the page's own script asked our server
    assert "GET /data/graph-metadata.json" in requests, requests
    if "GET /graph_data/graph.json" not in requests:  # offline: its CDN libraries did not load
        assert "d3 is not defined" in proc.stderr, proc.stderr[-2000:]
        return
    assert f"GET {browser.FRONTEND_SCAN[1:]}/{node['feature']}.json" in requests, requests
    layer, index, _ = node["node_id"].split("_")
    assert f"L{layer}F{index}" in proc.stdout  # its examples, rendered

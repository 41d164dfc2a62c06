"""
viz.py: pictures of what the other scripts write: attribution graphs, a feature browser, training
curves.

Data flow (each picture reads one script's output and writes static files beside it):

    graph.py  -> runs/graph/{slug}.json     -> viz.py graph    -> {slug}.dot/.svg/.png/.html +
                                                                  features/{feature}.json, beside it
    interp.py -> runs/interp/features.jsonl -> viz.py features -> runs/interp/html/: index.html,
                                                                  index/, a page a feature
    train.py  -> runs/clt/metrics.jsonl     -> viz.py train    -> runs/clt/plots/*.png, frontier.png

    python viz.py features runs/interp             # first, so the graph can link to the pages
    python viz.py graph runs/graph/graph.json      # nodes link to runs/interp/html/ if it exists
    python viz.py train runs/clt runs/clt2 --out runs/plots   # curves per run + L0-vs-FVU frontier

CPU only, no torch; `viz.py features` renders pages in one process per core (--workers). Pages are
self-contained (inline SVG, CSS and plain JavaScript, no network URLs: they open offline, from
file://); every file is written whole or not at all. How things look is in forge/plots.py (graphviz,
matplotlib) and forge/browser.py (the pages' HTML, the index's rows and script).

The feature index sorts by a click on a column's header and filters by layer and by words of the
explanation or top tokens; the URL's hash keeps the view: index.html#sort=auroc&dir=desc&q=capital
(sort: a column's key, as layer, auroc, f1, flags; layer=: a layer, "all", or none: the best 5,000
rows by AUROC, those index.html holds, --inline-rows; the rest load from index/ as needed).

References: the graph JSON is circuit-tracer's Neuronpedia format (safety-research/circuit-tracer,
frontend/graph_models.py: node_id "{layer}_{feature}_{pos}", errors "{layer}_-1_{pos}", embeddings
"E_{token_id}_{pos}", logits at layer n_layers+1); feature pages follow Neuronpedia / SAEDashboard.
Differences from them:
- the graph is a static graphviz picture, not the D3 app: `dot` lays out a grid (rows = layers,
  columns = token positions), then `neato -n2` draws the edges around the pinned nodes; without
  `dot` the page still lists the nodes;
- feature pages are plain HTML; only the index has a script (sorting and filtering its rows; the
  rows it holds are in the HTML, so it reads without JavaScript too).
"""

import functools
import html
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass

import graphviz
from tqdm import tqdm

from forge import browser, graphfile, interpfile, plots
from forge.browser import feature_page_name, fmt, show_token, table_html, write_file
from forge.cli import arg, parse_config, run_main
from forge.files import check_committed, commit, one_writer, read_json, read_jsonl

# -----------------------------------------------------------------------------
# config: one dataclass per subcommand; `inputs` (a list) takes the positional arguments


@dataclass
class GraphConfig:
    """draw an attribution graph (graph.py's JSON): .dot, .svg, .png and a page with its nodes"""

    inputs: list = arg([], "the graph.json to draw (one)")
    out: str = arg("", 'output folder; "" = beside the graph.json')
    interp: str = arg("", 'interp.py\'s output (features.jsonl, html/); "" = <graph>/../interp')
    features: str = arg("", 'folder of feature pages to link nodes to; "" = <interp>/html')
    max_nodes: int = arg(60, "nodes drawn besides embeddings and logits, most influential first")
    max_edges: int = arg(150, "edges drawn, strongest |weight| first")
    label_chars: int = arg(36, "characters of a feature's label shown in its node")
    cell_width: int = arg(3, "nodes side by side in one (layer, position) cell before it wraps")
    supernodes: bool = arg(True, "graph.py's supernodes drawn as one box each; else features")


@dataclass
class FeaturesConfig:
    """a page per live feature and a sortable, searchable index of them, from interp.py's output"""

    inputs: list = arg([], "interp.py's output folder (one)")
    out: str = arg("", 'output folder; "" = <interp dir>/html')
    max_examples: int = arg(20, "max-activating examples shown per page")
    top_tokens: int = arg(10, "promoted / suppressed tokens and input n-grams shown per page")
    dense: float = arg(-1.0, "flag as dense above this share of tokens; -1 = interp's --dense")
    inline_rows: int = arg(5000, "rows in index.html, best detection AUROC first; more per layer")
    workers: int = arg(0, "processes writing feature pages; 0 = one per CPU core")


@dataclass
class CurvesConfig:
    """training curves of train.py runs (a PNG per panel) and their L0-vs-FVU frontier"""

    inputs: list = arg([], "train.py run folders (one or more)")
    out: str = arg("", 'output folder; "" = <run>/plots for each run')
    dpi: int = arg(110, "resolution of the PNGs")


DENSE = 0.1  # interp.py's default --dense, for an interp folder without summary.json
PAGE_CHUNK = 2048  # features.jsonl lines a worker turns into pages at once (~60 MB, one sync)

# -----------------------------------------------------------------------------
# attribution graph -> dot / svg / png / html


def load_graph(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no graph file at {path!r}; write one with `python graph.py`")
    graph = read_json(path, "rerun graph.py")
    missing = [k for k in ("nodes", "links") if k not in graph]
    if missing:
        raise ValueError(f"{path!r} is not a node-link graph: no {missing}, has {sorted(graph)}")
    rerun = f"python graph.py --out {os.path.dirname(path) or '.'}"
    check_committed(path, graph.get("metadata", {}).get("run_id"), rerun)  # not half a run
    return graph


def draw_graph(cfg):
    """graph.json -> {slug}.dot, .svg, .png (with graphviz's dot), .html beside it; the paths."""
    if len(cfg.inputs) != 1:
        raise ValueError(f"`viz.py graph` takes one graph.json, got {cfg.inputs}")
    path = cfg.inputs[0]
    graph = load_graph(path)
    out = out_dir("graph", cfg)
    os.makedirs(out, exist_ok=True)
    interp_dir = cfg.interp or os.path.join(os.path.dirname(os.path.abspath(path)), "..", "interp")
    interpfile.check_for_graph(interp_dir, bool(cfg.interp), graph.get("metadata", {}))
    feat_dir = cfg.features or os.path.join(interp_dir, "html")

    def href(layer, feature):
        page = os.path.join(feat_dir, feature_page_name(layer, feature))
        return os.path.relpath(page, out) if os.path.isfile(page) else None

    stem = os.path.join(out, os.path.splitext(os.path.basename(path))[0])  # graph.py's {slug}.json
    run_id = browser.begin_graph(out, stem, graph, interp_dir, feat_dir, cfg)  # off commit.json
    written = [stem + ".dot", stem + ".html"]
    written += browser.write_frontend_features(graph, interp_dir, out)
    has_dot = shutil.which("dot") is not None  # without it: the .dot and the page's node table
    # pass 1: `dot` places the grid; pass 2: the nodes pinned there, `neato -n2` routes the edges
    drawn = plots.collapse_supernodes(graph) if cfg.supernodes else graph
    layout = dot_positions(build_dot(drawn, cfg, href, links=False)) if has_dot else {}
    g = build_dot(drawn, cfg, href, pos_of=layout)
    write_file(stem + ".dot", g.source)
    svg = None
    if has_dot:
        svg = g.pipe(format="svg", engine="neato", neato_no_op=2, encoding="utf-8")
        write_file(stem + ".svg", svg)
        write_file(stem + ".png", g.pipe(format="png", engine="neato", neato_no_op=2))
        written += [stem + ".svg", stem + ".png"]
    labelled = graph.get("qk") and os.path.isfile(os.path.join(interp_dir, "features.jsonl"))
    explanations = graphfile.load_explanations(interp_dir) if labelled else {}  # the pairs' labels
    plots.write_graph_page(stem, graph, cfg, svg, href, explanations, run_id)
    commit(out, run_id, [os.path.relpath(p, out) for p in written])  # last: one run's drawing
    print(f"wrote {stem}.dot, .svg, .png, .html" if has_dot else plots.NO_DOT.format(stem=stem))
    return written


def build_dot(graph, cfg, href=None, pos_of=None, links=True):
    """The picture as a graphviz Digraph; href(layer, feature) is a feature node's link or None.
    With `pos_of` (node -> (x, y) in points, from `dot` on the grid alone: links=False) every node
    is pinned, for `neato -n2` to route the edges around them (`dot` routes them in wide loops)."""
    nodes, kept, imp = select_subgraph(graph, cfg)
    heads, head_edges = plots.qk_heads(graph)  # graph.py --qk's explained heads, at their queries
    nodes += heads
    imp |= dict.fromkeys((n["node_id"] for n in heads), 0.5)
    meta = graph.get("metadata", {})
    attrs = dict(plots.GRAPH, label=plots.text(f"Attribution graph: {meta.get('prompt', '')}"))
    g = graphviz.Digraph("attribution_graph", graph_attr=attrs, **plots.STYLES)
    ranks = grid_ranks(nodes, imp, cfg.cell_width)
    plots.grid(g, ranks, imp, meta.get("prompt_tokens") or [], cfg.label_chars, href, pos_of or {})
    wmax = max((abs(l["weight"]) for l in kept), default=1.0) or 1.0
    for l in kept if links else []:  # constraint=false: only the grid places nodes
        w = l["weight"]
        color = plots.POS_COLOR if w >= 0 else plots.NEG_COLOR
        width = f"{0.4 + 4.0 * abs(w) / wmax:.2f}"
        tip = f"{l['source']} -> {l['target']}: {w:+.3g}"
        attrs = dict(color=color, penwidth=width, constraint="false", tooltip=tip)
        g.edge(l["source"], l["target"], **attrs)
    for key, head, attrs in head_edges if links else []:
        g.edge(key, head, **attrs)
    return g


def dot_positions(g):
    """node name -> (x, y) in points, from laying out `g` with dot (its JSON output)."""
    objects = json.loads(g.pipe(format="json", engine="dot")).get("objects", [])
    return {o["name"]: tuple(map(float, o["pos"].split(","))) for o in objects if "pos" in o}


def select_subgraph(graph, cfg):
    """Keep all embeddings and logits, the `max_nodes` most influential other nodes, and the
    `max_edges` strongest links between kept nodes."""
    nodes = graph["nodes"]
    imp = importance(nodes)
    always = [n for n in nodes if n["feature_type"] in ("embedding", "logit")]
    rest = sorted((n for n in nodes if n not in always), key=lambda n: -imp[n["node_id"]])
    keep = {n["node_id"] for n in always + rest[: cfg.max_nodes]}
    links = [l for l in graph["links"] if l["source"] in keep and l["target"] in keep]
    links = sorted(links, key=lambda l: -abs(l["weight"]))[: cfg.max_edges]
    return [n for n in nodes if n["node_id"] in keep], links, imp


def importance(nodes):
    """Node size in [0, 1] for features and errors (embeddings, logits: 0.5), by influence rank."""
    inner = [n for n in nodes if n["feature_type"] not in ("embedding", "logit")]
    order = sorted(inner, key=plots.influence_order)
    imp = {n["node_id"]: 0.5 for n in nodes}
    imp.update({n["node_id"]: 1 - i / max(len(order) - 1, 1) for i, n in enumerate(order)})
    return imp


def grid_row(node):
    """The picture's row of a node: -1 for embeddings, the layer of features/errors, big: logits."""
    if node["feature_type"] == "embedding" or str(node["layer"]) == "E":
        return -1
    return 10**6 if node["feature_type"] == "logit" else int(node["layer"])


def grid_ranks(nodes, imp, cell_width):
    """[(row, {pos: nodes})], bottom to top: a rank per row (the embedding row always), more where a
    (row, position) cell holds more than cell_width nodes, the most influential lowest."""
    ranks = []
    for r in sorted({-1} | {grid_row(n) for n in nodes}):
        cells = {}
        for n in sorted((n for n in nodes if grid_row(n) == r), key=lambda n: -imp[n["node_id"]]):
            cells.setdefault(n["ctx_idx"], []).append(n)
        depth = max([math.ceil(len(c) / cell_width) for c in cells.values()] + [1])
        for k in range(depth):
            rank = {p: c[k * cell_width : (k + 1) * cell_width] for p, c in cells.items()}
            ranks.append((r, rank))
    return ranks


# -----------------------------------------------------------------------------
# the feature browser: a page per feature and the index, whatever their number


def feature_page(feat, cfg):
    """One feature's page body, from one record of interp.py's features.jsonl."""
    top = (feat.get("top_examples") or [])[: cfg.max_examples]
    amax = feat.get("max_act") or max((max(e["acts"], default=0.0) for e in top), default=0.0)
    hist = feat.get("hist") or {}
    ngrams = (feat.get("input_ngrams") or [])[: cfg.top_tokens]
    ngrams = [dict(r, ngram=show_token(r.get("ngram", ""))) for r in ngrams]
    title = f"Layer {int(feat['layer'])} / feature {int(feat['feature'])}"
    skip = ("layer", "feature", "explanation", "run_id")
    stats = {k: v for k, v in feat.items() if k not in skip and browser.is_scalar(v)}
    stats.update(feat.get("quantiles") or {})  # the scalar fields (density, scores), the quantiles
    body = [
        f'<p><a href="index.html">all features</a></p><h1>{title}</h1>',
        f"<p><b>Explanation:</b> {html.escape(str(feat.get('explanation') or '(none)'))}</p>",
        f"<p>What sets it apart: {html.escape(str(feat.get('label') or '(none)'))}</p>",
        f"<div class='cols'><div><h2>Statistics and scores</h2>{table_html(stats)}</div>",
        "<div><h2>Activation histogram (when active; log-spaced bins)</h2>",
        browser.svg_histogram(hist.get("counts", []), hist.get("edges", [])),
        f"<p class='muted'>density {fmt(feat.get('density'))}</p></div></div><div class='cols'>",
        browser.token_table(feat.get("promoted") or [], "Promoted tokens", cfg.top_tokens),
        browser.token_table(feat.get("suppressed") or [], "Suppressed tokens", cfg.top_tokens),
        f"<div><h2>Input n-grams</h2>{table_html(ngrams) if ngrams else '-'}</div></div>",
        f"<h2>Top activations (max {amax:.3g})</h2>",
    ]
    body += [browser.example_html(e, amax) for e in top]
    quant = feat.get("quantile_examples") or []
    if quant:
        body.append("<h2>Examples across the activation range</h2>")
        body += [browser.example_html(e, amax) for e in quant]
    return "".join(body)


def write_pages(lines, cfg, dense, out, run_id):
    """One chunk of features.jsonl's lines: the pages of its live features, on disk when this
    returns, and [(index record, detection AUROC)] of all its features. What each worker does."""
    rows = []
    with browser.FileBatch() as pages:
        for feat in map(json.loads, lines):
            if not browser.is_dead(feat):  # a dead feature has nothing to show
                title = f"L{feat['layer']}/F{feat['feature']}"
                page = os.path.join(out, feature_page_name(feat["layer"], feat["feature"]))
                pages.add(page, browser.page_html(title, feature_page(feat, cfg), run_id))
            rows.append((browser.index_record(feat, dense), feat.get("detection_auroc")))
    return rows


def draw_features(cfg):
    """Stream features.jsonl: a page per live feature, the index's rows (in index/ too when
    index.html holds only the best), then index.html."""
    if len(cfg.inputs) != 1:
        raise ValueError(f"`viz.py features` takes interp.py's output folder, got {cfg.inputs}")
    run_dir = cfg.inputs[0]
    path = interpfile.open_features(run_dir)  # refused if a killed run left it
    summary = {}
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        summary = read_json(os.path.join(run_dir, "summary.json"), "rerun interp.py")
    dense = cfg.dense if cfg.dense >= 0 else (summary.get("config") or {}).get("dense", DENSE)
    out = out_dir("features", cfg)
    os.makedirs(out, exist_ok=True)
    run_id = browser.begin_pages(out, run_dir, cfg)  # off commit.json until commit_pages
    workers = cfg.workers if cfg.workers > 0 else os.cpu_count() or 1
    index = browser.IndexRows(out, cfg.inline_rows, run_id)
    pages = functools.partial(write_pages, cfg=cfg, dense=dense, out=out, run_id=run_id)
    bar = tqdm(total=browser.count_lines(path), desc="feature pages", unit=" features")
    with open(path, encoding="utf-8") as f, bar:
        for rows in browser.map_in_order(pages, browser.chunks(f, PAGE_CHUNK), workers):
            for rec, auroc in rows:
                index.add(rec, auroc)
            bar.update(len(rows))
    index.write()
    page = browser.index_page(index, browser.summary_html(summary, run_dir))
    write_file(os.path.join(out, "index.html"), browser.page_html("Features", page, run_id))
    browser.commit_pages(out, run_id, index)  # last: the folder is one run's, strays removed
    files = f" and {len(index.files)} layer files in index/" if index.files else ""
    print(f"wrote {index.n - index.n_dead} feature pages, index.html{files} to {out}")
    return os.path.join(out, "index.html")


# -----------------------------------------------------------------------------
# training curves (matplotlib)

SPLICED = {  # train.py's held-out cross-entropies, "eval" in metrics.jsonl
    "eval.ce_clean": "clean GPT",
    "eval.ce_spliced": "CLT spliced in",
    "eval.ce_open": "CLT spliced, open loop",
    "eval.ce_zero": "MLPs zeroed",
}
RECOVERED = {"eval.recovered": "spliced", "eval.recovered_open": "open loop"}
TRAIN_PANELS = [  # (file, title, {metrics.jsonl key: legend label}, log y)
    ("loss", "loss and its terms", {k: k for k in "loss mse sparsity preact aux".split()}, True),
    ("fvu", "FVU per layer", {"fvu": ""}, True),
    ("l0", "L0 (active features per token) per layer", {"l0": ""}, False),
    ("dead", "dead features per layer", {"dead": ""}, False),
    ("spliced", "held-out cross-entropy", SPLICED, False),
    ("recovered", "fraction of CE recovered: (zero - spliced) / (zero - clean)", RECOVERED, False),
]


def load_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path!r}; write it with `python train.py --out {run_dir}`")
    rows = list(read_jsonl(path, f"resume or rerun `python train.py --out {run_dir}`"))
    if not rows:
        raise ValueError(f"{path!r} has no rows")
    return rows


def draw_train(cfg):
    """Per run: a PNG per panel in <run>/plots (or --out/<run name>); then the L0-FVU frontier."""
    if not cfg.inputs:
        raise ValueError("`viz.py train` takes train.py run folders, e.g. `viz.py train runs/clt`")
    written = []
    points = []  # (run name, final L0, final FVU)
    for run in cfg.inputs:
        rows = load_metrics(run)
        name = os.path.basename(os.path.normpath(run))
        out = os.path.join(cfg.out, name) if cfg.out else os.path.join(run, "plots")
        os.makedirs(out, exist_ok=True)
        for fname, title, keys, logy in TRAIN_PANELS:
            path = os.path.join(out, f"{fname}.png")
            if plots.curves(path, rows, keys, f"{title} ({name})", logy, cfg.dpi):
                written.append(path)
        points.append((name, plots.final(rows, "l0"), plots.final(rows, "fvu")))
    frontier = os.path.join(cfg.out or os.path.join(cfg.inputs[0], "plots"), "frontier.png")
    plots.frontier(points, frontier, cfg.dpi)
    print(f"wrote {len(written)} plots and {frontier}")
    return written + [frontier]


# -----------------------------------------------------------------------------
# main

COMMANDS = {"graph": GraphConfig, "features": FeaturesConfig, "train": CurvesConfig}
DEFAULT_OUT = {"graph": "..", "features": "html", "train": "plots"}  # from the (first) input


def out_dir(command, cfg):
    """The folder a command writes: --out, else DEFAULT_OUT of its (first) input; None: no input."""
    default = cfg.inputs and os.path.join(os.path.abspath(cfg.inputs[0]), DEFAULT_OUT[command])
    return cfg.out or (os.path.normpath(default) if default else None)


def main(argv=None):
    command, cfg = parse_config(__doc__, COMMANDS, argv)
    print(command, asdict(cfg))
    draw = {"graph": draw_graph, "features": draw_features, "train": draw_train}[command]
    with one_writer(out_dir(command, cfg), f"viz.py {command}"):  # one run in a folder
        return draw(cfg)


if __name__ == "__main__":
    run_main(main)

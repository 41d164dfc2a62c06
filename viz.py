"""
viz.py: pictures of what the other scripts write: attribution graphs, a feature browser, training
curves.

Data flow (each picture reads one script's output and writes static files beside it):

    graph.py  -> runs/graph/{slug}.json     -> viz.py graph    -> {slug}.dot/.svg/.png/.html +
                                                                  features/{feature}.json, beside it
    interp.py -> runs/interp/features.jsonl -> viz.py features -> runs/interp/html/: index.html,
                                                                  index/, a page a feature
    train.py  -> runs/clt/metrics.jsonl     -> viz.py train    -> runs/clt/plots/*.png, frontier.png

    python viz.py --help
    python viz.py features runs/interp             # first, so the graph can link to the pages
    python viz.py graph runs/graph/graph.json      # nodes link to runs/interp/html/ if it exists
    python viz.py train runs/clt runs/clt2 --out runs/plots   # curves per run + L0-vs-FVU frontier

CPU only; nothing here needs torch or torchrun (`viz.py features` renders pages in one process per
core, --workers). Every page is self-contained (inline SVG, CSS and plain JavaScript, no network
URLs), so the folders can be zipped and opened offline, from file://. Every file is written whole or
not at all. forge/browser.py holds the machinery: the index's rows and layer files, its script and
CSS (forge/static/), the feature files for circuit-tracer's front end (`python -m circuit_tracer
start-server --graph_file_dir runs/graph`).

The feature index is a browser: one row per feature, sortable by any column (click its header),
filtered by layer and by words that must all occur in the explanation or the top tokens. The view
lives in the URL's hash, so a link reopens it: index.html#sort=auroc&dir=desc&layer=2&q=capital
(sort: layer, feature, explanation, tokens, density, max_act, auroc, fuzzing, concept, f1, flags;
layer: a layer, "all", or none: the rows index.html holds). index.html holds the best 5,000 rows
by detection AUROC (--inline-rows); the page reads each layer's rows from index/ when a view needs
them.

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
import matplotlib
import matplotlib.ticker
from matplotlib.figure import Figure  # no pyplot: Agg canvases, no window, no global backend
from tqdm import tqdm

from forge import browser
from forge.browser import feature_index, feature_page_name, fmt, show_token, table_html, write_file
from forge.cli import arg, parse_config, run_main
from forge.files import atomic_path

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
    label_chars: int = arg(26, "characters of a feature's explanation shown in its node")
    cell_width: int = arg(3, "nodes side by side in one (layer, position) cell before it wraps")


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

POS_COLOR = "#2b6cb0"  # edge colour of a positive weight
NEG_COLOR = "#c53030"  # and of a negative one
FILL = {  # a node's colour by its feature_type
    "cross layer transcoder": "#fdebc8",
    "mlp reconstruction error": "#e2e2e2",
    "embedding": "#d8ecd2",
    "logit": "#d3e3f6",
}
GRAPH = dict(rankdir="BT", newrank="true", ranksep="0.55", nodesep="0.12", splines="true")


def load_graph(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no graph file at {path!r}; write one with `python graph.py`")
    with open(path) as f:
        graph = json.load(f)
    missing = [k for k in ("nodes", "links") if k not in graph]
    if missing:
        raise ValueError(f"{path!r} is not a node-link graph: no {missing}, has {sorted(graph)}")
    return graph


def draw_graph(cfg):
    """graph.json -> {slug}.dot, .svg, .png (with graphviz's dot), .html beside it; the paths."""
    if len(cfg.inputs) != 1:
        raise ValueError(f"`viz.py graph` takes one graph.json, got {cfg.inputs}")
    path = cfg.inputs[0]
    graph = load_graph(path)
    out = cfg.out or os.path.dirname(os.path.abspath(path))
    os.makedirs(out, exist_ok=True)
    interp_dir = cfg.interp or os.path.join(os.path.dirname(os.path.abspath(path)), "..", "interp")
    feat_dir = cfg.features or os.path.join(interp_dir, "html")

    def href(layer, feature):
        page = os.path.join(feat_dir, feature_page_name(layer, feature))
        return os.path.relpath(page, out) if os.path.isfile(page) else None

    stem = os.path.join(out, os.path.splitext(os.path.basename(path))[0])  # graph.py's {slug}.json
    written = [stem + ".dot", stem + ".html"]
    written += browser.write_frontend_features(graph, interp_dir, out)
    if shutil.which("dot") is None:
        write_file(stem + ".dot", build_dot(graph, cfg, href).source)
        page = graph_page(graph, cfg, None, stem, href)
        browser.write_page(stem + ".html", "Attribution graph", page)
        print(
            f"wrote {stem}.dot and {stem}.html (the nodes, no picture); graphviz's `dot` is not "
            "installed, so no SVG/PNG. Install it with `apt-get install graphviz` (Debian/Ubuntu), "
            "`brew install graphviz` (macOS) or `conda install graphviz`, then rerun this command "
            f"(or `dot -Tsvg {stem}.dot -o {stem}.svg`)."
        )
        return written
    layout = dot_positions(build_dot(graph, cfg, href, links=False))  # pass 1: dot places the grid
    g = build_dot(graph, cfg, href, pos_of=layout)  # pass 2: pinned nodes, neato -n2 routes edges
    write_file(stem + ".dot", g.source)
    svg = g.pipe(format="svg", engine="neato", neato_no_op=2, encoding="utf-8")
    write_file(stem + ".svg", svg)
    write_file(stem + ".png", g.pipe(format="png", engine="neato", neato_no_op=2))
    page = graph_page(graph, cfg, browser.inline_svg(svg), stem, href)
    browser.write_page(stem + ".html", "Attribution graph", page)
    print(f"wrote {stem}.dot, .svg, .png, .html")
    return written + [stem + ".svg", stem + ".png"]


def build_dot(graph, cfg, href=None, pos_of=None, links=True):
    """The picture as a graphviz Digraph; href(layer, feature) gives a feature node's link or None.
    Two passes: `dot` lays out the grid alone (links=False), then with `pos_of` (node -> (x, y) in
    points from that pass) every node is pinned and the invisible layout edges are dropped, for
    `neato -n2` to route the real edges around the nodes (`dot` itself routes edges that do not take
    part in ranking in wide loops)."""
    nodes, kept, imp = select_subgraph(graph, cfg)
    meta = graph.get("metadata", {})
    title = _text(f"Attribution graph: {meta.get('prompt', '')}")
    attrs = dict(GRAPH, fontname="Helvetica", label=title, labelloc="t", fontsize="16")
    styles = dict(node_attr=dict(fontname="Helvetica"), edge_attr=dict(arrowsize="0.5"))
    g = graphviz.Digraph("attribution_graph", graph_attr=attrs, **styles)
    _grid(g, nodes, imp, meta.get("prompt_tokens") or [], cfg, href, pos_of or {})
    wmax = max((abs(l["weight"]) for l in kept), default=1.0) or 1.0
    for l in kept if links else []:  # constraint=false: only the grid places nodes
        w = l["weight"]
        color = POS_COLOR if w >= 0 else NEG_COLOR
        width = f"{0.4 + 4.0 * abs(w) / wmax:.2f}"
        tip = f"{l['source']} -> {l['target']}: {w:+.3g}"
        attrs = dict(color=color, penwidth=width, constraint="false", tooltip=tip)
        g.edge(l["source"], l["target"], **attrs)
    return g


def dot_positions(g):
    """node name -> (x, y) in points, from laying out `g` with dot (its JSON output)."""
    objects = json.loads(g.pipe(format="json", engine="dot")).get("objects", [])
    return {o["name"]: tuple(map(float, o["pos"].split(","))) for o in objects if "pos" in o}


def select_subgraph(graph, cfg):
    """Keep all embeddings and logits, the `max_nodes` most influential other nodes, and the
    `max_edges` strongest links between kept nodes."""
    nodes = graph["nodes"]
    imp = _importance(nodes)
    always = [n for n in nodes if n["feature_type"] in ("embedding", "logit")]
    rest = sorted((n for n in nodes if n not in always), key=lambda n: -imp[n["node_id"]])
    keep = {n["node_id"] for n in always + rest[: cfg.max_nodes]}
    links = [l for l in graph["links"] if l["source"] in keep and l["target"] in keep]
    links = sorted(links, key=lambda l: -abs(l["weight"]))[: cfg.max_edges]
    return [n for n in nodes if n["node_id"] in keep], links, imp


def _importance(nodes):
    """Node size in [0, 1] for features and errors (embeddings, logits: 0.5), by influence rank."""
    inner = [n for n in nodes if n["feature_type"] not in ("embedding", "logit")]
    order = sorted(inner, key=_influence_order)
    imp = {n["node_id"]: 0.5 for n in nodes}
    imp.update({n["node_id"]: 1 - i / max(len(order) - 1, 1) for i, n in enumerate(order)})
    return imp


def _influence_order(node):
    """Sort key, most influential first. graph.py writes "influence_raw" (bigger = more influential)
    and circuit-tracer's "influence", a *cumulative* share (most influential first, so smaller =
    more); without either, |activation|."""
    if node.get("influence_raw") is not None:
        return -node["influence_raw"]
    if node.get("influence") is not None:
        return node["influence"]
    return -abs(node.get("activation") or 0)


def _row(node):
    """The picture's row of a node: -1 for embeddings, the layer of features/errors, big: logits."""
    if node["feature_type"] == "embedding" or str(node["layer"]) == "E":
        return -1
    return 10**6 if node["feature_type"] == "logit" else int(node["layer"])


def _text(s, n=None):
    """User text for a dot label: cut to n characters, backslashes made literal (graphviz.escape)"""
    s = str(s).translate(browser.VISIBLE)
    return graphviz.escape(s if n is None or len(s) <= n else s[: n - 1] + "…")


def _node_name(node):
    """How the page names a node: L1/3 for a feature, err L0, an embedding's token, a logit's."""
    ft = node["feature_type"]
    if ft == "cross layer transcoder":
        return f"L{node['layer']}/{feature_index(node)}"
    if ft == "mlp reconstruction error":
        return f"err L{node['layer']}"
    return str(node.get("clerp") or node["node_id"])


def _link(node, href):
    """A feature node's page, href(layer, feature) (None where there is none); other nodes: None."""
    if href is None or node["feature_type"] != "cross layer transcoder":
        return None
    return href(int(node["layer"]), feature_index(node))


def _tooltip(node):
    """Hover text: the node, where it is, its activation, then its explanation on its own line."""
    act = node.get("activation")
    head = f"{_node_name(node)} at position {node['ctx_idx']}"
    head += f", activation {act:.3g}" if act is not None else ""
    clerp = node.get("clerp") or ""
    if not clerp or node["feature_type"] != "cross layer transcoder":  # others: clerp is the name
        return _text(head)
    return graphviz.nohtml(f"{_text(head)}\\n{_text(clerp)}")  # \n: dot's line break; "<|" is text


def _node_attrs(node, s, tokens, cfg, href):
    """Label, shape and size of one node; s in [0, 1] is its importance."""
    ft = node["feature_type"]
    pos = node["ctx_idx"]
    attrs = dict(style="filled,rounded", shape="box", fillcolor=FILL.get(ft, "white"))
    attrs.update(tooltip=_tooltip(node), width=f"{0.5 + 1.0 * s:.2f}")
    attrs.update(height=f"{0.3 + 0.35 * s:.2f}", fontsize=f"{9 + 4 * s:.1f}")
    if ft == "embedding":  # the token axis: as narrow as its token
        token = show_token(tokens[pos]) if pos < len(tokens) else f"pos {pos}"
        attrs.update(label=_text(token), width="0.3")
    elif ft == "logit":
        attrs["label"] = _text(node.get("clerp") or f"logit {node['feature']}")
        attrs["penwidth"] = "2.5" if node.get("is_target_logit") else "1"
    elif ft == "mlp reconstruction error":
        attrs.update(label=f"err L{node['layer']}", style="filled,dashed", shape="octagon")
    else:
        clerp = node.get("clerp") or ""
        attrs["label"] = _node_name(node) + (f"\\n{_text(clerp, cfg.label_chars)}" if clerp else "")
        if href:
            attrs.update(URL=href, target="_top")
    return attrs


def _empty_cell(row, pos, tokens):
    """An invisible grid placeholder; on the embedding row, the token itself in grey (the axis)."""
    if row == -1 and pos < len(tokens):
        return dict(label=_text(show_token(tokens[pos])), shape="plaintext", fontcolor="#888888")
    return dict(label="", shape="point", style="invis")


def _legend():
    """The key (a graphviz HTML-like label): node colours, edge colours, what the sizes say."""
    line = '<TD><FONT COLOR="{}">━━</FONT></TD>'
    keys = [(f'<TD BGCOLOR="{c}"> </TD>', t) for t, c in FILL.items()]
    keys += [(line.format(POS_COLOR), "positive edge"), (line.format(NEG_COLOR), "negative edge")]
    rows = "".join(f'<TR>{key}<TD ALIGN="LEFT">{text}</TD></TR>' for key, text in keys)
    rows += '<TR><TD COLSPAN="2" ALIGN="LEFT">width ∝ |weight|, node size ∝ influence</TD></TR>'
    return f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="2">{rows}</TABLE>>'


def _ranks(nodes, imp, cell_width):
    """[(row, {pos: nodes})], bottom to top: one rank per row (the embedding row, the token axis,
    always), or several when a (row, position) cell holds more than cell_width nodes, the most
    influential lowest."""
    ranks = []
    for r in sorted({-1} | {_row(n) for n in nodes}):
        cells = {}
        for n in sorted((n for n in nodes if _row(n) == r), key=lambda n: -imp[n["node_id"]]):
            cells.setdefault(n["ctx_idx"], []).append(n)
        depth = max([math.ceil(len(c) / cell_width) for c in cells.values()] + [1])
        for k in range(depth):
            rank = {p: c[k * cell_width : (k + 1) * cell_width] for p, c in cells.items()}
            ranks.append((r, rank))
    return ranks


def _node(sub, name, pos_of, **attrs):
    """Add a node, pinned where the layout pass put it (pos_of is empty before that pass)."""
    if name in pos_of:
        attrs["pos"] = f"{pos_of[name][0]:.1f},{pos_of[name][1]:.1f}!"
    sub.node(name, **attrs)


def _grid(g, nodes, imp, tokens, cfg, href, pos_of):
    """Rows and columns, the part of the picture `dot` lays out: a rank=same subgraph per rank (an
    invisible left-to-right chain orders it by position; empty cells get placeholders), a row-label
    spine stacking the ranks, and invisible same-group edges making each position a column."""
    n_pos = max(len(tokens), 1 + max((n["ctx_idx"] for n in nodes), default=0))
    heads = {}  # (rank, pos) -> first node of the cell
    ranks = _ranks(nodes, imp, cfg.cell_width)
    for i, (r, cells) in enumerate(ranks):
        with g.subgraph(name=f"row_{i}") as sub:
            sub.attr(rank="same")
            chain = [f"rowlabel_{i}"]
            more = i > 0 and ranks[i - 1][0] == r  # a wrapped row's continuation: its label in grey
            label = {-1: "Emb", 10**6: "Logits"}.get(r, f"L{r}")
            style = dict(shape="plaintext", fontsize="14", fontcolor="#aaaaaa" if more else "black")
            _node(sub, chain[0], pos_of, label=label, **style)
            for pos in range(n_pos):
                cell = cells.get(pos, [])
                if not cell:  # keep the grid: an empty cell still takes a column slot
                    chain.append(f"cell_{i}_{pos}")
                    empty = _empty_cell(r, pos, tokens)
                    if not pos_of or empty.get("style") != "invis":  # pinned: no router obstacles
                        _node(sub, chain[-1], pos_of, group=f"pos{pos}", **empty)
                for n in cell:
                    attrs = _node_attrs(n, imp[n["node_id"]], tokens, cfg, _link(n, href))
                    _node(sub, n["node_id"], pos_of, group=f"pos{pos}", **attrs)
                    chain.append(n["node_id"])
                heads[i, pos] = chain[-len(cell) or -1]
            if i == len(ranks) - 1:
                _node(sub, "legend", pos_of, label=_legend(), shape="plaintext", fontsize="10")
                chain.append("legend")
            for a, b in zip(chain, chain[1:]) if not pos_of else []:  # pinned: no layout edges
                sub.edge(a, b, style="invis")
        if i > 0 and not pos_of:
            g.edge(f"rowlabel_{i - 1}", f"rowlabel_{i}", style="invis", weight="20")
            for pos in range(n_pos):
                g.edge(heads[i - 1, pos], heads[i, pos], style="invis", weight="8")


def graph_page(graph, cfg, svg, stem, href):
    """The page: prompt, scores, the picture (or how to get one), the table of every node."""
    meta = graph.get("metadata", {})
    toks = [f"<code>{html.escape(show_token(t))}</code>" for t in meta.get("prompt_tokens", [])]
    info = {k: v for k, v in (meta.get("info") or {}).items() if isinstance(v, (int, float, str))}
    body = [f"<h1>Attribution graph</h1><p>Prompt: {html.escape(str(meta.get('prompt', '')))}</p>"]
    body += [f"<p>Tokens: {' '.join(toks)}</p>", table_html(info) if info else ""]
    if svg is None:
        body.append(
            "<p><b>No picture:</b> graphviz's <code>dot</code> is not installed. Install it "
            "(apt-get install graphviz, brew install graphviz or conda install graphviz), then "
            f"rerun <code>python viz.py graph {html.escape(stem)}.json</code>.</p>"
        )
    else:
        body.append(
            f"<p>{len(graph['nodes'])} nodes and {len(graph['links'])} links in the file; drawn: "
            f"every embedding and logit, the {cfg.max_nodes} most influential other nodes, the "
            f"{cfg.max_edges} strongest edges. Click a feature to open its page; hover a node for "
            "its explanation, an edge for its weight.</p>"
            f"<div class='scroll'><div>{svg}</div></div>"
        )
    body += ["<h2>Nodes, most influential first</h2>", node_table(graph, href)]
    return "".join(body)


def node_table(graph, href):
    """Every node of the (pruned) graph, most influential first, features linked to their pages."""
    tokens = graph.get("metadata", {}).get("prompt_tokens") or []
    rows = []
    for n in sorted(graph["nodes"], key=_influence_order):
        link = _link(n, href)
        name = html.escape(_node_name(n))
        pos = n["ctx_idx"]
        token = html.escape(show_token(tokens[pos])) if pos < len(tokens) else ""
        cells = [f'<a href="{html.escape(link)}">{name}</a>' if link else name]
        cells += [html.escape(n["feature_type"]), html.escape(str(n["layer"]))]
        cells += [f"{pos} <code>{token}</code>"]
        cells += [fmt(n.get(k)) for k in ("activation", "influence_raw", "influence")]
        cells += [html.escape(str(n.get("clerp") or "")) if n["feature_type"] != "logit" else ""]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    heads = ["node", "type", "layer", "position", "activation", "influence"]
    heads += ["cumulative influence", "explanation"]
    head = "".join(f"<th>{h}</th>" for h in heads)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


# -----------------------------------------------------------------------------
# feature pages (HTML)

SHADES = [f"background:rgba(255,140,0,{k / 100:.2f});" for k in range(101)]  # act / max, in %


def _stats(feat):
    """The scalar fields of a feature record (density, scores, ...), and its quantiles."""
    skip = {"layer", "feature", "explanation"}
    out = {k: v for k, v in feat.items() if k not in skip and browser.is_scalar(v)}
    out.update(feat.get("quantiles") or {})
    return out


@functools.lru_cache(maxsize=1 << 17)
def _token_html(tok):
    """A token of an example as the page shows it, escaped. Cached: the pages of a CLT show ~260
    tokens each, out of a vocabulary of ~50k, and rendering them is most of `viz.py features`'
    time."""
    return html.escape(show_token(tok))


def _example_html(ex, amax):
    """One example: each token a span shaded by activation / max; the firing token boxed."""
    toks = ex["tokens"]
    acts = ex["acts"]
    if len(toks) != len(acts):
        raise ValueError(f"example has {len(toks)} tokens but {len(acts)} activations: {ex}")
    center = ex.get("center")
    scale = 100 / amax if amax > 0 else 0.0
    spans = []
    for i, (t, a) in enumerate(zip(toks, acts)):
        tok = _token_html(t)
        if a == 0 and i != center:  # most tokens around a firing: no shade, no box (the fast path)
            spans.append(f'<span class="tok" title="0">{tok}</span>')
            continue
        shade = SHADES[max(0, min(int(a * scale + 0.5), 100))]
        box = " border:1px solid #333;" if i == center else ""
        spans.append(f'<span class="tok" title="{a:.3g}" style="{shade}{box}">{tok}</span>')
    label = f"q{ex['quantile']:.2f} " if "quantile" in ex else ""
    act = ex.get("act", max(acts, default=0.0))
    head = f'<span class="muted">{label}{act:.3g}&nbsp;</span>'
    return f'<div class="ex">{head}{"".join(spans)}</div>'


def _token_table(rows, title, k):
    row = "<tr><td><code>{}</code></td><td>{:+.3f}</td></tr>"
    body = "".join(row.format(_token_html(r["token"]), r["logit"]) for r in rows[:k])
    return f"<div><h2>{title}</h2><table><tr><th>token</th><th>logit</th></tr>{body}</table></div>"


def feature_page(feat, cfg):
    """One feature's page body, from one record of interp.py's features.jsonl."""
    top = (feat.get("top_examples") or [])[: cfg.max_examples]
    amax = feat.get("max_act") or max((max(e["acts"], default=0.0) for e in top), default=0.0)
    hist = feat.get("hist") or {}
    ngrams = (feat.get("input_ngrams") or [])[: cfg.top_tokens]
    ngrams = [dict(r, ngram=show_token(r.get("ngram", ""))) for r in ngrams]
    title = f"Layer {int(feat['layer'])} / feature {int(feat['feature'])}"
    body = [
        f'<p><a href="index.html">all features</a></p><h1>{title}</h1>',
        f"<p><b>Explanation:</b> {html.escape(str(feat.get('explanation') or '(none)'))}</p>",
        f"<div class='cols'><div><h2>Statistics and scores</h2>{table_html(_stats(feat))}</div>",
        "<div><h2>Activation histogram (when active; log-spaced bins)</h2>",
        browser.svg_histogram(hist.get("counts", []), hist.get("edges", [])),
        f"<p class='muted'>density {fmt(feat.get('density'))}</p></div></div><div class='cols'>",
        _token_table(feat.get("promoted") or [], "Promoted tokens", cfg.top_tokens),
        _token_table(feat.get("suppressed") or [], "Suppressed tokens", cfg.top_tokens),
        f"<div><h2>Input n-grams</h2>{table_html(ngrams) if ngrams else '-'}</div></div>",
        f"<h2>Top activations (max {amax:.3g})</h2>",
    ]
    body += [_example_html(e, amax) for e in top]
    quant = feat.get("quantile_examples") or []
    if quant:
        body.append("<h2>Examples across the activation range</h2>")
        body += [_example_html(e, amax) for e in quant]
    return "".join(body)


# -----------------------------------------------------------------------------
# the feature browser: every feature's page and the index, whatever their number


def write_pages(lines, cfg, dense, out):
    """One chunk of features.jsonl's lines: the pages of its live features, on disk when this
    returns, and [(index record, detection AUROC)] of all its features. What each worker does."""
    rows = []
    with browser.FileBatch() as pages:
        for feat in map(json.loads, lines):
            if not browser.is_dead(feat):  # a dead feature has nothing to show
                title = f"L{feat['layer']}/F{feat['feature']}"
                page = os.path.join(out, feature_page_name(feat["layer"], feat["feature"]))
                pages.add(page, browser.page_html(title, feature_page(feat, cfg)))
            rows.append((browser.index_record(feat, dense), feat.get("detection_auroc")))
    return rows


def draw_features(cfg):
    """Stream features.jsonl: a page per live feature, the index's rows (in index/ too when
    index.html holds only the best), then index.html."""
    if len(cfg.inputs) != 1:
        raise ValueError(f"`viz.py features` takes interp.py's output folder, got {cfg.inputs}")
    run_dir = cfg.inputs[0]
    path = os.path.join(run_dir, "features.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path!r}; write it with `python interp.py --out {run_dir}`")
    summary = {}
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    dense = cfg.dense if cfg.dense >= 0 else (summary.get("config") or {}).get("dense", DENSE)
    out = cfg.out or os.path.join(run_dir, "html")
    os.makedirs(out, exist_ok=True)
    workers = cfg.workers if cfg.workers > 0 else os.cpu_count() or 1
    index = browser.IndexRows(out, cfg.inline_rows)
    pages = functools.partial(write_pages, cfg=cfg, dense=dense, out=out)
    bar = tqdm(total=browser.count_lines(path), desc="feature pages", unit=" features")
    with open(path, encoding="utf-8") as f, bar:
        for rows in browser.map_in_order(pages, browser.chunks(f, PAGE_CHUNK), workers):
            for rec, auroc in rows:
                index.add(rec, auroc)
            bar.update(len(rows))
    index.write()
    page = browser.index_page(index, browser.summary_html(summary, run_dir))
    browser.write_page(os.path.join(out, "index.html"), "Features", page)
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
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path!r} has no rows")
    return rows


def _metric(row, key):
    """row[key], or row["eval"]["ce_spliced"] for the key "eval.ce_spliced"; None if missing."""
    if "." not in key:
        return row.get(key)
    outer, inner = key.split(".")
    return (row.get(outer) or {}).get(inner)


def _series(rows, key):
    """(steps, values) of the rows that have `key` ("eval.ce_spliced" reads a nested dict)."""
    pts = [(r["step"], _metric(r, key)) for r in rows if _metric(r, key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def _final(rows, key, last=10):
    """Mean over layers of `key`, averaged over the last `last` logged steps (batch noise)."""
    vals = _series(rows, key)[1][-last:]
    per_row = [sum(v) / len(v) if isinstance(v, list) else v for v in vals]
    return sum(per_row) / len(per_row) if per_row else math.nan


def _panel(ax, rows, keys, title, logy=False):
    """Scalar keys as a line each; a per-layer key (lists) as a line per layer. False if no data."""
    drawn = False
    for key, label in keys.items():
        steps, vals = _series(rows, key)
        if isinstance(vals[0] if vals else None, list):
            cmap = matplotlib.colormaps["viridis"]
            n = len(vals[0])
            for l in range(n):
                color = cmap(l / max(n - 1, 1))
                ax.plot(steps, [v[l] for v in vals], color=color, label=f"layer {l}")
        elif any(v > 0 or not logy for v in vals):  # log axes show no zeros: skip all-zero terms
            vals = [v if v > 0 or not logy else math.nan for v in vals]
            ax.plot(steps, vals, marker="o" if len(steps) < 30 else None, label=label)
        else:
            continue
        drawn = True
    if drawn:
        ax.set(xlabel="step", title=title, yscale="log" if logy else "linear")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    return drawn


def save_figure(fig, path, dpi):
    with atomic_path(path) as tmp:  # the temporary name has no .png to infer the format from
        fig.savefig(tmp, dpi=dpi, format="png")


def _frontier(points, path, dpi):
    """Final L0 against final FVU, a point per run, on log axes: lower left is better."""
    pts = sorted((p for p in points if not math.isnan(p[1] + p[2])), key=lambda p: p[1])
    fig = Figure(figsize=(6.4, 4.4))
    fig.subplots_adjust(left=0.13, right=0.95, bottom=0.12, top=0.92)
    ax = fig.subplots()
    ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-")
    for name, l0, fvu in pts:
        ax.annotate(name, (l0, fvu), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("L0 (mean over layers, last 10 steps)")
    ax.set_ylabel("FVU (mean over layers, last 10 steps)")
    ax.set(title="sparsity vs reconstruction: lower left is better", xscale="log", yscale="log")
    ax.grid(alpha=0.3, which="both")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers on the log axes, not 4x10^0
        axis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
        axis.set_minor_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
    save_figure(fig, path, dpi)


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
            fig = Figure(figsize=(6.4, 4))
            fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.91)  # "tight" draws twice
            if _panel(fig.subplots(), rows, keys, f"{title} ({name})", logy):
                save_figure(fig, os.path.join(out, f"{fname}.png"), cfg.dpi)
                written.append(os.path.join(out, f"{fname}.png"))
        points.append((name, _final(rows, "l0"), _final(rows, "fvu")))
    frontier = os.path.join(cfg.out or os.path.join(cfg.inputs[0], "plots"), "frontier.png")
    _frontier(points, frontier, cfg.dpi)
    print(f"wrote {len(written)} plots and {frontier}")
    return written + [frontier]


# -----------------------------------------------------------------------------
# main

COMMANDS = {"graph": GraphConfig, "features": FeaturesConfig, "train": CurvesConfig}


def main(argv=None):
    command, cfg = parse_config(__doc__, COMMANDS, argv)
    print(command, asdict(cfg))
    draw = {"graph": draw_graph, "features": draw_features, "train": draw_train}[command]
    return draw(cfg)


if __name__ == "__main__":
    run_main(main)

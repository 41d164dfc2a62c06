"""How viz.py's pictures look: the attribution graph in graphviz (colours, sizes, labels, grid,
legend) and its page; the training curves in matplotlib. viz.py says what goes where."""

import html
import math
import re

import graphviz
import matplotlib
import matplotlib.ticker
from matplotlib.figure import Figure  # no pyplot: Agg canvases, no window, no global backend

from forge import browser
from forge.files import atomic_path

# -----------------------------------------------------------------------------
# the attribution graph in graphviz

POS_COLOR = "#2b6cb0"  # edge colour of a positive weight
NEG_COLOR = "#c53030"  # and of a negative one
FILL = {  # a node's colour by its feature_type
    "cross layer transcoder": "#fdebc8",
    "mlp reconstruction error": "#e2e2e2",
    "embedding": "#d8ecd2",
    "logit": "#d3e3f6",
    "supernode": "#f6d2a2",
}
GRAPH = dict(rankdir="BT", newrank="true", ranksep="0.55", nodesep="0.12", splines="true")
GRAPH.update(fontname="Helvetica", label="", labelloc="t", fontsize="16")  # label: the title
STYLES = dict(node_attr=dict(fontname="Helvetica"), edge_attr=dict(arrowsize="0.5"))
NO_DOT = (
    "wrote {stem}.dot and {stem}.html (the nodes, no picture); graphviz's `dot` is not installed, "
    "so no SVG/PNG. Install it with `apt-get install graphviz` (Debian/Ubuntu), `brew install "
    "graphviz` (macOS) or `conda install graphviz`, then rerun this command (or `dot -Tsvg "
    "{stem}.dot -o {stem}.svg`)."
)


def influence_order(node):
    """Sort key, most influential first: graph.py's "influence_raw" (bigger = more), else
    circuit-tracer's *cumulative* "influence" (smaller = more), else |activation|."""
    if node.get("influence_raw") is not None:
        return -node["influence_raw"]
    if node.get("influence") is not None:
        return node["influence"]
    return -abs(node.get("activation") or 0)


def text(s, n=None):
    """User text for a dot label: cut to n characters, backslashes made literal (graphviz.escape)"""
    s = str(s).translate(browser.VISIBLE)
    return graphviz.escape(s if n is None or len(s) <= n else s[: n - 1] + "…")


def node_name(node):
    """How the page names a node: L1/3 for a feature, err L0, an embedding's token, a logit's, a
    supernode's member count and layers."""
    ft = node["feature_type"]
    if ft == "supernode":
        return f"{len(node['members'])} features, L{node['layer_span']}"
    if ft == "cross layer transcoder":
        return f"L{node['layer']}/{browser.feature_index(node)}"
    if ft == "mlp reconstruction error":
        return f"err L{node['layer']}"
    return str(node.get("clerp") or node["node_id"])


def link(node, href):
    """A feature node's page, href(layer, feature) (None where there is none); other nodes: None."""
    is_feature = node["feature_type"] == "cross layer transcoder"
    return href(int(node["layer"]), browser.feature_index(node)) if href and is_feature else None


def node_attrs(node, s, tokens, label_chars, href):
    """Label, shape, size and hover text of one node; s in [0, 1] is its importance."""
    ft = node["feature_type"]
    pos = node["ctx_idx"]
    act = node.get("activation")
    shown = f", activation {act:.3g}" if act is not None else ""
    tip = text(f"{node_name(node)} at position {pos}{shown}")
    clerp = node.get("clerp") or ""
    if clerp and ft == "cross layer transcoder":  # others: clerp is the name
        tip = graphviz.nohtml(f"{tip}\\n{text(clerp)}")  # \n: dot's line break; "<|" is text
    attrs = dict(style="filled,rounded", shape="box", fillcolor=FILL.get(ft, "white"))
    attrs.update(tooltip=tip, width=f"{0.5 + 1.0 * s:.2f}")
    attrs.update(height=f"{0.3 + 0.35 * s:.2f}", fontsize=f"{9 + 4 * s:.1f}")
    if ft == "embedding":  # the token axis: as narrow as its token
        token = browser.show_token(tokens[pos]) if pos < len(tokens) else f"pos {pos}"
        attrs.update(label=text(token), width="0.3")
    elif ft == "logit":
        attrs["label"] = text(node.get("clerp") or f"logit {node['feature']}")
        attrs["penwidth"] = "2.5" if node.get("is_target_logit") else "1"
    elif ft == "attention head":  # graph.py --qk: an explained head, at its query
        attrs.update(label=text(clerp), shape="hexagon", fillcolor=HEAD_COLOR, width="0.3")
    elif ft == "mlp reconstruction error":
        attrs.update(label=f"err L{node['layer']}", style="filled,dashed", shape="octagon")
    elif ft == "supernode":  # one box for its members: their count, layers and shared label
        attrs.update(label="\\n".join(label_lines(clerp, label_chars) + [node_name(node)]))
        infl = f"influence {node['influence_raw']:.3g}, its members' sum"
        attrs.update(tooltip=text(f"{clerp}: {', '.join(node['members'])} ({infl})"), penwidth="2")
    else:
        attrs["label"] = "\\n".join([node_name(node)] + label_lines(clerp, label_chars))
        if href:
            attrs.update(URL=href, target="_top")
    return attrs


def label_lines(label, n):
    """A label's lines in a node, each cut to n characters: what it reads, then "→ what it says"."""
    return [text(part, n) for part in re.split(r" (?=→ )", label)] if label else []


def legend():
    """The key (a graphviz HTML-like label): node colours, edge colours, what the sizes say."""
    line = '<TD><FONT COLOR="{}">━━</FONT></TD>'
    keys = [(f'<TD BGCOLOR="{c}"> </TD>', t) for t, c in FILL.items()]
    keys += [(line.format(POS_COLOR), "positive edge"), (line.format(NEG_COLOR), "negative edge")]
    rows = "".join(f'<TR>{key}<TD ALIGN="LEFT">{words}</TD></TR>' for key, words in keys)
    rows += '<TR><TD COLSPAN="2" ALIGN="LEFT">width ∝ |weight|, node size ∝ influence</TD></TR>'
    return f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="2">{rows}</TABLE>>'


def pin(sub, name, pos_of, **attrs):
    """Add a node, pinned where the layout pass put it (pos_of is empty before that pass)."""
    if name in pos_of:
        attrs["pos"] = f"{pos_of[name][0]:.1f},{pos_of[name][1]:.1f}!"
    sub.node(name, **attrs)


def grid(g, ranks, imp, tokens, label_chars, href, pos_of):
    """The ranks as rows for `dot`: a rank=same subgraph each, ordered by an invisible chain (empty
    cells: placeholders), stacked by a row-label spine, columns by invisible edges; pinned: none."""
    n_pos = max(len(tokens), 1 + max((p for _, cells in ranks for p in cells), default=0))
    heads = {}  # (rank, pos) -> first node of the cell
    for i, (r, cells) in enumerate(ranks):
        with g.subgraph(name=f"row_{i}") as sub:
            sub.attr(rank="same")
            chain = [f"rowlabel_{i}"]
            more = i > 0 and ranks[i - 1][0] == r  # a wrapped row's continuation: no label
            label = "" if more else {-1: "Emb", 10**6: "Logits"}.get(r, f"L{r}")
            pin(sub, chain[0], pos_of, label=label, shape="plaintext", fontsize="14")
            for pos in range(n_pos):
                cell = cells.get(pos, [])
                if not cell:  # keep the grid: an empty cell still takes a column slot
                    chain.append(f"cell_{i}_{pos}")
                    if r == -1 and pos < len(tokens):
                        token = text(browser.show_token(tokens[pos]))
                        grey = dict(label=token, shape="plaintext", fontcolor="#888888")
                        pin(sub, chain[-1], pos_of, group=f"pos{pos}", **grey)
                    elif not pos_of:
                        invisible = dict(label="", shape="point", style="invis")
                        pin(sub, chain[-1], pos_of, group=f"pos{pos}", **invisible)
                for n in cell:
                    attrs = node_attrs(n, imp[n["node_id"]], tokens, label_chars, link(n, href))
                    pin(sub, n["node_id"], pos_of, group=f"pos{pos}", **attrs)
                    chain.append(n["node_id"])
                heads[i, pos] = chain[-len(cell) or -1]
            if i == len(ranks) - 1:
                pin(sub, "legend", pos_of, label=legend(), shape="plaintext", fontsize="10")
                chain.append("legend")
            for a, b in zip(chain, chain[1:]) if not pos_of else []:
                sub.edge(a, b, style="invis")
        if i > 0 and not pos_of:
            g.edge(f"rowlabel_{i - 1}", f"rowlabel_{i}", style="invis", weight="20")
            for pos in range(n_pos):
                g.edge(heads[i - 1, pos], heads[i, pos], style="invis", weight="8")


def collapse_supernodes(graph):
    """The graph with each of qParams' supernodes [label, member ids...] as one node: at its
    members' position and mean layer, its influence the sum of theirs (graph.py: that is a
    supernode's influence), its edges the sums of theirs, those inside it dropped."""
    nodes = {n["node_id"]: n for n in graph["nodes"]}
    owner = {}
    for i, (label, *ids) in enumerate((graph.get("qParams") or {}).get("supernodes") or []):
        members = [nodes[m] for m in ids if m in nodes]
        if len(members) < 2:
            continue
        layers = sorted(int(m["layer"]) for m in members)
        node = dict(node_id=f"supernode-{i}", feature_type="supernode", clerp=label)
        node.update(layer=str(round(sum(layers) / len(layers))), ctx_idx=members[0]["ctx_idx"])
        node.update(layer_span=f"{layers[0]}–{layers[-1]}" if layers[0] < layers[-1] else layers[0])
        node.update(members=[m["node_id"] for m in members])
        node.update(influence_raw=sum(m.get("influence_raw") or 0 for m in members))
        owner.update({m["node_id"]: node for m in members})
    kept = [n for n in graph["nodes"] if n["node_id"] not in owner]
    kept += list({id(n): n for n in owner.values()}.values())
    weights = {}
    for l in graph["links"]:
        ends = tuple(owner[e]["node_id"] if e in owner else e for e in (l["source"], l["target"]))
        if ends[0] != ends[1]:  # an edge inside a supernode is no edge of the picture
            weights[ends] = weights.get(ends, 0.0) + l["weight"]
    links = [dict(source=a, target=b, weight=w) for (a, b), w in weights.items()]
    return dict(graph, nodes=kept, links=links)


def write_graph_page(stem, graph, cfg, svg, href, explanations=None, run_id=None):
    """{stem}.html: prompt, scores, the picture (or how to get one), the table of every node; with
    graph.py --qk, a panel its script (static/qk.js) fills when a head or an edge is clicked."""
    meta = graph.get("metadata", {})
    toks = [f"<code>{browser.token_html(t)}</code>" for t in meta.get("prompt_tokens", [])]
    info = {k: v for k, v in (meta.get("info") or {}).items() if isinstance(v, (int, float, str))}
    body = [f"<h1>Attribution graph</h1><p>Prompt: {html.escape(str(meta.get('prompt', '')))}</p>"]
    body += [f"<p>Tokens: {' '.join(toks)}</p>", browser.table_html(info) if info else ""]
    if svg is None:
        body.append(
            "<p><b>No picture:</b> graphviz's <code>dot</code> is not installed. Install it "
            "(apt-get install graphviz, brew install graphviz or conda install graphviz), then "
            f"rerun <code>python viz.py graph {html.escape(stem)}.json</code>.</p>"
        )
    else:  # inline: no XML prolog/DOCTYPE (they carry URLs), no xmlns (HTML5 sets them)
        inline_svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg[svg.index("<svg") :])
        body.append(
            f"<p>{len(graph['nodes'])} nodes and {len(graph['links'])} links in the file; drawn: "
            f"every embedding and logit, the {cfg.max_nodes} most influential other nodes, the "
            f"{cfg.max_edges} strongest edges"
            + (", graph.py's supernodes as one box each" if cfg.supernodes else "")
            + ". Click a feature to open its page; hover a node for its label (a supernode: its "
            "members), an edge for its weight.</p>"
            f"<div class='scroll'><div>{inline_svg}</div></div>"
        )
    # every node of the (pruned) graph, most influential first, features linked to their pages
    tokens = meta.get("prompt_tokens") or []
    heads = ["node", "type", "layer", "position", "activation", "influence"]
    rows = ["".join(f"<th>{h}</th>" for h in heads + ["cumulative influence", "label"])]
    for n in sorted(graph["nodes"], key=influence_order):
        url = link(n, href)
        name = html.escape(node_name(n))
        pos = n["ctx_idx"]
        token = browser.token_html(tokens[pos]) if pos < len(tokens) else ""
        cells = [f'<a href="{html.escape(url)}">{name}</a>' if url else name]
        cells += [html.escape(n["feature_type"]), html.escape(str(n["layer"]))]
        cells += [f"{pos} <code>{token}</code>"]
        cells += [browser.fmt(n.get(k)) for k in ("activation", "influence_raw", "influence")]
        cells += [html.escape(str(n.get("clerp") or "")) if n["feature_type"] != "logit" else ""]
        rows.append("".join(f"<td>{c}</td>" for c in cells))
    table = "<table>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>"
    body += ["<h2>Nodes, most influential first</h2>", table]
    if graph.get("qk"):
        data = dict(qk=graph["qk"], labels=qk_labels(graph, explanations or {}), tokens=tokens)
        body += ["<div id='qk-panel'></div>", f"<script>var QK = {browser.to_js(data)};\n{QK_JS}"]
        body += ["</script>"]
    browser.write_file(
        stem + ".html", browser.page_html("Attribution graph", "".join(body), run_id)
    )


# -----------------------------------------------------------------------------
# QK attributions (graph.py --qk): explained heads in the picture, their pairs on the page

HEAD_COLOR = "#e9d8fd"  # an explained head's node, and its dashed edge from the key it reads
HEAD_EDGE = "#805ad5"
QK_JS = (browser.STATIC / "qk.js").read_text(encoding="utf-8")


def qk_heads(graph):
    """graph.py --qk's entries as grid nodes (row: the head's layer, column: the query) and edges
    from the key's token embedding -> ([node], [(key node id, node id, edge attrs)])."""
    embeddings = [n for n in graph["nodes"] if n["feature_type"] == "embedding"]
    tokens = {n["ctx_idx"]: n["node_id"] for n in embeddings if n["node_id"][:3] != "E_-"}
    nodes = []
    edges = []
    for k, q in enumerate(graph.get("qk", [])):
        head = f"L{q['layer']}.H{q['head']}"
        node = dict(node_id=f"qk_{k}", feature_type="attention head", layer=str(q["layer"]))
        node |= dict(ctx_idx=q["query_pos"], clerp=f"{head} ← {q['key_pos']}")
        numbers = (
            f"pattern {q['pattern']:.3f}, score {q['score']:+.3g}, contrast {q['contrast']:+.3g}"
        )
        tip = text(f"{head}: query {q['query_pos']} attends to key {q['key_pos']} ({numbers})")
        attrs = dict(color=HEAD_EDGE, style="dashed", constraint="false", tooltip=tip)
        nodes.append(node)
        edges += [(tokens[q["key_pos"]], node["node_id"], attrs)] if q["key_pos"] in tokens else []
    return nodes, edges


def qk_labels(graph, explanations):
    """{node id: text} of every node in the qk pairs: a feature's explanation (interp's, else its
    clerp), a token's text, an error's layer, a position embedding, the bias."""
    tokens = graph.get("metadata", {}).get("prompt_tokens") or []
    clerps = {n["node_id"]: n.get("clerp") or "" for n in graph["nodes"]}
    pairs = [p for q in graph["qk"] for p in q["pairs"] + q["contrast_pairs"]]
    out = {}
    for i in {p["query"] for p in pairs} | {p["key"] for p in pairs}:
        layer, what, pos = (i.split("_") + ["", ""])[:3]
        if i == "bias" or i.startswith("pos@"):
            out[i] = i.replace("pos@", "position ")
        elif layer == "E":  # the prompt's token at pos
            out[i] = f"token {browser.show_token(tokens[int(pos)])}"
        elif what == "-1":
            out[i] = f"error L{layer} @{pos}"
        else:
            label = explanations.get((int(layer), int(what))) or clerps.get(i, "")
            out[i] = f"L{layer}/{what} @{pos} {label[:60]}".strip()
    return out


# -----------------------------------------------------------------------------
# training curves in matplotlib


def series(rows, key):
    """(steps, values) of the rows that have `key` ("eval.ce_spliced": row["eval"]["ce_spliced"])"""
    outer, _, inner = key.partition(".")
    values = [(r.get(outer) or {}).get(inner) if inner else r.get(outer) for r in rows]
    pts = [(r["step"], v) for r, v in zip(rows, values) if v is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def final(rows, key, last=10):
    """Mean over layers of `key`, averaged over the last `last` logged steps (batch noise)."""
    vals = series(rows, key)[1][-last:]
    per_row = [sum(v) / len(v) if isinstance(v, list) else v for v in vals]
    return sum(per_row) / len(per_row) if per_row else math.nan


def save_figure(fig, path, dpi):
    with atomic_path(path) as tmp:  # the temporary name has no .png to infer the format from
        fig.savefig(tmp, dpi=dpi, format="png")


def curves(path, rows, keys, title, logy, dpi):
    """A PNG of the keys' curves: a line per scalar key, a line per layer for a per-layer key (a
    list); log y: all-zero terms skipped. False, and no file, without data."""
    fig = Figure(figsize=(6.4, 4))
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.91)  # "tight" draws twice
    ax = fig.subplots()
    for key, label in keys.items():
        steps, vals = series(rows, key)
        if isinstance(vals[0] if vals else None, list):
            n = len(vals[0])
            for l in range(n):
                color = matplotlib.colormaps["viridis"](l / max(n - 1, 1))
                ax.plot(steps, [v[l] for v in vals], color=color, label=f"layer {l}")
        elif any(v > 0 or not logy for v in vals):  # log axes show no zeros
            vals = [v if v > 0 or not logy else math.nan for v in vals]
            ax.plot(steps, vals, marker="o" if len(steps) < 30 else None, label=label)
    if ax.lines:
        ax.set(xlabel="step", title=title, yscale="log" if logy else "linear")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        save_figure(fig, path, dpi)
    return bool(ax.lines)


def frontier(points, path, dpi):
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

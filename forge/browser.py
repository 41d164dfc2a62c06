"""The feature browser's machinery, below viz.py: page HTML, the index's rows and layer files,
writing many pages at once, the graph's feature files for circuit-tracer's front end. For
GPT-2-small's CLT (12 x 24,576 features): index.html holds the best `inline_rows` by AUROC (2.7 MB,
0.6 s to draw; all rows: 211 MB, not drawn in 5 min); the rest load per layer from index/ (7 MB,
~1 s) as a script element (file:// blocks fetch()). 292k pages (7.6 GB) take ~3 min (FileBatch).

A folder of pages is one unit, as every stage's output folder is (forge/files.py): a run takes it
off commit.json first and puts a page saying so in place of an index.html (or graph page), then
writes its files, each page and layer file marked with its run id at its start, removes the
pages no longer of this run, and writes commit.json last. The run id is derived from the inputs'
run ids and the flags that shape the pages (files.derived_run_id), not drawn at random: a rerun
writes the same bytes, with one worker or many, and pages of two runs with different inputs or
flags carry different ids, so `check_pages` finds a folder that a killed run left mixed (two
versions of viz.py that draw one input differently share an id: rerun into a fresh folder)."""

import base64
import bisect
import collections
import concurrent.futures
import contextlib
import functools
import heapq
import html
import itertools
import json
import math
import os
import pathlib
import re

from forge.files import MANIFEST, atomic_path, commit, derived_run_id, fsync_dir, read_manifest
from forge.files import uncommit

STATIC = pathlib.Path(os.path.abspath(__file__)).parent / "static"  # ships beside this module
# every page's style (.scroll: a wide graph scrolls sideways, opening at its left edge, the tokens)
CSS = (STATIC / "style.css").read_text(encoding="utf-8").rstrip("\n")
INDEX_JS = (STATIC / "index.js").read_text(encoding="utf-8")  # sorting, filtering, index/ files

# -----------------------------------------------------------------------------
# texts and names

# control characters made visible (a NUL ends a graphviz string); \n \t \r as circuit-tracer does
VISIBLE = {**{i: 0x2400 + i for i in range(32)}, 127: 0x2421, 10: "⏎", 9: "→", 13: "↵"}
PAGE_NAME = "L{layer}_F{feature}.html"  # a feature's page; the index's script builds the same names
LAYER_FILE = "index/layer_{:02d}.js"  # a layer's rows for the index's script, when not all inline
PAGE_RE = re.compile(r"L\d+_F\d+\.html")  # PAGE_NAME's files: the ones a rerun may remove
RUN_MARK = "clt-forge-run {}"  # at the start of each page and layer file: the run that wrote it
MARK_BYTES = 128  # a page's mark is in these (its second line: a first before <!DOCTYPE> = quirks)


def show_token(tok):
    """A token with its whitespace made visible: leading/trailing spaces as '␣', newlines as '⏎'."""
    tok = str(tok).translate(VISIBLE)
    core = tok.strip(" ")
    lead = len(tok) - len(tok.lstrip(" "))
    trail = len(tok) - len(tok.rstrip(" "))
    return "␣" * lead + core + ("␣" * trail if core else "")


def plain(v):
    """A value as a table shows it: 4 significant digits, "-" for None."""
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)


def to_js(value):
    """A JSON value as JavaScript that can sit inside a <script> element ("</" would end it)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def feature_page_name(layer, feature):
    return PAGE_NAME.format(layer=int(layer), feature=int(feature))


def feature_index(node):
    """A feature node's index in its layer, from node_id "{layer}_{feature}_{pos}" (circuit-tracer's
    "feature" is a Cantor pairing), else "feature"."""
    parts = str(node["node_id"]).split("_")
    if len(parts) == 3 and parts[1].lstrip("-").isdigit():
        return int(parts[1])
    return int(node["feature"])


# -----------------------------------------------------------------------------
# pages: the frame every page shares, tables of any JSON value, pictures inline


def page_html(title, body, run_id=None):
    """A page; with run_id, marked as that run's in its second line (check_pages reads it)."""
    mark = f"<!-- {RUN_MARK.format(run_id)} -->\n" if run_id else ""
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style>'
    return f'<!DOCTYPE html>\n{mark}<html lang="en"><head>{head}</head><body>{body}</body></html>\n'


def fmt(v):
    return html.escape(plain(v))


def is_scalar(v):
    return v is None or isinstance(v, (int, float, str))


def table_html(value, depth=0):
    """Any JSON value as HTML: a list of dicts or nested dict of scalars with a header row, a dict
    as key/value rows."""
    small = isinstance(value, dict) and depth > 0 and 0 < len(value) <= 8
    if small and all(map(is_scalar, value.values())):
        value = [value]  # e.g. quantiles {"q10": .., "q50": ..}: one row, not one row per key
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        keys = list(dict.fromkeys(k for r in value for k in r))
        head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
        rows = "".join(
            "<tr>" + "".join(f"<td>{table_html(r.get(k), depth + 1)}</td>" for k in keys) + "</tr>"
            for r in value
        )
        return f"<table><tr>{head}</tr>{rows}</table>"
    if isinstance(value, dict) and depth < 3:
        rows = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{table_html(v, depth + 1)}</td></tr>"
            for k, v in value.items()
        )
        return f"<table>{rows}</table>"
    return fmt(value) if is_scalar(value) else html.escape(json.dumps(value)[:200])


def svg_histogram(counts, edges, width=420, height=140):
    """A bar chart as inline SVG (no image file, no script); edges label the two ends."""
    cmax = max(max(counts, default=0), 1)
    n = max(len(counts), 1)
    bars = "".join(
        f'<rect x="{30 + i * (width - 40) / n:.1f}" '
        f'y="{height - 20 - (height - 30) * c / cmax:.1f}" '
        f'width="{max((width - 40) / n - 1, 0.5):.1f}" height="{(height - 30) * c / cmax:.1f}" '
        f'fill="#e08a1e"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    lo = edges[0] if edges else 0
    hi = edges[-1] if edges else 0
    return (
        f'<svg width="{width}" height="{height}" role="img">{bars}'
        f'<text x="30" y="{height - 4}" font-size="11">{lo:.3g}</text>'
        f'<text x="{width - 10}" y="{height - 4}" font-size="11" text-anchor="end">{hi:.3g}</text>'
        f'<text x="2" y="12" font-size="11">{cmax}</text></svg>'
    )


SHADES = [f"background:rgba(255,140,0,{k / 100:.2f});" for k in range(101)]  # act / max, in %


@functools.lru_cache(maxsize=1 << 17)
def token_html(tok):
    """A token as a page shows it, escaped; cached (most of `viz.py features`' time otherwise)."""
    return html.escape(show_token(tok))


def example_html(ex, amax):
    """One example: each token a span shaded by activation / max; the firing token boxed."""
    toks = ex["tokens"]
    acts = ex["acts"]
    if len(toks) != len(acts):
        raise ValueError(f"example has {len(toks)} tokens but {len(acts)} activations: {ex}")
    center = ex.get("center")
    scale = 100 / amax if amax > 0 else 0.0
    spans = []
    for i, (t, a) in enumerate(zip(toks, acts)):
        tok = token_html(t)
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


def token_table(rows, title, k):
    row = "<tr><td><code>{}</code></td><td>{:+.3f}</td></tr>"
    body = "".join(row.format(token_html(r["token"]), r["logit"]) for r in rows[:k])
    return f"<div><h2>{title}</h2><table><tr><th>token</th><th>logit</th></tr>{body}</table></div>"


# -----------------------------------------------------------------------------
# writing many files


def write_file(path, data):
    """Write text or bytes to `path` whole or not at all."""
    encoding = None if isinstance(data, bytes) else "utf-8"
    with atomic_path(path) as tmp, open(tmp, "w" if encoding else "wb", encoding=encoding) as f:
        f.write(data)


class FileBatch(contextlib.AbstractContextManager):
    """Small text files written whole or not at all, with one os.sync() a batch of `max_bytes` (not
    two fsyncs a file: 80 s for 292k pages), then renames; an exception removes the unrenamed."""

    def __init__(self, max_bytes=64 << 20):
        self.max_bytes = max_bytes
        self.pending = []  # paths whose "{path}.tmp" is written, not yet renamed
        self.size = 0

    def add(self, path, text):
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            f.write(text)
        self.pending.append(path)
        self.size += len(text)
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        os.sync()  # every temporary file's data on disk before any rename makes one visible
        for path in self.pending:
            os.replace(f"{path}.tmp", path)
        for folder in {os.path.dirname(p) for p in self.pending}:
            fsync_dir(folder)
        self.pending = []
        self.size = 0

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.flush()
        for path in self.pending:  # an exception inside the block: the files not renamed
            pathlib.Path(f"{path}.tmp").unlink(missing_ok=True)


def count_lines(path):
    """The lines of a file, counted without decoding them (a progress bar's total)."""
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def chunks(f, n):
    """The non-blank lines of a file, in lists of n."""
    lines = filter(str.strip, f)
    while chunk := list(itertools.islice(lines, n)):
        yield chunk


def map_in_order(fn, items, workers):
    """fn(item) for each item in `workers` processes, in order, at most 2 * workers in flight (not
    a Pool's imap, which reads ahead); one worker or item: in this process."""
    items = iter(items)
    head = list(itertools.islice(items, 2))
    if workers == 1 or len(head) < 2:
        yield from map(fn, itertools.chain(head, items))
        return
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        queue = collections.deque()
        for item in itertools.chain(head, items):
            queue.append(pool.submit(fn, item))
            if len(queue) >= 2 * workers:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


# -----------------------------------------------------------------------------
# the index's rows: in index.html, and per layer in index/ when there are more

# (key in the URL hash, header, "num" or "text": how it sorts, the direction of a first click)
INDEX_COLUMNS = [
    ("layer", "layer", "num", "asc"),
    ("feature", "feature", "num", "asc"),
    ("explanation", "explanation", "text", "asc"),
    ("tokens", "top tokens", "text", "asc"),
    ("density", "density", "num", "desc"),
    ("max_act", "max act", "num", "desc"),
    ("auroc", "detection AUROC", "num", "desc"),
    ("fuzzing", "fuzzing", "num", "desc"),
    ("concept", "best concept", "text", "asc"),
    ("f1", "concept F1", "num", "desc"),
    ("flags", "flags", "text", "desc"),
]
INDEX_CLASSES = ["num" if kind == "num" else "" for _, _, kind, _ in INDEX_COLUMNS[:-1]] + ["flag"]
FLAGS = len(INDEX_COLUMNS) - 1  # a row's flags cell (dead, dense), the last


CONCEPT_F1 = 0.5  # the index names a feature's best planted concept from this F1 on


def is_dead(feat):
    """A feature that never fired: it has no page (nothing to show) and the flag "dead"."""
    return not feat.get("n_fires", feat.get("density", 1))


def index_record(feat, dense):
    """A feature's row of the index as texts: the cells of INDEX_COLUMNS, then its promoted tokens
    in lower case (the search looks in them too)."""
    is_dense = (feat.get("density") or 0) > dense
    flags = " ".join(name for name, on in (("dead", is_dead(feat)), ("dense", is_dense)) if on)
    top = feat.get("top_examples") or []
    fired = [e["tokens"][e["center"]] if e.get("center") is not None else "" for e in top]
    tokens = " ".join(show_token(t) for t in list(dict.fromkeys(fired))[:5])  # the 5 first distinct
    scores = ["density", "max_act", "detection_auroc", "fuzzing_bacc", "concept", "concept_f1"]
    promoted = " ".join(r["token"] for r in feat.get("promoted") or []).lower()
    promoted += " " + str(feat.get("label") or "").lower()  # the search looks in the label too
    head = [str(int(feat["layer"])), str(int(feat["feature"])), str(feat.get("explanation") or "")]
    cells = [plain(feat.get(k)) for k in scores]
    if (feat.get("concept_f1") or 0) < CONCEPT_F1:  # a best concept at F1 0.01 names nothing
        cells[-2] = ""
    return [*head, tokens, *cells, flags, promoted]


def index_row(rec):
    """One <tr> of the index from index_record's texts, the feature linked to its page unless dead;
    data-q holds the search's extra words. The index's script builds the same from index/ files."""
    vals = [html.escape(cell) for cell in rec[: FLAGS + 1]]
    if "dead" not in rec[FLAGS].split():
        vals[1] = f'<a href="{feature_page_name(rec[0], rec[1])}">{vals[1]}</a>'
    tds = [f'<td class="{c}">' if c else "<td>" for c in INDEX_CLASSES]
    cells = "".join(f"{td}{v}</td>" for td, v in zip(tds, vals))
    q = html.escape(rec[-1], quote=True)
    return f'<tr data-layer="{rec[0]}" data-q="{q}">{cells}</tr>'


class IndexRows:
    """The index's rows in (layer, feature) order: the `n_inline` best by AUROC for index.html;
    past that many, each layer to index/ as the next starts (memory: one layer)."""

    def __init__(self, out, n_inline, run_id=None):
        self.out = out
        self.n_inline = n_inline
        self.run_id = run_id  # marks each layer file (check_pages)
        self.pages = set()  # the page names of the live features: what commit_pages keeps
        self.best = []  # a min-heap of (AUROC, -row number, record): the n_inline best rows so far
        self.held = {}  # layer -> its records, not in index/ yet
        self.files = {}  # layer -> bytes of its file in index/
        self.layer = None  # the layer of the last row
        self.n = 0
        self.n_dead = 0
        self.n_dense = 0

    def add(self, rec, auroc):
        layer = int(rec[0])
        if self.layer is not None and layer < self.layer:
            raise ValueError(
                f"features.jsonl lists layer {layer} again after a later one; viz.py reads it in "
                "the (layer, feature) order interp.py writes: rewrite it with interp.py"
            )
        key = (-math.inf if auroc is None else auroc, -self.n, rec)  # ties: the earlier row wins
        push = heapq.heappush if len(self.best) < self.n_inline else heapq.heappushpop
        push(self.best, key)
        if layer != self.layer:  # a new layer: the ones before it are complete
            self.write()
            self.layer = layer
        self.held.setdefault(layer, []).append(rec)
        self.n += 1
        flags = rec[FLAGS].split()
        if "dead" not in flags:
            self.pages.add(feature_page_name(rec[0], rec[1]))
        self.n_dead += "dead" in flags
        self.n_dense += "dense" in flags

    def write(self):
        """The held layers into index/, unless every row so far fits in index.html: a string for
        JSON.parse (Chromium reads GPT-2-small's 7 MB layer in 0.4 s, an array literal in 1.2 s)."""
        if self.n <= self.n_inline:
            return
        for layer, records in self.held.items():
            path = os.path.join(self.out, LAYER_FILE.format(int(layer)))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            quoted = to_js(records).replace("\\", "\\\\").replace("'", "\\'")  # JSON in '...'
            text = f"/* {RUN_MARK.format(self.run_id)} */\n" if self.run_id else ""
            text += f"featureIndex({int(layer)},JSON.parse('{quoted}'));\n"
            write_file(path, text)
            self.files[layer] = len(text.encode("utf-8"))
        self.held = {}

    def layers(self):
        return sorted({*self.held, *self.files})

    def inline(self):
        """The records index.html holds, in the file's order."""
        return [rec for _, _, rec in sorted(self.best, key=lambda key: -key[1])]


# the index's controls: the layer menu ({} its options), the search, what is shown and loading
CONTROLS = (
    '<div class="controls"><select id="layer">{}</select>'
    '<input id="q" type="search" placeholder="search explanations and tokens">'
    '<span id="shown" class="muted"></span><span id="loading" class="muted"></span></div>'
    "<noscript><style>#features{{display:table}}</style></noscript>"
)


def summary_html(summary, run_dir):
    """interp.py's summary beside its plots: a few numbers, the per-layer counts, summary.png."""
    numbers = []
    if summary:
        heads = {"train tokens": summary.get("n_train_tokens")}
        heads["held-out tokens"] = summary.get("n_heldout_tokens")
        auroc = f"live features with detection AUROC >= {summary.get('detection_threshold')}"
        heads[auroc] = summary.get("share_live_detection_above")
        c = summary.get("concepts")
        if c:
            found = f"toy-world concepts ({c['families']}) recovered with F1 >= {c['f1_threshold']}"
            heads[found] = f"{c['recovered']} / {c['n']}"
        known = {k: v for k, v in heads.items() if v is not None}
        numbers += ["<h2>Summary</h2>", table_html(known)]
        if c and "baselines" in c:  # per family: the CLT, then the baselines scored the same way
            from forge.concepts import concept_rows  # (it imports torch: only where needed)

            f1 = c["f1_threshold"]
            numbers.append(f"<h2>Toy-world concepts: share with F1 &gt;= {f1} / mean best F1</h2>")
            numbers.append(table_html(concept_rows(c)))
        if summary.get("per_layer"):
            numbers += ["<h2>Per layer</h2>", table_html(summary["per_layer"])]
    plots = ""
    png = pathlib.Path(run_dir, "summary.png")
    if png.is_file():  # inline, so that the page stays self-contained
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        alt = "score distributions, densities and concept recovery"
        plots = f'<img alt="{alt}" style="width:720px;max-width:100%" src="{uri}">'
    return f"<div class='cols'><div>{''.join(numbers)}</div><div>{plots}</div></div>"


def index_page(index, summary_div):
    """The browser: headline, the controls, the table of the inline rows first; the summary and
    its plots below it; the script."""
    rows = index.inline()
    th = '<th data-key="{}" data-type="{}" data-dir="{}">{}</th>'
    head = "".join(th.format(k, t, d, html.escape(h)) for k, h, t, d in INDEX_COLUMNS)
    options = "".join(f'<option value="{l}">layer {l}</option>' for l in index.layers())
    title = "All features"
    intro = (
        "Click a column to sort by it (again to reverse); the search keeps rows whose explanation "
        "or top tokens contain every word. The address bar keeps the view."
    )
    first = '<option value="">all layers</option>'
    if index.files:  # some rows are only in index/
        title = f"The best {len(rows):,} of {index.n:,} features by detection AUROC"
        intro += " Pick a layer or every layer, or search, to browse all of them (read from index/"
        intro += " as needed)."
        mb = sum(index.files.values()) / 1e6
        first = f'<option value="">the best {len(rows):,}</option>'
        first += f'<option value="all">every layer ({mb:.0f} MB to read)</option>'
    files = {l: LAYER_FILE.format(int(l)) for l in index.files}
    config = dict(layers=index.layers(), files=files, total=index.n, classes=INDEX_CLASSES)
    config["page"] = PAGE_NAME
    counts = f"{index.n - index.n_dead} live, {index.n_dead} dead (no page), {index.n_dense} dense"
    summary = "<a href='#summary'>summary and plots below</a>"
    body = [f"<h1>Features: {counts}</h1>", CONTROLS.format(first + options)]
    body += [f"<p class='muted'><b>{title}.</b> {intro} The {summary}.</p>"]
    # hidden until the script has drawn it: a table laid out as it streams in costs ~0.5 ms a row
    body += [f'<table id="features" hidden><thead><tr>{head}</tr></thead><tbody>']
    body += [*map(index_row, rows), "</tbody></table>"]
    body += ['<p><button id="more" hidden>show more</button></p>']
    body += [f"<div id='summary'>{summary_div}</div>"]
    body += [f"<script>var INDEX = {to_js(config)};\n{INDEX_JS}</script>"]
    return "".join(body)


# -----------------------------------------------------------------------------
# a folder of pages as one unit: taken off commit.json first, committed last, checked by its marks

NOT_A_RUN = ("inputs", "out", "interp", "features", "workers")  # flags that do not shape the files
GRAPH_FILES = (".html", ".dot", ".svg", ".png")  # `viz.py graph`'s files of a graph, {slug}{ext}


def input_id(folder, name):
    """What names the input {folder}/{name} in a derived run id: the run id its folder's commit.json
    lists for it, else (a file from before run ids) its size and time; None: there is none."""
    listed = ((read_manifest(folder) or {}).get("files") or {}).get(name)
    path = os.path.join(folder, name)
    if listed or not os.path.isfile(path):
        return listed
    return [os.path.getsize(path), os.stat(path).st_mtime_ns]


def being_written(path, run_id, rerun):
    """The page at `path` while a run writes its folder: if no run is going on, one was killed."""
    body = (
        f"<h1>Being written</h1><p>viz.py run {run_id[:8]} is writing this folder. If it is not "
        "running any more, it was killed halfway: the pages here may be of two runs. Rerun "
        f"<code>{html.escape(rerun)}</code>.</p>"
    )
    write_file(path, page_html("Being written", body))


def begin_pages(out, run_dir, cfg):
    """Start `viz.py features` into `out`: its run id (interp's run and cfg's flags), the folder
    taken off commit.json and an earlier index.html saying so until the run ends. -> run id"""
    flags = {k: v for k, v in vars(cfg).items() if k not in NOT_A_RUN}
    run_id = derived_run_id(input_id(run_dir, "features.jsonl"), flags)
    index = os.path.join(out, "index.html")
    if os.path.isfile(index) and read_manifest(out) is None:
        print(f"{out} was not committed (a killed run's or from before commit.json): rewriting it")
    uncommit(out)
    if os.path.isfile(index):  # an earlier run's: it would show this one's pages as its own
        being_written(index, run_id, f"python viz.py features {run_dir} --out {out}")
    return run_id


def commit_pages(out, run_id, index):
    """End `viz.py features`: remove the pages and layer files not of this run (features dead now,
    layers gone), then write commit.json, last: index.html, the layer files, the number of pages."""
    strays = [n for n in os.listdir(out) if PAGE_RE.fullmatch(n) and n not in index.pages]
    layers = {LAYER_FILE.format(int(layer)) for layer in index.files}
    if os.path.isdir(os.path.join(out, "index")):
        found = (f"index/{n}" for n in os.listdir(os.path.join(out, "index")))
        strays += [n for n in found if n.endswith(".js") and n not in layers]
    for name in strays:
        os.remove(os.path.join(out, name))
    commit(out, run_id, ["index.html", *sorted(layers)], pages=len(index.pages))


def check_pages(out, rerun=None):
    """Refuse a folder of feature pages that is not one committed run's: no commit.json (a run
    was killed while writing it, or is writing it), or a page or layer file without its run's mark
    (pages of two runs), or pages missing. Reads the first bytes of every page."""
    rerun = rerun or f"python viz.py features <interp.py's output> --out {out}"
    manifest = read_manifest(out)
    if manifest is None:
        why = "a viz.py run was killed while writing it, or is writing it"
        raise ValueError(f"{out} is not committed: no {MANIFEST} ({why}): rerun `{rerun}`")
    mark = RUN_MARK.format(manifest["run_id"]).encode()
    pages = [n for n in os.listdir(out) if PAGE_RE.fullmatch(n)]
    for name in [*manifest["files"], *pages]:
        with open(os.path.join(out, name), "rb") as f:  # FileNotFoundError names a missing one
            if mark not in f.read(MARK_BYTES):
                other = f"not of run {manifest['run_id'][:8]}, the one {MANIFEST} commits"
                raise ValueError(f"{out}/{name} is {other} (a folder of two runs): rerun `{rerun}`")
    if len(pages) != manifest.get("pages"):
        found = f"holds {len(pages)} pages, {MANIFEST} says {manifest.get('pages')}"
        raise ValueError(f"{out} {found} (pages removed or added by hand?): rerun `{rerun}`")


def begin_graph(out, stem, graph, interp_dir, feat_dir, cfg):
    """Start `viz.py graph` writing {stem}.*: its run id (the graph's, interp's and the pages' runs
    and cfg's flags), the graph's files taken off commit.json, {stem}.html saying so. -> run id"""
    graph_file = cfg.inputs[0]
    flags = {k: v for k, v in vars(cfg).items() if k not in NOT_A_RUN}
    ids = [input_id(os.path.dirname(graph_file), os.path.basename(graph_file))]
    ids += [input_id(interp_dir, "features.jsonl"), input_id(feat_dir, "index.html")]
    run_id = derived_run_id(*ids, flags)
    slug = os.path.basename(stem)
    names = [slug + ext for ext in GRAPH_FILES]
    uncommit(out, names + [f"features/{f}.json" for f in frontend_wanted(graph).values()])
    if os.path.isfile(stem + ".html"):
        being_written(stem + ".html", run_id, f"python viz.py graph {graph_file} --out {out}")
    return run_id


def check_graph_files(out, slug, rerun=None):
    """Refuse `viz.py graph`'s files of {slug} unless commit.json lists them with one run id, the
    page carries its mark and the front end's feature files it drew are listed."""
    rerun = rerun or f"python viz.py graph <graph.py's {slug}.json> --out {out}"
    files = (read_manifest(out) or {}).get("files") or {}
    run_id = files.get(f"{slug}.html")
    drawn = [slug + ext for ext in GRAPH_FILES if os.path.exists(os.path.join(out, slug + ext))]
    front = os.path.join(out, "features")
    drawn += [f"features/{n}" for n in os.listdir(front)] if os.path.isdir(front) else []
    unlisted = [n for n in drawn if n not in files or (files[n] != run_id and "/" not in n)]
    with open(os.path.join(out, f"{slug}.html"), "rb") as f:
        marked = run_id is not None and RUN_MARK.format(run_id).encode() in f.read(MARK_BYTES)
    if unlisted or not marked:
        what = ", ".join(unlisted) or f"{slug}.html"
        why = f"not of one committed run (one killed while writing {out}, or a graph since redone)"
        raise ValueError(f"{what}: {why}: rerun `{rerun}`")


# -----------------------------------------------------------------------------
# the graph's features for circuit-tracer's front end (python -m circuit_tracer start-server): it
# fetches {scan}/{feature}.json; unlike ours it loads d3 from CDNs (offline: "d3 is not defined")

FRONTEND_SCAN = "./data/features"  # the graph's metadata.scan for the front end to read features/
FRONTEND_BINS = 40  # bins of the front end's activation histogram, linear over [act_min, act_max]


def _frontend_example(ex):
    return dict(
        tokens_acts_list=ex["acts"],
        train_token_ind=ex["center"],
        is_repeated_datapoint=False,
        tokens=ex["tokens"],
    )


def frontend_feature(feat, transcoder_id):
    """A record of features.jsonl in circuit-tracer's front-end schema (feature_models.py)."""
    hist = feat.get("hist") or {}
    counts = hist.get("counts") or []
    edges = hist.get("edges") or []
    centres = [math.sqrt(edges[i] * edges[i + 1]) for i in range(len(counts))]  # log-spaced bins
    act_max = float(feat.get("max_act") or 0.0)
    histogram = [0.0] * FRONTEND_BINS  # re-binned into linear bins over [0, act_max]
    for c, centre in zip(counts, centres):
        i_bin = min(int(centre / act_max * FRONTEND_BINS), FRONTEND_BINS - 1) if act_max > 0 else 0
        histogram[i_bin] += c
    cum = list(itertools.accumulate(counts)) or [0]  # percentiles 1..100: the first bin past p %
    bins = [bisect.bisect_left(cum, p / 100 * cum[-1]) for p in range(1, 101) if cum[-1]]
    top = [_frontend_example(e) for e in feat.get("top_examples") or []]
    groups = [dict(quantile_name="Top activations", examples=top)]
    # four bands of an example's "quantile" in (0, 1), the share of firings below it
    for lo in (0.75, 0.5, 0.25, 0.0):
        band = feat.get("quantile_examples") or []
        band = [_frontend_example(e) for e in band if lo <= e["quantile"] < lo + 0.25]
        if band:
            groups.append(dict(quantile_name=f"Quantile {lo:.2f}-{lo + 0.25:.2f}", examples=band))
    return dict(
        transcoder_id=transcoder_id,
        index=int(feat["feature"]),
        examples_quantiles=groups,
        top_logits=[r["token"] for r in feat.get("promoted") or []],
        bottom_logits=[r["token"] for r in feat.get("suppressed") or []],
        act_min=0.0,
        act_max=act_max,
        quantile_values=[centres[i] for i in bins],
        histogram=histogram,
        activation_frequency=float(feat.get("density") or 0),
    )


def frontend_wanted(graph):
    """{(layer, feature index): node "feature"} of the graph's transcoder features."""
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    return {(int(n["layer"]), feature_index(n)): n["feature"] for n in features}


def write_frontend_features(graph, interp_dir, out):
    """{out}/features/{node "feature"}.json for each feature node interp.py described; paths."""
    path = os.path.join(interp_dir, "features.jsonl")
    wanted = frontend_wanted(graph)
    if not wanted or not os.path.isfile(path):
        return []
    meta = graph.get("metadata", {})
    clt_dir = (meta.get("info") or {}).get("clt")  # graph.py's info names the CLT
    transcoder_id = os.path.basename(os.path.normpath(clt_dir)) if clt_dir else "clt"
    os.makedirs(os.path.join(out, "features"), exist_ok=True)
    written = []
    with open(path, encoding="utf-8") as f:
        for feat in map(json.loads, filter(str.strip, f)):
            key = (int(feat["layer"]), int(feat["feature"]))
            if key in wanted:
                written.append(os.path.join(out, "features", f"{wanted[key]}.json"))
                write_file(written[-1], json.dumps(frontend_feature(feat, transcoder_id)))
    print(f"wrote {len(written)} feature files for circuit-tracer's front end to {out}/features")
    if meta.get("scan") == FRONTEND_SCAN:
        print(
            f"  to browse: python -m circuit_tracer start-server --graph_file_dir {out}, then open "
            f"http://localhost:8041/index.html?slug={meta.get('slug', 'graph')}"
        )
    else:
        print(
            f"  circuit-tracer's front end reads them when the graph's metadata.scan is "
            f"{FRONTEND_SCAN!r} (it is {meta.get('scan')!r}): rerun graph.py to get it"
        )
    return written

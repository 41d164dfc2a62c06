"""
experiments/ctfront.py: a screenshot of our graph in circuit-tracer 0.5.0's own front end, offline,
opened at the URL graph.py prints (its pinned nodes and supernodes). The page loads d3, a d3 jetpack,
dagre and pako from CDNs; this serves a copy of it (--out/frontend) that loads npm's copies instead:

    npm install --prefix /tmp/ctnpm d3@7.9.2 d3-collection@1.0.7 d3-jetpack@2.3.0 dagre@0.8.5 pako@2.1.0
    python experiments/ctfront.py --ctfront-graph runs/graph --ctfront-npm /tmp/ctnpm/node_modules

d3-jetpack 2.3.0's UMD build assigns `global.d3 = {}` before it reads d3 from it, so it is loaded
under another name and merged into d3; the page's `c.drawAxis` (transformer-circuits' own jetpack
build) is a one-line shim over jetpack's d3.drawAxis. Needs circuit-tracer and Chromium.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import Bench, run_study
from forge.cli import arg, run_main
from forge.graphfile import frontend_url

CDN = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
NPM = {  # file in node_modules -> its name in the copy's lib/
    "d3/dist/d3.min.js": "d3.min.js",
    "d3-collection/dist/d3-collection.min.js": "d3-collection.min.js",
    "dagre/dist/dagre.min.js": "dagre.min.js",
    "pako/dist/pako.min.js": "pako.min.js",
}
SHIM = (
    "Object.assign(d3, d3jp); var conventions = d3.conventions; d3.conventions = function (o) {"
    " var c = conventions(o); c.drawAxis = function (svg) {"
    " return d3.drawAxis(Object.assign({}, c, {svg: svg || c.svg})) }; return c };\n"
)


@dataclass
class CtfrontBench(Bench):
    """our graph in circuit-tracer's front end, offline: a screenshot at the URL graph.py prints"""

    ctfront_graph: str = arg("runs/graph", "graph.py's --out (graph.json), viz.py graph run on it")
    ctfront_npm: str = arg("/tmp/ctnpm/node_modules", "node_modules with the packages above")
    ctfront_png: str = arg(os.path.join("assets", "ctfront_supernodes.png"), "the screenshot")
    ctfront_size: str = arg("1600,1000", "the browser window, width,height")
    ctfront_crop: str = arg("910,720", "the part of it kept, width,height ('' = all)")


def offline_copy(assets, npm, out):
    """A copy of the front end's page at out whose scripts come from npm's copies."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(assets, out)
    os.makedirs(os.path.join(out, "lib"))
    for src, name in NPM.items():
        shutil.copy(os.path.join(npm, src), os.path.join(out, "lib", name))
    with open(os.path.join(npm, "d3-jetpack", "build", "d3-jetpack.cjs")) as f:
        jetpack = f.read()
    umd = "factory(global.d3 = {}, global.d3"
    if umd not in jetpack:
        raise ValueError("not d3-jetpack 2.3.0's UMD build: npm install d3-jetpack@2.3.0")
    with open(os.path.join(out, "lib", "d3-jetpack.js"), "w") as f:
        f.write(jetpack.replace(umd, "factory(global.d3jp = {}, global.d3"))
    with open(os.path.join(out, "lib", "shim.js"), "w") as f:
        f.write(SHIM)
    ours = ["d3.min.js", "d3-collection.min.js", "d3-jetpack.js", "shim.js"]
    scripts = "".join(f"<script src='./lib/{name}'></script>" for name in ours)
    with open(os.path.join(out, "index.html")) as f:
        page = f.read()
    for name in ("hotserver-client-ws.js", "jetpack_2024-07-20.js", "npy_v0.js"):
        page = page.replace(f"<script src='{CDN}{name}'></script>\n", "")
    page = page.replace(f"<script src='{CDN}d3.js'></script>", scripts)
    for lib in ("dagre@0.8.5/dist/dagre.min.js", "pako@2.1.0/dist/pako.min.js"):
        page = page.replace(f"https://unpkg.com/{lib}", f"./lib/{os.path.basename(lib)}")
    if "https://" in page.split("<body")[0]:
        raise ValueError("the front end's page loads another script from the network: update NPM")
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(page)


def run(cfg):
    from circuit_tracer.frontend import local_server

    copy = os.path.join(cfg.out, "frontend")
    offline_copy(local_server.DEFAULT_FRONTEND_DIR, cfg.ctfront_npm, copy)
    handler = functools.partial(
        local_server.CircuitGraphHandler,
        frontend_dir=pathlib.Path(copy),
        data_dir=cfg.ctfront_graph,
    )
    httpd = local_server.ReusableTCPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    with open(os.path.join(cfg.ctfront_graph, "graph.json")) as f:
        qparams = json.load(f)["qParams"]
    url = frontend_url("graph", qparams, port=httpd.server_address[1])
    png = os.path.abspath(cfg.ctfront_png)
    shot = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=20000",
    ]
    shot += [f"--user-data-dir={os.path.join(cfg.out, 'chrome')}", f"--screenshot={png}"]
    subprocess.run([*shot, f"--window-size={cfg.ctfront_size}", url], check=True, timeout=300)
    httpd.shutdown()
    if cfg.ctfront_crop:
        from PIL import Image

        box = (0, 0, *map(int, cfg.ctfront_crop.split(",")))
        Image.open(png).crop(box).save(png, optimize=True)
    return [dict(png=cfg.ctfront_png, supernodes=len(qparams["supernodes"]), url=url)]


def main(argv=None):
    return run_study(__doc__, "ctfront", run, CtfrontBench, argv)


if __name__ == "__main__":
    run_main(main)

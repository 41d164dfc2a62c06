"""
demo.py: the whole clt-forge pipeline on the embedded default, in the Circuit Tracing paper's order.

    1. cache   run the tiny GPT-2 over its toy corpus once; store every layer's MLP input and output
    2. train   fit a cross-layer transcoder to those activations (and splice it back in to score it)
    3. interp  explain and score every feature from statistics alone (no language model)
    4. graph   attribution graph of a two-hop prompt through the local replacement model
    5. viz     feature browser and pages, the graph picture, training curves

Each stage is the very command a researcher would type, printed before it runs, so this file is
also the tutorial for running the scripts one by one. It is a script rather than a Makefile target
because the stages pass paths and sizes to each other and should read as one procedure.

    python demo.py                  # the README's first command: 3 minutes (186 s) on 2 idle cores
    python demo.py --small          # a reduced run that checks the plumbing (CI): ~30 s
    python demo.py --out runs/demo  # where everything goes (default runs/)
"""

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

from forge.cli import arg, parse_config, run_main


PROMPT = "Batris lives in Fafes. The language Batris speaks is"


@dataclass
class DemoConfig:
    out: str = arg("runs", "every stage writes below this folder")
    small: bool = arg(
        False, "a reduced run that checks the plumbing (CI): SMALL's sizes as defaults"
    )
    tokens: int = arg(400_000, "activation-cache rows (tokens); the CLT sees each about 2.5 times")
    features: int = arg(-1, "CLT features per layer; -1 = train.py's default (8 x d_model)")
    steps: int = arg(-1, "CLT training steps; -1 = train.py's default")
    prompt: str = arg(PROMPT, "a two-hop prompt of the toy world")
    max_features: int = arg(-1, "attribution-graph feature cap, weakest dropped first; -1 = all")


# --small: everything runs, nothing is good
SMALL = dict(tokens=20_000, features=256, steps=60, max_features=300)
# seconds each stage takes on 2 idle CPU cores (python demo.py), for the ETA; --small takes a share
SECONDS = {
    "1/5 activation cache": 11,
    "2/5 train the CLT": 114,
    "3/5 LLM-free autointerp": 41,
    "4/5 attribution graph": 3,
    "5/5 pictures: feature pages": 4,
    "5/5 pictures: graph": 3,
    "5/5 pictures: training curves": 3,
}
SMALL_SHARE = 0.18


def sized(c: DemoConfig):
    """With --small, SMALL's value for every size left at its default (an explicit flag wins)."""
    if not c.small:
        return c
    default = DemoConfig()
    return replace(c, **{k: v for k, v in SMALL.items() if getattr(c, k) == getattr(default, k)})


def stages(c: DemoConfig):
    """(title, [script, args...]) in pipeline order."""
    cache = os.path.join(c.out, "cache")
    clt = os.path.join(c.out, "clt")
    interp = os.path.join(c.out, "interp")
    graph = os.path.join(c.out, "graph")
    # --overwrite: a rerun of the demo trains afresh instead of refusing the last run's folder
    train = ["train.py", "--cache", cache, "--out", clt, "--overwrite"]
    train += ["--features", c.features] if c.features > 0 else []
    train += ["--steps", c.steps] if c.steps > 0 else []
    attribute = ["graph.py", "--clt", clt, "--interp", interp, "--prompt", c.prompt]
    attribute += ["--max-features", c.max_features, "--out", graph]
    return [
        ("1/5 activation cache", ["cache.py", "--tokens", c.tokens, "--out", cache]),
        ("2/5 train the CLT", train),
        ("3/5 LLM-free autointerp", ["interp.py", "--clt", clt, "--cache", cache, "--out", interp]),
        ("4/5 attribution graph", attribute),
        ("5/5 pictures: feature pages", ["viz.py", "features", interp]),
        ("5/5 pictures: graph", ["viz.py", "graph", os.path.join(graph, "graph.json")]),
        ("5/5 pictures: training curves", ["viz.py", "train", clt]),
    ]


def report(out):
    """The lines that end the demo: the files to open, only those that were written."""
    png = os.path.join(out, "graph", "graph.png")
    page = os.path.join(out, "graph", "graph.html")
    lines = []
    if os.path.exists(png):
        lines.append(f"attribution graph: {png} (linked page: {page})")
    elif os.path.exists(page):
        redraw = f"python viz.py graph {os.path.join(out, 'graph', 'graph.json')}"
        lines.append(
            f"attribution graph: {page} lists its nodes; no picture, because graphviz's `dot` is "
            f"not installed: apt-get install graphviz (or brew install graphviz), then {redraw}"
        )
    index = os.path.join(out, "interp", "html", "index.html")
    plots = os.path.join(out, "clt", "plots")
    for label, path in (("feature pages:    ", index), ("training curves:  ", plots)):
        if os.path.exists(path):
            lines.append(f"{label} {path}")
    return lines


def main(argv=None):
    config = sized(parse_config(__doc__, DemoConfig, argv))
    print(asdict(config))
    here = os.path.dirname(os.path.abspath(__file__))
    plan = stages(config)
    expected = [SECONDS[title] * (SMALL_SHARE if config.small else 1.0) for title, _ in plan]
    t_start = time.time()
    for i, (title, cmd) in enumerate(plan):
        cmd = [sys.executable, os.path.join(here, cmd[0])] + [str(a) for a in cmd[1:]]
        # the ETA scales the stages' times on 2 idle cores by how fast this machine has been so far
        pace = (time.time() - t_start) / sum(expected[:i]) if i else 1.0
        eta = pace * sum(expected[i:])
        print(f"\n=== {title} (demo ETA ~{eta:.0f} s)\n$ {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"error: stage {title} failed; its message is above. Fix it, then rerun")
        print(f"=== {title}: {time.time() - t0:.0f} s", flush=True)
    print(f"\ndone in {time.time() - t_start:.0f} s")
    print("\n".join(report(config.out)))


if __name__ == "__main__":
    run_main(main)

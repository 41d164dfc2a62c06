"""The README's main job, end to end at reduced size: cache -> train -> interp -> graph -> pictures;
and the demo's last lines, which name only files that were written."""

import json
import os
import shutil
import subprocess
import sys

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_small_runs_end_to_end(tmp_path):
    out = tmp_path / "runs"
    command = [sys.executable, os.path.join(ROOT, "demo.py"), "--small", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path in [
        "cache/manifest.json",
        "clt/config.json",
        "clt/metrics.jsonl",
        "interp/features.jsonl",
        "interp/html/index.html",
        "graph/graph.json",
        "graph/graph.html",
        "clt/plots/frontier.png",
    ]:
        assert (out / path).exists(), path
    graph = json.loads((out / "graph" / "graph.json").read_text())
    assert any(n["feature_type"] == "logit" for n in graph["nodes"]) and graph["links"]
    if shutil.which("dot") is not None:
        assert (out / "graph" / "graph.png").stat().st_size > 10_000
    assert "feature pages:" in proc.stdout and "attribution graph:" in proc.stdout
    for line in proc.stdout.splitlines()[-3:]:  # every path the demo ends with exists
        assert os.path.exists(line.split()[2]), line


def test_report_names_only_what_was_written(tmp_path):
    (tmp_path / "graph").mkdir()
    (tmp_path / "graph" / "graph.html").write_text("<p>nodes</p>")
    (tmp_path / "interp" / "html").mkdir(parents=True)
    (tmp_path / "interp" / "html" / "index.html").write_text("<p>index</p>")
    without_dot = "\n".join(demo.report(str(tmp_path)))
    assert "graph.png" not in without_dot and "apt-get install graphviz" in without_dot
    # no training curves were drawn
    assert "index.html" in without_dot and "plots" not in without_dot
    (tmp_path / "graph" / "graph.png").write_bytes(b"png")
    with_dot = demo.report(str(tmp_path))
    png = tmp_path / "graph" / "graph.png"
    html = tmp_path / "graph" / "graph.html"
    assert with_dot[0] == f"attribution graph: {png} (linked page: {html})"


def test_small_sizes_yield_to_explicit_flags():
    assert demo.sized(demo.DemoConfig(small=True)).tokens == demo.SMALL["tokens"]
    assert demo.sized(demo.DemoConfig(small=True, tokens=5000)).tokens == 5000
    assert demo.sized(demo.DemoConfig()).tokens == demo.DemoConfig.tokens


def test_the_readme_python_example_runs(tmp_path):
    """The README's ```python block, as printed, on a freshly initialized transcoder of models/tiny."""
    from clt import CLTConfig, CrossLayerTranscoder
    from model import load_model

    with open(os.path.join(ROOT, "README.md")) as f:
        example = f.read().split("```python\n")[1].split("```")[0]
    config = load_model().config
    fresh = CLTConfig(n_layers=config.n_layer, d_model=config.n_embd, n_features=64)
    CrossLayerTranscoder(fresh).save_pretrained(str(tmp_path / "clt"))
    code = example.replace('"runs/clt"', repr(str(tmp_path / "clt")))
    assert code != example
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replacement score" in proc.stdout and proc.stdout.count("layer ") == 5, proc.stdout

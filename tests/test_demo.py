"""The README's main job, end to end at reduced size: cache -> train -> interp -> graph -> pictures."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_small_runs_end_to_end(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path in ["cache/manifest.json", "clt/config.json", "clt/metrics.jsonl", "interp/features.jsonl",
                 "interp/html/index.html", "graph/graph.json", "graph/graph.html", "clt/plots/frontier.png"]:
        assert (out / path).exists(), path
    graph = json.loads((out / "graph" / "graph.json").read_text())
    assert any(n["feature_type"] == "logit" for n in graph["nodes"]) and graph["links"]
    if subprocess.run(["which", "dot"], capture_output=True).returncode == 0:
        assert (out / "graph" / "graph.png").stat().st_size > 10_000
    assert "feature pages:" in proc.stdout and "attribution graph:" in proc.stdout

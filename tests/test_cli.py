"""`python X.py --help` exits 0 and prints a usage for every script (and every subcommand): the first
thing a new user types. Each script runs as __main__ in this process (runpy), as `python X.py` would run
it, without paying a fresh interpreter and torch import per script."""

import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["model.py", "models/build_tiny.py", "cache.py", "train.py", "interp.py", "graph.py"]
SCRIPTS += ["viz.py", "demo.py"]
EXPERIMENTS = ["cache", "graph", "two_hop", "vs_circuit_tracer", "interp", "train", "dist"]
EXPERIMENTS += ["compactness", "scale", "gpu", "recovery", "faithfulness", "load_checks"]
EXPERIMENTS += ["llama", "quantization", "bill"]
SCRIPTS += [f"experiments/{n}.py" for n in EXPERIMENTS]
SUBCOMMANDS = ["model.py generate", "intervene.py intervene", "intervene.py generate"]
SUBCOMMANDS += ["viz.py graph", "viz.py features", "viz.py train"]


@pytest.mark.parametrize("command", SCRIPTS + SUBCOMMANDS)
def test_help_exits_zero(command, monkeypatch, capsys):
    script, *args = command.split()
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, script), *args, "--help"])
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        status = 0  # torch's elastic @record (train.py) turns SystemExit(0) into a return
    except SystemExit as e:
        status = e.code
    output = capsys.readouterr()
    assert status in (0, None), output.err[-2000:]
    assert output.out.startswith("usage: "), output.out[:500] + output.err[-2000:]

"""The tutorial's form, held: a short spine that reads top-down, the armour in forge/, arrows one way.

The spine is the top-level scripts a reader reads (demo.py apart: it only runs the others). Each
opens with its docstring, then the thing it is named for within its first 40 % of lines."""

import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPINE_BUDGET = 4000  # lines; room for streaming training, QK attributions and the Llama family
LONGEST_FUNCTION = 60  # lines, decorators and docstring included
NAMED = {  # file -> the definition it is named for
    "model.py": r"^class GPT\b",
    "parallel.py": r"^class Mesh\b",
    "clt.py": r"^class CrossLayerTranscoder\b",
    "cache.py": r"^def build_cache\(",
    "train.py": r"^def (clt_losses|train_step)\(",
    "interp.py": r"^def (explain_all|interpret|feature_stats)\(",
    "graph.py": r"^def attribute\(",
    "intervene.py": r"^def intervene\(",
    "viz.py": r"^def (draw_graph|build_dot)\(",
}


def spine():
    return sorted(f for f in glob.glob(os.path.join(ROOT, "*.py")) if not f.endswith("demo.py"))


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_the_spine_stays_within_its_budget():
    counts = {os.path.basename(f): len(lines(f)) for f in spine()}
    assert sum(counts.values()) <= SPINE_BUDGET, counts


def test_each_spine_file_opens_with_its_docstring_and_reaches_its_subject_early():
    for path in spine():
        name = os.path.basename(path)
        text = lines(path)
        assert ast.get_docstring(ast.parse("\n".join(text))), f"{name} has no module docstring"
        assert name in NAMED, f"{name} is a new spine file: name the definition it is for in NAMED"
        at = next((i for i, line in enumerate(text) if re.match(NAMED[name], line)), None)
        assert at is not None, f"{name} has no {NAMED[name]}"
        assert at <= 0.4 * len(text), (
            f"{name}: {NAMED[name]} starts at line {at + 1} of {len(text)}"
        )


def test_no_spine_function_is_longer_than_a_screen():
    long = []
    for path in spine():
        for node in ast.walk(ast.parse("\n".join(lines(path)))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > LONGEST_FUNCTION:
                    long.append(
                        f"{os.path.basename(path)}:{node.name} {node.end_lineno - start + 1}"
                    )
    assert not long, long


def test_spine_and_package_lines_fit_in_100_characters():
    files = spine() + glob.glob(os.path.join(ROOT, "forge", "*.py"))
    wide = [
        f"{os.path.relpath(f, ROOT)}:{i + 1}"
        for f in files
        for i, line in enumerate(lines(f))
        if len(line) > 100
    ]
    assert not wide, wide[:20]


def imported_modules(path):
    tree = ast.parse("\n".join(lines(path)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_the_package_never_imports_the_spine():
    """Arrows run one way: the spine calls forge/, forge/ is passed what it needs."""
    spine_modules = {os.path.basename(f)[:-3] for f in spine()} | {"demo"}
    for path in glob.glob(os.path.join(ROOT, "forge", "*.py")):
        back = sorted(set(imported_modules(path)) & spine_modules)
        assert not back, f"forge/{os.path.basename(path)} imports the spine: {back}"

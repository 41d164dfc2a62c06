"""experiments/gpu.py, the prepared GPU script, run whole on a CPU (the tiny shape, every part in
its own process, bf16 autocast on the CPU, torchrun with gloo), and the pieces a GPU session relies
on: the part runner's failure paths, torchrun's command line, the model without transformers."""

import json
import os
import time
from dataclasses import replace

import pytest

import train
from experiments import gpu
from forge.hub import load_tokenizer
from model import GPT

PARTS = [
    "machine and model",
    "cache build",
    "train.py bf16 autocast",
    "train.py fp32",
    "bf16 vs fp32 loss",
    "torchrun",
    "train step alone",
    "graph.py",
    "interp.py",
]


def test_the_gpu_script_runs_every_part_on_a_cpu(tmp_path):
    out = tmp_path / "bench"
    # a made-up peak: the MFU arithmetic runs too
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(out), "--peak-tflops", "0.05"]) == 0
    with open(out / "gpu.json") as f:
        rows = {r["part"]: r for r in json.load(f)["results"]}
    assert list(rows) == PARTS
    assert {p: r["status"] for p, r in rows.items() if r["status"] != "ok"} == {}
    timed = ("cache build", "train.py bf16 autocast", "train.py fp32", "torchrun", "graph.py")
    for part in (*timed, "interp.py"):
        assert isinstance(rows[part]["time_s"], float) and rows[part]["time_s"] > 0, rows[part]
    assert "MFU" in rows["train.py fp32"]["rate"] and "%" in rows["train.py fp32"]["rate"]
    with open(out / "gpu_curves.json") as f:
        curves = json.load(f)
    assert len(curves["bf16"]) == len(curves["fp32"]) == gpu.QUICK_GPU["gpu_steps"]
    # --autocast always reached the step (the curves differ), and bf16 moves the loss by far less
    # than the noise
    gap, noise = gpu.loss_gap(curves["bf16"], curves["fp32"])
    assert 0 < gap < noise
    assert f"max |Δ| = {gap / noise:.3g} x noise" == rows["bf16 vs fp32 loss"]["rate"]
    # the torchrun launch trains the same run as the process itself
    n = gpu.QUICK_GPU["gpu_torchrun_steps"]
    assert curves["torchrun"] == pytest.approx(curves["bf16"][:n], rel=1e-5)
    assert rows["torchrun"]["note"].startswith("equal")
    assert not (out / "gpu").exists()  # the scratch space is removed
    with open(out / "gpu_partial.json") as f:
        assert [r["part"] for r in json.load(f)] == PARTS  # rewritten after every part


def test_a_failing_a_hung_and_a_late_part_each_leave_a_row(tmp_path):
    partial = str(tmp_path / "partial.json")
    parts = gpu.GpuParts(time.time() + 600, partial, min_left=0)
    assert parts.run("fails", "-", int, "x") is None  # ValueError in its process
    assert parts.run("works", "-", int, "7") == 7
    hung = gpu.GpuParts(time.time() + 2, partial, min_left=0)
    t0 = time.perf_counter()
    assert hung.run("hangs", "-", time.sleep, 120) is None  # killed at the deadline
    assert time.perf_counter() - t0 < 60
    late = gpu.GpuParts(time.time() - 1, partial, min_left=0)
    assert late.run("late", "-", int, "7") is None  # never started
    statuses = [r["status"] for r in parts.rows + hung.rows + late.rows]
    assert statuses[0].startswith("error: ValueError: invalid literal"), statuses
    assert statuses[1].startswith("error: killed at the end of --budget-s"), statuses
    assert statuses[2].startswith("skipped"), statuses
    with open(partial) as f:
        assert json.load(f) == late.rows  # each GpuParts rewrites its rows after each row


def test_torchruns_command_line_gives_the_in_process_config_back():
    cfg = replace(gpu.GpuBench(device="cpu"), **gpu.QUICK_GPU)
    c = gpu.gpu_train_config("/cache", "/out", cfg, "always", stop_at=5)
    assert train.parse_args(gpu.config_argv(c))[0] == c


def no_transformers(monkeypatch):
    real = gpu.find_spec

    def find_spec(name):
        return None if name == "transformers" else real(name)

    monkeypatch.setattr(gpu, "find_spec", find_spec)


def failing_transformers(monkeypatch):
    def fails(path, **shape):
        os.makedirs(path)
        open(os.path.join(path, "config.json"), "w").close()  # a half-written directory
        raise TypeError("save_pretrained() got an unexpected keyword argument")

    monkeypatch.setattr(gpu, "hf_random_model_dir", fails)


CASES = [(no_transformers, "not installed"), (failing_transformers, "TypeError")]


@pytest.mark.parametrize("case, why", CASES)
def test_without_working_transformers_the_model_comes_from_random_model_dir(
    tmp_path, monkeypatch, case, why
):
    case(monkeypatch)
    path = str(tmp_path / "model")
    made = gpu.gpu_model_dir(path, gpu.TINY_SHAPE)
    assert made.startswith("GPT init") and why in made, made
    model = GPT.from_pretrained(path)
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (4, 128, 4096)
    enc = load_tokenizer(path)
    assert enc.eot_token < model.config.vocab_size and len(enc.encode("the old market")) == 14

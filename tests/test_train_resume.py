"""What --resume continues, what train.py refuses, and what a crash leaves behind (train.py's contract).

Crashes are real: a subprocess kills itself with SIGKILL (kill -9: no exception handler, no cleanup)
at the n-th call of a function, e.g. while the final export is being written.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train as T
from clt import CrossLayerTranscoder
from test_train import config, make_cache, make_model_dir, read_metrics, small_cache  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py's main, killed by SIGKILL at the n-th call of module.function (argv: module function n flags...)
KILLED_AT = """
import os, signal, sys
import train
from forge import formats
from forge.cli import run_main
module, name, n = {"formats": formats, "train": train}[sys.argv[1]], sys.argv[2], int(sys.argv[3])
real, calls = getattr(module, name), []

def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(module, name, dying)
run_main(lambda: train.main(sys.argv[4:]))
"""


def flags(cache, out, *more):
    """train.py flags of a small CPU run (no spliced-loss evaluation, to stay fast)."""
    run = "--features 64 --steps 20 --batch-size 128 --warmup 5 --eval-every -1 --log-every 1 "
    run += "--ckpt-every 10 --device cpu"
    return ["--cache", cache, "--out", str(out), *run.split(), *more]


def run_train(argv, killed_at=None):
    """python train.py ARGV in a subprocess -> CompletedProcess; killed_at=(module, function, n)."""
    cmd = [sys.executable, "train.py", *argv]
    if killed_at is not None:
        cmd = [sys.executable, "-c", KILLED_AT, *map(str, killed_at), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def latest_step(out):
    with open(os.path.join(out, "checkpoints", "latest.json")) as f:
        return json.load(f)["step"]


def small(cache, out, **kw):
    return config(cache, out, eval_every=-1, **kw)


# -----------------------------------------------------------------------------
# where a resumed run writes, and what it takes from the checkpoint


def test_resume_continues_in_the_out_it_is_given(small_cache, tmp_path):  # noqa: F811
    """A copied run folder resumes into the copy, a moved one where it now is; the checkpoint does not
    pin its old path. A torn last line of metrics.jsonl (a kill mid-write) is dropped."""
    T.train(small(small_cache, tmp_path / "a", stop_at=10))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    shutil.move(tmp_path / "a", tmp_path / "moved")
    with open(tmp_path / "copy" / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "loss": 0.')  # no newline: the process died while writing it
    T.main(["--resume", "--out", str(tmp_path / "copy"), "--cache", small_cache])
    T.main(["--resume", "--out", str(tmp_path / "moved")])  # --cache not given: the checkpoint's
    assert not os.path.exists(tmp_path / "a")  # nothing went to the old path
    for run in ("copy", "moved"):
        assert latest_step(tmp_path / run) == 20
        assert [m["step"] for m in read_metrics(tmp_path / run)] == list(range(20))
    a, b = (load_file(tmp_path / run / "W_dec_0.safetensors") for run in ("copy", "moved"))
    assert torch.equal(a["W_dec_0"], b["W_dec_0"])
    with open(os.path.join(small_cache, "manifest.json")) as f:
        model_sha = json.load(f)["identity"]["model_sha256"]
    clt = CrossLayerTranscoder.from_pretrained(tmp_path / "copy")
    assert clt.config.model_sha256 == model_sha  # the CLT names the model it belongs to


def test_resume_refuses_changed_shape_or_optimizer_flags(small_cache, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    T.train(small(small_cache, out, stop_at=10))
    rows = read_metrics(out)
    resume = ["--resume", "--out", str(out)]
    with pytest.raises(
        ValueError,
        match=r"--features 128 \(checkpoint: 64\) differ from the run in .*: drop these "
        r"flags to resume it, or start a new run in another --out",
    ):
        T.main(resume + ["--features", "128"])
    with pytest.raises(
        ValueError,
        match=r"--activation topk \(checkpoint: jumprelu\), --lr 0.01 \(checkpoint: 0.001",
    ):
        T.main(resume + ["--lr", "0.01", "--activation", "topk"])
    with pytest.raises(ValueError, match="pass one of them"):
        T.main(resume + ["--overwrite"])
    with pytest.raises(
        ValueError, match="--steps 5 is below the checkpoint's step 10 .*: pass --steps 10 or more"
    ):
        T.main(resume + ["--steps", "5"])
    assert latest_step(out) == 10 and read_metrics(out) == rows  # the refused ones wrote nothing
    # the same value is fine; --steps may change
    T.main(resume + ["--features", "64", "--steps", "30"])
    assert latest_step(out) == 30
    with open(out / "training.json") as f:
        assert json.load(f)["train_config"]["steps"] == 30


def test_resume_refuses_another_cache(small_cache, tmp_path):  # noqa: F811
    T.train(small(small_cache, tmp_path / "run", stop_at=10))
    other = make_cache(str(tmp_path), tokens=3000)
    with pytest.raises(
        ValueError,
        match=r"--cache .* is not the cache the run in .* was trained on \(it differs in "
        r"\[.*'tokens'\]\): resume with that cache",
    ):
        T.train(small(other, tmp_path / "run", resume=True))


def test_a_cache_of_another_model_is_refused(small_cache, tmp_path):  # noqa: F811
    """Same shape, other weights: the spliced loss would silently be of the wrong model."""
    other = make_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(
        ValueError, match="was made from another model than .*: pass the --model it was made from"
    ):
        T.train(small(small_cache, tmp_path / "run", model=other))
    assert not os.path.exists(tmp_path / "run")


# -----------------------------------------------------------------------------
# a new run in the folder of another


def test_a_new_run_never_takes_over_another_runs_out(small_cache, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    T.train(small(small_cache, out))
    rows = read_metrics(out)
    refused = run_train(flags(small_cache, out, "--seed", "1"))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {out} holds a run ({out}/checkpoints/latest.json): pass --resume to continue it, "
        "another --out, or --overwrite to replace it"
    )
    assert latest_step(out) == 20 and read_metrics(out) == rows
    # --overwrite, killed at its first step (before any checkpoint): the old run is gone, not resumable
    killed = run_train(
        flags(small_cache, out, "--seed", "1", "--overwrite"), killed_at=("train", "train_step", 1)
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert read_metrics(out) == [] and not os.path.exists(out / "config.json")
    with pytest.raises(
        FileNotFoundError, match="no complete checkpoint .*: start the run without --resume"
    ):
        T.train(small(small_cache, out, resume=True))


# -----------------------------------------------------------------------------
# crashes


def test_a_kill_during_the_final_export_is_repaired_by_resume(small_cache, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    T.train(small(small_cache, out))  # a whole export at step 20
    # continued to step 30, killed while writing the 3rd of its 4 layer files: two saves mixed
    killed = run_train(
        ["--resume", "--out", str(out), "--steps", "30"],
        killed_at=("formats", "save_safetensors", 3),
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert latest_step(out) == 30
    with pytest.raises(ValueError, match="comes from another save"):
        CrossLayerTranscoder.from_pretrained(out)
    repaired = run_train(["--resume", "--out", str(out)])
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    CrossLayerTranscoder.from_pretrained(out)  # whole again
    with open(out / "training.json") as f:
        done = json.load(f)
    with open(out / "config.json") as f:
        assert done["step"] == 30 and done["export_id"] == json.load(f)["export_id"]
    assert done["final"]["step"] == 29  # the last step's metrics, kept in the checkpoint
    T.train(small(small_cache, out, steps=30, resume=True))  # complete and whole: nothing to do
    with open(out / "training.json") as f:
        assert json.load(f)["export_id"] == done["export_id"]


def test_checkpoint_files_are_fsynced(small_cache, tmp_path, monkeypatch):  # noqa: F811
    synced = []
    fsync = os.fsync

    def recording(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name the fsynced files")
    monkeypatch.setattr(os, "fsync", recording)
    T.train(small(small_cache, tmp_path, steps=2, ckpt_every=1))
    fsynced = ("tp0-mesh1x1.safetensors.tmp", "latest.json.tmp", "metrics.jsonl")
    for name in (*fsynced, "training.json.tmp"):
        assert name in synced, (name, synced)

"""train.py --wandb PROJECT, offline (WANDB_MODE=offline): the rows of metrics.jsonl, in one run id across a resume.

wandb is optional (requirements-test.txt installs it); without it this file is skipped.
"""

import glob
import json
import os
import struct

import pytest

from test_train import read_metrics, small_cache  # noqa: F401 (small_cache is a fixture)
from test_train_resume import flags, latest_step, run_train

pytest.importorskip("wandb")


def wandb_history(path):
    """The history rows ({key: value}) of an offline run file, run-ID.wandb: a LevelDB-style log of 32 KiB
    blocks whose records (4-byte crc, 2-byte length, 1-byte type: 1 whole, 2 first, 3 middle, 4 last)
    carry wandb's Record protobufs, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def test_wandb_logs_the_rows_into_one_run_across_a_resume(small_cache, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    wandb = ["--wandb", "clt-forge-test", "--stop-at", "10", "--eval-every", "10"]
    first = run_train(flags(small_cache, out, *wandb))
    assert first.returncode == 0, first.stderr[-3000:]
    # --wandb not given: the checkpoint's project and run
    second = run_train(["--resume", "--out", str(out)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert latest_step(out) == 20
    with open(out / "checkpoints" / "latest.json") as f:
        run_id = json.load(f)["wandb_id"]
    files = sorted(
        glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}*" / f"run-{run_id}.wandb"))
    )
    assert len(files) == 2  # one per invocation, one run id: `wandb sync` joins them
    logged = {row["_step"]: row for path in files for row in wandb_history(path)}
    rows = read_metrics(out)
    assert sorted(logged) == [m["step"] for m in rows] == list(range(20))
    for m in rows:
        w = logged[m["step"]]
        assert w["loss"] == pytest.approx(m["loss"]), m["step"]
        assert w["fvu/1"] == pytest.approx(m["fvu"][1]), m["step"]
        if "eval" in m:
            assert w["eval/recovered"] == pytest.approx(m["eval"]["recovered"])
    assert sum("eval" in m for m in rows) == 2


def test_wandb_missing_is_a_clear_error(small_cache, tmp_path, monkeypatch):  # noqa: F811
    import train as T
    from forge import checkpoint
    from test_train import config

    monkeypatch.setattr(checkpoint, "find_spec", lambda name: None)
    with pytest.raises(
        ValueError, match="--wandb needs the wandb package: pip install wandb, or drop --wandb"
    ):
        T.train(config(small_cache, tmp_path, wandb="p"))
    assert not os.path.exists(tmp_path / "metrics.jsonl")

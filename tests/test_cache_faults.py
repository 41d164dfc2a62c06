"""cache.py under faults: damaged shards are never read and are repaired, advice is true, shard
names stay in the cache, the command line fails in one line."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import cache
from conftest import cache_config, docs
from forge import shards
from forge.hub import ENDOFTEXT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text(ENDOFTEXT.join(docs(400)))
    return str(path)


def files(out):
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out))}


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def inside_mlp_in(out, i=2):
    """A byte inside shard i's mlp_in section (the header stays intact: only a crc32 can tell)."""
    m = json.loads((out / "manifest.json").read_text())
    off, _ = shards.shard_layout(m["dtype"], m["shards"][i]["rows"], m["n_layers"], m["d_model"])
    return out / shards.shard_name(i), off["mlp_in"] + 1000


def test_a_damaged_row_is_never_read(hub_model, corpus, tmp_path):
    cfg = cache_config(hub_model[0], corpus, tmp_path / "c")
    cache.build_cache(cfg)
    flip(*inside_mlp_in(tmp_path / "c"))
    c = cache.ActivationCache(cfg.out)  # opening checks sizes and headers only: they are fine
    with pytest.raises(
        ValueError,
        match=r"shard_00002.bin: rows 0..\d+ fail their crc32 check .*python cache.py build",
    ):
        all(rows is not None for rows in c.batches(64, epochs=1))  # on a worker thread, raised here
    with pytest.raises(ValueError, match="shard_00002.bin: rows .* crc32"):
        c.read(0, c.n_tokens)
    good = cache.ActivationCache(cfg.out)
    lo = int(good.files.starts[3])
    good.read(lo, good.n_tokens)  # the other shards still read


@pytest.fixture
def built(hub_model, corpus, tmp_path):
    """A cache built at tmp_path/c -> (its config, its folder, its files' bytes)."""
    out = tmp_path / "c"
    cfg = cache_config(hub_model[0], corpus, out)
    cache.build_cache(cfg)
    return cfg, out, files(out)


def test_build_repairs_damaged_and_missing_shards_byte_identical(built, capsys):
    cfg, out, before = built
    flip(*inside_mlp_in(out, 2))
    os.remove(out / shards.shard_name(4))
    assert cache.build_cache(cfg)["seconds"] > 0  # not "already complete"
    said = capsys.readouterr().out
    assert "repairing shard_00002.bin: rows" in said
    assert "repairing shard_00004.bin: missing" in said
    assert "already complete" not in said
    assert files(out) == before and shards.verify(cfg.out) == []
    assert cache.build_cache(cfg)["seconds"] == 0.0  # now it is complete
    assert "already complete" in capsys.readouterr().out


def test_the_repair_command_in_a_read_error_repairs(hub_model, corpus, tmp_path):
    out = tmp_path / "c"
    cache.build_cache(cache_config(hub_model[0], corpus, out, dtype="fp16"))
    before = files(out)
    flip(*inside_mlp_in(out, 1))
    with pytest.raises(ValueError) as e:
        cache.ActivationCache(str(out)).read(0, 2000)
    command = str(e.value).split("`")[1]  # the message says exactly what to run
    assert command.startswith("python cache.py build ") and "--dtype fp16" in command
    assert cache.main(shlex.split(command)[2:]) == 0
    assert files(out) == before


def test_verify_prints_the_repair_command(built, capsys):
    cfg, out, _ = built
    flip(*inside_mlp_in(out, 3))
    assert cache.main(["verify", cfg.out]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("BAD shard_00003.bin: sha256")
    assert "python cache.py build" in lines[-1]


def test_overwrite_rebuilds_even_with_the_same_arguments(built, capsys):
    cfg, out, before = built
    # a leftover of an older cache: --overwrite removes it
    (out / "shard_00099.bin").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")  # not a cache file: kept
    m = cache.build_cache(cache.CacheConfig(**{**vars(cfg), "overwrite": True}))
    assert m["seconds"] > 0 and "already complete" not in capsys.readouterr().out
    assert files(out) == {**before, "notes.txt": b"mine"}


@pytest.mark.parametrize(
    "name", ["../outside.bin", "/tmp/outside.bin", "sub/shard_00000.bin", "shard_00001.bin"]
)
def test_shard_names_outside_the_cache_are_refused(hub_model, corpus, tmp_path, name):
    out = tmp_path / "c"
    cfg = cache_config(hub_model[0], corpus, out, tokens=600)
    cache.build_cache(cfg)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not yours")
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0]["file"] = name
    (out / "manifest.json").write_text(json.dumps(m))
    for action in (cache.ActivationCache, shards.verify, lambda _: cache.build_cache(cfg)):
        with pytest.raises(
            ValueError, match=r"lists shard 0 as .*, not 'shard_00000.bin'.*--overwrite"
        ):
            action(cfg.out)
    cache.build_cache(cache.CacheConfig(**{**vars(cfg), "overwrite": True}))  # the advice works
    cache.ActivationCache(cfg.out)
    assert outside.read_bytes() == b"not yours"


def test_a_cache_of_another_format_version_is_refused_and_overwrite_rebuilds(
    hub_model, corpus, tmp_path
):
    out = tmp_path / "c"
    cfg = cache_config(hub_model[0], corpus, out, tokens=600)
    cache.build_cache(cfg)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(m, version=1)))
    for action in (cache.ActivationCache, lambda _: cache.build_cache(cfg)):
        with pytest.raises(
            ValueError, match="version 1, this cache.py reads .* version 2: .*--overwrite"
        ):
            action(cfg.out)
    cache.build_cache(cache.CacheConfig(**{**vars(cfg), "overwrite": True}))
    assert shards.verify(cfg.out) == []


def test_a_bad_corpus_line_fails_the_command_line_in_one_line(hub_model, tmp_path):
    lines = [json.dumps({"text": d}) for d in docs(300)]
    lines[19] = '{"text": "cut off'
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    args = [
        "--model",
        hub_model[0],
        "--corpus",
        str(tmp_path / "c.jsonl"),
        "--tokens",
        "3000",
        "--ctx",
        "16",
        "--shard-tokens",
        "256",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
    ]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "cache.py"), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    # one line, no traceback
    bad = tmp_path / "c.jsonl"
    said = f"error: {bad} line 20: not valid JSON \\(.*\\): fix or delete that line"
    assert re.fullmatch(said, r.stderr.strip())
    # the shards before the bad line are whole, and listed as unfinished
    names = os.listdir(tmp_path / "out")
    assert not [n for n in names if n.endswith(".tmp")]
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_help_and_subcommands(capsys):
    for argv in (["--help"], ["build", "--help"], ["verify", "--help"]):
        with pytest.raises(SystemExit) as e:
            cache.main(argv)
        assert e.value.code == 0
    said = capsys.readouterr().out
    assert "--text-field" in said and "--overwrite" in said and "paths" in said
    with pytest.raises(
        ValueError, match="needs a cache directory, e.g. `python cache.py verify runs/cache`"
    ):
        cache.main(["verify"])


def test_dequantize_moves_the_stored_rows(hub_model, corpus, tmp_path):
    cfg = cache_config(hub_model[0], corpus, tmp_path / "c", tokens=600)
    cache.build_cache(cfg)
    c = cache.ActivationCache(cfg.out)
    rows = next(c.batches(100, epochs=1))
    assert rows.mlp_in.dtype == torch.int8 and rows.scales.dtype == torch.int16
    assert rows.ids.shape == (100,)
    x_in, _ = c.dequantize(rows, "cpu")
    r_in, *_ = c.read(0, c.n_tokens)
    assert torch.equal(x_in, r_in[rows.ids])

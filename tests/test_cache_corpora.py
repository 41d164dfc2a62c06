"""forge/corpora.py, the corpora of cache.py: .json lists, folders of .jsonl, parquet files and folders, Hugging Face datasets
(a local folder through `hf:`, offline), --text-field; bad input names the file and line; resume stays
byte-identical for every source."""

import json
import sys

import pytest

import cache
from conftest import cache_config, docs, mark_unfinished
from forge import corpora


def read(corpus, **kw):
    return list(corpora.iter_documents(str(corpus), **kw))


def write_parquet(path, texts, column="text"):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(
        pa.table({column: texts, "id": list(range(len(texts)))}), str(path), row_group_size=64
    )
    return path


def test_json_list_of_strings_or_objects(tmp_path):
    d = docs(50)
    (tmp_path / "strings.json").write_text(json.dumps(d))
    (tmp_path / "objects.json").write_text(
        json.dumps([{"body": t, "n": i} for i, t in enumerate(d)])
    )
    assert read(tmp_path / "strings.json") == d
    assert read(tmp_path / "objects.json", text_field="body") == d
    (tmp_path / "dict.json").write_text(json.dumps({"text": "one"}))
    with pytest.raises(
        ValueError, match="dict.json holds a JSON dict, not a list of documents: pass a JSON list"
    ):
        read(tmp_path / "dict.json")
    with pytest.raises(
        ValueError,
        match=r"objects.json item 0: expected a string or an object with a string 'text' "
        r"field \(fields \['body', 'n'\]\): pass --text-field NAME",
    ):
        read(tmp_path / "objects.json")


def test_folder_of_jsonl_files(tmp_path):
    d = docs(90)
    for i in range(3):
        rows = [json.dumps({"content": t}) for t in d[30 * i : 30 * (i + 1)]]
        # blank lines are skipped
        (tmp_path / f"part{i}.jsonl").write_text("\n".join(rows) + "\n\n")
    (tmp_path / "dataset_info.json").write_text("{}")  # metadata beside the data: not read
    assert read(tmp_path, text_field="content") == d
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt, .jsonl or .parquet file"):
        read(tmp_path / "empty")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_invalid_utf8_names_file_and_line(tmp_path, suffix):
    good = {
        ".txt": b"a cat\nsat\n",
        ".jsonl": b'{"text": "a cat"}\n{"text": "sat"}\n',
        ".json": b'[\n"a",\n',
    }[suffix]
    path = tmp_path / f"bad{suffix}"
    # the bad byte on line 3, then more
    path.write_bytes(good + b'"on a m\xffat"\n' + b"x" * (3 << 20))
    with pytest.raises(
        ValueError, match=rf"bad{suffix} line 3: invalid UTF-8 \(byte 0xff\): re-encode the file"
    ):
        read(path)


def test_broken_json_names_file_and_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(
        ValueError, match=r"c.jsonl line 2: not valid JSON \(.*\): fix or delete that line"
    ):
        read(tmp_path / "c.jsonl")
    (tmp_path / "c.json").write_text('[\n"a",\n"b"\n"c"]')
    with pytest.raises(ValueError, match=r"c.json line 4: not valid JSON \(.*\): fix the file"):
        read(tmp_path / "c.json")


def test_parquet_file_folder_and_text_field(tmp_path):
    d = docs(300)
    write_parquet(tmp_path / "one.parquet", d, column="content")
    assert read(tmp_path / "one.parquet", text_field="content") == d
    with pytest.raises(
        ValueError,
        match=r"one.parquet has no column 'text' \(columns \['content', 'id'\]\): "
        "pass --text-field COLUMN",
    ):
        read(tmp_path / "one.parquet")
    (tmp_path / "dir").mkdir()
    write_parquet(tmp_path / "dir" / "b.parquet", d[100:])
    write_parquet(tmp_path / "dir" / "a.parquet", d[:100])
    assert read(tmp_path / "dir") == d
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet: not a readable parquet file"):
        read(tmp_path / "junk.parquet")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the pyarrow package: pip install pyarrow"):
        read(path)


@pytest.fixture
def offline_datasets(monkeypatch):
    """The datasets package, told that there is no network."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


def test_hf_dataset_from_a_local_folder(tmp_path, offline_datasets):
    d = docs(200)
    (tmp_path / "ds").mkdir()
    write_parquet(tmp_path / "ds" / "train.parquet", d, column="content")
    assert read(f"hf:{tmp_path / 'ds'}", text_field="content") == d
    assert read(f"hf:{tmp_path / 'ds'}::train", text_field="content") == d
    with pytest.raises(
        ValueError,
        match=r"cannot open the Hugging Face dataset of --corpus hf:.*validation "
        r"\(.*split.*\): check NAME\[:config\]\[:split\]",
    ):
        read(f"hf:{tmp_path / 'ds'}::validation")


def test_hf_offline_says_so(offline_datasets):
    with pytest.raises(
        ValueError,
        match=r"cannot open the Hugging Face dataset of --corpus hf:no-such/dataset "
        r"\(.*\): check .* and the network",
    ):
        read("hf:no-such/dataset")


def test_hf_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(
        ValueError, match="hf:no-such/dataset needs the datasets package: pip install datasets"
    ):
        read("hf:no-such/dataset")


@pytest.mark.parametrize("source", ["parquet", "hf"])
def test_resume_is_byte_identical(hub_model, tmp_path, source, monkeypatch):
    d = docs(300)
    (tmp_path / "ds").mkdir()
    write_parquet(tmp_path / "ds" / "train.parquet", d)
    corpus = str(tmp_path / "ds" / "train.parquet")
    if source == "hf":
        monkeypatch.setattr(pytest.importorskip("datasets").config, "HF_HUB_OFFLINE", True)
        corpus = f"hf:{tmp_path / 'ds'}"
    cfg = cache_config(hub_model[0], corpus, tmp_path / "c", heldout=0.02)
    whole = cache.build_cache(cfg)
    before = {
        p.name: p.read_bytes() for p in (tmp_path / "c").iterdir() if p.name != "manifest.json"
    }
    mark_unfinished(tmp_path / "c")
    for name in before:
        if name not in ("shard_00000.bin", "shard_00001.bin"):
            (tmp_path / "c" / name).unlink()
    resumed = cache.build_cache(cfg)
    assert resumed["shards"] == whole["shards"] and len(whole["shards"]) == 6
    assert {
        p.name: p.read_bytes() for p in (tmp_path / "c").iterdir() if p.name != "manifest.json"
    } == before

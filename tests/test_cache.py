"""cache.py: round trips per dtype, resume after kill -9, verify, rank shares, shuffling, norms, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import cache
from conftest import mark_unfinished
from forge import corpora, shards
from forge.hub import ENDOFTEXT, bytes_to_unicode, load_tokenizer
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(tokens=3000, ctx=16, shard_tokens=512, batch_size=8, heldout=0.1)


def make_model_dir(path, seed=0, n_ctx=32):
    """A small random GPT-2 in the hub layout plus a tiny BPE tokenizer (bytes, 3 merges, <|endoftext|>)."""
    torch.manual_seed(seed)
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=n_ctx, vocab_size=300)).save_pretrained(
        path
    )
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[ENDOFTEXT] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return path


def make_docs(n, seed=0):
    rng = random.Random(seed)
    words = "the cat sat on a mat then the dog ran far away into hills where nobody went".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model_dir = make_model_dir(root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text(ENDOFTEXT.join(make_docs(1500)))
    return root, str(model_dir), str(corpus)


def config(env, out, **kw):
    root, model_dir, corpus = env
    return cache.CacheConfig(
        **{**dict(model=model_dir, corpus=corpus, out=str(root / out), device="cpu"), **SMALL, **kw}
    )


@pytest.fixture(scope="module")
def int8_cache(env):
    cfg = config(env, "int8")
    cache.build_cache(cfg)
    return cfg, cache.ActivationCache(cfg.out)


def direct_acts(cfg):
    """What the cache should hold, computed directly with the writer's batch grid."""
    model, enc = GPT.from_pretrained(cfg.model), load_tokenizer(cfg.model)
    x_in, x_out, metas = [], [], []
    with torch.inference_mode():
        for _, idx, meta in cache.iter_batches(cfg, enc, cfg.tokens):
            _, acts = model.run_with_acts(idx)
            x_in.append(acts.mlp_in[:, 1:].flatten(0, 1))
            x_out.append(acts.mlp_out[:, 1:].flatten(0, 1))
            metas.append(meta)
    n = cfg.tokens
    return torch.cat(x_in)[:n], torch.cat(x_out)[:n], np.concatenate(metas)[:n]


# -----------------------------------------------------------------------------
# round trips, norms, verify


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp16", "fp32"])
def test_round_trip_within_error_bound(env, int8_cache, dtype):
    if dtype == "int8":
        cfg, c = int8_cache
    else:
        cfg = config(env, dtype, dtype=dtype)
        cache.build_cache(cfg)
        c = cache.ActivationCache(cfg.out)
    x_in, x_out, meta = direct_acts(cfg)
    r_in, r_out, tok, doc, pos = c.read(0, c.n_tokens)
    assert c.n_tokens == cfg.tokens
    assert r_in.shape == (cfg.tokens, 2, 32) and r_in.dtype == torch.float32
    assert np.array_equal(np.stack([tok, doc, pos], 1), meta)
    assert pos.min() == 1 and pos.max() == cfg.ctx - 1  # the BOS (position 0) is dropped
    assert (c.channel_scale is None) == (dtype not in ("int8", "int4"))
    for j, (x, r) in enumerate(((x_in, r_in), (x_out, r_out))):
        if dtype == "fp32":
            assert torch.equal(x, r)
        elif dtype == "fp16":
            assert ((x - r).abs() <= x.abs() * 2**-11 + 1e-7).all()
        else:  # |x - x_hat| <= channel * scale/2, scale = max|x / channel| / levels over a row
            # (int8) or a group of INT4_GROUP channels (int4), up to bf16 rounding
            ch = c.channel_scale[j]  # (L, d)
            g = shards.INT4_GROUP if dtype == "int4" else x.size(-1)
            levels = 7 if dtype == "int4" else 127
            y = (x / ch).unflatten(-1, (-1, g))  # (n, L, d/g, g)
            half_step = y.abs().amax(-1, keepdim=True) / levels * 0.5 * (1 + 2**-7)
            bound = half_step.expand_as(y).flatten(-2) * ch
            assert ((x - r).abs() <= bound + 1e-7).all()
            nmse = ((x - r) ** 2).sum() / (x**2).sum()
            assert 0 < nmse < (2e-2 if dtype == "int4" else 1e-4)
    m = c.manifest
    want = (x_in - r_in).pow(2).sum() / x_in.pow(2).sum()
    assert m["nmse_total"][0] == pytest.approx(want.item(), rel=1e-3, abs=1e-12)


def test_channel_scales_tame_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, 64, generator=g)  # (n, L, d)
    x[:, :, 7] *= 30  # one outlier channel, as trained models have

    def nmse(xh):
        return ((x - xh) ** 2).sum() / (x**2).sum()

    q, s, _ = cache.quantize_(x.clone())
    plain = nmse(cache.dequantize(q, cache.bf16_bits(s), torch.ones(2, 64)))
    c = cache.channel_scales(x[:1000])  # (L, d), calibrated on other rows than it is tested on
    q, s, _ = cache.quantize_(x / c)
    evened = nmse(cache.dequantize(q, cache.bf16_bits(s), c))
    assert evened < 1e-4 < plain and evened < plain / 5


def test_manifest_norms_match_direct_computation(int8_cache):
    cfg, c = int8_cache
    x_in, x_out, _ = direct_acts(cfg)
    torch.testing.assert_close(c.norm_in, x_in.norm(dim=-1).mean(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(c.norm_out, x_out.norm(dim=-1).mean(0), rtol=1e-5, atol=0)
    m = c.manifest
    assert m["splits"]["train"][1] % (cfg.ctx - 1) == 0 and m["splits"]["heldout"][1] == cfg.tokens
    assert sum(s["rows"] for s in m["shards"]) == cfg.tokens and len(m["shards"]) == -(
        -cfg.tokens // 512
    )


def test_verify_names_a_flipped_byte(env, tmp_path):
    cfg = config(env, tmp_path / "flip")
    cache.build_cache(cfg)
    assert shards.verify(cfg.out) == []
    shard = os.path.join(cfg.out, "shard_00002.bin")
    with open(shard, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    bad = shards.verify(cfg.out)
    assert len(bad) == 1 and bad[0].startswith("shard_00002.bin: sha256")
    assert cache.main(["verify", cfg.out]) == 1
    with open(shard, "r+b") as f:  # a wrong magic number is caught cheaply, on opening
        f.write(np.int64(7).tobytes())
    with pytest.raises(ValueError, match="magic 7.*--overwrite"):
        cache.ActivationCache(cfg.out)
    with open(shard, "ab") as f:  # a size mismatch too
        f.write(b"\0")
    with pytest.raises(ValueError, match="shard_00002.bin: .* bytes, manifest says"):
        cache.ActivationCache(cfg.out)


# -----------------------------------------------------------------------------
# resume


def run_cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "cache.py"), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_resume_after_kill_is_byte_identical(env, tmp_path):
    root, model_dir, corpus = env
    args = [
        "--model",
        model_dir,
        "--corpus",
        corpus,
        "--tokens",
        "12000",
        "--ctx",
        "16",
        "--shard-tokens",
        "400",
        "--batch-size",
        "1",
        "--device",
        "cpu",
    ]
    ref = run_cli(args + ["--out", str(tmp_path / "ref")])
    killed = run_cli(args + ["--out", str(tmp_path / "run")])
    manifest = tmp_path / "run" / "manifest.json"
    deadline = time.time() + 120
    while (
        time.time() < deadline and killed.poll() is None
    ):  # wait for a finished shard, then kill -9
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert killed.wait() == -signal.SIGKILL, "the writer finished before it could be killed"
    assert not json.loads(manifest.read_text())["complete"]
    assert run_cli(args + ["--out", str(tmp_path / "run")]).wait() == 0
    assert ref.wait() == 0, ref.stderr.read().decode()
    names = sorted(os.listdir(tmp_path / "ref"))
    assert names == sorted(os.listdir(tmp_path / "run"))
    assert len(names) == 31  # 30 shards + manifest
    for name in names:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "run" / name).read_bytes(), (
            name
        )


def test_resume_refuses_a_changed_corpus(env, tmp_path):
    corpus = tmp_path / "c.txt"
    text = ENDOFTEXT.join(make_docs(300, seed=5))
    corpus.write_text(text)
    # fp16: no channel scales
    cfg = config(env, tmp_path / "r", corpus=str(corpus), tokens=2000, dtype="fp16")
    whole = cache.build_cache(cfg)
    mark_unfinished(tmp_path / "r")
    corpus.write_text(ENDOFTEXT.join(make_docs(300, seed=6)))
    with pytest.raises(
        ValueError, match="now gives other tokens than those stored in shard_00001.bin"
    ):
        cache.build_cache(cfg)
    corpus.write_text(text)
    # resumes mid-batch (1024 rows = 8.5 batches of 120) and agrees
    resumed = cache.build_cache(cfg)
    assert resumed["shards"] == whole["shards"] and shards.verify(cfg.out) == []


def test_manifest_rewrites_are_few_and_its_totals_cover_the_listed_shards(
    env, tmp_path, monkeypatch
):
    """The manifest is rewritten once the shards since its last write hold MANIFEST_RATIO x its bytes,
    not after every shard; a manifest cut by hand (its totals cover more shards than it lists) is
    counted again, so its norms and NMSE come out as a whole build's."""
    cfg = config(env, tmp_path / "m", shard_tokens=40, dtype="fp16")
    sizes = []
    write_json = shards.write_json

    def counted(path, obj, **kw):
        write_json(path, obj, **kw)
        sizes.append(os.path.getsize(path))

    monkeypatch.setattr(shards, "write_json", counted)
    whole = cache.build_cache(cfg)
    n = len(whole["shards"])
    assert n == 75 and len(sizes) < n / 4, sizes
    mark_unfinished(tmp_path / "m")
    resumed = cache.build_cache(cfg)
    assert resumed["shards"] == whole["shards"] and resumed["sums"]["shards"] == n
    for key in ("norm_in", "norm_out", "nmse_in", "nmse_out", "nmse_total"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-12), key


def test_rerun_same_args_is_a_no_op_and_other_args_are_refused(env, int8_cache):
    cfg, _ = int8_cache
    before = os.path.getmtime(os.path.join(cfg.out, "shard_00000.bin"))
    assert cache.build_cache(cfg)["seconds"] == 0.0
    assert os.path.getmtime(os.path.join(cfg.out, "shard_00000.bin")) == before
    with pytest.raises(ValueError, match="other arguments.*'ctx': \\(16, 17\\).*--overwrite"):
        cache.build_cache(config(env, cfg.out, ctx=17))


def test_overwrite_and_a_different_model(env, tmp_path):
    cfg = config(env, tmp_path / "c", tokens=600)
    cache.build_cache(cfg)
    other = str(make_model_dir(tmp_path / "other", seed=1))
    with pytest.raises(ValueError, match="model_sha256"):
        cache.build_cache(config(env, cfg.out, tokens=600, model=other))
    with pytest.raises(ValueError, match="made by model"):
        cache.ActivationCache(cfg.out, model=GPT.from_pretrained(other))
    cache.ActivationCache(cfg.out, model=GPT.from_pretrained(cfg.model))  # the right model opens
    cache.build_cache(config(env, cfg.out, tokens=600, model=other, overwrite=True))
    cache.ActivationCache(cfg.out, model=GPT.from_pretrained(other))


# -----------------------------------------------------------------------------
# reader: shuffling, rank shares, in-order chunks


def small_units(c):
    """The same cache, read with 2 units of 64 rows (128 rows) per shuffle window."""
    return cache.ActivationCache(c.path, unit_rows=64, window_mb=0.02)


def rows_of(c, **kw):
    return [rows.ids.numpy() for rows in small_units(c).batches(**kw)]


SHUF = dict(batch_size=50, epochs=1)


def test_rank_shares_are_disjoint_equal_and_cover(int8_cache):
    _, c = int8_cache
    lo, hi = c.split_range("train")
    W, B = 3, SHUF["batch_size"]
    shares = [rows_of(c, seed=5, rank=r, world=W, **SHUF) for r in range(W)]
    nb = c.batches_per_epoch(B, W)
    assert nb == (hi - lo) // (B * W) and all(len(s) == nb for s in shares)
    flat = np.concatenate([np.concatenate(s) for s in shares])
    assert len(np.unique(flat)) == len(flat) == nb * B * W  # disjoint
    # cover all but the remainder
    assert flat.min() >= lo
    assert flat.max() < hi
    assert hi - lo - len(flat) < B * W
    # the ranks' batches at step g are the one-rank batch of B*W at step g: world size changes nothing
    single = rows_of(c, seed=5, **{**SHUF, "batch_size": B * W})
    for g in range(nb):
        assert np.array_equal(np.sort(np.concatenate([s[g] for s in shares])), single[g])


def test_shuffle_is_deterministic_per_seed_and_resumable(int8_cache):
    _, c = int8_cache
    a, b, other = rows_of(c, seed=1, **SHUF), rows_of(c, seed=1, **SHUF), rows_of(c, seed=2, **SHUF)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(other))
    # shuffled across the whole split: a batch mixes units from all over it, in no order
    assert all((np.diff(b) > 0).all() for b in a)  # a batch is a set of rows, read in row order
    assert np.mean([len(np.unique(b // 64)) >= 2 for b in a]) > 0.5
    assert abs(np.corrcoef([b.mean() for b in a], np.arange(len(a)))[0, 1]) < 0.5
    # a later epoch is a different order; start_step skips exactly to where step k starts
    two = rows_of(c, seed=1, **{**SHUF, "epochs": 2})
    nb = len(a)
    assert len(two) == 2 * nb and not np.array_equal(
        np.concatenate(two[:nb]), np.concatenate(two[nb:])
    )
    for k in (3, nb, nb + 2):
        assert all(
            np.array_equal(x, y)
            for x, y in zip(
                rows_of(c, seed=1, start_step=k, **{**SHUF, "epochs": 2}), two[k:], strict=True
            )
        )


def test_batches_hold_the_rows_they_name(int8_cache):
    _, c = int8_cache
    raw = next(small_units(c).batches(32, seed=0))  # the stored rows themselves
    x_in, x_out = c.dequantize(raw)
    rows = raw.ids
    r_in, r_out, *_ = c.read(0, c.n_tokens)
    assert x_in.shape == (32, 2, 32)
    assert torch.equal(x_in, r_in[rows]) and torch.equal(x_out, r_out[rows])
    assert raw.mlp_in.dtype == torch.int8 and torch.equal(raw.ids, rows)
    assert all(torch.equal(a, b) for a, b in zip(c.dequantize(raw), (x_in, x_out)))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:  # device=...: the stored int8 rows move there and are dequantized there
        y_raw = next(small_units(c).batches(32, seed=0))
        y_in, y_out = c.dequantize(y_raw, dev)
        y_rows = y_raw.ids
        assert y_in.device.type == dev
        assert torch.equal(y_rows, rows) and torch.equal(y_in.cpu(), x_in)
    before = set(threading.enumerate())
    stream = small_units(c).batches(32, seed=0)  # endless; stopping it stops its threads
    next(stream)
    assert set(threading.enumerate()) - before
    stream.close()
    deadline = time.time() + 10
    while any(t.is_alive() for t in set(threading.enumerate()) - before) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in set(threading.enumerate()) - before)
    assert c.batches_per_epoch(100, split="heldout") == 3
    endless = c.batches(100, seed=0, split="heldout")  # epochs=None: endless
    rows = [b.ids for _, b in zip(range(9), endless)]
    assert len(rows) == 9
    for i in (0, 3, 6):  # each epoch: every held-out row once
        epoch = np.sort(np.concatenate(rows[i : i + 3]))
        assert np.array_equal(epoch, np.arange(2700, 3000)), i


def test_iter_chunks_streams_a_split_in_order(int8_cache):
    _, c = int8_cache
    lo, hi = c.split_range("heldout")
    chunks = list(c.iter_chunks(100, split="heldout"))
    assert [len(ch[2]) for ch in chunks][:-1] == [100] * (len(chunks) - 1)
    r_in, _, tok, doc, pos = c.read(lo, hi)
    assert torch.equal(torch.cat([ch[0] for ch in chunks]), r_in) and torch.equal(
        torch.cat([ch[2] for ch in chunks]), tok
    )
    assert (np.diff(doc.numpy()) >= 0).all() and pos[
        0
    ] == 1  # held out: whole contexts, in corpus order


# -----------------------------------------------------------------------------
# corpora and bad input


def test_contexts_pack_documents_behind_a_bos(env):
    enc = load_tokenizer(env[1])
    E, (a, b, c, d, e, f) = enc.eot_token, enc.encode_ordinary("abcdef")
    ctxs = list(cache.iter_contexts(["ab", "cde", "f"], enc, 4))  # stream: a b E c d e E f E
    assert [t.tolist() for t, _ in ctxs] == [[E, a, b, E], [E, c, d, e], [E, E, f, E]]
    assert [i.tolist() for _, i in ctxs] == [
        [0, 0, 0, 0],
        [1, 1, 1, 1],
        [1, 1, 2, 2],
    ]  # E ends its document


def test_jsonl_and_directory_corpora_match_the_text_file(env, tmp_path):
    docs = make_docs(200, seed=3)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "dir").mkdir()
    for i in range(0, 200, 50):
        (tmp_path / "dir" / f"{i:03d}.txt").write_text(ENDOFTEXT.join(docs[i : i + 50]))
    got = [list(corpora.iter_documents(str(p))) for p in (tmp_path / "c.jsonl", tmp_path / "dir")]
    assert got[0] == docs and got[1] == docs
    cfg = config(env, tmp_path / "j", corpus=str(tmp_path / "c.jsonl"), tokens=500, keep_bos=True)
    m = cache.build_cache(cfg)
    assert m["n_tokens"] == 500
    _, _, tok, doc, pos = cache.ActivationCache(cfg.out).read(0, 16)
    assert pos.tolist() == list(range(16))
    assert tok[0] == 259 and doc[0] == 0  # BOS kept: <|endoftext|>


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ctx=64), "ctx=64 must be in 2..n_ctx=32"),
        (dict(dtype="int2"), "unknown dtype 'int2'"),
        (dict(tokens=10**13), "needs .* GB more"),
    ],
)
def test_bad_arguments(env, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        cache.build_cache(config(env, tmp_path / "bad", **kw))
    assert not (tmp_path / "bad" / "shard_00000.bin").exists()


def test_empty_corpus_unwritable_out_and_nan_model(env, tmp_path):
    (tmp_path / "empty.txt").write_text(f"  {ENDOFTEXT}\n")
    with pytest.raises(ValueError, match="empty or too short"):
        cache.build_cache(config(env, tmp_path / "e", corpus=str(tmp_path / "empty.txt")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot create the cache directory"):
        cache.build_cache(config(env, tmp_path / "file" / "sub"))
    with pytest.raises(FileNotFoundError, match="corpus .* does not exist"):
        cache.build_cache(config(env, tmp_path / "nf", corpus=str(tmp_path / "missing.txt")))
    nan_dir = make_model_dir(tmp_path / "nan")
    model = GPT.from_pretrained(nan_dir)
    with torch.no_grad():
        model.h[1].mlp.c_proj.bias[3] = float("nan")
    model.save_pretrained(nan_dir)
    cfg = config(env, tmp_path / "n", model=str(nan_dir))
    with pytest.raises(ValueError, match="non-finite activations"):
        cache.build_cache(cfg)
    m = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert not m["complete"] and m["shards"] == []
    assert os.listdir(tmp_path / "n") == ["manifest.json"]
    with pytest.raises(ValueError, match="unfinished"):
        cache.ActivationCache(cfg.out)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_unscaled_caches_of_deeper_models_read_back(make_hub_model, tmp_path, dtype):
    """fp16 / fp32 shards have no scales section: with L >= 3 a view of one would run past the file."""
    make_hub_model(tmp_path / "model", n_layer=4)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    cfg = cache.CacheConfig(
        model=str(tmp_path / "model"),
        corpus=str(corpus),
        tokens=600,
        ctx=16,
        dtype=dtype,
        out=str(tmp_path / "cache"),
        heldout=0.0,
    )
    cache.build_cache(cfg)
    r_in, r_out, *_ = cache.ActivationCache(cfg.out).read(0, 600)
    assert r_in.shape == r_out.shape == (600, 4, 32) and torch.isfinite(r_in).all()
    assert shards.verify(cfg.out) == []

"""Training without a cache: train.py --corpus streams the model's activations (cache.ActivationStream).

What it must equal: training from an fp32 cache of the same tokens (same normalization, held-out
contexts, BOS handling, unshuffled), itself resumed after kill -9, and itself at TP = 2 (torchrun, gloo).
"""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import cache as cache_lib
import train as T
from forge import checkpoint
from forge.hub import ENDOFTEXT
from model import load_model
from test_dist import argv, assert_same_run, torchrun
from test_train import make_model_dir, read_metrics
from test_train_resume import latest_step, run_train

pytestmark = pytest.mark.usefixtures("one_thread")


def write_corpus(path, docs):
    with open(path, "w") as f:
        f.write(ENDOFTEXT.join(docs))
    return str(path)


def words(n, seed=0):
    """n documents of 10 to 40 words: documents span contexts, contexts span documents."""
    rng = random.Random(seed)
    vocab = "the cat sat on a mat dog ran far away big red sun".split()
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(10, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def stream_inputs(tmp_path_factory):
    """(model directory, a corpus of 600 documents) for the streamed runs."""
    root = tmp_path_factory.mktemp("stream")
    model = make_model_dir(root / "model")
    return model, write_corpus(root / "corpus.txt", words(600))


def stream_config(model, corpus, out, **kw):
    """A small streamed run: batches of 62 rows (2 contexts of 31), fills of 4 batches."""
    base = dict(model=model, corpus=corpus, ctx=32, contexts=4, batch_size=62, buffer_tokens=248)
    base.update(out=str(out), features=64, steps=20, warmup=5, eval_every=10, eval_contexts=8)
    base.update(log_every=1, ckpt_every=10, device="cpu")
    return T.TrainConfig(**{**base, **kw})


def flags(model, corpus, out, **kw):
    """train.py flags of stream_config(...), for a subprocess or a torchrun worker."""
    c = vars(stream_config(model, corpus, out, **kw))
    return argv(c.pop("cache"), c.pop("out"), **c)


# -----------------------------------------------------------------------------
# streamed = cached


def test_streamed_training_equals_training_from_an_fp32_cache_of_the_same_tokens(tmp_path):
    """Documents of exactly one context each (30 bytes + <|endoftext|>), so the two corpora can put
    the same contexts in the places each source holds out and trains on: the stream holds out its
    corpus's first 8 contexts and trains on the rest in order; the cache holds out its last 8."""
    model = make_model_dir(tmp_path / "model")
    rng = random.Random(1)
    docs = ["".join(rng.choice("abcdefgh ") for _ in range(29)) + "." for _ in range(48)]
    held, trained = docs[:8], docs[8:]
    streamed = write_corpus(tmp_path / "streamed.txt", held + trained)
    cached = write_corpus(tmp_path / "cached.txt", trained + held)
    # one fill = one batch = 4 contexts = one forward pass of 4, as the cache's grid of 4
    one_batch = dict(batch_size=124, buffer_tokens=124, steps=10, eval_every=5, ckpt_every=-1)
    T.train(stream_config(model, streamed, tmp_path / "s", shuffle=False, **one_batch))
    cache_dir = tmp_path / "cache"
    build = dict(model=model, corpus=cached, tokens=48 * 31, ctx=32, dtype="fp32", heldout=8 / 48)
    cache_lib.build_cache(cache_lib.CacheConfig(**build, batch_size=4, out=str(cache_dir)))
    with open(tmp_path / "s" / "checkpoints" / "latest.json") as f:
        norm = json.load(f)["stream"]["norm"]  # the stream's: its first fill's mean norms
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert m["splits"] == dict(train=[0, 40 * 31], heldout=[40 * 31, 48 * 31])
    (cache_dir / "manifest.json").write_text(json.dumps(dict(m, norm_in=norm[0], norm_out=norm[1])))
    T.train(
        stream_config(model, "", tmp_path / "c", cache=str(cache_dir), shuffle=False, **one_batch)
    )
    a, b = read_metrics(tmp_path / "s"), read_metrics(tmp_path / "c")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(10))
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "mse"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-6), (key, x["step"])
    ea, eb = a[-1]["eval"], b[-1]["eval"]  # the same held-out contexts: the same evaluation
    assert ea.keys() == eb.keys()
    for key in ea:  # pytest 9.2's approx takes no nested dicts: per metric (a number or a list)
        assert ea[key] == pytest.approx(eb[key], rel=1e-6, abs=1e-6), key
    for name in ("W_enc_0", "W_dec_0", "W_dec_1"):
        u, v = (load_file(tmp_path / r / f"{name}.safetensors") for r in ("s", "c"))
        for k in u:
            torch.testing.assert_close(u[k], v[k], atol=1e-6, rtol=1e-6)


# -----------------------------------------------------------------------------
# exact resume


def test_a_stream_killed_mid_fill_resumes_to_the_weights_of_an_uninterrupted_run(
    stream_inputs, tmp_path
):
    """Checkpoint at step 6 (fill 1, its 3rd batch), kill -9 at step 9: --resume computes fill 1
    again from its cursor, skips the two batches already trained on, and goes on bit for bit."""
    model, corpus = stream_inputs
    full = tmp_path / "full"
    T.train(stream_config(model, corpus, full, ckpt_every=6))
    cut = tmp_path / "cut"
    killed = run_train(
        flags(model, corpus, cut, ckpt_every=6), killed_at=("train", "train_step", 10)
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert latest_step(cut) == 6
    resumed = run_train(["--resume", "--out", str(cut)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in b] == list(range(20))
    for x, y in zip(a, b):
        assert [x[k] for k in ("loss", "grad_norm")] == [y[k] for k in ("loss", "grad_norm")]
    assert a[-1]["eval"] == b[-1]["eval"]
    for name in ("W_enc_1", "W_dec_0"):
        u, v = (load_file(run / f"{name}.safetensors") for run in (full, cut))
        assert all(torch.equal(u[k], v[k]) for k in u)
    with open(cut / "checkpoints" / "latest.json") as f:
        stream = json.load(f)["stream"]
    assert stream["fill"] == 5 and stream["heldout"] == 8  # step 20 = 5 fills of 4 batches


# -----------------------------------------------------------------------------
# refusals


def test_bad_streaming_input_is_refused_with_one_line(stream_inputs, tmp_path):
    model, corpus = stream_inputs
    small = write_corpus(tmp_path / "small.txt", words(40))  # ~60 contexts: 8 held out, ~3 fills
    cases = [
        (dict(corpus=str(tmp_path / "nope.txt")), FileNotFoundError, "nope.txt does not exist"),
        (dict(cache=str(tmp_path)), ValueError, r"pass --cache .* or --corpus .*, not both"),
        (dict(buffer_tokens=100), ValueError, r"--buffer-tokens 100 must be a positive multiple"),
        (dict(ctx=64), ValueError, "ctx=64 must be in 2..n_ctx=32"),
        (dict(eval_contexts=10**4), ValueError, "fewer than the 10000 held out for evaluation"),
        (dict(corpus=small, steps=100), ValueError, "ran out for a DP rank .*: pass a larger"),
    ]
    for kw, error, message in cases:
        given = {"corpus": corpus, **kw}
        with pytest.raises(error, match=message):
            T.train(stream_config(model, out=tmp_path / "run", eval_every=-1, **given))
    T.train(stream_config(model, corpus, tmp_path / "ok", steps=4, eval_every=-1))
    other = make_model_dir(tmp_path / "other", seed=1)  # the same shape, other weights
    wrong = r"--corpus .* streamed through .*other is not the data .*model_sha256.*: resume with"
    with pytest.raises(ValueError, match=wrong + " that corpus and model"):
        T.main(["--resume", "--out", str(tmp_path / "ok"), "--model", other, "--steps", "8"])


# -----------------------------------------------------------------------------
# TP and DP, real processes


def test_tp2_streams_as_one_process_and_dp2_resumes_exactly(stream_inputs, tmp_path):
    """TP rank 0 computes each fill and broadcasts it: TP = 2 trains as one process does. DP = 2
    ranks read their own documents; cut at step 10 and resumed, the same run."""
    model, corpus = stream_inputs
    root = str(tmp_path)

    def train(out, **kw):
        return dict(kind="train", argv=flags(model, corpus, tmp_path / out, **kw))

    tasks = [train("tp2", tp=2), train("dp2"), train("dp2_cut", stop_at=10)]
    tasks += [train("dp2_cut", resume=True)]
    rc, out, err = torchrun(2, tasks, root)
    assert rc == 0, out[-2000:] + err[-4000:]
    T.train(stream_config(model, corpus, tmp_path / "ref"))
    assert_same_run(tmp_path / "ref", tmp_path / "tp2")
    with open(tmp_path / "dp2_cut" / "checkpoints" / "latest.json") as f:
        meta = json.load(f)
    assert meta["mesh"] == [2, 1] and len(meta["stream"]["cursors"]) == 2
    a, b = read_metrics(tmp_path / "dp2"), read_metrics(tmp_path / "dp2_cut")
    assert [(x["loss"], x["grad_norm"]) for x in a] == [(x["loss"], x["grad_norm"]) for x in b]
    u, v = (load_file(tmp_path / r / "W_dec_0.safetensors") for r in ("dp2", "dp2_cut"))
    assert all(torch.equal(u[k], v[k]) for k in u)


def test_evaluation_runs_the_streams_own_model(stream_inputs, tmp_path):
    """The GPT the stream runs is the one evaluation splices into: loaded once, not twice."""
    model, corpus = stream_inputs
    c = stream_config(model, corpus, tmp_path / "run")
    stream = T.open_data(c, None, "cpu")
    gpt, contexts = checkpoint.eval_inputs(c, stream, load_model, "cpu")
    assert gpt is stream.model and torch.equal(contexts, stream.heldout[:8])

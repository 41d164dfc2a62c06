"""Tests of interp.py: streamed statistics against brute force, the scores on constructed features,
logit effects against a direct computation, bad input, and the outputs of a run on a real small cache."""

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

import cache
import interp
from forge import concepts, interpfile
from clt import CLTConfig, CrossLayerTranscoder
from forge import toyworld
from forge.hub import ENDOFTEXT, load_tokenizer
from model import GPT, layer_norm
from conftest import write_hub_model

L = 2
D = 32
F = 16
CTX = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = list(range(64, 84))  # the token ids of "a".."t": GPT-2's byte order puts "!" (33) at 0


def byte_model(path, seed=0):
    """A random 2-layer GPT with GPT-2's byte-level tokenizer and no merges (V = 257), saved in the hub layout."""
    return write_hub_model(path, seed=seed, n_layer=L, n_embd=D)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    return byte_model(str(tmp_path_factory.mktemp("model")))


class FakeCache:
    """The part of cache.ActivationCache that interp reads, over in-memory rows."""

    def __init__(self, mlp_in, tok, doc, pos, n_train):
        self.rows = (mlp_in, tok, doc, pos)
        self.n_train = n_train
        self.N = len(tok)

    def split_range(self, split):
        return {"train": (0, self.n_train), "heldout": (self.n_train, self.N), "all": (0, self.N)}[
            split
        ]

    def iter_chunks(self, chunk_size, split="all", device=None):
        lo, hi = self.split_range(split)
        for a in range(lo, hi, chunk_size):
            mlp_in, tok, doc, pos = (x[a : min(a + chunk_size, hi)] for x in self.rows)
            yield mlp_in, mlp_in, tok, doc, pos


def packed_rows(docs):
    """Token lists -> (tok, doc, pos) rows as cache.py packs them: contexts of CTX, BOS dropped."""
    stream = [(t, i) for i, d in enumerate(docs) for t in d]
    n = len(stream) // (CTX - 1) * (CTX - 1)
    tok, doc = (torch.tensor([s[j] for s in stream[:n]]) for j in (0, 1))
    pos = torch.arange(n) % (CTX - 1) + 1
    return tok, doc, pos


def synthetic(n_docs=300, seed=0):
    """Rows whose mlp_in is the token's one-hot (dims 0..19) plus Gaussian noise (dims 20..31)."""
    g = torch.Generator().manual_seed(seed)
    docs = [
        [
            LETTERS[i]
            for i in torch.randint(
                len(LETTERS), (int(torch.randint(5, 40, (1,), generator=g)),), generator=g
            )
        ]
        for _ in range(n_docs)
    ]
    tok, doc, pos = packed_rows(docs)
    mlp_in = torch.zeros(len(tok), L, D)
    mlp_in[:, :, : len(LETTERS)] = torch.nn.functional.one_hot(tok - LETTERS[0], len(LETTERS))[
        :, None
    ].float()
    mlp_in[:, :, len(LETTERS) :] = torch.randn(len(tok), L, D - len(LETTERS), generator=g)
    return FakeCache(mlp_in, tok, doc, pos, n_train=len(tok) * 3 // 4)


def constructed_clt():
    """A random CLT whose layer-0 feature 0 fires exactly on token "d" and feature 1 on a noise dim."""
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F), seed=0)
    with torch.no_grad():
        clt.W_enc[0, :, :2] = 0
        clt.W_enc[0, 3, 0] = 1.0  # "d"  # one-hot input: act = 1 on "d", 0 elsewhere
        # pure noise: fires on ~20% of tokens, whatever the token
        clt.W_enc[0, len(LETTERS), 1] = 1.0
        clt.log_threshold[0, :2] = torch.tensor([0.5, 0.8]).log()
    return clt.eval()


def small_cfg(**kw):
    return interp.InterpConfig(chunk_size=128, top_k=5, n_sampled=6, min_count=3, **kw)


# -----------------------------------------------------------------------------
# streamed statistics == brute force


def window(c, r, l, f, acts, before, after):
    """Brute force: tokens and activations around row r, inside r's document."""
    mlp_in, tok, doc, pos = c.rows
    rows = [j for j in range(r - before, r + after + 1) if 0 <= j < c.n_train and doc[j] == doc[r]]
    return [tok[j].item() for j in rows], [acts[j, l, f].item() for j in rows]


@pytest.fixture
def interpreted(gpt):
    """interp.interpret of the synthetic cache with the constructed CLT -> (cache, CLT, config, stats)."""
    model, enc = gpt
    c = synthetic()
    clt = constructed_clt()
    cfg = small_cfg()
    stats, *_ = interp.interpret(model, enc, clt, c, cfg)
    return c, clt, cfg, stats


def test_statistics_match_brute_force(interpreted):
    c, clt, cfg, stats = interpreted
    mlp_in, tok, doc, pos = (x[: c.n_train] for x in c.rows)
    acts = clt.encode(mlp_in).detach()  # (N, L, F): affordable here, never in interp
    fire = acts > 0
    assert stats.n_rows == c.n_train
    torch.testing.assert_close(stats.n_fires, fire.sum(0).flatten())
    torch.testing.assert_close(stats.sum_act, acts.double().sum(0).flatten())
    assert (stats.hist.sum(-1) == stats.n_fires).all()
    grams_k, grams_c = stats.grams.merge()
    found = dict(zip(grams_k.tolist(), grams_c.tolist()))
    for l in range(L):
        for f in range(F):
            col = acts[:, l, f]
            vals, rows = col.sort(descending=True)
            n = min(cfg.top_k, int(fire[:, l, f].sum()))
            m = l * F + f
            top = stats.top
            got = top["act"][m][top["key"][m] > 0]
            torch.testing.assert_close(got, vals[:n])
            no_ties = vals[: n + 1].unique().numel() == min(n + 1, len(vals))
            if n and no_ties:  # the rows are determined
                for i in range(n):
                    t, a = window(c, rows[i].item(), l, f, acts, cfg.before, cfg.after)
                    win = top["win_tok"][m, i]
                    assert win[win >= 0].tolist() == t
                    torch.testing.assert_close(top["win_act"][m, i][win >= 0], torch.tensor(a))
            s = stats.sampled  # the reservoir: distinct firings, each with its true activation
            ok = s["key"][m] > 0
            assert int(ok.sum()) == min(cfg.n_sampled, int(fire[:, l, f].sum()))
            for a_, d_, p_ in zip(s["act"][m][ok], s["doc"][m][ok], s["pos"][m][ok]):
                r = ((doc == d_) & (pos == p_)).nonzero().flatten()
                assert a_.item() > 0 and any(acts[j, l, f].item() == a_.item() for j in r)
            # token and bigram counts where the feature fires, against Counter
            G = stats.gram_space
            base = stats.base
            r = fire[:, l, f].nonzero().flatten()
            uni = Counter(tok[r].tolist())
            bi = Counter(
                (tok[j - 1].item(), tok[j].item())
                for j in r.tolist()
                if j > 0 and doc[j - 1] == doc[j] and pos[j - 1] == pos[j] - 1
            )
            for t, k in uni.items():
                assert found[m * G + t + 1] == k
            for (a, b), k in bi.items():
                assert found[m * G + (b + 1) + (a + 1) * base] == k
            total = sum(v for k, v in found.items() if k // G == m)
            assert total == sum(uni.values()) + sum(bi.values())


def test_quantile_examples_and_histogram(gpt, interpreted):
    _, enc = gpt
    _, _, cfg, stats = interpreted
    ex = interpfile.examples(stats.sampled, 1, enc, cfg.before, n=3)
    assert len(ex) == 3 and [e["act"] for e in ex] == sorted((e["act"] for e in ex), reverse=True)
    assert all(e["tokens"][e["center"]] and e["acts"][e["center"]] == e["act"] for e in ex)
    # feature 0: every activation is exactly 1.0
    h, qs = interpfile.hist_summary(stats.hist[0], cfg)
    assert sum(h["counts"]) == stats.n_fires[0] and h["edges"][0] <= 1.0 < h["edges"][-1]
    assert all(0.84 < v < 1.19 for v in qs.values())  # the bin of 1.0, to a quarter octave


# -----------------------------------------------------------------------------
# scores on constructed features


class TokenLabels:
    """A stand-in for ConceptLabels: one concept per letter, true on that letter's tokens."""

    def __init__(self, c):
        self.tok = c.rows[1][c.n_train :]
        self.names = [chr(t + 33) for t in LETTERS]

    def rows(self, lo, hi, device):
        t = self.tok[lo:hi] - LETTERS[0]
        lab = torch.sparse_coo_tensor(
            torch.stack([t, torch.arange(hi - lo)]),
            torch.ones(hi - lo),
            (len(self.names), hi - lo),
            check_invariants=False,
        )
        return lab, torch.ones(hi - lo, dtype=torch.bool)


def test_detection_one_token_vs_random(gpt):
    model, enc = gpt
    c = synthetic(n_docs=600)
    clt = constructed_clt()
    cfg = small_cfg()
    stats, expl, _, scorer = interp.interpret(model, enc, clt, c, cfg)
    assert expl[0]["label_ngrams"] == ["d"] and expl[0]["label"].startswith('"d"')  # its own token
    assert expl[0]["explanation_ngrams"] == ["d"] and expl[0]["explanation"].startswith(
        'fires on "d" | promotes'
    )
    results = scorer.results()
    auroc, det_bacc, fuzz_bacc = (
        results[k] for k in ("detection_auroc", "detection_bacc", "fuzzing_bacc")
    )
    assert auroc[0] > 0.99 and det_bacc[0] > 0.99 and fuzz_bacc[0] > 0.99
    assert abs(auroc[1] - 0.5) < 0.06 and abs(det_bacc[1] - 0.5) < 0.06
    # held-out density of the noise feature
    assert 0.15 < scorer.det[1, :, 1].sum() / scorer.n_rows < 0.28
    # every feature's AUROC against Mann-Whitney by brute force over held-out tokens
    mlp_in, tok, doc, pos = (x[c.n_train :] for x in c.rows)
    fire = (clt.encode(mlp_in) > 0).flatten(1)  # (N, M)
    keys = interp.ngram_keys(
        interp.Padded(None, tok, doc, pos, 0, len(tok)), cfg.max_ngram, stats.base
    )
    for m in range(0, L * F, 5):
        # the predictor: rank of the matched n-gram, most precise first
        score = torch.zeros(len(tok))
        for t, g in enumerate(expl[m]["keys"]):
            score[(keys == g).any(1)] = len(expl[m]["keys"]) - t
        pos_s = score[fire[:, m]]
        neg_s = score[~fire[:, m]]
        if len(pos_s) and len(neg_s):
            u = (pos_s[:, None] > neg_s).double().mean() + 0.5 * (
                pos_s[:, None] == neg_s
            ).double().mean()
            assert abs(auroc[m] - u) < 1e-9
    # concept scores against known labels: feature 0 is the concept "d" exactly
    labels = TokenLabels(c)
    scores = concepts.ConceptScores(len(labels.names), L * F, "cpu")
    for a in range(0, len(tok), 100):
        scores.update(
            concepts.clt_acts(clt, mlp_in[a : a + 100]),
            *labels.rows(a, min(a + 100, len(tok)), "cpu"),
        )
    per_concept, per_feature = concepts.best_features(scores, labels, F, cfg)
    assert per_feature[0] == dict(
        concept="d", concept_precision=1.0, concept_recall=1.0, concept_f1=1.0
    )
    assert per_concept["d"]["f1"] == 1.0 and (
        per_concept["d"]["layer"],
        per_concept["d"]["feature"],
    ) == (0, 0)
    assert per_feature[1]["concept_f1"] < 0.3


def test_choose_ngrams_greedy_f1():
    base = 10  # keys with digits: gram (a, b) = (b + 1) + (a + 1) * 10
    grams = np.array([2, 2 + 10 * 4, 5, 7])  # "1", "3 1" (nested in "1"), "4", "6"
    c = np.array([6, 6, 4, 1])
    C = np.array([6, 6, 4, 50])
    # "1" (6 of 6) and "4" (4 of 4) cover all 10 firings exactly; "3 1" adds nothing; "6" only hurts
    assert interp.choose_ngrams(grams, c, C, 10, 4, base) == [0, 2]
    assert interp.choose_ngrams(grams, c, C, 10, 1, base) == [0]
    assert list(interp.n_digits(np.array([1, 9, 10, 99, 100]), base)) == [1, 1, 2, 2, 3]


# -----------------------------------------------------------------------------
# logit effects == a direct computation through the model's ln_f and unembedding


def test_logit_effects_direct(gpt):
    model, _ = gpt
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F), seed=1)
    clt.output_scale.copy_(torch.tensor([2.0, 0.5]))  # raw units = normalized / output_scale
    scale = 0.7
    top_v, top_i, bot_v, bot_i, top_z = interp.logit_effects(
        clt, model, scale, 5, model.config.vocab_size
    )
    x = torch.randn(D)
    for l in range(L):
        for f in (0, 7):
            # into the residual
            v = sum(clt.W_dec[l][f, j] / clt.output_scale[l + j] for j in range(L - l))
            s = torch.tensor([scale])
            with torch.no_grad():
                eff = (
                    layer_norm(x + v, model.ln_f, s)[0] - layer_norm(x, model.ln_f, s)[0]
                ) @ model.wte.weight.T
            vals, ids = eff.sort(descending=True)
            m = l * F + f
            torch.testing.assert_close(top_v[m], vals[:5], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(bot_v[m], vals[-5:].flip(0), atol=1e-5, rtol=1e-4)
            assert top_i[m].tolist() == ids[:5].tolist()
            assert bot_i[m].tolist() == ids[-5:].flip(0).tolist()
            z = (vals[:5] - eff.mean()) / eff.std()  # how clearly it promotes: the label's rule
            torch.testing.assert_close(top_z[m], z, atol=1e-4, rtol=1e-4)


def test_no_language_model_client():
    src = open(interp.__file__).read()
    for name in (
        "openai",
        "anthropic",
        "litellm",
        "vllm",
        "requests",
        "httpx",
        "transformers",
        "delphi",
    ):
        assert f"import {name}" not in src and f"from {name}" not in src
    banned = {"openai", "anthropic", "litellm", "httpx", "vllm"}
    assert not banned & {m.split(".")[0] for m in sys.modules}


# -----------------------------------------------------------------------------
# a real run on a small cache.py cache; bad input


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    byte_model(str(root / "model"))
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "Tarn", "capital", "of", "is", "dog"]
    with open(root / "corpus.txt", "w") as f:
        f.write(
            ENDOFTEXT.join(
                " ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(200)
            )
        )
    cache.build_cache(
        cache.CacheConfig(
            model=str(root / "model"),
            corpus=str(root / "corpus.txt"),
            tokens=2048,
            ctx=32,
            dtype="fp16",
            out=str(root / "cache"),
            heldout=0.25,
            shard_tokens=1024,
            batch_size=8,
            device="cpu",
        )
    )
    sha = GPT.from_pretrained(str(root / "model")).fingerprint()  # recorded as train.py records it
    config = CLTConfig(
        n_layers=L, d_model=D, n_features=F, model=str(root / "model"), model_sha256=sha
    )
    CrossLayerTranscoder(config, seed=0).save_pretrained(str(root / "clt"))
    return root


def test_run_writes_features_and_summary(real):
    cfg = small_cfg(
        model=str(real / "model"),
        clt=str(real / "clt"),
        cache=str(real / "cache"),
        out=str(real / "interp"),
        time_read=True,
    )
    summary = interp.run(cfg)
    lines = (real / "interp" / "features.jsonl").read_text().splitlines()
    assert len(lines) == L * F
    rec = json.loads(lines[F + 3])
    assert (rec["layer"], rec["feature"]) == (1, 3)
    for key in (
        "explanation",
        "density",
        "detection_auroc",
        "detection_bacc",
        "fuzzing_bacc",
        "top_examples",
        "quantile_examples",
        "hist",
        "quantiles",
        "promoted",
        "suppressed",
        "input_ngrams",
        "mean_act",
    ):
        assert key in rec
    assert len(rec["promoted"]) == cfg.n_logit
    assert rec["promoted"][0]["logit"] >= rec["promoted"][-1]["logit"] > 0
    assert rec["suppressed"][0]["logit"] <= rec["suppressed"][-1]["logit"] < 0
    if rec["top_examples"]:
        ex = rec["top_examples"][0]
        assert len(ex["tokens"]) == len(ex["acts"]) and ex["acts"][ex["center"]] == ex[
            "act"
        ] == round(rec["max_act"], 4)
    assert sum(layer["dead"] + layer["live"] for layer in summary["per_layer"]) == L * F
    assert summary["n_train_tokens"] + summary["n_heldout_tokens"] == 2048
    assert summary["ratio_to_plain_read"] > 0
    assert (real / "interp" / "summary.png").stat().st_size > 1000


def test_a_score_registered_in_SCORES_reaches_both_outputs(real, tmp_path, monkeypatch):
    """A fork adds an autointerp score by one entry in interp.SCORES, nothing else: features.jsonl
    carries its value per feature, after the built-in scores, and summary.json its quantiles."""

    def heldout_firing_share(s):
        """A toy score: the share of held-out tokens where the feature fires."""
        return s.det[..., 1].sum(-1).double().cpu() / s.n_rows

    monkeypatch.setitem(interp.SCORES, "heldout_firing_share", heldout_firing_share)
    out = tmp_path / "interp"
    cfg = small_cfg(
        model=str(real / "model"), clt=str(real / "clt"), cache=str(real / "cache"), out=str(out)
    )
    summary = interp.run(cfg)
    recs = [json.loads(line) for line in (out / "features.jsonl").read_text().splitlines()]
    assert len(recs) == L * F
    for rec in recs:
        keys = list(rec)
        assert (
            keys.index("fuzzing_bacc") + 1
            == keys.index("heldout_firing_share")
            == keys.index("heldout_density") - 1
        )
        assert abs(rec["heldout_firing_share"] - rec["heldout_density"]) < 1e-4
    assert set(summary["heldout_firing_share"]) == {"q10", "q25", "q50", "q75", "q90"}


def test_concept_cache_is_rebuilt_when_any_identity_field_differs(real, tmp_path):
    """The evaluation set's cache is reused while build_cache would resume it, and rebuilt, not
    refused, when the cache on disk was made with other arguments (any of build_cache's identity)."""
    model = GPT.from_pretrained(str(real / "model"))
    fields = dict(
        corpus=str(real / "corpus.txt"),
        tokens=256,
        ctx=32,
        keep_bos=False,
        dtype="fp16",
        out=str(tmp_path / "concept_cache"),
    )
    first = interp.concept_cache(str(real / "model"), model, small_cfg(), fields, stale=False)
    manifest = tmp_path / "concept_cache" / "manifest.json"
    made = manifest.stat().st_mtime_ns
    again = interp.concept_cache(str(real / "model"), model, small_cfg(), fields, stale=False)
    assert manifest.stat().st_mtime_ns == made and again.n_tokens == first.n_tokens == 256  # reused
    m = json.loads(manifest.read_text())
    m["identity"]["batch_size"] += 1  # a field that is no shape of the cache, but fixes its floats
    manifest.write_text(json.dumps(m))
    rebuilt = interp.concept_cache(str(real / "model"), model, small_cfg(), fields, stale=False)
    assert json.loads(manifest.read_text())["identity"] == first.manifest["identity"]
    assert rebuilt.n_tokens == 256


def test_bad_input(real, tmp_path):
    base = dict(clt=str(real / "clt"), cache=str(real / "cache"), out=str(tmp_path / "o"))
    byte_model(str(tmp_path / "other"), seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="made by model .* was made from another model than"):
        interp.load_inputs(small_cfg(model=str(tmp_path / "other"), **base))
    wrong = CrossLayerTranscoder(
        CLTConfig(n_layers=L, d_model=D, n_features=F, model=str(tmp_path / "other"))
    )
    wrong.save_pretrained(str(tmp_path / "clt_other"))
    with pytest.raises(ValueError, match="trained on model"):
        interp.load_inputs(small_cfg(**dict(base, clt=str(tmp_path / "clt_other"))))
    model = GPT.from_pretrained(str(real / "model"))
    enc = load_tokenizer(str(real / "model"))
    clt = CrossLayerTranscoder.from_pretrained(str(real / "clt"))
    c = synthetic(n_docs=20)
    empty = FakeCache(*(x[:0] for x in c.rows), n_train=0)
    with pytest.raises(ValueError, match="train split is empty"):
        interp.interpret(model, enc, clt, empty, small_cfg())
    no_heldout = FakeCache(*c.rows, n_train=c.N)
    with pytest.raises(ValueError, match="held-out split is empty"):
        interp.interpret(model, enc, clt, no_heldout, small_cfg())
    with pytest.raises(ValueError, match="chunk_size"):
        interp.InterpConfig(chunk_size=4)


def test_killed_run_leaves_the_old_outputs_whole(real, tmp_path, monkeypatch):
    """A run that dies while writing features.jsonl leaves the previous file as it was, no partial one."""
    out = tmp_path / "interp"
    out.mkdir()
    (out / "features.jsonl").write_text('{"old": 1}\n')
    written = []

    def dies_on_the_fifth_feature(*args, **kw):
        written.append(1)
        if len(written) == 5:
            raise KeyboardInterrupt  # what a kill during the write looks like from inside
        return []

    monkeypatch.setattr(interpfile, "examples", dies_on_the_fifth_feature)
    cfg = small_cfg(
        model=str(real / "model"), clt=str(real / "clt"), cache=str(real / "cache"), out=str(out)
    )
    with pytest.raises(KeyboardInterrupt):
        interp.run(cfg)
    assert (out / "features.jsonl").read_text() == '{"old": 1}\n'
    # no temporary file, no summary of a run that died
    assert sorted(os.listdir(out)) == ["features.jsonl"]


def test_clt_of_another_model_is_refused(real, tmp_path):
    """A CLT whose recorded fingerprint is another model's: exit status 1, one line naming the fix."""
    other, _ = byte_model(str(tmp_path / "other"), seed=1)  # same shapes, other weights
    config = CLTConfig(
        n_layers=L,
        d_model=D,
        n_features=F,
        model=str(real / "model"),  # the name even matches
        model_sha256=other.fingerprint(),
    )
    CrossLayerTranscoder(config).save_pretrained(str(tmp_path / "clt"))
    out = tmp_path / "interp"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "interp.py"),
            "--model",
            str(real / "model"),
            "--clt",
            str(tmp_path / "clt"),
            "--cache",
            str(real / "cache"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("error: the CLT")
    assert "made from another model" in message[0]
    assert "pass the --model it was made from" in message[0]
    assert not out.exists()  # refused before anything was written


@pytest.fixture(scope="module")
def world():
    """The toy world, one per module: its labeler compiles its regexes once."""
    return toyworld.make_world(0)


def eval_cache(enc, texts, cut=True):
    """A FakeCache of documents with zero activations: packed into contexts as cache.py packs them
    (cut=True), or one document per context (cut=False: nothing is cut)."""
    docs = [enc.encode_ordinary(d) + [enc.eot_token] for d in texts]
    if cut:
        tok, doc, pos = packed_rows(docs)
    else:
        tok = torch.tensor([t for d in docs for t in d])
        doc = torch.tensor([i for i, d in enumerate(docs) for _ in d])
        pos = torch.tensor([p + 1 for d in docs for p in range(len(d))])
    return FakeCache(torch.zeros(len(tok), L, D), tok, doc, pos, 0), texts, docs


def test_concept_labels_follow_the_labeler(gpt, world):
    """Each run of one document inside one context is labeled as the text the model saw there."""
    _, enc = gpt
    c, _, _ = eval_cache(enc, toyworld.eval_corpus(world, seed=0, support=2)[:60])
    labels = concepts.ConceptLabels(c, world, enc, small_cfg())
    lab, labeled = labels.rows(0, c.N, "cpu")
    lab = lab.to_dense().T.bool()  # (N, C)
    mlp_in, tok, doc, pos = c.rows
    assert labeled.all()  # the byte-level tokenizer re-encodes every run as it was
    runs = 0
    a = 0
    for b in range(1, c.N + 1):
        if b < c.N and doc[b] == doc[b - 1] and pos[b] == pos[b - 1] + 1:
            continue
        want = toyworld.label_tokens(enc.decode(tok[a:b].tolist()), enc, world)
        got = [{labels.names[j] for j in lab[r].nonzero().flatten().tolist()} for r in range(a, b)]
        assert got == want
        runs += 1
        a = b
    assert runs > len(doc.unique())  # some documents were cut by a context boundary


def labeled_rows(texts, docs, enc, world):
    """Brute force: per row of an uncut eval_cache, the labeler's label set for its document."""
    rows = []
    for text, ids in zip(texts, docs):
        rows += toyworld.label_tokens(enc.decode(ids), enc, world)
    return rows


class FeatureOnRows:
    """A feature set whose feature j fires exactly on the rows in rows[j] (acts read off a row counter)."""

    def __init__(self, rows, n_rows):
        self.fire = torch.zeros(n_rows, len(rows))
        for j, r in enumerate(rows):
            self.fire[sorted(r), j] = 1.0
        self.next = 0

    def __call__(self, mlp_in):
        out = self.fire[self.next : self.next + len(mlp_in)]
        self.next += len(mlp_in)
        return out


def test_feature_on_a_latent_label_scores_f1_one(gpt, world):
    """A feature constructed to fire exactly on latent:country=K scores F1 = 1 on it; one that fires on
    the answer of one relation (a "say X" feature) does not, and is an output feature."""
    _, enc = gpt
    lived_in = Counter(world.lookup["city"][p["home"]]["country"] for p in world.people)
    country = lived_in.most_common(1)[0][0]
    target = f"latent:country={country}"
    language = world.lookup["country"][country]["language"]
    people = [
        p["name"] for p in world.people if world.lookup["city"][p["home"]]["country"] == country
    ]
    texts = toyworld.eval_corpus(world, seed=0, support=2)
    texts = [t for t in texts if language in t or any(p in t for p in people)][:80] + texts[:20]
    c, texts, docs = eval_cache(enc, texts, cut=False)
    rows = labeled_rows(texts, docs, enc, world)
    on = [
        {r for r, labs in enumerate(rows) if target in labs},
        {
            r for r, labs in enumerate(rows) if f"output:{language}" in labs
        },  # one-hop facts say it too
    ]
    assert 0 < len(on[0] & on[1]) < len(on[0])
    cfg = small_cfg(min_support=1)
    labels = concepts.ConceptLabels(c, world, enc, cfg)
    scores = concepts.score_concepts({"probe": FeatureOnRows(on, c.N)}, c, labels, cfg)
    per_concept, per_feature = concepts.best_features(scores["probe"], labels, 2, cfg)
    assert per_concept[target] == dict(
        support=len(on[0]), layer=0, feature=0, f1=1.0, precision=1.0, recall=1.0
    )
    assert per_feature[1]["concept"] == f"output:{language}" and per_feature[1]["concept_f1"] == 1.0
    precision, recall, f1 = scores["probe"].f1()
    # it says the language: of one relation's questions only
    assert f1[labels.names.index(target), 1] < 0.8


def test_concept_scores_equal_brute_force(gpt, world):
    """score_concepts over several chunks == counts over every row, for random sparse features; the family
    table and the headline count what the per-concept bests say; the baselines fire as specified."""
    model, enc = gpt
    c, texts, docs = eval_cache(enc, toyworld.eval_corpus(world, seed=0, support=2)[:80], cut=False)
    rows = labeled_rows(texts, docs, enc, world)
    g = torch.Generator().manual_seed(0)
    # (N, M) 10 % density
    acts = torch.rand(c.N, 12, generator=g) * (torch.rand(c.N, 12, generator=g) < 0.1)
    names = sorted({lab for labs in rows for lab in labs})
    member = torch.zeros(c.N, len(names), dtype=torch.bool)  # (N, C)
    for r, labs in enumerate(rows):
        member[r, [names.index(lab) for lab in labs]] = True
    fire = acts > 0
    tp = (member[:, :, None] & fire[:, None, :]).sum(0).double()  # (C, M)
    nf = fire.sum(0).double()
    n = member.sum(0).double()[:, None]
    cfg = replace(small_cfg(min_support=3), chunk_size=100)
    labels = concepts.ConceptLabels(c, world, enc, cfg)
    scores = concepts.score_concepts(
        {
            "random": FeatureOnRows(
                [set(fire[:, j].nonzero().flatten().tolist()) for j in range(12)], c.N
            )
        },
        c,
        labels,
        cfg,
    )["random"]
    order = [labels.names.index(x) for x in names]
    p, r, f1 = (x[order] for x in scores.f1())
    torch.testing.assert_close(p, tp / nf.clamp(min=1))
    torch.testing.assert_close(r, tp / n)
    torch.testing.assert_close(f1, 2 * tp / (nf + n))
    per_concept, _ = concepts.best_features(scores, labels, 4, cfg)
    for name, best in per_concept.items():
        i = names.index(name)
        assert best["f1"] == round(f1[i].max().item(), 4) and best["support"] == n[i].item() >= 3
        assert 4 * best["layer"] + best["feature"] == f1[i].argmax().item()
    table = concepts.family_table(per_concept, labels, scores, cfg)
    for fam, row in table.items():
        mine = [b["f1"] for x, b in per_concept.items() if toyworld.family_of(x) == fam]
        assert row["concepts"] == len(mine) and row["recovered"] == sum(
            x >= cfg.concept_f1 for x in mine
        )
        assert row["unscored"] == sum(
            toyworld.family_of(x) == fam and n[i] < 3 for i, x in enumerate(names)
        )
    head = concepts.headline(table, cfg)
    assert head["n"] == sum(
        table[f]["concepts"] for f in ("category", "entity", "latent") if f in table
    )
    # baselines: neurons fire where their GELU input is > 0; a random CLT fires as often as the CLT it copies
    x = torch.randn(2000, L, D, generator=g)
    pre = concepts.neuron_preacts(model, x)
    gelu = torch.cat(
        [
            torch.nn.functional.gelu(b.mlp.c_fc(x[:, l]), approximate="tanh")
            for l, b in enumerate(model.h)
        ],
        1,
    )
    assert torch.equal(pre > 0, gelu > 0) and pre.shape == (2000, L * 4 * D)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F), seed=0)
    with torch.no_grad():
        clt.log_threshold.fill_(math.log(0.05))
    rand = concepts.random_like(clt, x)
    want = (clt.encode(x) > 0).float().mean((0, 2))
    # (L, F): every random feature at its layer's mean rate
    got = (rand.encode(x) > 0).float().mean(0)
    assert (got - want[:, None]).abs().max() < 2 / 2000 and not torch.equal(rand.W_enc, clt.W_enc)


def test_token_oracle_equals_brute_force(gpt, world):
    """The token oracle (score_concepts with n_vocab): feature t fires exactly on token t, counted over every row like any feature set."""
    _, enc = gpt
    c, texts, docs = eval_cache(enc, toyworld.eval_corpus(world, seed=0, support=2)[:40], cut=False)
    rows = labeled_rows(texts, docs, enc, world)
    cfg = replace(small_cfg(min_support=3), chunk_size=100)
    labels = concepts.ConceptLabels(c, world, enc, cfg)
    V = enc.n_vocab
    scores = concepts.score_concepts({}, c, labels, cfg, n_vocab=V)["token_identity"]
    tok = c.rows[1]
    for name in (
        "category:person",
        "entity:0",
        f"latent:country={world.people[0]['home']}",
        "role:query",
    ):
        if name not in labels.names:
            continue
        on = torch.tensor([name in labs for labs in rows])
        tp = torch.bincount(tok[on], minlength=V).double()
        nf = torch.bincount(tok, minlength=V).double()
        f1 = 2 * tp / (nf + on.sum())
        torch.testing.assert_close(scores.f1()[2][labels.names.index(name)], f1)
    per_concept, _ = concepts.best_features(scores, labels, V, cfg)
    assert {b["layer"] for b in per_concept.values()} == {0}  # one "layer" of V token features


def test_near_firing_brute_force():
    g = torch.Generator().manual_seed(0)
    fire = torch.rand(60, 5, generator=g) > 0.9
    doc = torch.arange(60) // 7
    lo = 6
    hi = 56
    w = 3
    near = interp.near_firing(fire, doc, w, lo, hi)
    for i in range(lo, hi):
        want = [
            any(fire[j, f] and doc[j] == doc[i] for j in range(i - w, i + w + 1) if 0 <= j < 60)
            for f in range(5)
        ]
        assert near[i - lo].tolist() == want


def test_a_clt_reading_resid_mid_is_refused(real):
    """The cache holds mlp_in (ln_2's output): a transcoder reading ln_2's input cannot be fed."""
    config = CLTConfig(n_layers=L, d_model=D, n_features=F, input_hook="resid_mid")
    store = cache.ActivationCache(str(real / "cache"))
    cfg = interp.InterpConfig(clt="published", cache=str(real / "cache"))
    with pytest.raises(ValueError, match="reads resid_mid, the cache holds mlp_in only"):
        interpfile.check_clt(config, store, None, str(real / "model"), cfg)

"""Tests for the CLT module (clt.py, cross-layer transcoder section) and single-process training (train.py)."""

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import cache as cache_lib
import train as T
from clt import CLTConfig, CrossLayerTranscoder, JumpReLUFunction
from forge import checkpoint
from forge.hub import DEFAULT_MODEL, ENDOFTEXT, bytes_to_unicode
from model import GPT, GPTConfig
from parallel import Mesh

torch.set_num_threads(1)


def small_clt(activation="relu", L=3, d=8, F=32, k=4, seed=0):
    return CrossLayerTranscoder(
        CLTConfig(n_layers=L, d_model=d, n_features=F, activation=activation, k=k), seed
    )


def perturb(clt, seed=1):
    """Non-zero biases, thresholds and scales, so no term of the math hides behind a zero or a one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (clt.b_enc, clt.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        clt.log_threshold.copy_(torch.rand(clt.log_threshold.shape, generator=g).mul(0.3).log())
        clt.input_scale.copy_(torch.rand(clt.input_scale.shape, generator=g) + 0.5)
        clt.output_scale.copy_(torch.rand(clt.output_scale.shape, generator=g) + 0.5)
    return clt


# -----------------------------------------------------------------------------
# the CLT module


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_encode_decode_match_a_naive_loop_over_layer_pairs(activation):
    clt = perturb(small_clt(activation))
    L, d, F = 3, 8, 32
    x = torch.randn(5, L, d)
    acts, out = clt(x)
    for b in range(5):
        for l in range(L):
            z = (x[b, l] * clt.input_scale[l]) @ clt.W_enc[l] + clt.b_enc[l]
            a = torch.relu(z) if activation == "relu" else z * (z > clt.threshold[l])
            torch.testing.assert_close(acts[b, l], a, atol=1e-6, rtol=1e-5)
        # every source layer src <= dst writes to dst through W_dec[src][:, dst - src]
        for dst in range(L):
            y = clt.b_dec[dst].clone()
            for src in range(dst + 1):
                for f in range(F):
                    y = y + acts[b, src, f] * clt.W_dec[src][f, dst - src]
            torch.testing.assert_close(out[b, dst], y / clt.output_scale[dst], atol=1e-5, rtol=1e-5)
    assert (acts == 0).float().mean() > 0.2  # so the sparse path skips something
    torch.testing.assert_close(clt.decode(acts, sparse=True), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clt.decode(acts.to_sparse(), sparse=True), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["cross-layer", "per-layer"])
def test_dense_decode_gradients_are_the_papers_sums(decoder):
    """DenseDecode's hand-written backward (acts and every W_dec) = autograd through the sum."""
    clt = CrossLayerTranscoder(CLTConfig(3, 8, 16, "relu", decoder=decoder), 0).double()
    acts = torch.rand(5, 3, 16, dtype=torch.float64, requires_grad=True)
    W = list(clt.W_dec)
    out = clt.decode_dense(acts)  # (B, L, d)
    want = torch.stack(  # Σ_{src <= dst} acts[src] @ W_dec[src][dst - src]
        [
            sum(acts[:, s] @ W[s][:, t - s] for s in range(t + 1) if t - s < clt.n_writes(s))
            for t in range(3)
        ],
        1,
    )
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, [acts, *W], g), torch.autograd.grad(want, [acts, *W], g)
    ):
        torch.testing.assert_close(a, b)


def test_the_decoder_norm_gradient_added_after_backward_is_autograds():
    clt = perturb(small_clt("jumprelu"))
    coef = torch.rand(3, 32)
    (clt.decoder_norms() * coef).sum().backward()  # autograd through ||W_dec||
    want = [W.grad.clone() for W in clt.W_dec]
    clt.zero_grad()
    for W in clt.W_dec:
        W.grad = torch.zeros_like(W)
    dec = clt.decoder_norms().detach().requires_grad_()
    (dec * coef).sum().backward()
    T.decoder_norm_backward(clt, dec)
    for W, w in zip(clt.W_dec, want):
        torch.testing.assert_close(W.grad, w)


def test_jumprelu_straight_through_gradients_follow_the_formula():
    eps = 0.5
    z = [[0.05, 0.2, 0.6, 1.4], [0.45, -0.3, 0.35, 0.9]]
    z = torch.tensor(z, requires_grad=True)  # (B=2, F=4)
    theta = torch.tensor([0.1, 0.3, 0.5, 1.0], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, -1.0, 0.5], [3.0, 1.0, 2.0, -2.0]])
    (JumpReLUFunction.apply(z, theta, eps) * g).sum().backward()
    # ∂a/∂z = H(z − θ);  ∂a/∂θ = −(θ/ε)·1{|z − θ| < ε/2}, summed over the batch
    torch.testing.assert_close(z.grad, g * (z.detach() > theta.detach()))
    inside = ((z.detach() - theta.detach()).abs() < eps / 2).float()
    torch.testing.assert_close(theta.grad, (g * -(theta.detach() / eps) * inside).sum(0))
    # both branches of the kernel are exercised
    assert theta.grad.abs().sum() > 0 and (inside == 0).any()


def test_topk_and_batchtopk_give_exact_sparsity():
    x = torch.randn(6, 3, 8) * 3
    clt = perturb(small_clt("topk", k=5))
    with torch.no_grad():
        clt.b_enc.fill_(5.0)  # every pre-activation positive: exactly k must survive, no fewer
    acts = clt.encode(x)
    assert ((acts != 0).sum(-1) == 5).all()
    top = torch.relu(clt.pre_acts(x)).topk(5, dim=-1).values
    torch.testing.assert_close(acts.topk(5, dim=-1).values, top)
    clt.config.activation = "batchtopk"
    acts = clt.train().encode(x)
    assert ((acts != 0).sum((0, 2)) == 6 * 5).all()  # B·k per layer over the batch
    assert ((acts != 0).sum(-1) != 5).any()  # ... not k per token: it is a batch-level budget
    kth = torch.relu(clt.pre_acts(x)).transpose(0, 1).reshape(3, -1).topk(30, dim=-1).values[:, -1]
    torch.testing.assert_close(clt.batch_threshold, kth)


def test_folding_the_normalization_leaves_outputs_unchanged():
    clt = perturb(small_clt("jumprelu"))
    x = torch.randn(7, 3, 8)
    acts, out = clt(x)
    clt.fold_normalization()
    acts2, out2 = clt(x)
    assert (clt.input_scale == 1).all() and (clt.output_scale == 1).all()
    torch.testing.assert_close(acts2, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_save_load_round_trip_is_exact(tmp_path, activation):
    clt = perturb(small_clt(activation))
    clt.fold_normalization()  # save_pretrained folds; with scales of one the round trip is bit-exact
    clt.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "W_dec_0.safetensors",
        "W_dec_1.safetensors",
        "W_dec_2.safetensors",
        "W_enc_0.safetensors",
        "W_enc_1.safetensors",
        "W_enc_2.safetensors",
        "config.json",
    ]
    back = CrossLayerTranscoder.from_pretrained(tmp_path)
    assert back.config == clt.config
    for (name, a), (_, b) in zip(clt.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 3, 8)
    assert torch.equal(back(x)[1], clt.eval()(x)[1])


def test_tp_shards_are_slices_of_the_full_model(tmp_path):
    full = small_clt("jumprelu", seed=3)
    shards = [CrossLayerTranscoder(full.config, 3, Mesh(tp=4, tp_rank=r)) for r in range(4)]
    torch.testing.assert_close(torch.cat([s.W_enc for s in shards], -1), full.W_enc, rtol=0, atol=0)
    for l in range(3):
        torch.testing.assert_close(
            torch.cat([s.W_dec[l] for s in shards], 0), full.W_dec[l], rtol=0, atol=0
        )
    perturb(full).fold_normalization()
    full.save_pretrained(tmp_path)
    part = CrossLayerTranscoder.from_pretrained(tmp_path, Mesh(tp=4, tp_rank=1))
    torch.testing.assert_close(part.W_enc, full.W_enc[:, :, 8:16], rtol=0, atol=0)
    torch.testing.assert_close(part.threshold, full.threshold[:, 8:16])
    with pytest.raises(ValueError, match="split evenly"):
        CrossLayerTranscoder(full.config, mesh=Mesh(tp=3))


def test_the_init_drawn_in_blocks_is_one_draw_sliced():
    """At F = 2^16 the init is drawn in several blocks per tensor (each rank keeps only its part):
    the same numbers as one draw from the seeded generator, sliced."""
    config = CLTConfig(n_layers=2, d_model=64, n_features=2**16, activation="relu")
    shards = [CrossLayerTranscoder(config, 7, Mesh(tp=4, tp_rank=r)) for r in range(4)]
    g = torch.Generator().manual_seed(7)
    W_enc = (torch.rand(2 * 64, 2**16, generator=g) * 2 - 1) * 2**-8  # (L·d, F), bound 1/sqrt(F)
    # (F, 2·d), bound 1/sqrt(L·d)
    W_dec0 = (torch.rand(2**16, 2 * 64, generator=g) * 2 - 1) * 128**-0.5
    assert torch.equal(torch.cat([s.W_enc for s in shards], -1), W_enc.view(2, 64, 2**16))
    assert torch.equal(torch.cat([s.W_dec[0] for s in shards], 0), W_dec0.view(2**16, 2, 64))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        CLTConfig(n_features=8, activation="topk", k=9)
    with pytest.raises(ValueError, match="activation"):
        CLTConfig(activation="gelu")
    with pytest.raises(ValueError, match="positive"):
        CLTConfig(n_features=0)


# -----------------------------------------------------------------------------
# a small cache of a small random GPT (the tests' data; test_dist.py uses it too)


def make_model_dir(path, n_layer=2, n_embd=16, seed=0):
    """A seeded random GPT with a byte-level tokenizer (256 bytes + <|endoftext|>, no merges)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=n_layer, n_head=2, n_embd=n_embd, n_ctx=32, vocab_size=257)
    GPT(cfg).save_pretrained(path)
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({**vocab, ENDOFTEXT: 256}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return str(path)


def make_cache(root, n_layer=2, n_embd=16, tokens=6000):
    """root/model, root/corpus.txt (short documents of a 13-word language) and root/cache."""
    model = make_model_dir(os.path.join(root, "model"), n_layer, n_embd)
    rng = random.Random(0)
    words = "the cat sat on a mat dog ran far away big red sun".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 40))) for _ in range(800)]
    with open(os.path.join(root, "corpus.txt"), "w") as f:
        f.write(ENDOFTEXT.join(docs))
    out = os.path.join(root, "cache")
    cache_lib.build_cache(
        cache_lib.CacheConfig(
            model=model,
            corpus=os.path.join(root, "corpus.txt"),
            tokens=tokens,
            ctx=32,
            out=out,
            heldout=0.1,
            shard_tokens=2048,
            device="cpu",
        )
    )
    return out


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    return make_cache(str(tmp_path_factory.mktemp("small")))


def config(cache, out, **kw):
    base = dict(
        cache=cache,
        out=str(out),
        features=64,
        steps=20,
        batch_size=128,
        warmup=5,
        eval_every=10,
        eval_contexts=8,
        log_every=1,
        ckpt_every=10,
        device="cpu",
    )
    return T.TrainConfig(**{**base, **kw})


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# training


def test_resume_equals_an_uninterrupted_run(small_cache, tmp_path):
    T.train(config(small_cache, tmp_path / "full", activation="topk", k=4, dead_tokens=300))
    T.train(
        config(small_cache, tmp_path / "cut", activation="topk", k=4, dead_tokens=300, stop_at=10)
    )
    assert not os.path.exists(tmp_path / "cut" / "config.json")  # stopped early: no export yet
    assert json.load(open(tmp_path / "cut" / "checkpoints" / "latest.json"))["step"] == 10
    T.train(config(small_cache, tmp_path / "cut", steps=20, resume=True))
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in cut] == list(range(20))
    assert any(m["aux"] > 0 for m in full)  # AuxK and the dead-feature clocks took part
    for a, b in zip(full, cut):
        same = ("loss", "grad_norm", "dead")
        assert [a[k] for k in same] == [b[k] for k in same], a["step"]
    for name in ("W_enc_1", "W_dec_0"):
        a, b = (load_file(tmp_path / run / f"{name}.safetensors") for run in ("full", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    if not os.path.exists(os.path.join(DEFAULT_MODEL, "model.safetensors")):
        pytest.skip("models/tiny is not in this checkout")
    out = str(tmp_path_factory.mktemp("tiny") / "cache")
    cache_lib.build_cache(
        cache_lib.CacheConfig(
            model=DEFAULT_MODEL, corpus="toy", tokens=12000, heldout=0.1, out=out, device="cpu"
        )
    )
    return out


def test_a_short_run_on_the_tiny_model_learns_a_good_clt(tiny_cache, tmp_path):
    """150 steps on 12k tokens of models/tiny (the default recipe, smaller): FVU, L0 and the spliced loss."""
    m = T.train(
        config(
            tiny_cache,
            tmp_path,
            features=512,
            steps=150,
            batch_size=256,
            lr=3e-3,
            warmup=20,
            eval_every=150,
            eval_contexts=16,
            ckpt_every=-1,
        )
    )
    first = read_metrics(tmp_path)[0]
    assert min(first["fvu"]) > 0.5 and max(m["fvu"]) < 0.12, (first["fvu"], m["fvu"])
    assert sum(m["l0"]) / 4 < 25, m["l0"]
    e = m["eval"]
    assert e["recovered"] > 0.9 and e["ce_zero"] > e["ce_clean"] + 2, e
    assert max(e["fvu"]) < 0.15 and sum(e["l0"]) / 4 < 25, e  # held out, inference mode
    clt = CrossLayerTranscoder.from_pretrained(tmp_path)  # the export works on raw activations
    cache = cache_lib.ActivationCache(tiny_cache)
    x, y, *_ = cache.read(*cache.split_range("heldout"))
    fvu = (clt(x)[1] - y).pow(2).sum((0, 2)) / (y - y.mean(0)).pow(2).sum((0, 2))
    assert fvu.max() < 0.15, fvu


def test_a_loss_term_registered_in_LOSSES_alone_is_trained_and_logged(
    small_cache, tmp_path, monkeypatch
):
    """The fork point for a loss term: one entry in train.LOSSES, nothing else. It is logged under its
    name, summed into the loss, and its gradient trains the CLT."""

    def l1(f, c):  # a toy term over this rank's features: the mean L1 norm of the activations
        return 0.01 * f.acts.float().abs().sum((1, 2)).mean()

    T.train(config(small_cache, tmp_path / "base", steps=6, eval_every=-1, ckpt_every=-1))
    monkeypatch.setitem(T.LOSSES, "l1", (l1, True))
    T.train(config(small_cache, tmp_path / "l1", steps=6, eval_every=-1, ckpt_every=-1))
    base, rows = read_metrics(tmp_path / "base"), read_metrics(tmp_path / "l1")
    assert "l1" not in base[0] and all(r["l1"] > 0 for r in rows)
    for r in rows:
        assert r["loss"] == pytest.approx(
            r["mse"] + r["sparsity"] + r["preact"] + r["aux"] + r["l1"]
        )
    assert rows[0]["mse"] == base[0]["mse"]  # the same first batch and init ...
    assert rows[-1]["mse"] != base[-1]["mse"]  # ... then the term's gradient changed the weights


def test_evaluate_a_perfect_and_a_zero_reconstruction(small_cache):
    cache = cache_lib.ActivationCache(small_cache)
    gpt = GPT.from_pretrained(cache.manifest["model"])
    contexts = checkpoint.heldout_contexts(cache, 4, bos=256)
    assert contexts.shape == (4, 32) and (contexts[:, 0] == 256).all()

    class Stub(torch.nn.Module):  # stands in for a CLT: the true MLPs, scaled by s
        mesh = Mesh()

        def __init__(self, s):
            super().__init__()
            self.s = s

        def input_of(self, acts):  # what it reads, as CrossLayerTranscoder.input_of
            return acts.mlp_in

        def forward(self, mlp_in):  # (N, L, d)
            out = torch.stack([gpt.h[l].mlp(mlp_in[:, l]) for l in range(mlp_in.size(1))], 1)
            return torch.ones(len(mlp_in), 2, 3), self.s * out  # "3 active features per layer"

    perfect, zero = T.evaluate(gpt, Stub(1.0), contexts), T.evaluate(gpt, Stub(0.0), contexts)
    assert abs(perfect["recovered"] - 1) < 1e-5
    assert abs(perfect["ce_spliced"] - perfect["ce_clean"]) < 1e-5
    assert max(perfect["fvu"]) < 1e-10 and perfect["l0"] == [3, 3] and min(zero["fvu"]) > 1 - 1e-5
    assert abs(zero["recovered"]) < 1e-5 and abs(zero["ce_spliced"] - zero["ce_zero"]) < 1e-5
    # zeroing the MLPs changes the loss: the test has teeth
    assert abs(zero["ce_zero"] - zero["ce_clean"]) > 0.01
    assert abs(perfect["kl_spliced"]) < 1e-5 and abs(perfect["delta_ce"]) < 1e-5
    assert zero["kl_spliced"] == pytest.approx(zero["kl_zero"]) and zero["kl_zero"] > 0.01


def test_bad_input_gives_clear_errors(small_cache, tmp_path):
    other = make_model_dir(tmp_path / "other", n_layer=3, n_embd=16)
    with pytest.raises(ValueError, match="L=2, d=16 but the model"):
        T.train(config(small_cache, tmp_path / "a", model=other))
    with pytest.raises(ValueError, match="--k 65 must be"):
        T.train(config(small_cache, tmp_path / "b", activation="topk", k=65))
    with pytest.raises(ValueError, match="--features 0"):
        T.train(config(small_cache, tmp_path / "c", features=0))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        T.train(config(small_cache, tmp_path / "d", batch_size=10**6))
    with pytest.raises(FileNotFoundError, match="python cache.py"):
        T.train(config(str(tmp_path / "nowhere"), tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        T.train(config(small_cache, tmp_path / "f", resume=True))


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(small_cache, tmp_path):
    with pytest.raises(FloatingPointError, match=r"at step (\d+) \(layers \[0"):
        T.train(
            config(
                small_cache, tmp_path, lr=1e30, warmup=1, grad_clip=-1, ckpt_every=1, eval_every=-1
            )
        )
    latest = json.load(open(tmp_path / "checkpoints" / "latest.json"))
    bad = read_metrics(tmp_path)[-1]["step"] + 1  # the step that failed logged nothing
    assert latest["step"] == bad  # its checkpoint holds the weights from before the failing step
    shard = load_file(tmp_path / "checkpoints" / latest["dir"] / "tp0-mesh1x1.safetensors")
    assert all(torch.isfinite(v).all() for v in shard.values())

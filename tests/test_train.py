"""Tests for the CLT module (clt.py, cross-layer transcoder section) and single-process training (train.py)."""
import math

import pytest
import torch

import clt as C

torch.set_num_threads(1)


def small_clt(activation="relu", L=3, d=8, F=32, k=4, seed=0):
    return C.CrossLayerTranscoder(C.CLTConfig(n_layers=L, d_model=d, n_features=F, activation=activation, k=k), seed)


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
        for dst in range(L):  # every source layer src <= dst writes to dst through W_dec[src][:, dst - src]
            y = clt.b_dec[dst].clone()
            for src in range(dst + 1):
                for f in range(F):
                    y = y + acts[b, src, f] * clt.W_dec[src][f, dst - src]
            torch.testing.assert_close(out[b, dst], y / clt.output_scale[dst], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clt.decode_sparse(acts), out, atol=1e-5, rtol=1e-5)


def test_jumprelu_straight_through_gradients_follow_the_formula():
    eps = 0.5
    z = torch.tensor([[0.05, 0.2, 0.6, 1.4], [0.45, -0.3, 0.35, 0.9]], requires_grad=True)  # (B=2, F=4)
    theta = torch.tensor([0.1, 0.3, 0.5, 1.0], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, -1.0, 0.5], [3.0, 1.0, 2.0, -2.0]])
    (C.JumpReLUFunction.apply(z, theta, eps) * g).sum().backward()
    # ∂a/∂z = H(z − θ);  ∂a/∂θ = −(θ/ε)·1{|z − θ| < ε/2}, summed over the batch
    torch.testing.assert_close(z.grad, g * (z.detach() > theta.detach()))
    inside = ((z.detach() - theta.detach()).abs() < eps / 2).float()
    torch.testing.assert_close(theta.grad, (g * -(theta.detach() / eps) * inside).sum(0))
    assert theta.grad.abs().sum() > 0 and (inside == 0).any()  # both branches of the kernel are exercised


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
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors",
                     "W_enc_1.safetensors", "W_enc_2.safetensors", "config.json"]
    back = C.CrossLayerTranscoder.from_pretrained(tmp_path)
    assert back.config == clt.config
    for (name, a), (_, b) in zip(clt.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 3, 8)
    assert torch.equal(back(x)[1], clt.eval()(x)[1])


def test_tp_shards_are_slices_of_the_full_model(tmp_path):
    full = small_clt("jumprelu", seed=3)
    shards = [C.CrossLayerTranscoder(full.config, 3, tp_rank=r, tp_size=4) for r in range(4)]
    torch.testing.assert_close(torch.cat([s.W_enc for s in shards], -1), full.W_enc, rtol=0, atol=0)
    for l in range(3):
        torch.testing.assert_close(torch.cat([s.W_dec[l] for s in shards], 0), full.W_dec[l], rtol=0, atol=0)
    perturb(full).fold_normalization()
    full.save_pretrained(tmp_path)
    part = C.CrossLayerTranscoder.from_pretrained(tmp_path, tp_rank=1, tp_size=4)
    torch.testing.assert_close(part.W_enc, full.W_enc[:, :, 8:16], rtol=0, atol=0)
    torch.testing.assert_close(part.threshold, full.threshold[:, 8:16])
    with pytest.raises(ValueError, match="split evenly"):
        C.CrossLayerTranscoder(full.config, tp_size=3)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        C.CLTConfig(n_features=8, activation="topk", k=9)
    with pytest.raises(ValueError, match="activation"):
        C.CLTConfig(activation="gelu")
    with pytest.raises(ValueError, match="positive"):
        C.CLTConfig(n_features=0)

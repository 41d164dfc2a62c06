"""The Llama family (Llama 3.x, Qwen3) against transformers' LlamaForCausalLM / Qwen3ForCausalLM:
logits and the activations a transcoder reads and writes, hub-layout loading (sharded, bf16), the
tokenizer against AutoTokenizer, circuit-tracer's BOS rule, bad input."""

import json

import pytest
import torch

from conftest import LLAMA3_ROPE, docs, write_hub_tokenizer, write_llama_model
from safetensors.torch import load_file

from clt import load_transcoder
from forge.formats import save_circuit_tracer
from forge.hub import load_tokenizer
from model import Llama, load_model
from model import main as model_main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def hf_model(model_type, tied, seed=0):
    """A random transformers model at write_llama_model's shape, norms' weights away from 1."""
    common = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: two query heads per key/value head
        max_position_embeddings=32,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    if model_type == "llama":
        rope = dict(rope_type="llama3", rope_theta=500000.0, **LLAMA3_ROPE)
        config = transformers.LlamaConfig(**common, rope_scaling=rope, rope_theta=500000.0)
        cls = transformers.LlamaForCausalLM
    else:  # Qwen3: q/k norms, a head_dim (16) that is not hidden_size / heads (8)
        config = transformers.Qwen3Config(**common, head_dim=16)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def run_hooked(ref, idx):
    """transformers' logits and, by forward hooks, each layer's MLP input (post_attention_layernorm's
    output) and MLP output, stacked to (B, T, L, d)."""
    mlp_in, mlp_out = [], []
    layers = ref.model.layers
    hooks = [
        b.post_attention_layernorm.register_forward_hook(lambda m, i, o: mlp_in.append(o))
        for b in layers
    ]
    hooks += [b.mlp.register_forward_hook(lambda m, i, o: mlp_out.append(o)) for b in layers]
    with torch.no_grad():
        logits = ref(idx).logits
    for h in hooks:
        h.remove()
    return logits, torch.stack(mlp_in, 2), torch.stack(mlp_out, 2)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_and_acts_match_transformers(tmp_path, model_type, tied):
    ref = hf_model(model_type, tied)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path)
    assert type(model) is Llama and model.config.tie_word_embeddings == tied
    assert model.config.rope_scaling == (LLAMA3_ROPE if model_type == "llama" else None)
    idx = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_in, ref_out = run_hooked(ref, idx)
    with torch.no_grad():
        logits, acts = model.run_with_acts(idx)
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert (acts.mlp_in - ref_in).abs().max() <= 1e-5
    assert (acts.mlp_out - ref_out).abs().max() <= 1e-5
    assert acts.mlp_in.shape == (3, 32, 2, 32)
    # the frozen pass (patterns and norm scales from the first) and spliced MLP outputs: the same
    with torch.no_grad():
        again = model(idx, mlp_out=acts.mlp_out, frozen=acts.frozen)
    assert (again - logits).abs().max() <= 1e-5


def test_rope_scaling_changes_the_logits(tmp_path):
    """Llama 3's scaling is read and used: at positions beyond its original context it matters."""
    ref = hf_model("llama", tied=False)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = dict(rope_type="default", rope_theta=500000.0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = load_model(tmp_path)
    assert plain.config.rope_scaling is None
    idx = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (plain(idx) - ref(idx).logits).abs().max() > 1e-3


def test_sharded_bf16_checkpoint_loads_cast_as_asked(tmp_path):
    ref = hf_model("qwen3", tied=False).to(torch.bfloat16)
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    model = load_model(tmp_path)  # float32 unless asked
    half = load_model(tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32
    assert next(half.parameters()).dtype == torch.bfloat16
    for (name, a), b in zip(model.state_dict().items(), half.state_dict().values()):
        assert torch.equal(a, b.float()), name  # bf16 -> fp32 is exact
    # transformers' own fp32 load (ref.float() would keep its RoPE frequencies rounded to bf16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    idx = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(idx) - ref.eval()(idx).logits).abs().max() <= 1e-5


def test_save_pretrained_is_what_transformers_reads(tmp_path):
    """conftest's random models (Llama.save_pretrained) are hub-layout models transformers loads."""
    for model_type, tied in (("llama", False), ("qwen3", True)):
        path = tmp_path / model_type
        model, _ = write_llama_model(path, model_type, tied=tied)
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        idx = torch.randint(0, model.config.vocab_size, (2, 32))
        with torch.no_grad():
            assert (model(idx) - ref.eval()(idx).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_tokenizer_ids_equal_autotokenizer_and_bos_is_circuit_tracers(tmp_path, model_type):
    write_hub_tokenizer(tmp_path, model_type)
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type=model_type)))
    enc = load_tokenizer(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = docs(20, seed=5) + ["  two  spaces, ünïcödé and 数字 123\n\ttabs", ""]
    for text in texts:
        ids = enc.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert enc.decode(ids) == ref.decode(ids)
        assert b"".join(enc.decode_single_token_bytes(t) for t in ids) == text.encode("utf-8")
    # circuit-tracer's ensure_tokenized: bos, else pad, else eos, else the first special token
    candidates = [ref.bos_token_id, ref.pad_token_id, ref.eos_token_id, *ref.all_special_ids]
    assert enc.eot_token == next(i for i in candidates if i is not None)
    expected = "<|begin_of_text|>" if model_type == "llama" else "<|endoftext|>"
    assert enc.eot_token == ref.convert_tokens_to_ids(expected)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen3"])
def test_model_py_generate_puts_the_bos_first(tmp_path, model_type, make_hub_model, capsys):
    """`python model.py generate` continues BOS + prompt, as graph.py and intervene.py encode it."""
    gpt2 = model_type == "gpt2"
    model, enc = make_hub_model(tmp_path) if gpt2 else write_llama_model(tmp_path, model_type)
    prompt = "the cat sat on"
    model_main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8"])
    idx = torch.tensor([[enc.eot_token] + enc.encode(prompt)])
    with torch.no_grad():
        new = model.generate(idx, 8, top_k=1)[0, idx.size(1) :].tolist()
    assert capsys.readouterr().out == prompt + enc.decode(new) + "\n"


def test_unknown_model_type_is_one_line_naming_the_known(tmp_path):
    write_llama_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    with pytest.raises(ValueError, match=r"'mistral'.*\['gpt2', 'llama', 'qwen3'\]"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, attention_bias=True)))
    with pytest.raises(ValueError, match="attention_bias"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, vocab_size=None)))
    with pytest.raises(ValueError, match=r"lacks \['vocab_size'\]: not a llama config"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "decoder, activation, skip", [("cross-layer", "jumprelu", False), ("per-layer", "relu", True)]
)
def test_circuit_tracer_layout_of_a_llama_transcoder_reads_mlp_hook_in(
    tmp_path, decoder, activation, skip
):
    """The published Llama-3.2-1B CLT / PLT and Qwen3 PLTs read mlp.hook_in (post_attention_layernorm's
    output, our mlp_in) and write mlp.hook_out: no norm folded in, the scales only."""
    from test_transcoders import random_transcoder

    model, _ = write_llama_model(tmp_path / "model", "qwen3", tied=True)
    t = random_transcoder(decoder, activation, skip, d=model.config.n_embd)
    save_circuit_tracer(t, tmp_path / "ct", model, model_name="Qwen/Qwen3-0.6B")
    config = json.loads((tmp_path / "ct" / "config.yaml").read_text())
    assert (config["feature_input_hook"], config["feature_output_hook"]) == (
        "mlp.hook_in",
        "mlp.hook_out",
    )
    back = load_transcoder(str(tmp_path / "ct"), model)
    idx = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        mlp_in = model.run_with_acts(idx, logits=False)[1].mlp_in.flatten(0, 1)  # (N, L, d)
        acts, out = t(mlp_in)
        acts_back, out_back = back(mlp_in)
    assert 0 < (acts > 0).float().mean() < 1
    torch.testing.assert_close(acts_back, acts, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_back, out, atol=1e-6, rtol=1e-6)
    # the files hold the transcoder on mlp_in itself: layer 0's pre-activations from them alone
    cross = decoder == "cross-layer"
    W = load_file(tmp_path / "ct" / ("W_enc_0.safetensors" if cross else "layer_0.safetensors"))
    W_enc, b_enc = (W["W_enc_0"], W["b_enc_0"]) if cross else (W["W_enc"], W["b_enc"])
    pre = mlp_in[:, 0] @ W_enc.T + b_enc
    torch.testing.assert_close(pre.relu() * (acts[:, 0] > 0), acts[:, 0], atol=1e-5, rtol=1e-5)

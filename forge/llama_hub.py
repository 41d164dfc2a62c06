"""The Llama family (Llama 3.x, Qwen3) in the Hugging Face hub layout: config.json -> LlamaConfig's
fields, the safetensors weights (one file or shards listed in model.safetensors.index.json) in
model.py's key names, and the way back (save_llama) so a random model can be written for tests.

Keys: transformers' LlamaForCausalLM / Qwen3ForCausalLM names -> model.py's, which reuse GPT-2's
names where the role is the same (wte, h.{l}.ln_1 / attn / ln_2 / mlp, ln_f), so the spine reads
one set of names for both families."""

import json
import os

import torch
from safetensors import safe_open

from forge.files import save_safetensors, write_json
from forge.hub import check_keys, read_config

FAMILIES = ("llama", "qwen3")  # config.json model_type values read here
# transformers' prefix -> ours (applied in order; a layer's own names keep HF's: q_proj, gate_proj)
RENAMES = (
    ("model.embed_tokens.", "wte."),
    ("model.norm.", "ln_f."),
    ("model.layers.", "h."),
    (".input_layernorm.", ".ln_1."),
    (".post_attention_layernorm.", ".ln_2."),
    (".self_attn.", ".attn."),
)
ROPE_LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama_config(path):
    """LlamaConfig's fields from {path}/config.json (transformers 4's rope_scaling or 5's
    rope_parameters); what model.py does not implement is refused in one line."""
    hf = read_config(path)
    kind = hf.get("model_type")
    needed = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
    needed += ("max_position_embeddings", "vocab_size")
    missing = [k for k in needed if hf.get(k) is None]
    if missing:
        raise ValueError(f"{path}/config.json lacks {missing}: not a {kind} config")
    unsupported = dict(
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        use_sliding_window=hf.get("use_sliding_window", False),
        hidden_act=hf.get("hidden_act", "silu") != "silu",
    )
    if any(unsupported.values()):
        found = {k: hf.get(k) for k, v in unsupported.items() if v}
        raise ValueError(f"{path}/config.json: {found} is not implemented (model.py's Llama)")
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{path}/config.json: rope_type {rope_type!r}; known: default, llama3")
    n_head = hf["num_attention_heads"]
    return dict(
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        n_inner=hf["intermediate_size"],
        n_ctx=hf["max_position_embeddings"],
        vocab_size=hf["vocab_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        rope_scaling={k: rope[k] for k in ROPE_LLAMA3} if rope_type == "llama3" else None,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qk_norm=kind == "qwen3",  # Qwen3 normalizes each head's q and k
        model_type=kind,
    )


def weight_files(path):
    """{path}'s safetensors files: the shards model.safetensors.index.json lists, or the one."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return [os.path.join(path, "model.safetensors")]
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, name) for name in shards]


def rename(key, pairs):
    """key with each (old, new) of pairs applied: ".x." anywhere once, "x." as a prefix."""
    for old, new in pairs:
        if old.startswith("."):
            key = key.replace(old, new, 1)
        elif key.startswith(old):
            key = new + key[len(old) :]
    return key


def llama_weights(path, own, config, dtype=torch.float32):
    """The weights in {path} in `own`'s (the model's state_dict) keys, cast to dtype, one tensor
    at a time (a bf16 checkpoint is never held whole in fp32); anything missing, unexpected or
    wrongly shaped is refused, naming `config`. A tied model's saved lm_head is dropped."""
    sd = {}
    for file in weight_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                ours = rename(key, RENAMES)
                if ours == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                sd[ours] = f.get_tensor(key).to(dtype)
    check_keys(path, config, sd, own)
    return sd


def save_llama(path, c, state_dict):
    """The hub layout of a model with LlamaConfig fields `c` (a dict): config.json as transformers
    reads it (LlamaForCausalLM or Qwen3ForCausalLM) + model.safetensors in transformers' keys."""
    os.makedirs(path, exist_ok=True)
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[c["model_type"]]
    rope = dict(rope_type="llama3", **c["rope_scaling"]) if c["rope_scaling"] else None
    hf = dict(
        architectures=[arch],
        model_type=c["model_type"],
        num_hidden_layers=c["n_layer"],
        num_attention_heads=c["n_head"],
        num_key_value_heads=c["n_kv_head"],
        hidden_size=c["n_embd"],
        head_dim=c["head_dim"],
        intermediate_size=c["n_inner"],
        max_position_embeddings=c["n_ctx"],
        vocab_size=c["vocab_size"],
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"],
        rope_scaling=rope,
        tie_word_embeddings=c["tie_word_embeddings"],
        hidden_act="silu",
    )
    back = [(ours, theirs) for theirs, ours in RENAMES]
    sd = {rename(key, back): v.contiguous() for key, v in state_dict.items()}
    # each file whole or not at all, config.json last: a directory with it holds its weights
    save_safetensors(os.path.join(path, "model.safetensors"), sd, metadata={"format": "pt"})
    write_json(os.path.join(path, "config.json"), hf, indent=2)

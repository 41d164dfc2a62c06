"""GPT against transformers' GPT-2 (the reference), hub-layout loading, the tokenizer, bad input."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import forge.hub
from forge.hub import ENDOFTEXT, bytes_to_unicode, load_tokenizer
from model import GPT, MODELS, load_model


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers GPT-2 saved as transformers writes it (`transformer.` key prefix)."""
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=300)
    config = transformers.GPT2Config(**shape, bos_token_id=299, eos_token_id=299)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_logits_and_acts_match_transformers(hf_dir):
    path, ref = hf_dir
    model = GPT.from_pretrained(path)
    mlp_in, mlp_out, resid_mid = [], [], []
    blocks = ref.transformer.h
    hooks = [b.ln_2.register_forward_hook(lambda m, i, o: mlp_in.append(o)) for b in blocks]
    # ln_2's input, hooked as EleutherAI/attribute's pre_ln_hook does (attribute/caching.py:233)
    hooks += [b.ln_2.register_forward_hook(lambda m, i, o: resid_mid.append(i[0])) for b in blocks]
    hooks += [b.mlp.register_forward_hook(lambda m, i, o: mlp_out.append(o)) for b in blocks]
    idx = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = ref(idx).logits
        logits, acts = model.run_with_acts(idx)
    for h in hooks:
        h.remove()
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert (acts.mlp_in - torch.stack(mlp_in, dim=2)).abs().max() <= 1e-5
    assert (acts.mlp_out - torch.stack(mlp_out, dim=2)).abs().max() <= 1e-5
    assert (acts.resid_mid - torch.stack(resid_mid, dim=2)).abs().max() <= 1e-5
    assert acts.mlp_in.shape == (4, 32, 2, 64)


def test_hub_style_keys_load_identically(hf_dir, tmp_path):
    path, _ = hf_dir
    sd = load_file(os.path.join(path, "model.safetensors"))
    hub_sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    # the hub's gpt2 repo also stores the mask buffers
    hub_sd["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    save_file(hub_sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    a, b = GPT.from_pretrained(path), GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 300, (2, 16))
    assert torch.equal(a(idx), b(idx))


def test_save_pretrained_is_the_hub_layout(hf_dir, tmp_path):
    model = GPT.from_pretrained(hf_dir[0])
    model.save_pretrained(tmp_path)
    assert not any(k.startswith("transformer.") for k in load_file(tmp_path / "model.safetensors"))
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (ref(idx).logits - model(idx)).abs().max() <= 1e-5


def test_splice_and_freeze(hf_dir):
    model = GPT.from_pretrained(hf_dir[0])
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        logits, acts = model.run_with_acts(idx)
        assert torch.equal(model(idx, mlp_out=acts.mlp_out), logits)
        assert (model(idx, mlp_out=torch.zeros_like(acts.mlp_out)) - logits).abs().max() > 1e-2
        assert torch.equal(model(idx, frozen=acts.frozen), logits)
    # with everything frozen and the MLP outputs given, the logits are linear in the embeddings
    x = model.embed(idx)

    def f(resid):
        return model(idx, mlp_out=acts.mlp_out, frozen=acts.frozen, resid=resid)

    dx = torch.randn_like(x)
    assert (f(x + dx) - f(x) - (f(x + 2 * dx) - f(x + dx))).abs().max() < 1e-3


def write_small_bpe(path, merges):
    """vocab.json + merges.txt in the gpt2 repo's format: 256 bytes, one id per merge, then eot."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[ENDOFTEXT] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (path / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    return vocab


THE = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]  # " the"
CAPIT = [("Ġ", "c"), ("a", "p"), ("Ġc", "ap"), ("i", "t"), ("Ġcap", "it")]  # " capit"
MERGES = THE + CAPIT


def test_tokenizer_round_trip_and_reference(tmp_path, monkeypatch):
    vocab = write_small_bpe(tmp_path, MERGES)
    enc = load_tokenizer(tmp_path)
    text = "the capital of the world is ünïcödé 東京 🙂\n\n  tabs\tand spaces  "
    assert enc.decode(enc.encode(text)) == text
    assert enc.encode(" the capit") == [vocab["Ġthe"], vocab["Ġcapit"]]
    eot = enc.encode(ENDOFTEXT, allowed_special="all")
    assert eot == [vocab[ENDOFTEXT]] and enc.eot_token == vocab[ENDOFTEXT]
    # tiktoken's own gpt2 loader builds the same ranks from the same two files
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    merges_txt = str(tmp_path / "merges.txt")
    vocab_json = str(tmp_path / "vocab.json")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(merges_txt, vocab_json)
    assert ranks == enc._mergeable_ranks
    # and transformers' slow GPT-2 tokenizer (the reference BPE) splits text the same way
    ref = transformers.GPT2Tokenizer(vocab_json, merges_txt)
    sample = "the cat, the capital; capitals of the theme."
    assert ref.encode(sample) == enc.encode(sample)


def test_tokenizer_refuses_out_of_order_vocab(tmp_path):
    write_small_bpe(tmp_path, MERGES)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    vocab["Ġt"], vocab["he"] = vocab["he"], vocab["Ġt"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt order"):
        load_tokenizer(tmp_path)


def test_bad_input(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="never unpickles"):
        GPT.from_pretrained(tmp_path)
    sd = load_file(hf_dir[0] / "model.safetensors")
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:16]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"wpe.weight: \(16, 64\) != \(32, 64\)"):
        GPT.from_pretrained(tmp_path)
    model = GPT.from_pretrained(hf_dir[0])
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="n_ctx=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT.from_pretrained("./no/such/dir")


def test_hub_download_asks_for_safetensors_only(hf_dir, monkeypatch):
    calls = []

    def offline_fetch(repo_id, allow_patterns):  # stands in for the hub: returns a local dir
        calls.append((repo_id, allow_patterns))
        return str(hf_dir[0])

    monkeypatch.setattr(forge.hub, "snapshot_download", offline_fetch)
    model = GPT.from_pretrained("gpt2")
    gpt2 = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
    llama = ["model-*.safetensors", "model.safetensors.index.json", "tokenizer*.json"]
    assert calls == [("gpt2", gpt2 + llama)]
    assert model.config.n_layer == 2


def with_config(hf_dir, path, **change):
    """hf_dir's weights in `path`, beside its config.json changed (a None value drops the key)."""
    hf = json.loads((hf_dir[0] / "config.json").read_text())
    hf.update(change)
    kept = {k: v for k, v in hf.items() if v is not None}
    (path / "config.json").write_text(json.dumps(kept))
    (path / "model.safetensors").write_bytes((hf_dir[0] / "model.safetensors").read_bytes())
    return path


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(n_head=5), "n_head=5 must divide n_embd=64"),
        (dict(n_positions=1e6), "n_ctx must be a positive integer, got 1000000.0"),
        (dict(n_positions=10**8), "parameters, far more than any GPT-2"),
        (dict(n_layer=None), r"lacks \['n_layer'\]"),
    ],
)
def test_a_wrong_config_fails_in_one_line_before_allocating(hf_dir, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        GPT.from_pretrained(with_config(hf_dir, tmp_path, **change))


def test_a_model_family_is_one_line_in_MODELS(hf_dir, tmp_path, monkeypatch):
    """A fork's family, registered in MODELS alone, loads by its config.json's model_type."""

    class ToyGPT(GPT):
        pass

    monkeypatch.setitem(MODELS, "toy-gpt2", ToyGPT)
    toy = load_model(with_config(hf_dir, tmp_path, model_type="toy-gpt2"))
    gpt = load_model(hf_dir[0])
    assert type(toy) is ToyGPT and type(gpt) is GPT
    idx = torch.randint(0, 300, (2, 16))
    assert torch.equal(toy(idx), gpt(idx))


def test_load_model_reads_no_model_type_as_gpt2_and_refuses_an_unknown_one(hf_dir, tmp_path):
    assert type(load_model(with_config(hf_dir, tmp_path, model_type=None))) is GPT
    with_config(hf_dir, tmp_path, model_type="mistral")
    known = r"\['gpt2', 'llama', 'qwen3'\]"
    with pytest.raises(ValueError, match=rf"model_type 'mistral'; the known families are {known}"):
        load_model(tmp_path)


def test_a_path_typo_names_the_path_not_a_hub_error(monkeypatch):
    # what huggingface_hub raises offline for an unknown id
    def unreachable_hub(repo_id, allow_patterns):
        raise OSError("LocalEntryNotFoundError: cannot find the requested files in the local cache")

    monkeypatch.setattr(forge.hub, "snapshot_download", unreachable_hub)
    with pytest.raises(FileNotFoundError, match="'models/tinyx' is neither a local directory"):
        GPT.from_pretrained("models/tinyx")
    with pytest.raises(FileNotFoundError, match="check the path"):
        load_tokenizer("models/tinyx")


def test_forward_and_run_with_acts_agree_and_logits_false_gives_the_same_acts(hf_dir):
    model = GPT.from_pretrained(hf_dir[0])
    idx = torch.randint(0, 300, (2, 12))
    logits, acts = model.run_with_acts(idx)
    none, acts_only = model.run_with_acts(idx, logits=False)
    assert none is None and acts_only.frozen.ln_f is None and acts.frozen.ln_f.shape == (2, 12, 1)
    torch.testing.assert_close(model(idx), logits, atol=0, rtol=0)
    torch.testing.assert_close(acts_only.mlp_in, acts.mlp_in, atol=0, rtol=0)
    torch.testing.assert_close(acts_only.mlp_out, acts.mlp_out, atol=0, rtol=0)


def test_fingerprint_is_kept_until_a_weight_changes(hf_dir):
    """The kept fingerprint follows in-place writes, copies and a new config."""
    model = GPT.from_pretrained(str(hf_dir[0]))
    first = model.fingerprint()
    assert model.fingerprint() == first and copy.deepcopy(model).fingerprint() == first
    with torch.no_grad():
        model.h[1].mlp.c_proj.weight[0, 0] += 1.0
    assert model.fingerprint() != first
    changed = model.fingerprint()
    model.config.n_ctx = model.config.n_ctx // 2
    assert model.fingerprint() not in (first, changed)

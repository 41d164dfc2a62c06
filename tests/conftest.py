"""Shared fixtures: a small random GPT-2 in the hub layout with a byte-level tokenizer, made the way
models/build_tiny.py makes the shipped one (toyworld.save_tokenizer), so tests read as what they
check, and the helpers more than one test file uses."""

import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

import cache
from experiments import common
from forge import toyworld
from forge.hub import load_tokenizer
from model import GPT, GPTConfig, Llama, LlamaConfig


def write_hub_model(path, seed=0, n_layer=2, n_head=2, n_embd=32, n_ctx=32, merges=()):
    """A random GPT-2 + tokenizer (256 bytes, `merges`, <|endoftext|> last) saved in the hub layout at
    `path` -> (model in eval mode, tiktoken Encoding). The vocabulary is exactly the tokenizer's."""
    torch.manual_seed(seed)
    vocab_size = 256 + len(merges) + 1
    shape = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ctx=n_ctx)
    model = GPT(GPTConfig(**shape, vocab_size=vocab_size))
    model.save_pretrained(path)
    toyworld.save_tokenizer(path, list(merges))
    return model.eval(), load_tokenizer(str(path))


# the Llama family: a byte-level BPE tokenizer.json (the tokenizers package) and a random model
LLAMA3_ROPE = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)


def write_hub_tokenizer(path, model_type="llama"):
    """experiments/common.py's tokenizer.json (300 tokens) trained on docs(200) -> its size."""
    return common.write_hub_tokenizer(str(path), docs(200), model_type)


def write_llama_model(path, model_type="llama", tied=True, seed=0, **shape):
    """A random Llama (Llama 3's rope scaling, GQA 4/2) or Qwen3 (q/k norms, head_dim 16 != d/nh)
    in the hub layout with write_hub_tokenizer's tokenizer -> (model in eval mode, tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_hub_tokenizer(path, model_type)
    qwen = model_type == "qwen3"
    small = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=16 if qwen else 8)
    small.update(n_inner=64, n_ctx=32, rope_theta=10000.0 if qwen else 500000.0, **shape)
    rope = None if qwen else LLAMA3_ROPE
    config = LlamaConfig(**small, vocab_size=vocab_size, rope_scaling=rope, qk_norm=qwen)
    config = dataclasses.replace(config, tie_word_embeddings=tied, model_type=model_type)
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():  # norms' weights away from 1, so a misplaced one shows
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.2 if "ln_" in name or "norm" in name else 0)
    model.save_pretrained(path)
    return model.eval(), load_tokenizer(str(path))


@pytest.fixture
def make_hub_model():
    """The function write_hub_model, for tests that need several models (another seed, another shape)."""
    return write_hub_model


@pytest.fixture(scope="session")
def hub_model(tmp_path_factory):
    """(directory, model, tokenizer) of one random 2-layer, d = 32 GPT-2 in the hub layout, shared by tests."""
    path = tmp_path_factory.mktemp("hub_model")
    model, enc = write_hub_model(path)
    return str(path), model, enc


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far faster on a CPU shared with other jobs. A module
    takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# corpora and caches

WORDS = "the cat sat on a mat then the dog ran far away into hills where nobody went".split()


def docs(n, seed=0):
    """n random documents of 3 to 39 words from WORDS."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 40))) for _ in range(n)]


def cache_config(model_dir, corpus, out, **kw):
    """A small cache.py build on the CPU: 1,500 tokens in contexts of 16, shards of 256 tokens."""
    small = dict(tokens=1500, ctx=16, shard_tokens=256, batch_size=8, heldout=0.1, device="cpu")
    return cache.CacheConfig(model=model_dir, corpus=corpus, out=str(out), **{**small, **kw})


def mark_unfinished(cache_dir, n_shards=2):
    """Rewrite a cache's manifest as if the build had been killed after `n_shards` shards."""
    path = cache_dir / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps(dict(m, complete=False, shards=m["shards"][:n_shards])))


# -----------------------------------------------------------------------------
# pages in a real browser, when Chromium is installed

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="headless Chromium is not installed (apt-get install chromium)",
)
HEADLESS = [
    "chromium",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(tmp_path, *flags, check=True):
    """Headless Chromium with a fresh profile under tmp_path and `flags` -> the finished process."""
    profile = f"--user-data-dir={tmp_path / 'chrome'}"
    return subprocess.run(
        [*HEADLESS, profile, *flags], check=check, capture_output=True, text=True, timeout=120
    )

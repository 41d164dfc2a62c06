"""Models in the Hugging Face hub layout: where a model directory is, and GPT-2's tokenizer built
from the checkpoint's own vocab.json + merges.txt (tiktoken does the merging)."""

import json
import os

import tiktoken
from huggingface_hub import snapshot_download

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "tiny")
HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]


def resolve_model_dir(name_or_dir):
    """A local directory, or a hub repo id fetched (config, safetensors weights, tokenizer only)."""
    name_or_dir = str(name_or_dir)
    looks_like_path = name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1
    if os.path.isdir(name_or_dir):
        path = name_or_dir
    elif looks_like_path or os.path.exists(name_or_dir):
        raise FileNotFoundError(
            f"model directory {name_or_dir} does not exist (and it is not a hub repo id)"
        )
    else:
        try:
            path = snapshot_download(repo_id=name_or_dir, allow_patterns=HUB_FILES)
        except Exception as e:
            # offline, no such repo, an invalid id: huggingface_hub raises many kinds
            raise FileNotFoundError(
                f"{name_or_dir!r} is neither a local directory nor a model the hub gave us "
                f"({type(e).__name__}): check the path, or use a hub id such as gpt2 "
                "(online, or once downloaded into the hub cache)"
            ) from e
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a GPT-2 checkpoint in hub layout")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        if os.path.exists(os.path.join(path, "pytorch_model.bin")):
            raise ValueError(
                f"{path} has only pytorch_model.bin: clt-forge never unpickles files. Convert it "
                "once where you trust it: GPT2LMHeadModel.from_pretrained(p).save_pretrained(p, "
                "safe_serialization=True)"
            )
        raise FileNotFoundError(f"{path} has no model.safetensors")
    return path


# -----------------------------------------------------------------------------
# tokenizer: GPT-2's byte-level BPE, built from the checkpoint's own vocab.json + merges.txt

# GPT-2's pre-tokenization pattern (tiktoken's r50k / gpt2 pat_str)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's map from the 256 bytes to printable unicode characters (vocab.json's alphabet).

    Printable latin-1 bytes map to themselves; the other 68 go to 256, 257, ... in byte order.
    The dict is in GPT-2's rank order: the 188 printable bytes first, then the rest (ids 0..255).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)  # the printable latin-1 bytes
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + rest.index(b)) for b in keep + rest}  # rank order


def load_tokenizer(name_or_dir=DEFAULT_MODEL):
    """A tiktoken Encoding from vocab.json + merges.txt (for the gpt2 family: tiktoken's "gpt2").

    tiktoken merges by rank, so ranks must follow merge order: the 256 bytes first, then one token
    per line of merges.txt. We check that vocab.json agrees, as tiktoken's own gpt2 loader does.
    """
    path = name_or_dir if os.path.isdir(str(name_or_dir)) else resolve_model_dir(name_or_dir)
    for name in ("vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(path, name)):
            needs = "the tokenizer needs vocab.json and merges.txt"
            raise FileNotFoundError(f"{path} has no {name}: {needs}")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token):  # vocab.json's printable characters -> the token's bytes
        return bytes(byte_of[c] for c in token)

    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        # line 0 is "#version"
        merges = [line.split() for line in f.read().split("\n")[1:] if line.strip()]
    ranks = {to_bytes(c): i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        ranks[to_bytes(a) + to_bytes(b)] = len(ranks)
    from_vocab = {to_bytes(k): v for k, v in vocab.items() if k != ENDOFTEXT}
    if from_vocab != ranks:
        needs = "tiktoken needs rank == id"
        raise ValueError(f"{path}: vocab.json ids do not follow merges.txt order; {needs}")
    if ENDOFTEXT not in vocab:
        raise ValueError(f"{path}: vocab.json has no {ENDOFTEXT}")
    return tiktoken.Encoding(
        name=os.path.basename(os.path.normpath(path)),
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: vocab[ENDOFTEXT]},
    )

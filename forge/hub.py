"""Models in the Hugging Face hub layout: where a model directory is, GPT-2's config.json and
weights in the hub's keys and layouts, and its tokenizer built from the checkpoint's own
vocab.json + merges.txt (tiktoken does the merging)."""

import json
import os
import re

import tiktoken
from huggingface_hub import snapshot_download
from safetensors.torch import load_file

from forge.files import save_safetensors, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "tiny")
HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
# the Llama family's: sharded weights and the tokenizers package's tokenizer.json
HUB_FILES += ["model-*.safetensors", "model.safetensors.index.json", "tokenizer*.json"]


def resolve_model_dir(name_or_dir):
    """A local directory, or a hub repo id fetched (config, safetensors weights, tokenizer only)."""
    name_or_dir = str(name_or_dir)
    looks_like_path = name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1
    if os.path.isdir(name_or_dir):
        path = name_or_dir
    elif looks_like_path or os.path.exists(name_or_dir):
        raise FileNotFoundError(f"model directory {name_or_dir} does not exist (nor a hub id)")
    else:
        try:
            path = snapshot_download(repo_id=name_or_dir, allow_patterns=HUB_FILES)
        except Exception as e:  # offline, no such repo, an invalid id: the hub raises many kinds
            raise FileNotFoundError(
                f"{name_or_dir!r} is neither a local directory nor a model the hub gave us "
                f"({type(e).__name__}): check the path, or use a hub id such as gpt2 "
                "(online, or once downloaded into the hub cache)"
            ) from e
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a model in the hub layout")
    weights = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards
    if not any(os.path.exists(os.path.join(path, name)) for name in weights):
        if os.path.exists(os.path.join(path, "pytorch_model.bin")):
            raise ValueError(
                f"{path} has only pytorch_model.bin: clt-forge never unpickles files. Convert it "
                "once where you trust it: AutoModelForCausalLM.from_pretrained(p)"
                ".save_pretrained(p, safe_serialization=True)"
            )
        raise FileNotFoundError(f"{path} has no model.safetensors (nor a sharded index)")
    return path


def read_config(path):
    """{path}/config.json as a dict."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# GPT-2's config and weights: HF's GPT-2 uses Conv1D, whose weight is stored (in, out), transposed
# here to nn.Linear's (out, in); the hub's gpt2 repo has no `transformer.` prefix, transformers'
# save_pretrained has; both load.

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASKS = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # HF's causal-mask buffers


def gpt2_config(path):
    """GPTConfig's fields from {path}/config.json (n_positions, or n_ctx in old configs)."""
    hf = read_config(path)
    hf.setdefault("n_positions", hf.get("n_ctx"))
    needed = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
    missing = [k for k in needed if hf.get(k) is None]
    if missing:
        raise ValueError(f"{path}/config.json lacks {missing}: not a GPT-2 config")
    shape = {k: hf[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")}
    eps = hf.get("layer_norm_epsilon", 1e-5)
    return dict(shape, n_ctx=hf["n_positions"], layer_norm_epsilon=eps)


def gpt2_weights(path, own, config):
    """{path}/model.safetensors in the keys and layouts of `own` (the model's state_dict), float32;
    any missing, unexpected or wrongly shaped weight is refused, naming `config`."""
    hub_sd = load_file(os.path.join(path, "model.safetensors"))
    tied = any(k.endswith("wte.weight") for k in hub_sd)  # transformers may save lm_head = wte
    sd = {}
    for k, v in hub_sd.items():
        k = k.removeprefix("transformer.")
        if not MASKS.search(k) and not (k == "lm_head.weight" and tied):
            sd[k] = v.t() if k.endswith(CONV1D) else v
    check_keys(path, config, sd, own)
    return {k: v.float() for k, v in sd.items()}


def check_keys(path, config, sd, own):
    """Refuse a checkpoint `sd` (read from `path`) whose keys or shapes differ from `own`
    (the model's state_dict), naming `config`: every difference in one message."""
    unexpected = sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd)
    resized = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    wrong = sorted(f"{k}: {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in resized)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not match {config}:\n  missing keys: {missing}\n"
            f"  unexpected keys: {unexpected}\n  wrong shapes: {wrong}"
        )


def save_gpt2(path, c, state_dict):
    """The hub's gpt2 layout of a model with GPTConfig fields `c` (a dict) and `state_dict`:
    config.json + model.safetensors, keys without `transformer.`."""
    os.makedirs(path, exist_ok=True)
    eot = c["vocab_size"] - 1  # <|endoftext|> is GPT-2's last token
    c = dict(c, n_positions=c["n_ctx"])
    keys = "n_layer n_head n_embd n_positions n_ctx vocab_size layer_norm_epsilon".split()
    hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new")
    hf.update({k: c[k] for k in keys}, bos_token_id=eot, eos_token_id=eot)
    hf.update(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, initializer_range=0.02)
    sd = {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state_dict.items()}
    # each file whole or not at all, config.json last: a directory with it holds its weights
    save_safetensors(os.path.join(path, "model.safetensors"), sd, metadata={"format": "pt"})
    write_json(os.path.join(path, "config.json"), hf, indent=2)


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
    """A tiktoken Encoding from vocab.json + merges.txt (for the gpt2 family: tiktoken's "gpt2");
    other families' tokenizer.json through the tokenizers package (HubTokenizer).
    tiktoken merges by rank, so ranks must follow merge order: the 256 bytes first, then one token
    per line of merges.txt. We check that vocab.json agrees, as tiktoken's own gpt2 loader does."""
    path = name_or_dir if os.path.isdir(str(name_or_dir)) else resolve_model_dir(name_or_dir)
    if not os.path.exists(os.path.join(path, "merges.txt")):  # Llama 3, Qwen3: tokenizer.json
        return HubTokenizer(path)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token):  # vocab.json's printable characters -> the token's bytes
        return bytes(byte_of[c] for c in token)

    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:  # line 0: "#version"
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
    name = os.path.basename(os.path.normpath(path))
    special = {ENDOFTEXT: vocab[ENDOFTEXT]}
    return tiktoken.Encoding(
        name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special
    )


# -----------------------------------------------------------------------------
# transcoders on the hub: owner/name, owner/name/subfolder, either @revision (a branch, a commit)

HUB_ID = re.compile(r"([\w.-]+/[\w.-]+)((?:/[\w.-]+)*)(?:@([\w./-]+))?")
TRANSCODER_FILES = ["*.safetensors", "*.json", "*.yaml"]  # never a pickle


def is_hub_id(path_or_id):
    """Whether `path_or_id` names a hub repo rather than a local path: owner/name[/sub][@rev],
    not a path that exists, whose first folder exists, or that starts with '.', '/' or '~'."""
    s = str(path_or_id)
    local = s.startswith((".", "/", "~")) or os.path.exists(s) or os.path.isdir(s.split("/")[0])
    return not local and HUB_ID.fullmatch(s) is not None


def resolve_transcoder_dir(path_or_id, download=snapshot_download):
    """A local transcoder directory, or a hub id's files (safetensors, json, yaml: no pickles)
    downloaded into the hub cache with huggingface_hub's progress bars -> the directory."""
    s = str(path_or_id)
    if not is_hub_id(s):
        if not os.path.isdir(s):
            raise FileNotFoundError(f"no transcoder at {s}: not a directory, nor a hub id")
        return s
    repo_id, sub, revision = HUB_ID.fullmatch(s).groups()
    sub = sub.strip("/")
    patterns = [f"{sub}/{p}" if sub else p for p in TRANSCODER_FILES]
    print(f"downloading {s} from the hub ({', '.join(patterns)})")
    try:
        path = download(repo_id=repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, no such repo, a gated one: the hub raises many kinds
        raise FileNotFoundError(
            f"{s!r} is neither a local directory nor a transcoder the hub gave us "
            f"({type(e).__name__}): check the path, or the hub id owner/name[/subfolder][@rev]"
        ) from e
    path = os.path.join(path, sub) if sub else path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"the hub repo {repo_id} has no folder {sub!r} of transcoder files")
    return path


class HubTokenizer:
    """A tokenizer.json (Llama 3, Qwen3) through the `tokenizers` package, with the part of
    tiktoken's Encoding this library calls. Ids equal transformers' AutoTokenizer's with
    add_special_tokens=False: the spine puts the BOS in front itself. eot_token is that BOS, the
    token circuit-tracer 0.5.0's `ensure_tokenized` (replacement_model/common.py) prepends: the
    tokenizer's bos, else pad, else eos, else its first special token (Qwen3 has no bos: its pad,
    <|endoftext|>). Unlike tiktoken's encode_ordinary, special tokens in the text stay special."""

    def __init__(self, path):
        from tokenizers import Tokenizer  # the Llama family's only: GPT-2 needs tiktoken alone

        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"{path} has no tokenizer.json, nor vocab.json + merges.txt")
        self.tokenizer = Tokenizer.from_file(file)
        self.n_vocab = self.tokenizer.get_vocab_size()
        self.eot_token = self.bos_id(path)
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def bos_id(self, path):
        """ensure_tokenized's rule: bos_token, pad_token, eos_token, the first special token."""
        names = []
        config = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(config):
            with open(config, encoding="utf-8") as f:
                c = json.load(f)
            for name in ("bos_token", "pad_token", "eos_token"):
                token = c.get(name)  # a str, or {"content": str} in older files
                names.append(token.get("content") if isinstance(token, dict) else token)
        added = sorted(self.tokenizer.get_added_tokens_decoder().items())
        names += [t.content for _, t in added if t.special]
        ids = [self.tokenizer.token_to_id(n) for n in names if n]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ValueError(f"{path}: the tokenizer has no special token to put first (BOS)")
        return ids[0]

    def encode_ordinary(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text, allowed_special=()):
        return self.encode_ordinary(text)

    def encode_single_token(self, text):
        i = self.tokenizer.token_to_id(text)
        if i is None:
            raise KeyError(f"{text!r} is not one token of this tokenizer")
        return i

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_single_token_bytes(self, t):
        """The token's bytes: byte-level BPE tokens map back through GPT-2's byte alphabet."""
        token = self.tokenizer.id_to_token(int(t))
        if all(c in self.byte_of for c in token):
            return bytes(self.byte_of[c] for c in token)
        return token.encode("utf-8")  # special tokens, non-byte-level vocabularies

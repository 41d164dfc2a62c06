"""
clt.py: GPT-2 written out by hand, and the cross-layer transcoder that reads and writes its MLPs.

Data flow. A GPT-2 block is  x -> x + attn(ln_1(x)) -> x + mlp(ln_2(x)).  A cross-layer transcoder
(CLT) reads each layer's MLP input  mlp_in[l] = ln_2(x)  and predicts every MLP output
mlp_out[l] = mlp(mlp_in[l])  from sparse features of the layers at or below l. So the model exposes
exactly those two tensors (`GPT.run_with_acts`), and can run with its MLP outputs replaced by
given ones (`GPT.forward(idx, mlp_out=...)`), which splices a CLT into the model.

    python clt.py --help
    python clt.py generate --model models/tiny --prompt "The capital of Veloria is"
    python clt.py generate --model gpt2 --prompt "Hello, my name is"      # needs the hub

References: GPT-2 (Radford et al. 2019); the layout of nanoGPT's model.py; weights in the Hugging
Face hub layout (config.json + model.safetensors + vocab.json + merges.txt). Differences from
nanoGPT: no dropout, no flash attention (attention patterns are a first-class tensor here, because
attribution graphs freeze them), weights loaded with safetensors only.

Shape letters used throughout the project:
    B batch, T tokens (time), L layers, d model width (n_embd), V vocabulary,
    nh heads, hs head size, F features per layer (CLT), N rows (flattened tokens)
"""
import argparse
import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import re
import sys
import uuid
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import timedelta
from typing import Optional

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "tiny")
HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]

# -----------------------------------------------------------------------------
# GPT-2


@dataclass
class GPTConfig:
    n_layer: int = 12  # number of transformer blocks (L)
    n_head: int = 12  # attention heads per block (nh)
    n_embd: int = 768  # residual stream width (d)
    n_ctx: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # V
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        """Checked before anything is allocated: a wrong config.json fails here, in one line."""
        for name in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd} (the head size is n_embd / n_head)")
        if not 0 < self.layer_norm_epsilon < 1:
            raise ValueError(f"layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}")
        d = self.n_embd
        n_params = (self.vocab_size + self.n_ctx) * d + self.n_layer * 12 * d * d
        if n_params > 5e9:  # gpt2-xl has 1.6e9; 5e9 fp32 weights are 20 GB
            raise ValueError(f"this config has {n_params:.1e} parameters, far more than any GPT-2 (gpt2-xl: 1.6e9): "
                             f"check n_layer, n_embd, n_ctx and vocab_size in config.json")


@dataclass
class Frozen:
    """The nonlinear state of one forward pass, recorded so a later pass can reuse it.

    With attention patterns and LayerNorm scales frozen, everything between the MLPs is linear in
    the residual stream: this is the "local replacement model" of Ameisen et al. 2025, sec. 3.
    """
    attn: list = field(default_factory=list)  # per layer: (B, nh, T, T) attention probabilities
    ln_1: list = field(default_factory=list)  # per layer: (B, T, 1) 1/sqrt(var + eps) of ln_1's input
    ln_2: list = field(default_factory=list)  # per layer: (B, T, 1) the same for ln_2
    ln_f: Optional[torch.Tensor] = None  # (B, T, 1) the same for the final LayerNorm (None without logits)


@dataclass
class Acts:
    """What `run_with_acts` records: the tensors a CLT reads and writes."""
    mlp_in: torch.Tensor  # (B, T, L, d) each MLP's input, after ln_2
    mlp_out: torch.Tensor  # (B, T, L, d) each MLP's output, before it joins the residual stream
    frozen: Frozen  # attention patterns and LayerNorm scales of this pass
    ln_f_out: Optional[torch.Tensor] = None  # (B, T, d) ln_f's output, what the unembedding reads (None without logits)


class WriteLayer(torch.autograd.Function):
    """buf[:, :, l] = x in place, returning buf: how `run_with_acts` fills its (B, T, L, d) tensors.

    Forward: copies x (B, T, d) into slot l of buf (B, T, L, d). Backward: x gets grad[:, :, l] (a
    view, as torch.stack's backward gives) and buf's earlier version gets grad as it is. Autograd's
    own slice assignment (CopySlices) would clone the whole grad to zero slot l, once per layer: L
    full copies per backward (3-6x slower at graph.py's (64, T) batches on CPU). Not zeroing is exact
    here because each slot is written once and each write's backward reads only its own slot.
    """

    @staticmethod
    def forward(ctx, buf, x, l):
        ctx.l = l
        buf[:, :, l] = x
        ctx.mark_dirty(buf)
        return buf

    @staticmethod
    def backward(ctx, grad):
        return grad, grad[:, :, ctx.l], None


def layer_norm(x, ln: nn.LayerNorm, frozen_scale=None):
    """LayerNorm written out so its scale 1/sqrt(var + eps) can be recorded or frozen: -> (y, scale).

    A frozen scale is a constant, so the map is then linear in x (the mean subtraction is linear).
    """
    x_centered = x - x.mean(-1, keepdim=True)
    if frozen_scale is None:
        scale = torch.rsqrt(x_centered.pow(2).mean(-1, keepdim=True) + ln.eps)  # (B, T, 1)
    else:
        scale = frozen_scale.detach()
    return x_centered * scale * ln.weight + ln.bias, scale.detach()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, frozen_pattern=None):
        """x (B, T, C) -> (output (B, T, C), attention pattern (B, nh, T, T))."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if frozen_pattern is None:
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            att = (q @ k.transpose(-2, -1)) * (k.size(-1) ** -0.5)  # (B, nh, T, T)
            # the mask is made per call: a stored (n_ctx, n_ctx) buffer would be n_ctx² bytes at load
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        else:
            att = frozen_pattern.detach()  # q and k no longer matter: only the OV path stays
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y), att.detach()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_ctx, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        # the unembedding is tied to the token embedding (W_U = wte.weight^T), as in GPT-2

    def check_input(self, idx):
        if idx.dim() != 2:
            raise ValueError(f"token ids must be (B, T), got shape {tuple(idx.shape)}")
        T = idx.size(1)
        if not 0 < T <= self.config.n_ctx:
            raise ValueError(f"sequence length {T} must be in 1..n_ctx={self.config.n_ctx}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), "
                             f"got [{idx.min().item()}, {idx.max().item()}]")

    def embed(self, idx):
        """(B, T) token ids -> (B, T, d) the residual stream before block 0."""
        pos = torch.arange(idx.size(1), device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def forward(self, idx, mlp_out=None, frozen=None, resid=None):
        """idx (B, T) -> logits (B, T, V). The arguments are those of `run_with_acts`."""
        logits, _ = self._run(idx, mlp_out, frozen, resid, logits=True, record=False)
        return logits

    def run_with_acts(self, idx, mlp_out=None, frozen=None, resid=None, logits=True):
        """idx (B, T) -> (logits (B, T, V) or None, Acts): the one way activations come out of the model.

        mlp_out: (B, T, L, d) if given, replaces every MLP's output: this splices a CLT into the model.
        frozen:  a `Frozen` from an earlier pass: attention patterns and LayerNorm scales are taken
                 from it as constants (the local replacement model of attribution graphs).
        resid:   (B, T, d) used instead of `embed(idx)`, e.g. a leaf tensor to take gradients against.
        logits:  False skips the final LayerNorm and the unembedding (a third of GPT-2-small's
                 forward FLOPs and a (B, T, V) tensor) where only the activations are wanted.
        """
        return self._run(idx, mlp_out, frozen, resid, logits, record=True)

    def _run(self, idx, mlp_out, frozen, resid, logits, record):
        self.check_input(idx)
        L = len(self.h)
        x = self.embed(idx) if resid is None else resid
        fz = frozen if frozen is not None else Frozen([None] * L, [None] * L, [None] * L)
        acts = None
        for l, block in enumerate(self.h):
            h, scale_1 = layer_norm(x, block.ln_1, fz.ln_1[l])
            attn_out, pattern = block.attn(h, fz.attn[l])
            x = x + attn_out
            h, scale_2 = layer_norm(x, block.ln_2, fz.ln_2[l])
            out = block.mlp(h) if mlp_out is None else mlp_out[:, :, l]
            x = x + out
            if not record:  # a plain forward keeps nothing: (B, nh, T, T) patterns add up at long contexts
                continue
            if acts is None:  # allocated at layer 0, where the dtypes show (autocast makes the MLP's bf16)
                B, T, d = h.size()
                acts = Acts(h.new_empty(B, T, L, d), out.new_empty(B, T, L, d), Frozen())
            # each layer goes straight into its slot: stacking per-layer lists at the end would hold
            # the activations twice for a moment (+0.28 GiB at the cache writer's 64 x 64 batches of GPT-2 small)
            acts.mlp_in = WriteLayer.apply(acts.mlp_in, h, l)
            acts.mlp_out = WriteLayer.apply(acts.mlp_out, out, l)
            acts.frozen.attn.append(pattern)
            acts.frozen.ln_1.append(scale_1)
            acts.frozen.ln_2.append(scale_2)
        y = None
        if logits:
            x, ln_f = layer_norm(x, self.ln_f, fz.ln_f)
            if record:
                acts.frozen.ln_f = ln_f
                acts.ln_f_out = x
            y = x @ self.wte.weight.T  # (B, T, V)
        return y, acts

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Append max_new_tokens to idx (B, T): greedy with top_k=1, else sampled from the top_k."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.n_ctx:])[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = float("-inf")
            idx_next = torch.multinomial(logits.softmax(dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def fingerprint(self):
        """sha256 of the config and every weight (name, shape, float32 bytes), in name order: what a
        cache or a CLT records of the model it was made from. Reads every weight once (~1 s per GB), so
        it is kept until a weight changes: each weight's storage and version counter (bumped by every
        in-place write, e.g. load_state_dict or an optimizer step) say whether one did."""
        config = json.dumps(asdict(self.config), sort_keys=True)
        weights = sorted(self.state_dict().items())
        key = (config, tuple((name, t.data_ptr(), t._version) for name, t in weights))
        if getattr(self, "_fingerprint", (None, None))[0] != key:
            h = hashlib.sha256(config.encode())
            for name, t in weights:
                h.update(f"{name}{tuple(t.shape)}".encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            self._fingerprint = (key, h.hexdigest())
        return self._fingerprint[1]

    # -------------------------------------------------------------------------
    # loading and saving in the Hugging Face hub layout

    @classmethod
    def from_pretrained(cls, name_or_dir=DEFAULT_MODEL):
        """Load GPT-2 from a local directory or a hub repo id (gpt2, gpt2-medium, gpt2-large, gpt2-xl).

        Both key styles load: `h.0.attn.c_attn.weight` (the hub's gpt2 repo) and
        `transformer.h.0.attn.c_attn.weight` (transformers' save_pretrained).
        """
        path = resolve_model_dir(name_or_dir)
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        hf.setdefault("n_positions", hf.get("n_ctx"))
        missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if hf.get(k) is None]
        if missing:
            raise ValueError(f"{path}/config.json lacks {missing}: not a GPT-2 config (model_type gpt2)")
        config = GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], n_ctx=hf["n_positions"],
                           vocab_size=hf["vocab_size"], layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        model = cls(config)
        model.load_hf_state_dict(load_file(os.path.join(path, "model.safetensors")), source=path)
        model.name_or_path = str(name_or_dir)
        return model.eval()

    def load_hf_state_dict(self, hf_sd, source="state dict"):
        # HF's GPT-2 uses Conv1D, whose weight is stored (in, out): transpose into nn.Linear's (out, in)
        conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
        ignored = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # HF's causal-mask buffers, not weights
        sd, unexpected = {}, []
        for k, v in hf_sd.items():
            k = k.removeprefix("transformer.")
            if ignored.search(k):
                continue
            if k == "lm_head.weight":  # tied to wte in GPT-2; transformers may save it anyway
                if "wte.weight" in sd or any(x.endswith("wte.weight") for x in hf_sd):
                    continue
            sd[k] = v.t() if k.endswith(conv1d) else v
        own = self.state_dict()
        unexpected = sorted(k for k in sd if k not in own)
        missing = sorted(k for k in own if k not in sd)
        wrong = sorted(f"{k}: {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
                       for k in own if k in sd and sd[k].shape != own[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"{source} does not match GPTConfig {self.config}:\n"
                             f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  wrong shapes: {wrong}")
        self.load_state_dict({k: v.float() for k, v in sd.items()})

    def save_pretrained(self, path):
        """Write config.json + model.safetensors exactly as in the hub's gpt2 repo (no `transformer.` prefix)."""
        os.makedirs(path, exist_ok=True)
        c = self.config
        hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new",
                  n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.n_ctx, n_ctx=c.n_ctx,
                  vocab_size=c.vocab_size, layer_norm_epsilon=c.layer_norm_epsilon,
                  bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1,
                  attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, initializer_range=0.02)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
        sd = {k: (v.t() if k.endswith(conv1d) else v).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def resolve_model_dir(name_or_dir):
    """A local directory, or a hub repo id fetched (config, safetensors weights, tokenizer only)."""
    name_or_dir = str(name_or_dir)
    if os.path.isdir(name_or_dir):
        path = name_or_dir
    elif name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1 or os.path.exists(name_or_dir):
        raise FileNotFoundError(f"model directory {name_or_dir} does not exist (and it is not a hub repo id)")
    else:
        try:
            path = snapshot_download(repo_id=name_or_dir, allow_patterns=HUB_FILES)
        except Exception as e:  # offline, no such repo, an invalid id: huggingface_hub raises many kinds
            raise FileNotFoundError(f"{name_or_dir!r} is neither a local directory nor a model the hub gave us "
                                    f"({type(e).__name__}): check the path, or use a hub id such as gpt2 "
                                    "(online, or once downloaded into the hub cache)") from e
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a GPT-2 checkpoint in the hub layout")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        if os.path.exists(os.path.join(path, "pytorch_model.bin")):
            raise ValueError(f"{path} has only pytorch_model.bin: clt-forge never unpickles files. Convert it "
                             "once where you trust it: GPT2LMHeadModel.from_pretrained(p).save_pretrained(p, "
                             "safe_serialization=True)")
        raise FileNotFoundError(f"{path} has no model.safetensors")
    return path


# -----------------------------------------------------------------------------
# tokenizer: GPT-2's byte-level BPE, built from the checkpoint's own vocab.json + merges.txt

# GPT-2's pre-tokenization pattern (tiktoken's r50k / gpt2 pat_str)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's map from the 256 bytes to printable unicode characters (vocab.json's alphabet).

    Printable latin-1 bytes map to themselves; the other 68 are shifted to 256, 257, ... in byte order.
    The dict is in GPT-2's rank order: the 188 printable bytes first, then the rest (ids 0..255).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + rest.index(b)) for b in keep + rest}  # rank order


def load_tokenizer(name_or_dir=DEFAULT_MODEL):
    """A tiktoken Encoding from vocab.json + merges.txt; for the gpt2 family it is tiktoken's "gpt2".

    tiktoken merges by rank, so ranks must follow merge order: the 256 bytes first, then one token
    per line of merges.txt. We check that vocab.json agrees, as tiktoken's own gpt2 loader does.
    """
    path = name_or_dir if os.path.isdir(str(name_or_dir)) else resolve_model_dir(name_or_dir)
    for name in ("vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path} has no {name}: the tokenizer needs vocab.json and merges.txt")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token):  # vocab.json's printable characters -> the token's bytes
        return bytes(byte_of[c] for c in token)

    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        merges = [line.split() for line in f.read().split("\n")[1:] if line.strip()]  # line 0 is "#version"
    ranks = {to_bytes(c): i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        ranks[to_bytes(a) + to_bytes(b)] = len(ranks)
    from_vocab = {to_bytes(k): v for k, v in vocab.items() if k != ENDOFTEXT}
    if from_vocab != ranks:
        raise ValueError(f"{path}: vocab.json ids do not follow merges.txt order; tiktoken needs rank == id")
    if ENDOFTEXT not in vocab:
        raise ValueError(f"{path}: vocab.json has no {ENDOFTEXT}")
    return tiktoken.Encoding(name=os.path.basename(os.path.normpath(path)), pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens={ENDOFTEXT: vocab[ENDOFTEXT]})


# -----------------------------------------------------------------------------
# distributed: the (dp, tp) mesh and every collective the project uses
#
# Tensor parallelism (Megatron-style feature sharding, as in picotron's column/row-parallel pair):
# TP rank r of tp holds features [r·F/tp, (r+1)·F/tp) of every layer (W_enc columns, b_enc,
# thresholds, W_dec rows). It encodes locally, decodes a partial reconstruction, and one all-reduce
# over the TP group completes it; b_dec is replicated and added once, after the sum. TopK and
# BatchTopK select globally: local top-k, all-gather of the candidate values, one global choice.
# Data parallelism averages gradients over the DP group. Each collective below returns at once
# when its group has one rank, so one process runs exactly the same code (picotron's
# tp_communications.py keeps the same shortcut inside every op).

import torch.distributed as dist  # noqa: E402 (kept in this section: the GPT part above does not need it)


@dataclass
class Mesh:
    """Where this process sits in the (dp, tp) mesh, and the two process groups; Mesh() is one process."""
    dp: int = 1  # data-parallel size
    tp: int = 1  # tensor-parallel size: the ranks that share one CLT's features
    dp_rank: int = 0
    tp_rank: int = 0
    dp_group: object = None  # torch.distributed process groups (None on one process)
    tp_group: object = None


def compute_init(device="auto", timeout_s=300):
    """-> (ddp, rank, local_rank, world_size, device); (False, 0, 0, 1, device) without torchrun."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if not dist.is_initialized():  # the timeout turns a crashed or stuck peer into an error, not a hang
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return ddp, rank, local_rank, world, device


def make_mesh(ddp, world, tp, device):
    """The (dp, tp) device mesh of torchrun's processes; ranks r·tp .. r·tp + tp − 1 form TP group r."""
    if tp < 1 or world % tp:
        raise ValueError(f"--tp {tp} must divide the world size {world} (torchrun --nproc_per_node)")
    if not ddp:
        return Mesh()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return Mesh(world // tp, tp, mesh.get_local_rank("dp"), mesh.get_local_rank("tp"),
                mesh.get_group("dp"), mesh.get_group("tp"))


def group_size(group):
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def group_rank(group):
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


class AllReduceSum(torch.autograd.Function):
    """forward: the sum of x over the ranks of `group`.  backward: identity.

    The loss after this sum is computed identically on every TP rank, so each rank already holds
    the whole gradient of the sum, which is also the gradient of its own addend. All-reducing it in
    the backward as well would multiply every gradient by tp (Megatron's "g" operator).
    """

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def tp_sum(x, group):
    """Sum the TP ranks' partial tensors, identity backward (see AllReduceSum). One rank: x itself."""
    return x if group_size(group) == 1 else AllReduceSum.apply(x, group)


def all_reduce_sum(x, group):
    """In-place sum over `group` of a tensor that needs no gradient; one rank: a no-op."""
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def all_gather_last(x, group):
    """forward only (no gradient): concatenate x (..., c) over the ranks of `group` -> (..., tp·c)."""
    if group_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def global_topk(vals, k, group):
    """vals (..., c): this rank's candidates. Which of them are among the k largest of all ranks'?

    Returns (keep (..., c) bool, kth (...) the k-th largest value over all ranks). Selecting by the
    index into the gathered candidates (not by value >= kth) keeps exactly k winners under ties.
    """
    c = vals.size(-1)
    top = all_gather_last(vals.detach(), group).topk(k, dim=-1)  # (..., k) over tp·c candidates
    local = top.indices - group_rank(group) * c
    mine = (local >= 0) & (local < c)
    keep = torch.zeros(*vals.shape[:-1], c + 1, dtype=torch.bool, device=vals.device)
    keep.scatter_(-1, torch.where(mine, local, c), True)  # other ranks' winners land in column c
    return keep[..., :c], top.values[..., -1]


def average_gradients(params, group):
    """Mean of the gradients over the DP `group`: one flat all-reduce (the DDP bucket, without DDP)."""
    n = group_size(group)
    if n == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = all_reduce_sum(torch.cat([g.flatten() for g in grads]), group) / n
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def mesh_sum(parts, mesh):
    """Sum named tensors over the whole (dp, tp) mesh in ONE all-reduce, in float64 (no gradient): a
    training step's bookkeeping in one collective instead of one per quantity.

    parts: {name: (tensor, kind)}; the kind says how the copies on the ranks relate:
      "all"        a partial sum on every rank (e.g. over this rank's features and tokens): Σ over all ranks
      "dp"         the same on every TP rank of a replica (complete after a TP sum): Σ over dp
      "tp"         the same on every DP replica (e.g. a shard's gradient after DP averaging): Σ over tp
      "tp_slices"  this TP rank's slice (..., c) of a feature tensor: -> (..., tp·c) the slices side by
                   side, each summed over dp
    A rank whose copy duplicates another's sends zeros, so each copy is counted once (adding zeros is
    exact). Returns {name: float64 tensor}; one process: the tensors themselves, as float64.
    """
    chunks = []
    for t, kind in parts.values():
        t = t.detach().double()
        if kind == "tp_slices":
            slots = t.new_zeros(mesh.tp, *t.shape)  # (tp, ..., c): this rank fills its own slot
            slots[mesh.tp_rank] = t
            t = slots
        elif (kind == "dp" and mesh.tp_rank > 0) or (kind == "tp" and mesh.dp_rank > 0):
            t = torch.zeros_like(t)
        chunks.append(t)
    flat = torch.cat([t.flatten() for t in chunks])
    if mesh.dp * mesh.tp > 1 and dist.is_initialized():  # the mesh spans the world (make_mesh)
        dist.all_reduce(flat)
    out = {}
    for (name, (_, kind)), t, piece in zip(parts.items(), chunks, flat.split([t.numel() for t in chunks])):
        piece = piece.view(t.shape)
        out[name] = piece.movedim(0, -2).flatten(-2) if kind == "tp_slices" else piece  # (..., tp·c)
    return out


def check_same_everywhere(text, what, device):
    """Refuse to go on unless every rank holds the same `text` (its command line, its data's manifest):
    one all-gather of sha256 digests. Every rank raises, naming the ranks that differ from rank 0."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8, device=device)
    digests = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(digests, digest)
    differ = [r for r, other in enumerate(digests) if not torch.equal(other, digests[0])]
    if differ:
        raise ValueError(f"ranks {differ} have another {what} than rank 0: every node must run the same command "
                         "on the same cache (a shared filesystem, or the same bytes at the same path)")


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# cross-layer transcoder
#
# Ameisen et al. 2025 ("Circuit Tracing"), sec. 2.1: features of layer l read mlp_in[l] and write to
# the MLP outputs of every layer l' >= l:
#     acts[l]        = σ(mlp_in[l] @ W_enc[l] + b_enc[l])                         (B, F)
#     mlp_out_hat[l'] = Σ_{l <= l'} acts[l] @ W_dec[l][:, l' - l] + b_dec[l']    (B, d)
# Storage follows circuit-tracer: W_dec[l] is (F, L - l, d), the decoders of layer l's features.
# A per-layer transcoder (PLT; Dunefsky et al. 2024) is the special case where each feature writes to
# its own layer only: W_dec[l] is (F, 1, d). Either may add a linear skip connection mlp_in[l] @ W_skip[l]
# (Paulo et al. 2025, "Transcoders beat sparse autoencoders"), as circuit-tracer's transcoders do.
# Under TP each rank holds F/tp of the F features (the mesh section above).


@dataclass
class CLTConfig:
    n_layers: int = 4  # L: the model's layers; one encoder each
    d_model: int = 128  # d: the model's width
    n_features: int = 1024  # F: features per layer (all ranks together)
    activation: str = "jumprelu"  # jumprelu | topk | batchtopk | relu
    k: int = 16  # topk/batchtopk: active features per token and layer
    threshold_init: float = 0.03  # jumprelu: initial threshold θ (Anthropic's CLT recipe)
    bandwidth: float = 1.0  # jumprelu: width ε of the straight-through rectangle kernel
    model: str = ""  # the GPT this CLT was trained on (a path or hub id)
    model_sha256: str = ""  # that GPT's fingerprint (GPT.fingerprint()): a CLT is refused by any other model
    decoder: str = "cross-layer"  # cross-layer: a feature writes to its layer and every later one | per-layer (a PLT)
    skip: bool = False  # an affine skip connection mlp_in[l] @ W_skip[l] into mlp_out_hat[l] (Paulo et al. 2025)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if min(self.n_layers, self.d_model, self.n_features) <= 0:
            raise ValueError(f"n_layers, d_model, n_features must be positive, got {self}")
        if self.activation in ("topk", "batchtopk") and not 0 < self.k <= self.n_features:
            raise ValueError(f"k must be in 1..n_features={self.n_features}, got {self.k}")
        if self.threshold_init <= 0 or self.bandwidth <= 0:
            raise ValueError(f"threshold_init and bandwidth must be positive, got {self}")


ACTIVATIONS = ("jumprelu", "topk", "batchtopk", "relu")
DECODERS = ("cross-layer", "per-layer")


class JumpReLUFunction(torch.autograd.Function):
    """a = z · H(z − θ), with the straight-through estimator of Rajamanoharan et al. 2024 (eq. 11).

    forward:  exact.  backward:  ∂a/∂z = H(z − θ),  ∂a/∂θ = −(θ/ε) · K((z − θ)/ε)
    with the rectangle kernel K(u) = 1{|u| < 1/2}: θ gets a gradient only from pre-activations
    within ε/2 of it, which is what lets the threshold learn although H has zero derivative.
    """

    @staticmethod
    def forward(ctx, z, theta, eps):  # z (..., F), theta broadcastable to z
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return torch.where(z > theta, z, 0.0)  # one pass; z * (z > θ) would also copy the mask to float

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = torch.where(z > theta, grad, 0.0)
        kernel = (z - theta).abs_() < ctx.eps / 2
        # θ is constant over the batch dims it was broadcast over: sum grad·K first, scale by −θ/ε after
        grad_theta = torch.where(kernel, grad, 0.0).sum_to_size(theta.shape) * (-theta / ctx.eps)
        return grad_z, grad_theta, None


class CrossLayerTranscoder(nn.Module):
    """A CLT, or this TP rank's F/tp features of one. The default mesh (one process) gives the whole CLT."""

    def __init__(self, config: CLTConfig, seed: int = 0, mesh: Optional[Mesh] = None):
        super().__init__()
        self.config = config
        self.mesh = mesh if mesh is not None else Mesh()
        L, d, F_ = config.n_layers, config.d_model, config.n_features
        tp, tp_rank = self.mesh.tp, self.mesh.tp_rank
        if F_ % tp or not 0 <= tp_rank < tp:
            raise ValueError(f"n_features={F_} must split evenly over tp={tp} (tp_rank={tp_rank})")
        self.F_local = F_ // tp
        mine = slice(tp_rank * self.F_local, (tp_rank + 1) * self.F_local)  # this rank's features
        # init as in Ameisen et al. 2025 (methods, "Training"): uniform encoders of scale 1/sqrt(F),
        # decoders of scale 1/sqrt(L·d), zero biases. The full tensors come from one seeded generator
        # and each rank keeps its slice (picotron's reset_parameters), so the model does not depend on tp.
        g = torch.Generator().manual_seed(seed)

        def uniform(rows, cols, bound, keep_rows=slice(None), keep_cols=slice(None)):
            """A uniform(-bound, bound) (rows, cols) tensor's kept rows and columns. It is drawn in
            blocks of ~16 MB, each cut to what is kept before the next, so no rank holds the whole
            tensor (a layer's decoder is 0.9 GB at GPT-2-small's F = 24,576); the numbers are those of
            one draw, since the generator's stream does not depend on how it is split."""
            start, stop, _ = keep_rows.indices(rows)
            step = max(1, 2 ** 22 // cols)
            blocks = []
            for a in range(0, rows, step):
                block = (torch.rand(min(step, rows - a), cols, generator=g) * 2 - 1) * bound
                blocks.append(block[max(start - a, 0):max(stop - a, 0), keep_cols])
            return torch.cat(blocks)

        self.W_enc = nn.Parameter(uniform(L * d, F_, F_ ** -0.5, keep_cols=mine).view(L, d, self.F_local))  # (L, d, F/tp)
        self.b_enc = nn.Parameter(torch.zeros(L, self.F_local))  # (L, F/tp)
        # JumpReLU thresholds are learned in log space so they stay positive (Anthropic's recipe);
        # BatchTopK writes its inference threshold here too (see update_batchtopk_threshold)
        self.log_threshold = nn.Parameter(torch.full((L, self.F_local), math.log(config.threshold_init)))
        self.W_dec = nn.ParameterList([nn.Parameter(uniform(F_, self.n_writes(l) * d, (L * d) ** -0.5, keep_rows=mine)
                                                    .view(self.F_local, self.n_writes(l), d))
                                       for l in range(L)])  # W_dec[l]: (F/tp, L-l, d), or (F/tp, 1, d) per-layer
        self.b_dec = nn.Parameter(torch.zeros(L, d))  # (L, d), replicated on every TP rank
        # the skip connection is linear in mlp_in: zero at init, replicated on every TP rank like b_dec
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if config.skip else None  # (L, d, d): x @ W_skip[l]
        # per-layer scalars so that E||x|| = sqrt(d) during training (folded into the weights on export)
        self.register_buffer("input_scale", torch.ones(L))  # multiplies mlp_in[l]
        self.register_buffer("output_scale", torch.ones(L))  # multiplies mlp_out[l] (the target)
        self.batch_threshold = None  # batchtopk, training: (L,) the last batch's global B·k-th value

    def n_writes(self, layer):
        """How many MLP outputs a feature of `layer` writes to: layers layer .. layer + n_writes - 1.
        A cross-layer transcoder writes to every later layer; a per-layer transcoder (PLT) to its own."""
        return self.config.n_layers - layer if self.config.decoder == "cross-layer" else 1

    @property
    def threshold(self):  # (L, F) the JumpReLU threshold θ = exp(log θ), positive by construction
        return self.log_threshold.exp()

    def pre_acts(self, mlp_in):
        """mlp_in (B, L, d) raw activations -> pre-activations (B, L, F) (this rank's F/tp)."""
        x = (mlp_in * self.input_scale[:, None]).transpose(0, 1)  # (L, B, d)
        # one batched matmul with the bias fused; the (B, L, F) result is a view of (L, B, F) memory,
        # so each layer's (B, F) slice is contiguous for the decoder matmuls
        return torch.baddbmm(self.b_enc[:, None, :], x, self.W_enc).transpose(0, 1)  # (B, L, F)

    def topk(self, pre, k):
        """The k largest of relu(pre) per token and layer over all TP ranks' features (Gao et al. 2024)."""
        vals, idx = pre.topk(min(k, self.F_local), dim=-1)  # (B, L, c) local candidates
        vals = F.relu(vals)  # relu after the selection: the same values, k of F elements to touch
        keep, _ = global_topk(vals, k, self.mesh.tp_group)
        return torch.zeros_like(pre).scatter(-1, idx, vals * keep)  # (B, L, F)

    def batchtopk(self, pre):
        """The B·k largest of relu(pre) per layer over the batch and all TP ranks (Bussmann et al. 2024)."""
        B, L, F_ = pre.shape
        k = B * self.config.k
        flat = pre.transpose(0, 1).reshape(L, B * F_)  # (L, B·F)
        vals, idx = flat.topk(min(k, B * F_), dim=-1)  # (L, c)
        vals = F.relu(vals)
        keep, kth = global_topk(vals, k, self.mesh.tp_group)
        self.batch_threshold = kth.detach().float()  # (L,) what a JumpReLU would need to fire alike
        acts = torch.zeros_like(flat).scatter(-1, idx, vals * keep)  # (L, B·F)
        return acts.view(L, B, F_).transpose(0, 1)  # (B, L, F)

    def activate(self, pre):
        """pre-activations (B, L, F) -> sparse feature activations (B, L, F)."""
        c = self.config
        if c.activation == "relu":
            return F.relu(pre)
        if c.activation == "jumprelu" or (c.activation == "batchtopk" and not self.training):
            # batchtopk at inference: its learned per-layer threshold acts as a JumpReLU (Bussmann et al. 2024)
            return JumpReLUFunction.apply(pre, self.threshold.to(pre.dtype), c.bandwidth)
        return self.topk(pre, c.k) if c.activation == "topk" else self.batchtopk(pre)

    @torch.no_grad()
    def update_batchtopk_threshold(self, threshold, step, momentum=0.99):
        """BatchTopK -> JumpReLU (Bussmann et al. 2024): θ is a running mean of the batches' B·k-th
        values, threshold (L,). The first steps average plainly (momentum t/(t+1)), then an EMA."""
        m = min(momentum, step / (step + 1))
        theta = m * self.threshold + (1 - m) * threshold.clamp_min(1e-6)[:, None]  # (L, F)
        self.log_threshold.copy_(theta.log())

    def encode(self, mlp_in):
        """mlp_in (B, L, d) -> acts (B, L, F)."""
        return self.activate(self.pre_acts(mlp_in))

    def decode(self, acts, sparse=False, normalized=False, bias=True, mlp_in=None):
        """acts (B, L, F/tp) -> the reconstruction mlp_out_hat (B, L, d): the one decoder of the project.

        Dense: one matmul per source layer, cost ∝ F. sparse=True reads only the active features'
        decoder rows, cost ∝ L0: one embedding_bag per source layer (a sparse × dense product summing
        value · W_dec[l][f] per token, no gathered copy); acts may then be a sparse COO tensor. Its
        gradient reaches only the active entries of acts: exact for ReLU, TopK and BatchTopK, not for
        a JumpReLU threshold, whose straight-through gradient also needs inactive entries near θ.
        Each TP rank decodes its own features; the sum over ranks is taken in fp32 (it adds tp partial
        sums, also under bf16 autocast). normalized=True stays in the units the CLT is trained in;
        bias=False leaves out b_dec (e.g. AuxK's reconstruction of a residual). With a skip connection,
        pass mlp_in (B, L, d) to add it; without mlp_in the result is the features' part alone.
        """
        B, L, _ = acts.shape
        if not sparse:  # unbind: its backward stacks L gradients once (L slices would each zero-fill (B, L, F))
            # writes[src][j]: (B, d) what layer src's features write to layer src + j; unbind again, as a
            # [:, j] slice's backward would zero-fill the whole (B, L-src, d) once per slice
            writes = [(a @ self.W_dec[l].flatten(1)).view(B, self.n_writes(l), -1).unbind(1)
                      for l, a in enumerate(acts.unbind(1))]
            out = torch.stack([sum(writes[src][dst - src] for src in range(dst + 1) if dst - src < len(writes[src]))
                               for dst in range(L)], dim=1)
        else:
            if acts.is_sparse:
                acts = acts.coalesce()
                b, l, f = acts.indices()  # sorted by (b, l, f)
                vals = acts.values()
            else:
                b, l, f = acts.nonzero(as_tuple=True)  # row-major, so sorted by token b
                vals = acts[b, l, f]
            out = torch.zeros(B, L, self.config.d_model, dtype=self.W_dec[0].dtype, device=vals.device)  # (B, L, d)
            tokens = torch.arange(B, device=vals.device)
            for src in range(L):
                mine = l == src
                offsets = torch.searchsorted(b[mine], tokens)  # where each token's active features start
                W = self.W_dec[src].flatten(1)  # (F/tp, n_writes·d)
                rows = F.embedding_bag(f[mine], W, offsets, mode="sum", per_sample_weights=vals[mine].to(W.dtype))
                out[:, src:src + self.n_writes(src)] += rows.view(B, self.n_writes(src), -1)
        out = tp_sum(out.float(), self.mesh.tp_group)  # (B, L, d)
        if bias:
            out = out + self.b_dec
        if mlp_in is not None and self.W_skip is not None:  # replicated: added once, after the TP sum
            x = (mlp_in * self.input_scale[:, None]).transpose(0, 1)  # (L, B, d)
            out = out + torch.bmm(x.to(self.W_skip.dtype), self.W_skip).transpose(0, 1).float()  # (B, L, d)
        return out if normalized else out / self.output_scale[:, None]

    def decoder_writes(self, layer, ids, acts):
        """What features `ids` (n,) of `layer` with activations `acts` (n,) write to mlp_out[layer:layer
        + n_writes(layer)], in raw units: a · W_dec[layer][f] / output_scale, (n, n_writes, d). The same
        terms `decode` sums, one feature at a time (attribution graphs and logit effects need them apart)."""
        W = self.W_dec[layer]
        return W[ids] * acts[:, None, None].to(W.dtype) / self.output_scale[layer:layer + W.size(1), None]

    def forward(self, mlp_in):
        """mlp_in (B, L, d) -> (acts (B, L, F), mlp_out_hat (B, L, d)), the skip connection included."""
        acts = self.encode(mlp_in)
        return acts, self.decode(acts, mlp_in=mlp_in)

    def decoder_norms(self):
        """(L, F/tp) each feature's decoder norm over every layer it writes to (Anthropic's ||W_dec||)."""
        return torch.stack([W.flatten(1).norm(dim=1) for W in self.W_dec])

    # -------------------------------------------------------------------------
    # normalization folding, consolidation over TP, saving and loading (circuit-tracer's CLT layout)

    @torch.no_grad()
    def fold_normalization(self):
        """Fold input/output scales into the weights so the CLT works on raw activations.

        pre = (s_in x) W + b = x (s_in W) + b;  y_hat = (Σ a W_dec + b_dec + s_in x W_skip) / s_out  per
        target layer. Pre-activations are unchanged, so thresholds and activations are too.
        """
        self.W_enc.mul_(self.input_scale[:, None, None])
        for l, W in enumerate(self.W_dec):
            W.div_(self.output_scale[l:l + W.size(1)][None, :, None])
        self.b_dec.div_(self.output_scale[:, None])
        if self.W_skip is not None:
            self.W_skip.mul_((self.input_scale / self.output_scale)[:, None, None])
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)

    @torch.no_grad()
    def consolidated(self):
        """The whole CLT (one rank's worth, on the CPU) from every TP rank's shard; all TP ranks must call it."""
        full = CrossLayerTranscoder(self.config)

        def gather(t, dim):  # concatenate the shards along the feature dimension `dim`
            return all_gather_last(t.detach().transpose(dim, -1).contiguous(), self.mesh.tp_group).transpose(dim, -1)

        full.W_enc.copy_(gather(self.W_enc, -1))
        full.b_enc.copy_(gather(self.b_enc, -1))
        full.log_threshold.copy_(gather(self.log_threshold, -1))
        for l, W in enumerate(self.W_dec):
            full.W_dec[l].copy_(gather(W, 0))
        for name in ("b_dec", "input_scale", "output_scale") + (("W_skip",) if self.W_skip is not None else ()):
            getattr(full, name).copy_(getattr(self, name))
        return full.train(self.training)

    def save_pretrained(self, path):
        """config.json + W_enc_{l}.safetensors (W_enc_{l} (F, d), b_enc_{l}, threshold_{l}, b_dec_{l}, and
        W_skip_{l} (d, d) with a skip connection) + W_dec_{l}.safetensors (W_dec_{l} (F, L-l, d), or
        (F, 1, d) per-layer), circuit-tracer's CLT layout. Normalization is folded
        in first. Every file is written atomically and carries one export id, config.json last: a crash
        mid-save leaves files of two ids, which from_pretrained refuses, never a silent mix."""
        if self.mesh.tp > 1:
            raise ValueError(f"this is TP shard {self.mesh.tp_rank} of {self.mesh.tp}: save consolidated() instead")
        clt = copy.deepcopy(self).cpu()
        clt.fold_normalization()
        export_id = uuid.uuid4().hex
        clt.write_layer_files(path, export_id)
        write_json(os.path.join(path, "config.json"), dict(asdict(self.config), export_id=export_id))

    def write_layer_files(self, path, export_id, threshold=True):
        """The W_enc_{l} and W_dec_{l}.safetensors of save_pretrained, of this CLT as it is (scales folded
        or not), each file atomic and tagged with export_id. threshold=False leaves threshold_{l} out
        (circuit-tracer reads a CLT without thresholds as a ReLU one)."""
        os.makedirs(path, exist_ok=True)
        for l in range(self.config.n_layers):
            enc = {f"W_enc_{l}": self.W_enc[l].t(), f"b_enc_{l}": self.b_enc[l], f"b_dec_{l}": self.b_dec[l]}
            if threshold:
                enc[f"threshold_{l}"] = self.threshold[l]
            if self.W_skip is not None:  # (d, d) as circuit-tracer stores it: skip = x @ W_skip.T
                enc[f"W_skip_{l}"] = self.W_skip[l].t()
            dec = {f"W_dec_{l}": self.W_dec[l]}
            for name, tensors in ((f"W_enc_{l}", enc), (f"W_dec_{l}", dec)):
                save_safetensors(os.path.join(path, f"{name}.safetensors"), tensors, export_id)

    @classmethod
    def from_pretrained(cls, path, mesh: Optional[Mesh] = None):
        """Load a CLT saved by save_pretrained; on a TP mesh each rank reads only its slice of features."""
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{path} has no config.json: not a CLT saved by save_pretrained")
        with open(config_path) as f:
            saved = json.load(f)
        export_id = saved.pop("export_id", None)
        unknown = sorted(set(saved) - {f.name for f in fields(CLTConfig)})
        if unknown:
            raise ValueError(f"{config_path} has fields {unknown} that CLTConfig does not know: not a clt-forge CLT")
        clt = cls(CLTConfig(**saved), mesh=mesh)
        clt.read_layer_files(path, export_id)
        return clt.eval()

    @torch.no_grad()
    def read_layer_files(self, path, export_id):
        """Fill this CLT (this rank's features) from the files write_layer_files wrote (a missing
        threshold_{l} leaves the threshold as it is)."""
        mine = slice(self.mesh.tp_rank * self.F_local, (self.mesh.tp_rank + 1) * self.F_local)
        for l in range(self.config.n_layers):
            enc = _read_export_file(path, f"W_enc_{l}", export_id, mine)
            self.W_enc[l].copy_(enc[f"W_enc_{l}"].t())
            self.b_enc[l].copy_(enc[f"b_enc_{l}"])
            if f"threshold_{l}" in enc:
                self.log_threshold[l].copy_(enc[f"threshold_{l}"].log())
            self.b_dec[l].copy_(enc[f"b_dec_{l}"])
            if self.W_skip is not None:
                self.W_skip[l].copy_(enc[f"W_skip_{l}"].t())
            self.W_dec[l].copy_(_read_export_file(path, f"W_dec_{l}", export_id, mine)[f"W_dec_{l}"])


def save_safetensors(path, tensors, export_id=None):
    """tensors -> the safetensors file `path`, atomically, tagged with the export id of its save (if any)."""
    metadata = None if export_id is None else {"export_id": export_id}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def _read_export_file(path, name, export_id, rows):
    """The tensors of {path}/{name}.safetensors, `rows` of the per-feature ones."""
    file = os.path.join(path, f"{name}.safetensors")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: the CLT export in {path} is incomplete (re-export it, "
                                "e.g. python train.py --resume --out DIR)")
    with safe_open(file, "pt") as f:
        found = (f.metadata() or {}).get("export_id")
        if export_id is not None and found != export_id:
            raise ValueError(f"{file} comes from another save than the config in {path} (a crash during an "
                             "export?): re-export it, e.g. python train.py --resume --out DIR")
        per_layer = ("b_dec", "W_skip")  # one per layer, not per feature: every rank reads them whole
        return {k: f.get_tensor(k) if k.startswith(per_layer) else f.get_slice(k)[rows] for k in f.keys()}


# -----------------------------------------------------------------------------
# transcoders in the layouts circuit-tracer and SAELens publish, read at TransformerLens's hooks
#
# Both read TransformerLens's blocks.{l}.ln2.hook_normalized x̂, taken *before* ln_2's affine map,
# where our mlp_in is after it: mlp_in = x̂ · w + b. So ln_2's weight w and bias b are folded into the
# encoder (and the skip connection) on the way out, and taken out again on the way in: fold_ln_2.


@torch.no_grad()
def fold_ln_2(transcoder, model, inverse=False):
    """In place: make `transcoder` read x̂ (before ln_2's affine map) instead of our mlp_in = x̂ w + b;
    inverse=True: back again. Its input and output scales are folded first (fold_normalization).

    With W = W_enc[l] (d, F) and S = W_skip[l] (d, d), both applied as x @ W:
        (x̂ w + b) W + b_enc = x̂ (w ⊙ W) + (b W + b_enc),   (x̂ w + b) S + b_dec = x̂ (w ⊙ S) + (b S + b_dec)
    """
    transcoder.fold_normalization()
    for l, block in enumerate(model.h):
        w = block.ln_2.weight.detach().to(transcoder.W_enc)  # (d,)
        b = block.ln_2.bias.detach().to(transcoder.W_enc)  # (d,)
        if inverse and (w == 0).any():
            raise ValueError(f"ln_2 of layer {l} has zero weights: its affine map cannot be taken out again")
        pairs = [(transcoder.W_enc[l], transcoder.b_enc[l])]
        if transcoder.W_skip is not None:
            pairs.append((transcoder.W_skip[l], transcoder.b_dec[l]))
        for W, bias in pairs:  # W (d, n) applied as x @ W, bias (n,)
            if inverse:
                W.div_(w[:, None])
            # b W summed as circuit-tracer's (n, d) weights sum it: the graph references in
            # tests/fixtures, made through this fold, then regenerate bit for bit
            shift = W.t().contiguous() @ b  # (n,)
            if inverse:
                bias.sub_(shift)
            else:
                bias.add_(shift)
                W.mul_(w[:, None])


def per_layer_tensors(t, l, threshold_key, enc_by_feature):
    """Layer l of a per-layer transcoder (ln_2 folded in) as circuit-tracer's and SAELens's files hold
    it: W_enc (F, d) if enc_by_feature (circuit-tracer) else (d, F) (SAELens), W_dec (F, d), b_enc,
    b_dec, W_skip (d, d) applied as x̂ @ W_skip.T, and the threshold under threshold_key (None: none)."""
    tensors = {"W_enc": t.W_enc[l].t() if enc_by_feature else t.W_enc[l], "W_dec": t.W_dec[l][:, 0],
               "b_enc": t.b_enc[l], "b_dec": t.b_dec[l]}
    if threshold_key is not None:
        tensors[threshold_key] = t.threshold[l]
    if t.W_skip is not None:
        tensors["W_skip"] = t.W_skip[l].t()
    return tensors


@torch.no_grad()
def load_per_layer_tensors(t, l, tensors, threshold_key, enc_by_feature):
    """The inverse of per_layer_tensors: fill layer l of `t` (a missing threshold leaves it as it is)."""
    t.W_enc[l].copy_(tensors["W_enc"].t() if enc_by_feature else tensors["W_enc"])
    t.b_enc[l].copy_(tensors["b_enc"])
    t.W_dec[l].copy_(tensors["W_dec"][:, None])
    t.b_dec[l].copy_(tensors["b_dec"])
    if threshold_key in tensors:
        t.log_threshold[l].copy_(tensors[threshold_key].log())
    if t.W_skip is not None:
        t.W_skip[l].copy_(tensors["W_skip"].t())


# circuit-tracer 0.5.0 (TransformerLens backend), as its transcoder cache and the hub hold transcoders:
# {path}/config.yaml (model_kind, feature_input_hook, feature_output_hook, scan) beside the weights.
# Per-layer, its TranscoderSet: layer_{l}.safetensors with W_enc (F, d), W_dec (F, d), b_enc (F,),
# b_dec (d,), activation_function.threshold (F,) for JumpReLU, W_skip (d, d) with skip = x̂ @ W_skip.T.
# Cross-layer: save_pretrained's W_enc_{l} and W_dec_{l}.safetensors. config.yaml is written as JSON
# (YAML reads JSON) and carries our CLTConfig and export id under "clt_forge".

CIRCUIT_TRACER_HOOKS = dict(feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out")
CIRCUIT_TRACER_KINDS = {"per-layer": "transcoder_set", "cross-layer": "cross_layer_transcoder"}
CIRCUIT_TRACER_THRESHOLD = "activation_function.threshold"  # its JumpReLU's threshold in layer_{l}


def save_circuit_tracer(transcoder, path, model, model_name="gpt2"):
    """Write a transcoder of `model` (ln_2 folded in) in the layout circuit-tracer 0.5.0 loads:
    {path}/config.yaml + layer_{l}.safetensors (a PLT) or W_enc_{l}/W_dec_{l}.safetensors (a CLT).

    circuit-tracer reads it from its cache directory, e.g. for path = runs/plt-ct:
        load_transcoders_from_cache("plt-ct", cache_dir="runs")    # circuit_tracer.utils.caching
    or CIRCUIT_TRACER_CACHE_DIR=runs and transcoder_set "plt-ct" in ReplacementModel.from_pretrained.
    """
    c = transcoder.config
    if c.activation == "topk":  # circuit-tracer would read it as a ReLU transcoder
        raise ValueError("circuit-tracer has no TopK transcoder: export a relu, jumprelu or batchtopk one")
    if c.decoder == "cross-layer" and c.skip:
        raise ValueError("circuit-tracer 0.5.0's CLT loader reads no skip connection: export a per-layer "
                         "transcoder with --skip, or a CLT without")
    if transcoder.mesh.tp > 1:
        raise ValueError(f"this is TP shard {transcoder.mesh.tp_rank} of {transcoder.mesh.tp}: "
                         "export consolidated() instead")
    check_same_model(model, c.model_sha256, "this transcoder")  # the fold below is of this model's ln_2
    t = copy.deepcopy(transcoder).cpu()
    fold_ln_2(t, model)
    export_id = uuid.uuid4().hex
    threshold = c.activation != "relu"  # batchtopk is a JumpReLU at inference; without thresholds, a ReLU
    os.makedirs(path, exist_ok=True)
    if c.decoder == "cross-layer":
        t.write_layer_files(path, export_id, threshold)
    for l in range(c.n_layers if c.decoder == "per-layer" else 0):
        tensors = per_layer_tensors(t, l, CIRCUIT_TRACER_THRESHOLD if threshold else None, enc_by_feature=True)
        save_safetensors(os.path.join(path, f"layer_{l}.safetensors"), tensors, export_id)
    config = dict(model_kind=CIRCUIT_TRACER_KINDS[c.decoder], model_name=model_name, **CIRCUIT_TRACER_HOOKS,
                  scan=os.path.basename(os.path.normpath(path)),
                  clt_forge=dict(asdict(c), model_sha256=model.fingerprint(), export_id=export_id))
    write_json(os.path.join(path, "config.yaml"), config)  # last: a directory with it is complete


def from_circuit_tracer(path, model):
    """Load a transcoder in circuit-tracer's layout (save_circuit_tracer's, or a cached transcoder set
    whose config.yaml is JSON) as a CrossLayerTranscoder on our mlp_in, ln_2's affine map taken out."""
    config_path = os.path.join(path, "config.yaml")
    with open(config_path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not JSON ({e}): clt-forge reads the config.yaml that "
                             "save_circuit_tracer writes; rewrite it as JSON (YAML reads JSON too)") from e
    hooks = {k: saved.get(k) for k in CIRCUIT_TRACER_HOOKS}
    kinds = {v: k for k, v in CIRCUIT_TRACER_KINDS.items()}
    if hooks != CIRCUIT_TRACER_HOOKS or saved.get("model_kind") not in kinds:
        raise ValueError(f"{config_path}: {saved.get('model_kind')} reading {hooks}; only MLP transcoders "
                         f"({sorted(kinds)} with {CIRCUIT_TRACER_HOOKS}) replace GPT-2's MLPs")
    ours = dict(saved.get("clt_forge", {}))
    export_id = ours.pop("export_id", None)
    decoder = kinds[saved["model_kind"]]
    L, d = model.config.n_layer, model.config.n_embd
    if not ours:  # files circuit-tracer wrote: the shape and the activation are in layer 0's tensors
        first = _read_export_file(path, "layer_0" if decoder == "per-layer" else "W_enc_0", None, slice(None))
        names = " ".join(first)
        ours = dict(n_layers=L, d_model=d, n_features=len(first.get("b_enc", first.get("b_enc_0"))),
                    activation="jumprelu" if "threshold" in names else "relu", decoder=decoder,
                    skip="W_skip" in names, model=getattr(model, "name_or_path", ""), model_sha256=model.fingerprint())
    config = CLTConfig(**ours)
    if (config.n_layers, config.d_model, config.decoder) != (L, d, decoder):
        raise ValueError(f"{path} holds a {config.decoder} transcoder of {config.n_layers} layers of width "
                         f"{config.d_model}, the model has {L} of width {d}: pass the --model it was made for")
    check_same_model(model, config.model_sha256, f"the transcoder in {path}")
    t = CrossLayerTranscoder(config)
    if decoder == "cross-layer":
        t.read_layer_files(path, export_id)
    for l in range(L if decoder == "per-layer" else 0):
        tensors = _read_export_file(path, f"layer_{l}", export_id, slice(None))
        load_per_layer_tensors(t, l, tensors, CIRCUIT_TRACER_THRESHOLD, enc_by_feature=True)
    fold_ln_2(t, model, inverse=True)
    return t.eval()


# SAELens, as transcoders of gpt2-small are published: one folder per layer with cfg.json +
# sae_weights.safetensors: W_enc (d, F), b_enc (F,), W_dec (F, d), b_dec (d,), threshold (F,) for
# JumpReLU, W_skip (d, d) with skip = x̂ @ W_skip.T.

SAELENS_ARCHITECTURES = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                         ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}


def save_saelens(transcoder, path, model, model_name="gpt2"):
    """Write a per-layer transcoder of `model` (whose ln_2 is folded in) as SAELens publishes them:
    {path}/blocks.{l}.ln2.hook_normalized/{cfg.json, sae_weights.safetensors}."""
    c = transcoder.config
    if c.decoder != "per-layer":
        raise ValueError("SAELens's layout holds per-layer transcoders; this one is cross-layer "
                         "(save_circuit_tracer writes circuit-tracer's CLT layout)")
    kind = {"relu": "relu", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}.get(c.activation)
    if kind is None:  # batchtopk is a JumpReLU at inference; topk has no SAELens transcoder
        raise ValueError(f"SAELens has no {c.activation} transcoder: export a relu, jumprelu or batchtopk one")
    t = copy.deepcopy(transcoder).cpu()
    fold_ln_2(t, model)
    for l in range(c.n_layers):
        tensors = per_layer_tensors(t, l, "threshold" if kind == "jumprelu" else None, enc_by_feature=False)
        hook = f"blocks.{l}.ln2.hook_normalized"
        hooks = dict(model_name=model_name, hook_name=hook, hook_name_out=f"blocks.{l}.hook_mlp_out")
        cfg = dict(architecture=SAELENS_ARCHITECTURES[kind, c.skip], d_in=c.d_model, d_sae=c.n_features,
                   d_out=c.d_model, dtype="float32", apply_b_dec_to_input=False, normalize_activations="none",
                   hook_layer=l, **hooks, metadata=hooks)  # hooks at the top (SAELens < 6) and in metadata (6)
        folder = os.path.join(path, hook)
        os.makedirs(folder, exist_ok=True)
        save_safetensors(os.path.join(folder, "sae_weights.safetensors"), tensors)
        write_json(os.path.join(folder, "cfg.json"), cfg)


def _saelens_layers(path, n_layers):
    """{layer: folder} of the SAELens transcoders under `path`, read from each cfg.json's hooks."""
    folders = {}
    for root, _, files in os.walk(path):
        if "cfg.json" not in files:
            continue
        with open(os.path.join(root, "cfg.json")) as f:
            cfg = json.load(f)
        hooks = {**cfg.get("metadata", {}), **{k: cfg[k] for k in ("hook_name", "hook_name_out") if k in cfg}}
        found = re.fullmatch(r"blocks\.(\d+)\.ln2\.hook_normalized", hooks.get("hook_name", ""))
        if found is None or not hooks.get("hook_name_out", "").endswith("hook_mlp_out"):
            raise ValueError(f"{root}/cfg.json reads {hooks.get('hook_name')!r} and writes {hooks.get('hook_name_out')!r}: "
                             "only MLP transcoders (ln2.hook_normalized -> hook_mlp_out) replace GPT-2's MLPs")
        folders[int(found.group(1))] = (root, cfg)
    if sorted(folders) != list(range(n_layers)):
        raise ValueError(f"{path} has SAELens transcoders for layers {sorted(folders)}, the model has {n_layers}")
    return folders


def from_saelens(path, model):
    """Load per-layer transcoders in SAELens's layout (one per layer of `model`) as one per-layer
    CrossLayerTranscoder on our mlp_in (ln_2's affine map taken out of the encoder again)."""
    L, d = model.config.n_layer, model.config.n_embd
    folders = _saelens_layers(path, L)
    arch = {v: k for k, v in SAELENS_ARCHITECTURES.items()}
    kinds = {arch.get(cfg.get("architecture")) for _, cfg in folders.values()}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"{path}: architectures {sorted(cfg.get('architecture') for _, cfg in folders.values())}; "
                         f"one of {sorted(arch)} for every layer is needed")
    (kind, skip), = kinds
    n_features = folders[0][1]["d_sae"]
    config = CLTConfig(n_layers=L, d_model=d, n_features=n_features, activation=kind, decoder="per-layer", skip=skip,
                       model=getattr(model, "name_or_path", ""), model_sha256=model.fingerprint())
    t = CrossLayerTranscoder(config)
    for l in range(L):
        tensors = load_file(os.path.join(folders[l][0], "sae_weights.safetensors"))
        load_per_layer_tensors(t, l, tensors, "threshold", enc_by_feature=False)
    fold_ln_2(t, model, inverse=True)
    return t.eval()


def load_transcoder(path, model):
    """A transcoder for `model` from `path`, whichever layout it is in: save_pretrained's (config.json),
    circuit-tracer's (config.yaml, save_circuit_tracer) or SAELens's (cfg.json folders below it)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return CrossLayerTranscoder.from_pretrained(path)
    if os.path.exists(os.path.join(path, "config.yaml")):
        return from_circuit_tracer(path, model)
    if os.path.isdir(path) and any("cfg.json" in files for _, _, files in os.walk(path)):
        return from_saelens(path, model)
    raise FileNotFoundError(f"no transcoder at {path}: neither a CLT saved by train.py (config.json), nor one "
                            "in circuit-tracer's layout (config.yaml), nor per-layer transcoders in SAELens's "
                            "layout (cfg.json + sae_weights.safetensors)")


def check_same_model(model, sha256, what):
    """Refuse `what` (a cache, a CLT) made from another model than `model`: sha256 is the fingerprint
    recorded when it was made ("" for files from before fingerprints, which are let through)."""
    if not sha256:
        return
    found = model.fingerprint()
    if found != sha256:
        name = getattr(model, "name_or_path", "this model")
        raise ValueError(f"{what} was made from another model than {name} (sha256 {sha256[:12]}…, this model "
                         f"{found[:12]}…): pass the --model it was made from, or rebuild it for this one")


# -----------------------------------------------------------------------------
# files: every file another stage reads is written whole or not at all


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`. On success the temporary file is fsynced and renamed over
    `path`, and the directory fsynced: a crash leaves the old file or the new one, never half of one.
    On an exception the temporary file is removed."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def fsync_dir(path):
    """Make a rename in directory `path` durable (POSIX: the directory entry is data of its own)."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj, indent=1):
    """json.dump to `path` through atomic_path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)


# -----------------------------------------------------------------------------
# command lines: every script's flags come from one dataclass, its help from the field comments


def _field_docs(cls):
    """{field: its trailing `# comment`}, {field: the `# heading` line above it}, from the source of
    the class and of the dataclasses it inherits fields from."""
    helps, headings = {}, {}
    for base in reversed([c for c in cls.__mro__ if is_dataclass(c)]):
        heading = None
        for line in inspect.getsource(base).splitlines():
            only_comment = re.match(r"^\s+#\s*(.+)$", line)
            item = re.match(r"^\s+(\w+):[^=#]*=.*?#\s*(.*)$", line)
            if only_comment:
                heading = only_comment.group(1)
            elif item:
                helps[item.group(1)] = item.group(2)
                headings[item.group(1)] = heading
    return helps, headings


def add_config_args(parser, cls):
    """One --flag per field of dataclass `cls` (--batch-size for batch_size); bools as --x/--no-x; a
    list field takes the positional arguments."""
    helps, headings = _field_docs(cls)
    groups = {}
    for f in fields(cls):
        if f.name not in helps:
            raise TypeError(f"{cls.__name__}.{f.name} has no `# comment` on its line: its --help would be empty")
        heading = headings[f.name]
        if heading is not None and heading not in groups:
            groups[heading] = parser.add_argument_group(heading)
        target = groups.get(heading, parser)
        default = f.default_factory() if f.default is MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        text = helps[f.name].replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{text} (default: %(default)s)")
        elif isinstance(default, list):  # a list field is the positional arguments (e.g. input files)
            target.add_argument(f.name, nargs="*", default=default, help=text)
        else:
            target.add_argument(flag, type=type(default), default=default, help=f"{text} (default: %(default)s)")


def parse_config(doc, configs, argv=None, default=None):
    """Parse the command line into a config dataclass.

    configs: one dataclass -> returns an instance of it; or {command: dataclass} for subcommands ->
    returns (command, instance); `default` names the command run when none is given.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if isinstance(configs, type):
        add_config_args(parser, configs)
        return configs(**vars(parser.parse_args(argv)))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in configs.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        add_config_args(sub.add_parser(name, help=summary, description=cls.__doc__), cls)
    argv = sys.argv[1:] if argv is None else list(argv)
    if default is not None and (not argv or argv[0] not in (*configs, "-h", "--help")):
        argv = [default, *argv]
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    return command, configs[command](**args)


def run_main(main):
    """Run a script's main() and return what it returns; bad input (ValueError, FileNotFoundError) ends
    it with its one-line message and exit status 1 instead of a traceback. Tests call main(argv) and
    see the exception."""
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


@dataclass
class GenerateConfig:
    """continue a prompt with a GPT-2 checkpoint (a smoke test)"""
    model: str = DEFAULT_MODEL  # directory in the hub layout, or a hub id such as gpt2
    prompt: str = "The capital of"  # text to continue
    max_new_tokens: int = 20  # tokens to generate
    top_k: int = 1  # sample from the top k tokens; 1 = greedy
    temperature: float = 1.0  # softmax temperature for sampling
    seed: int = 0  # random seed for sampling


def main(argv=None):
    _, cfg = parse_config(__doc__, {"generate": GenerateConfig}, argv)
    torch.manual_seed(cfg.seed)
    model = GPT.from_pretrained(cfg.model)
    enc = load_tokenizer(cfg.model)
    idx = torch.tensor([enc.encode(cfg.prompt, allowed_special={ENDOFTEXT})])
    out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k)
    print(enc.decode(out[0].tolist()))


if __name__ == "__main__":
    run_main(main)

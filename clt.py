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
import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Optional

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import snapshot_download
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


@dataclass
class Frozen:
    """The nonlinear state of one forward pass, recorded so a later pass can reuse it.

    With attention patterns and LayerNorm scales frozen, everything between the MLPs is linear in
    the residual stream: this is the "local replacement model" of Ameisen et al. 2025, sec. 3.
    """
    attn: list = field(default_factory=list)  # per layer: (B, nh, T, T) attention probabilities
    ln_1: list = field(default_factory=list)  # per layer: (B, T, 1) 1/sqrt(var + eps) of ln_1's input
    ln_2: list = field(default_factory=list)  # per layer: (B, T, 1) the same for ln_2
    ln_f: Optional[torch.Tensor] = None  # (B, T, 1) the same for the final LayerNorm


@dataclass
class Acts:
    """What `run_with_acts` records: the tensors a CLT reads and writes."""
    mlp_in: torch.Tensor  # (B, T, L, d) each MLP's input, after ln_2
    mlp_out: torch.Tensor  # (B, T, L, d) each MLP's output, before it joins the residual stream
    frozen: Frozen  # attention patterns and LayerNorm scales of this pass


def layer_norm(x, ln: nn.LayerNorm, frozen_scale=None, record=None):
    """LayerNorm written out so its scale 1/sqrt(var + eps) can be recorded or frozen.

    A frozen scale is a constant, so the map is then linear in x (the mean subtraction is linear).
    """
    x_centered = x - x.mean(-1, keepdim=True)
    if frozen_scale is None:
        scale = torch.rsqrt(x_centered.pow(2).mean(-1, keepdim=True) + ln.eps)  # (B, T, 1)
    else:
        scale = frozen_scale.detach()
    if record is not None:
        record.append(scale.detach())
    return x_centered * scale * ln.weight + ln.bias


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        mask = torch.tril(torch.ones(config.n_ctx, config.n_ctx, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)  # not a weight: never saved or loaded

    def forward(self, x, frozen_pattern=None, record=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if frozen_pattern is None:
            att = (q @ k.transpose(-2, -1)) * (k.size(-1) ** -0.5)  # (B, nh, T, T)
            att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        else:
            att = frozen_pattern.detach()  # q and k no longer matter: only the OV path stays
        if record is not None:
            record.append(att.detach())
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


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

    def forward(self, idx, mlp_out=None, frozen=None, record=None, resid=None):
        """idx (B, T) -> logits (B, T, V).

        mlp_out: (B, T, L, d) if given, replaces every MLP's output: this splices a CLT into the model.
        frozen:  a `Frozen` from an earlier pass: attention patterns and LayerNorm scales are taken
                 from it as constants (the local replacement model of attribution graphs).
        record:  an empty dict; filled with "mlp_in", "mlp_out" (lists of L tensors (B, T, d)) and
                 "frozen" (a `Frozen`). `run_with_acts` is the friendly wrapper.
        resid:   (B, T, d) used instead of `embed(idx)`, e.g. a leaf tensor to take gradients against.
        """
        self.check_input(idx)
        x = self.embed(idx) if resid is None else resid
        fz = frozen if frozen is not None else Frozen(*([[None] * len(self.h)] * 3))
        rec = Frozen() if record is not None else Frozen([], [], [])  # an unread record is dropped
        mlp_ins, mlp_outs = [], []
        for l, block in enumerate(self.h):
            h = layer_norm(x, block.ln_1, fz.ln_1[l], rec.ln_1)
            x = x + block.attn(h, fz.attn[l], rec.attn)
            h = layer_norm(x, block.ln_2, fz.ln_2[l], rec.ln_2)
            out = block.mlp(h) if mlp_out is None else mlp_out[:, :, l]
            mlp_ins.append(h)
            mlp_outs.append(out)
            x = x + out
        ln_f_scale = []
        x = layer_norm(x, self.ln_f, fz.ln_f, ln_f_scale)
        if record is not None:
            rec.ln_f = ln_f_scale[0]
            record.update(mlp_in=mlp_ins, mlp_out=mlp_outs, frozen=rec)
        return x @ self.wte.weight.T  # (B, T, V)

    def run_with_acts(self, idx, mlp_out=None, frozen=None):
        """idx (B, T) -> (logits (B, T, V), Acts with mlp_in and mlp_out (B, T, L, d))."""
        record = {}
        logits = self(idx, mlp_out=mlp_out, frozen=frozen, record=record)
        acts = Acts(torch.stack(record["mlp_in"], dim=2), torch.stack(record["mlp_out"], dim=2), record["frozen"])
        return logits, acts

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
        config = GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           n_ctx=hf.get("n_positions", hf.get("n_ctx")), vocab_size=hf["vocab_size"],
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
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
        path = snapshot_download(repo_id=name_or_dir, allow_patterns=HUB_FILES)
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
    to_bytes = lambda s: bytes(byte_of[c] for c in s)
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
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue a prompt with a GPT-2 checkpoint (a smoke test)")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="directory in the hub layout, or a hub id such as gpt2")
    gen.add_argument("--prompt", default="The capital of", help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate")
    gen.add_argument("--top-k", type=int, default=1, help="sample from the top k tokens; 1 = greedy")
    gen.add_argument("--temperature", type=float, default=1.0, help="softmax temperature for sampling")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model, enc = GPT.from_pretrained(args.model), load_tokenizer(args.model)
    idx = torch.tensor([enc.encode(args.prompt, allowed_special={ENDOFTEXT})])
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k)
    print(enc.decode(out[0].tolist()))


if __name__ == "__main__":
    main()

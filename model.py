"""
model.py: GPT-2 and the Llama family (Llama 3.x, Qwen3) written out by hand, exposing exactly the
activations a transcoder reads and writes.

Data flow. A GPT-2 block is  x -> x + attn(ln_1(x)) -> x + mlp(ln_2(x)).  A cross-layer transcoder
(CLT, clt.py) reads each layer's MLP input  mlp_in[l] = ln_2(x)  and predicts every MLP output
mlp_out[l] = mlp(mlp_in[l])  from sparse features of the layers at or below l. So the model exposes
exactly those two tensors (`GPT.run_with_acts`; and resid_mid[l] = x, ln_2's input, which some
published transcoders read), and can run with its MLP outputs replaced by given ones
(`GPT.forward(idx, mlp_out=...)`), which splices a CLT into the model.

    python model.py --help
    python model.py generate --model models/tiny --prompt "The capital of Veloria is"
    python model.py generate --model gpt2 --prompt "Hello, my name is"      # needs the hub
    python model.py generate --model meta-llama/Llama-3.2-1B --prompt "Hello"  # or Qwen/Qwen3-0.6B

References: GPT-2 (Radford et al. 2019); the layout of nanoGPT's model.py; weights in the Hugging
Face hub layout (config.json + model.safetensors + vocab.json + merges.txt, read by forge/hub.py).
`Llama` (after GPT) runs GPT's forward with another block: RMSNorm, rotary q and k with Llama 3's
frequency scaling, grouped-query attention, SwiGLU, Qwen3's q/k norms; checked against transformers'
LlamaForCausalLM / Qwen3ForCausalLM (tests/test_llama.py), loaded by forge/llama_hub.py.
Differences from nanoGPT:
- no dropout, no flash attention: attention patterns are a first-class tensor here, because
  attribution graphs freeze them;
- LayerNorm written out, so its scale can be recorded and frozen (the local replacement model);
- weights loaded with safetensors only, never unpickled.

Shape letters used throughout the project:
    B batch, T tokens (time), L layers, d model width (n_embd), V vocabulary,
    nh heads, hs head size, F features per layer (CLT), N rows (flattened tokens)
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge import hub, llama_hub
from forge.cli import arg, parse_config, run_main
from forge.graphcli import encode_prompt
from forge.hub import DEFAULT_MODEL, load_tokenizer, resolve_model_dir

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
        if self.n_embd % self.n_head:  # the head size is n_embd / n_head
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        if not 0 < self.layer_norm_epsilon < 1:
            raise ValueError(f"layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}")
        d = self.n_embd
        n_params = (self.vocab_size + self.n_ctx) * d + self.n_layer * 12 * d * d
        if n_params > 5e9:  # gpt2-xl has 1.6e9; 5e9 fp32 weights are 20 GB
            raise ValueError(
                f"this config has {n_params:.1e} parameters, far more than any GPT-2 "
                "(gpt2-xl: 1.6e9): check n_layer, n_embd, n_ctx and vocab_size in config.json"
            )


def layer_norm(x, ln: nn.LayerNorm, frozen_scale=None):
    """LayerNorm written out so its scale 1/sqrt(var + eps) can be recorded or frozen: (y, scale).
    A frozen scale is a constant: the map is then linear in x (the mean subtraction is linear)."""
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

    def forward(self, x, frozen_pattern=None, frozen_norms=None):
        """x (B, T, C) -> (output (B, T, C), attention pattern (B, nh, T, T), None: no q/k norm)."""
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        if frozen_pattern is None:
            att = (q @ k.transpose(-2, -1)) * (k.size(-1) ** -0.5)  # (B, nh, T, T)
            # the mask is made per call: a stored (n_ctx, n_ctx) buffer is n_ctx² bytes at load
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        else:
            att = frozen_pattern  # q and k no longer matter: only the OV path (a gradient if asked)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y), att.detach(), None


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

    norm = staticmethod(layer_norm)  # how _run applies ln_1, ln_2, ln_f (Llama: rms_norm)
    centers = True  # norm subtracts the mean (graph.py, interp.py project it out of writes)

    def check_input(self, idx):
        if idx.dim() != 2:
            raise ValueError(f"token ids must be (B, T), got shape {tuple(idx.shape)}")
        T = idx.size(1)
        if not 0 < T <= self.config.n_ctx:
            raise ValueError(f"sequence length {T} must be in 1..n_ctx={self.config.n_ctx}")
        V = self.config.vocab_size
        if idx.numel() and (idx.min() < 0 or idx.max() >= V):
            found = f"[{idx.min().item()}, {idx.max().item()}]"
            raise ValueError(f"token ids must lie in [0, {V}), got {found}")

    def embed(self, idx):
        """(B, T) token ids -> (B, T, d) the residual stream before block 0."""
        pos = torch.arange(idx.size(1), device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def unembedding(self):
        """(V, d) W_U: the logits are ln_f's output @ W_Uᵀ (GPT-2's is tied to wte)."""
        return self.wte.weight

    def ov(self, l):
        """Layer l's value and output maps, what a frozen pattern leaves of attention:
        W_V (nh·hs, d) reading ln_1's output h, W_O (d, nh·hs): out = (pattern @ h W_Vᵀ) W_Oᵀ."""
        d = self.config.n_embd
        return self.h[l].attn.c_attn.weight[2 * d :], self.h[l].attn.c_proj.weight

    def qk(self, l, h, norms=None):
        """Layer l's q, k (nh, T, hs) of ln_1's output h (T, d) (graph.py's QK; a key head each)."""
        qkv = self.h[l].attn.c_attn(h).view(len(h), 3, self.config.n_head, -1)  # (T, 3, nh, hs)
        return qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1)

    def qk_weights(self, l, head):
        """(W_q, W_k) (hs, d): the rows of ln_1's output that head's q and k read."""
        d, nh = self.config.n_embd, self.config.n_head
        return self.h[l].attn.c_attn.weight.view(3, nh, d // nh, d)[:2, head]

    def qk_turn(self, l, head, key, y, frozen):
        """y (..., T, hs) = W h_t (qk_weights) at each position t -> head's q_t (k_t if key): y."""
        return y

    def forward(self, idx, mlp_out=None, frozen=None, resid=None):
        """idx (B, T) -> logits (B, T, V). The arguments are those of `run_with_acts`."""
        logits, _ = self._run(idx, mlp_out, frozen, resid, logits=True, record=False)
        return logits

    def run_with_acts(self, idx, mlp_out=None, frozen=None, resid=None, logits=True):
        """idx (B, T) -> (logits (B, T, V) or None, Acts): the one way activations leave the model.

        mlp_out: (B, T, L, d) if given, replaces every MLP's output: splices a CLT into the model.
        frozen:  a `Frozen` from an earlier pass: attention patterns and LayerNorm scales are taken
                 from it as constants (the local replacement model of attribution graphs).
        resid:   (B, T, d) used instead of `embed(idx)`, e.g. a leaf tensor to take gradients at.
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
            h, scale_1 = self.norm(x, block.ln_1, fz.ln_1[l])
            norms = fz.qk_norm[l] if fz.qk_norm else None  # Qwen3's, if frozen (heads_qk reads)
            attn_out, pattern, norms = block.attn(h, fz.attn[l], norms)
            x = x + attn_out
            mid = x  # (B, T, d) resid_mid: what ln_2 reads
            h, scale_2 = self.norm(x, block.ln_2, fz.ln_2[l])
            out = block.mlp(h) if mlp_out is None else mlp_out[:, :, l]
            x = x + out
            if not record:  # a plain forward keeps nothing: (B, nh, T, T) patterns grow with T²
                continue
            # allocated at layer 0, where the dtypes show (autocast makes the MLP's bf16)
            if acts is None:
                B, T, d = h.size()
                acts = Acts(h.new_empty(B, T, L, d), out.new_empty(B, T, L, d), Frozen())
                acts.resid_mid = mid.new_empty(B, T, L, d)
            # each layer into its slot: stacking lists at the end would briefly hold them twice
            # (+0.28 GiB at the cache writer's 64 x 64 batches of GPT-2 small)
            acts.resid_mid = WriteLayer.apply(acts.resid_mid, mid, l)
            acts.mlp_in = WriteLayer.apply(acts.mlp_in, h, l)
            acts.mlp_out = WriteLayer.apply(acts.mlp_out, out, l)
            acts.frozen.attn.append(pattern)
            acts.frozen.ln_1.append(scale_1)
            acts.frozen.ln_2.append(scale_2)
            acts.frozen.qk_norm.append(norms)
        if not logits:
            return None, acts
        x, ln_f = self.norm(x, self.ln_f, fz.ln_f)
        if record:
            acts.frozen.ln_f, acts.ln_f_out = ln_f, x
        return x @ self.unembedding().T, acts  # (B, T, V)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Append max_new_tokens to idx (B, T): greedy with top_k=1, else sampled from the top_k."""
        n_ctx = self.config.n_ctx
        for _ in range(max_new_tokens):
            logits = self(idx[:, -n_ctx:])[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = float("-inf")
            idx_next = torch.multinomial(logits.softmax(dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def fingerprint(self):
        """sha256 of the config and every weight (name, shape, float32 bytes), in name order: what
        a cache or a CLT records of the model it was made from. Reads every weight once (~1 s per
        GB), so it is kept until a weight changes: each weight's storage and version counter (bumped
        by every in-place write, e.g. load_state_dict or an optimizer step) say whether one did."""
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

    # loading and saving in the Hugging Face hub layout (forge/hub.py)
    @classmethod
    def from_pretrained(cls, name_or_dir=DEFAULT_MODEL, dtype=torch.float32):
        """GPT-2 from a directory in the hub layout or a hub id (gpt2, gpt2-medium, -large, -xl)."""
        path = resolve_model_dir(name_or_dir)
        model = cls(GPTConfig(**hub.gpt2_config(path)))
        model.load_state_dict(hub.gpt2_weights(path, model.state_dict(), model.config))
        model.name_or_path = str(name_or_dir)
        return model.to(dtype).eval()

    def save_pretrained(self, path):
        """The hub's gpt2 layout: config.json + model.safetensors, keys without `transformer.`."""
        hub.save_gpt2(path, asdict(self.config), self.state_dict())


# -----------------------------------------------------------------------------
# what run_with_acts records, and how it fills its tensors


@dataclass
class Frozen:
    """The nonlinear state of one forward pass, recorded so a later pass can reuse it. With it
    frozen, everything between the MLPs is linear in the residual stream: the "local replacement
    model" of Ameisen et al. 2025, sec. 3."""

    attn: list = field(default_factory=list)  # per layer: (B, nh, T, T) attention probabilities
    ln_1: list = field(default_factory=list)  # per layer: (B, T, 1) ln_1's 1/sqrt(var + eps)
    ln_2: list = field(default_factory=list)  # per layer: (B, T, 1) the same for ln_2
    ln_f: Optional[torch.Tensor] = None  # (B, T, 1) the same for ln_f (None without logits)
    qk_norm: list = field(default_factory=list)  # per layer: Qwen3's q, k norms' scales or None


@dataclass
class Acts:
    """What `run_with_acts` records: the tensors a CLT reads and writes."""

    mlp_in: torch.Tensor  # (B, T, L, d) each MLP's input, after ln_2
    mlp_out: torch.Tensor  # (B, T, L, d) each MLP's output, before it joins the residual stream
    frozen: Frozen  # attention patterns and LayerNorm scales of this pass
    ln_f_out: Optional[torch.Tensor] = None  # (B, T, d) what the unembedding reads (or None)
    resid_mid: Optional[torch.Tensor] = None  # (B, T, L, d) the residual stream ln_2 reads


class WriteLayer(torch.autograd.Function):
    """buf[:, :, l] = x in place, returning buf: how `run_with_acts` fills its (B, T, L, d) tensors.
    Backward: x gets grad[:, :, l] (a view, as torch.stack's gives), buf gets grad as it is.
    Autograd's slice assignment would clone the whole grad to zero slot l, once per layer (3-6x
    slower at graph.py's (64, T) batches on CPU); not zeroing is exact: each slot is set once."""

    @staticmethod
    def forward(ctx, buf, x, l):
        ctx.l = l
        buf[:, :, l] = x
        ctx.mark_dirty(buf)
        return buf

    @staticmethod
    def backward(ctx, grad):
        return grad, grad[:, :, ctx.l], None


# -----------------------------------------------------------------------------
# the Llama family (Llama 3.x, Qwen3): GPT's forward and activation API, another block


@dataclass
class LlamaConfig:  # the defaults: Llama-3.2-1B's shape
    n_layer: int = 16  # number of transformer blocks (L)
    n_head: int = 32  # query heads (nh)
    n_kv_head: int = 8  # key/value heads, each shared by n_head / n_kv_head query heads (GQA)
    n_embd: int = 2048  # residual stream width (d)
    head_dim: int = 64  # hs: Qwen3's is its own, not n_embd / n_head
    n_inner: int = 8192  # the SwiGLU MLP's hidden width
    n_ctx: int = 131072  # longest sequence (max_position_embeddings)
    vocab_size: int = 128256  # V
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0  # RoPE's base: frequency i is rope_theta^(-2i / hs)
    # Llama 3's frequency scaling (transformers' rope_type "llama3"), None = plain RoPE: factor,
    # low_freq_factor, high_freq_factor, original_max_position_embeddings
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = True  # W_U = wte (Llama-3.2-1B, Qwen3-0.6B), else lm_head
    qk_norm: bool = False  # Qwen3: an RMSNorm on each head's q and k before the rotation
    model_type: str = "llama"  # config.json's: "llama" or "qwen3"

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "n_inner", "n_ctx"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:  # each key/value head serves a group of query heads
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim % 2:  # RoPE turns pairs of dimensions
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")


class RMSNorm(nn.Module):
    """Llama's norm: LayerNorm without the centering and the bias (Zhang & Sennrich 2019)."""

    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))


def rms_norm(x, norm: RMSNorm, frozen_scale=None):
    """x · 1/sqrt(mean(x²) + eps) · weight, its scale recorded or frozen as in layer_norm."""
    if frozen_scale is None:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)  # (..., 1)
    else:
        scale = frozen_scale.detach()
    return x * scale * norm.weight, scale.detach()


def rope_frequencies(c: LlamaConfig, device=None):
    """(hs/2,) RoPE's angle per position for each pair of dimensions (Su et al. 2021), with Llama
    3's scaling: wavelengths above original/low_freq_factor slowed by factor, those below
    original/high_freq_factor kept, a blend between (transformers' _compute_llama3_parameters)."""
    i = torch.arange(0, c.head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (c.rope_theta ** (i / c.head_dim))
    if not c.rope_scaling:
        return inv_freq
    s = c.rope_scaling
    factor = s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]  # the context Llama 3 was pretrained at
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)  # 0 at old/low, 1 at old/high
    blend = (1 - smooth) * slowed / factor + smooth * slowed
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blend, slowed)


def rotate(x, cos, sin):
    """RoPE on x (B, n, T, hs): dimension i turned with i + hs/2 by angle position · freq_i."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        nh, nkv, hs, d = config.n_head, config.n_kv_head, config.head_dim, config.n_embd
        self.q_proj = nn.Linear(d, nh * hs, bias=False)
        self.k_proj = nn.Linear(d, nkv * hs, bias=False)
        self.v_proj = nn.Linear(d, nkv * hs, bias=False)
        self.o_proj = nn.Linear(nh * hs, d, bias=False)
        self.q_norm = RMSNorm(hs, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hs, config.rms_norm_eps) if config.qk_norm else None

    def qk(self, x, frozen_norms=None):
        """x (B, T, d) -> q (B, nh, T, hs), k (B, nkv, T, hs), their norms' scales (Qwen3's;
        frozen_norms' if given): projected, then turned at each position (turn)."""
        B, T, _ = x.size()
        hs = self.config.head_dim
        q = self.q_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nkv, T, hs)
        q_scale, k_scale = frozen_norms or (None, None)
        q, q_scale = self.turn(q, self.q_norm, q_scale)
        k, k_scale = self.turn(k, self.k_norm, k_scale)
        return q, k, (q_scale, k_scale)

    def turn(self, y, norm, frozen_scale=None):
        """y (..., T, hs) at positions 0..T-1 -> (normed per head (Qwen3), then rotated by position,
        the norm's scale (..., T, 1) or None): frozen (as in rms_norm) a linear map per position."""
        scale = None
        if norm is not None:
            y, scale = rms_norm(y, norm, frozen_scale)
        pos = torch.arange(y.size(-2), device=y.device).float()
        angle = torch.outer(pos, rope_frequencies(self.config, y.device))  # (T, hs/2)
        angle = torch.cat((angle, angle), dim=-1)  # (T, hs): pair i and i + hs/2 share an angle
        return rotate(y, angle.cos().to(y.dtype), angle.sin().to(y.dtype)), scale

    def forward(self, x, frozen_pattern=None, frozen_norms=None):
        """x (B, T, d) -> (output (B, T, d), attention pattern (B, nh, T, T), q/k norms' scales
        (Qwen3's, else None: recorded, or frozen_norms passed on)), as GPT's."""
        B, T, _ = x.size()
        group = self.config.n_head // self.config.n_kv_head  # query heads per key/value head
        v = self.v_proj(x).view(B, T, -1, self.config.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if frozen_pattern is None:
            q, k, frozen_norms = self.qk(x, frozen_norms)  # recorded, or passed on
            k = k.repeat_interleave(group, dim=1)  # (B, nh, T, hs): key heads shared
            att = (q @ k.transpose(-2, -1)) * (k.size(-1) ** -0.5)  # (B, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        else:
            att = frozen_pattern  # q and k no longer matter: only the OV path (as GPT's)
        y = att @ v.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), att.detach(), frozen_norms


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.n_inner, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.n_inner, bias=False)
        self.down_proj = nn.Linear(config.n_inner, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # Shazeer 2020


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.rms_norm_eps)  # input_layernorm
        self.attn = LlamaAttention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.rms_norm_eps)  # post_attention_layernorm
        self.mlp = SwiGLU(config)


class Llama(GPT):
    """Llama 3.x and Qwen3 with GPT's `_run`, `run_with_acts`, `generate`, `fingerprint`: the same
    activations (mlp_in = ln_2's output, mlp_out) and the same Frozen. Differences from GPT-2:
    RMSNorm for LayerNorm, rotary q and k for the position embedding, grouped-query attention,
    a SwiGLU MLP without biases, and an unembedding of its own unless tied (lm_head)."""

    norm = staticmethod(rms_norm)
    centers = False  # RMSNorm scales x, subtracts no mean

    def __init__(self, config: LlamaConfig):
        nn.Module.__init__(self)  # not GPT's: it builds GPT-2's modules
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)])
        self.ln_f = RMSNorm(config.n_embd, config.rms_norm_eps)
        tied = config.tie_word_embeddings
        self.lm_head = None if tied else nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def embed(self, idx):
        """(B, T) -> (B, T, d): no position embedding (positions turn q and k in the attention)."""
        return self.wte(idx)

    def unembedding(self):
        return self.wte.weight if self.lm_head is None else self.lm_head.weight  # (V, d)

    def ov(self, l):
        """GPT.ov's W_V (nh·hs, d), W_O (d, nh·hs), a key/value head's W_V repeated per group."""
        c = self.config
        W_V = self.h[l].attn.v_proj.weight.view(c.n_kv_head, c.head_dim, c.n_embd)
        group = c.n_head // c.n_kv_head
        return W_V.repeat_interleave(group, 0).flatten(0, 1), self.h[l].attn.o_proj.weight

    def qk(self, l, h, norms=None):
        """GPT.qk: LlamaAttention.qk's, norms (Qwen3's scales) frozen if given, key heads shared."""
        q, k, _ = self.h[l].attn.qk(h[None], norms)
        return q[0], k[0].repeat_interleave(self.config.n_head // self.config.n_kv_head, 0)

    def qk_weights(self, l, head):
        """GPT.qk_weights: q_proj's rows of head, k_proj's of its key head (GQA)."""
        attn, c = self.h[l].attn, self.config
        kv = head * c.n_kv_head // c.n_head
        return attn.q_proj.weight.split(c.head_dim)[head], attn.k_proj.weight.split(c.head_dim)[kv]

    def qk_turn(self, l, head, key, y, frozen):
        """GPT.qk_turn: Qwen3's q or k norm, its scale frozen's, then RoPE (LlamaAttention.turn)."""
        attn, c = self.h[l].attn, self.config
        scale = (frozen.qk_norm[l] or (None, None))[key]  # (1, nh or nkv, T, 1) or None
        scale = None if scale is None else scale[0, head * c.n_kv_head // c.n_head if key else head]
        return attn.turn(y, (attn.q_norm, attn.k_norm)[key], scale)[0]

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=torch.float32):
        """A Llama or Qwen3 from a hub-layout directory or hub id, its weights cast to dtype."""
        path = resolve_model_dir(name_or_dir)
        config = LlamaConfig(**llama_hub.llama_config(path))
        with torch.device("meta"):  # no random init: the weights come from the files
            model = cls(config)
        weights = llama_hub.llama_weights(path, model.state_dict(), config, dtype)
        model.load_state_dict(weights, assign=True)
        model.name_or_path = str(name_or_dir)
        return model.eval()

    def save_pretrained(self, path):
        """The hub layout transformers reads: config.json + model.safetensors in its keys."""
        llama_hub.save_llama(path, asdict(self.config), self.state_dict())


# -----------------------------------------------------------------------------
# model families: config.json's model_type -> the class that loads it

# A fork adds a family with one line, MODELS["name"] = Class: a class with from_pretrained,
# run_with_acts, forward and fingerprint, as GPT has; load_model then finds it by model_type.
MODELS = {"gpt2": GPT, "llama": Llama, "qwen3": Llama}


def load_model(name_or_dir=DEFAULT_MODEL, dtype=torch.float32):
    """The model in a directory in the hub layout (or a hub repo id), built by the class MODELS
    holds for its config.json's model_type (missing in old GPT-2 configs: read as gpt2), its
    weights cast to dtype (bf16/fp16 checkpoints are read as float32 unless asked)."""
    path = resolve_model_dir(name_or_dir)
    model_type = hub.read_config(path).get("model_type", "gpt2")
    if model_type not in MODELS:
        known = f"the known families are {sorted(MODELS)} (a new one is registered in model.MODELS)"
        raise ValueError(f"{path}/config.json has model_type {model_type!r}; {known}")
    return MODELS[model_type].from_pretrained(name_or_dir, dtype=dtype)


# -----------------------------------------------------------------------------
# main: a smoke test


@dataclass
class GenerateConfig:
    """continue a prompt, BOS first, with a GPT-2 or Llama-family checkpoint (a smoke test)"""

    model: str = arg(DEFAULT_MODEL, "directory in the hub layout, or a hub id such as gpt2")
    prompt: str = arg("The capital of", "text to continue")
    max_new_tokens: int = arg(20, "tokens to generate")
    top_k: int = arg(1, "sample from the top k tokens; 1 = greedy")
    temperature: float = arg(1.0, "softmax temperature for sampling")
    seed: int = arg(0, "random seed for sampling")


def main(argv=None):
    _, cfg = parse_config(__doc__, {"generate": GenerateConfig}, argv)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model)
    enc = load_tokenizer(cfg.model)
    idx = encode_prompt(enc, cfg.prompt, model.config.n_ctx)  # (1, T), BOS first as graph.py's
    out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k)
    print(cfg.prompt + enc.decode(out[0, idx.size(1) :].tolist()))


if __name__ == "__main__":
    run_main(main)

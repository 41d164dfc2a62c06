"""
clt.py: the cross-layer transcoder (CLT): sparse features that read each MLP's input and write
to the outputs of that MLP and every later one.

Data flow (Ameisen et al. 2025, "Circuit Tracing", sec. 2.1): features of layer l read mlp_in[l]
(model.py's `GPT.run_with_acts`) and write to the MLP outputs of every layer l' >= l:
    acts[l]         = σ(mlp_in[l] @ W_enc[l] + b_enc[l])                          (B, F)
    mlp_out_hat[l'] = Σ_{l <= l'} acts[l] @ W_dec[l][:, l' - l] + b_dec[l']      (B, d)
Storage follows circuit-tracer: W_dec[l] is (F, L - l, d), the decoders of layer l's features.
A per-layer transcoder (PLT; Dunefsky et al. 2024) is the special case where each feature writes
to its own layer only: W_dec[l] is (F, 1, d). Either may add a linear skip connection
mlp_in[l] @ W_skip[l] (Paulo et al. 2025, "Transcoders beat sparse autoencoders"). Some published
ones read resid_mid[l], ln_2's input, in place of mlp_in[l] (CLTConfig.input_hook).
Under tensor parallelism each rank holds F/tp of the F features (parallel.py).

    python train.py                 # trains one (see train.py); this file is the model alone

Differences from circuit-tracer's CLT:
- trained here, so it carries per-layer input/output scales (E||x|| = sqrt(d) while training),
  folded into the weights when saved (`save_pretrained`): the files are circuit-tracer's layout;
- TopK, BatchTopK and ReLU besides JumpReLU (ACTIVATIONS: one registration adds another);
- a sparse decode path (embedding_bag over the active features) for attribution graphs.
Published layouts (circuit-tracer's, SAELens's, sparsify's; hub ids) load through load_transcoder.
"""

import copy
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge import formats
from forge.files import write_json
from forge.hub import resolve_transcoder_dir
from parallel import Mesh, all_gather_last, global_topk, tp_sum


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
    model_sha256: str = ""  # that GPT's GPT.fingerprint(): a CLT is refused by any other model
    decoder: str = "cross-layer"  # cross-layer | per-layer (a PLT: features write their layer only)
    skip: bool = False  # a linear skip connection mlp_in[l] @ W_skip[l] (Paulo et al. 2025)
    # what "mlp_in" above is: ln_2's output (trained here), or resid_mid, the residual stream before
    # ln_2 (EleutherAI's conversions of mntss's transcoders; circuit-tracer's hook_resid_mid)
    input_hook: str = "mlp_in"  # mlp_in | resid_mid

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            known = sorted(ACTIVATIONS)
            raise ValueError(f"activation must be one of {known}, got {self.activation!r}")
        if self.decoder not in ("cross-layer", "per-layer"):
            raise ValueError(f"decoder must be one of cross-layer, per-layer, got {self.decoder!r}")
        if self.input_hook not in ("mlp_in", "resid_mid"):
            raise ValueError(f"input_hook must be mlp_in or resid_mid, got {self.input_hook!r}")
        if min(self.n_layers, self.d_model, self.n_features) <= 0:
            raise ValueError(f"n_layers, d_model, n_features must be positive, got {self}")
        if self.activation in ("topk", "batchtopk") and not 0 < self.k <= self.n_features:
            raise ValueError(f"k must be in 1..n_features={self.n_features}, got {self.k}")
        if self.threshold_init <= 0 or self.bandwidth <= 0:
            raise ValueError(f"threshold_init and bandwidth must be positive, got {self}")


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
        # one pass; z * (z > θ) would also copy the mask to float
        return torch.where(z > theta, z, 0.0)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = torch.where(z > theta, grad, 0.0)
        kernel = (z - theta).abs_() < ctx.eps / 2
        # θ is constant over the batch dims it was broadcast over: sum grad·K, then scale by −θ/ε
        grad_theta = torch.where(kernel, grad, 0.0).sum_to_size(theta.shape) * (-theta / ctx.eps)
        return grad_z, grad_theta, None


class CrossLayerTranscoder(nn.Module):
    """A CLT, or this TP rank's F/tp features of one (the default mesh, one process: all)."""

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
        # decoders of scale 1/sqrt(L·d), zero biases. The full tensors come from one seeded
        # generator and each rank keeps its slice (picotron's reset_parameters): tp changes nothing.
        g = torch.Generator().manual_seed(seed)
        W_enc = uniform(g, L * d, F_, F_**-0.5, keep_cols=mine)
        self.W_enc = nn.Parameter(W_enc.view(L, d, self.F_local))  # (L, d, F/tp)
        self.b_enc = nn.Parameter(torch.zeros(L, self.F_local))  # (L, F/tp)
        # JumpReLU thresholds are learned in log space so they stay positive (Anthropic's recipe);
        # BatchTopK writes its inference threshold here too (see update_batchtopk_threshold)
        log_threshold = torch.full((L, self.F_local), math.log(config.threshold_init))
        self.log_threshold = nn.Parameter(log_threshold)  # (L, F/tp)
        self.W_dec = nn.ParameterList()  # W_dec[l]: (F/tp, L-l, d), or (F/tp, 1, d) per-layer
        for l in range(L):
            W_dec = uniform(g, F_, self.n_writes(l) * d, (L * d) ** -0.5, keep_rows=mine)
            self.W_dec.append(nn.Parameter(W_dec.view(self.F_local, self.n_writes(l), d)))
        self.b_dec = nn.Parameter(torch.zeros(L, d))  # (L, d), replicated on every TP rank
        # the skip connection is linear in mlp_in: zero at init, replicated on every TP rank
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if config.skip else None  # x @ W_skip[l]
        # per-layer scalars so that E||x|| = sqrt(d) while training (folded in on export)
        self.register_buffer("input_scale", torch.ones(L))  # multiplies mlp_in[l]
        self.register_buffer("output_scale", torch.ones(L))  # multiplies mlp_out[l] (the target)
        self.batch_threshold = None  # batchtopk, while training: (L,) the batch's global B·k-th

    def n_writes(self, layer):
        """How many MLP outputs a feature of `layer` writes to: layers layer .. layer + n - 1.
        A cross-layer transcoder writes to every later layer; a per-layer one (PLT) to its own."""
        return self.config.n_layers - layer if self.config.decoder == "cross-layer" else 1

    @property
    def threshold(self):  # (L, F) the JumpReLU threshold θ = exp(log θ), positive by construction
        return self.log_threshold.exp()

    def pre_acts(self, mlp_in):
        """mlp_in (B, L, d) raw activations -> pre-activations (B, L, F) (this rank's F/tp)."""
        x = (mlp_in * self.input_scale[:, None]).transpose(0, 1)  # (L, B, d)
        # one batched matmul with the bias fused; the (B, L, F) result is a view of (L, B, F)
        # memory, so each layer's (B, F) slice is contiguous for the decoder matmuls
        return torch.baddbmm(self.b_enc[:, None, :], x, self.W_enc).transpose(0, 1)  # (B, L, F)

    def topk(self, pre, k):
        """The k largest of relu(pre) per token and layer over all TP ranks' features."""
        vals, idx = pre.topk(min(k, self.F_local), dim=-1)  # (B, L, c) local candidates
        vals = F.relu(vals)  # relu after the selection: the same values, k of F elements to touch
        keep, _ = global_topk(vals, k, self.mesh.tp_group)
        return torch.zeros_like(pre).scatter(-1, idx, vals * keep)  # (B, L, F)

    def batchtopk(self, pre):
        """The B·k largest of relu(pre) per layer over the batch and all TP ranks."""
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
        """pre-activations (B, L, F) -> sparse feature activations (B, L, F): σ, by name."""
        return ACTIVATIONS[self.config.activation](self, pre)

    @torch.no_grad()
    def update_batchtopk_threshold(self, threshold, step, momentum=0.99):
        """BatchTopK -> JumpReLU (Bussmann et al. 2024): θ is a running mean of the batches' B·k-th
        values, threshold (L,). The first steps average plainly (momentum t/(t+1)), then an EMA."""
        m = min(momentum, step / (step + 1))
        theta = m * self.threshold + (1 - m) * threshold.clamp_min(1e-6)[:, None]  # (L, F)
        self.log_threshold.copy_(theta.log())

    def input_of(self, acts):
        """What this CLT reads from a run's Acts (model.py): (B, T, L, d), by config.input_hook."""
        x = getattr(acts, self.config.input_hook)
        if x is None:  # a model family that records only mlp_in (model.MODELS)
            raise ValueError(f"the model records no {self.config.input_hook}, which this CLT reads")
        return x

    def encode(self, mlp_in):
        """mlp_in (B, L, d) -> acts (B, L, F)."""
        return self.activate(self.pre_acts(mlp_in))

    def decode(self, acts, sparse=False, normalized=False, bias=True, mlp_in=None):
        """acts (B, L, F/tp) -> the reconstruction mlp_out_hat (B, L, d): the project's one decoder.
        Each TP rank decodes its features, one all-reduce adds them in fp32 at least (fp64 stays).
        sparse: only the active features' rows (decode_sparse); normalized: in the training units;
        bias=False: without b_dec (AuxK); mlp_in (B, L, d): with the skip connection."""
        out = self.decode_sparse(acts) if sparse else self.decode_dense(acts)  # (B, L, d)
        dtype = torch.promote_types(out.dtype, torch.float32)
        out = tp_sum(out.to(dtype), self.mesh.tp_group)  # (B, L, d)
        if bias:
            out = out + self.b_dec
        if mlp_in is not None and self.W_skip is not None:  # replicated: added after the TP sum
            out = out + self.skip(mlp_in, normalized=True).to(dtype)
        return out if normalized else out / self.output_scale[:, None]

    def skip(self, mlp_in, normalized=False):
        """mlp_in (B, L, d) -> what the skip connection adds to each MLP output (B, L, d), zero
        without one: linear in mlp_in, a path of the replacement model rather than a node."""
        if self.W_skip is None:
            return torch.zeros_like(mlp_in)
        x = (mlp_in * self.input_scale[:, None]).transpose(0, 1)  # (L, B, d)
        out = torch.bmm(x.to(self.W_skip.dtype), self.W_skip).transpose(0, 1)  # (B, L, d)
        return out if normalized else out / self.output_scale[:, None]

    def decode_dense(self, acts):
        """The paper's sum, mlp_out_hat[dst] = Σ_{src <= dst} acts[src] @ W_dec[src][dst - src],
        its products grouped by source: one (B, F) @ (F, n_writes·d) matmul gives all a source
        writes, to the output's layers src .. src + n_writes − 1 (DenseDecode adds it there)."""
        return DenseDecode.apply(acts, *self.W_dec)  # (B, L, d)

    def decode_sparse(self, acts):
        """decode_dense's sum over the active features only, cost ∝ L0, not F: per source one
        embedding_bag (value · W_dec[l][f] summed per token, no gathered rows); acts may be sparse
        COO. Its gradient reaches only active entries: exact but for a JumpReLU threshold's STE."""
        B, L, _ = acts.shape
        if acts.is_sparse:
            acts = acts.coalesce()
            b, l, f = acts.indices()  # sorted by (b, l, f)
            vals = acts.values()
        else:
            b, l, f = acts.nonzero(as_tuple=True)  # row-major, so sorted by token b
            vals = acts[b, l, f]
        dtype = self.W_dec[0].dtype
        out = torch.zeros(B, L, self.config.d_model, dtype=dtype, device=vals.device)  # (B, L, d)
        tokens = torch.arange(B, device=vals.device)
        for src in range(L):
            mine = l == src
            offsets = torch.searchsorted(b[mine], tokens)  # where each token's features start
            W = self.W_dec[src].flatten(1)  # (F/tp, n_writes·d)
            weights = vals[mine].to(W.dtype)
            rows = F.embedding_bag(f[mine], W, offsets, mode="sum", per_sample_weights=weights)
            out[:, src : src + self.n_writes(src)] += rows.view(B, self.n_writes(src), -1)
        return out

    def decoder_writes(self, layer, ids, acts):
        """What features `ids` (n,) of `layer` at `acts` (n,) write to the n_writes MLP outputs from
        `layer` on, in raw units: a · W_dec[layer][f] / output_scale (n, n_writes, d), the terms
        `decode` sums, one feature at a time (attribution graphs need them apart)."""
        W = self.W_dec[layer]
        scale = self.output_scale[layer : layer + W.size(1), None]  # (n_writes, 1)
        return W[ids] * acts[:, None, None].to(W.dtype) / scale

    def forward(self, mlp_in):
        """mlp_in (B, L, d) -> (acts (B, L, F), mlp_out_hat (B, L, d)), with the skip connection."""
        acts = self.encode(mlp_in)
        return acts, self.decode(acts, mlp_in=mlp_in)

    def decoder_norms(self):
        """(L, F/tp) each feature's decoder norm over all the layers it writes to (||W_dec||)."""
        return torch.stack([W.flatten(1).norm(dim=1) for W in self.W_dec])

    # -------------------------------------------------------------------------
    # normalization folding, consolidation over TP, saving and loading (circuit-tracer's layout)

    @torch.no_grad()
    def fold_normalization(self):
        """Fold input/output scales into the weights so the CLT works on raw activations: per layer
        pre = (s_in x) W + b = x (s_in W) + b;  y_hat = (Σ a W_dec + b_dec + s_in x W_skip) / s_out.
        Pre-activations are unchanged, so thresholds and activations are too."""
        self.W_enc.mul_(self.input_scale[:, None, None])
        for l, W in enumerate(self.W_dec):
            W.div_(self.output_scale[l : l + W.size(1)][None, :, None])
        self.b_dec.div_(self.output_scale[:, None])
        if self.W_skip is not None:
            self.W_skip.mul_((self.input_scale / self.output_scale)[:, None, None])
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)

    @torch.no_grad()
    def consolidated(self):
        """The whole CLT (on the CPU) from every TP rank's shard; all TP ranks call it."""
        full = CrossLayerTranscoder(self.config)

        def gather(t, dim):  # concatenate the shards along the feature dimension `dim`
            shard = t.detach().transpose(dim, -1).contiguous()
            return all_gather_last(shard, self.mesh.tp_group).transpose(dim, -1)

        for name in ("W_enc", "b_enc", "log_threshold"):  # (L, d, F/tp), (L, F/tp), (L, F/tp)
            getattr(full, name).copy_(gather(getattr(self, name), -1))
        for l, W in enumerate(self.W_dec):
            full.W_dec[l].copy_(gather(W, 0))
        replicated = ["b_dec", "input_scale", "output_scale"]
        for name in replicated + (["W_skip"] if self.W_skip is not None else []):
            getattr(full, name).copy_(getattr(self, name))
        return full.train(self.training)

    def save_pretrained(self, path):
        """circuit-tracer's CLT layout (forge/formats.py), normalization folded in: config.json +
        W_enc_{l}, W_dec_{l}.safetensors, each file atomic, one export id, config.json last."""
        if self.mesh.tp > 1:
            shard = f"TP shard {self.mesh.tp_rank} of {self.mesh.tp}"
            raise ValueError(f"this is {shard}: save consolidated() instead")
        clt = copy.deepcopy(self).cpu()
        clt.fold_normalization()
        export_id = formats.save_export(path, formats.clt_files(clt))
        config = dict(asdict(self.config), export_id=export_id)
        write_json(os.path.join(path, "config.json"), config)

    @classmethod
    def from_pretrained(cls, path, mesh: Optional[Mesh] = None):
        """Load a CLT saved by save_pretrained; on a TP mesh each rank reads only its features."""
        config, export_id = formats.read_clt_config(path, CLTConfig)
        clt = cls(config, mesh=mesh)
        formats.read_clt_files(clt, path, export_id)
        return clt.eval()


class DenseDecode(torch.autograd.Function):
    """decode_dense's sum, one matmul per source adding into the output slice it writes (β = 1):
    out[:, src : src + n] += acts[:, src] @ W_dec[src], n = n_writes(src); the backward reads each
    slice g of grad_out in place (g @ W_dec[src]ᵀ, acts[:, src]ᵀ @ g), where autograd's slicing
    stacked and summed pieces (~10 % of a GPT-2-small step). In acts' dtype (autocast: bf16)."""

    @staticmethod
    def forward(ctx, acts, *W_dec):  # acts (B, L, F/tp), W_dec[src] (F/tp, n_writes, d)
        B, L, _ = acts.shape
        W_dec = [W.to(acts.dtype) for W in W_dec]
        out = acts.new_zeros(B, L, W_dec[0].size(-1))  # (B, L, d)
        for src, W in enumerate(W_dec):
            written = out[:, src : src + W.size(1)].view(B, -1)  # (B, n_writes·d), a view
            written.addmm_(acts[:, src], W.flatten(1))
        ctx.save_for_backward(acts, *W_dec)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # (B, L, d)
        acts, *W_dec = ctx.saved_tensors
        B, L, F_ = acts.shape
        grad_acts = grad_out.new_empty(L, B, F_)  # (L, B, F/tp): each source's rows contiguous
        grad_W = []
        for src, W in enumerate(W_dec):
            g = grad_out[:, src : src + W.size(1)].reshape(B, -1)  # (B, n_writes·d)
            torch.mm(g, W.flatten(1).T, out=grad_acts[src])
            grad_W.append((acts[:, src].T @ g).view_as(W))  # (F/tp, n_writes, d)
        return grad_acts.transpose(0, 1), *grad_W


def uniform(g, rows, cols, bound, keep_rows=slice(None), keep_cols=slice(None)):
    """The kept rows and columns of a uniform(-bound, bound) (rows, cols) tensor drawn from `g`, in
    blocks of ~16 MB cut to what is kept, so no rank holds it whole (a layer's decoder is 0.9 GB at
    GPT-2-small's F = 24,576); the generator's stream does not depend on how it is split."""
    start, stop, _ = keep_rows.indices(rows)
    step = max(1, 2**22 // cols)
    blocks = []
    for a in range(0, rows, step):
        block = (torch.rand(min(step, rows - a), cols, generator=g) * 2 - 1) * bound
        blocks.append(block[max(start - a, 0) : max(stop - a, 0), keep_cols])
    return torch.cat(blocks)


# -----------------------------------------------------------------------------
# activations: σ in acts = σ(mlp_in @ W_enc + b_enc), by name. A fork adds one in a line:
#     ACTIVATIONS["myact"] = my_activation   # fn(clt, pre (B, L, F/tp)) -> acts (B, L, F/tp)
# and trains it with `python train.py --activation myact`.


def relu(clt, pre):
    return F.relu(pre)


def jumprelu(clt, pre):
    """z · H(z − θ) with a learned per-feature θ (Rajamanoharan et al. 2024)."""
    return JumpReLUFunction.apply(pre, clt.threshold.to(pre.dtype), clt.config.bandwidth)


def topk(clt, pre):
    """The k largest per token and layer (Gao et al. 2024)."""
    return clt.topk(pre, clt.config.k)


def batchtopk(clt, pre):
    """The B·k largest per layer over the batch while training; at inference its learned
    per-layer threshold acts as a JumpReLU (Bussmann et al. 2024)."""
    return clt.batchtopk(pre) if clt.training else jumprelu(clt, pre)


ACTIVATIONS = {"jumprelu": jumprelu, "topk": topk, "batchtopk": batchtopk, "relu": relu}


# -----------------------------------------------------------------------------
# loading any transcoder


def load_transcoder(path_or_hub_id, model, pre_ln_hook=None):
    """A transcoder for `model` from a directory or a hub id (owner/name[/subfolder][@revision],
    downloaded: forge/hub.py), in whichever layout: save_pretrained's (config.json), circuit-
    tracer's (config.yaml), sparsify's (h.N.mlp/sae.safetensors) or SAELens's (cfg.json folders).
    pre_ln_hook: whether sparsify-layout files read ln_2's input (None: forge/sparsify.py says)."""
    path = resolve_transcoder_dir(path_or_hub_id)
    if os.path.exists(os.path.join(path, "config.json")):
        return CrossLayerTranscoder.from_pretrained(path)
    return formats.load_published(path, model, new_transcoder, pre_ln_hook)


def new_transcoder(**config):
    """A new CrossLayerTranscoder of CLTConfig(**config): how forge/formats.py builds one."""
    return CrossLayerTranscoder(CLTConfig(**config))

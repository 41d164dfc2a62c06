"""Transcoders in EleutherAI's sparsify / clt-training layout, read as a CrossLayerTranscoder.

The layout, as `SparseCoder.save_to_disk` writes it and `load_from_disk` + `load_state` read it
(github.com/EleutherAI/clt-training, branch clt, commit cf9821f2b11faa36b821c0659a27d4542078dca6,
sparsify/sparse_coder.py; PyPI eai-sparsify 1.3.3 holds the same for one layer): one folder per
hook point, named after the module it hooks, e.g. h.3.mlp/, each with
    cfg.json         SparseCoderConfig's fields + d_in (sparsify/config.py)
    sae.safetensors  encoder.weight (F, d), encoder.bias (F,), W_dec (F, d), b_dec (d,),
                     W_skip (d, d) applied as x @ W_skip.T, and for a CLT the extras below.
A transcoder (cfg.transcode) of h.{l}.mlp reads the input of GPT-2's MLP module, ln_2's output,
and predicts its output (sparsify/trainer.py's forward hook: inputs[0] -> outputs): exactly our
mlp_in -> mlp_out, so nothing is folded, unlike circuit-tracer's and SAELens's x̂ (formats.py).
Its activation is TopK: the k largest of relu(x @ W_enc.T + b_enc) (fused_encoder.py), ours too.

A CLT (n_targets > 0: source s writes to targets s .. s + n_targets - 1) is decoded by
sparsify/runner.py's CrossLayerRunner.decode, in one of three storages:
- coalesce_topk "none": the source stores its decoders, W_decs.{j}, b_decs.{j}, W_skips.{j} for
  target s + j; with divide_cross_layer the earlier sources' sum is divided by (sources - 1);
- "per-layer": the target t stores them, W_dec ((t + 1)·F, d), rows [s·F, (s+1)·F) for source s;
- "concat": the target's one W_dec (F, d) serves feature f of every source (tied decoders).
Where we differ, or cannot follow (a one-line error says which):
- a post-encoder bias post_encs.{j} (added to active latents: not linear in them) must be zero; a
  post-encoder scale post_enc_scales.{j} multiplies them, so it folds into W_dec;
- normalize_io's in_norm / out_norm become our input_scale / output_scale, then are folded;
- a skip connection from an earlier layer (W_skips.{j}, j > 0) must be zero: ours is per layer;
- EleutherAI's conversions of mntss's and utahnlp's transcoders (gpt2-mntss-transcoder-*,
  gpt2-curt-clt-*) read ln_2's input, the residual stream resid_mid, not its output: EleutherAI/
  attribute runs them with pre_ln_hook=True (experiments/convert_relu_clt.py:86, convert_relu.py:52,
  convert_curt.py:128 at c2e751d6), whose TranscodedModel then hooks ln_2's input and feeds it to
  the runner's encode, the skip connection included (attribute/caching.py:232-238 and 266-267).
  Their cfg.json cannot say so (SparseCoderConfig has no such field), so `input_hook` reads it from
  the caller's pre_ln_hook, else a "pre_ln_hook" field we add to cfg.json (sparsify's loader drops
  unknown fields: SparseCoderConfig.from_dict(drop_extra_fields=True)), else the name: "-mntss-" or
  "-curt-" in the path (hub snapshots keep the repo id in theirs). The CLT then has input_hook
  "resid_mid" (clt.py), which graph.py, intervene.py and train.evaluate read instead of mlp_in.
Files are read a block at a time (Tensors): a big CLT never sits in memory twice. Checked against
the anchors' own code, in all three storages: tests/fixtures/make_published.py (clt-training at
0a0fea24, whose runner.py is cf9821f2's; cf9821f2 itself cannot decode the "none" storage).
"""

import json
import os
import re
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open

from forge.files import check_finite

HOOKPOINT = re.compile(r"(?:transformer\.|model\.)?(?:h|layers)\.(\d+)\.mlp")  # GPT-2, Llama
READS_LN_2_INPUT = re.compile(r"-(mntss|curt)-")  # EleutherAI's, converted with pre_ln_hook=True
UNSUPPORTED = dict(  # cfg field -> the value we can express
    per_source_tied=False, secondary_target_tied=False, topk_coalesced=False, activation="topk"
)


class Tensors(Mapping):
    """One sae.safetensors as a mapping whose tensors are read (as float32) when asked for, rows
    by rows if need be: a big CLT is filled one block at a time, its files never all in memory."""

    def __init__(self, file):
        self.file = file
        try:
            with safe_open(file, "pt") as f:
                self.names = {name: f.get_slice(name).get_shape() for name in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{file} is damaged or cut short ({e}): download it again") from None

    def __getitem__(self, name):
        return self.rows(name, 0, None)

    def rows(self, name, start, stop):
        """Rows start:stop of tensor `name`, read alone."""
        if name not in self.names:
            raise KeyError(name)
        with safe_open(self.file, "pt") as f:
            return f.get_slice(name)[start:stop].float()

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def is_sparsify(path):
    """Whether `path` holds hook-point folders with cfg.json + sae.safetensors."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name, "sae.safetensors")) for name in os.listdir(path)
    )


def read_layers(path, n_layers):
    """[(cfg, tensors) per layer] of the transcoders in `path`, found by their folders' names."""
    layers = {}
    for name in sorted(os.listdir(path)):
        if not os.path.exists(os.path.join(path, name, "sae.safetensors")):
            continue
        found = HOOKPOINT.fullmatch(name)
        if found is None:
            raise ValueError(
                f"{path}/{name} hooks {name!r}: clt-forge exposes each MLP's input and output "
                "only, so only transcoders of h.N.mlp (or layers.N.mlp) load"
            )
        with open(os.path.join(path, name, "cfg.json")) as f:
            cfg = json.load(f)
        layers[int(found.group(1))] = (cfg, Tensors(os.path.join(path, name, "sae.safetensors")))
    if sorted(layers) != list(range(n_layers)):
        raise ValueError(f"{path} has transcoders of layers {sorted(layers)}, the model {n_layers}")
    return [layers[l] for l in range(n_layers)]


def input_hook(path, layers, pre_ln_hook=None):
    """resid_mid (ln_2's input) or mlp_in (its output): what the transcoders in `path` read, from
    pre_ln_hook if given, else layer 0's cfg.json "pre_ln_hook", else the path's name."""
    if pre_ln_hook is None:
        pre_ln_hook = layers[0][0].get("pre_ln_hook")
    if pre_ln_hook is None:
        pre_ln_hook = READS_LN_2_INPUT.search(os.path.abspath(path)) is not None
    return "resid_mid" if pre_ln_hook else "mlp_in"


def check_config(path, l, cfg, d):
    """Refuse what clt.py's transcoder cannot compute, naming the field."""
    where = f"{path}, layer {l}: cfg.json"
    if not cfg.get("transcode"):
        raise ValueError(f"{where} is a sparse autoencoder (transcode false), not a transcoder")
    if cfg.get("d_in") != d:
        raise ValueError(f"{where} has d_in={cfg.get('d_in')}, the model's width is {d}")
    for field, ours in UNSUPPORTED.items():
        if cfg.get(field, ours) != ours:
            raise ValueError(f"{where} has {field}={cfg[field]!r}; clt-forge computes {ours!r}")
    if cfg.get("coalesce_topk", "none") not in ("none", "per-layer", "concat"):
        raise ValueError(f"{where} has coalesce_topk={cfg['coalesce_topk']!r}, unknown to sparsify")


def per_target(tensors, name, j, multi):
    """Source tensor `name` for its j-th target: name + "s.{j}" in a CLT (W_decs.{j}), else name."""
    if not multi:
        return tensors.get(name) if j == 0 else None
    return tensors.get(f"{name}s.{j}", tensors.get(name) if j == 0 else None)


def decoder_block(layers, s, t, active):
    """What feature f of source s writes to target t, as rows (F, d) applied to its activation
    (runner.py's decode for the target's coalesce_topk; the post-encoder scale folded in)."""
    cfg_s, p_s = layers[s]
    cfg_t, p_t = layers[t]
    j = t - s
    multi = cfg_s.get("n_targets", 0) > 0
    bias = per_target(p_s, "post_enc", j, multi)
    if bias is not None and bias.any():
        raise ValueError(
            f"layer {s} adds a post-encoder bias (post_encs.{j}) to its active latents for layer "
            f"{t}: not linear in them, so clt-forge's transcoder cannot hold it"
        )
    mode = cfg_t.get("coalesce_topk", "none") if cfg_t.get("n_targets", 0) > 0 else "none"
    F, d = p_s.names["encoder.weight"]
    if mode == "per-layer":  # the target's rows of source s: one block per active source
        if p_t.names["W_dec"][0] != len(active) * F:
            raise ValueError(f"layer {t}'s W_dec has not {len(active)} sources' rows of {F}")
        i = active.index(s)
        W = p_t.rows("W_dec", i * F, (i + 1) * F)  # (F, d)
    elif mode == "concat":  # tied: the target's rows serve every source
        W = p_t["W_dec"]  # (F, d)
    else:
        W = per_target(p_s, "W_dec", j, multi)  # load_state imputes zeros for missing targets
        W = torch.zeros(F, d) if W is None else W
    if not cfg_s.get("post_encoder_scale"):
        return W
    scale = per_target(p_s, "post_enc_scale", j, multi)
    if scale is None:  # load_state imputes make_post_enc's init: ones for j = 0, zeros after
        scale = torch.full((len(W),), float(j == 0))
    return W * scale[:, None]  # (F, d)


def target_bias_and_skip(layers, t, active):
    """(b_dec (d,), W_skip (d, d) applied as x @ W_skip.T) of target t, summed over its sources
    where each source stores its own (coalesce_topk "none"), with divide_cross_layer's 1/(n - 1)."""
    cfg_t, p_t = layers[t]
    if cfg_t.get("n_targets", 0) > 0 and cfg_t.get("coalesce_topk", "none") != "none":
        return p_t["b_dec"], p_t.get("W_skip")
    b = torch.zeros(p_t.names["encoder.weight"][1])  # (d,)
    for s in active:
        cfg_s, p_s = layers[s]
        multi = cfg_s.get("n_targets", 0) > 0
        skip = per_target(p_s, "W_skip", t - s, multi)
        if s < t and skip is not None and skip.any():
            raise ValueError(
                f"layer {s} has a skip connection to layer {t} (W_skips.{t - s}); clt-forge's skip "
                "connections read their own layer only"
            )
        found = per_target(p_s, "b_dec", t - s, multi)
        b = b + (0 if found is None else found) * divide(layers, s, t, active)
    return b, per_target(layers[t][1], "W_skip", 0, cfg_t.get("n_targets", 0) > 0)


def divide(layers, s, t, active):
    """runner.py: with divide_cross_layer, the earlier sources' sum over len(outputs) - 1."""
    cfg_t = layers[t][0]
    if (
        s == t
        or not cfg_t.get("divide_cross_layer")
        or cfg_t.get("coalesce_topk", "none") != "none"
    ):
        return 1.0
    return 1.0 / max(1, len(active) - 1)


@torch.no_grad()
def from_sparsify(path, model, new_transcoder, pre_ln_hook=None):
    """Load the transcoders in `path` (sparsify's layout) as one CrossLayerTranscoder of `model`;
    pre_ln_hook: whether they read ln_2's input (None: from cfg.json or the name, `input_hook`)."""
    L, d = model.config.n_layer, model.config.n_embd
    layers = read_layers(path, L)
    for l, (cfg, _) in enumerate(layers):
        check_config(path, l, cfg, d)
    ks = sorted({cfg.get("k", 32) for cfg, _ in layers})  # SparseCoderConfig's default k
    widths = sorted({p.names["encoder.weight"][0] for _, p in layers})
    if len(ks) > 1 or len(widths) > 1:
        raise ValueError(f"{path}: layers differ in k {ks} or width {widths}; ours share them")
    n_targets = [max(1, cfg.get("n_targets", 0)) for cfg, _ in layers]
    decoder = "cross-layer" if max(n_targets) > 1 else "per-layer"
    skip = any(k.startswith("W_skip") for _, p in layers for k in p)
    shape = dict(n_layers=L, d_model=d, n_features=widths[0], decoder=decoder, skip=skip)
    shape["input_hook"] = input_hook(path, layers, pre_ln_hook)
    made_for = dict(model=getattr(model, "name_or_path", ""), model_sha256=model.fingerprint())
    t = new_transcoder(**shape, activation="topk", k=ks[0], **made_for)
    for l, (cfg, p) in enumerate(layers):
        t.W_enc[l].copy_(p["encoder.weight"].t())
        t.b_enc[l].copy_(p["encoder.bias"])
        t.W_dec[l].zero_()  # a source writes to n_targets layers, perhaps fewer than ours
        if cfg.get("normalize_io"):  # x · sqrt(d) / in_norm in, y · out_norm / sqrt(d) out
            t.input_scale[l] = d**0.5 / p["in_norm"]
            t.output_scale[l] = d**0.5 / p["out_norm"]
    for target in range(L):
        active = [s for s in range(target + 1) if target - s < n_targets[s]]
        for s in active:
            W = decoder_block(layers, s, target, active)
            t.W_dec[s][:, target - s].copy_(W * divide(layers, s, target, active))
        b_dec, W_skip = target_bias_and_skip(layers, target, active)
        t.b_dec[target].copy_(b_dec)
        if W_skip is not None:
            t.W_skip[target].copy_(W_skip.t())
    check_finite(t.state_dict(), f"the transcoder in {path}")
    t.fold_normalization()
    return t.eval()

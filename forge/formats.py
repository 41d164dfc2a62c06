"""Transcoders in files: clt.py's own layout, and those circuit-tracer and SAELens publish.

The published ones of GPT-2 read TransformerLens's blocks.{l}.ln2.hook_normalized x̂, *before*
ln_2's affine map, where our mlp_in is after it: mlp_in = x̂ · w + b. So ln_2's w and b are folded
into the encoder (and the skip connection) on the way out, and taken out on the way in: fold_ln_2.
The Llama family's read circuit-tracer's mlp.hook_in, post_attention_layernorm's output: our mlp_in
itself, nothing to fold (fold_hooks). circuit-tracer's reading hook_resid_mid (ln_2's input) are
read as they are (input_hook "resid_mid"). The loaders build the transcoder with
`new_transcoder(**config)`, passed in by clt.py (this package never imports the spine)."""

import copy
import os
import re
import uuid
from dataclasses import asdict, fields

import torch
import yaml

from forge import sparsify
from forge.files import check_finite, check_same_model, read_export_file, read_json
from forge.files import read_safetensors, save_safetensors, write_json


@torch.no_grad()
def fold_ln_2(transcoder, model, inverse=False):
    """In place: make `transcoder` read x̂ (before ln_2's affine map), not mlp_in = x̂ w + b;
    inverse=True: back again. Its input and output scales are folded first (fold_normalization).

    With W = W_enc[l] (d, F) and S = W_skip[l] (d, d), both applied as x @ W:
        (x̂ w + b) W + b_enc = x̂ (w ⊙ W) + (b W + b_enc)
        (x̂ w + b) S + b_dec = x̂ (w ⊙ S) + (b S + b_dec)
    """
    transcoder.fold_normalization()
    if transcoder.config.input_hook == "resid_mid":  # it reads ln_2's input: no affine map to fold
        return
    for l, block in enumerate(model.h):
        w = block.ln_2.weight.detach().to(transcoder.W_enc)  # (d,)
        b = block.ln_2.bias.detach().to(transcoder.W_enc)  # (d,)
        if inverse and (w == 0).any():
            raise ValueError(f"ln_2 of layer {l} has zero weights: its affine map cannot be undone")
        pairs = [(transcoder.W_enc[l], transcoder.b_enc[l])]
        if transcoder.W_skip is not None:
            pairs.append((transcoder.W_skip[l], transcoder.b_dec[l]))
        for W, bias in pairs:  # W (d, n) applied as x @ W, bias (n,)
            if inverse:
                W.div_(w[:, None])
            # b W summed as circuit-tracer's (n, d) weights sum it: the graph references in
            # tests/fixtures, made through this fold, then regenerate bit for bit
            shift = W.t().contiguous() @ b  # (n,)
            bias.add_(-shift if inverse else shift)
            if not inverse:
                W.mul_(w[:, None])


def layer_tensors(t, l, threshold_key, enc_by_feature=True, per_layer=True):
    """Layer l of transcoder `t` as the files hold it: W_enc (F, d) if enc_by_feature (circuit-
    tracer) else (d, F) (SAELens), b_enc, b_dec, W_dec (F, d) if per_layer, W_skip (d, d) as
    x @ W_skip.T, the threshold under threshold_key (None: left out, a ReLU to circuit-tracer)."""
    W_enc = t.W_enc[l].t() if enc_by_feature else t.W_enc[l]
    tensors = {"W_enc": W_enc, "b_enc": t.b_enc[l], "b_dec": t.b_dec[l]}
    if per_layer:
        tensors["W_dec"] = t.W_dec[l][:, 0]
    if threshold_key is not None:
        tensors[threshold_key] = t.threshold[l]
    if t.W_skip is not None:
        tensors["W_skip"] = t.W_skip[l].t()
    return tensors


@torch.no_grad()
def load_layer(t, l, tensors, threshold_key="threshold", enc_by_feature=True, where=""):
    """layer_tensors' inverse, W_dec (F, d) or (F, n_writes, d) included: fill layer l of `t` (a
    missing threshold leaves it as it is). Refuses tensors of another size or not finite, naming
    `where` they come from."""
    check_layer(t, l, tensors, threshold_key, where or f"layer {l}")
    t.W_enc[l].copy_(tensors["W_enc"].t() if enc_by_feature else tensors["W_enc"])
    t.b_enc[l].copy_(tensors["b_enc"])
    t.W_dec[l].copy_(tensors["W_dec"].reshape_as(t.W_dec[l]))
    t.b_dec[l].copy_(tensors["b_dec"])
    if threshold_key in tensors:
        t.log_threshold[l].copy_(tensors[threshold_key].log().flatten())  # (F,), or ct's (1, F)
    if t.W_skip is not None:
        t.W_skip[l].copy_(tensors["W_skip"].t())


def check_layer(t, l, tensors, threshold_key, where):
    """Refuse layer l's tensors whose sizes are not `t`'s (its config's) or that are not finite."""
    ours = dict(W_enc=t.W_enc[l], b_enc=t.b_enc[l], W_dec=t.W_dec[l], b_dec=t.b_dec[l])
    ours[threshold_key] = t.log_threshold[l]  # the threshold's size
    ours["W_skip"] = t.W_skip[l] if t.W_skip is not None else None
    for name, x in tensors.items():
        want = ours.get(name)
        if isinstance(want, torch.Tensor) and x.numel() != want.numel():
            c = t.config
            sizes = f"n_features={c.n_features}, d_model={c.d_model}, n_layers={c.n_layers}"
            fix = "the config and the weights come from different transcoders: re-export it"
            shape = f"{name} has shape {tuple(x.shape)}, not that of {sizes}"
            raise ValueError(f"{where}: {shape} ({fix})")
    check_finite(tensors, where)


# clt.py's layout, circuit-tracer's for a CLT: config.json (CLTConfig + export id, written last)
# beside W_enc_{l}.safetensors (W_enc_{l} (F, d), b_enc_{l}, b_dec_{l}, threshold_{l}, W_skip_{l}
# (d, d)) and W_dec_{l}.safetensors (W_dec_{l} (F, L-l, d), or (F, 1, d) per-layer), every file
# tagged with the export id: a crash mid-save leaves two ids, refused on load, never a silent mix.


def clt_files(t, threshold=True):
    """{file name: tensors} of transcoder `t` as it is (scales folded or not) in clt.py's layout."""
    files = {}
    for l in range(t.config.n_layers):
        enc = layer_tensors(t, l, "threshold" if threshold else None, per_layer=False)
        files[f"W_enc_{l}"] = {f"{k}_{l}": v for k, v in enc.items()}
        files[f"W_dec_{l}"] = {f"W_dec_{l}": t.W_dec[l]}
    return files


def save_export(path, files):
    """{name: tensors} -> {path}/{name}.safetensors, each atomic, all tagged with one new export id,
    returned for the config that is written after them (a directory with it is complete)."""
    export_id = uuid.uuid4().hex
    os.makedirs(path, exist_ok=True)
    for name, tensors in files.items():  # checked before any is written: a NaN is never exported
        check_finite(tensors, f"the export to {path}/{name}.safetensors")
    for name, tensors in files.items():
        save_safetensors(os.path.join(path, f"{name}.safetensors"), tensors, export_id)
    return export_id


def read_clt_config(path, config_class):
    """(config_class(**fields), export id) from the config.json of a CLT in clt.py's layout."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise no_clt_config(path)
    saved = read_json(config_path, "re-export the CLT, e.g. python train.py --resume --out DIR")
    if not isinstance(saved, dict):
        raise ValueError(f"{config_path} is not a JSON object of CLTConfig's fields: not a CLT")
    export_id = saved.pop("export_id", None)
    unknown = sorted(set(saved) - {f.name for f in fields(config_class)})
    if unknown:
        known = f"that {config_class.__name__} does not know: not a clt-forge CLT"
        raise ValueError(f"{config_path} has fields {unknown} {known}")
    return config_class(**saved), export_id


def no_clt_config(path):
    """The error for a folder without a CLT's config.json: an export cut short, or no CLT."""
    if os.path.exists(os.path.join(path, "W_enc_0.safetensors")):  # config.json is written last
        fix = f"finish it with `python train.py --resume --out {path}`"
        return FileNotFoundError(f"{path} holds an export cut short (no config.json): {fix}")
    fix = f"train one with `python train.py --out {path}`, or pass the --clt train.py wrote"
    return FileNotFoundError(f"no CLT at {path} (no config.json): {fix}")


def read_clt_files(t, path, export_id):
    """Fill transcoder `t` (this TP rank's features) from clt_files' files in `path`."""
    mine = slice(t.mesh.tp_rank * t.F_local, (t.mesh.tp_rank + 1) * t.F_local)
    for l in range(t.config.n_layers):
        F = t.config.n_features
        files = [read_export_file(path, f"{n}_{l}", export_id, mine, F) for n in ("W_enc", "W_dec")]
        tensors = {k.removesuffix(f"_{l}"): v for f in files for k, v in f.items()}
        load_layer(t, l, tensors, where=f"{path}/W_enc_{l}, W_dec_{l}.safetensors")


def provenance(model):
    """The model a transcoder belongs to, as CLTConfig records it."""
    return dict(model=getattr(model, "name_or_path", ""), model_sha256=model.fingerprint())


# circuit-tracer 0.5.0 (TransformerLens backend), as its transcoder cache and the hub hold them:
# {path}/config.yaml (model_kind, feature_input_hook, feature_output_hook, scan) beside the weights.
# Per-layer, its TranscoderSet: layer_{l}.safetensors with W_enc (F, d), W_dec (F, d), b_enc (F,),
# b_dec (d,), activation_function.threshold (F,) for JumpReLU, W_skip (d, d): skip = x̂ @ W_skip.T.
# Cross-layer: save_pretrained's W_enc_{l} and W_dec_{l}.safetensors. config.yaml is written as
# JSON (YAML reads JSON) and carries our CLTConfig and export id under "clt_forge".

CIRCUIT_TRACER_HOOKS = dict(
    feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out"
)
RESID_MID = "hook_resid_mid"  # circuit-tracer's default input: ln_2's input, our resid_mid as is
# the Llama family's (mntss/clt-llama-3.2-1b-524k, mntss/transcoder-Llama-3.2-1B, the Qwen3 PLTs):
# circuit-tracer's mlp.hook_in is post_attention_layernorm's output, our mlp_in: nothing to fold
LLAMA_HOOKS = dict(feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out")
CIRCUIT_TRACER_KINDS = {"per-layer": "transcoder_set", "cross-layer": "cross_layer_transcoder"}
CIRCUIT_TRACER_THRESHOLD = "activation_function.threshold"  # its JumpReLU's threshold in layer_{l}
EXPORTABLE = "export a relu, jumprelu or batchtopk one"  # batchtopk is a JumpReLU at inference


def circuit_tracer_hooks(model):
    """Where circuit-tracer's transcoders of `model` read and write: GPT-2's, or the Llama family's
    (a config with a model_type other than gpt2, as model.LlamaConfig has)."""
    llama = getattr(model.config, "model_type", "gpt2") != "gpt2"
    return LLAMA_HOOKS if llama else CIRCUIT_TRACER_HOOKS


def fold_hooks(transcoder, model, inverse=False):
    """fold_ln_2 where circuit-tracer reads before ln_2's affine map (GPT-2); only the input and
    output scales where it reads ln_2's output (the Llama family's mlp.hook_in)."""
    if circuit_tracer_hooks(model) is CIRCUIT_TRACER_HOOKS:
        fold_ln_2(transcoder, model, inverse)
    else:
        transcoder.fold_normalization()


def save_circuit_tracer(transcoder, path, model, model_name="gpt2"):
    """Write a transcoder of `model` (ln_2 folded in) in the layout circuit-tracer 0.5.0 loads:
    {path}/config.yaml + layer_{l}.safetensors (a PLT) or W_enc_{l}/W_dec_{l}.safetensors (a CLT).
    circuit-tracer reads it from its cache directory, e.g. for path = runs/plt-ct:
        load_transcoders_from_cache("plt-ct", cache_dir="runs")  # circuit_tracer.utils.caching
    or CIRCUIT_TRACER_CACHE_DIR=runs, transcoder_set "plt-ct" in ReplacementModel.from_pretrained.
    """
    c = transcoder.config
    if c.activation == "topk":  # circuit-tracer would read it as a ReLU transcoder
        raise ValueError(f"circuit-tracer has no TopK transcoder: {EXPORTABLE}")
    if c.decoder == "cross-layer" and c.skip:
        raise ValueError(
            "circuit-tracer 0.5.0's CLT loader reads no skip connection: export a per-layer "
            "transcoder with --skip, or a CLT without"
        )
    if transcoder.mesh.tp > 1:
        shard = f"TP shard {transcoder.mesh.tp_rank} of {transcoder.mesh.tp}"
        raise ValueError(f"this is {shard}: export consolidated() instead")
    check_same_model(model, c.model_sha256, "this transcoder")  # the fold is of this model's ln_2
    t = copy.deepcopy(transcoder).cpu()
    fold_hooks(t, model)
    key = CIRCUIT_TRACER_THRESHOLD if c.activation != "relu" else None  # relu: no threshold
    if c.decoder == "per-layer":
        files = {f"layer_{l}": layer_tensors(t, l, key) for l in range(c.n_layers)}
    else:
        files = clt_files(t, threshold=key is not None)
    export_id = save_export(path, files)
    kind = CIRCUIT_TRACER_KINDS[c.decoder]
    scan = os.path.basename(os.path.normpath(path))
    config = dict(model_kind=kind, model_name=model_name, **circuit_tracer_hooks(model), scan=scan)
    if c.input_hook == "resid_mid":
        config["feature_input_hook"] = RESID_MID
    config["clt_forge"] = dict(asdict(c), model_sha256=model.fingerprint(), export_id=export_id)
    write_json(os.path.join(path, "config.yaml"), config)  # last: a directory with it is complete


def from_circuit_tracer(path, model, new_transcoder):
    """Load a transcoder in circuit-tracer's layout (save_circuit_tracer's, its cache's or a hub
    repo's) as a CrossLayerTranscoder on our mlp_in, ln_2's affine map taken out."""
    config_path = os.path.join(path, "config.yaml")
    with open(config_path) as f:
        try:  # circuit-tracer writes it with yaml.dump (utils/caching.py), we as JSON (YAML too)
            saved = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{config_path} is not YAML ({type(e).__name__})") from e
    if not isinstance(saved, dict) or "transcoders" in saved:  # hf:// paths, Gemma Scope's npz
        fetch = "fetch them with circuit_tracer.utils.caching.save_transcoders_to_cache"
        raise ValueError(f"{config_path} lists transcoders in other files: {fetch}, pass its dir")
    expected = circuit_tracer_hooks(model)
    hooks = {k: saved.get(k) for k in expected}
    resid_mid = hooks["feature_input_hook"] == RESID_MID
    if resid_mid:  # read as is, no ln_2 folded (fold_ln_2 leaves a resid_mid transcoder alone)
        hooks["feature_input_hook"] = expected["feature_input_hook"]
    kinds = {v: k for k, v in CIRCUIT_TRACER_KINDS.items()}
    if hooks != expected or saved.get("model_kind") not in kinds:
        found = f"{saved.get('model_kind')} reading {hooks}"
        mlp = f"only MLP transcoders ({sorted(kinds)} with {expected}, or {RESID_MID})"
        raise ValueError(f"{config_path}: {found}; {mlp} replace the model's MLPs")
    ours = dict(saved.get("clt_forge", {}))
    export_id = ours.pop("export_id", None)
    decoder = kinds[saved["model_kind"]]
    L, d = model.config.n_layer, model.config.n_embd
    if not ours:  # files circuit-tracer wrote: the shape and activation are in layer 0's tensors
        name = "layer_0" if decoder == "per-layer" else "W_enc_0"
        first = read_export_file(path, name, None, slice(None))
        names = " ".join(first)
        n_features = len(first.get("b_enc", first.get("b_enc_0")))
        activation = "jumprelu" if "threshold" in names else "relu"
        sizes = dict(n_layers=L, d_model=d, n_features=n_features, decoder=decoder)
        ours = dict(**sizes, activation=activation, skip="W_skip" in names, **provenance(model))
    ours["input_hook"] = "resid_mid" if resid_mid else "mlp_in"  # what circuit-tracer feeds it
    shape = (ours.get("n_layers"), ours.get("d_model"), ours.get("decoder", "cross-layer"))
    if shape != (L, d, decoder):
        raise ValueError(
            f"{path} holds a {shape[2]} transcoder of {shape[0]} layers of width {shape[1]}, "
            f"the model has {L} of width {d}: pass the --model it was made for"
        )
    check_same_model(model, ours.get("model_sha256", ""), f"the transcoder in {path}")
    t = new_transcoder(**ours)
    if decoder == "cross-layer":
        read_clt_files(t, path, export_id)
    else:
        for l in range(L):
            tensors = read_export_file(path, f"layer_{l}", export_id, slice(None))
            load_layer(
                t, l, tensors, CIRCUIT_TRACER_THRESHOLD, where=f"{path}/layer_{l}.safetensors"
            )
    fold_hooks(t, model, inverse=True)
    return t.eval()


# SAELens, as transcoders of gpt2-small are published: one folder per layer with cfg.json +
# sae_weights.safetensors: W_enc (d, F), b_enc (F,), W_dec (F, d), b_dec (d,), threshold (F,) for
# JumpReLU, W_skip (d, d) with skip = x̂ @ W_skip.T.

SAELENS_ARCHITECTURES = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}


def save_saelens(transcoder, path, model, model_name="gpt2"):
    """Write a per-layer transcoder of `model` (whose ln_2 is folded in) as SAELens publishes them:
    {path}/blocks.{l}.ln2.hook_normalized/{cfg.json, sae_weights.safetensors}."""
    c = transcoder.config
    if c.decoder != "per-layer":
        raise ValueError(
            "SAELens's layout holds per-layer transcoders; this one is cross-layer "
            "(save_circuit_tracer writes circuit-tracer's CLT layout)"
        )
    kind = {"relu": "relu", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}.get(c.activation)
    if kind is None:
        raise ValueError(f"SAELens has no {c.activation} transcoder: {EXPORTABLE}")
    if c.input_hook != "mlp_in":
        raise ValueError("this transcoder reads resid_mid: export it with save_circuit_tracer")
    architecture = SAELENS_ARCHITECTURES[kind, c.skip]
    threshold_key = "threshold" if kind == "jumprelu" else None
    t = copy.deepcopy(transcoder).cpu()
    fold_ln_2(t, model)
    for l in range(c.n_layers):
        tensors = layer_tensors(t, l, threshold_key, enc_by_feature=False)
        check_finite(tensors, f"the export of layer {l} to {path}")
        hook = f"blocks.{l}.ln2.hook_normalized"
        hook_out = f"blocks.{l}.hook_mlp_out"
        hooks = dict(model_name=model_name, hook_name=hook, hook_name_out=hook_out)
        cfg = dict(architecture=architecture, d_in=c.d_model, d_sae=c.n_features, d_out=c.d_model)
        cfg.update(dtype="float32", apply_b_dec_to_input=False, normalize_activations="none")
        cfg.update(hook_layer=l, **hooks, metadata=hooks)  # at the top for SAELens < 6
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
        cfg = read_json(os.path.join(root, "cfg.json"), "restore it from where it was published")
        hooks = {**cfg.get("metadata", {}), **cfg}  # SAELens 6 has them in metadata, < 6 at the top
        reads, writes = hooks.get("hook_name"), hooks.get("hook_name_out")
        found = re.fullmatch(r"blocks\.(\d+)\.ln2\.hook_normalized", reads or "")
        if found is None or not (writes or "").endswith("hook_mlp_out"):
            raise ValueError(
                f"{root}/cfg.json reads {reads!r} and writes {writes!r}: only MLP transcoders "
                "(ln2.hook_normalized -> hook_mlp_out) replace GPT-2's MLPs"
            )
        folders[int(found.group(1))] = (root, cfg)
    if sorted(folders) != list(range(n_layers)):
        found = f"SAELens transcoders for layers {sorted(folders)}"
        raise ValueError(f"{path} has {found}, the model has {n_layers}")
    return folders


def from_saelens(path, model, new_transcoder):
    """Load per-layer transcoders in SAELens's layout (one per layer of `model`) as one per-layer
    CrossLayerTranscoder on our mlp_in (ln_2's affine map taken out of the encoder again)."""
    L, d = model.config.n_layer, model.config.n_embd
    folders = _saelens_layers(path, L)
    arch = {v: k for k, v in SAELENS_ARCHITECTURES.items()}
    kinds = {arch.get(cfg.get("architecture")) for _, cfg in folders.values()}
    if len(kinds) != 1 or None in kinds:
        found = sorted(cfg.get("architecture") for _, cfg in folders.values())
        needed = f"one of {sorted(arch)} for every layer is needed"
        raise ValueError(f"{path}: architectures {found}; {needed}")
    kind, skip = kinds.pop()  # the one architecture of every layer
    norms = sorted({cfg.get("normalize_activations") or "none" for _, cfg in folders.values()})
    if norms != ["none"]:  # SAELens's Transcoder.process_sae_in rescales x̂ per token: not linear
        raise ValueError(f"{path}: normalize_activations {norms}; clt-forge reads only 'none'")
    sizes = dict(n_layers=L, d_model=d, n_features=folders[0][1]["d_sae"], decoder="per-layer")
    t = new_transcoder(**sizes, activation=kind, skip=skip, **provenance(model))
    for l in range(L):
        file = os.path.join(folders[l][0], "sae_weights.safetensors")
        load_layer(t, l, read_safetensors(file), enc_by_feature=False, where=file)
    fold_ln_2(t, model, inverse=True)
    return t.eval()


def load_published(path, model, new_transcoder, pre_ln_hook=None):
    """A transcoder for `model` in circuit-tracer's layout (config.yaml), sparsify's (h.N.mlp
    folders; pre_ln_hook: see forge/sparsify.py) or SAELens's (cfg.json folders below `path`),
    built by new_transcoder(**config)."""
    if os.path.exists(os.path.join(path, "config.yaml")):
        return from_circuit_tracer(path, model, new_transcoder)
    if sparsify.is_sparsify(path):  # h.N.mlp/{cfg.json, sae.safetensors}: EleutherAI's
        return sparsify.from_sparsify(path, model, new_transcoder, pre_ln_hook)
    if os.path.isdir(path) and any("cfg.json" in files for _, _, files in os.walk(path)):
        return from_saelens(path, model, new_transcoder)
    if os.path.exists(os.path.join(path, "W_enc_0.safetensors")):
        raise no_clt_config(path)
    raise FileNotFoundError(
        f"no transcoder at {path}: neither a CLT saved by train.py (config.json), nor one in "
        "circuit-tracer's layout (config.yaml), nor per-layer transcoders in SAELens's layout "
        "(cfg.json + sae_weights.safetensors), nor in sparsify's (h.N.mlp/sae.safetensors)"
    )

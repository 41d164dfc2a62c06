"""train.py's armour: the run's inputs, the resume contract, checkpoints, the export, refusals.

A run is its --out folder (movable): checkpoints/latest.json names its last complete checkpoint. On
--resume the shape and optimizer flags (--features, --lr, --seed, --tp, ...) come from the
checkpoint and one given that differs is refused by name; CHANGEABLE flags (--steps, --wandb,
--cache and --model: moved copies of the same ones, checked, ...) may change; INVOCATION flags
(--out, --stop-at, --device, ...) are this command line's; the run resumes on the (dp, tp) mesh that
wrote it. A run at its last step whose export is missing or mixed is exported again: the command
exits 0 only once the export is whole. A new run refuses an --out that holds another run: pass
--resume, another --out, or --overwrite (that run's files are removed before the first step).

A checkpoint, complete once its latest.json exists: a safetensors shard per TP rank (weights, Adam
moments, dead-feature clocks) and latest.json (configs, step, RNG, data position, last metrics),
each fsynced and renamed into place. The export is circuit-tracer's layout; training.json, written
last, names its export id.
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, fields
from importlib.util import find_spec

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from forge import corpora
from forge.cli import DEBUG_HELP, add_config_args
from forge.files import check_same_model, fsync_dir, save_safetensors, write_json
from forge.formats import read_clt_config
from forge.hub import load_tokenizer
from forge.runlog import step_line
from forge.shards import MANIFEST

INVOCATION = "out resume overwrite stop_at device timeout_s".split()  # this command line's
CHANGEABLE = "cache model steps eval_every eval_contexts log_every ckpt_every wandb".split()
RUN_FILES = ("metrics.jsonl", "training.json", "config.json")  # and checkpoints/, W_enc_*, W_dec_*
CKPT_DIR = "checkpoints"
LATEST = "latest.json"


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# the config a run goes on with
def parse_args(doc, cls, argv=None):
    """The command line -> (a `cls` config, the names of the flags given on it). --resume must tell
    a flag the user typed from a default, which a plain parse (forge.cli.parse_config) cannot."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=doc, formatter_class=formatter, epilog=DEBUG_HELP)
    add_config_args(parser, cls)
    unset = object()
    # argparse sets a default only where the namespace lacks it: sentinels left = flags not typed
    ns = vars(parser.parse_args(argv, argparse.Namespace(**{f.name: unset for f in fields(cls)})))
    given = {k for k, v in ns.items() if v is not unset}
    return cls(**{k: ns[k] for k in given}), given


def resolve(config, given=None):
    """-> (the config the run goes on with, its checkpoint's latest.json or None for a new run). A
    resumed run takes the checkpoint's config, with the INVOCATION fields and the CHANGEABLE ones
    given. given: the flags typed (parse_args); None = the fields that differ from the defaults."""
    if not config.resume:
        return config, None
    if config.overwrite:
        raise ValueError("--resume continues the run, --overwrite replaces it: pass one of them")
    cls = type(config)
    if given is None:
        given = {f.name for f in fields(cls) if getattr(config, f.name) != f.default}
    path = os.path.join(config.out, CKPT_DIR, LATEST)
    if not os.path.exists(path):
        msg = f"--resume: no complete checkpoint at {path}: start the run without --resume"
        raise FileNotFoundError(msg)
    with open(path) as f:
        meta = json.load(f)
    saved = {f.name: meta["train_config"].get(f.name, f.default) for f in fields(cls)}
    fixed = [k for k in given if k not in INVOCATION + CHANGEABLE]
    if differ := sorted(k for k in fixed if getattr(config, k) != saved[k]):
        flags = ", ".join(
            f"--{k.replace('_', '-')} {getattr(config, k)} (checkpoint: {saved[k]})" for k in differ
        )
        why = "whose shape and optimizer come from its checkpoint"
        fix = "drop these flags to resume it, or start a new run in another --out"
        raise ValueError(f"--resume: {flags} differ from the run in {config.out}, {why}: {fix}")
    chosen = INVOCATION + [k for k in CHANGEABLE if k in given]
    c = cls(**{**saved, **{k: getattr(config, k) for k in chosen}})
    if c.steps < (step := meta["step"]):
        msg = f"--steps {c.steps} is below the checkpoint's step {step} in {c.out}"
        raise ValueError(f"{msg}: pass --steps {step} or more")
    return c, meta


# -----------------------------------------------------------------------------
# the run's inputs: the cache, the GPT that made it, its held-out contexts
def default_cache_missing(path, default):
    """Is `path` the default cache, not built yet (then train.py builds it)? Another is refused."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        return False
    if os.path.normpath(path) != os.path.normpath(default) or dist.is_initialized():
        build = f"python cache.py build --model models/tiny --corpus toy --out {path}"
        raise FileNotFoundError(f"no activation cache at {path}: build one first, e.g. `{build}`")
    return True


def eval_inputs(c, cache, load_gpt, device):
    """The GPT of the spliced loss (a stream's own), refused unless it made the cache (shape and
    weights), and the held-out contexts; (None, None) without evaluation or --model."""
    if c.eval_every <= 0 and not c.model:
        return None, None
    name = c.model or cache.manifest["model"]
    gpt = getattr(cache, "model", None)  # a stream's (cache.ActivationStream): on the device
    gpt = load_gpt(name).to(device) if gpt is None else gpt  # not loaded a second time
    L, d = gpt.config.n_layer, gpt.config.n_embd
    if (L, d) != (cache.n_layers, cache.d_model):
        shapes = f"has L={cache.n_layers}, d={cache.d_model} but the model {name} has L={L}, d={d}"
        raise ValueError(f"the cache {c.cache} {shapes}")
    sha256 = cache.manifest.get("identity", {}).get("model_sha256", "")
    check_same_model(gpt, sha256, f"the cache {c.cache}")
    if c.eval_every <= 0:
        return gpt, None
    bos = load_tokenizer(gpt.name_or_path).eot_token
    return gpt, heldout_contexts(cache, c.eval_contexts, bos).to(device)


def heldout_contexts(cache, n, bos):
    """Whole held-out contexts (n, ctx) from the cache's held-out rows, BOS put back if dropped; a
    stream's are its corpus's first contexts (cache.ActivationStream)."""
    streamed = getattr(cache, "heldout", None)  # (H, ctx): an ActivationStream's
    if streamed is not None:
        if min(n, len(streamed)) == 0:
            raise ValueError("the stream holds out no context: pass --eval-contexts > 0")
        return streamed[:n]
    m = cache.manifest
    lo, hi = cache.split_range("heldout")
    R = m["ctx"] - (0 if m["keep_bos"] else 1)  # consecutive rows per context
    n = min(n, (hi - lo) // R)
    if n == 0:
        msg = f"the cache has no held-out context (heldout rows {lo}..{hi})"
        raise ValueError(f"{msg}: build it with --heldout > 0")
    tokens = cache.read(lo, lo + n * R)[2].view(n, R)  # (n, R) whole contexts (cache.py's layout)
    bos = torch.full((n, 0 if m["keep_bos"] else 1), bos, dtype=torch.long)  # the BOS, if dropped
    return torch.cat([bos, tokens], dim=1)  # (n, ctx)


# -----------------------------------------------------------------------------
# a stream's bookkeeping (cache.ActivationStream): its identity, held-out part, position
def stream_manifest(cfg, model, model_dir, buffer_tokens, heldout):
    """What a stream's run is trained on, checked like a cache's manifest: on every rank before
    anything is built, and on --resume against the checkpoint's (the model's weights among it)."""
    corpus = os.path.realpath(cfg.corpus) if os.path.exists(cfg.corpus) else cfg.corpus
    keys = ("text_field", "seed", "ctx", "keep_bos", "batch_size")
    identity = dict(model_sha256=model.fingerprint(), corpus=corpus, heldout=heldout)
    identity.update(buffer_tokens=buffer_tokens, **{k: getattr(cfg, k) for k in keys})
    return dict(model=model_dir, identity=identity, ctx=cfg.ctx, keep_bos=cfg.keep_bos)


def held_out(pack, enc, cfg, n):
    """A stream's held-out part: the first n contexts of cfg.corpus packed by pack (cache's
    iter_contexts) -> their tokens (n, ctx) int64 and the first document after them."""
    docs = corpora.iter_documents(cfg.corpus, cfg.seed, cfg.text_field)
    held = list(itertools.islice(pack(docs, enc, cfg.ctx), n))
    if len(held) < n:
        few = f"gave {len(held)} contexts of {cfg.ctx - 1} tokens, fewer than the {n} held out"
        fix = "pass a larger corpus or a smaller --eval-contexts"
        raise ValueError(f"corpus {cfg.corpus} {few} for evaluation (--eval-contexts): {fix}")
    tokens = torch.tensor([t.tolist() for t, _ in held], dtype=torch.long).view(-1, cfg.ctx)
    return tokens, int(held[-1][1][-1]) + 1 if held else 0


def stream_start(position, first_doc, mesh):
    """-> (fill, document, token): where this DP rank's stream begins, a checkpoint's position (a
    fill's start, see stream_position) or a new run's: its rank-th document after the held-out."""
    if position is None:
        return 0, first_doc + mesh.dp_rank, 0
    return position["fill"], *position["cursors"][mesh.dp_rank]


def stream_position(stream, step):
    """Where a stream goes on from at global step `step` (every rank calls it at a checkpoint): the
    fill holding that step, each DP rank's cursor (document, token) where that fill began (TP rank 0
    of each group read it), the normalization and the held-out count."""
    f = step // stream.P  # this fill, or the next at the boundary
    cursors = [torch.tensor(stream.starts.get(f, (0, 0)), device=stream.device)]  # this rank's
    if stream.mesh.dp > 1:
        mine = cursors[0]
        cursors = [torch.empty_like(mine) for _ in range(stream.mesh.dp)]
        dist.all_gather(cursors, mine, group=stream.mesh.dp_group)
    cursors = torch.stack(cursors).tolist()  # (dp, 2)
    return dict(fill=f, cursors=cursors, norm=stream.norm.tolist(), heldout=stream.H)


# -----------------------------------------------------------------------------
# what a run refuses
def check_resume(c, meta, world, manifest, device):
    """Every rank has the same flags and cache manifest (all-gathered sha256 digests: all raise); a
    checkpoint resumes on the (dp, tp) mesh that wrote it, on a cache of its training's identity."""
    if dist.is_initialized():
        text = json.dumps([asdict(c), manifest], sort_keys=True).encode()
        digest = torch.tensor(list(hashlib.sha256(text).digest()), device=device)  # (32,)
        digests = [torch.empty_like(digest) for _ in range(world)]
        dist.all_gather(digests, digest)
        if differ := [r for r, other in enumerate(digests) if not torch.equal(other, digests[0])]:
            msg = f"ranks {differ} have another command line or cache than rank 0"
            fix = "run the same command on the same cache (shared, or the same bytes at one path)"
            raise ValueError(f"{msg}: every node must {fix}")
    if meta is None:
        return
    dp, tp = meta["mesh"]
    if dp * tp != world:
        mesh = f"a (dp, tp) = {(dp, tp)} mesh of {dp * tp} processes, this run has {world}"
        tp_size = "load the exported CLT with CrossLayerTranscoder.from_pretrained(path, mesh)"
        fix = f"resume with torchrun --nproc_per_node={dp * tp} (to change the TP size, {tp_size})"
        raise ValueError(f"the checkpoint in {c.out} was written by {mesh}: {fix}")
    saved, now = meta.get("cache_identity"), manifest.get("identity") or {}
    if saved is not None and saved != now:
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        stream = f"--corpus {c.corpus} streamed through {manifest.get('model')}"
        stream = (stream, "data", "that corpus and model")  # a stream's data: corpus x model
        data, what, fix = stream if c.corpus else (f"--cache {c.cache}", "cache", "that cache")
        raise ValueError(
            f"{data} is not the {what} the run in {c.out} was trained on (it differs in "
            f"{differ}): resume with {fix}, or start a new run in another --out"
        )


def check_flags(c, cache, mesh):
    """Flags that cannot work, refused on every rank before anything is written."""
    if c.features <= 0 or c.features % mesh.tp:
        raise ValueError(f"--features {c.features} must be > 0 and divisible by --tp {mesh.tp}")
    if c.activation in ("topk", "batchtopk") and not 0 < c.k <= c.features:
        raise ValueError(f"--k {c.k} must be in 1..--features {c.features}")
    if c.batch_size <= 0 or c.batch_size % mesh.dp:
        raise ValueError(f"--batch-size {c.batch_size} must be > 0 and divisible by dp = {mesh.dp}")
    if c.steps <= 0 or c.lr <= 0 or not 0 <= c.decay_frac <= 1:
        got = f"got {c.steps}, {c.lr}, {c.decay_frac}"
        raise ValueError(f"need --steps > 0, --lr > 0 and 0 <= --decay-frac <= 1, {got}")
    if c.log_every <= 0:
        raise ValueError(f"--log-every {c.log_every} must be positive")
    if c.autocast not in ("cuda", "always", "never"):
        raise ValueError(f"--autocast {c.autocast} must be cuda, always or never")
    if c.corpus and c.cache != type(c).cache:  # --cache given too (not its default)
        raise ValueError("pass --cache (train from a cache) or --corpus (stream), not both")
    if c.corpus and (c.buffer_tokens <= 0 or c.buffer_tokens % (c.batch_size // mesh.dp)):
        rows = f"a positive multiple of each DP rank's batch ({c.batch_size // mesh.dp} rows)"
        raise ValueError(f"--buffer-tokens {c.buffer_tokens} must be {rows}")
    if not c.corpus and cache.batches_per_epoch(c.batch_size // mesh.dp, mesh.dp) == 0:
        lo, hi = cache.split_range("train")
        batch = f"fewer than one global batch of {c.batch_size}"
        raise ValueError(f"the cache's train split has {hi - lo} rows, {batch}")
    if c.wandb and find_spec("wandb") is None:  # rank 0 alone failing would hang the others
        raise ValueError("--wandb needs the wandb package: pip install wandb, or drop --wandb")


def check_finite(m, step, out, terms):
    """At a sync step, before its update and any checkpoint: raise if a step since the last sync had
    a non-finite loss (m["first_bad"], popped)."""
    if (first_bad := m.pop("first_bad")) < 0:
        return
    bad = [l for l, s in enumerate(m["sse"]) if not math.isfinite(s)]
    values = {k: m[k] for k in terms}
    raise FloatingPointError(
        f"non-finite loss {m['loss']} at step {int(first_bad)} (layers {bad or 'none'} have "
        f"a non-finite reconstruction error at step {step}; terms {values}); the last good "
        f"checkpoint is in {os.path.join(out, CKPT_DIR)}: lower --lr or resume from it"
    )


# -----------------------------------------------------------------------------
# the run folder and its checkpoints: one safetensors shard per TP rank + latest.json
def resume_or_claim(c, meta, clt, opt, state, mesh, master, cache):
    """-> (the last metrics, the run's identity: its wandb id, its cache's). Resumed: the
    checkpoint's weights, Adam moments, loop state go into clt, opt, state. New: --out claimed."""
    run_id = (meta or {}).get("wandb_id") or uuid.uuid4().hex[:8]  # resumed: the same wandb run
    ids = dict(wandb_id=run_id if c.wandb else None, cache_identity=cache.manifest.get("identity"))
    if meta is None:
        claim_out(c, master)
        return {}, ids
    tensors = load_file(os.path.join(c.out, CKPT_DIR, meta["dir"], shard_name(mesh)))
    if tensors["since_fired"].shape != state["since_fired"].shape:
        old = "keeps one dead-feature clock per rank (an older train.py)"
        raise ValueError(f"the checkpoint in {c.out} {old}: start a new run in another --out")
    device = state["since_fired"].device
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    clt.load_state_dict(model)
    for name, p in clt.named_parameters():
        prefix = f"optim.{name}."
        moments = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        if moments:  # fused Adam keeps its step count beside the parameter, like the moments
            opt.state[p] = {k: v.to(device) for k, v in moments.items()}
    state.update(step=meta["step"], since_fired=tensors["since_fired"].to(device))
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    return meta.get("metrics", {}), ids


def claim_out(c, master):
    """Refuse an --out holding another run; --overwrite removes its files, latest.json first."""
    os.makedirs(c.out, exist_ok=True)
    latest = os.path.join(c.out, CKPT_DIR, LATEST)
    found = [p for p in (latest, os.path.join(c.out, "config.json")) if os.path.exists(p)]
    if found and not c.overwrite:
        fix = "pass --resume to continue it, another --out, or --overwrite to replace it"
        raise ValueError(f"{c.out} holds a run ({found[0]}): {fix}")
    if found and master:
        if os.path.exists(latest):
            os.remove(latest)  # from here on nothing can resume the old run
        shutil.rmtree(os.path.join(c.out, CKPT_DIR), ignore_errors=True)  # if there is one
        for name in os.listdir(c.out):
            layer = name.startswith(("W_enc_", "W_dec_")) and name.endswith(".safetensors")
            if name in RUN_FILES or layer:
                os.remove(os.path.join(c.out, name))
        fsync_dir(c.out)
    barrier()  # no rank starts before the old run is gone


def shard_name(mesh):
    return f"tp{mesh.tp_rank}-mesh{mesh.dp}x{mesh.tp}.safetensors"


def save(c, clt, opt, state, mesh, source, extra):
    """TP ranks of DP replica 0 write their shards, then rank 0 latest.json (with `extra`, and the
    position of a stream `source`), then removes the older step directories: a good checkpoint is
    always on disk."""
    stream = stream_position(source, state["step"]) if c.corpus else None  # on every rank
    master = mesh.dp_rank == 0 and mesh.tp_rank == 0  # global rank 0 (parallel.make_mesh)
    root = os.path.join(c.out, CKPT_DIR)
    step_dir = os.path.join(root, f"step_{state['step']:06d}")
    if mesh.dp_rank == 0:  # the DP replicas hold identical copies
        os.makedirs(step_dir, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in clt.state_dict().items()}
        for name, p in clt.named_parameters():
            tensors.update({f"optim.{name}.{k}": v for k, v in opt.state.get(p, {}).items()})
        tensors["since_fired"] = state["since_fired"]  # (L, F) every feature's clock, on every rank
        tensors = {k: v.cpu() for k, v in tensors.items()}
        save_safetensors(os.path.join(step_dir, shard_name(mesh)), tensors)
    barrier()
    if master:
        metrics = os.path.join(c.out, "metrics.jsonl")
        if os.path.exists(metrics):  # its rows up to this step become durable with the checkpoint
            with open(metrics, "a") as f:
                os.fsync(f.fileno())
        data = dict(next_step=state["step"], global_batch=c.batch_size, seed=c.seed)
        meta = dict(step=state["step"], mesh=[mesh.dp, mesh.tp], dir=os.path.basename(step_dir))
        meta.update(train_config=asdict(c), clt_config=asdict(clt.config))
        meta.update(rng=torch.get_rng_state().tolist(), data=data, **extra)
        if stream is not None:
            meta["stream"] = stream
        write_json(os.path.join(root, LATEST), meta, indent=None)
        for name in os.listdir(root):
            if name.startswith("step_") and name != meta["dir"]:
                shutil.rmtree(os.path.join(root, name))
    barrier()  # every rank returns only once the checkpoint is complete


# -----------------------------------------------------------------------------
# the export: circuit-tracer's layout, training.json written last as its completion mark
def finish(c, clt, metrics, meta, end, mesh, master):
    """At the last step: export the consolidated CLT (every TP rank takes part), then training.json
    naming its export id and step. Run with no step left, a whole export is only reported."""
    if end < c.steps:
        return
    if end <= (meta or {}).get("step", 0) and export_is_whole(c, clt, mesh):
        if master:
            whole = f"is complete (step {c.steps}) and its export is whole: nothing to do"
            print(f"the run in {c.out} {whole}")
        return
    full = clt.consolidated()
    if master:
        full.save_pretrained(c.out)
        export_id = read_clt_config(c.out, type(clt.config))[1]
        done = dict(step=c.steps, export_id=export_id, train_config=asdict(c), final=metrics)
        write_json(os.path.join(c.out, "training.json"), done)
        kind = "CLT" if c.decoder == "cross-layer" else "per-layer transcoder"
        line = f": {step_line(metrics)}" if metrics else ""
        print(f"saved the {kind} to {c.out}{line}", flush=True)
    barrier()


def export_is_whole(c, clt, mesh):
    """Is --out's export this run's (training.json: export id, step) and whole (from_pretrained)?"""
    try:
        with open(os.path.join(c.out, "training.json")) as f:
            done = json.load(f)
        export_id = read_clt_config(c.out, type(clt.config))[1]
        type(clt).from_pretrained(c.out, mesh)
    except (FileNotFoundError, ValueError):  # a JSONDecodeError is a ValueError
        return False
    ours = export_id is not None and done.get("export_id") == export_id
    return ours and done.get("step") == c.steps


@contextlib.contextmanager
def explained_timeouts(timeout_s):
    """A collective's timeout (gloo: "Timed out waiting ...", NCCL: "timeout"), explained."""
    try:
        yield
    except RuntimeError as e:
        if not any(w in str(e).lower() for w in ("timed out", "timeout")):
            raise
        waited = f"a collective waited longer than --timeout-s {timeout_s}"
        why = "another rank crashed or is stuck (torchrun names it below)"
        raise RuntimeError(f"rank {os.environ.get('RANK', 0)}: {waited}: {why}") from e

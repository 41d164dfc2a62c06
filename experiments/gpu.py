"""
experiments/gpu.py: the script to run whenever a GPU is lent, the GPU path in one run of at most 8
minutes: cache.py on CUDA at GPT-2-small shape (tokens/s, peak CUDA memory), train.py with bf16
autocast and in fp32 over 200 steps from the same seed on the same batches (the largest loss gap in
units of the fp32 curve's step-to-step noise, the median |loss[t] - loss[t-1]|; step time; MFU = the
step's matmul FLOPs / step time / the GPU's dense bf16 peak, --peak-tflops or PEAK_TFLOPS by device
name), the bf16 run's first 20 steps under `torchrun --nproc_per_node=1` with NCCL (its losses
against the in-process ones), train.py's step alone against matmul, and graph.py (capped) and
interp.py on CUDA with a random CLT.

Every part runs in a fresh process (spawned), killed at the end of the budget, so a part that fails
(a CUDA error spoils its process) or hangs (an NCCL wait) is one row with its error and the parts
after it still run; no part starts in the last minute of --budget-s (480 s). Parts that need an
earlier one's output (the cache, the bf16 curve) fail or say so in their own rows when it is
missing. The rows so far are in <out>/gpu_partial.json after every part, the loss curves in
<out>/gpu_curves.json. Without a GPU its rows are unmeasured: on a CPU it runs at the tiny shape
only as a test of itself (train.py --autocast always puts bf16 on the CPU, torchrun uses gloo).

    python experiments/gpu.py --out runs/bench 2> runs/gpu.log   # the table; runs/bench/gpu.json
    python experiments/gpu.py --device cpu --quick               # every part, tiny shape (~2 min)
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, fields, replace
from importlib.util import find_spec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from experiments.common import (
    GPT2_SMALL_SHAPE,
    ROOT,
    TINY_SHAPE,
    Bench,
    GiB,
    free_port,
    fresh_process,
    hf_random_model_dir,
    peak_bytes,
    random_model_dir,
    run_study,
    set_threads,
    synthetic_corpus,
)
from experiments.scale import SCALE_PROMPT, scale_cache, scale_graph, scale_interp
from experiments.train import clt_matmuls, step_vs_matmul
from forge.cli import arg, run_main
from forge.files import write_json

QUICK_GPU = dict(  # --quick: the tiny shape and these sizes, where not given (tokens: / 4)
    gpu_features=256, gpu_batch=256, gpu_steps=20, gpu_torchrun_steps=5, gpu_max_features=64
)
PART_MIN_S = 60  # no part starts with less of the budget left

# Dense bf16 tensor-core peaks in TFLOP/s, first match in torch.cuda.get_device_name(): NVIDIA's
# datasheets give twice these, "with sparsity" (H200 and H100 SXM: 1,979; H100 PCIe: 1,513;
# A100: 624).
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


@dataclass
class GpuBench(Bench):
    """the GPU path in 8 minutes: cache, bf16 vs fp32 training, torchrun + NCCL, graph, interp"""

    gpu_tokens: int = arg(
        65_536,
        "tokens in the GPT-2-small-shape cache (--quick: a quarter, the tiny shape, QUICK_GPU's "
        "sizes)",
    )
    gpu_features: int = arg(3072, "CLT features per layer: training, graph, interp")
    gpu_batch: int = arg(4096, "tokens per training step")
    gpu_steps: int = arg(200, "training steps of the bf16 run and of the fp32 run")
    gpu_torchrun_steps: int = arg(
        20, "steps of the torchrun run, compared with the bf16 run's first steps"
    )
    gpu_max_features: int = arg(256, "graph.py --max-features of the capped graph")
    peak_tflops: float = arg(
        0.0, "the GPU's dense bf16 peak for MFU, TFLOP/s; 0 = PEAK_TFLOPS by GPU name (H200: 989)"
    )
    budget_s: float = arg(
        480.0,
        "wall-time budget: no part starts in its last 60 s, a running part is killed at its end",
    )


def run(cfg):
    """One row per part, a failure or a skip in its own row; the loss curves (bf16, fp32, torchrun)
    go to <out>/gpu_curves.json."""
    deadline = time.time() + cfg.budget_s
    if cfg.quick:  # the quick sizes for the flags left at their defaults
        default = GpuBench()
        cfg = replace(
            cfg, **{k: v for k, v in QUICK_GPU.items() if getattr(cfg, k) == getattr(default, k)}
        )
    shape = TINY_SHAPE if cfg.quick else GPT2_SMALL_SHAPE
    # absolute: torchrun's train.py runs from ROOT
    root = os.path.abspath(os.path.join(cfg.out, "gpu"))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    parts = GpuParts(deadline, os.path.join(cfg.out, "gpu_partial.json"))
    model_dir, cache_dir, peak = gpu_prepare(parts, cfg, shape, root)
    curves = gpu_training(parts, cfg, shape, root, cache_dir, peak)
    gpu_launch(parts, cfg, shape, root, cache_dir, peak, curves)
    write_json(os.path.join(cfg.out, "gpu_curves.json"), curves)
    gpu_attribution(parts, cfg, root, model_dir, cache_dir)
    shutil.rmtree(root)
    return parts.rows


class GpuParts:
    """gpu.py's rows, and its runner of parts: each in a fresh process, killed at the deadline;
    a part that fails or is skipped leaves a row that says so, and the run goes on."""

    def __init__(self, deadline, partial, min_left=PART_MIN_S):
        self.deadline = deadline  # time.time() at the end of --budget-s
        self.partial = (
            partial  # the rows so far, rewritten after each row: what a kill from outside leaves
        )
        self.min_left = min_left  # seconds of the budget a part needs left to start
        self.rows = []
        self.spent = {}  # part -> wall seconds of its process, start-up included

    def row(self, part, setting, time_s="-", rate="-", GiB_peak="-", note="", status="ok"):
        spent = self.spent.get(part, "-")
        row = dict(
            part=part, status=status, setting=setting, time_s=time_s, rate=rate, GiB_peak=GiB_peak
        )
        self.rows.append(dict(row, part_s=spent, note=note))
        print(self.rows[-1], flush=True)
        write_json(self.partial, self.rows)

    def run(self, part, setting, fn, *args):
        """fn(*args) in a fresh process -> its result, or None after a row saying why not."""
        from concurrent.futures.process import BrokenProcessPool

        left = self.deadline - time.time()
        if left < self.min_left:
            self.row(part, setting, status=f"skipped: {max(left, 0):.0f} s of --budget-s left")
            return None
        t0 = time.perf_counter()
        result = None
        status = "error: no result"
        try:  # any failure is this part's row, not the end of the run: the other parts still run
            result = fresh_process(fn, *args, timeout=left)
        except BrokenProcessPool:
            waited = time.perf_counter() - t0
            killed = waited >= left - 1
            why = (
                "killed at the end of --budget-s"
                if killed
                else "its process died (a signal, out of memory?)"
            )
            status = f"error: {why} after {waited:.0f} s"
        except Exception as e:
            # with the part's own: the pool chains it
            traceback.print_exception(type(e), e, e.__traceback__)
            status = "error: " + f"{type(e).__name__}: {e}".splitlines()[0][:300]
        self.spent[part] = round(time.perf_counter() - t0, 1)
        if result is None:
            self.row(part, setting, status=status)
        return result


# -----------------------------------------------------------------------------
# the parts


def gpu_prepare(parts, cfg, shape, root):
    """The machine, the random GPT-2 and its cache -> (model dir, cache dir, bf16 peak or None)."""
    model_dir = os.path.join(root, "model")
    cache_dir = os.path.join(root, "cache")
    setting = f"random GPT-2, {shape['n_layer']} x {shape['n_embd']}, vocab {shape['vocab_size']}"
    machine = parts.run("machine and model", setting, gpu_setup, model_dir, shape, cfg.device)
    peak = cfg.peak_tflops or None
    if machine is not None:
        peak = peak or next((v for k, v in PEAK_TFLOPS.items() if k in machine["name"]), None)
        versions = f"torch {machine['torch']}, CUDA {machine['cuda']}, NCCL {machine['nccl']}"
        parts.row(
            "machine and model",
            f"{machine['name']}; {setting}",
            rate=f"bf16 peak {peak:g} TFLOP/s" if peak else "no bf16 peak: pass --peak-tflops",
            note=f"{versions}, {machine['cpus']} CPUs; model: {machine['made']}",
        )
    corpus = synthetic_corpus(os.path.join(root, "corpus.txt"), 4000)
    setting = f"{cfg.gpu_tokens} tokens, int8, 64 x 64 per forward, {cfg.device}"
    args = (model_dir, corpus, cache_dir, cfg.gpu_tokens, cfg.threads, cfg.device)
    r = parts.run("cache build", setting, scale_cache, *args)
    if r is not None:
        cuda = r["cuda_peak"] is not None
        what = f"CUDA allocator peak; peak RSS {r['peak']:.2f} GiB" if cuda else "peak RSS"
        parts.row(
            "cache build",
            setting,
            r["seconds"],
            f"{r['tokens'] / r['seconds']:.0f} tok/s",
            r["cuda_peak"] if cuda else r["peak"],
            f"{what}; model {r['model']:.2f} GiB + one batch's mlp_in/out {r['acts']:.2f} GiB; "
            f"{r['shards']} shards",
        )
    return model_dir, cache_dir, peak


def gpu_training(parts, cfg, shape, root, cache_dir, peak):
    """train.py with bf16 autocast and in fp32, and their loss curves compared: -> the curves."""
    setting = (
        f"L{shape['n_layer']} d{shape['n_embd']} F{cfg.gpu_features}, {cfg.gpu_batch} tokens/step, "
    )
    setting += f"{cfg.gpu_steps} steps"
    curves = {}
    for name, autocast in (("bf16", "always"), ("fp32", "never")):
        part = f"train.py {name}" + (" autocast" if name == "bf16" else "")
        out = os.path.join(root, f"train_{name}")
        r = parts.run(part, setting, gpu_train, cache_dir, out, cfg, autocast)
        if r is None:
            continue
        curves[name] = r["loss"]
        s = r["ms"] / 1e3
        rate = f"{cfg.gpu_batch / s:.0f} tok/s, {mfu_text(step_flops(cfg, shape), s, peak)}"
        note = (
            f"median step after 10; last loss {r['loss'][-1]:.5g}, FVU {r['fvu']:.3f}, "
            f"L0 {r['l0']:.1f}; run {r['seconds']:.0f} s with start-up, checkpoint, export; every "
            "step logged (a host sync each)"
        )
        parts.row(part, setting, s, rate, r["peak"], note)
    if len(curves) < 2:
        parts.row("bf16 vs fp32 loss", "-", status="skipped: needs both runs")
        return curves
    gap, noise = loss_gap(curves["bf16"], curves["fp32"])
    verdict = "within" if gap <= noise else "beyond"
    ratio = gap / noise if noise > 0 else math.inf
    parts.row(
        "bf16 vs fp32 loss",
        f"same seed and batches, {cfg.gpu_steps} steps",
        rate=f"max |Δ| = {ratio:.3g} x noise",
        note=f"{verdict} noise: max |Δ| {gap:.4g}; noise {noise:.4g} = median |Δ| between "
        f"consecutive fp32 steps; last {curves['bf16'][-1]:.6g} vs {curves['fp32'][-1]:.6g}",
    )
    return curves


def gpu_launch(parts, cfg, shape, root, cache_dir, peak, curves):
    """The bf16 run's first steps under torchrun (NCCL), against the in-process run; the step alone
    vs matmul."""
    backend = "nccl" if str(cfg.device).startswith("cuda") else "gloo"
    steps = cfg.gpu_torchrun_steps
    setting = f"torchrun --nproc_per_node=1, {backend}, first {steps} steps of the bf16 run"
    out = os.path.join(root, "torchrun")
    r = parts.run("torchrun", setting, gpu_torchrun, cache_dir, out, cfg, parts.deadline)
    if r is not None:
        curves["torchrun"] = r["loss"]
        seen = f"NCCL {r['nccl']} started" if r["nccl"] else "no NCCL version line in its log"
        rate = "-"
        note = f"no bf16 run to compare with; {seen}"
        if "bf16" in curves:
            n = len(r["loss"])
            rel = max(abs(a - b) / abs(b) for a, b in zip(r["loss"], curves["bf16"][:n]))
            rate = f"max rel |Δloss| {rel:.2g} vs in-process"
            note = (
                "equal (<= 1e-5)" if rel <= 1e-5 else "DIFFERS (> 1e-5)"
            ) + f" over {n} steps; {seen}"
        parts.row("torchrun", setting, r["seconds"], rate, note=note)
    L = shape["n_layer"]
    d = shape["n_embd"]
    setting = f"L{L} d{d} F{cfg.gpu_features} B{cfg.gpu_batch}, jumprelu"
    args = ("gpu", L, d, cfg.gpu_features, cfg.gpu_batch, "jumprelu", cfg.device, 5)
    r = parts.run("train step alone", setting, step_vs_matmul, *args)
    if r is not None:
        s = r["ms"] / 1e3
        rate = f"{r['detail']}; {mfu_text(step_flops(cfg, shape), s, peak)}"
        note = (
            f"{r['ratio']:.0%} of the same-run matmul FLOP rate (train.train_step on a fixed "
            "batch: no loader)"
        )
        parts.row("train step alone", setting, s, rate, note=note)


def gpu_attribution(parts, cfg, root, model_dir, cache_dir):
    """graph.py (capped) and interp.py on the device with one random CLT of ~1 % density (made by
    the first of the two parts that runs)."""
    clt_dir = os.path.join(root, "clt")
    F = cfg.gpu_features
    setting = f"{SCALE_PROMPT!r}, --max-features {cfg.gpu_max_features}"
    args = (model_dir, cache_dir, clt_dir, F, cfg.gpu_max_features, cfg.threads, cfg.device)
    r = parts.run("graph.py", setting, scale_graph, *args)
    if r is not None:
        done = (
            f"{r['tokens']} tokens, {r['n_active']} active, --max-features {cfg.gpu_max_features}"
        )
        kept = f"{r['kept']} features kept"
        peak_row(parts, "graph.py", done, r, kept, "replacement + attribution + pruning")
    setting = f"cache of {cfg.gpu_tokens} tokens, {F} features per layer"
    args = (model_dir, cache_dir, clt_dir, os.path.join(root, "interp"), F, cfg.threads, cfg.device)
    r = parts.run("interp.py", setting, scale_interp, *args)
    if r is not None:
        done = f"{r['tokens']} tokens, {r['features']} features"
        rate = f"{r['tokens'] / r['seconds']:.0f} tok/s"
        peak_row(parts, "interp.py", done, r, rate, "both passes")


def peak_row(parts, part, setting, r, rate, note):
    """A part's row with its peak: the CUDA allocator's on a GPU, else the RSS above its inputs."""
    cuda = r["cuda_peak"] is not None
    peak = r["cuda_peak"] if cuda else r["above"]
    what = "CUDA allocator peak" if cuda else "peak RSS above the loaded inputs"
    parts.row(part, setting, r["seconds"], rate, peak, f"{note}; {what}")


# -----------------------------------------------------------------------------
# what the parts run, each in its own process


def gpu_setup(path, shape, device):
    """What the parts run on (the device's name, torch, CUDA and NCCL versions, CPUs) and the random
    GPT-2 they share, in `path` (gpu_model_dir)."""
    cuda = str(device).startswith("cuda")
    nccl = torch.cuda.nccl.version() if cuda else None  # a tuple in recent torch, an int before
    return dict(
        name=torch.cuda.get_device_name(device) if cuda else "cpu",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        cpus=os.cpu_count(),
        made=gpu_model_dir(path, shape),
    )


def gpu_model_dir(path, shape):
    """A random GPT-2 of `shape` in the hub layout with a byte-level tokenizer, no download: made by
    transformers (as experiments/scale.py makes it), or by random_model_dir (GPT's init) where
    transformers is not installed or fails. -> which of the two made it, and why."""
    why = "transformers is not installed"
    if find_spec("transformers") is not None:
        # a GPU session may be the only one: an init that is not what is measured must not end it
        try:
            hf_random_model_dir(path, **shape)
            return "transformers init"
        except Exception as e:
            why = f"transformers failed: {type(e).__name__}: {e}".splitlines()[0][:200]
            shutil.rmtree(path, ignore_errors=True)
    random_model_dir(path, **shape)
    return f"GPT init ({why})"


def gpu_train_config(cache_dir, out, cfg, autocast, stop_at=-1):
    """The training run every train part makes: every step logged, no evaluation, one checkpoint at
    the end."""
    import train

    return train.TrainConfig(
        cache=cache_dir,
        out=out,
        features=cfg.gpu_features,
        batch_size=cfg.gpu_batch,
        steps=cfg.gpu_steps,
        eval_every=-1,
        log_every=1,
        ckpt_every=-1,
        autocast=autocast,
        device=cfg.device,
        stop_at=stop_at,
        timeout_s=60,
        overwrite=True,
    )


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def gpu_train(cache_dir, out, cfg, autocast):
    """train.py in this process: -> the loss curve, the median step time after the first 10 steps,
    the peak memory (CUDA allocator's, else RSS), the last step's FVU and L0. The run's files are
    removed."""
    import train

    set_threads(cfg.threads)
    t0 = time.perf_counter()
    last = train.train(gpu_train_config(cache_dir, out, cfg, autocast))
    seconds = time.perf_counter() - t0
    rows = read_metrics(out)
    shutil.rmtree(out)  # a 3072-feature GPT-2-small CLT's checkpoint and export: 4 GB
    return dict(
        loss=[r["loss"] for r in rows],
        ms=float(np.median([r["ms"] for r in rows[10:]])),
        seconds=seconds,
        peak=peak_bytes(cfg.device) / GiB,
        fvu=float(np.mean(last["fvu"])),
        l0=float(np.mean(last["l0"])),
    )


def config_argv(config):
    """The command line that gives dataclass `config`: a flag per field not at its default."""
    argv = []
    for f in fields(config):
        value = getattr(config, f.name)
        flag = f.name.replace("_", "-")
        if value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def gpu_torchrun(cache_dir, out, cfg, deadline):
    """The bf16 run's first gpu_torchrun_steps under `torchrun --nproc_per_node=1` (NCCL on CUDA,
    gloo on a CPU), ended by --stop-at so the schedules match: -> its losses, wall seconds, the NCCL
    version its log names (NCCL_DEBUG=VERSION; None when NCCL never started). Killed with its
    workers before the deadline."""
    c = gpu_train_config(cache_dir, out, cfg, "always", stop_at=cfg.gpu_torchrun_steps)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1"]
    cmd += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    cmd += [os.path.join(ROOT, "train.py"), *config_argv(c)]
    env = dict(os.environ, NCCL_DEBUG="VERSION")  # NCCL prints "NCCL version X" once it starts
    t0 = time.perf_counter()
    # its own session: on a timeout the launcher and its worker are killed together
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = p.communicate(timeout=max(1.0, deadline - time.time() - 5))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise TimeoutError(
            f"torchrun ran past the budget: killed after {time.perf_counter() - t0:.0f} s"
        )
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(
            f"torchrun exited with {p.returncode}: " + " / ".join(log.strip().splitlines()[-3:])
        )
    nccl = [
        line.split("NCCL version", 1)[1].split()[0]
        for line in log.splitlines()
        if "NCCL version" in line
    ]
    losses = [r["loss"] for r in read_metrics(out)]
    shutil.rmtree(out)
    return dict(loss=losses, seconds=seconds, nccl=nccl[0] if nccl else None)


def loss_gap(curve, reference):
    """max_t |curve[t] - reference[t]| over the shared steps, and the reference's step-to-step
    noise: the median |reference[t] - reference[t - 1]| (every step sees a new batch, so consecutive
    losses differ by batch-to-batch variation, plus the trend)."""
    n = min(len(curve), len(reference))
    gap = np.abs(np.array(curve[:n]) - np.array(reference[:n]))
    return float(gap.max()), float(np.median(np.abs(np.diff(reference))))


def step_flops(cfg, shape):
    """Matmul FLOPs of one training step at the run's shape (clt_matmuls: what experiments/train.py
    counts)."""
    shapes = clt_matmuls(cfg.gpu_batch, shape["n_layer"], shape["n_embd"], cfg.gpu_features)
    return sum(2 * m * k * n for m, k, n in shapes)


def mfu_text(flops, seconds, peak):
    return f"MFU {flops / seconds / (peak * 1e12):.1%}" if peak else "MFU - (no peak)"


def main(argv=None):
    return run_study(__doc__, "gpu", run, GpuBench, argv)


if __name__ == "__main__":
    run_main(main)

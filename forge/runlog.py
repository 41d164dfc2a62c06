"""train.py's log: the start line, metrics.jsonl, Weights & Biases (optional) and the progress bar.

metrics.jsonl gets a row every --log-every steps and at every evaluation and checkpoint: the loop's
only host syncs. --wandb PROJECT sends the same rows (per-layer lists as fvu/0, fvu/1, ...; the
evaluation as eval/...) into the run id the checkpoint keeps (offline: `wandb sync OUT/wandb/*`).
"""

import json
import os
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from forge.files import atomic_path


def to_host(tensors):
    """{name: tensor} -> {name: float or list}, in one device-to-host copy: a step's sync point."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors.values()]).cpu()
    pieces = flat.split([t.numel() for t in tensors.values()])
    return {name: v.view(t.shape).tolist() for (name, t), v in zip(tensors.items(), pieces)}


def step_line(m):
    """The progress bar's postfix: one line, fields split by |."""
    fvu, l0 = (sum(m[k]) / len(m[k]) for k in ("fvu", "l0"))  # means over the layers
    line = f"loss {m['loss']:.4f} | fvu {fvu:.3f} | l0 {l0:.1f} | dead {int(sum(m['dead']))} | "
    line += f"gnorm {m['grad_norm']:.2f} | lr {m['lr']:.2e} | {m['ms']:.0f} ms | "
    line += f"{m['tok_per_s']:.0f} tok/s"
    if e := m.get("eval"):
        line += f" | recovered {e['recovered']:.3f} | dCE {e['delta_ce']:.4f}"
        line += f" | KL {e['kl_spliced']:.4f}"
    return line


class DummyWandb:  # what the log calls on a wandb run, doing nothing: without --wandb
    def log(self, row, step=None):
        pass

    def finish(self):
        pass


def flat_row(m, prefix=""):
    """A metrics row as wandb's flat keys: per-layer lists as fvu/0, fvu/1, ...; eval as eval/..."""
    row = {}
    for k, v in m.items():
        v = dict(enumerate(v)) if isinstance(v, list) else v
        row.update(flat_row(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return row


class RunLog:
    """Written by rank 0 (the other ranks only keep the clock). A resumed run keeps the rows of the
    steps before its checkpoint (a torn last line, from a kill mid-write, goes: its step reruns)."""

    def __init__(self, c, run_id, start, end, mesh, device):
        self.path = os.path.join(c.out, "metrics.jsonl")
        self.master = mesh.dp_rank == 0 and mesh.tp_rank == 0  # global rank 0
        self.tokens = c.batch_size
        self.device = device
        self.wandb = DummyWandb()
        if self.master:
            where = f"world {mesh.dp * mesh.tp} = dp {mesh.dp} x tp {mesh.tp} | device {device}"
            print(f"train.py | {where} | {asdict(c)}")
            if c.wandb:
                import wandb  # only when asked: wandb is optional

                run = dict(project=c.wandb, id=run_id, resume="allow", config=asdict(c), dir=c.out)
                self.wandb = wandb.init(**run)
            kept = []
            if start > 0 and os.path.exists(self.path):
                with open(self.path) as f:  # whole lines only
                    kept = [ln for ln in f if ln.endswith("\n") and json.loads(ln)["step"] < start]
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.writelines(kept)
        steps = range(start, end)  # this invocation's; the bar shows the ETA, the last row's line
        self.bar = tqdm(steps, initial=start, total=c.steps, disable=not self.master, desc="train")
        self.lap(start)

    def lap(self, done):
        """Restart the clock: the next row's time per step counts from here, `done` steps in."""
        self.t_last = time.perf_counter()
        self.done = done

    def timed(self, m, step):
        """m with its step and the time per step since the last lap (ms, tok/s), CUDA synced."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - self.t_last) / (step + 1 - self.done)
        return dict(m, step=step, ms=1000 * dt, tok_per_s=self.tokens / dt)

    def log(self, m):
        """One row: the metrics m without the per-layer error sums (sse); the bar's postfix."""
        self.bar.set_postfix_str(step_line(m), refresh=False)
        if self.master:
            row = {k: v for k, v in m.items() if k != "sse"}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.wandb.log(flat_row(row), step=m["step"])

    def finish(self):
        self.wandb.finish()

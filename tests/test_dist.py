"""Tensor and data parallelism of train.py with real processes: torchrun, gloo, CPU.

Each test compares a multi-process run against single-process training from the same seed and data:
per-step losses and gradient norms, the exported (consolidated) weights, and the gradients themselves.
Run as a script, this file is the torchrun worker: `torchrun --nproc_per_node=2 tests/test_dist.py tasks.json`.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import train as T
from experiments.common import free_port
from test_train import config, read_metrics, small_cache  # noqa: F401 (small_cache is a fixture)
from clt import CLTConfig, CrossLayerTranscoder
from forge.cli import parse_config
from parallel import Mesh, compute_init, make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5


def argv(cache, out, **kw):
    """train.py flags of test_train.config(...), for the workers."""
    c = config(cache, out, **kw)
    flags = []
    for k, v in vars(c).items():
        if isinstance(v, bool):
            flags += [f"--{k.replace('_', '-')}"] if v else []
        else:
            flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


def launcher(flags, tasks, root, name):
    """A torchrun launcher (torch.distributed.run with `flags`) running this file's worker on `tasks`."""
    path = os.path.join(root, f"tasks_{name}.json")
    with open(path, "w") as f:
        json.dump(tasks, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", *flags, __file__, path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env
    )


def torchrun(nproc, tasks, root, timeout=300):
    """One machine, nproc processes: -> (returncode, stdout, stderr)."""
    p = launcher(["--standalone", f"--nproc_per_node={nproc}"], tasks, root, f"{nproc}")
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


# -----------------------------------------------------------------------------
# the worker (run by torchrun)


def batch(seed, B=64, L=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, d, generator=g), torch.randn(B, L, d, generator=g) * 0.3


class KeepGradients:
    """An optimizer that keeps the gradients it is given (after train_step's clip) instead of stepping."""

    def __init__(self, clt):
        self.clt, self.param_groups, self.grads = clt, [{}], None

    def step(self):
        self.grads = {
            n: p.grad.clone() for n, p in self.clt.named_parameters() if p.grad is not None
        }

    def zero_grad(self, set_to_none=True):
        pass


def gradients(activation, mesh, seed=0, clip=0.5):
    """train_step's loss + backward + DP averaging + bookkeeping + clipping on a fixed batch:
    this rank's gradients as the optimizer gets them, and the global norm."""
    cfg = T.TrainConfig(
        activation=activation,
        k=4,
        sparsity=0.3,
        preact=0.01,
        aux_k=6,
        steps=10,
        batch_size=64,
        dead_tokens=1,
        grad_clip=clip,
    )
    clt = CrossLayerTranscoder(CLTConfig(2, 16, 64, activation, k=4), seed, mesh)
    x, y = batch(seed)
    # this DP rank's share
    rows = slice(mesh.dp_rank * 64 // mesh.dp, (mesh.dp_rank + 1) * 64 // mesh.dp)
    since_fired = torch.zeros(2, 64, dtype=torch.long)
    since_fired[:, ::3] = 1  # every third feature counts as dead (AuxK)
    state = dict(step=5, since_fired=since_fired, first_bad=torch.tensor(-1))
    opt = KeepGradients(clt)
    m = T.train_step(cfg, clt, opt, (x[rows], y[rows]), state, mesh, torch.device("cpu"))
    return opt.grads, torch.tensor(m["grad_norm"], dtype=torch.float32)


def count_collectives(activation, mesh, steps=3):
    """Collectives per train_step between log steps, by name, with AuxK active (dead features exist)."""
    cfg = T.TrainConfig(
        activation=activation, k=4, features=64, batch_size=64, steps=100, dead_tokens=64
    )
    clt = CrossLayerTranscoder(CLTConfig(2, 16, 64, activation, k=4), 0, mesh)
    opt = T.optimizer(clt, cfg)
    state = dict(
        step=10, since_fired=torch.zeros(2, 64, dtype=torch.long), first_bad=torch.tensor(-1)
    )
    state["since_fired"][:, ::3] = 1000  # every third feature is dead
    x, y = batch(0)
    rows = slice(mesh.dp_rank * 64 // mesh.dp, (mesh.dp_rank + 1) * 64 // mesh.dp)
    counts = {}
    originals = {
        name: getattr(torch.distributed, name) for name in ("all_reduce", "all_gather", "broadcast")
    }

    def counting(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(torch.distributed, name, counting(name))
    try:
        for _ in range(steps):
            T.train_step(
                cfg, clt, opt, (x[rows], y[rows]), state, mesh, torch.device("cpu"), sync=False
            )
    finally:
        for name, fn in originals.items():
            setattr(torch.distributed, name, fn)
    return {k: v / steps for k, v in counts.items()}


def worker(tasks_path):
    with open(tasks_path) as f:
        tasks = json.load(f)
    rank = int(os.environ["RANK"])
    for task in tasks:
        kind = task["kind"]
        if kind == "train":
            T.train(*T.parse_args(task["argv"]))
        elif kind == "mismatch":  # rank 1 was given another --lr: every rank must refuse, naming it
            try:
                T.train(*T.parse_args(task["argv"] + (["--lr", "0.002"] if rank == 1 else [])))
            except ValueError as e:
                with open(task["out"].format(rank=rank), "w") as f:
                    f.write(str(e))
        elif kind == "stall":
            if rank == 1:
                cfg = parse_config(T.__doc__, T.TrainConfig, task["argv"])
                compute_init(cfg.device, cfg.timeout_s)
                time.sleep(60)
            T.main(task["argv"])
        else:
            ddp, rank, _, world, device = compute_init("cpu")
            mesh = make_mesh(ddp, world, task["tp"], device)
            if kind == "grads":
                grads, norm = gradients(task["activation"], mesh)
                save_file({**grads, "norm": norm.view(1)}, task["out"].format(rank=rank))
            elif kind == "collectives":
                counts = count_collectives(task["activation"], mesh)
                if rank == 0:
                    with open(task["out"], "w") as f:
                        json.dump(counts, f)
            elif kind == "reshard":  # the export, loaded at this TP size: outputs on a fixed input
                clt = CrossLayerTranscoder.from_pretrained(task["path"], mesh)
                acts, out = clt(batch(7)[0] * 4)
                if rank == 0:
                    save_file({"out": out}, task["out"])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def runs(small_cache, tmp_path_factory):  # noqa: F811
    """The 2-process runs (TP=2 and DP=2) in one torchrun launch, and their single-process references."""
    root = str(tmp_path_factory.mktemp("dist"))

    def p(name):
        return os.path.join(root, name)

    def train(out, **kw):
        return dict(kind="train", argv=argv(small_cache, p(out), **kw))

    bt = dict(activation="batchtopk", k=4)
    plt = dict(decoder="per-layer", skip=True)
    tasks = [
        train("tp2", tp=2),
        train("tp2_bt", tp=2, **bt),
        train("tp2_plt", tp=2, **plt),
        train("dp2"),
        train("tp2_cut", tp=2, stop_at=10),
        train("tp2_cut", tp=2, resume=True),
        dict(kind="reshard", tp=2, path=p("tp2"), out=p("reshard.safetensors")),
    ]
    tasks += [
        dict(kind="grads", tp=tp, activation=a, out=p(f"grads_{a}_tp{tp}_{{rank}}.safetensors"))
        for a in ("jumprelu", "topk")
        for tp in (1, 2)
    ]
    tasks += [
        dict(kind="collectives", tp=tp, activation=a, out=p(f"collectives_{a}_tp{tp}.json"))
        for a in ("jumprelu", "topk")
        for tp in (1, 2)
    ]
    tasks += [
        dict(kind="mismatch", argv=argv(small_cache, p("mismatch")), out=p("mismatch_{rank}.txt"))
    ]
    rc, out, err = torchrun(2, tasks, root)
    assert rc == 0, out[-2000:] + err[-4000:]
    T.train(config(small_cache, p("ref")))
    T.train(config(small_cache, p("ref_bt"), **bt))
    T.train(config(small_cache, p("ref_plt"), **plt))
    return p


def assert_same_run(ref, other):
    a, b = read_metrics(ref), read_metrics(other)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(20))
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            why = (key, x["step"], x[key], y[key])
            assert abs(x[key] - y[key]) <= ATOL * max(1.0, abs(x[key])), why
    assert a[-1]["eval"]["recovered"] == pytest.approx(b[-1]["eval"]["recovered"], abs=1e-4)
    full = CrossLayerTranscoder.from_pretrained(ref)
    dist = CrossLayerTranscoder.from_pretrained(other)
    for (name, u), (_, v) in zip(full.state_dict().items(), dist.state_dict().items()):
        torch.testing.assert_close(v, u, atol=ATOL, rtol=ATOL, msg=name)


@pytest.mark.parametrize("run", ["tp2", "dp2", "tp2_cut"])
def test_jumprelu_with_tp2_dp2_or_resumed_equals_one_process(runs, run):
    assert_same_run(runs("ref"), runs(run))


def test_batchtopk_with_tp2_equals_one_process(runs):
    assert_same_run(runs("ref_bt"), runs("tp2_bt"))


def test_a_per_layer_transcoder_with_skip_and_tp2_equals_one_process(runs):
    """A PLT's features shard like a CLT's; its skip connection, replicated like b_dec, is added once
    after the TP sum and its gradient counted once in the norm."""
    assert_same_run(runs("ref_plt"), runs("tp2_plt"))
    plt = CrossLayerTranscoder.from_pretrained(runs("tp2_plt"))
    assert plt.config.decoder == "per-layer" and plt.W_skip.abs().max() > 0  # the skip path trained


def test_the_export_reshards(runs):
    """The consolidated TP=2 export, loaded again at TP=2, gives the outputs of the same export at TP=1."""
    _, out = CrossLayerTranscoder.from_pretrained(runs("tp2"))(batch(7)[0] * 4)
    torch.testing.assert_close(
        load_file(runs("reshard.safetensors"))["out"], out, atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_gradients_are_not_multiplied_by_tp_nor_clipped_per_rank(runs, activation):
    """After the global clip, each TP rank's gradients are its slice of the one-process gradients, and
    each DP rank holds the one-process gradient of the whole batch. An all-reduce in the TP backward
    would multiply them by 2; a norm of one rank's shard would clip them less."""
    ref, ref_norm = gradients(activation, Mesh())
    assert ref_norm > 0.5  # so the clip (to 0.5) is active
    tp2 = [load_file(runs(f"grads_{activation}_tp2_{r}.safetensors")) for r in range(2)]
    dp2 = [load_file(runs(f"grads_{activation}_tp1_{r}.safetensors")) for r in range(2)]

    def close(a, b, name):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)

    for name, g in ref.items():
        for shards in (tp2, dp2):
            close(shards[0]["norm"], ref_norm.view(1), "norm")
        for s in dp2:
            close(s[name], g, name)
        if name == "b_dec":  # replicated over TP
            close(tp2[0][name], g, name)
            close(tp2[1][name], g, name)
        else:
            close(torch.cat([s[name] for s in tp2], 0 if name.startswith("W_dec") else -1), g, name)


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
@pytest.mark.parametrize("tp", [1, 2])
def test_a_step_between_log_steps_has_one_bookkeeping_collective(runs, activation, tp):
    """Per step: the TP sums of the decoders (AuxK's too) and TopK's candidate gathers, or DP's gradient
    average, and ONE all-reduce for everything else (metrics, dead features, gradient norm)."""
    with open(runs(f"collectives_{activation}_tp{tp}.json")) as f:
        counts = json.load(f)
    if tp == 2:  # dp = 1: no gradient average
        topk = dict(all_reduce=3, all_gather=2)
        expected = dict(all_reduce=2) if activation == "jumprelu" else topk
    else:  # dp = 2: no TP collective
        expected = dict(all_reduce=2)
    assert counts == expected


def test_every_rank_refuses_a_rank_with_other_flags(runs):
    for rank in range(2):
        with open(runs(f"mismatch_{rank}.txt")) as f:
            refused = (
                "ranks [1] have another command line or cache than rank 0: every node must run"
            )
            assert refused in f.read()
    assert not os.path.exists(runs("mismatch"))  # refused before anything was written


@pytest.fixture(scope="module")
def mesh4(small_cache, runs):  # noqa: F811
    """TP = 2 x DP = 2, four processes (on 2 cores): a run cut at step 10 and resumed (the steps before
    and after the cut both have to equal one process's)."""

    def train(**kw):
        return dict(kind="train", argv=argv(small_cache, runs("mesh4"), tp=2, **kw))

    rc, out, err = torchrun(4, [train(stop_at=10), train(resume=True)], runs(""))
    assert rc == 0, out[-2000:] + err[-4000:]
    return runs


def test_tp2_x_dp2_on_four_processes_resumed_equals_one_process(mesh4):
    with open(mesh4("mesh4") + "/checkpoints/latest.json") as f:
        assert json.load(f)["mesh"] == [2, 2]
    assert_same_run(mesh4("ref"), mesh4("mesh4"))


def test_two_launchers_on_one_machine_equal_one_process(small_cache, runs, tmp_path):  # noqa: F811
    """Two "nodes" (torchrun --nnodes=2, one process each, c10d rendezvous on 127.0.0.1) train as DP = 2."""
    port = free_port()
    tasks = [dict(kind="train", argv=argv(small_cache, tmp_path / "nodes2"))]
    nodes = []
    for r in range(2):
        flags = [
            "--nnodes=2",
            f"--node-rank={r}",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=clt-forge-test",
        ]
        nodes.append(launcher(flags, tasks, str(tmp_path), f"node{r}"))
    for node in nodes:
        out, err = node.communicate(timeout=300)
        assert node.returncode == 0, out[-2000:] + err[-4000:]
    with open(tmp_path / "nodes2" / "checkpoints" / "latest.json") as f:
        assert json.load(f)["mesh"] == [2, 1]
    assert_same_run(runs("ref"), tmp_path / "nodes2")


def test_resuming_with_another_mesh_is_refused(runs):
    with pytest.raises(
        ValueError,
        match=r"\(dp, tp\) = \(1, 2\) mesh of 2 processes, this run has 1: resume with "
        r"torchrun --nproc_per_node=2",
    ):
        cfg = {**vars(config("", runs("tp2_cut"))), "cache": read_cache(runs), "resume": True}
        T.train(T.TrainConfig(**cfg))


def read_cache(runs):
    with open(os.path.join(runs("ref"), "training.json")) as f:
        return json.load(f)["train_config"]["cache"]


def test_a_stuck_rank_times_out_with_a_clear_error(small_cache, tmp_path):  # noqa: F811
    """Rank 1 stops answering; rank 0's next collective fails after --timeout-s with a message, and
    torchrun ends the job. (A rank that crashes outright is ended by torchrun itself, which names it.)"""
    t0 = time.time()
    stall = dict(kind="stall", argv=argv(small_cache, tmp_path, timeout_s=3, eval_every=-1))
    rc, _, err = torchrun(2, [stall], str(tmp_path))
    assert rc != 0 and time.time() - t0 < 50
    assert "a collective waited longer than --timeout-s 3" in err, err[-3000:]


if __name__ == "__main__":
    worker(sys.argv[1])

"""
parallel.py: the (dp, tp) mesh of torchrun's processes and every collective the project uses.

Tensor parallelism (Megatron-style feature sharding, picotron's column/row-parallel pair): TP rank r
holds features [r·F/tp, (r+1)·F/tp) of every layer (W_enc columns, b_enc, thresholds, W_dec rows),
encodes them and decodes a partial reconstruction that one all-reduce over TP completes (b_dec,
replicated, is added after the sum). TopK selects globally: local top-k, all-gather, one choice.
DP averages gradients. Each collective returns at once on a one-rank group, so one process runs
the same code as many (picotron's tp_communications.py). Not dist.py: `dist` is torch.distributed.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


@dataclass
class Mesh:
    """Where this process sits in the (dp, tp) mesh, and its two groups; Mesh() is one process."""

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
    env = os.environ if ddp else dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1)
    rank, local_rank, world = (int(env[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if ddp and not dist.is_initialized():  # the timeout turns a crashed or stuck peer into an error
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return ddp, rank, local_rank, world, device


def make_mesh(ddp, world, tp, device):
    """The (dp, tp) mesh of torchrun's processes: ranks r·tp .. r·tp + tp − 1 form TP group r."""
    if tp < 1 or world % tp:
        msg = f"--tp {tp} must divide the world size {world} (torchrun --nproc_per_node)"
        raise ValueError(msg)
    if not ddp:
        return Mesh()
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    dp_rank, tp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
    return Mesh(world // tp, tp, dp_rank, tp_rank, mesh.get_group("dp"), mesh.get_group("tp"))


def group_size(group):
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


# -----------------------------------------------------------------------------
# the collectives


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
    """forward: the sum of the TP ranks' partial tensors x; backward: identity (AllReduceSum)."""
    return x if group_size(group) == 1 else AllReduceSum.apply(x, group)


def all_reduce_sum(x, group):
    """forward only (no gradient): x summed over `group`, in place."""
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def broadcast(x, group):
    """forward only (no gradient): the group's first rank's x on every rank of `group`, in place."""
    if group_size(group) > 1:
        dist.broadcast(x, src=dist.get_global_rank(group, 0), group=group)
    return x


def all_gather_last(x, group):
    """forward only (no gradient): every rank's x (..., c) side by side: (..., tp·c)."""
    if group_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def global_topk(vals, k, group):
    """forward only: which of this rank's candidates vals (..., c) are among the k largest of all
    ranks'? -> (keep (..., c) bool, kth (...) the k-th largest value over all ranks). Selecting by
    the index into the gathered candidates (not by value >= kth) keeps exactly k winners under ties.
    """
    c = vals.size(-1)
    top = all_gather_last(vals.detach(), group).topk(k, dim=-1)  # (..., k) over tp·c candidates
    rank = dist.get_rank(group) if group_size(group) > 1 else 0
    local = top.indices - rank * c
    mine = (local >= 0) & (local < c)
    keep = torch.zeros(*vals.shape[:-1], c + 1, dtype=torch.bool, device=vals.device)
    keep.scatter_(-1, torch.where(mine, local, c), True)  # other ranks' winners land in column c
    return keep[..., :c], top.values[..., -1]


def average_gradients(params, group):
    """After the backward: the mean gradient over `group` in ONE flat all-reduce (DDP's bucket)."""
    if group_size(group) == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = all_reduce_sum(torch.cat([g.flatten() for g in grads]), group) / group_size(group)
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def mesh_sum(tensors):
    """forward only: {name: tensor} -> {name: float64 tensor}, each summed over every rank of the
    (dp, tp) mesh in ONE flat all-reduce: a training step's bookkeeping in one collective."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors.values()])
    all_reduce_sum(flat, dist.group.WORLD)  # the (dp, tp) mesh spans the world (make_mesh)
    pieces = flat.split([t.numel() for t in tensors.values()])
    return {name: p.view(t.shape) for (name, t), p in zip(tensors.items(), pieces)}

"""Collectives for training across workers: gathers in rank order, with or without autograd.

Plain ``torch.distributed``; no Ray here. Every function also works without an initialised
process group (world size 1), so one training loop serves every world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order, keeping autograd through every slice.

    Every rank must pass a tensor of the same shape. The backward pass sums each slice's gradient
    over all ranks (a reduce-scatter), so when every rank computes its share of one global loss,
    each local input receives the gradient of the whole global loss with respect to it.

    Args:
        x: ``[B, ...]`` on this rank.

    Returns:
        ``[W * B, ...]``, rank 0's rows first. ``x`` itself when not distributed.
    """
    rank, world_size = world()
    if world_size == 1:
        return x
    # Not torch.distributed.nn.functional.all_gather: deprecated in torch 2.14, same gradients
    # (../shared/RAY_NOTES.md §3). The functional collective has autograd built in.
    import torch.distributed._functional_collectives as fc

    out = fc.all_gather_single(x.contiguous(), 0, dist.group.WORLD)
    return out.wait() if hasattr(out, "wait") else out


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order without autograd (same shape on every rank)."""
    rank, world_size = world()
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order when the first dimension differs per rank."""
    rank, world_size = world()
    if world_size == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = all_gather_nograd(size).tolist()
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = all_gather_nograd(padded)
    return torch.cat([gathered[r * max(sizes) : r * max(sizes) + n] for r, n in enumerate(sizes)])


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` is left as it is)."""
    out = x.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum of ``x`` over ranks (a new tensor)."""
    out = x.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every worker takes rank ``src``'s buffers (BatchNorm running statistics); a collective.

    DDP broadcasts rank 0's buffers before each training forward, and each worker's forward then
    updates them from its own batch: after a step the workers' running statistics differ. Before
    validating, every worker takes rank 0's, the ones its checkpoint holds, so that the model that is
    validated across workers is the model that is saved.
    """
    if world()[1] == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper, or the module itself."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module

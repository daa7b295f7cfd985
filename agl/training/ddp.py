"""Data parallel training on torch.distributed: DDP for ordinary steps, rank 0 for decisions.

Ordinary steps go through :class:`torch.nn.parallel.DistributedDataParallel`, which all-reduces
gradients in buckets while the backward pass is still running (PyTorch docs, "Distributed Data
Parallel: internal design"). Hypergradients come from ``torch.autograd.grad`` and double
backward, which DDP does not synchronise, so they keep their own all-reduce
(``agl.training.bilevel.allreduce_gradients``), as do gate parameters outside the model.

Each rank sees other spots, so BatchNorm running statistics drift apart; they are broadcast from
rank 0 before every evaluation (DDP's ``broadcast_buffers`` only does so before a forward pass,
which leaves the last step's update rank-local), and the values that decide best epoch and early
stopping are rank 0's, so no rank stops while another waits in a collective.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# Ordinary steps through DDP when world_size > 1 (False: today's flat all-reduce after backward;
# kept for the comparison in tests and benchmarks)
USE_DDP = True


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DDP when running data parallel (parameters and buffers broadcast from rank 0), else itself."""
    if world()[1] == 1 or not USE_DDP:
        return model
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    # buffers are broadcast from rank 0 at construction and before every forward (DDP's default)
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def _collective_device(fallback: torch.device) -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones
    return fallback if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def broadcast_buffers(model: nn.Module, device: torch.device) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if world()[1] == 1:
        return
    where = _collective_device(device)
    for buffer in model.buffers():
        moved = buffer.detach().to(where)
        torch.distributed.broadcast(moved, src=0)
        if moved is not buffer:
            buffer.copy_(moved)


def earliest_over_ranks(step: int, device: torch.device) -> int:
    """The smallest positive ``step`` over all ranks, 0 where no rank has one (one collective)."""
    never = torch.iinfo(torch.int64).max
    if world()[1] == 1:
        return int(step)
    flat = torch.tensor([int(step) if step > 0 else never], dtype=torch.int64, device=_collective_device(device))
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MIN)
    found = int(flat.item())
    return 0 if found == never else found


def from_rank0(values: Sequence[float], device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (float64, one collective)."""
    if world()[1] == 1:
        return [float(v) for v in values]
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device(device))
    torch.distributed.broadcast(flat, src=0)
    return flat.cpu().tolist()

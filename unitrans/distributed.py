"""Small helpers over ``torch.distributed`` that are no-ops in a single process."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_pref: str = "auto", timeout_s: int = 1800) -> torch.device:
    """Join the process group torchrun describes in the environment (if any) and pick this rank's device.

    nccl on GPUs, gloo on the CPU. A rank that dies makes torchrun's agent stop the others; the timeout bounds
    how long a collective can wait for a peer that hangs.
    """
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank if device_pref in ("auto", "cuda") else torch.device(device_pref).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if device_pref == "auto" else device_pref)
    if launched_by_torchrun() and not is_dist():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return device


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_true(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, differentiably.

    The backward pass sums, on each rank, the gradients that every rank's loss sends to this rank's slice. So a
    loss over local rows and global columns, averaged by DDP, has exactly the gradient of the same loss over the
    global batch in one process (a detached gather would drop the column terms of the other ranks' rows).
    """
    if not is_dist() or world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return _ContiguousGrad.apply(torch.cat(all_gather(x.contiguous()), dim=0))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward passes on a contiguous gradient. ``all_gather``'s backward exchanges the gradient's
    row blocks between ranks by their raw storage; the gradient an einsum or a transposed product sends back (BLIP-2's
    best-query similarity) is a strided view, and its blocks would reach the other ranks scrambled."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if not is_dist() or world_size() == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out

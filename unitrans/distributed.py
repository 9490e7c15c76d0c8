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


def init_from_env(device_pref: str = "auto", timeout_s: int = 300) -> torch.device:
    """Join the process group torchrun describes in the environment (if any) and pick this rank's device.

    nccl on GPUs, gloo on the CPU. A rank that dies makes torchrun's agent stop the others; ``timeout_s`` bounds
    how long a collective waits for a peer that hangs (see :func:`stall_report`). A device that is not there
    (``"cuda"`` without a GPU, ``"cuda:3"`` on a one-GPU machine) -> one-line UserError.
    """
    device = pick_device(device_pref, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched_by_torchrun() and not is_dist():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return device


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this rank's GPU when there is one, else the CPU; ``"cuda"``: this rank's GPU; ``"cuda:N"``,
    ``"cpu"``, ``"mps"`` as written. Checks that the device exists."""
    from unitrans.errors import UserError

    if pref == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(pref)
    except RuntimeError:
        raise UserError(f"train.device = '{pref}' is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = local_rank if device.index is None else device.index
        if index >= count:
            have = f"{count} CUDA GPU(s)" if count else "no CUDA GPU (torch.cuda.is_available() is False)"
            raise UserError(f"train.device = '{pref}' but this machine has {have} for rank {local_rank}; "
                            "use 'cpu' or 'auto'")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"train.device = '{pref}' but MPS is not available here; use 'cpu' or 'auto'")
    if device.type not in ("cpu", "mps"):
        raise UserError(f"train.device = '{pref}': UniTrans runs on 'cpu', 'cuda' or 'mps'")
    return device


# ---- which peer stopped answering -------------------------------------------------------------------------------
# Each rank records in the process group's store the step it has reached; a collective that times out then names
# the ranks that are behind (a stopped or hung process cannot update its record).

def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None


def heartbeat(step: int) -> None:
    """Record that this rank reached ``step`` (multi-process runs only; one small store write)."""
    if is_dist():
        store = _store()
        if store is not None:
            store.set(f"unitrans/reached/{rank()}", str(step))


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's timeout (gloo: "Timed out waiting ... for recv")."""
    return is_dist() and ("timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower())


def stall_report(timeout_s: int) -> str:
    """One line: which ranks stopped answering (those behind this rank's step), read from the store."""
    store = _store()
    reached: dict[int, int | None] = {}
    for r in range(world_size()):
        key = f"unitrans/reached/{r}"
        try:  # check() first: get() would wait for a key that a stopped rank never wrote
            reached[r] = int(store.get(key)) if store is not None and store.check([key]) else None
        except (RuntimeError, ValueError, LookupError):
            reached[r] = None
    mine = reached.get(rank())
    behind = [r for r, s in reached.items() if r != rank() and (s is None or (mine is not None and s < mine))]
    where = ", ".join(f"rank {r} at step {s}" for r, s in reached.items())
    who = (f"rank {', '.join(map(str, behind))} stopped answering" if behind else
           "a peer stopped answering (no rank is behind in steps)")
    return (f"{who}: rank {rank()} waited train.timeout_s = {timeout_s} s in a collective ({where}). Check that "
            "process (stopped, swapping, or stuck in I/O); raise train.timeout_s if a step legitimately takes longer")


_abandoned = False


def cleanup() -> None:
    if is_dist() and not _abandoned:
        dist.destroy_process_group()


def abandon(exit_code: int = 2) -> None:
    """After a collective timed out: the group is broken (a peer is stopped), and tearing it down can abort the
    process ("terminate called without an active exception") or wait on the peer. So it is left as it is, and the
    process ends with ``exit_code`` without the interpreter's teardown, once the error has been printed."""
    global _abandoned
    if _abandoned:
        return
    _abandoned = True
    import atexit
    import sys

    def hard_exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)

    atexit.register(hard_exit)


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

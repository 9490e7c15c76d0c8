"""Exact, machine-independent costs of one training step: FLOPs, bytes saved for backward, peak tensor bytes.

Not a library module: the benchmark scripts (and tests) import it by path. The three figures depend on the
model, the batch and the code path only, never on the machine's load, so they are the targets that timings are
read against.

* :func:`count_flops`: ``torch.utils.flop_counter.FlopCounterMode`` over the forward, the backward and the
  optimizer step, separately. It counts matrix products, convolutions and attention kernels (2 FLOPs per
  multiply-add); elementwise work (activations, norms, AdamW's update) is not counted.
* :func:`saved_bytes`: every tensor autograd saves for backward during the forward, through
  ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage (a view or a tensor saved by several
  nodes costs its storage once). Parameters and buffers are excluded: they live anyway. This is the activation
  memory a method holds between forward and backward.
* :class:`LiveBytes`: a dispatch mode that adds the bytes of every storage an op creates and subtracts them when
  the storage dies; its ``peak`` is the most tensor bytes alive at once during the step, on top of what existed
  before (weights, optimizer state). It is what ``torch.cuda.max_memory_allocated`` would report, less the
  allocator's rounding and caching, on any device.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def model_storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Data pointers of the storages of ``tensors`` (parameters, buffers): excluded from saved bytes."""
    return {t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().nbytes() > 0}


class SavedBytes:
    """Context manager: the unique storages autograd saves while it is active (``bytes``, ``storages``,
    ``tensors``), parameters and buffers (``exclude``: their storage pointers) left out. The storages are held
    until the context exits, so no address can be freed and reused by another saved tensor meanwhile."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude, self.tensors, self._seen = set(exclude), 0, {}
        self._hold: list = []
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        ptr, nbytes = _storage_key(t)
        if nbytes and ptr not in self.exclude and ptr not in self._seen:
            self._seen[ptr] = nbytes
            self._hold.append(t.untyped_storage())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def storages(self) -> int:
        return len(self._seen)

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._hold.clear()


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and alive at the same time (``peak``; ``live`` now)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: dict[int, int] = {}  # id(storage object) -> bytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._tracked or st.nbytes() == 0:
            return
        self._tracked[key] = st.nbytes()
        self.live += st.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._tracked.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


def count_flops(forward: Callable[[], torch.Tensor], backward_and_step: Callable[[torch.Tensor], None]) -> dict:
    """FLOPs of ``loss = forward()``, of ``backward_and_step(loss)`` split into backward and optimizer by the
    caller's two callables. Returns ``{"forward", "backward_opt", "total"}`` in FLOPs (floats)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fwd:
        loss = forward()
    with FlopCounterMode(display=False) as bwd:
        backward_and_step(loss)
    f, b = float(fwd.get_total_flops()), float(bwd.get_total_flops())
    return {"forward": f, "backward_opt": b, "total": f + b}


def memory_costs(forward: Callable[[], torch.Tensor], backward_and_step: Callable[[torch.Tensor], None],
                 exclude: set[int]) -> dict:
    """Bytes saved for backward by ``forward()`` and the peak of tensor bytes created during the whole step."""
    with LiveBytes() as live:
        with SavedBytes(exclude) as saved:
            loss = forward()
        saved_b, n_storages, n_tensors = saved.bytes, saved.storages, saved.tensors
        backward_and_step(loss)
        del loss
    return {"saved_bytes": saved_b, "saved_storages": n_storages, "saved_tensors": n_tensors,
            "peak_step_bytes": live.peak}


class _Touch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, g.new_zeros(())


def touch(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, with the trainable scalar ``s`` attached: backward passes the gradient to ``x`` as is and
    gives ``s`` a zero gradient, and nothing is saved. An update that costs nothing: gradients flow through every
    activation above it, as they must for any method that trains something there."""
    return _Touch.apply(x, s)

"""Free functions that attach updates to injection points, and merge / unmerge them.

An adapter does not replace the backbone's modules: a forward hook on each frozen ``nn.Linear`` adds the updates
of the points that linear computes (one point for a plain linear, up to three slices for a fused qkv). The
backbone's module tree and state-dict keys stay exactly those of the pretrained model, so real checkpoints load,
``save_pretrained`` works after merging, and a merged model has no adapter code on its path at all (the hook is
removed while merged).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from unitrans.interfaces import InjectionPoint

Delta = Callable[[torch.Tensor], torch.Tensor]  # x (..., in) -> update (..., out of the point)


class _LinearHub:
    """All updates that act on one frozen linear; a single forward hook applies them."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.entries: list[tuple[object, InjectionPoint, Delta]] = []  # (owner, point, delta)
        self.handle = None
        self.saved_weight: torch.Tensor | None = None  # W0, kept while merged for a bit-exact unmerge
        self.merged_owners: set[int] = set()
        self.stops: dict[int, list[Callable[[], None]]] = {}  # owner id -> stop functions of started points

    def _hook(self, module, args, output):
        x = args[0]
        active = [(p, fn) for owner, p, fn in self.entries if id(owner) not in self.merged_owners and p.acts_now()]
        if not active:
            return output
        out_features = output.shape[-1]
        if len(active) == 1 and active[0][0].out_slice is None:
            return output + active[0][1](x)
        # Fused linear (qkv): assemble one update covering all rows, then a single add.
        parts: list[torch.Tensor] = []
        cursor = 0
        for p, fn in sorted(active, key=lambda e: (e[0].out_slice or slice(0, out_features)).start):
            sl = p.out_slice or slice(0, out_features)
            if sl.start > cursor:
                parts.append(output.new_zeros(*output.shape[:-1], sl.start - cursor))
            elif sl.start < cursor:  # two adapters on the same rows: add separately
                output = output + _pad(fn(x), sl, out_features)
                continue
            parts.append(fn(x))
            cursor = sl.stop
        if cursor < out_features:
            parts.append(output.new_zeros(*output.shape[:-1], out_features - cursor))
        return output + torch.cat(parts, dim=-1)

    def install(self):
        if self.handle is None:
            self.handle = self.module.register_forward_hook(self._hook)

    def remove(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _pad(delta: torch.Tensor, sl: slice, out_features: int) -> torch.Tensor:
    before, after = sl.start, out_features - sl.stop
    return torch.nn.functional.pad(delta, (before, after))


_HUB_ATTR = "_unitrans_hub"


def _hub(module: nn.Linear) -> _LinearHub:
    hub = getattr(module, _HUB_ATTR, None)
    if hub is None:
        hub = _LinearHub(module)
        object.__setattr__(module, _HUB_ATTR, hub)  # not an nn.Module attribute: no state-dict entry
    return hub


def add_delta(owner: object, point: InjectionPoint, fn: Delta) -> None:
    """Make ``point``'s linear add ``fn(x)`` to the point's output rows (and start what the point records)."""
    hub = _hub(point.module)
    hub.entries.append((owner, point, fn))
    if point.start is not None:
        hub.stops.setdefault(id(owner), []).append(point.start())
    hub.install()


def remove_deltas(owner: object, points: list[InjectionPoint]) -> None:
    """Remove every update ``owner`` added on the modules of ``points`` (and stop what they recorded)."""
    for module in {id(p.module): p.module for p in points}.values():
        hub = _hub(module)
        hub.entries = [e for e in hub.entries if e[0] is not owner]
        for stop in hub.stops.pop(id(owner), []):
            stop()
        if not hub.entries:
            hub.remove()


@torch.no_grad()
def merge(owner, points: list[InjectionPoint], delta_weight: Callable[[InjectionPoint], torch.Tensor]) -> None:
    """Fold ``delta_weight(point)`` into each point's frozen rows; the update stops running in forward.

    A point's linear that cannot hold its update alone (a view sharing its weight with another input stream, e.g.
    BLIP-2's Q-Former self-attention) says why in its ``unmergeable`` attribute; such a merge is refused before
    any weight changes (``UserError`` naming the point)."""
    for p in points:
        reason = getattr(p.module, "unmergeable", None)
        if reason:
            from unitrans.errors import UserError

            raise UserError(f"cannot merge the update of point {p.id}: {reason}")
    by_module: dict[int, list[InjectionPoint]] = {}
    for p in points:
        by_module.setdefault(id(p.module), []).append(p)
    for pts in by_module.values():
        hub = _hub(pts[0].module)
        if id(owner) in hub.merged_owners:
            continue
        w = hub.module.weight
        if hub.saved_weight is None:
            hub.saved_weight = w.detach().clone()
        for p in pts:
            sl = p.out_slice or slice(0, w.shape[0])
            w[sl] += delta_weight(p).to(w.dtype)
        hub.merged_owners.add(id(owner))
        if all(id(o) in hub.merged_owners for o, _, _ in hub.entries):
            hub.remove()


@torch.no_grad()
def unmerge(owner, points: list[InjectionPoint], delta_weight: Callable[[InjectionPoint], torch.Tensor]) -> None:
    """Undo :func:`merge`. When no adapter stays merged, ``W0`` is restored bit for bit from a saved copy."""
    for module in {id(p.module): p.module for p in points}.values():
        hub = _hub(module)
        if id(owner) not in hub.merged_owners:
            continue
        hub.merged_owners.discard(id(owner))
        w = hub.module.weight
        if not hub.merged_owners:
            w.copy_(hub.saved_weight)
            hub.saved_weight = None
        else:
            for p in points:
                if p.module is module:
                    sl = p.out_slice or slice(0, w.shape[0])
                    w[sl] -= delta_weight(p).to(w.dtype)
        hub.install()


@contextmanager
def suspended(owners: Sequence[object], points: Sequence[InjectionPoint]) -> Iterator[None]:
    """Inside the block the updates of ``owners`` on ``points`` do not run; the weights are not touched (unmerge a
    merged owner first). On exit every hub has exactly the entries it had, in the same order."""
    ids = {id(o) for o in owners}
    hubs = [_hub(m) for m in {id(p.module): p.module for p in points}.values()]
    saved = [(hub, hub.entries) for hub in hubs]
    for hub, entries in saved:
        hub.entries = [e for e in entries if id(e[0]) not in ids]
    try:
        yield
    finally:
        for hub, entries in saved:
            hub.entries = entries


def is_merged(owner: object, points: Sequence[InjectionPoint]) -> bool:
    """Whether ``owner``'s updates are folded into the weights of these points' linears (:func:`merge`)."""
    return any(id(owner) in _hub(p.module).merged_owners for p in points)

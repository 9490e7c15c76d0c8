"""The low-rank products VCRA and QASN share, with what autograd keeps for backward cut to what training needs.

An update of VCRA (and QASN's ``x_i w_i``) is ``s · diag(λb) B diag(λa) A x``. It runs as two steps:

* ``ax = F.linear(x, A[:, :d_in])``, the projection of one input, shared by every point that reads that input.
  Autograd keeps ``x`` for ``dA`` when A trains (and nothing else: A is a parameter);
* :func:`folded_product`: ``ax @ W.T`` with ``W`` the scalings folded into B (``(d_out, r)`` per head, several
  heads stacked in one product). Its backward recomputes ``W`` from the parameters and, when A trains, ``ax``
  from the ``x`` that the projection keeps anyway. So the only activation a trained update holds is the input
  ``x`` of A: no ``A x``, no folded matrix, no full-size product (the bound of ``docs/performance.md``). With A
  frozen, ``x`` is not needed for any gradient, and the product keeps the smaller ``ax`` instead.

Backward of the product, for ``G = gᵀ ax`` (``(d_out, r)``, one per head) and ``W = s·λb ⊙ B ⊙ λa``:
``d ax = g W``, ``dB = G ⊙ λa ⊙ (s λb)``, ``dλa = Σ_rows G ⊙ B ⊙ (s λb)``, ``dλb = s Σ_cols G ⊙ B ⊙ λa``,
``ds = Σ G ⊙ B ⊙ λa ⊙ λb``.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F

# A head: (λa (r,), λb (d_out,), s () or None). ``rows``: which head each output row block is (a head may repeat:
# BLIP's fused vision qkv is q, kv, kv when k and v share their scalings).
Head = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _fold(b: torch.Tensor, head: Head) -> torch.Tensor:
    """``s · diag(λb) B[:d_out] diag(λa)``: ``(d_out, r)``, in the parameters' dtype."""
    la, lb, s = head
    return b[: lb.shape[0]] * torch.outer(lb if s is None else lb * s, la)


def _stacked(b: torch.Tensor, heads: Sequence[Head], order: Sequence[int]) -> torch.Tensor:
    """The folded heads ``order`` stacked by rows: ``(Σ d_out, r)``."""
    folded = [_fold(b, heads[i]) for i in order]
    return folded[0] if len(folded) == 1 else torch.cat(folded)


def _blocks(t: torch.Tensor, widths: Sequence[int]) -> list[torch.Tensor]:
    """``t (..., Σ widths)`` split into its row blocks (views)."""
    return list(torch.split(t, list(widths), dim=-1))


class _FoldedProduct(torch.autograd.Function):
    """``out = ax @ Wᵀ`` (``(..., Σ d_out)``) with the scalings folded into B inside; see the module docstring.

    A head that serves several row blocks (k and v sharing their scalings in a fused qkv) is multiplied once and
    copied into its blocks; in backward its blocks' gradients are summed first, so the products run over the
    distinct heads only."""

    @staticmethod
    def forward(ctx, ax, x, a, b, rows, n_heads, *flat):
        heads = [tuple(flat[3 * i: 3 * i + 3]) for i in range(n_heads)]
        uniq = list(dict.fromkeys(rows))  # distinct heads, in order of first use
        out = F.linear(ax, _stacked(b, heads, uniq).to(ax.dtype))  # (..., Σ distinct d_out)
        if len(uniq) < len(rows):
            parts = dict(zip(uniq, _blocks(out, [heads[i][1].shape[0] for i in uniq])))
            out = torch.cat([parts[i] for i in rows], dim=-1)
        keep_x = a is not None and a.requires_grad
        ctx.keep_x, ctx.rows, ctx.uniq, ctx.n_heads, ctx.dtype = keep_x, tuple(rows), uniq, n_heads, out.dtype
        ctx.shared = getattr(ax, "_recomputed", None) if keep_x else None
        if ctx.shared is not None:
            ctx.shared.users += 1
        ctx.save_for_backward(x if keep_x else ax, a if keep_x else None, b, *flat)
        return out

    @staticmethod
    def backward(ctx, g):
        src, a, b, *flat = ctx.saved_tensors
        heads = [tuple(flat[3 * i: 3 * i + 3]) for i in range(ctx.n_heads)]
        dt, uniq = ctx.dtype, ctx.uniq
        with torch.autocast(g.device.type, enabled=False):
            ax = _recompute(ctx, src, a) if ctx.keep_x else src.to(dt)
            g = _sum_repeated(g.to(dt), heads, ctx.rows, uniq)  # (..., Σ distinct d_out)
            g_ax = None
            if ctx.needs_input_grad[0]:
                g_ax = F.linear(g, _stacked(b, heads, uniq).to(dt).t())  # (..., r)
            gw = g.reshape(-1, g.shape[-1]).t() @ ax.reshape(-1, ax.shape[-1])  # (Σ distinct d_out, r)
            grads = _head_grads(gw.to(b.dtype), b, heads, uniq, ctx.needs_input_grad[6:])
            g_b = grads.pop()
        return (g_ax, None, None, g_b, None, None, *grads)


def _sum_repeated(g: torch.Tensor, heads: Sequence[Head], rows: Sequence[int], uniq: Sequence[int]) -> torch.Tensor:
    """The output gradient ``g (..., Σ_rows d_out)`` with the blocks of a repeated head summed: one block per
    distinct head, in ``uniq`` order."""
    if len(uniq) == len(rows):
        return g
    sums: dict[int, torch.Tensor] = {}
    for i, blk in zip(rows, _blocks(g, [heads[i][1].shape[0] for i in rows])):
        sums[i] = blk if i not in sums else sums[i] + blk
    return torch.cat([sums[i] for i in uniq], dim=-1)


class _Recomputed:
    """``A x`` recomputed once in backward for every product that reads the same shared ``ax`` (the image tokens
    of every fusion layer, a block input that QASN reads too); dropped when its last reader's backward has run."""

    __slots__ = ("users", "value")

    def __init__(self):
        self.users, self.value = 0, None


def _recompute(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``A x`` in the product's dtype, from the ``x`` the projection keeps (shared with other readers if any)."""
    shared = ctx.shared
    ax = shared.value if shared is not None and shared.value is not None else None
    if ax is None:
        ax = F.linear(x.to(ctx.dtype), a[:, : x.shape[-1]].to(ctx.dtype))
    if shared is not None:
        shared.users -= 1
        shared.value = ax if shared.users > 0 else None
    return ax


def project(x: torch.Tensor, a: torch.Tensor, d_in: int, shared: bool = False) -> torch.Tensor:
    """``A[:, :d_in] x`` (``(..., r)``). ``shared``: several products will read it (across calls), so their
    backward recomputes it once for all of them instead of once each."""
    ax = F.linear(x, a[:, :d_in].to(x.dtype))
    if shared:
        ax._recomputed = _Recomputed()
    return ax


def _head_grads(gw: torch.Tensor, b: torch.Tensor, heads: Sequence[Head], order: Sequence[int],
                needs: Sequence[bool]) -> list:
    """Gradients of ``flat = (λa, λb, s) per head`` and of ``B`` (last) from ``gw = gᵀ ax`` (``(Σ d_out, r)``, one
    block per head of ``order``, each head once). Per head, with ``G`` its block and ``t = G ⊙ B``:
    ``dλa = (s λb)ᵀ t``, ``dλb = s · t λa``, ``ds = λbᵀ t λa``, ``dB += G ⊙ (s λb) λaᵀ``: few small kernels."""
    out: list = [None] * (3 * len(heads))
    g_b = None
    for i, gh in zip(order, torch.split(gw, [heads[i][1].shape[0] for i in order])):  # (d, r) each
        la, lb, s = heads[i]
        d = lb.shape[0]
        scale = lb if s is None else lb * s
        t = gh * b[:d]
        t_la = t @ la  # (d,)
        out[3 * i] = (scale @ t).to(la.dtype) if needs[3 * i] else None
        out[3 * i + 1] = (t_la if s is None else t_la * s).to(lb.dtype) if needs[3 * i + 1] else None
        out[3 * i + 2] = (lb @ t_la).to(s.dtype) if s is not None and needs[3 * i + 2] else None
        if b.requires_grad:
            part = gh * torch.outer(scale, la)
            if g_b is None:
                g_b = part if d == b.shape[0] else torch.cat([part, part.new_zeros(b.shape[0] - d, part.shape[1])])
            else:
                g_b[:d] += part
    out.append(g_b)
    return out


def folded_product(ax: torch.Tensor, x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor,
                   heads: Sequence[Head], rows: Sequence[int] | None = None) -> torch.Tensor:
    """``ax @ Wᵀ`` for the stacked folded heads: ``(..., r) -> (..., Σ_rows d_out)``.

    Args:
        ax: ``A[:, :d_in] x``, ``(..., r)``, as :func:`torch.nn.functional.linear` computed it.
        x: the input ``(..., d_in)`` that ``ax`` was computed from (kept instead of ``ax`` when A trains).
        a: the ``A`` (``(r, d_in_max)``) that computed ``ax``; ``None`` or frozen: ``ax`` is kept instead of ``x``.
        b: ``B`` (``(d_out_max, r)``); rows ``[:d_out]`` serve a head of width ``d_out``.
        heads: ``(λa (r,), λb (d_out,), s () or None)`` per head.
        rows: the head of each output row block, in order (default: every head once).
    """
    rows = list(range(len(heads))) if rows is None else list(rows)
    flat = [t for h in heads for t in h]
    return _FoldedProduct.apply(ax, x, a, b, rows, len(heads), *flat)


class InputCache:
    """Values computed from an input tensor (``A x``), reused while it is safe and dropped as soon as it is not.

    An entry for input ``x`` is found only for the same tensor object (held weakly, so the cache never keeps an
    input alive) and the same ``state`` (versions of the parameters used, grad mode). It is dropped when ``x``
    dies, when backward has run through the value (its graph is freed then, so it must not be reused: the next
    micro-batch of a gradient accumulation computes afresh), or when more than ``size`` inputs are held (the
    least recently used goes). So a loop that never calls :meth:`clear` still never reuses a stale value, and
    what the cache holds is bounded: after a backward, nothing that backward ran through.
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[int, tuple[weakref.ref, Any, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, x: torch.Tensor, state) -> torch.Tensor | None:
        entry = self._entries.get(id(x))
        if entry is None or entry[0]() is not x or entry[1] != state:
            return None
        self._entries.move_to_end(id(x))
        return entry[2]

    def put(self, x: torch.Tensor, state, value: torch.Tensor) -> torch.Tensor:
        """Remember ``value`` for ``x``; returns ``value``."""
        key, owner = id(x), weakref.ref(self)

        def forget(ref):  # x died: its entry can never match again
            cache = owner()
            if cache is not None and key in cache._entries and cache._entries[key][0] is ref:
                del cache._entries[key]

        self._entries[key] = (weakref.ref(x, forget), state, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        if value.requires_grad:
            value.register_hook(_drop_after_backward(owner, key, id(value)))
        return value

    def clear(self) -> None:
        self._entries.clear()


def _drop_after_backward(owner: weakref.ref, key: int, ident: int):
    """A gradient hook that drops the entry ``key`` once backward reaches its value. It holds neither the value
    nor the cache (a tensor whose hook refers to it is a cycle through the autograd graph that Python's collector
    cannot see)."""

    def hook(grad):
        cache = owner()
        entry = cache._entries.get(key) if cache is not None else None
        if entry is not None and id(entry[2]) == ident:
            del cache._entries[key]

    return hook

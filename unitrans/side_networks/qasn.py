"""QASN: query-augmentation side network (UniTrans §3.3.1, eq. 5-6)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from unitrans.adapters.lowrank import folded_product
from unitrans.interfaces import SharedProjection, SideNetwork


def filter_output(kind: str, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The information filter ``f`` of eq. 6 at ``z = α⊙h + β``: ``literal`` ``σ(z)`` as printed; ``centred``
    ``σ(z) - 1/2``, the printed filter less a constant (the same gradients), zero at init (α=1, β=0, h=0);
    ``gate`` ``σ(z) ⊙ h``."""
    if kind == "gate":
        return torch.sigmoid(z) * h
    if kind == "centred":
        return torch.sigmoid(z) - 0.5
    return torch.sigmoid(z)


class QASN(nn.Module, SideNetwork):
    """Eq. 5-6 through hooks on the fusion blocks (which run unchanged).

    A pre-hook on block i records its input ``x_i``; a forward hook updates ``h_{i+1} = h_i + x_i w_i`` and adds
    ``f(h_{i+1})`` to the block's output. The hooks act only when a block runs in multimodal mode (with image
    tokens); the same layers run as the unimodal text encoder untouched. Parameters per block: ``λa (r)``,
    ``λb (d)``, ``α (d)`` (init 1), ``β (d)`` (init 0): ``r + 3d``.
    """

    def __init__(self, rank=64, filter="gate", projections="shared", projection_seed=0):
        super().__init__()
        self.rank, self.filter, self.projections, self.projection_seed = rank, filter, projections, projection_seed
        self.lambda_a = nn.ParameterList()
        self.lambda_b = nn.ParameterList()
        self.alpha = nn.ParameterList()
        self.beta = nn.ParameterList()
        self._pair = None
        self._project = None  # x, d -> A[:, :d] x through the adapter's cache, when the pair is the adapter's
        self._handles: list = []
        # Per-forward state keyed by block index, so a block recomputed alone (gradient checkpointing) finds
        # exactly the inputs it had: its x_i and h_i.
        self._x: dict[int, torch.Tensor] = {}
        self._h: dict[int, torch.Tensor | None] = {}
        self._active: dict[int, bool] = {}
        self._suspended = False
        self.uses_shared_pair = False

    def attach(self, backbone, adapters) -> None:
        blocks = backbone.fusion_blocks()
        d = backbone.fusion_width()
        self._backbone = backbone  # its FusionEncoder says which block calls read the image, and their input
        device = next(blocks[0].parameters()).device
        if self.projections == "shared":
            for adapter in adapters:
                pair = adapter.shared_pair("C") if isinstance(adapter, SharedProjection) else None
                if pair is not None and pair[0].shape[1] >= d and pair[1].shape[0] >= d:
                    self._pair, self.uses_shared_pair = pair, True
                    self.rank = pair[0].shape[0]
                    # A x_i is what the adapter's fusion self-attention already computed for the same x_i
                    self._project = adapter.projector("C")
                    break
        if self._pair is None:
            from unitrans.adapters.vcra import VCRA

            a, b = VCRA.draw_pair(self.projection_seed, 10_007, self.rank, d, d)
            self._pair = (a.to(device), b.to(device))
        for _ in blocks:
            self.lambda_a.append(nn.Parameter(torch.ones(self.rank, device=device)))
            self.lambda_b.append(nn.Parameter(torch.zeros(d, device=device)))
            self.alpha.append(nn.Parameter(torch.ones(d, device=device)))
            self.beta.append(nn.Parameter(torch.zeros(d, device=device)))
        self.width = d
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post_hook(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Inside the block the fusion blocks run bare (no side-network term is added)."""
        before, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = before

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):
            active = self._active[i] = not self._suspended and self._backbone.block_reads_image(args, kwargs)
            if active:
                if i == 0:
                    self._x, self._h = {}, {0: None}  # h_0 = 0
                self._x[i] = self._backbone.block_input(args, kwargs)
            return None

        return hook

    def _xw(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """``x_i w_i = diag(λb) B diag(λa) A x_i`` (``(B, L, d)``): ``A x_i`` from the adapter's cache when the pair
        is the adapter's (its fusion self-attention projected the same ``x_i``), the scalings folded into ``B``
        inside the product, which keeps only ``x_i`` for backward (see :mod:`unitrans.adapters.lowrank`)."""
        a, b = self._pair
        d = self.width
        ax = self._project(x, d) if self._project is not None else F.linear(x, a[:, :d].to(x.dtype))
        return folded_product(ax, x, a, b, [(self.lambda_a[i], self.lambda_b[i], None)])

    def _post_hook(self, i: int):
        def hook(module, args, kwargs_or_output, output=None):
            out = kwargs_or_output if output is None else output
            if not self._active.get(i):
                return None
            x = self._x[i]  # (B, L, d)
            xw = self._xw(i, x)
            h_prev = self._h.get(i)
            h = xw if h_prev is None else h_prev + xw  # eq. 5: h_{i+1} = h_i + x_i w_i
            self._h[i + 1] = h
            z = self.alpha[i].to(x.dtype) * h + self.beta[i].to(x.dtype)
            f = filter_output(self.filter, z, h)
            if isinstance(out, tuple):
                return (out[0] + f,) + tuple(out[1:])
            return out + f  # eq. 6

        return hook

"""LoRA, the baseline of the paper (eq. 2)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unitrans import injection
from unitrans.adapters import LoRAOptions
from unitrans.adapters.passes import refuse_pass_dependent_merge, split_passes
from unitrans.interfaces import Adapter, InjectionPoint


def _key(point: InjectionPoint) -> str:
    return point.id.replace(".", "_")


class LoRA(nn.Module, Adapter):
    """LoRA (UniTrans eq. 2): ``h = W0 x + (alpha / r) B A x``, one (A, B) pair per injection point.

    ``A (r, d_in)`` starts Kaiming-uniform and ``B (d_out, r)`` at zero, so the model equals the frozen
    backbone at init. Fused projections (BLIP's vision qkv) are three points with three pairs.
    """

    def __init__(self, options: LoRAOptions):
        super().__init__()
        o = self.options = options  # the validated spec fields (unitrans.adapters.LoRAOptions)
        self.targets, self.layers, self.rank = list(o.targets), o.layers, o.rank
        self.scaling = (o.alpha if o.alpha is not None else o.rank) / o.rank
        self.dropout = nn.Dropout(o.dropout) if o.dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.points: list[InjectionPoint] = []
        self._modality: dict[str, str] = {}

    def attach(self, points: Sequence[InjectionPoint]) -> None:
        for p in split_passes(points):
            k = _key(p)
            w = p.module.weight
            a = torch.empty(self.rank, p.in_features, device=w.device, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[k] = nn.Parameter(a)
            self.lora_B[k] = nn.Parameter(torch.zeros(p.out_features, self.rank, device=w.device))
            self._modality[k] = p.modality
            injection.add_delta(self, p, self._delta_fn(k))
            self.points.append(p)

    def _delta_fn(self, k: str):
        def delta(x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., d_out)
            a, b = self.lora_A[k], self.lora_B[k]
            ax = F.linear(self.dropout(x), a.to(x.dtype))  # (..., r)
            if self.scaling != 1.0:  # on the r-wide product, not on a (..., d_out) activation
                ax = ax * self.scaling
            return F.linear(ax, b.to(x.dtype))

        return delta

    def delta_weight(self, point: InjectionPoint) -> torch.Tensor:
        k = _key(point)
        return (self.lora_B[k] @ self.lora_A[k]) * self.scaling  # (d_out, d_in)

    def merge(self) -> None:
        refuse_pass_dependent_merge("lora", self.points)
        injection.merge(self, self.points, self.delta_weight)

    def unmerge(self) -> None:
        injection.unmerge(self, self.points, self.delta_weight)

    def modality_of_parameter(self, name: str) -> str:
        return self._modality.get(name.split(".", 1)[-1], "shared")

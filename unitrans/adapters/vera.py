"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024), as PEFT's ``VeraModel`` defines it."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unitrans import injection
from unitrans.adapters import VeRAOptions
from unitrans.interfaces import Adapter, InjectionPoint


def _key(point: InjectionPoint) -> str:
    return point.id.replace(".", "_")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT VeRA's projection init: ``U(-b, b)`` with ``b = sqrt(3) · sqrt(2) / sqrt(fan_in)``, ``fan_in = shape[1]``
    (``kaiming_uniform_`` with gain √2), drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRA(nn.Module, Adapter):
    """``h = W0 x + diag(λb) B diag(λd) A x`` at every targeted point (PEFT's ``VeraModel``).

    * One frozen pair for all points: ``A (r, d_in_max)``, ``B (d_out_max, r)`` over the largest input and output
      widths of the points; a point of width ``(d_out, d_in)`` uses ``B[:d_out]`` and ``A[:, :d_in]``. Drawn on the
      CPU from ``torch.Generator().manual_seed(projection_seed)``, A first, then B, Kaiming-uniform (gain √2,
      fan-in = the second dimension): PEFT's draw, so the same seed gives PEFT's matrices. Never saved: a loaded
      adapter regenerates them from the seed.
    * Per point (a fused qkv's q, k, v are three points): ``λd (r,)`` at ``d_initial`` and ``λb (d_out,)`` at 0, so
      the model equals the frozen backbone at init.

    Parameters: ``Σ_points (r + d_out)``.
    """

    def __init__(self, options: VeRAOptions):
        super().__init__()
        o = self.options = options  # the validated spec fields (unitrans.adapters.VeRAOptions)
        self.targets, self.layers, self.rank = list(o.targets), o.layers, o.rank
        self.dropout = nn.Dropout(o.dropout) if o.dropout > 0 else nn.Identity()
        self.lambda_d = nn.ParameterDict()  # point key -> (r,)
        self.lambda_b = nn.ParameterDict()  # point key -> (d_out,)
        self.A: torch.Tensor | None = None  # frozen, not a buffer: not in the state dict, regenerated from the seed
        self.B: torch.Tensor | None = None
        self.points: list[InjectionPoint] = []
        self._modality: dict[str, str] = {}

    @staticmethod
    def draw_pair(seed: int, rank: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A (rank, d_in)``, ``B (d_out, rank)`` as PEFT draws them for ``projection_prng_key = seed``."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        a = kaiming_uniform((rank, d_in), g)
        return a, kaiming_uniform((d_out, rank), g)

    def attach(self, points: Sequence[InjectionPoint]) -> None:
        if self.points:
            raise RuntimeError("VeRA.attach called twice")
        device = points[0].module.weight.device
        d_in, d_out = max(p.in_features for p in points), max(p.out_features for p in points)
        a, b = self.draw_pair(self.options.projection_seed, self.rank, d_in, d_out)
        self.A, self.B = a.to(device), b.to(device)
        for p in points:
            k = _key(p)
            self.lambda_d[k] = nn.Parameter(torch.full((self.rank,), float(self.options.d_initial), device=device))
            self.lambda_b[k] = nn.Parameter(torch.zeros(p.out_features, device=device))
            self._modality[k] = p.modality
            injection.add_delta(self, p, self._delta_fn(p))
            self.points.append(p)

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .double() move the frozen pair with the parameters
        super()._apply(fn, *args, **kwargs)
        if self.A is not None:
            self.A, self.B = fn(self.A), fn(self.B)
        return self

    def _delta_fn(self, p: InjectionPoint):
        k, d_in, d_out = _key(p), p.in_features, p.out_features

        def delta(x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., d_out)
            ax = F.linear(self.dropout(x), self.A[:, :d_in].to(x.dtype))  # (..., r)
            bx = F.linear(ax * self.lambda_d[k].to(x.dtype), self.B[:d_out].to(x.dtype))  # (..., d_out)
            return bx * self.lambda_b[k].to(x.dtype)

        return delta

    def delta_weight(self, point: InjectionPoint) -> torch.Tensor:
        k = _key(point)
        b = self.lambda_b[k][:, None] * self.B[: point.out_features]  # (d_out, r)
        return b @ (self.lambda_d[k][:, None] * self.A[:, : point.in_features])  # (d_out, d_in)

    def modality_of_parameter(self, name: str) -> str:
        return self._modality.get(name.split(".", 1)[-1], "shared")

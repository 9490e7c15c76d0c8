"""VCRA: vector-based cross-modal random matrix adaptation (UniTrans §3.2, eq. 3-4)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unitrans import injection
from unitrans.interfaces import Adapter, InjectionPoint


def _safe(key: str) -> str:
    return key.replace(".", "_")


class VCRA(nn.Module, Adapter):
    """Eq. 4: ``VCRA(x^M) = W0 x^M + s_M · diag(λb) B diag(λa) A x^M``, ``M ∈ {V, T, C}``.

    * One pair ``A (r, d_in_max)``, ``B (d_out_max, r)`` is shared by every targeted point of the vision encoder,
      the text encoder and the fusion layers (``share="all"``); the decoder (``D``) gets a pair of its own
      (paper §4.3.1). ``share="modality"``: one pair per modality; ``share="none"``: one per point. A point of
      width ``(d_out, d_in)`` uses ``B[:d_out]`` and ``A[:, :d_in]``.
    * Every point has ``λa ∈ R^r`` (init 1) and ``λb ∈ R^{d_out}`` (init 0): the model equals the frozen
      backbone at init. With ``share_kv_scaling`` the k and v points of one attention share their λ pair.
    * ``s`` is one learnable scalar per modality.
    * A and B are drawn from ``torch.Generator().manual_seed(projection_seed + pair index)`` on the CPU:
      equal on every machine and rank. ``A ~ N(0, 1/d_in)``, ``B ~ N(0, 1/r)`` (normal, as the paper says,
      scaled so ``B A x`` keeps the magnitude of ``x``).
    * ``A x`` is computed once per input and pair: q, k and v of one attention read the same input, and the
      forward hooks of their linears find it in a one-entry cache keyed on the input tensor object, the
      version counter of A and the grad mode.

    Parameter count with ``share="all"``, N points of width d, k/v scalings not shared:
    ``2·d·r + N·(d + r) + #modalities`` (the paper's Θ, plus the scalars ``s``).
    """

    def __init__(
        self,
        targets,
        rank=64,
        share="all",
        train_projections=True,
        projection_seed=0,
        share_kv_scaling=True,
        scale_init=1.0,
        lambda_a_init=1.0,
        lambda_b_init=0.0,
        layers=None,
    ):
        super().__init__()
        self.targets, self.layers, self.rank = list(targets), layers, rank
        self.share, self.train_projections, self.projection_seed = share, train_projections, projection_seed
        self.share_kv_scaling = share_kv_scaling
        self.scale_init, self.lambda_a_init, self.lambda_b_init = scale_init, lambda_a_init, lambda_b_init
        self.A = nn.ParameterDict()  # pair key -> (r, d_in_max); empty when projections are frozen
        self.B = nn.ParameterDict()  # pair key -> (d_out_max, r)
        self.lambda_a = nn.ParameterDict()  # scaling key -> (r,)
        self.lambda_b = nn.ParameterDict()  # scaling key -> (d_out,)
        self.scale = nn.ParameterDict()  # modality -> ()
        self._frozen_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.points: list[InjectionPoint] = []
        self._pair_of: dict[str, str] = {}  # point id -> pair key
        self._scaling_of: dict[str, str] = {}  # point id -> scaling key
        self._cache: dict[str, tuple] = {}
        self.pair_modalities: dict[str, set[str]] = {}

    # ---- structure -------------------------------------------------------------------------------------------
    def pair_key(self, p: InjectionPoint) -> str:
        if self.share == "all":
            return "decoder" if p.modality == "D" else "shared"
        if self.share == "modality":
            return p.modality
        return p.id

    def scaling_key(self, p: InjectionPoint) -> str:
        if self.share_kv_scaling and p.attention is not None and p.role in ("k", "v"):
            return f"{p.attention}.kv"
        return p.id

    def attach(self, points: Sequence[InjectionPoint]) -> None:
        if self.points:
            raise RuntimeError("VCRA.attach called twice")
        pairs: dict[str, list[InjectionPoint]] = {}
        for p in points:
            pairs.setdefault(self.pair_key(p), []).append(p)
        device = points[0].module.weight.device if points else torch.device("cpu")
        for index, key in enumerate(sorted(pairs)):
            pts = pairs[key]
            d_in, d_out = max(p.in_features for p in pts), max(p.out_features for p in pts)
            a, b = self.draw_pair(self.projection_seed, index, self.rank, d_in, d_out)
            self.pair_modalities[key] = {p.modality for p in pts}
            if self.train_projections:
                self.A[_safe(key)] = nn.Parameter(a.to(device))
                self.B[_safe(key)] = nn.Parameter(b.to(device))
            else:
                self._frozen_pairs[key] = (a.to(device), b.to(device))
        for p in points:
            sk = self.scaling_key(p)
            if _safe(sk) not in self.lambda_a:
                self.lambda_a[_safe(sk)] = nn.Parameter(torch.full((self.rank,), float(self.lambda_a_init), device=device))
                self.lambda_b[_safe(sk)] = nn.Parameter(torch.full((p.out_features,), float(self.lambda_b_init), device=device))
            elif self.lambda_b[_safe(sk)].shape[0] != p.out_features:
                raise ValueError(f"VCRA: points sharing scalings '{sk}' have different output widths")
            if p.modality not in self.scale:
                self.scale[p.modality] = nn.Parameter(torch.tensor(float(self.scale_init), device=device))
            self._pair_of[p.id] = self.pair_key(p)
            self._scaling_of[p.id] = sk
            injection.add_delta(self, p, self._delta_fn(p))
            self.points.append(p)

    @staticmethod
    def draw_pair(seed: int, index: int, rank: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair ``index`` of a VCRA with this seed: ``A (rank, d_in)``, ``B (d_out, rank)``, on the CPU."""
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
        a = torch.randn(rank, d_in, generator=g) / math.sqrt(d_in)
        b = torch.randn(d_out, rank, generator=g) / math.sqrt(rank)
        return a, b

    def pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of a pair: trainable parameters or frozen tensors."""
        if self.train_projections:
            return self.A[_safe(key)], self.B[_safe(key)]
        return self._frozen_pairs[key]

    def pair_for_modality(self, modality: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pair that serves ``modality`` (QASN reuses the fusion pair), or ``None``."""
        for key, mods in self.pair_modalities.items():
            if modality in mods and (self.share != "none"):
                return self.pair(key)
        return None

    # ---- forward ---------------------------------------------------------------------------------------------
    def _project(self, key: str, x: torch.Tensor, d_in: int) -> torch.Tensor:
        a = self.pair(key)[0]
        state = (a._version, torch.is_grad_enabled(), d_in)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is x and hit[1] == state:
            return hit[2]
        ax = F.linear(x, a[:, :d_in].to(x.dtype))  # (..., r)
        self._cache[key] = (x, state, ax)
        return ax

    def _delta_fn(self, p: InjectionPoint):
        pair, sk, d_in, d_out, m = self._pair_of[p.id], _safe(self._scaling_of[p.id]), p.in_features, p.out_features, p.modality

        def delta(x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., d_out)
            ax = self._project(pair, x, d_in)
            b = self.pair(pair)[1]
            la, lb, s = self.lambda_a[sk], self.lambda_b[sk], self.scale[m]
            return F.linear(ax * la.to(x.dtype), b[:d_out].to(x.dtype)) * (lb * s).to(x.dtype)

        return delta

    def clear_cache(self) -> None:
        self._cache.clear()

    def delta_weight(self, point: InjectionPoint) -> torch.Tensor:
        a, b = self.pair(self._pair_of[point.id])
        sk = _safe(self._scaling_of[point.id])
        la, lb, s = self.lambda_a[sk], self.lambda_b[sk], self.scale[point.modality]
        d_in, d_out = point.in_features, point.out_features
        return s * lb[:, None] * (b[:d_out] @ (la[:, None] * a[:, :d_in]))  # (d_out, d_in)

    def merge(self) -> None:
        self.clear_cache()
        injection.merge(self, self.points, self.delta_weight)

    def unmerge(self) -> None:
        injection.unmerge(self, self.points, self.delta_weight)

    def modality_of_parameter(self, name: str) -> str:
        group, _, key = name.partition(".")
        if group == "scale":
            return key
        if group in ("A", "B"):
            mods = next((m for k, m in self.pair_modalities.items() if _safe(k) == key), set())
            return next(iter(mods)) if len(mods) == 1 else "shared"
        for p in self.points:
            if _safe(self._scaling_of[p.id]) == key:
                return p.modality
        return "shared"

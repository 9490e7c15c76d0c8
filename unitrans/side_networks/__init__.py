"""Side networks: registered builders (light). Implementations: ``qasn.py``."""

from __future__ import annotations

from typing import Literal

from unitrans import registry
from unitrans.options import PositiveInt


@registry.side_networks.register("qasn.v1")
def qasn_v1(
    rank: PositiveInt = 64,
    filter: Literal["gate", "literal", "centred"] = "gate",
    projections: Literal["shared", "own"] = "shared",
    projection_seed: int = 0,
):
    """QASN (UniTrans eq. 5-6): a side network beside the fusion blocks that re-injects query information.

    ``h_0 = 0``, ``h_{i+1} = h_i + x_i w_i`` with ``w_i = diag(λb_i) B diag(λa_i) A``, and the fusion stream
    becomes ``x_{i+1} = b_i(x_i, x^V) + f(h_{i+1})``.

    Args:
        rank: r of the side network's low-rank maps (when it draws its own pair).
        filter: ``gate`` (default): ``f(h) = σ(α⊙h+β) ⊙ h``, identity at init; ``literal``:
            ``f(h) = σ(α⊙h+β)`` as eq. 6 is printed (adds 0.5 everywhere at init); ``centred``:
            ``f(h) = σ(α⊙h+β) - 1/2``, the printed filter less its value at init: the same function of α, β and h
            up to a constant, so the same gradients, and identity at init (the paper specs use it).
        projections: ``shared``: reuse the fusion pair (A, B) of a VCRA adapter in the same spec, as the paper
            does (falls back to ``own`` without one); ``own``: a frozen pair drawn from ``projection_seed``.
        projection_seed: seed of the own pair.
    """
    from unitrans.side_networks.qasn import QASN

    return QASN(rank=rank, filter=filter, projections=projections, projection_seed=projection_seed)

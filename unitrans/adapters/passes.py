"""Pass-dependent injection points: one linear adapted differently in the text-only and in the fused pass.

BLIP's text encoder is one set of BERT layers run twice: alone (the text encoder, modality T) and over the image
tokens (the fusion network, modality C). A backbone declares its self-attention linears twice: ``text.attn.*``
(mode-free: they act in every pass) and ``fusion.self.*`` (mode ``"fused"``). When one adapter targets both on the
same rows, the fused pass is the fusion network's own (eq. 4: one modality's scaling per input) and the mode-free
point keeps the other pass only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from unitrans.errors import UserError
from unitrans.interfaces import InjectionPoint

_OTHER = {"fused": "text", "text": "fused"}


def _rows(p: InjectionPoint) -> tuple[int, int, int]:
    sl = p.out_slice or slice(0, p.out_features)
    return id(p.module), sl.start, sl.stop


def split_passes(points: Sequence[InjectionPoint]) -> list[InjectionPoint]:
    """``points`` with every mode-free point that shares its linear and rows with a targeted pass-specific point
    restricted to the other pass (a copy with ``mode`` set; the backbone's point is not changed).

    Returns:
        the points in the same order.
    """
    moded = {_rows(p): p for p in points if p.mode is not None}
    out = []
    for p in points:
        twin = moded.get(_rows(p)) if p.mode is None else None
        if twin is not None:
            p = dataclasses.replace(p, mode=_OTHER[twin.mode], current_pass=twin.current_pass, start=twin.start)
        out.append(p)
    return out


def refuse_pass_dependent_merge(owner: str, points: Sequence[InjectionPoint]) -> None:
    """Merging folds an update into the frozen weight for every call; a pass-dependent one cannot be folded.

    Raises:
        UserError: naming the first such point.
    """
    for p in points:
        if p.mode is not None:
            raise UserError(
                f"{owner}: point {p.id} acts only in the {p.mode} pass of its linear, so its update cannot be merged "
                "into the frozen weight (which serves every pass); keep the adapter unmerged (run with hooks), or "
                "target mode-free points only"
            )

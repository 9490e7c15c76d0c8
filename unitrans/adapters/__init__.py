"""Adapters: registered builders (light: no torch at import). Implementations: ``lora.py``, ``vcra.py``.

A builder's typed signature is its spec schema: ``[[adapters]] name = "vcra.v1"  rank = 64`` is validated against
:func:`vcra_v1`'s parameters before anything heavy is imported.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from unitrans import registry

PositiveInt = Annotated[int, Field(gt=0)]
DEFAULT_TARGETS = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]  # paper §4.1: q, k, v


@registry.adapters.register("lora.v1")
def lora_v1(
    targets: list[str] = ["vision.attn.q", "vision.attn.v", "text.attn.q", "text.attn.v"],
    rank: PositiveInt = 8,
    alpha: Annotated[float, Field(gt=0)] | None = None,
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    layers: list[int] | None = None,
):
    """LoRA (Hu et al. 2021; UniTrans eq. 2): ``h = W0 x + (alpha / r) B A x`` with its own A, B per point.

    Args:
        targets: globs over the backbone's injection points (``"vision.attn.*"``, ``"*.attn.q"``).
        rank: r.
        alpha: scaling numerator; ``None`` means ``alpha = rank`` (scale 1).
        dropout: dropout on the adapter's input.
        layers: restrict to these layer indices (``None``: all layers).
    """
    from unitrans.adapters.lora import LoRA

    return LoRA(targets=targets, rank=rank, alpha=alpha, dropout=dropout, layers=layers)


@registry.adapters.register("vcra.v1")
def vcra_v1(
    targets: list[str] = DEFAULT_TARGETS,
    rank: PositiveInt = 64,
    share: Literal["all", "encoder", "modality", "none"] = "all",
    train_projections: bool = True,
    projection_seed: int = 0,
    share_kv_scaling: bool | Literal["cross"] = True,
    scale_init: float = 1.0,
    lambda_a_init: float = 1.0,
    lambda_b_init: float = 0.0,
    layers: list[int] | None = None,
):
    """VCRA (UniTrans eq. 3-4): ``h = W0 x + s_M diag(λb) B diag(λa) A x`` with A, B shared across modalities.

    Args:
        targets: globs over the backbone's injection points.
        rank: r, the rows of A.
        share: ``"all"`` one A, B pair for vision, text and fusion (the decoder gets its own); ``"encoder"`` one
            pair per encoder: the ViT's, the BERT's (text and fusion: one BERT) and the decoder's (Table 8 "+scaling
            vectors": "random matrices shared in each transformer block of single modality"); ``"modality"`` one
            pair per modality (V, T, C, D); ``"none"`` one pair per point.
        train_projections: train A and B (the paper's parameter count includes them). ``False``: frozen,
            regenerated from ``projection_seed`` and never saved (VeRA-style).
        projection_seed: seed of the generator that draws A and B (same on every machine and rank).
        share_kv_scaling: k and v of one attention share their λ pair (paper §4.1); ``"cross"``: only in the
            cross-attentions (their k and v read the image tokens).
        scale_init: initial value of the learnable per-modality scale ``s``.
        lambda_a_init: initial λa (paper: 1).
        lambda_b_init: initial λb (paper: 0, so the model equals the frozen backbone at init).
        layers: restrict to these layer indices (``None``: all layers).
    """
    from unitrans.adapters.vcra import VCRA

    return VCRA(
        targets=targets,
        rank=rank,
        share=share,
        train_projections=train_projections,
        projection_seed=projection_seed,
        share_kv_scaling=share_kv_scaling,
        scale_init=scale_init,
        lambda_a_init=lambda_a_init,
        lambda_b_init=lambda_b_init,
        layers=layers,
    )

"""Adapters: registered builders (light: no torch at import). Implementations: ``lora.py``, ``vcra.py``.

Each adapter's options are declared once, as an :class:`~unitrans.options.Options` class here: the fields are the
spec keys (``[[adapters]] name = "vcra.v1"  rank = 64``), validated before anything heavy is imported, and the
implementation receives the validated object.
"""

from __future__ import annotations

from typing import Literal

from unitrans import registry
from unitrans.options import Options, PositiveFloat, PositiveInt, Probability, builds

DEFAULT_TARGETS = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]  # paper §4.1: q, k, v


class LoRAOptions(Options):
    """LoRA (Hu et al. 2021; UniTrans eq. 2): ``h = W0 x + (alpha / r) B A x`` with its own A, B per point."""

    targets: list[str] = ["vision.attn.q", "vision.attn.v", "text.attn.q", "text.attn.v"]
    """globs over the backbone's injection points (``"vision.attn.*"``, ``"*.attn.q"``)."""
    rank: PositiveInt = 8
    """r."""
    alpha: PositiveFloat | None = None
    """scaling numerator; ``None`` means ``alpha = rank`` (scale 1)."""
    dropout: Probability = 0.0
    """dropout on the adapter's input."""
    layers: list[int] | None = None
    """restrict to these layer indices (``None``: all layers)."""


class VCRAOptions(Options):
    """VCRA (UniTrans eq. 3-4): ``h = W0 x + s_M diag(λb) B diag(λa) A x`` with A, B shared across modalities."""

    targets: list[str] = DEFAULT_TARGETS
    """globs over the backbone's injection points."""
    rank: PositiveInt = 64
    """r, the rows of A."""
    share: Literal["all", "encoder", "modality", "none"] = "all"
    """``"all"`` one A, B pair for vision, text and fusion (the decoder gets its own); ``"encoder"`` one pair per
    encoder: the ViT's, the BERT's (text and fusion: one BERT) and the decoder's (Table 8 "+scaling vectors":
    "random matrices shared in each transformer block of single modality"); ``"modality"`` one pair per modality
    (V, T, C, D); ``"none"`` one pair per point."""
    train_projections: bool = True
    """train A and B (the paper's parameter count includes them). ``False``: frozen, regenerated from
    ``projection_seed`` and never saved (VeRA-style)."""
    projection_seed: int = 0
    """seed of the generator that draws A and B (same on every machine and rank)."""
    share_kv_scaling: bool | Literal["cross"] = True
    """k and v of one attention share their λ pair (paper §4.1); ``"cross"``: only in the cross-attentions (their
    k and v read the image tokens)."""
    scale_init: float = 1.0
    """initial value of the learnable per-modality scale ``s``."""
    lambda_a_init: float = 1.0
    """initial λa (paper: 1)."""
    lambda_b_init: float = 0.0
    """initial λb (paper: 0, so the model equals the frozen backbone at init)."""
    layers: list[int] | None = None
    """restrict to these layer indices (``None``: all layers)."""


@registry.adapters.register("lora.v1")
@builds(LoRAOptions)
def lora_v1(options: LoRAOptions):
    from unitrans.adapters.lora import LoRA

    return LoRA(options)


@registry.adapters.register("vcra.v1")
@builds(VCRAOptions)
def vcra_v1(options: VCRAOptions):
    from unitrans.adapters.vcra import VCRA

    return VCRA(options)

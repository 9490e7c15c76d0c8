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


class VeRAOptions(Options):
    """VeRA (Kopiczko et al. 2024) as PEFT defines it: ``h = W0 x + diag(λb) B diag(λd) A x`` with one frozen random
    pair ``A (r, d_in_max)``, ``B (d_out_max, r)`` for every point (sliced to each point's width) and trainable
    ``λd ∈ R^r``, ``λb ∈ R^{d_out}`` per point."""

    targets: list[str] = DEFAULT_TARGETS
    """globs over the backbone's injection points."""
    rank: PositiveInt = 256
    """r, the rows of A (PEFT's default: 256)."""
    projection_seed: int = 0
    """seed of the CPU generator that draws A, then B (PEFT's ``projection_prng_key``); never saved: regenerated."""
    d_initial: float = 0.1
    """initial λd (PEFT's ``d_initial``; λb starts at 0, so the model equals the frozen backbone at init)."""
    dropout: Probability = 0.0
    """dropout on the adapter's input (PEFT's ``vera_dropout``)."""
    layers: list[int] | None = None
    """restrict to these layer indices (``None``: all layers)."""


class UniAdapterOptions(Options):
    """UniAdapter (Lu et al. 2023): a bottleneck adapter per layer index, its down-projection shared by the vision, text
    and cross-modal branches, one up-projection per branch, the query residual in the fused pass, and optional
    parameter-free frame-aware attention for video. Acts on sub-block points (``*.ffn``, ``*.query``); it has a
    ReLU, so it cannot be merged into weights or exported."""

    targets: list[str] = ["*.ffn", "*.query"]
    """globs over the backbone's sub-block points: ``vision.ffn``, ``text.ffn``, ``fusion.ffn``, ``fusion.query``
    (the query residual), ``decoder.ffn``, ``decoder.query``."""
    rank: PositiveInt = 128
    """the bottleneck width r (UniAdapter's ``adapter_dim``; the paper's rows: 128 and 512)."""
    scale: float = 0.1
    """the fixed factor on the adapter's output (UniAdapter's ``adapter_scalar``)."""
    layer_norm: Literal["in", "out", "none"] = "in"
    """a trainable LayerNorm on the adapter's input (UniAdapter's default ``"in"``), on its output, or none."""
    init: Literal["uniadapter", "zero"] = "uniadapter"
    """``"uniadapter"``: as its retrieval script leaves it (down Kaiming-uniform, text up-projection zero, vision and
    cross-modal up-projections N(0, 0.02²), biases 0; *not* the identity at init); ``"zero"``: every
    up-projection zero (the model equals the frozen backbone at init)."""
    dropout: Probability = 0.0
    """dropout after the ReLU."""
    frame_aware_attention: bool = False
    """for video: scale the cross-attention keys of frame t's patch tokens by ``T · softmax_t(sim(text, frame_t) /
    frame_temperature)`` (no gradient through the weights); acts on ``fusion.attn.k`` and needs the retrieval
    model's ITC projections."""
    frame_temperature: PositiveFloat = 4.0
    """the divisor of the text-frame cosine similarities in frame-aware attention (UniAdapter: 4)."""
    layers: list[int] | None = None
    """restrict to these layer indices (``None``: all layers)."""


@registry.adapters.register("vera.v1")
@builds(VeRAOptions)
def vera_v1(options: VeRAOptions):
    from unitrans.adapters.vera import VeRA

    return VeRA(options)


@registry.adapters.register("uniadapter.v1")
@builds(UniAdapterOptions)
def uniadapter_v1(options: UniAdapterOptions):
    from unitrans.adapters.uniadapter import UniAdapter

    return UniAdapter(options)

"""First-party CLIP backbone plugin (``clip.v1``), through ``open_clip``.

Loaded through the ``unitrans.plugins`` entry-point group, exactly as a third-party plugin is. This module is
light (no torch, no open_clip at import): the builder's signature is the spec schema, the implementation is in
``backbone.py``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from unitrans import registry
from unitrans.options import PositiveInt


@registry.backbones.register("clip.v1")
def clip_v1(
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    preset: Literal["tiny"] | None = None,
    freeze: bool = True,
    train_parts: list[str] = [],
    image_size: PositiveInt | None = None,
    max_text_length: Annotated[int, Field(gt=1)] | None = None,
    random_init: bool = False,
):
    """CLIP (Radford et al. 2021) from ``open_clip``, frozen: a dual encoder for ITC retrieval, no fusion network.

    Injection points: ``vision.attn.{q,k,v,out}``, ``vision.mlp.{fc1,fc2}`` [V] and the same under ``text.`` [T]
    (q, k, v are slices of each block's fused ``in_proj_weight``). No ``fusion.*`` point and no
    ``fusion.blocks``: QASN and ITM need a fusion network CLIP does not have; run retrieval with
    ``task.itm_weight = 0`` and ``task.rerank = "itc"``.

    Args:
        model: an open_clip architecture name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ...; ``open_clip.list_models()``).
            Models with timm / Hugging Face towers, a ResNet image tower or custom attention blocks are refused.
        pretrained: an open_clip pretrained tag of ``model`` (``openai``, ``laion2b_s34b_b79k``, ...: downloaded once
            into open_clip's cache) or a local checkpoint file. Mutually exclusive with ``preset``.
        preset: ``tiny``: a random-init CLIP (64 wide, 2 layers per tower, 64 px, patch 8, context 32) with
            open_clip's real BPE tokenizer, for tests and the offline quickstart; ``model`` is then ignored.
        freeze: freeze every backbone weight (``false``: full fine-tuning).
        train_parts: submodules or parameters of the open_clip model that train anyway (``["visual.proj"]``,
            ``["ln_final"]``). The alignment loss owns its temperature: ``logit_scale`` gets no gradient from it.
        image_size: input resolution (default: the model's or preset's; a pretrained ViT's position embedding is
            interpolated by open_clip).
        max_text_length: tokenizer truncation length (default and maximum: the model's context length; for the
            preset it sets the context length).
        random_init: build ``model``'s architecture with random weights and no download (``unitrans params`` sets
            it: parameter accounting needs the architecture, not the weights).
    """
    from unitrans_clip.backbone import ClipBackbone

    return ClipBackbone(
        model=model,
        pretrained=pretrained,
        preset=preset,
        freeze=freeze,
        train_parts=train_parts,
        image_size=image_size,
        max_text_length=max_text_length,
        random_init=random_init,
    )

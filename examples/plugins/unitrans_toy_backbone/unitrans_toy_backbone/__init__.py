"""An example third-party backbone plugin: registers ``toy.v1`` when imported.

Keep this module light (no torch at import): ``unitrans list`` and ``unitrans validate`` import it through the
entry point, and the builder's typed signature is all they need (it is the spec schema). The model itself is in
``backbone.py``, imported inside the builder's body.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from unitrans import registry

PositiveInt = Annotated[int, Field(gt=0)]


@registry.backbones.register("toy.v1")
def toy_v1(
    width: PositiveInt = 32,
    hidden: PositiveInt = 64,
    image_size: Annotated[int, Field(ge=8)] = 32,
    patch_size: PositiveInt = 8,
    vocab_size: PositiveInt = 1024,
    seed: int = 0,
):
    """A tiny random-init dual encoder (patch embedding / hashed words, one MLP block per tower), frozen.

    Injection points: ``vision.mlp.{fc1,fc2}`` [V] and ``text.mlp.{fc1,fc2}`` [T]. ITC retrieval only (no fusion
    network): use ``task.itm_weight = 0`` and ``task.rerank = "itc"``.

    Args:
        width: token width of both towers (and of the joint embedding).
        hidden: width of the MLP block.
        image_size: input resolution.
        patch_size: side of an image patch.
        vocab_size: hash buckets of the word tokenizer.
        seed: seed of the random init (the frozen weights).
    """
    from unitrans_toy_backbone.backbone import ToyBackbone

    return ToyBackbone(width=width, hidden=hidden, image_size=image_size, patch_size=patch_size,
                       vocab_size=vocab_size, seed=seed)

"""An example third-party backbone plugin: registers ``toy.v1`` when imported.

Keep this module light (no torch at import): ``unitrans list`` and ``unitrans validate`` import it through the
entry point, and the options class is all they need (it is the spec schema). The model itself is in
``backbone.py``, imported inside the builder's body.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from unitrans import registry
from unitrans.options import Options, PositiveInt, builds


class ToyOptions(Options):
    """A tiny random-init dual encoder (patch embedding / hashed words, one MLP block per tower), frozen.

    Injection points: ``vision.mlp.{fc1,fc2}`` [V] and ``text.mlp.{fc1,fc2}`` [T]. One capability, ``DualEncoder``:
    ITC retrieval only (``task.itm_weight = 0``, ``task.rerank = "itc"``); a task that needs more is refused by name.
    """

    width: PositiveInt = 32
    """token width of both towers (and of the joint embedding)."""
    hidden: PositiveInt = 64
    """width of the MLP block."""
    image_size: Annotated[int, Field(ge=8)] = 32
    """input resolution."""
    patch_size: PositiveInt = 8
    """side of an image patch."""
    vocab_size: PositiveInt = 1024
    """hash buckets of the word tokenizer."""
    seed: int = 0
    """seed of the random init (the frozen weights)."""


@registry.backbones.register("toy.v1")
@builds(ToyOptions)
def toy_v1(options: ToyOptions):
    from unitrans_toy_backbone.backbone import ToyBackbone

    return ToyBackbone(options)

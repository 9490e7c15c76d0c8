"""First-party LLaVA backbone plugin (``llava.v1``).

Loaded through the ``unitrans.plugins`` entry-point group, as a third-party plugin is. This module is light (no
torch at import): :class:`LlavaOptions` is the spec schema, the implementation is in ``backbone.py``.
"""

from __future__ import annotations

from typing import Literal

from unitrans import registry
from unitrans.backbone_options import HFBackboneOptions
from unitrans.options import builds


class LlavaOptions(HFBackboneOptions):
    """LLaVA (Liu et al. 2023) from Hugging Face ``transformers`` (``LlavaForConditionalGeneration``), frozen: a
    CLIP vision tower, an MLP projector and a Llama language model reading the projected image tokens.

    Captioning and VQA by generation (``EncoderDecoder``, ``QuestionEncoder``). There is no fusion network: the
    language model's layers, which read the image tokens, are the ``fusion.blocks`` a side network (QASN) hooks.
    There are no paired unimodal image and text features either, so ITC, MCAM and ITM retrieval are refused by
    name. Injection points: ``vision.*`` (the vision layers whose output the projector reads), ``projector.fc1``,
    ``projector.fc2`` (the MLP projector), ``decoder.attn.*``, ``decoder.mlp.{gate,fc1,fc2}`` (the language model).
    """

    preset: Literal["tiny"] | None = None
    """``tiny``: a random-init LLaVA built from a config, no download (CLIP ViT 64 wide x 3 layers at 64 px /
    patch 8, the second-to-last layer's patch tokens projected by a 2-layer MLP into a Llama 96 wide x 2 layers).
    Mutually exclusive with ``pretrained``."""
    question_template: str = "USER: <image>\n{question} ASSISTANT:"
    """VQA: the language model's input around the image tokens (``<image>``), LLaVA-1.5's conversation format."""


@registry.backbones.register("llava.v1")
@builds(LlavaOptions)
def llava_v1(options: LlavaOptions):
    from unitrans_llava.backbone import LlavaBackbone

    return LlavaBackbone(options)

"""First-party LLaVA backbone plugin (``llava.v1``).

Loaded through the ``unitrans.plugins`` entry-point group, as a third-party plugin is. This module is light (no
torch at import): :class:`LlavaOptions` is the spec schema, the implementation is in ``backbone.py``.
"""

from __future__ import annotations

from typing import Literal

from unitrans import registry
from unitrans.options import Options, PositiveInt, builds


class LlavaOptions(Options):
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
    pretrained: str | None = None
    """a hub id (``llava-hf/llava-1.5-7b-hf``) or a local ``save_pretrained`` directory with the processor."""
    freeze: bool = True
    """freeze every backbone weight (``false``: full fine-tuning)."""
    train_parts: list[str] = []
    """backbone submodules that train anyway (e.g. ``["model.multi_modal_projector"]``)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """storage type of the frozen weights; adapters always train in float32."""
    image_size: PositiveInt | None = None
    """input resolution (default: the checkpoint's or preset's; position embeddings are interpolated)."""
    max_text_length: PositiveInt = 35
    """truncation of decoder sequences and questions (special tokens included)."""
    question_template: str = "USER: <image>\n{question} ASSISTANT:"
    """VQA: the language model's input around the image tokens (``<image>``), LLaVA-1.5's conversation format."""
    gradient_checkpointing: bool = False
    """recompute the frozen blocks' activations in backward (the activation checkpointing of ``fsdp`` runs)."""
    random_init: bool = False
    """with ``pretrained``, build the architecture with random weights and no download (from a local directory's
    config.json, or the public config of a known hub id) on the meta device: ``unitrans params`` sets it."""


@registry.backbones.register("llava.v1")
@builds(LlavaOptions)
def llava_v1(options: LlavaOptions):
    from unitrans_llava.backbone import LlavaBackbone

    return LlavaBackbone(options)

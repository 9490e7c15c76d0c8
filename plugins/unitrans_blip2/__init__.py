"""First-party BLIP-2 backbone plugin (``blip2.v1``).

Loaded through the ``unitrans.plugins`` entry-point group, as a third-party plugin is. This module is light (no
torch at import): :class:`Blip2Options` is the spec schema, the implementation is in ``backbone.py``.
"""

from __future__ import annotations

from typing import Literal

from unitrans import registry
from unitrans.options import Options, PositiveInt, builds


class Blip2Options(Options):
    """BLIP-2 (Li et al. 2023) from Hugging Face ``transformers``, frozen: a ViT, a Q-Former and a language model.

    ``task_model = "retrieval"`` builds ``Blip2ForImageTextRetrieval`` (ITC over the Q-Former's query features, the
    ITM head); ``"captioning"`` and ``"vqa"`` build ``Blip2ForConditionalGeneration`` (OPT or Flan-T5 reads the
    projected queries as prefix embeddings). Injection points: ``vision.*`` (the ViT), ``fusion.self.*`` (Q-Former
    self-attention on the query tokens), ``fusion.attn.*`` (its cross-attention to the image), ``fusion.mlp.*``
    (the queries' feed-forward), ``text.*`` (the Q-Former's text tokens), ``projector.fc1`` (the language
    projection), ``decoder.*`` (the language model); ``fusion.blocks`` = the Q-Former layers.
    """

    preset: Literal["tiny", "tiny_t5"] | None = None
    """a random-init architecture built from a config, no download: ``tiny`` (ViT 64 wide, Q-Former 48 wide, OPT
    96 wide, 2 layers each, 8 queries, 64 px: the widths differ on purpose) or ``tiny_t5`` (the same with a
    Flan-T5-style gated encoder-decoder LM). Mutually exclusive with ``pretrained``."""
    pretrained: str | None = None
    """a hub id (``Salesforce/blip2-opt-2.7b``; ``Salesforce/blip2-itm-vit-g`` for retrieval) or a local
    ``save_pretrained`` directory with the model and its processor."""
    task_model: Literal["retrieval", "captioning", "vqa"] = "retrieval"
    """which head: ``retrieval`` (``Blip2ForImageTextRetrieval``), ``captioning`` or ``vqa`` (both
    ``Blip2ForConditionalGeneration``)."""
    freeze: bool = True
    """freeze every backbone weight (``false``: full fine-tuning)."""
    train_parts: list[str] = []
    """backbone submodules that train anyway (e.g. ``["itm_head"]``, ``["query_tokens"]``)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """storage type of the frozen weights (the Q-Former and the query tokens stay float32, as transformers keeps
    them); adapters always train in float32."""
    image_size: PositiveInt | None = None
    """input resolution (default: the checkpoint's or preset's; position embeddings are interpolated)."""
    max_text_length: PositiveInt = 35
    """truncation of texts and decoder sequences (special tokens included)."""
    question_template: str = "Question: {question} Answer:"
    """VQA: the language model's input after the image tokens (``<image>`` places the image tokens elsewhere)."""
    gradient_checkpointing: bool = False
    """recompute the frozen blocks' activations in backward (the activation checkpointing of ``fsdp`` runs)."""
    random_init: bool = False
    """with ``pretrained``, build the architecture with random weights and no download (from a local directory's
    config.json, or the public config of a known hub id) on the meta device: ``unitrans params`` sets it."""


@registry.backbones.register("blip2.v1")
@builds(Blip2Options)
def blip2_v1(options: Blip2Options):
    from unitrans_blip2.backbone import Blip2Backbone

    return Blip2Backbone(options)

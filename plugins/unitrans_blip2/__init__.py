"""First-party BLIP-2 backbone plugin (``blip2.v1``).

Loaded through the ``unitrans.plugins`` entry-point group, as a third-party plugin is. This module is light (no
torch at import): :class:`Blip2Options` is the spec schema, the implementation is in ``backbone.py``.
"""

from __future__ import annotations

from typing import Literal

from unitrans import registry
from unitrans.backbone_options import HFBackboneOptions
from unitrans.options import builds


class Blip2Options(HFBackboneOptions):
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
    task_model: Literal["retrieval", "captioning", "vqa"] = "retrieval"
    """which head: ``retrieval`` (``Blip2ForImageTextRetrieval``), ``captioning`` or ``vqa`` (both
    ``Blip2ForConditionalGeneration``)."""
    question_template: str = "Question: {question} Answer:"
    """VQA: the language model's input after the image tokens (``<image>`` places the image tokens elsewhere)."""


@registry.backbones.register("blip2.v1")
@builds(Blip2Options)
def blip2_v1(options: Blip2Options):
    from unitrans_blip2.backbone import Blip2Backbone

    return Blip2Backbone(options)

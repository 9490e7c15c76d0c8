"""Image-text retrieval in BLIP's annotation format (``coco_karpathy_*.json``, ``flickr30k_*.json``).

Train file: a JSON list of ``{"image": "rel/path.jpg", "caption": "...", "image_id": <str or int>}``, one entry per
caption (entries without ``image_id`` are grouped by image file). Eval file (val / test): a JSON list of
``{"image": "rel/path.jpg", "caption": ["...", ...]}``, one entry per image. Reading and checking:
:mod:`unitrans.data.entries`; the builder: :class:`unitrans.data.BlipRetrievalData`.
"""

from __future__ import annotations

from typing import Any, Sequence

from unitrans.data import BlipRetrievalData
from unitrans.data.entries import pre_caption
from unitrans.errors import DataError

__all__ = ["BlipRetrievalData", "DataError", "collate_retrieval", "pre_caption"]


def collate_retrieval(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks items of the retrieval and captioning datasets.

    Args:
        batch: items with ``image`` (3, H, W) or a video (T, 3, H, W), and some of ``caption``, ``image_id``,
            ``index``.

    Returns:
        ``image`` (B, ...); ``image_id`` / ``index`` LongTensor (B,); any other key as a list of B.
    """
    import torch

    if not batch:
        raise ValueError("collate_retrieval: empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key == "image":
            out[key] = torch.stack(values)  # (B, 3, H, W) or (B, T, 3, H, W)
        elif key in ("image_id", "index"):
            out[key] = torch.tensor(values, dtype=torch.long)  # (B,)
        else:
            out[key] = values
    return out

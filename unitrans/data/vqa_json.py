"""VQA in BLIP's format (``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``, ``vqa_test.json``, ``answer_list.json``).

A question file is a JSON list of ``{"question_id", "question", "answer": [...], "image", "dataset"}``; ``answer``
holds the humans' answers (10 in VQAv2; absent or empty in the test files) and ``dataset`` is ``"vqa"`` (image
under ``image_root``) or ``"vg"`` (Visual Genome QA, image under ``vg_root``, one answer of weight 0.2, as BLIP
trains). Train items carry each distinct answer with its weight; :func:`collate_vqa` flattens them (BLIP's
``vqa_collate_fn``). Reading: :func:`unitrans.data.entries.questions`.
"""

from __future__ import annotations

from typing import Any, Sequence

from unitrans.data import BlipVQAData
from unitrans.data.entries import VG_WEIGHT, answer_weights, pre_question, read_answer_list

__all__ = ["BlipVQAData", "VG_WEIGHT", "answer_weights", "collate_vqa", "pre_question", "read_answer_list"]


def collate_vqa(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks VQA items (images or videos).

    Returns:
        ``image (B, ...)``, ``question`` (B strings); train items: ``answer`` (A strings), ``weight (A,)``,
        ``n (B,)`` answers per question; eval items: ``question_id`` and ``answers`` (lists of B).
    """
    import torch

    if not batch:
        raise ValueError("collate_vqa: empty batch")
    out: dict[str, Any] = {"image": torch.stack([b["image"] for b in batch]),  # (B, 3, H, W)
                           "question": [b["question"] for b in batch]}
    if "weights" in batch[0]:
        out["answer"] = [a for b in batch for a in b["answers"]]
        out["weight"] = torch.tensor([w for b in batch for w in b["weights"]], dtype=torch.float)  # (A,)
        out["n"] = torch.tensor([len(b["answers"]) for b in batch], dtype=torch.long)  # (B,)
    else:
        out["question_id"] = [b["question_id"] for b in batch]
        out["answers"] = [b["answers"] for b in batch]
    return out

"""VQA datasets in BLIP's format (``vqa_train.json``, ``vqa_val.json``, ``vqa_test.json``, ``answer_list.json``).

A question file is a JSON list of ``{"question_id", "question", "answer": [...], "image", "dataset"}``;
``answer`` holds the humans' answers (10 in VQAv2; absent or empty in the test files) and ``dataset`` is
``"vqa"`` (image under ``image_root``) or ``"vg"`` (Visual Genome QA, image under ``vg_root``, one answer of
weight 0.2, as BLIP trains). ``answer_list.json`` is a JSON list of candidate answers for ``rank`` inference.

Train items carry each distinct answer with its weight (the fraction of the humans who gave it); the collate
flattens them and records how many belong to each question (BLIP's ``vqa_collate_fn``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from unitrans.data.blip_json import DataError, _check_root, _read_annotation, _require
from unitrans.data.images import ImageTransform, load_image
from unitrans.interfaces import DataModule

_QUESTION_PUNCT = re.compile(r"[.!\"()*#:;~]")
VG_WEIGHT = 0.2


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's question cleaning: lower-case, drop ``. ! " ( ) * # : ; ~``, keep the first ``max_words`` words."""
    words = _QUESTION_PUNCT.sub("", question.lower()).rstrip().split(" ")
    return " ".join(words[:max_words])


def read_answer_list(path: str | Path) -> list[str]:
    """Candidate answers: BLIP's ``answer_list.json`` (a list) or LAVIS's ``{answer: label}`` (ordered by label).

    Raises:
        DataError: missing / malformed file, or neither a non-empty list of strings nor such a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"answer list file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON: {exc}") from exc
    if isinstance(data, dict):
        data = [a for a, _ in sorted(data.items(), key=lambda kv: (kv[1], kv[0]))]
    if not isinstance(data, list) or not data or not all(isinstance(a, str) for a in data):
        raise DataError(f"{path}: expected a non-empty JSON list of answers or an {{answer: label}} object")
    return data


def _answers(path: Path, i: int, entry: dict) -> list[str]:
    answers = entry.get("answer", [])
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{path}: entry {i} key 'answer' must be a list of strings")
    return answers


def answer_weights(answers: Sequence[str], dataset: str = "vqa") -> tuple[list[str], list[float]]:
    """Distinct answers (first-seen order) with the fraction of humans that gave each; ``vg``: weight 0.2."""
    if dataset == "vg":
        return [answers[0]], [VG_WEIGHT]
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1.0 / len(answers)
    return list(weights), list(weights.values())


class VQATrainDataset(torch.utils.data.Dataset):
    """One item per question: ``{"image", "question", "answers", "weights"}``.

    Args:
        ann_files: BLIP question files (their entries need at least one answer).
        image_root: folder of ``dataset: "vqa"`` images; vg_root: of ``dataset: "vg"`` images.
        transform: PIL image -> ``(3, H, W)``.
        max_words: questions are cut to this many words.

    Raises:
        DataError: a missing / malformed file or an entry without ``image``, ``question`` or answers.
    """

    def __init__(self, ann_files: Sequence[str | Path], image_root, transform: Callable[[Any], torch.Tensor],
                 vg_root=None, max_words: int = 50):
        self.transform = transform
        roots = {"vqa": _check_root(image_root), "vg": _check_root(vg_root) if vg_root is not None else None}
        self.annotation: list[tuple[str, str, list[str], list[float]]] = []
        for f in ann_files:
            path = Path(f)
            for i, e in enumerate(_read_annotation(path)):
                image = _require(path, i, e, "image", str)
                question = _require(path, i, e, "question", str)
                source = e.get("dataset", "vqa")
                if source not in roots:
                    raise DataError(f"{path}: entry {i} key 'dataset' is '{source}'; expected 'vqa' or 'vg'")
                root = roots[source] or roots["vqa"]
                answers = _answers(path, i, e)
                if not answers:
                    raise DataError(f"{path}: entry {i} has no answer to train on")
                answers, weights = answer_weights(answers, source)
                self.annotation.append((str(root / image), pre_question(question, max_words), answers, weights))

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, question, answers, weights = self.annotation[i]
        return {"image": self.transform(load_image(path)), "question": question, "answers": answers,
                "weights": weights}


class VQAEvalDataset(torch.utils.data.Dataset):
    """One item per question: ``{"image", "question", "question_id", "answers"}`` (answers may be empty).

    Attributes:
        answer_list: candidate answers for ``rank`` inference (``None`` when the data gives none).
    """

    def __init__(self, ann_file: str | Path, image_root, transform: Callable[[Any], torch.Tensor],
                 answer_list: list[str] | None = None, max_words: int = 50):
        self.ann_file = Path(ann_file)
        root = _check_root(image_root)
        self.transform = transform
        self.answer_list = answer_list
        self.items: list[tuple[str, str, Any, list[str]]] = []
        seen = set()
        for i, e in enumerate(_read_annotation(self.ann_file)):
            image = _require(self.ann_file, i, e, "image", str)
            question = _require(self.ann_file, i, e, "question", str)
            qid = _require(self.ann_file, i, e, "question_id", (int, str))
            if qid in seen:
                raise DataError(f"{self.ann_file}: entry {i}: question_id {qid!r} appears twice")
            seen.add(qid)
            self.items.append((str(root / image), pre_question(question, max_words), qid,
                               _answers(self.ann_file, i, e)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, question, qid, answers = self.items[i]
        return {"image": self.transform(load_image(path)), "question": question, "question_id": qid,
                "answers": answers}


def collate_vqa(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks VQA items.

    Returns:
        ``image (B, 3, H, W)``, ``question`` (B strings); train items: ``answer`` (A strings), ``weight (A,)``,
        ``n (B,)`` answers per question; eval items: ``question_id`` and ``answers`` (lists of B).
    """
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


class BlipVQAData:
    """The ``blip_vqa.v1`` dataset: BLIP's VQA question files and answer list, materialised by :meth:`setup`."""

    def __init__(self, image_root, train_files=(), val_file=None, test_file=None, answer_list=None, vg_root=None,
                 max_words=50, min_scale=0.5):
        self.image_root = Path(image_root)
        self.train_files = [Path(f) for f in train_files]
        self.val_file, self.test_file, self.answer_list = val_file, test_file, answer_list
        self.vg_root, self.max_words, self.min_scale = vg_root, max_words, min_scale

    def setup(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> DataModule:
        """Reads and checks the question files and the answer list (not the images)."""
        train_tf = ImageTransform(image_size, mean, std, train=True, min_scale=self.min_scale)
        eval_tf = ImageTransform(image_size, mean, std, train=False)
        answers = None if self.answer_list is None else read_answer_list(self.answer_list)
        train = (VQATrainDataset(self.train_files, self.image_root, train_tf, self.vg_root, self.max_words)
                 if self.train_files else None)

        def ev(path):
            return None if path is None else VQAEvalDataset(path, self.image_root, eval_tf, answers, self.max_words)

        return DataModule(train=train, val=ev(self.val_file), test=ev(self.test_file), collate=collate_vqa,
                          extras={"image_root": str(self.image_root), "answer_list": answers})

    def __repr__(self) -> str:
        return (f"BlipVQAData(image_root={self.image_root}, train_files={self.train_files}, "
                f"val_file={self.val_file}, test_file={self.test_file}, answer_list={self.answer_list})")

"""Captioning datasets in BLIP's format (``coco_karpathy_{train,val,test}.json`` + ``coco_karpathy_*_gt.json``).

Train file: a JSON list of ``{"image", "caption", "image_id"}``, one entry per caption (as for retrieval).
Eval file (val / test): a JSON list of ``{"image", "caption": [...]}``, one entry per image. As BLIP does, the
integer image id of an eval image is the last ``_``-separated part of its file name
(``val2014/COCO_val2014_000000391895.jpg`` -> 391895). Ground truth for the metrics: a COCO-format file
(``{"annotations": [{"image_id", "caption"}, ...], "images": [...]}``); without one, the eval file's own captions
are the references.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from unitrans.data.blip_json import (
    DataError,
    RetrievalTrainDataset,
    _check_root,
    _read_annotation,
    _require,
    collate_retrieval,
)
from unitrans.data.images import ImageTransform, load_image
from unitrans.interfaces import DataModule


def image_id_from_path(path: str) -> int:
    """BLIP's eval image id: ``".../COCO_val2014_000000391895.jpg"`` -> ``391895``.

    Raises:
        ValueError: the file name does not end in ``_<digits>``.
    """
    stem = Path(path).stem
    tail = stem.rsplit("_", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"image file name '{Path(path).name}' does not end in _<number> (e.g. "
                         "COCO_val2014_000000391895.jpg), so it gives no image id")
    return int(tail)


def read_coco_gt(path: Path) -> dict[int, list[str]]:
    """COCO-format caption ground truth -> image id -> captions (ids as ints where they are numeric).

    Raises:
        DataError: missing / malformed file, or not a COCO caption file.
    """
    if not path.is_file():
        raise DataError(f"caption ground-truth file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON: {exc}") from exc
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise DataError(f"{path}: expected a COCO caption file: an object with an 'annotations' list")
    refs: dict[int, list[str]] = {}
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise DataError(f"{path}: annotation {i} needs 'image_id' and a string 'caption'")
        key = a["image_id"]
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        refs.setdefault(key, []).append(a["caption"])
    return refs


class CaptionEvalDataset(torch.utils.data.Dataset):
    """One item per image: ``{"image": (3, H, W), "image_id": int}``; ``references`` for the metrics.

    Args:
        ann_file: BLIP eval annotation (``caption``: a list of strings, or one string).
        image_root: folder the entries' image paths are relative to.
        transform: PIL image -> ``(3, H, W)``.
        gt_file: COCO-format ground truth; ``None``: the annotation's captions are the references.

    Attributes:
        images: image paths; image_ids: their integer ids; references: image id -> reference captions (raw).

    Raises:
        DataError: a missing / malformed file, an entry without ``image``, a file name without an id, two
            entries with one id, or an image the ground truth has no caption for.
    """

    def __init__(self, ann_file: str | Path, image_root: str | Path, transform: Callable[[Any], torch.Tensor],
                 gt_file: str | Path | None = None):
        self.ann_file = Path(ann_file)
        entries = _read_annotation(self.ann_file)
        self.image_root = _check_root(image_root)
        self.transform = transform
        self.images: list[str] = []
        self.image_ids: list[int] = []
        own: dict[int, list[str]] = {}
        for i, e in enumerate(entries):
            image = _require(self.ann_file, i, e, "image", str)
            try:
                image_id = image_id_from_path(image)
            except ValueError as exc:
                raise DataError(f"{self.ann_file}: entry {i}: {exc}") from None
            if image_id in own:
                raise DataError(f"{self.ann_file}: entry {i}: image id {image_id} ({image}) appears twice")
            captions = e.get("caption", [])
            own[image_id] = [captions] if isinstance(captions, str) else [c for c in captions if isinstance(c, str)]
            self.images.append(str(self.image_root / image))
            self.image_ids.append(image_id)
        if gt_file is None:
            self.references = own
            empty = [k for k, v in own.items() if not v]
            if empty:
                raise DataError(f"{self.ann_file}: {len(empty)} image(s) have no caption to use as reference "
                                f"(e.g. id {empty[0]}); give a COCO-format ground-truth file")
        else:
            gt_path = Path(gt_file)
            refs = read_coco_gt(gt_path)
            missing = [k for k in self.image_ids if not refs.get(k)]
            if missing:
                raise DataError(f"{gt_path}: no caption for {len(missing)} image id(s) of {self.ann_file.name}, "
                                f"e.g. {missing[:5]}")
            self.references = {k: refs[k] for k in self.image_ids}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.transform(load_image(self.images[i])), "image_id": self.image_ids[i]}


class BlipCaptionData:
    """The ``blip_caption.v1`` dataset: BLIP's Karpathy caption files, materialised by :meth:`setup`.

    Args:
        image_root: folder the annotations' image paths are relative to.
        train_file, val_file, test_file: annotation files (``None`` skips the split).
        val_gt_file, test_gt_file: COCO-format ground truth of the eval splits (``None``: the eval file's captions).
        max_words: train captions are cut to this many words (BLIP ``pre_caption``).
        min_scale: smallest area fraction of the train random resized crop.
    """

    def __init__(self, image_root, train_file=None, val_file=None, test_file=None, val_gt_file=None,
                 test_gt_file=None, max_words=30, min_scale=0.5):
        self.image_root = Path(image_root)
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.val_gt_file, self.test_gt_file = val_gt_file, test_gt_file
        self.max_words, self.min_scale = max_words, min_scale

    def setup(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> DataModule:
        """Reads and checks the annotation files (not the images); the collate is :func:`collate_retrieval`."""
        train_tf = ImageTransform(image_size, mean, std, train=True, min_scale=self.min_scale)
        eval_tf = ImageTransform(image_size, mean, std, train=False)
        train = (None if self.train_file is None
                 else RetrievalTrainDataset(self.train_file, self.image_root, train_tf, self.max_words))

        def ev(path, gt):
            return None if path is None else CaptionEvalDataset(path, self.image_root, eval_tf, gt)

        return DataModule(train=train, val=ev(self.val_file, self.val_gt_file),
                          test=ev(self.test_file, self.test_gt_file), collate=collate_retrieval,
                          extras={"image_root": str(self.image_root)})

    def __repr__(self) -> str:
        files = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k.endswith("_file") and v is not None)
        return f"BlipCaptionData(image_root={self.image_root}, {files})"

"""Image-text retrieval datasets in the BLIP annotation format (``coco_karpathy_*.json``, ``flickr30k_*.json``).

Train file: a JSON list of ``{"image": "rel/path.jpg", "caption": "...", "image_id": <str or int>}``, one
entry per caption. Eval file (val / test): a JSON list of ``{"image": "rel/path.jpg", "caption": ["...", ...]}``,
one entry per image. Image paths are relative to ``image_root``.

Annotation files are read and checked when a dataset is constructed; images are opened only when an item
is requested.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from unitrans.errors import DataError, UserError  # noqa: F401  (DataError: re-exported for older imports)

from unitrans.data.images import ImageTransform, load_image
from unitrans.interfaces import DataModule

_PUNCT = re.compile(r"[.!\"()*#:;~\-/]")


def pre_caption(text: str, max_words: int = 30) -> str:
    """BLIP-style caption cleaning.

    Lower-cases, replaces each of ``. ! " ( ) * # : ; ~ - /`` by a space, collapses whitespace, strips and
    keeps the first ``max_words`` words.

    Args:
        text: raw caption.
        max_words: maximum number of words kept.

    Returns:
        The cleaned caption.
    """
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


def _read_annotation(path: str | Path) -> list[dict[str, Any]]:
    """Reads a BLIP annotation file: a JSON list of objects.

    Raises:
        DataError: missing file, malformed JSON, not a list of objects.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is a {type(entry).__name__}, expected an object")
    return data


def _require(path: Path, i: int, entry: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    if key not in entry:
        raise DataError(f"{path}: entry {i} lacks key '{key}' (has: {', '.join(sorted(entry)) or 'nothing'})")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(f"{path}: entry {i} key '{key}' has type {type(value).__name__}")
    return value


def _check_root(image_root: str | Path) -> Path:
    root = Path(image_root)
    if not root.is_dir():
        raise DataError(f"image_root is not a directory: {root}")
    return root


class RetrievalTrainDataset(torch.utils.data.Dataset):
    """One item per caption; captions of one image share an integer ``image_id`` (contrastive positives).

    Args:
        ann_file: BLIP train annotation file.
        image_root: folder the entries' ``image`` paths are relative to.
        transform: PIL image -> FloatTensor ``(3, H, W)``.
        max_words: captions are cut to this many words by :func:`pre_caption`.

    Attributes:
        annotation: list of ``(image path, cleaned caption, integer image id)``.
        image_ids: original id -> integer id, in first-seen order.

    Raises:
        DataError: missing / malformed annotation file or an entry without ``image``, ``caption``, ``image_id``.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        transform: Callable[[Any], torch.Tensor],
        max_words: int = 30,
    ):
        self.ann_file = Path(ann_file)
        entries = _read_annotation(self.ann_file)
        self.image_root = _check_root(image_root)
        self.transform = transform
        self.max_words = max_words
        self.image_ids: dict[Any, int] = {}
        self.annotation: list[tuple[Path, str, int]] = []
        for i, e in enumerate(entries):
            image = _require(self.ann_file, i, e, "image", str)
            caption = _require(self.ann_file, i, e, "caption", str)
            raw_id = _require(self.ann_file, i, e, "image_id", (str, int))
            idx = self.image_ids.setdefault(raw_id, len(self.image_ids))
            self.annotation.append((self.image_root / image, pre_caption(caption, max_words), idx))

        self.seed, self.epoch = 0, 0

    def __len__(self) -> int:
        return len(self.annotation)

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """Augmentation randomness becomes a function of (seed, epoch, item): the same on every rank count,
        with any number of workers, and after a resume."""
        self.seed, self.epoch = seed, epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, caption, image_id = self.annotation[i]
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        image = self.transform(load_image(path), rng)  # (3, H, W)
        return {"image": image, "caption": caption, "image_id": image_id}


class RetrievalEvalDataset(torch.utils.data.Dataset):
    """One item per image; all captions flattened into ``texts`` with the ground-truth maps both ways.

    Args:
        ann_file: BLIP eval annotation file (``caption`` is a list of strings; a single string is accepted).
        image_root: folder the entries' ``image`` paths are relative to.
        transform: PIL image -> FloatTensor ``(3, H, W)``.
        max_words: captions are cut to this many words by :func:`pre_caption`.

    Attributes:
        images: image paths (absolute if ``image_root`` is), one per image.
        texts: every caption, cleaned, image by image.
        txt2img: for each text, the index of its image.
        img2txt: for each image, the indices of its texts.

    Raises:
        DataError: missing / malformed annotation file, an entry without ``image`` / ``caption``, or with no caption.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        transform: Callable[[Any], torch.Tensor],
        max_words: int = 30,
    ):
        self.ann_file = Path(ann_file)
        entries = _read_annotation(self.ann_file)
        self.image_root = _check_root(image_root)
        self.transform = transform
        self.max_words = max_words
        self.images: list[str] = []
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for i, e in enumerate(entries):
            image = _require(self.ann_file, i, e, "image", str)
            captions = _require(self.ann_file, i, e, "caption", (str, list))
            if isinstance(captions, str):
                captions = [captions]
            if not captions or not all(isinstance(c, str) for c in captions):
                raise DataError(f"{self.ann_file}: entry {i} key 'caption' must be a non-empty list of strings")
            self.images.append(str(self.image_root / image))
            ids = []
            for c in captions:
                ids.append(len(self.texts))
                self.texts.append(pre_caption(c, max_words))
                self.txt2img.append(i)
            self.img2txt.append(ids)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.transform(load_image(self.images[i]))  # (3, H, W)
        return {"image": image, "index": i}


def collate_retrieval(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks a list of items from the retrieval datasets.

    Args:
        batch: items with ``image`` (3, H, W) and some of ``caption``, ``image_id``, ``index``.

    Returns:
        ``image`` (B, 3, H, W); ``caption`` list of B strings; ``image_id`` / ``index`` LongTensor (B,);
        any other key as a list.
    """
    if not batch:
        raise ValueError("collate_retrieval: empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key == "image":
            out[key] = torch.stack(values)  # (B, 3, H, W)
        elif key in ("image_id", "index"):
            out[key] = torch.tensor(values, dtype=torch.long)  # (B,)
        else:
            out[key] = values
    return out


class BlipRetrievalData:
    """The ``blip_retrieval.v1`` dataset: BLIP annotation files, materialised by :meth:`setup`.

    Args:
        image_root: folder the annotation's image paths are relative to.
        train_file, val_file, test_file: annotation files; ``None`` skips the split.
        max_words: caption length cap.
        min_scale: smallest crop area fraction of the train transform.
    """

    def __init__(
        self,
        image_root: str | Path,
        train_file: str | Path | None = None,
        val_file: str | Path | None = None,
        test_file: str | Path | None = None,
        max_words: int = 30,
        min_scale: float = 0.5,
    ):
        self.image_root = Path(image_root)
        self.train_file = Path(train_file) if train_file is not None else None
        self.val_file = Path(val_file) if val_file is not None else None
        self.test_file = Path(test_file) if test_file is not None else None
        self.max_words = max_words
        self.min_scale = min_scale

    def setup(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> DataModule:
        """Builds the datasets (reading and checking the annotation files, not the images).

        Args:
            image_size: side of the square model input.
            mean, std: the backbone's per-channel normalisation.

        Returns:
            DataModule with ``RetrievalTrainDataset`` / ``RetrievalEvalDataset`` (or ``None``) and
            :func:`collate_retrieval`.
        """
        train_tf = ImageTransform(image_size, mean, std, train=True, min_scale=self.min_scale)
        eval_tf = ImageTransform(image_size, mean, std, train=False)

        def ev(path: Path | None) -> RetrievalEvalDataset | None:
            return None if path is None else RetrievalEvalDataset(path, self.image_root, eval_tf, self.max_words)

        train = (
            None
            if self.train_file is None
            else RetrievalTrainDataset(self.train_file, self.image_root, train_tf, self.max_words)
        )
        return DataModule(
            train=train,
            val=ev(self.val_file),
            test=ev(self.test_file),
            collate=collate_retrieval,
            extras={"image_root": str(self.image_root)},
        )

    def __repr__(self) -> str:
        files = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k.endswith("_file") and v is not None)
        return f"BlipRetrievalData(image_root={self.image_root}, {files})"

"""The common caption downloads, read as BLIP-format entries (no conversion step: name the downloaded file).

* **Karpathy split files** (``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``):
  ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}, ...], "cocoid"? , "imgid"}]}``.
  One file holds every split: the spec names it as ``train_file`` (splits ``train`` and ``restval``, as BLIP's
  ``coco_karpathy_train.json`` does), ``val_file`` (``val``) and ``test_file`` (``test``). The image id is
  ``cocoid`` (COCO), else the number a Flickr file name is, else ``imgid``.
* **COCO captions** (``captions_train2014.json``, ``captions_val2017.json``, ...): ``{"images": [{"id",
  "file_name"}], "annotations": [{"image_id", "caption"}]}``: the whole file is one split. Images are looked for
  under ``image_root/<train2014|val2014|...>/`` when that folder exists (the name comes from the file's), else
  directly under ``image_root``. The same file is the ground truth of captioning (``*_gt_file``).

A train slot gets one entry per caption (``{"image", "caption", "image_id"}``), an eval slot one per image
(``{"image", "caption": [...], "image_id"}``): exactly what BLIP's own files hold.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from unitrans.errors import DataError

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def _is_karpathy(data: dict) -> bool:
    images = data.get("images")
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def _is_coco(data: dict) -> bool:
    return isinstance(data.get("annotations"), list) and isinstance(data.get("images"), list)


def _rows(image: str, image_id: Any, captions: list[str], slot: str) -> list[dict[str, Any]]:
    if slot == "train":
        return [{"image": image, "caption": c, "image_id": image_id} for c in captions]
    return [{"image": image, "caption": captions, "image_id": image_id}]


def _karpathy_id(img: dict[str, Any]) -> Any:
    if "cocoid" in img:
        return img["cocoid"]
    stem = Path(str(img.get("filename", ""))).stem
    return int(stem) if stem.isdigit() else img.get("imgid")


def karpathy_entries(path: Path, data: dict, slot: str) -> list[dict[str, Any]]:
    """BLIP entries of one split (by ``slot``) of a Karpathy split file."""
    out = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str):
            raise DataError(f"{path}: image {i} needs a 'filename' (a Karpathy split file)")
        if img.get("split") not in KARPATHY_SPLITS[slot]:
            continue
        captions = [s["raw"] for s in img.get("sentences", []) if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        image = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]
        out += _rows(image, _karpathy_id(img), captions, slot)
    return out


def _coco_folder(path: Path, root: Path | None) -> str:
    """``"val2014/"`` when the file is ``captions_val2014.json`` and ``root/val2014`` is a folder, else ``""``."""
    m = re.fullmatch(r"captions_(\w+)", path.stem)
    if m and root is not None and (root / m.group(1)).is_dir():
        return f"{m.group(1)}/"
    return ""


def coco_entries(path: Path, data: dict, slot: str, root: Path | None) -> list[dict[str, Any]]:
    """BLIP entries of a COCO captions file (the whole file, laid out for ``slot``)."""
    folder = _coco_folder(path, root)
    names = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name' (a COCO captions file)")
        names[img["id"]] = folder + img["file_name"]
    captions = read_coco_gt(path, data)
    out = []
    for image_id, name in names.items():
        out += _rows(name, image_id, captions.get(image_id, []), slot)
    return out


def as_blip_entries(path: Path, data: dict, slot: str, root: Path | None) -> list[dict[str, Any]] | dict:
    """A Karpathy or COCO captions file as BLIP entries; any other object is returned unchanged."""
    if _is_karpathy(data):
        return karpathy_entries(path, data, slot)
    if _is_coco(data):
        return coco_entries(path, data, slot, root)
    return data


def read_coco_gt(path: str | Path, data: Any = None) -> dict[Any, list[str]]:
    """COCO-format caption ground truth -> image id -> captions (ids as ints where they are numeric).

    Raises:
        DataError: missing / malformed file, or not a COCO caption file.
    """
    from unitrans.data.entries import _id, read_json

    path = Path(path)
    data = read_json(path, "caption ground-truth file") if data is None else data
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise DataError(f"{path}: expected a COCO caption file: an object with an 'annotations' list")
    refs: dict[Any, list[str]] = {}
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or _id(a.get("image_id")) is None or not isinstance(a.get("caption"), str):
            raise DataError(f"{path}: annotation {i} needs 'image_id' and a string 'caption'")
        refs.setdefault(_id(a["image_id"]), []).append(a["caption"])
    return refs

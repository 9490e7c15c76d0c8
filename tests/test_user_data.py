"""A user's folder of ordinary photos (``astronaut.png``, ``coffee.png``, ...) with captions, written in each
layout the loaders accept, trains and evaluates with no renaming (tiny preset, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unitrans import cli

NAMES = ("astronaut", "camera", "cat", "coffee", "horse", "rocket", "moon", "page")
CAPTIONS = {n: [f"a photo of the {n}", f"the {n} in a picture"] for n in NAMES}


def _photos(folder: Path) -> None:
    """Photos in the formats people have: JPEG and PNG, colour and grey, one with transparency."""
    rng = np.random.default_rng(0)
    for k, n in enumerate(NAMES):
        pixels = rng.integers(0, 256, (40 + 4 * k, 48, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
        if n == "moon":
            img.convert("L").save(folder / f"{n}.png")
        elif n == "page":
            img.convert("RGBA").save(folder / f"{n}.png")
        elif k % 2:
            img.save(folder / f"{n}.jpg", quality=90)
        else:
            img.save(folder / f"{n}.png")


def _file(folder: Path, n: str) -> str:
    return next(p.name for p in folder.iterdir() if p.stem == n)


def _write_layout(folder: Path, layout: str) -> dict[str, str]:
    """Annotation files in one layout; returns the data options of the spec."""
    names = {n: _file(folder / "photos", n) for n in NAMES}
    train, test = NAMES[:6], NAMES[6:]
    if layout == "blip":  # BLIP's own lists; no image ids at all (grouped by file, numbered by position)
        (folder / "train.json").write_text(json.dumps(
            [{"image": names[n], "caption": c} for n in train for c in CAPTIONS[n]]))
        (folder / "test.json").write_text(json.dumps([{"image": names[n], "caption": CAPTIONS[n]} for n in test]))
        return {"train_file": "train.json", "test_file": "test.json"}
    if layout == "karpathy":
        images = [{"filename": names[n], "imgid": k, "split": "train" if n in train else "test",
                   "sentences": [{"raw": c} for c in CAPTIONS[n]]} for k, n in enumerate(NAMES)]
        (folder / "dataset_mine.json").write_text(json.dumps({"images": images, "dataset": "mine"}))
        return {"train_file": "dataset_mine.json", "test_file": "dataset_mine.json"}
    for split, subset in (("train", train), ("test", test)):  # COCO's own captions files, one per split
        coco = {"images": [{"id": k, "file_name": names[n]} for k, n in enumerate(NAMES) if n in subset],
                "annotations": [{"id": 10 * k + j, "image_id": k, "caption": c}
                                for k, n in enumerate(NAMES) if n in subset for j, c in enumerate(CAPTIONS[n])]}
        (folder / f"captions_{split}.json").write_text(json.dumps(coco))
    return {"train_file": "captions_train.json", "test_file": "captions_test.json"}


def _run(tmp_path: Path, task: str, layout: str) -> dict:
    folder = tmp_path / layout
    (folder / "photos").mkdir(parents=True)
    _photos(folder / "photos")
    files = {k: str(folder / v) for k, v in _write_layout(folder, layout).items()}
    if task == "captioning" and layout == "coco":
        files["test_gt_file"] = files["test_file"]
    backbone = {"retrieval": "", "captioning": ', task_model = "captioning"'}[task]
    extra = {"retrieval": 'alignment_loss = "itc.v1"\ntask = {name = "retrieval.v1", k_test = 2}',
             "captioning": 'alignment_loss = "none"\ntask = {name = "captioning.v1", max_length = 8, min_length = 2}'}
    name = "blip_caption.v1" if task == "captioning" else "blip_retrieval.v1"
    options = ", ".join(f'{k} = "{v}"' for k, v in {"image_root": folder / "photos", **files}.items())
    spec = folder / "spec.toml"
    spec.write_text(f"""
seed = 0
{extra[task]}
backbone = {{name = "blip.v1", preset = "tiny"{backbone}}}
data = {{name = "{name}", {options}}}
[[adapters]]
name = "lora.v1"
targets = ["vision.attn.q"]
rank = 2
[train]
batch_size = 4
max_steps = 2
progress = false
tensorboard = false
[eval]
batch_size = 2
""")
    out = tmp_path / f"run_{task}_{layout}"
    assert cli.main(["validate", str(spec)]) == 0
    assert cli.main(["run", str(spec), "--output-dir", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("task", ["retrieval", "captioning"])
@pytest.mark.parametrize("layout", ["blip", "karpathy", "coco"])
def test_ordinary_photos_train_in_every_layout(tmp_path, task, layout):
    metrics = _run(tmp_path, task, layout)
    assert metrics["steps"] == 2 and ("r_mean" if task == "retrieval" else "cider") in metrics

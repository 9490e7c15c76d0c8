"""easy-VQA (Zhou 2020, MIT licence): real 64x64 images of one coloured shape with 48k questions, from the
``easy-vqa`` package, offline.

The package ships ``data/{train,test}/images/N.png`` and ``questions.json`` (``[question, answer, image id]``);
its answers are one of 13 (``answers.txt``). :func:`make_easy_vqa` writes BLIP's VQA files once under a root
folder, with the images left where the package keeps them (``image_root`` is the package's ``data`` folder):

* ``vqa_train.json`` / ``vqa_val.json`` / ``vqa_test.json``: ``{"question_id", "question", "answer": [10 x the
  answer], "image": "train/images/N.png", "dataset": "vqa"}``. Each question has one answer, repeated ten times
  as a VQAv2 entry has ten humans' answers (as the video QA data does), so VQA accuracy is exact-match accuracy.
  ``val`` is the last ``n_val_images`` of the package's train images (their questions leave ``train``);
  ``test`` is the package's test split.
* ``answer_list.json``: the 13 answers; ``manifest.json``: the parameters (written last; a match skips writing).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from unitrans.data.shapes import _write_json, up_to_date, writing
from unitrans.errors import UserError

GENERATOR = "easy_vqa.v1"
N_HUMANS = 10


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise UserError("dataset easy_vqa.v1 needs the `easy-vqa` package (its images and questions ship inside "
                        "it; no download): pip install easy-vqa") from None
    return easy_vqa


def package_data_dir() -> Path:
    """The ``easy_vqa/data`` folder (``train/images``, ``test/images``, ``answers.txt``)."""
    return Path(_package().__file__).resolve().parent / "data"


def _entries(questions, split: str, first_id: int) -> list[dict[str, Any]]:
    texts, answers, image_ids = questions
    return [{"question_id": first_id + i, "question": q, "answer": [a] * N_HUMANS,
             "image": f"{split}/images/{image}.png", "dataset": "vqa", "image_id": image}
            for i, (q, a, image) in enumerate(zip(texts, answers, image_ids))]


def _subsample(rows: list[dict[str, Any]], n: int | None, rng: random.Random) -> list[dict[str, Any]]:
    if n is None or n >= len(rows):
        return rows
    keep = sorted(rng.sample(range(len(rows)), n))  # file order kept
    return [rows[i] for i in keep]


def _splits(n_val_images: int, max_train: int | None, max_val: int | None, max_test: int | None,
            seed: int) -> dict[str, list[dict[str, Any]]]:
    """The package's questions as BLIP entries, split and subsampled (nothing written)."""
    pkg = _package()
    train = _entries(pkg.get_train_questions(), "train", 0)
    test = _entries(pkg.get_test_questions(), "test", len(train))
    val_from = len(pkg.get_train_image_paths()) - n_val_images  # train image ids are 0 .. n_images - 1
    val = [e for e in train if e["image_id"] >= val_from]
    train = [e for e in train if e["image_id"] < val_from]
    rng = random.Random(f"easy_vqa-{seed}")
    return {"train": _subsample(train, max_train, rng), "val": _subsample(val, max_val, rng),
            "test": _subsample(test, max_test, rng)}


def split_sizes(**params: Any) -> dict[str, int | None]:
    """Questions per split for :func:`make_easy_vqa`'s parameters, without writing anything."""
    sizes: dict[str, int | None] = {k: len(v) for k, v in _splits(**params).items()}
    if params["n_val_images"] == 0:
        sizes["val"] = None
    return sizes


def make_easy_vqa(root: str | Path, n_val_images: int = 200, max_train: int | None = None,
                  max_val: int | None = None, max_test: int | None = None, seed: int = 0) -> dict[str, str]:
    """Writes BLIP-format VQA files for the package's easy-VQA data under ``root`` (a no-op when up to date).

    Args:
        root: output folder of the JSON files.
        n_val_images: the package's last train images (by id) whose questions form ``val`` (0: no val split).
        max_train, max_val, max_test: keep at most this many questions of a split (a seeded random subset);
            ``None``: all.
        seed: seed of the subsets.

    Returns:
        Paths: ``root``, ``image_root``, ``vqa_train``, ``vqa_val``, ``vqa_test``, ``answer_list``, ``manifest``.
    """
    root = Path(root)
    data = package_data_dir()
    paths = {"root": str(root), "image_root": str(data), "manifest": str(root / "manifest.json"),
             "answer_list": str(root / "answer_list.json")}
    paths.update({f"vqa_{s}": str(root / f"vqa_{s}.json") for s in ("train", "val", "test")})
    args = dict(n_val_images=n_val_images, max_train=max_train, max_val=max_val, max_test=max_test, seed=seed)
    params = {"generator": GENERATOR, **args, "package_data": str(data)}
    outputs = [Path(p) for k, p in paths.items() if k.startswith("vqa_") or k == "answer_list"]
    with writing(root):
        if not up_to_date(Path(paths["manifest"]), params, outputs):
            root.mkdir(parents=True, exist_ok=True)
            for split, rows in _splits(**args).items():
                _write_json(Path(paths[f"vqa_{split}"]), [{k: v for k, v in e.items() if k != "image_id"}
                                                          for e in rows])
            _write_json(Path(paths["answer_list"]), list(_package().get_answers()))
            _write_json(Path(paths["manifest"]), {"params": params})  # last: a crash before it rewrites next time
    return paths

"""Captioning and VQA data derived from the synthetic shapes (:func:`unitrans.data.shapes.make_shapes`).

Both read the generator's ``layout.json`` (each image's objects and relation) and write BLIP-format files beside
it, which the real loaders (``blip_caption``, ``blip_vqa``) then read: the offline path exercises the same code
as COCO and VQAv2.

* Captioning: ``train.json`` / ``val.json`` / ``test.json`` of the generator already are Karpathy-format files;
  this adds ``val_gt.json`` / ``test_gt.json`` (COCO format; image id from the file name, ``shapes_000123`` ->
  123).
* VQA: ``vqa_{train,val,test}.json`` and ``answer_list.json``. Questions per image, drawn from what the layout
  says: "what color is the circle?", "what shape is left of the red square?", "how many shapes are there?",
  "is there a blue triangle?" (yes and no equally often). Each has 10 human-like answers: mostly the true one,
  some written as a paraphrase ("two" for 2, "Red", "yes." ...) and, with probability ``answer_noise`` each,
  a wrong one (another colour, shape, count, or the opposite yes/no), so the leave-one-out accuracy sees
  disagreement. The answer list is the 13 canonical answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from unitrans.data.shapes import COLOURS, P_SINGLE, SHAPES, _write_json, make_shapes, writing

COUNT_WORDS = {1: "one", 2: "two"}
QUESTION_KINDS = ("color", "relation", "count", "exists")


def _image_id(rel_path: str) -> int:
    return int(Path(rel_path).stem.rsplit("_", 1)[-1])


def _read_layout(paths: dict[str, str]) -> list[dict[str, Any]]:
    return json.loads(Path(paths["layout"]).read_text(encoding="utf-8"))


# ---- captioning --------------------------------------------------------------------------------------------
def make_shapes_caption(root: str | Path, **generator_args) -> dict[str, str]:
    """Generates the shapes (if needed) and writes ``val_gt.json`` / ``test_gt.json`` (COCO caption format).

    Returns:
        :func:`make_shapes`'s paths plus ``val_gt`` and ``test_gt``.
    """
    paths = make_shapes(root, **generator_args)
    layout = _read_layout(paths)
    for split in ("val", "test"):
        images, anns = [], []
        for entry in layout:
            if entry["split"] != split:
                continue
            iid = _image_id(entry["image"])
            images.append({"id": iid, "file_name": entry["image"]})
            anns += [{"image_id": iid, "caption": c, "id": len(anns) + k} for k, c in enumerate(entry["captions"])]
        out = Path(paths["root"]) / f"{split}_gt.json"
        with writing(out.parent):
            _write_json(out, {"images": images, "annotations": anns})
        paths[f"{split}_gt"] = str(out)
    return paths


# ---- VQA ---------------------------------------------------------------------------------------------------
def _name(o: dict[str, Any]) -> str:
    return f"{o['colour']} {o['shape']}"


def _questions(objects: list[dict[str, Any]], relation: str | None, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every question this scene answers unambiguously: ``(kind, question, canonical answer)``."""
    qs = []
    shapes = [o["shape"] for o in objects]
    for o in objects:
        if shapes.count(o["shape"]) == 1:
            qs.append(("color", f"what color is the {o['shape']}?", o["colour"]))
    if relation is not None:
        a, b = objects
        qs.append(("relation", f"what shape is {relation} the {_name(b)}?", a["shape"]))
    n = len(objects)
    qs.append(("count", "how many shapes are there?", str(n)))
    present = {(o["colour"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        o = rng.choice(objects)
        qs.append(("exists", f"is there a {_name(o)}?", "yes"))
    else:
        while True:
            c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if (c, s) not in present:
                break
        qs.append(("exists", f"is there a {c} {s}?", "no"))
    return qs


def _paraphrase(kind: str, answer: str, rng: random.Random) -> str:
    if kind == "count":
        return rng.choice([COUNT_WORDS[int(answer)], COUNT_WORDS[int(answer)].capitalize(), f"{answer}."])
    return rng.choice([answer.capitalize(), f"{answer}.", f"the {answer}" if kind != "exists" else f"{answer}!"])


def _wrong(kind: str, answer: str, rng: random.Random) -> str:
    pool = {"color": list(COLOURS), "relation": list(SHAPES), "count": ["1", "2", "3"],
            "exists": ["yes", "no"]}[kind]
    return rng.choice([p for p in pool if p != answer])


def human_answers(kind: str, answer: str, rng: random.Random, n: int = 10, noise: float = 0.15,
                  paraphrase: float = 0.2) -> list[str]:
    """``n`` answers as annotators give them: the true answer, sometimes paraphrased, sometimes wrong."""
    out = []
    for _ in range(n):
        u = rng.random()
        if u < noise:
            out.append(_wrong(kind, answer, rng))
        elif u < noise + paraphrase:
            out.append(_paraphrase(kind, answer, rng))
        else:
            out.append(answer)
    return out


def answer_list() -> list[str]:
    """The 13 canonical answers: colours, shapes, counts 1-2, yes / no."""
    return list(COLOURS) + list(SHAPES) + ["1", "2", "yes", "no"]


def make_shapes_vqa(root: str | Path, questions_per_image: int = 3, answer_noise: float = 0.15,
                    **generator_args) -> dict[str, str]:
    """Generates the shapes (if needed) and writes BLIP-format VQA files derived from ``layout.json``.

    Args:
        root: the generator's output folder.
        questions_per_image: at most this many questions per image (distinct kinds first, drawn at random).
        answer_noise: probability that one of the 10 human answers is wrong.
        generator_args: passed to :func:`make_shapes`.

    Returns:
        :func:`make_shapes`'s paths plus ``vqa_train``, ``vqa_val``, ``vqa_test`` and ``answer_list``.
    """
    paths = make_shapes(root, **generator_args)
    layout = _read_layout(paths)
    rng = random.Random(f"vqa-{generator_args.get('seed', 0)}-{questions_per_image}-{answer_noise}")
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    qid = 0
    for entry in layout:
        qs = _questions(entry["objects"], entry["relation"], rng)
        rng.shuffle(qs)
        for kind, question, answer in qs[:questions_per_image]:
            splits[entry["split"]].append({
                "question_id": qid, "question": question,
                "answer": human_answers(kind, answer, rng, noise=answer_noise),
                "image": entry["image"], "dataset": "vqa",
            })
            qid += 1
    base = Path(paths["root"])
    with writing(base):
        for split, rows in splits.items():
            _write_json(base / f"vqa_{split}.json", rows)
            paths[f"vqa_{split}"] = str(base / f"vqa_{split}.json")
        _write_json(base / "answer_list.json", answer_list())
    paths["answer_list"] = str(base / "answer_list.json")
    return paths


__all__ = ["P_SINGLE", "answer_list", "human_answers", "make_shapes_caption", "make_shapes_vqa"]

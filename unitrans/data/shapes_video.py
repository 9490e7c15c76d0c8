"""Synthetic videos: one coloured shape moving across a plain background, in LAVIS's DiDeMo and MSRVTT-QA formats.

Each clip has a colour (6), a shape (3) and a direction (``right``: left to right, ``left``, ``up``, ``down``):
72 descriptions. The shape crosses most of the frame at constant speed; its size, path, speed and colours jitter.
A still frame says what moves but not where: telling "left to right" from "right to left" needs the frames'
order (mean-pooled frame features are blind to it; ``blip.v1``'s ``temporal_embedding`` is not).

Written with PyAV (libx264 MP4s) and read back by the real loaders (:mod:`unitrans.data.video_json`), once per
parameter set (a ``manifest.json`` written last marks a finished set).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from unitrans.data.shapes import COLOURS, SHAPES, _a, _render, _write_json, up_to_date, writing

GENERATOR = "shapes_video.v1"
DIRECTIONS = ("right", "left", "up", "down")
_PHRASES = {
    "right": ("moves from left to right", "moves to the right", "goes right", "slides rightwards"),
    "left": ("moves from right to left", "moves to the left", "goes left", "slides leftwards"),
    "up": ("moves up", "moves from the bottom to the top", "goes upwards", "rises"),
    "down": ("moves down", "moves from the top to the bottom", "goes downwards", "falls"),
}
ANSWERS = tuple(DIRECTIONS) + tuple(COLOURS) + SHAPES


def _captions(colour: str, shape: str, direction: str, n: int, rng: random.Random) -> list[str]:
    thing = f"{colour} {shape}"
    pool = [f"{_a(thing)} {p}" for p in _PHRASES[direction]] + [f"the {thing} {_PHRASES[direction][0]}"]
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def _questions(colour: str, shape: str, direction: str) -> list[tuple[str, str]]:
    return [
        (f"which direction does the {colour} {shape} move?", direction),
        (f"what color is the {shape} that {_PHRASES[direction][1]}?", colour),
        (f"what shape {_PHRASES[direction][1]}?", shape),
    ]


def _clip(rng: random.Random, size: int, num_frames: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    colour, shape, direction = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(DIRECTIONS)
    r = rng.uniform(0.16, 0.22) * size
    lo, hi = r + 1, size - r - 1
    span = rng.uniform(0.6, 1.0) * (hi - lo)
    a = rng.uniform(lo, hi - span)
    path = (a, a + span) if direction in ("right", "down") else (a + span, a)
    across = rng.uniform(lo, hi)
    look = rng.randrange(2**31)  # one background / colour jitter for every frame of the clip
    frames = []
    for t in range(num_frames):
        main = path[0] + (path[1] - path[0]) * t / max(1, num_frames - 1)
        cx, cy = (main, across) if direction in ("right", "left") else (across, main)
        obj = {"colour": colour, "shape": shape, "cx": cx, "cy": cy, "r": r}
        frames.append(np.asarray(_render([obj], size, random.Random(look))))
    meta = {"colour": colour, "shape": shape, "direction": direction, "path": [round(p, 2) for p in path],
            "across": round(across, 2), "r": round(r, 2)}
    return meta, frames


def make_shapes_video(
    root: str | Path,
    n_train: int = 400,
    n_val: int = 60,
    n_test: int = 60,
    num_frames: int = 16,
    image_size: int = 64,
    fps: int = 8,
    captions_per_video: int = 2,
    seed: int = 0,
) -> dict[str, str]:
    """Writes the synthetic videos and their annotations under ``root`` (a no-op when it already holds them).

    Layout: ``videos/clip_NNNNNN.mp4``; ``ret_{train,val,test}.json`` (LAVIS DiDeMo retrieval format: train one
    entry per caption, eval ``caption`` a list); ``qa_{train,val,test}.json`` (LAVIS MSRVTT-QA format, three
    questions per clip: direction, colour, shape); ``answer_list.json``; ``layout.json``; ``manifest.json``.

    Args:
        root: output folder.
        n_train, n_val, n_test: clips per split.
        num_frames: frames per clip.
        image_size: frame side in pixels (even, >= 32).
        fps: frame rate written in the files.
        captions_per_video: paraphrased captions per clip.
        seed: the output is a deterministic function of the parameters.

    Returns:
        Paths: ``root``, ``video_root``, ``ret_train``, ..., ``qa_test``, ``answer_list``, ``manifest``.
    """
    if image_size < 32 or image_size % 2:
        raise ValueError(f"image_size must be even and >= 32 (yuv420p MP4), got {image_size}")
    if num_frames < 2 or min(n_train, n_val, n_test) < 0 or captions_per_video < 1:
        raise ValueError("num_frames must be >= 2, split sizes >= 0 and captions_per_video >= 1")
    root = Path(root)
    files = {"root": root, "video_root": root / "videos", "answer_list": root / "answer_list.json",
             "layout": root / "layout.json", "manifest": root / "manifest.json"}
    for split in ("train", "val", "test"):
        files[f"ret_{split}"] = root / f"ret_{split}.json"
        files[f"qa_{split}"] = root / f"qa_{split}.json"
    paths = {k: str(v) for k, v in files.items()}
    params = {"generator": GENERATOR, "n_train": n_train, "n_val": n_val, "n_test": n_test,
              "num_frames": num_frames, "image_size": image_size, "fps": fps,
              "captions_per_video": captions_per_video, "seed": seed}
    with writing(root):
        if not up_to_date(files["manifest"], params, [Path(p) for k, p in paths.items() if k != "manifest"]):
            _generate(files, params)
    return paths


def _generate(files: dict[str, Path], params: dict[str, Any]) -> None:
    """Writes every clip, the annotation files, the answer list, the layout and (last) the manifest."""
    from unitrans.data.video import write_video

    files["video_root"].mkdir(parents=True, exist_ok=True)
    rng = random.Random(params["seed"])
    image_size, num_frames, fps = params["image_size"], params["num_frames"], params["fps"]
    ret: dict[str, list] = {"train": [], "val": [], "test": []}
    qa: dict[str, list] = {"train": [], "val": [], "test": []}
    layout = []
    index, qid = 0, 0
    for split in ("train", "val", "test"):
        for _ in range(params[f"n_{split}"]):
            name = f"clip_{index:06d}.mp4"
            meta, frames = _clip(rng, image_size, num_frames)
            write_video(files["video_root"] / name, frames, fps=fps)
            caps = _captions(meta["colour"], meta["shape"], meta["direction"], params["captions_per_video"], rng)
            if split == "train":
                ret[split] += [{"video": name, "caption": c, "video_id": f"clip_{index:06d}"} for c in caps]
            else:
                ret[split].append({"video": name, "caption": caps})
            for question, answer in _questions(meta["colour"], meta["shape"], meta["direction"]):
                qa[split].append({"question_id": qid, "question": question, "answer": answer, "video": name})
                qid += 1
            layout.append({"video": name, "split": split, "captions": caps, **meta})
            index += 1
    for split in ("train", "val", "test"):
        _write_json(files[f"ret_{split}"], ret[split])
        _write_json(files[f"qa_{split}"], qa[split])
    _write_json(files["answer_list"], list(ANSWERS))
    _write_json(files["layout"], layout)
    _write_json(files["manifest"], {"params": params, "files": {k: str(v) for k, v in files.items()}})

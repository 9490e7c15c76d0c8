"""Every task learns, in the default suite: a few dozen steps through ``cli.main`` on a tiny set of images (or
clips) the test draws, each scored before and after on the same items, by a margin that a frozen or random
model does not reach.

The set is 16 pictures: one large shape (4 colours x 4 shapes) on grey, each with its own caption and two
questions. The tiny random-init backbones separate them, so the adapters (and the projections named in
``train_parts``) only have to learn the mapping; every run is seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unitrans import cli

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
ITEMS = [(c, s) for c in COLOURS for s in SHAPES]  # 16 (colour, shape)
SIZE = 64


def picture(colour: str, shape: str, size: int = SIZE, shift: int = 0) -> np.ndarray:
    """``uint8 (size, size, 3)``: the shape, 3/4 of the side, in its colour on grey (moved ``shift`` px right)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    lo, hi = size // 8 + shift, size - size // 8 + shift
    box = (lo, size // 8, hi, size - size // 8)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(lo, box[3]), (hi, box[3]), ((lo + hi) // 2, box[1])], fill=fill)
    else:
        third = (hi - lo) // 3
        draw.rectangle((lo + third, box[1], hi - third, box[3]), fill=fill)
        draw.rectangle((lo, box[1] + third, hi, box[3] - third), fill=fill)
    return np.asarray(img)


def _write_json(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, str]:
    """The 16 pictures (``img_<id>.png``, the id after the last underscore) and BLIP-format files over them."""
    from PIL import Image

    root = tmp_path_factory.mktemp("learnable")
    names = []
    for i, (colour, shape) in enumerate(ITEMS):
        names.append(f"img_{i + 1}.png")
        Image.fromarray(picture(colour, shape)).save(root / names[-1])
    short = [f"a {c} {s}" for c, s in ITEMS]  # retrieval: the words that tell the pictures apart
    long = [f"a {c} {s} on a grey background" for c, s in ITEMS]  # captioning: 4-grams for BLEU-4
    repeat = 40  # train files hold one entry per caption: 40 copies make one epoch of 40 steps at batch 16
    files = {"root": str(root)}
    for task, captions in (("retrieval", short), ("caption", long)):
        files[f"{task}_train"] = _write_json(root / f"{task}_train.json", [
            {"image": n, "caption": c, "image_id": i} for _ in range(repeat) for i, (n, c) in enumerate(zip(names, captions))])
        files[f"{task}_test"] = _write_json(root / f"{task}_test.json", [
            {"image": n, "caption": [c]} for n, c in zip(names, captions)])
    questions = []
    for i, (n, (colour, shape)) in enumerate(zip(names, ITEMS)):
        questions.append({"question_id": 2 * i, "image": n, "question": "what color is it?", "answer": [colour] * 10,
                          "dataset": "vqa"})
        questions.append({"question_id": 2 * i + 1, "image": n, "question": "what shape is it?",
                          "answer": [shape] * 10, "dataset": "vqa"})
    files["vqa_train"] = _write_json(root / "vqa_train.json", questions * 32)  # one epoch: 64 steps
    files["vqa_test"] = _write_json(root / "vqa_test.json", questions)
    files["answer_list"] = _write_json(root / "answer_list.json", list(COLOURS) + list(SHAPES))
    return files


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    """The 16 pictures as 8-frame MP4 clips (the shape slides 1 px a frame; PyAV), in LAVIS's DiDeMo layout."""
    pytest.importorskip("decord")
    pytest.importorskip("av")
    from unitrans.data.video import write_video

    root = tmp_path_factory.mktemp("learnable_clips")
    names = []
    for i, (colour, shape) in enumerate(ITEMS):
        names.append(f"clip_{i + 1}.mp4")
        write_video(root / names[-1], [picture(colour, shape, shift=t - 4) for t in range(8)], fps=4)
    captions = [f"a {c} {s}" for c, s in ITEMS]
    return {"root": str(root),
            "train": _write_json(root / "train.json", [
                {"video": n, "caption": c} for _ in range(40) for n, c in zip(names, captions)]),
            "test": _write_json(root / "test.json", [{"video": n, "caption": [c]} for n, c in zip(names, captions)])}


def _run(tmp_path: Path, spec: str, steps: int, *extra: str) -> tuple[dict, dict, list[dict]]:
    """Runs ``spec`` for ``steps`` steps; returns (metrics before, metrics after, log lines)."""
    path = tmp_path / "spec.toml"
    path.write_text(spec)
    out = tmp_path / "run"
    args = ["run", str(path), "--output-dir", str(out), "--set", f"train.max_steps={steps}",
            "--set", "train.epochs=1", "--set", "train.progress=false", "--set", "train.log_every=1",
            "--set", "train.tensorboard=false", "--set", "train.weight_decay=0.0", "--set", "eval.at_start=true",
            *extra]
    assert cli.main(args) == 0
    read = lambda name: json.loads((out / name).read_text())  # noqa: E731
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return read("metrics_initial.json"), read("metrics.json"), log


def _first_and_last(log: list[dict], key: str = "loss", n: int = 3) -> tuple[float, float]:
    """Mean of the first and of the last ``n`` logged values of ``key``."""
    values = [r[key] for r in log]
    return sum(values[:n]) / n, sum(values[-n:]) / n


RETRIEVAL = """
seed = 0
[backbone]
name = "blip.v1"
preset = "tiny"
train_parts = ["vision_proj", "text_proj", "itm_head"]
[[adapters]]
name = "vcra.v1"
targets = ["vision.attn.*", "text.attn.*", "fusion.attn.*"]
rank = 16
[alignment_loss]
name = "itc.v1"
[task]
name = "retrieval.v1"
k_test = 16
rerank = "itc"  # ITM trains too, but needs more steps than this test takes to rank better than ITC
[data]
name = "blip_retrieval.v1"
image_root = "{root}"
train_file = "{retrieval_train}"
test_file = "{retrieval_test}"
min_scale = 1.0
[train]
batch_size = 16
lr = 3e-3
[eval]
batch_size = 16
"""


CAPTIONING = """
seed = 0
alignment_loss = "none"
[backbone]
name = "blip.v1"
preset = "tiny"
task_model = "captioning"
[[adapters]]
name = "vcra.v1"
targets = ["vision.attn.*", "decoder.*"]
rank = 16
[task]
name = "captioning.v1"
[data]
name = "blip_caption.v1"
image_root = "{root}"
train_file = "{caption_train}"
test_file = "{caption_test}"
min_scale = 1.0
[train]
batch_size = 16
lr = 2e-2
[eval]
batch_size = 16
"""

VQA = """
seed = 0
alignment_loss = "none"
[backbone]
name = "blip.v1"
preset = "tiny"
task_model = "vqa"
[[adapters]]
name = "vcra.v1"
targets = ["vision.attn.*", "text.attn.*", "fusion.attn.*", "decoder.attn.*", "decoder.fusion.attn.*"]
rank = 16
[task]
name = "vqa.v1"
k_test = 8
[data]
name = "blip_vqa.v1"
image_root = "{root}"
train_files = ["{vqa_train}"]
test_file = "{vqa_test}"
answer_list = "{answer_list}"
min_scale = 1.0
[train]
batch_size = 16
lr = 2e-2
min_lr_ratio = 1.0
[eval]
batch_size = 32
"""

CLIP = """
seed = 0
[backbone]
name = "clip.v1"
preset = "tiny"
[[adapters]]
name = "vcra.v1"
targets = ["vision.attn.[qkv]", "text.attn.[qkv]"]
rank = 16
[alignment_loss]
name = "itc.v1"
[task]
name = "retrieval.v1"
itm_weight = 0
rerank = "itc"
[data]
name = "blip_retrieval.v1"
image_root = "{root}"
train_file = "{retrieval_train}"
test_file = "{retrieval_test}"
min_scale = 1.0
[train]
batch_size = 16
lr = 2e-2
[eval]
batch_size = 16
"""

VIDEO = """
seed = 0
[backbone]
name = "blip.v1"
preset = "tiny"
temporal_embedding = true
train_parts = ["vision_proj", "text_proj", "itm_head"]
[[adapters]]
name = "vcra.v1"
targets = ["vision.attn.*", "text.attn.*", "fusion.attn.*"]
rank = 16
[alignment_loss]
name = "itc.v1"
[task]
name = "retrieval.v1"
k_test = 16
rerank = "itc"
[data]
name = "didemo_retrieval.v1"
video_root = "{root}"
train_file = "{train}"
test_file = "{test}"
num_frames_train = 2
num_frames_eval = 4
[train]
batch_size = 16
lr = 3e-3
[eval]
batch_size = 16
"""


# A ranking that ignores the pictures has an expected r_mean of (1 + 5 + 10) / 16 / 3 = 33.3 on 16 items; an
# answerer that ignores them gets at most 25 VQA accuracy (4 equally common answers per question).
def test_retrieval_learns(tmp_path, pictures):
    before, after, log = _run(tmp_path, RETRIEVAL.format(**pictures), 24)
    first, last = _first_and_last(log, "itc_loss")
    assert last < 0.85 * first, (first, last)
    assert after["r_mean"] >= max(55.0, before["r_mean"] + 20), (before, after)


def test_captioning_learns(tmp_path, pictures):
    before, after, log = _run(tmp_path, CAPTIONING.format(**pictures), 40)
    first, last = _first_and_last(log, "lm_loss")
    assert last < 0.6 * first, (first, last)
    assert after["cider"] >= before["cider"] + 60 and after["bleu4"] >= before["bleu4"] + 20, (before, after)


def test_vqa_learns(tmp_path, pictures):
    before, after, log = _run(tmp_path, VQA.format(**pictures), 64)
    first, last = _first_and_last(log, "vqa_loss")
    assert last < 0.7 * first, (first, last)
    assert after["vqa_acc"] >= max(45.0, before["vqa_acc"] + 25), (before, after)


def test_clip_retrieval_learns(tmp_path, pictures):
    pytest.importorskip("open_clip")
    before, after, log = _run(tmp_path, CLIP.format(**pictures), 24)
    first, last = _first_and_last(log, "itc_loss")
    assert last < 0.85 * first, (first, last)
    assert after["r_mean"] >= max(55.0, before["r_mean"] + 20), (before, after)


def test_video_retrieval_learns(tmp_path, clips):
    before, after, log = _run(tmp_path, VIDEO.format(**clips), 24)
    first, last = _first_and_last(log, "itc_loss")
    assert last < 0.85 * first, (first, last)
    assert after["r_mean"] >= max(55.0, before["r_mean"] + 20), (before, after)

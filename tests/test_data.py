"""BLIP-format datasets, image transforms, the synthetic shapes generator and the dataset builders."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unitrans import registry
from unitrans.data import entries as ann
from unitrans.data.base import MediaDataset
from unitrans.data.blip_json import BlipRetrievalData, DataError, collate_retrieval, pre_caption
from unitrans.data.images import ImageReader, ImageTransform, load_image, random_resized_crop_box
from unitrans.data.shapes import COLOURS, make_shapes
from unitrans.interfaces import DataModule

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
COLOUR_A, COLOUR_B, COLOUR_C = (200, 10, 10), (10, 200, 10), (10, 10, 200)


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "raw, max_words, want",
    [
        ("A man-riding/a Horse!!  (on) the beach.", 30, "a man riding a horse on the beach"),
        ('He said "hi"; #tag *star* ~x: y', 30, "he said hi tag star x y"),
        ("  Hello:\n\tWorld~  ", 30, "hello world"),
        ("one two three four", 2, "one two"),
        ("Keeps, commas and 'quotes'?", 30, "keeps, commas and 'quotes'?"),
        ("...", 30, ""),
    ],
)
def test_pre_caption(raw, max_words, want):
    assert pre_caption(raw, max_words) == want


# ---------------------------------------------------------------- a tiny BLIP-format dataset


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), COLOUR_A).save(root / "a.png")
    Image.new("RGB", (32, 32), COLOUR_B).save(root / "sub" / "b.png")
    Image.new("L", (50, 20), 128).save(root / "c.png")  # grey: converted to RGB on load
    train = _write(
        tmp_path / "train.json",
        [
            {"image": "a.png", "caption": "A red Picture.", "image_id": "img_a"},
            {"image": "sub/b.png", "caption": "green", "image_id": 7},
            {"image": "a.png", "caption": "another red one", "image_id": "img_a"},
            {"image": "c.png", "caption": "grey", "image_id": "img_c"},
            {"image": "sub/b.png", "caption": "still green", "image_id": 7},
        ],
    )
    test = _write(
        tmp_path / "test.json",
        [
            {"image": "a.png", "caption": ["Red 1", "red 2"]},
            {"image": "sub/b.png", "caption": ["green 1", "green 2", "green 3"]},
            {"image": "c.png", "caption": "just one"},
        ],
    )
    return root, train, test


def RetrievalTrainDataset(ann_file, root, transform, max_words=30):
    return MediaDataset(ann.pairs_train(Path(ann_file), Path(root), max_words), ImageReader(transform), train=True)


def RetrievalEvalDataset(ann_file, root, transform, max_words=30):
    return MediaDataset(ann.pairs_eval(Path(ann_file), Path(root), max_words), ImageReader(transform), train=False)


def test_train_dataset(tiny):
    root, train, _ = tiny
    ds = RetrievalTrainDataset(train, root, ImageTransform(24, MEAN, STD, train=False))
    assert len(ds) == 5
    assert ds.image_ids == {"img_a": 0, 7: 1, "img_c": 2}
    items = [ds[i] for i in range(5)]
    assert [it["image_id"] for it in items] == [0, 1, 0, 2, 1]
    assert items[0]["caption"] == "a red picture"
    for it in items:
        assert it["image"].shape == (3, 24, 24) and it["image"].dtype == torch.float32
    batch = collate_retrieval(items)
    assert batch["image"].shape == (5, 3, 24, 24)
    assert batch["caption"][1] == "green"
    assert batch["image_id"].dtype == torch.long and batch["image_id"].tolist() == [0, 1, 0, 2, 1]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_retrieval)
    assert [b["image"].shape[0] for b in loader] == [2, 2, 1]


def test_eval_dataset(tiny):
    root, _, test = tiny
    ds = RetrievalEvalDataset(test, root, ImageTransform(16, MEAN, STD, train=False), max_words=1)
    assert len(ds) == 3
    assert ds.images == [str(root / "a.png"), str(root / "sub" / "b.png"), str(root / "c.png")]
    assert ds.texts == ["red", "red", "green", "green", "green", "just"]
    assert ds.txt2img == [0, 0, 1, 1, 1, 2]
    assert ds.img2txt == [[0, 1], [2, 3, 4], [5]]
    item = ds[1]
    assert item["index"] == 1 and item["image"].shape == (3, 16, 16)
    batch = collate_retrieval([ds[0], ds[2]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["index"].tolist() == [0, 2]
    # the grey L-mode image is normalised per channel after conversion to RGB
    want = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(ds[2]["image"].mean(dim=(1, 2)), want, atol=1e-4)


def test_annotation_errors_at_construction(tmp_path, tiny):
    root, _, _ = tiny
    tf = ImageTransform(8, MEAN, STD, train=False)
    missing = tmp_path / "nope.json"
    for cls in (RetrievalTrainDataset, RetrievalEvalDataset):
        with pytest.raises(DataError, match=re.escape(str(missing))):
            cls(missing, root, tf)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "a.png", ')
    with pytest.raises(DataError, match=re.escape(str(bad))):
        RetrievalEvalDataset(bad, root, tf)
    lacking = _write(tmp_path / "lacking.json", [{"image": "a.png", "caption": "x", "image_id": 1}, {"image": "a.png"}])
    with pytest.raises(DataError) as info:
        RetrievalTrainDataset(lacking, root, tf)
    assert str(lacking) in str(info.value) and "entry 1" in str(info.value) and "'caption'" in str(info.value)
    no_id = _write(tmp_path / "no_id.json", [{"image": "a.png", "caption": "x"}, {"image": "sub/b.png", "caption": "y"},
                                             {"image": "a.png", "caption": "z"}])
    assert [it["image_id"] for it in RetrievalTrainDataset(no_id, root, tf)] == [0, 1, 0]  # grouped by image file
    with pytest.raises(DataError, match="'image'"):
        RetrievalEvalDataset(_write(tmp_path / "e.json", [{"caption": ["x"]}]), root, tf)


def test_image_errors_name_the_path(tmp_path, tiny):
    root, _, _ = tiny
    (root / "garbage.jpg").write_bytes(b"\x00not a jpeg at all" * 10)
    ann = _write(
        tmp_path / "t.json",
        [{"image": "missing.jpg", "caption": ["x"]}, {"image": "garbage.jpg", "caption": ["y"]}],
    )
    ds = RetrievalEvalDataset(ann, root, ImageTransform(8, MEAN, STD, train=False))  # images not opened yet
    with pytest.raises(DataError, match=re.escape(str(root / "missing.jpg"))):
        ds[0]
    with pytest.raises(DataError, match=re.escape(str(root / "garbage.jpg"))):
        ds[1]
    with pytest.raises(DataError, match=re.escape(str(root / "garbage.jpg"))):
        load_image(root / "garbage.jpg")


# ---------------------------------------------------------------- transforms


def test_eval_transform_resizes_and_normalises():
    img = Image.new("RGB", (40, 30), COLOUR_A)
    x = ImageTransform(20, MEAN, STD, train=False)(img)
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    want = (torch.tensor(COLOUR_A) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x, want.view(3, 1, 1).expand(3, 20, 20), atol=1e-4)
    # identity normalisation leaves pixel values in [0, 1]
    y = ImageTransform(20, (0, 0, 0), (1, 1, 1), train=False)(img)
    assert torch.allclose(y[:, 0, 0], torch.tensor(COLOUR_A) / 255.0, atol=1e-4)


def test_train_transform_seeded_and_never_flips():
    arr = np.zeros((60, 80, 3), dtype=np.uint8)
    arr[:, :40] = COLOUR_A  # red left half
    arr[:, 40:] = COLOUR_C  # blue right half
    img = Image.fromarray(arr)
    tf = ImageTransform(32, (0, 0, 0), (1, 1, 1), train=True, min_scale=0.5)
    random.seed(3)
    a = tf(img)
    random.seed(3)
    assert torch.equal(a, tf(img))
    assert a.shape == (3, 32, 32)
    for _ in range(30):
        x = tf(img)
        # the red channel decreases from left to right in every crop (a flip would reverse it)
        assert x[0, :, 0].mean() > x[0, :, -1].mean()


def test_random_resized_crop_box_ranges():
    rng = random.Random(0)
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(200, 150, 0.5, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 150
        assert 0.5 - 0.02 <= w * h / (200 * 150) <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ImageTransform(16, MEAN, STD, train=True, min_scale=0.0)
    with pytest.raises(ValueError):
        ImageTransform(16, MEAN[:2], STD, train=False)


# ---------------------------------------------------------------- synthetic shapes

SMALL = dict(n_train=40, n_val=6, n_test=8, image_size=48, captions_per_image=3, seed=5)
_OBJ = r"(?:(small|large) )?(red|green|blue|yellow|purple|orange) (circle|square|triangle)"
_REL = (
    r"(left of|to the left of|on the left of|right of|to the right of|on the right of|"
    r"above|on top of|over|below|under|beneath)"
)
_REL_CANON = {
    "left of": "left of", "to the left of": "left of", "on the left of": "left of",
    "right of": "right of", "to the right of": "right of", "on the right of": "right of",
    "above": "above", "on top of": "above", "over": "above",
    "below": "below", "under": "below", "beneath": "below",
}  # fmt: skip
_PLACE = {"on the left": "left of", "on the right": "right of", "at the top": "above", "at the bottom": "below"}


def _relations_in(caption: str):
    """(subject (size, colour, shape), relation, object) statements a caption makes, parsed independently."""
    m = re.fullmatch(rf"an? {_OBJ} {_REL} an? {_OBJ}", caption)
    if m:
        g = m.groups()
        return [(g[0:3], _REL_CANON[g[3]], g[4:7])]
    m = re.fullmatch(rf"there is an? {_OBJ} and an? {_OBJ} {_REL} it", caption)
    if m:
        g = m.groups()
        return [(g[3:6], _REL_CANON[g[6]], g[0:3])]
    place = "(on the left|on the right|at the top|at the bottom)"
    m = re.fullmatch(rf"an? {_OBJ} {place} and an? {_OBJ} {place}", caption)
    if m:
        g = m.groups()
        assert _PLACE[g[3]] == {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[
            _PLACE[g[7]]
        ], caption
        return [(g[0:3], _PLACE[g[3]], g[4:7])]
    assert not re.search(r"\b(left|right|above|below|top|bottom|over|under|beneath)\b", caption), caption
    return []


def _holds(a: dict, rel: str, b: dict) -> bool:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]  # image y grows downwards
    return {
        "left of": dx > abs(dy),
        "right of": -dx > abs(dy),
        "above": dy > abs(dx),
        "below": -dy > abs(dx),
    }[rel]


def _count_renders(monkeypatch) -> list:
    import unitrans.data.shapes as shapes

    calls, render = [], shapes._render
    monkeypatch.setattr(shapes, "_render", lambda *a: calls.append(1) or render(*a))
    return calls


def test_make_shapes_files_and_loader(tmp_path, monkeypatch):
    renders = _count_renders(monkeypatch)
    paths = make_shapes(tmp_path / "s", **SMALL)
    assert len(renders) == 40 + 6 + 8  # one drawing per image, nothing else
    for key in ("train", "val", "test", "layout", "manifest"):
        assert Path(paths[key]).is_file()
    manifest = json.loads(Path(paths["manifest"]).read_text())
    assert manifest["params"]["seed"] == 5 and manifest["params"]["n_train"] == 40
    train = json.loads(Path(paths["train"]).read_text())
    assert len(train) == 40 * 3
    assert train[0]["image_id"] == "shapes_000000" and train[0]["image"] == "images/shapes_000000.png"
    tf = ImageTransform(32, MEAN, STD, train=True)
    ds = RetrievalTrainDataset(paths["train"], paths["image_root"], tf)
    assert len(ds) == 120 and len(ds.image_ids) == 40
    assert ds[0]["image"].shape == (3, 32, 32)
    test = RetrievalEvalDataset(paths["test"], paths["image_root"], ImageTransform(32, MEAN, STD, train=False))
    assert len(test) == 8 and len(test.texts) == 24 and test.img2txt[0] == [0, 1, 2]
    with Image.open(test.images[0]) as im:
        assert im.size == (48, 48)
    for i in range(len(test)):
        assert len(set(test.texts[j] for j in test.img2txt[i])) == 3  # three distinct paraphrases


def test_make_shapes_deterministic_and_idempotent(tmp_path, monkeypatch):
    p1 = make_shapes(tmp_path / "one", **SMALL)
    p2 = make_shapes(tmp_path / "two", **SMALL)
    for key in ("train", "val", "test", "layout"):
        assert Path(p1[key]).read_text() == Path(p2[key]).read_text()
    name = "images/shapes_000003.png"
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    p3 = make_shapes(tmp_path / "three", **{**SMALL, "seed": 6})
    assert Path(p1["train"]).read_text() != Path(p3["train"]).read_text()

    stamps = {p: p.stat().st_mtime_ns for p in [Path(p1["manifest"]), Path(p1["train"]), tmp_path / "one" / name]}
    renders = _count_renders(monkeypatch)
    assert make_shapes(tmp_path / "one", **SMALL) == p1
    assert renders == []  # up to date: nothing drawn, nothing written
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # other parameters regenerate in place
    make_shapes(tmp_path / "one", **{**SMALL, "n_test": 3})
    assert len(json.loads(Path(p1["test"]).read_text())) == 3
    assert json.loads(Path(p1["manifest"]).read_text())["params"]["n_test"] == 3


def test_shapes_captions_agree_with_layout_and_pixels(tmp_path):
    paths = make_shapes(tmp_path / "s", **{**SMALL, "n_train": 150, "captions_per_image": 6})
    layout = json.loads(Path(paths["layout"]).read_text())
    n_relations = 0
    for rec in layout:
        objects = {(o["colour"], o["shape"]): o for o in rec["objects"]}
        assert len(objects) == len(rec["objects"])  # two objects never share colour and shape
        for caption in rec["captions"]:
            assert pre_caption(caption) == caption
            colours = set(re.findall(r"\b(red|green|blue|yellow|purple|orange)\b", caption))
            assert colours <= {c for c, _ in objects}
            for (size_a, col_a, sh_a), rel, (size_b, col_b, sh_b) in _relations_in(caption):
                a, b = objects[(col_a, sh_a)], objects[(col_b, sh_b)]
                assert size_a in (None, a["size"]) and size_b in (None, b["size"])
                assert _holds(a, rel, b), (rec, caption)
                n_relations += 1
        with Image.open(Path(paths["image_root"]) / rec["image"]) as im:
            pixels = im.convert("RGB").load()
            for o in rec["objects"]:
                px = np.array(pixels[int(o["cx"]), int(o["cy"])], dtype=float)
                nearest = min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - px) ** 2)))
                assert nearest == o["colour"], (rec, px)
    assert n_relations > 200


# ---------------------------------------------------------------- registered builders


def test_builders_return_datamodules(tmp_path, tiny, monkeypatch):
    root, train, test = tiny
    monkeypatch.chdir(tmp_path)
    blip = registry.datasets.live()["blip_retrieval.v1"]
    data = blip(image_root="imgs", train_file="train.json", test_file="test.json")
    monkeypatch.chdir(root)  # relative paths were resolved when the builder ran
    assert isinstance(data, BlipRetrievalData)
    dm = data.setup(24, MEAN, STD)
    assert isinstance(dm, DataModule) and dm.val is None and dm.collate is collate_retrieval
    assert dm.train.train and not dm.test.train and len(dm.train) == 5 and len(dm.test) == 3
    assert dm.test[0]["image"].shape == (3, 24, 24)
    with pytest.raises(DataError, match="missing.json"):
        blip(image_root=str(root), val_file=str(tmp_path / "missing.json")).setup(24, MEAN, STD)

    monkeypatch.chdir(tmp_path)
    shapes = registry.datasets.live()["shapes_retrieval.v1"]
    dm = shapes(root="rel/shapes", n_train=10, n_val=2, n_test=3, image_size=32).setup(40, MEAN, STD)
    assert (tmp_path / "rel" / "shapes" / "manifest.json").is_file()
    assert dm.train.train and len(dm.train) == 30
    assert not dm.val.train and len(dm.val) == 2 and len(dm.test) == 3
    batch = dm.collate([dm.train[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 40, 40)


def test_builder_module_is_light():
    code = (
        "import sys, unitrans.data; "
        "heavy = [m for m in ('torch', 'PIL', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr

"""The one data layer: every training dataset is a function of (seed, epoch, item); images have ``on_error``;
every PIL mode becomes the right RGB; BLIP's augmentation against a reference; the common downloads (Karpathy,
COCO) and ordinary file names read as they are; generated data under an unwritable folder fails in one line."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unitrans import registry
from unitrans.errors import DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SIZE = 16


def _json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six 'photos' with ordinary names (no COCO numbers), textured so that crops and flips change pixels."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse"):
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


def _blip_files(root: Path) -> dict[str, Path]:
    names = sorted(p.name for p in root.glob("*.png"))
    train = [{"image": n, "caption": f"a photo of {n[:-4]} number {k}", "image_id": n[:-4]}
             for n in names for k in range(2)]
    test = [{"image": n, "caption": [f"a photo of {n[:-4]}", f"{n[:-4]} again"]} for n in names[:3]]
    qa = [{"question_id": i, "question": f"what is {n[:-4]}?", "answer": [n[:-4], n[:-4], "thing"], "image": n,
           "dataset": "vqa"} for i, n in enumerate(names)]
    d = root.parent / f"{root.name}_ann"
    d.mkdir(exist_ok=True)
    return {"train": _json(d / "train.json", train), "test": _json(d / "test.json", test),
            "qa": _json(d / "qa.json", qa), "answers": _json(d / "answers.json", [n[:-4] for n in names] + ["thing"])}


def _video_root(tmp: Path) -> Path:
    from unitrans.data.video import write_video

    root = tmp / "videos"
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for k in range(3):
        write_video(root / f"clip{k}.mp4", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), fps=4)
    _json(root / "train.json", [{"video": f"clip{k}.mp4", "caption": f"clip {k} {j}"}
                                for k in range(3) for j in (0, 1)])
    _json(root / "qa.json", [{"question_id": 2 * k + j, "question": f"what {j}?", "answer": f"a{k}",
                              "video": f"clip{k}.mp4"} for k in range(3) for j in (0, 1)])
    return root


def _builder(name: str, tmp: Path, photos: Path):
    """A small instance of every registered dataset, with training augmentation switched on."""
    files = _blip_files(photos)
    small = dict(n_train=4, n_val=2, n_test=2)
    video = dict(num_frames_train=3, num_frames_eval=3)
    make = registry.get("datasets", name)
    if name == "blip_retrieval.v1":
        return make(image_root=str(photos), train_file=str(files["train"]), augment="blip")
    if name == "blip_caption.v1":
        return make(image_root=str(photos), train_file=str(files["train"]), min_scale=0.3)
    if name == "blip_vqa.v1":
        return make(image_root=str(photos), train_files=[str(files["qa"])], augment="blip")
    if name in ("shapes_retrieval.v1", "shapes_caption.v1", "shapes_vqa.v1"):
        return make(root=str(tmp / name), image_size=32, augment="blip", **small)
    if name == "easy_vqa.v1":
        pytest.importorskip("easy_vqa")
        return make(root=str(tmp / name), max_train=8, max_val=2, max_test=2, n_val_images=2, augment="blip")
    pytest.importorskip("decord")
    if name == "didemo_retrieval.v1":
        root = _video_root(tmp)
        return make(video_root=str(root), train_file=str(root / "train.json"), **video)
    if name == "msrvtt_qa.v1":
        root = _video_root(tmp)
        return make(video_root=str(root), train_file=str(root / "qa.json"), **video)
    return make(root=str(tmp / name), clip_frames=8, clip_size=32, **small, **video)


def _first_party_datasets() -> list[str]:
    registry.import_all_indexed()
    return sorted(e.name for e in registry.read_index() if e.kind == "datasets")


def _scramble_global_rngs(k: int) -> None:
    random.seed(1000 + k)
    np.random.seed(1000 + k)
    torch.manual_seed(1000 + k)


@pytest.mark.parametrize("name", _first_party_datasets())
def test_every_training_dataset_is_a_function_of_seed_epoch_and_item(name, tmp_path, photos):
    """Two builds (two "processes"), items read in different orders with the global generators scrambled in
    between, sharded by the engine's sampler over 1 and 2 ranks: the same tensors. Another epoch: other draws."""
    from unitrans.engine.run import EpochSampler

    a = _builder(name, tmp_path, photos).setup(SIZE, MEAN, STD).train
    b = _builder(name, tmp_path, photos).setup(SIZE, MEAN, STD).train
    n = len(a)
    per_device = 2
    one = list(EpochSampler(n, 2 * per_device, 1, 0, seed=3))
    ranks = [list(EpochSampler(n, per_device, 2, r, seed=3)) for r in (0, 1)]
    two = [i for g in range(len(ranks[0]) // per_device) for r in (0, 1)
           for i in ranks[r][g * per_device:(g + 1) * per_device]]
    assert one == two and len(one) >= 4
    for ds in (a, b):
        ds.set_epoch(2, seed=3)
    for k, i in enumerate(one):
        _scramble_global_rngs(k)
        x = a[i]["image"]
        _scramble_global_rngs(k + 7)
        assert torch.equal(x, b[two[k]]["image"]), f"{name}: item {i} differs between two reads"
    a.set_epoch(3, seed=3)
    b.set_epoch(2, seed=3)
    assert any(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(n)), f"{name}: epochs draw alike"


# ---- PIL modes ---------------------------------------------------------------------------------------------------
def _ref_rgb(mode: str, value) -> tuple[int, int, int]:
    """What a pixel of ``mode`` looks like, written out by hand (transparency over white)."""
    if mode == "1":
        g = 255 if value else 0
    elif mode == "L":
        g = value
    elif mode == "LA":
        g = round(value[0] * value[1] / 255 + 255 * (1 - value[1] / 255))
    elif mode in ("I;16", "I"):
        g = round(min(value, 65535) / 65535 * 255)
    elif mode == "F":
        g = round(min(max(value, 0.0), 1.0) * 255)
    elif mode == "RGBA":
        a = value[3] / 255
        return tuple(round(c * a + 255 * (1 - a)) for c in value[:3])
    elif mode == "CMYK":
        c, m, y, k = value
        return tuple(round((255 - k) * (1 - v / 255)) for v in (c, m, y))
    else:
        raise AssertionError(mode)
    return (g, g, g)


@pytest.mark.parametrize("mode, values", [
    ("1", [0, 1]),
    ("L", [0, 37, 200, 255]),
    ("LA", [(200, 255), (200, 0), (100, 128)]),
    ("I;16", [0, 257, 32896, 65535]),
    ("I", [0, 1000, 40000, 65535]),
    ("F", [0.0, 0.25, 0.5, 1.0]),
    ("RGBA", [(10, 200, 30, 255), (10, 200, 30, 0), (250, 0, 0, 100)]),
    ("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 128, 64, 32), (0, 0, 0, 255)]),
])
def test_every_pil_mode_becomes_the_rgb_it_shows(mode, values, tmp_path):
    from unitrans.data.images import load_image, to_rgb

    img = Image.new(mode, (len(values), 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    for converted in (to_rgb(img), _saved_and_loaded(img, tmp_path, load_image)):
        got = [converted.getpixel((x, 0)) for x in range(len(values))]
        want = [_ref_rgb(mode, v) for v in values]
        assert converted.mode == "RGB"
        assert all(abs(g - w) <= 1 for gp, wp in zip(got, want) for g, w in zip(gp, wp)), (mode, got, want)


def _saved_and_loaded(img: Image.Image, tmp: Path, load):
    fmt = {"CMYK": "tiff", "F": "tiff", "I": "tiff"}.get(img.mode, "png")
    path = tmp / f"img.{fmt}"
    img.save(path)
    return load(path)


def test_palette_with_transparency_and_a_sixteen_bit_png_file(tmp_path):
    from unitrans.data.images import load_image

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1  # palette entry 1 (blue) is transparent
    pal.save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert [loaded.getpixel((x, 0)) for x in range(2)] == [(255, 0, 0), (255, 255, 255)]
    grey16 = Image.fromarray(np.array([[1000, 30000]], dtype=np.uint16))  # mode I;16: once a white picture
    grey16.save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert [loaded.getpixel((x, 0))[0] for x in range(2)] == [round(1000 / 257), round(30000 / 257)]


# ---- on_error for images -----------------------------------------------------------------------------------------
def test_images_skip_unreadable_files_counted_in_train_and_eval(tmp_path, photos, caplog):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(photos, root)
    (root / "broken.jpg").write_bytes(b"\x00 not a jpeg" * 20)
    train = _json(tmp_path / "train.json", [{"image": n, "caption": n[:-4], "image_id": n}
                                            for n in ("missing.png", "broken.jpg", "coffee.png")])
    test = _json(tmp_path / "test.json", [{"image": n, "caption": [n]} for n in ("missing.png", "coffee.png")])
    make = registry.get("datasets", "blip_retrieval.v1")
    strict = make(image_root=str(root), train_file=str(train), test_file=str(test)).setup(SIZE, MEAN, STD)
    with pytest.raises(DataError, match="missing.png"):
        strict.train[0]
    data = make(image_root=str(root), train_file=str(train), test_file=str(test), on_error="skip").setup(
        SIZE, MEAN, STD)
    with caplog.at_level(logging.WARNING, logger="unitrans.data"):
        item = data.train[0]  # missing -> broken -> coffee
    assert item["caption"] == "coffee" and data.train.skipped == 2
    assert sum("missing.png" in r.getMessage() or "broken.jpg" in r.getMessage() for r in caplog.records) == 2
    blank = data.test[0]["image"]
    assert data.test.skipped == 1 and blank.shape == (3, SIZE, SIZE) and blank.std() == 0
    assert data.test[1]["image"].std() > 0 and data.test.skipped == 1


def test_confine_to_root_refuses_images_outside_the_image_folder(tmp_path, photos):
    """Annotations taken from elsewhere may name files anywhere: ``..``, an absolute path, a link out of the folder.
    With ``confine_to_root`` each is refused before a byte is read; by default (trusted annotations) they load."""
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(photos, root)
    secret = tmp_path / "secret.png"
    shutil.copy(root / "coffee.png", secret)
    (root / "link.png").symlink_to(secret)
    names = ["coffee.png", "../secret.png", str(secret), "link.png"]
    test = _json(tmp_path / "test.json", [{"image": n, "caption": [f"c{k}"]} for k, n in enumerate(names)])
    make = registry.get("datasets", "blip_retrieval.v1")
    trusted = make(image_root=str(root), test_file=str(test))
    assert trusted.preflight(False).problems == [] and len(trusted.setup(SIZE, MEAN, STD).test) == 4
    confined = make(image_root=str(root), test_file=str(test), confine_to_root=True)
    problems = confined.preflight(False).problems
    assert len(problems) == 3 and all("lies outside" in p and str(root.resolve()) in p for p in problems)
    assert not any(p.split(": ", 1)[1].startswith(str(root / "coffee.png")) for p in problems)
    with pytest.raises(DataError, match=r"lies outside .* \(and 2 more\)"):
        confined.setup(SIZE, MEAN, STD)


# ---- BLIP's augmentation -----------------------------------------------------------------------------------------
def _ref_warp(img: np.ndarray, inverse) -> np.ndarray:
    """Per-pixel loop: output (x, y) reads the input at inverse(x, y), bilinear, grey 128 outside."""
    h, w, _ = img.shape
    out = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            sx, sy = inverse(x, y)
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            ax, ay = sx - x0, sy - y0
            acc = np.zeros(3)
            for yy, wy in ((y0, 1 - ay), (y0 + 1, ay)):
                for xx, wx in ((x0, 1 - ax), (x0 + 1, ax)):
                    v = img[yy, xx].astype(float) if 0 <= xx < w and 0 <= yy < h else np.full(3, 128.0)
                    acc += wx * wy * v
            out[y, x] = np.clip(np.floor(acc + 0.5), 0, 255)
    return out


def _ref_autocontrast(img):
    out = img.copy()
    for c in range(3):
        lo, hi = int(img[..., c].min()), int(img[..., c].max())
        if hi > lo:  # BLIP's table: v * scale - lo * scale, truncated
            scale = 255 / (hi - lo)
            out[..., c] = [[min(255, max(0, int(v * scale - lo * scale))) for v in row] for row in img[..., c]]
    return out


def _rotation_inverse(deg, w, h):
    t = np.radians(deg)
    cx, cy = w / 2, h / 2

    def inv(x, y):  # a counter-clockwise rotation on screen, about the centre, undone
        dx, dy = x - cx, y - cy
        return cx + np.cos(t) * dx - np.sin(t) * dy, cy + np.sin(t) * dx + np.cos(t) * dy

    return inv


@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "AutoContrast",
                                  "Equalize", "Brightness", "Sharpness", "Identity"])
def test_rand_augment_operations_match_a_reference(name):
    from PIL import ImageOps

    from unitrans.data.augment import _op

    img = np.random.default_rng(5).integers(0, 256, (30, 34, 3), dtype=np.uint8)
    img[..., 2] //= 2  # a channel that does not span [0, 255]
    for sign_draw in (0.2, 0.8):  # BLIP: magnitude 5 of 10, sign negative when the draw is above 0.5
        rng = random.Random()
        rng.random = lambda d=sign_draw: d
        got = _op(name, 5, rng)(img)
        s = -1 if sign_draw > 0.5 else 1
        h, w = img.shape[:2]
        want = {
            "ShearX": lambda: _ref_warp(img, lambda x, y: (x - s * 0.15 * y, y)),
            "ShearY": lambda: _ref_warp(img, lambda x, y: (x, y - s * 0.15 * x)),
            "TranslateX": lambda: _ref_warp(img, lambda x, y: (x + s * 5.0, y)),
            "TranslateY": lambda: _ref_warp(img, lambda x, y: (x, y + s * 5.0)),
            "Rotate": lambda: _ref_warp(img, _rotation_inverse(s * 15.0, w, h)),
            "AutoContrast": lambda: _ref_autocontrast(img),
            "Equalize": lambda: np.asarray(ImageOps.equalize(Image.fromarray(img))),  # PIL: BLIP's stated oracle
            "Brightness": lambda: img,  # factor 5 / 10 * 1.8 + 0.1 = 1.0
            "Sharpness": lambda: img,
            "Identity": lambda: img,
        }[name]()
        assert np.array_equal(got, want), name


def test_blip_augment_flips_and_draws_from_the_item_generator_crop_never_flips():
    from unitrans.data.images import ImageTransform

    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:, :20] = (250, 10, 10)  # red left half
    img = Image.fromarray(arr)
    blip = ImageTransform(32, (0, 0, 0), (1, 1, 1), train=True, min_scale=0.9, augment="blip")
    crop = ImageTransform(32, (0, 0, 0), (1, 1, 1), train=True, min_scale=0.9)
    left_red = [bool(blip(img, random.Random(k))[0, :, :4].mean() > blip(img, random.Random(k))[0, :, -4:].mean())
                for k in range(40)]
    assert 5 < sum(left_red) < 35  # flipped about half the time
    assert all(crop(img, random.Random(k))[0, :, :4].mean() > crop(img, random.Random(k))[0, :, -4:].mean()
               for k in range(40))
    assert torch.equal(blip(img, random.Random(7)), blip(img, random.Random(7)))


# ---- annotation files as people have them ------------------------------------------------------------------------
def _karpathy(photos: Path) -> dict:
    names = sorted(p.name for p in photos.glob("*.png"))
    splits = ["train", "restval", "train", "val", "test", "test"]
    return {"dataset": "coco", "images": [
        {"filepath": "", "filename": n, "imgid": k, "cocoid": 100 + k, "split": s,
         "sentences": [{"raw": f"A photo of {n[:-4]}.", "tokens": []}, {"raw": f"{n[:-4]} seen", "tokens": []}]}
        for k, (n, s) in enumerate(zip(names, splits))]}


def _coco(photos: Path) -> dict:
    names = sorted(p.name for p in photos.glob("*.png"))
    return {"images": [{"id": 500 + k, "file_name": n} for k, n in enumerate(names)],
            "annotations": [{"id": j, "image_id": 500 + k, "caption": f"{names[k][:-4]} caption {j % 2}"}
                            for j, k in enumerate([0, 0, 1, 1, 2, 2, 3, 4, 5])]}


def test_karpathy_and_coco_files_read_as_they_are_downloaded(tmp_path, photos):
    karpathy = _json(tmp_path / "dataset_coco.json", _karpathy(photos))
    coco = _json(tmp_path / "captions_val2014.json", _coco(photos))
    ret = registry.get("datasets", "blip_retrieval.v1")
    cap = registry.get("datasets", "blip_caption.v1")
    k = str(karpathy)
    data = ret(image_root=str(photos), train_file=k, val_file=k, test_file=k).setup(SIZE, MEAN, STD)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 1, 2)  # train + restval: 3 images x 2
    assert data.test.img2txt == [[0, 1], [2, 3]] and data.test.texts[0] == "a photo of horse"
    assert [data.train[i]["image_id"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    data = cap(image_root=str(photos), train_file=k, test_file=k).setup(SIZE, MEAN, STD)
    assert data.test.image_ids == [104, 105] and data.test.references[104] == ["A photo of horse.", "horse seen"]
    # COCO's own file: one split; as an eval file it is its own ground truth
    c = str(coco)
    data = cap(image_root=str(photos), train_file=c, test_file=c, test_gt_file=c).setup(SIZE, MEAN, STD)
    assert len(data.train) == 9 and len(data.test) == 6 and data.test.image_ids == list(range(500, 506))
    assert data.test.references[500] == ["astronaut caption 0", "astronaut caption 1"]
    data = ret(image_root=str(photos), test_file=c).setup(SIZE, MEAN, STD)
    assert len(data.test) == 6 and len(data.test.texts) == 9


def test_caption_ids_from_image_id_file_name_or_position(tmp_path, photos):
    cap = registry.get("datasets", "blip_caption.v1")
    given = _json(tmp_path / "given.json", [{"image": "astronaut.png", "caption": ["a"], "image_id": 42},
                                            {"image": "coffee.png", "caption": ["b"], "image_id": "7"}])
    assert cap(image_root=str(photos), test_file=str(given)).setup(SIZE, MEAN, STD).test.image_ids == [42, 7]
    plain = _json(tmp_path / "plain.json", [{"image": "astronaut.png", "caption": ["a"]},
                                            {"image": "coffee.png", "caption": ["b"]}])
    data = cap(image_root=str(photos), test_file=str(plain)).setup(SIZE, MEAN, STD)
    assert data.test.image_ids == [0, 1] and data.test.references == {0: ["a"], 1: ["b"]}
    gt = _json(tmp_path / "gt.json", {"annotations": [{"image_id": 0, "caption": "x"}]})
    with pytest.raises(DataError, match=r"add \"image_id\"") as info:
        cap(image_root=str(photos), test_file=str(plain), test_gt_file=str(gt)).setup(SIZE, MEAN, STD)
    assert "astronaut.png" in str(info.value) and "\n" not in str(info.value)


def test_repeated_images_in_an_eval_file_are_merged_with_a_warning(tmp_path, photos, caplog):
    train_layout = _json(tmp_path / "t.json", [{"image": "astronaut.png", "caption": "one", "image_id": 1},
                                               {"image": "coffee.png", "caption": "two", "image_id": 2},
                                               {"image": "astronaut.png", "caption": "three", "image_id": 1}])
    with caplog.at_level(logging.WARNING, logger="unitrans.data"):
        data = registry.get("datasets", "blip_retrieval.v1")(image_root=str(photos), test_file=str(train_layout))
        test = data.setup(SIZE, MEAN, STD).test
    assert len(test) == 2 and test.img2txt == [[0, 1], [2]] and test.texts == ["one", "three", "two"]
    assert any("3 entries for 2 images" in r.getMessage() and "t.json" in r.getMessage() for r in caplog.records)


# ---- generated data: an unwritable root ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["shapes_retrieval.v1", "shapes_vqa.v1", "shapes_caption.v1"])
def test_unwritable_data_root_is_one_line_naming_the_folder(name, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    root = blocker / "data"
    builder = registry.get("datasets", name)(root=str(root), n_train=2, n_val=1, n_test=1)
    report = builder.preflight(False)
    assert len(report.problems) == 1 and str(root) in report.problems[0]
    assert report.sizes["train"] >= 2 and not root.exists()  # sizes without generating
    with pytest.raises(DataError) as info:
        builder.setup(SIZE, MEAN, STD)
    assert str(root) in str(info.value) and "data.root" in str(info.value) and "\n" not in str(info.value)


def test_an_unreadable_image_in_a_loader_worker_is_still_one_line_naming_it(tmp_path, photos):
    from unitrans.data.blip_json import collate_retrieval

    ann = _json(tmp_path / "t.json", [{"image": "coffee.png", "caption": ["x"]},
                                      {"image": "gone.png", "caption": ["y"]}])
    test = registry.get("datasets", "blip_retrieval.v1")(image_root=str(photos), test_file=str(ann)).setup(
        SIZE, MEAN, STD).test
    loader = torch.utils.data.DataLoader(test, batch_size=1, num_workers=1, collate_fn=collate_retrieval)
    with pytest.raises(DataError) as info:
        list(loader)
    assert str(info.value) == f"image not found: {photos / 'gone.png'}"

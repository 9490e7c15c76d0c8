"""Synthetic compositional image-text data: one or two coloured shapes on a plain light background.

Each object has a colour (6), a shape (3) and a size (2): 36 objects. A two-object image also has a spatial
relation (left of / right of / above / below) that its layout satisfies: the objects are separated along
the relation's axis by more than the sum of their radii, and offset across it by at most half that distance.
The two objects always differ in colour or shape, so "the red circle" names one of them.

Distinct scene descriptions: 36 single-object scenes, plus 36 * 34 ordered pairs * 4 relations = 4896
two-object captions, i.e. 2448 scenes ("A left of B" is the scene "B right of A"): 2484 in all
(:data:`N_DESCRIPTIONS`). The captions of one image are paraphrases drawn from a few templates, some of them
less specific than the scene ("a red circle and a blue square"). Positions, sizes and colours jitter, so
images of one description differ.

Only PIL is needed to generate; the ``shapes_retrieval.v1`` builder hands the written files to the BLIP loader.
"""

from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image, ImageDraw

from unitrans.errors import DataError
from unitrans.fileio import atomic_write_json

GENERATOR = "shapes.v1"
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (230, 200, 20),
    "purple": (135, 55, 175),
    "orange": (240, 130, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[float, float]] = {"small": (0.085, 0.105), "large": (0.17, 0.2)}  # radius / image side
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath"),
}
P_SINGLE = 0.25  # fraction of single-object images
N_OBJECTS = len(COLOURS) * len(SHAPES) * len(SIZES)
N_DESCRIPTIONS = N_OBJECTS + N_OBJECTS * (N_OBJECTS - 2) * len(RELATIONS) // 2
_SUPERSAMPLE = 4
_COLOUR_JITTER = 12


def _full(o: dict[str, Any]) -> str:
    return f"{o['size']} {o['colour']} {o['shape']}"


def _short(o: dict[str, Any]) -> str:
    return f"{o['colour']} {o['shape']}"


def _a(phrase: str) -> str:
    """Phrase with its indefinite article ("an orange circle", "a small circle")."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _single_captions(o: dict[str, Any]) -> list[str]:
    return [
        _a(_full(o)),
        f"{_a(_full(o))} on a plain background",
        f"a single {_full(o)}",
        f"one {_full(o)} in the picture",
        f"a picture of {_a(_short(o))}",
        f"a {o['size']} {o['shape']} that is {o['colour']}",
    ]


def _pair_captions(a: dict[str, Any], b: dict[str, Any], rel: str, rng: random.Random) -> list[str]:
    """Paraphrases of "a rel b"."""
    w = rng.choice(RELATION_WORDS[rel])
    inv = rng.choice(RELATION_WORDS[INVERSE[rel]])
    w2 = rng.choice(RELATION_WORDS[rel])
    place = {
        "left of": ("on the left", "on the right"),
        "right of": ("on the right", "on the left"),
        "above": ("at the top", "at the bottom"),
        "below": ("at the bottom", "at the top"),
    }[rel]
    return [
        f"{_a(_full(a))} {w} {_a(_full(b))}",
        f"{_a(_full(b))} {inv} {_a(_full(a))}",
        f"{_a(_short(a))} and {_a(_short(b))}",
        f"{_a(_short(a))} {w2} {_a(_short(b))}",
        f"{_a(_full(a))} {place[0]} and {_a(_full(b))} {place[1]}",
        f"there is {_a(_full(b))} and {_a(_full(a))} {w} it",
    ]


def _random_object(rng: random.Random, size_px: int) -> dict[str, Any]:
    size = rng.choice(list(SIZES))
    lo, hi = SIZES[size]
    return {
        "colour": rng.choice(list(COLOURS)),
        "shape": rng.choice(SHAPES),
        "size": size,
        "r": rng.uniform(lo, hi) * size_px,
    }


def _place_pair(a: dict[str, Any], b: dict[str, Any], rel: str, s: int, rng: random.Random) -> None:
    """Sets ``cx, cy`` of a and b so that "a rel b" holds unambiguously and their boxes do not overlap."""
    margin, gap = 1.0, 0.04 * s
    horizontal = rel in ("left of", "right of")
    lo, hi = (a, b) if rel in ("left of", "above") else (b, a)  # lo: smaller coordinate on the main axis
    need = lo["r"] + hi["r"] + gap
    main_lo = rng.uniform(margin + lo["r"], s - margin - hi["r"] - need)
    main_hi = rng.uniform(main_lo + need, s - margin - hi["r"])
    d = main_hi - main_lo
    cross_lo = rng.uniform(margin + lo["r"], s - margin - lo["r"])
    c_min = max(margin + hi["r"], cross_lo - 0.5 * d)
    c_max = min(s - margin - hi["r"], cross_lo + 0.5 * d)
    cross_hi = rng.uniform(c_min, c_max) if c_min <= c_max else min(max(cross_lo, c_min), c_max)
    for o, main, cross in ((lo, main_lo, cross_lo), (hi, main_hi, cross_hi)):
        o["cx"], o["cy"] = (main, cross) if horizontal else (cross, main)


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in rgb)  # type: ignore


def _render(objects: Sequence[dict[str, Any]], s: int, rng: random.Random) -> Image.Image:
    k = _SUPERSAMPLE
    background = tuple(rng.randint(228, 250) for _ in range(3))
    img = Image.new("RGB", (s * k, s * k), background)
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r = o["cx"] * k, o["cy"] * k, o["r"] * k
        fill = _jitter(COLOURS[o["colour"]], rng)
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            h = 0.85 * r
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return img.resize((s, s), Image.BOX)


def _scene(rng: random.Random, s: int, n_captions: int, p_single: float = P_SINGLE) -> dict[str, Any]:
    """Draws one scene: objects with positions, relation (or None) and its captions."""
    a = _random_object(rng, s)
    if rng.random() < p_single:
        a["cx"] = rng.uniform(a["r"] + 1, s - a["r"] - 1)
        a["cy"] = rng.uniform(a["r"] + 1, s - a["r"] - 1)
        objects, rel, pool = [a], None, _single_captions(a)
    else:
        b = _random_object(rng, s)
        while (b["colour"], b["shape"]) == (a["colour"], a["shape"]):
            b = _random_object(rng, s)
        rel = rng.choice(RELATIONS)
        _place_pair(a, b, rel, s, rng)
        objects, pool = [a, b], _pair_captions(a, b, rel, rng)
    rng.shuffle(pool)
    captions = [pool[i % len(pool)] for i in range(n_captions)]  # cycles when more than the templates
    for o in objects:
        o["cx"], o["cy"], o["r"] = round(o["cx"], 2), round(o["cy"], 2), round(o["r"], 2)
    return {"objects": objects, "relation": rel, "captions": captions}


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=1)


def up_to_date(manifest: Path, params: dict[str, Any], outputs: list[Path]) -> bool:
    """True when ``manifest`` (written last by a generator) records ``params`` and every output exists; a
    stale manifest is removed (never left over partial output)."""
    if not manifest.is_file():
        return False
    try:
        done = json.loads(manifest.read_text(encoding="utf-8")).get("params") == params
    except (json.JSONDecodeError, AttributeError, OSError):
        done = False
    if done and all(p.exists() for p in outputs):
        return True
    manifest.unlink(missing_ok=True)
    return False


@contextmanager
def writing(root: Path) -> Iterator[None]:
    """Turns a failure to write generated data under ``root`` into one line that names the folder."""
    try:
        yield
    except OSError as exc:
        raise DataError(f"cannot write the generated data under {root}: {exc.strerror or exc}; set data.root "
                        "to a writable folder") from None


def make_shapes(
    root: str | Path,
    n_train: int = 2000,
    n_val: int = 100,
    n_test: int = 100,
    image_size: int = 64,
    captions_per_image: int = 3,
    seed: int = 0,
    p_single: float = P_SINGLE,
) -> dict[str, str]:
    """Writes the synthetic dataset under ``root`` (a no-op when ``root`` already holds it).

    Layout: ``images/shapes_NNNNNN.png``; ``train.json`` (BLIP train format, one entry per caption,
    ``image_id`` ``"shapes_NNNNNN"``); ``val.json`` / ``test.json`` (BLIP eval format); ``layout.json`` (per
    image: split, objects with colour, shape, size, centre ``cx, cy`` and radius ``r`` in pixels, the relation
    "objects[0] <relation> objects[1]" or ``null``, captions); ``manifest.json`` (the parameters; written last).

    Args:
        root: output folder.
        n_train, n_val, n_test: images per split.
        image_size: image side in pixels (>= 32).
        captions_per_image: captions per image (paraphrases; templates repeat past 6).
        seed: the output is a deterministic function of the parameters.
        p_single: fraction of single-object images (1.0: the 36 single-object descriptions only, an easy task).

    Returns:
        Paths: ``root``, ``image_root``, ``train``, ``val``, ``test``, ``layout``, ``manifest``.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 to draw two large shapes side by side, got {image_size}")
    if min(n_train, n_val, n_test) < 0 or captions_per_image < 1:
        raise ValueError("split sizes must be >= 0 and captions_per_image >= 1")
    root = Path(root)
    files = {
        "root": root,
        "image_root": root,
        "train": root / "train.json",
        "val": root / "val.json",
        "test": root / "test.json",
        "layout": root / "layout.json",
        "manifest": root / "manifest.json",
    }
    paths = {k: str(v) for k, v in files.items()}
    params = {
        "generator": GENERATOR,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "seed": seed,
        "p_single": p_single,
    }
    with writing(root):
        if not up_to_date(files["manifest"], params, [files[k] for k in ("train", "val", "test", "layout")]):
            _generate(root, files, params)
    return paths


def _generate(root: Path, files: dict[str, Path], params: dict[str, Any]) -> None:
    """Renders every image and writes the annotation files, the layout and (last) the manifest."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    image_size, captions_per_image, p_single = params["image_size"], params["captions_per_image"], params["p_single"]
    rng = random.Random(params["seed"])
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    layout = []
    index = 0
    for split in ("train", "val", "test"):
        for _ in range(params[f"n_{split}"]):
            name = f"shapes_{index:06d}"
            rel_path = f"images/{name}.png"
            scene = _scene(rng, image_size, captions_per_image, p_single)
            img = _render(scene["objects"], image_size, rng)
            tmp = root / "images" / f".{name}.{os.getpid()}.tmp.png"
            img.save(tmp, format="PNG")
            os.replace(tmp, root / rel_path)  # atomic: concurrent ranks never see a half-written file
            if split == "train":
                splits[split].extend({"image": rel_path, "caption": c, "image_id": name} for c in scene["captions"])
            else:
                splits[split].append({"image": rel_path, "caption": scene["captions"]})
            layout.append({"image": rel_path, "split": split, **scene})
            index += 1
    for split, entries in splits.items():
        _write_json(files[split], entries)
    _write_json(files["layout"], layout)
    paths = {k: str(v) for k, v in files.items()}
    _write_json(files["manifest"], {"params": params, "n_descriptions": N_DESCRIPTIONS, "files": paths})

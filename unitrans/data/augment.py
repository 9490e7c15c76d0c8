"""BLIP's RandAugment, on ``uint8`` images ``(H, W, 3)`` (numpy only), with the item's own random generator.

BLIP trains every image task with ``RandomAugment(2, 5, isPIL=True, augs=[...])`` after the random resized crop and
a horizontal flip (BLIP ``transform/randaugment.py``, ``data/__init__.py``). What it does, re-implemented here:

* draw ``N = 2`` operations with replacement from :data:`BLIP_OPS`; apply each with probability 0.5;
* magnitude ``M = 5`` of ``MAX_LEVEL = 10``: shear ``0.3 * M / 10 = 0.15``, translation ``10 * M / 10 = 5`` pixels,
  rotation ``30 * M / 10 = 15`` degrees, each with a random sign; brightness and sharpness factor
  ``1.8 * M / 10 + 0.1 = 1.0`` (so at M = 5 they leave the image as it is, in BLIP too);
* geometric operations are affine warps about the top-left origin (rotation about the centre ``(W/2, H/2)``,
  counter-clockwise for a positive angle), bilinear, with grey ``(128, 128, 128)`` where the source is outside;
  AutoContrast maps each channel's ``[min, max]`` to ``[0, 255]``; Equalize is PIL's histogram equalisation.

BLIP samples with the global ``np.random``; here every draw comes from the ``random.Random`` passed in, so an
augmented item is a function of (seed, epoch, item). Bilinear sampling is exact (OpenCV's fixed-point weights can
differ by one grey level).
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np

BLIP_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
            "TranslateY", "Rotate")
MAX_LEVEL = 10
FILL = 128.0


def autocontrast(img: np.ndarray) -> np.ndarray:
    """Each channel's ``[min, max]`` stretched to ``[0, 255]`` (a flat channel is left as it is)."""
    out = img.copy()
    for c in range(img.shape[2]):
        ch = img[..., c]
        lo, hi = int(ch.min()), int(ch.max())
        if hi > lo:
            scale = 255.0 / (hi - lo)
            table = np.clip(np.arange(256) * scale - lo * scale, 0, 255).astype(np.uint8)
            out[..., c] = table[ch]
    return out


def equalize(img: np.ndarray) -> np.ndarray:
    """PIL's ``ImageOps.equalize``, per channel."""
    out = img.copy()
    for c in range(img.shape[2]):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256)
        step = int(hist[hist != 0][:-1].sum()) // 255
        if step == 0:
            continue
        n = np.concatenate([[step // 2], hist[:-1]])
        out[..., c] = np.clip(np.cumsum(n) // step, 0, 255).astype(np.uint8)[ch]
    return out


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Every value times ``factor``, clipped to ``[0, 255]``."""
    table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
    return table[img]


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a smoothed copy (3x3 kernel, centre 5, others 1, over 13); the border rows and columns stay."""
    if factor == 1.0:
        return img
    x = img.astype(np.float32)
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    smooth = sum(pad[1 + dy:1 + dy + x.shape[0], 1 + dx:1 + dx + x.shape[1]] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    smooth = np.floor((smooth + 4.0 * x) / 13.0 + 0.5)  # (8 neighbours + centre) + 4 more centres = weights 1 / 5
    if factor == 0.0:
        return smooth.astype(np.uint8)
    out = x.copy()
    out[1:-1, 1:-1] = smooth[1:-1, 1:-1] + factor * (x[1:-1, 1:-1] - smooth[1:-1, 1:-1])
    return np.clip(out, 0, 255).astype(np.uint8)


def warp_affine(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The image moved by the forward affine ``matrix (2, 3)``: output pixel ``p`` reads the input at
    ``matrix^-1 p`` (bilinear; grey :data:`FILL` outside). Pixel centres are at integer coordinates."""
    h, w = img.shape[:2]
    a = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(a)[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    src = img.astype(np.float64)

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        v = src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        return np.where(inside[..., None], v, FILL)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return np.clip(np.floor(top * (1 - fy) + bottom * fy + 0.5), 0, 255).astype(np.uint8)


def rotation_matrix(degrees: float, w: int, h: int) -> np.ndarray:
    """Forward matrix of a counter-clockwise rotation by ``degrees`` about ``(w/2, h/2)`` (OpenCV's convention)."""
    a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cx, cy = w / 2, h / 2
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() > 0.5 else value


def _op(name: str, level: float, rng: random.Random) -> Callable[[np.ndarray], np.ndarray]:
    """The operation ``name`` at ``level`` (of :data:`MAX_LEVEL`), its random sign drawn now."""
    m = level / MAX_LEVEL
    if name in ("Brightness", "Sharpness"):
        factor = m * 1.8 + 0.1
        return (lambda x: brightness(x, factor)) if name == "Brightness" else (lambda x: sharpness(x, factor))
    if name in ("ShearX", "ShearY"):
        s = _signed(m * 0.3, rng)
        matrix = [[1, s, 0], [0, 1, 0]] if name == "ShearX" else [[1, 0, 0], [s, 1, 0]]
        return lambda x: warp_affine(x, np.array(matrix, dtype=np.float64))
    if name in ("TranslateX", "TranslateY"):
        t = _signed(m * 10.0, rng)
        matrix = [[1, 0, -t], [0, 1, 0]] if name == "TranslateX" else [[1, 0, 0], [0, 1, -t]]
        return lambda x: warp_affine(x, np.array(matrix, dtype=np.float64))
    if name == "Rotate":
        d = _signed(m * 30.0, rng)
        return lambda x: warp_affine(x, rotation_matrix(d, x.shape[1], x.shape[0]))
    return {"Identity": lambda x: x, "AutoContrast": autocontrast, "Equalize": equalize}[name]


def rand_augment(img: np.ndarray, rng: random.Random, n: int = 2, m: int = 5,
                 ops: tuple[str, ...] = BLIP_OPS) -> np.ndarray:
    """BLIP's ``RandomAugment(n, m)``: ``n`` operations drawn with replacement, each applied with probability 0.5.

    Args:
        img: ``uint8 (H, W, 3)``.
        rng: the item's generator (every draw comes from it).
        n: operations drawn.
        m: magnitude, of :data:`MAX_LEVEL`.
        ops: the operations to draw from.

    Returns:
        ``uint8 (H, W, 3)``.
    """
    names = [rng.choice(ops) for _ in range(n)]
    for name in names:
        if rng.random() > 0.5:
            continue
        img = _op(name, m, rng)(img)
    return img

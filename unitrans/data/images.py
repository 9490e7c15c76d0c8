"""Image loading (every PIL mode to RGB), the train / eval transforms, and the image reader of the datasets.

Train augmentation (``augment``):

* ``"crop"`` (default): a random resized crop (area fraction in ``[min_scale, 1]``, aspect ratio in
  ``[3/4, 4/3]``), no flip: the project's captions say "left of" and "right of", which a flip would falsify;
* ``"blip"``: BLIP's training transform: the same crop, a horizontal flip with probability 0.5, then BLIP's
  RandAugment (``N = 2``, ``M = 5``; :mod:`unitrans.data.augment`);
* ``"none"``: resize only.

Every random draw comes from the item's generator (a function of seed, epoch and item), never from a global one.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from unitrans.data.base import MediaReader
from unitrans.errors import DataError

_MIN_RATIO, _MAX_RATIO = 3.0 / 4.0, 4.0 / 3.0
AUGMENTS = ("crop", "blip", "none")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _grey_to_rgb(values: np.ndarray, full_scale: float) -> Image.Image:
    """A one-channel array with ``full_scale`` as white -> an 8-bit RGB image (rounded, clipped)."""
    grey = np.clip(np.floor(values.astype(np.float64) * (255.0 / full_scale) + 0.5), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, as the picture looks.

    * 16-bit grey (``I;16*``) and 32-bit integer (``I``, as 16-bit PNGs may load): 65535 is white;
    * 32-bit float (``F``): 1.0 is white when every value is in ``[0, 1]``, else 255 (PIL's own scale);
    * modes with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour, premultiplied ``RGBa``
      / ``La``): composited over white;
    * every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ...): PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        return _grey_to_rgb(np.asarray(img), 65535.0)
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        return _grey_to_rgb(values, 1.0 if values.size == 0 or values.max() <= 1.0 else 255.0)
    if mode == "P" and "transparency" in img.info or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Reads an image file fully and returns it as RGB (:func:`to_rgb`).

    Raises:
        DataError: the file is missing, unreadable or not a decodable image; the message names ``path``.
    """
    try:
        with Image.open(path) as img:
            img.load()  # the full decode happens inside the try
            return to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def random_resized_crop_box(
    width: int, height: int, min_scale: float, rng: random.Random | None = None
) -> tuple[int, int, int, int]:
    """A crop box covering a random fraction of the image area with a random aspect ratio (torchvision's
    ``RandomResizedCrop`` rule).

    Area fraction is uniform in ``[min_scale, 1]``, log aspect ratio uniform in ``[log 3/4, log 4/3]``; after 10
    failed draws, the largest central crop with a clamped aspect ratio.

    Args:
        width: image width W.
        height: image height H.
        min_scale: smallest area fraction, in ``(0, 1]``.
        rng: random source; ``None`` means the global ``random`` module.

    Returns:
        ``(left, top, right, bottom)`` in pixels.
    """
    r = rng if rng is not None else random
    area = width * height
    log_lo, log_hi = math.log(_MIN_RATIO), math.log(_MAX_RATIO)
    for _ in range(10):
        target = area * r.uniform(min_scale, 1.0)
        ratio = math.exp(r.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = r.randint(0, width - w)
            top = r.randint(0, height - h)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < _MIN_RATIO:
        w, h = width, int(round(width / _MIN_RATIO))
    elif ratio > _MAX_RATIO:
        w, h = int(round(height * _MAX_RATIO)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageTransform:
    """PIL image -> normalised float tensor ``(3, S, S)``.

    Eval: bicubic resize to ``(S, S)``. Train: ``augment`` (see the module docstring), then bicubic resize.

    Args:
        image_size: output side S.
        mean: per-channel mean (RGB, in ``[0, 1]`` units).
        std: per-channel standard deviation.
        train: augment (else resize only).
        min_scale: smallest crop area fraction (train only), in ``(0, 1]``.
        augment: ``"crop"``, ``"blip"`` or ``"none"``.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                 min_scale: float = 0.5, augment: str = "crop"):
        import torch

        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values (RGB, std > 0), got {list(mean)} and {list(std)}")
        self.image_size, self.train = int(image_size), bool(train)
        self.min_scale, self.augment = float(min_scale), augment
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> "Any":
        """Args: an image (any mode) and the item's generator (default: the ``random`` module).
        Returns: FloatTensor ``(3, S, S)``."""
        from unitrans.data.augment import rand_augment

        img = to_rgb(img)
        size = (self.image_size, self.image_size)
        augment = self.augment if self.train else "none"
        box = None if augment == "none" else random_resized_crop_box(img.width, img.height, self.min_scale, rng)
        arr = np.asarray(img.resize(size, Image.BICUBIC, box=box))  # (S, S, 3) uint8
        if augment == "blip":
            r = rng if rng is not None else random
            if r.random() < 0.5:
                arr = arr[:, ::-1]
            arr = rand_augment(np.ascontiguousarray(arr), r)
        return self.normalise(arr)

    def normalise(self, arr: np.ndarray) -> "Any":
        """``uint8 (S, S, 3)`` -> normalised FloatTensor ``(3, S, S)``."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        return (x.contiguous() - self.mean) / self.std

    def __repr__(self) -> str:
        kind = f"train, {self.augment}, min_scale={self.min_scale}" if self.train else "eval"
        return f"ImageTransform(size={self.image_size}, {kind})"


class ImageReader(MediaReader):
    """Reads one image per item through an :class:`ImageTransform`, under the ``on_error`` policy."""

    kind = "image"

    def __init__(self, transform: ImageTransform, on_error: str = "raise"):
        super().__init__(on_error)
        self.transform = transform

    def load(self, path: str, start: float | None, end: float | None, rng: random.Random | None) -> Any:
        """FloatTensor ``(3, S, S)`` of the image at ``path`` (times are ignored)."""
        return self.transform(load_image(path), rng)

    def blank(self) -> Any:
        """A mid-grey image ``(3, S, S)``: what a skipped evaluation image scores on."""
        s = self.transform.image_size
        return self.transform.normalise(np.full((s, s, 3), 128, dtype=np.uint8))


def check_image(path: str) -> None:
    """Opens and decodes an image once (``validate --deep``); :class:`DataError` when it cannot."""
    load_image(path)

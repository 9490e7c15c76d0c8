"""Image loading and the train / eval transforms (PIL + numpy + torch only, no torchvision).

The train transform is a random resized crop without horizontal flip: captions mention "left of" and
"right of", which a flip would falsify. Randomness comes from the global ``random`` module, so
``random.seed`` (and the per-worker seeding of ``torch.utils.data.DataLoader``) makes it reproducible.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

_MIN_RATIO, _MAX_RATIO = 3.0 / 4.0, 4.0 / 3.0


def load_image(path: str | Path) -> Image.Image:
    """Reads an image file fully and returns it as RGB.

    Args:
        path: image file.

    Returns:
        The decoded image, mode ``"RGB"``.

    Raises:
        DataError: the file is missing, unreadable or not a decodable image; the message names ``path``.
    """
    from unitrans.errors import DataError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except FileNotFoundError as exc:
        raise DataError(f"image not found: {path}") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def random_resized_crop_box(
    width: int, height: int, min_scale: float, rng: random.Random | None = None
) -> tuple[int, int, int, int]:
    """Draws a crop box covering a random fraction of the image area with a random aspect ratio.

    Area fraction is uniform in ``[min_scale, 1]``, log aspect ratio uniform in ``[log 3/4, log 4/3]``;
    after 10 failed draws, falls back to the largest central crop with a clamped aspect ratio.

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

    Eval: bicubic resize to ``(S, S)``. Train: random resized crop (area fraction in ``[min_scale, 1]``,
    aspect ratio in ``[3/4, 4/3]``) then bicubic resize to ``(S, S)``. Never flips.

    Args:
        image_size: output side S.
        mean: per-channel mean (RGB, in ``[0, 1]`` units).
        std: per-channel standard deviation.
        train: use the random crop.
        min_scale: smallest crop area fraction (train only), in ``(0, 1]``.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        min_scale: float = 0.5,
    ):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.min_scale = float(min_scale)
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Args: an image (any mode; converted to RGB) and the random generator of the crop (default: the
        ``random`` module's). Returns: FloatTensor ``(3, S, S)``."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        size = (self.image_size, self.image_size)
        box = random_resized_crop_box(img.width, img.height, self.min_scale, rng) if self.train else None
        img = img.resize(size, Image.BICUBIC, box=box)
        arr = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, S, S)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        kind = f"train, min_scale={self.min_scale}" if self.train else "eval"
        return f"ImageTransform(size={self.image_size}, {kind})"

"""Video decoding and frame sampling (decord + numpy + torch).

A clip is read by ``decord.VideoReader`` resized to ``(size, size)`` by the decoder itself (as BLIP's and
LAVIS's video loaders do: no crop, the aspect ratio is not kept) and only the sampled frames are decoded
(``get_batch(indices)``): the cost of an item grows with the frames a model sees, not with the clip's length.

Sampling strategies over the frames ``[lo, hi)`` of the clip (the whole clip, or the part between an
annotation's start and end times), with ``n = hi - lo`` frames split into ``T`` equal segments
``[lo + k*n/T, lo + (k+1)*n/T)``:

* ``uniform``: the midpoint of each segment, ``lo + floor((k + 1/2) * n / T)``. Deterministic (evaluation).
  LAVIS's ``uniform`` takes each segment's first frame instead; the midpoint does not favour the start.
* ``random``: one frame drawn uniformly inside each segment (training; the dataset's per-item generator
  draws it, so a sample is a function of (seed, epoch, item)).
* ``headtail``: ``T // 2`` distinct frames drawn from the first half ``[lo, lo + n // 2)`` and the rest from the
  second half, each sorted (LAVIS's ``headtail``). Without a generator, the midpoints of equal segments of
  each half.

When the range has fewer frames than ``T``, frames repeat (every strategy still returns ``T`` indices, so a
batch stacks).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch

Sampling = Literal["uniform", "random", "headtail"]
STRATEGIES: tuple[str, ...] = ("uniform", "random", "headtail")


def frame_range(n_frames: int, fps: float, start: float | None = None, end: float | None = None) -> tuple[int, int]:
    """The frames ``[lo, hi)`` between ``start`` and ``end`` seconds (``None``: the clip's start / end).

    ``lo = floor(start * fps)`` and ``hi = ceil(end * fps)``, clamped to the clip and to at least one frame.

    Args:
        n_frames: frames in the clip.
        fps: the clip's frame rate.
        start: start time in seconds.
        end: end time in seconds.
    """
    if n_frames <= 0:
        raise ValueError(f"a clip needs at least one frame, got {n_frames}")
    lo = 0 if start is None else int(math.floor(max(0.0, start) * fps))
    lo = min(lo, n_frames - 1)
    hi = n_frames if end is None else int(math.ceil(end * fps))
    hi = min(max(hi, lo + 1), n_frames)
    return lo, hi


def _midpoints(lo: int, hi: int, t: int) -> list[int]:
    n = hi - lo
    return [lo + int((k + 0.5) * n / t) for k in range(t)]


def _draw(lo: int, hi: int, k: int, rng: random.Random) -> list[int]:
    """``k`` sorted frames of ``[lo, hi)``: distinct when the range is long enough, else with repeats."""
    if k <= 0:
        return []
    if hi - lo >= k:
        return sorted(rng.sample(range(lo, hi), k))
    return sorted(rng.randrange(lo, hi) for _ in range(k))


def sample_indices(
    n_frames: int,
    num_frames: int,
    strategy: str = "uniform",
    rng: random.Random | None = None,
    fps: float = 1.0,
    start: float | None = None,
    end: float | None = None,
) -> list[int]:
    """The ``num_frames`` frame indices a strategy picks (see the module docstring).

    Args:
        n_frames: frames in the clip.
        num_frames: frames to sample (T).
        strategy: ``uniform``, ``random`` or ``headtail``.
        rng: random source of ``random`` / ``headtail`` (``None``: the ``random`` module for ``random``;
            segment midpoints for ``headtail``).
        fps: the clip's frame rate (converts ``start`` / ``end``).
        start: start time in seconds, or ``None``.
        end: end time in seconds, or ``None``.

    Returns:
        ``num_frames`` indices in ``[0, n_frames)``, non-decreasing.
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown frame sampling '{strategy}'; expected one of {', '.join(STRATEGIES)}")
    lo, hi = frame_range(n_frames, fps, start, end)
    n, t = hi - lo, num_frames
    if strategy == "uniform":
        return _midpoints(lo, hi, t)
    if strategy == "random":
        r = rng if rng is not None else random
        out = []
        for k in range(t):
            a = lo + int(k * n / t)
            b = max(lo + int((k + 1) * n / t), a + 1)  # a segment shorter than one frame holds its first frame
            out.append(r.randrange(a, b))
        return out
    mid = lo + n // 2
    head, tail = t // 2, t - t // 2
    if mid == lo:  # a one-frame range has no first half
        return [lo] * t
    if rng is None:
        return _midpoints(lo, mid, head) + _midpoints(mid, hi, tail)
    return _draw(lo, mid, head, rng) + _draw(mid, hi, tail, rng)


def _data_error(message: str):
    from unitrans.errors import DataError

    return DataError(message)


def open_video(path: str | Path, size: int | None = None, num_threads: int = 1):
    """A ``decord.VideoReader`` on ``path`` that decodes to ``(size, size)`` (``None``: the stored size).

    Raises:
        DataError: the file is missing or is not a video decord can read; the message names ``path``.
    """
    import decord

    path = Path(path)
    if not path.is_file():
        raise _data_error(f"video not found: {path}")
    kwargs = {"num_threads": num_threads}
    if size is not None:
        kwargs.update(width=int(size), height=int(size))
    try:
        vr = decord.VideoReader(str(path), **kwargs)
        if len(vr) == 0:
            raise RuntimeError("no frames")
    except (RuntimeError, decord.DECORDError) as exc:  # decord raises plain RuntimeError for unreadable files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _data_error(f"cannot read video {path}: {reason}") from None
    return vr


def load_frames(
    path: str | Path,
    num_frames: int,
    strategy: str = "uniform",
    size: int | None = None,
    rng: random.Random | None = None,
    start: float | None = None,
    end: float | None = None,
    num_threads: int = 1,
    on_clamp: Callable[[str, float | None, float | None, float], None] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Decodes the sampled frames of one clip, and only those.

    Args:
        path: video file.
        num_frames: frames to sample.
        strategy: ``uniform``, ``random`` or ``headtail``.
        size: output side (the decoder resizes); ``None``: the stored size.
        rng: the item's random generator (``random`` / ``headtail``).
        start: start time in seconds (``None``: the clip's start).
        end: end time in seconds (``None``: the clip's end).
        num_threads: decoder threads (1 inside data-loader workers: the workers are the parallelism).
        on_clamp: called with ``(path, start, end, duration)`` when a time lies more than half a second past the
            clip's end (the frames are then clamped to the clip).

    Returns:
        ``uint8`` frames ``(T, H, W, 3)`` (RGB) and the indices decoded.

    Raises:
        DataError: a missing or unreadable file, or one that fails while decoding; the message names ``path``.
    """
    import decord

    resize_here = size is not None and size in _DECODER_CANNOT_RESIZE
    vr = open_video(path, None if resize_here else size, num_threads)
    try:
        fps = float(vr.get_avg_fps()) or 1.0
        duration = len(vr) / fps
        if on_clamp is not None and any(t is not None and t > duration + 0.5 for t in (start, end)):
            on_clamp(str(path), start, end, duration)
        indices = sample_indices(len(vr), num_frames, strategy, rng, fps, start, end)  # drawn once per item
        try:
            frames = vr.get_batch(indices).asnumpy()  # (T, H, W, 3)
        except decord.DECORDError as exc:
            if size is None or resize_here or "must exactly match" not in str(exc):
                raise
            # decord 0.6 fails to resize to some widths (16, 24, 48, 72, ...): decode, then resize here
            _DECODER_CANNOT_RESIZE.add(size)
            resize_here = True
            frames = open_video(path, None, num_threads).get_batch(indices).asnumpy()
    except (RuntimeError, decord.DECORDError) as exc:
        raise _data_error(f"cannot decode video {path}: {str(exc).splitlines()[0]}") from None
    if resize_here:
        frames = _resize(frames, size)
    return frames, indices


_DECODER_CANNOT_RESIZE: set[int] = set()


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 -> ``(T, size, size, 3)`` (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class VideoTransform:
    """``uint8`` frames ``(T, H, W, 3)`` -> normalised float video ``(T, 3, H, W)``.

    No spatial augmentation (the captions of the project's data say "left" and "right", which a flip would
    falsify); the temporal sampling is the training augmentation.

    Args:
        mean: per-channel mean (RGB, in ``[0, 1]`` units).
        std: per-channel standard deviation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values (std > 0), got {list(mean)} and {list(std)}")
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
        return (x - self.mean) / self.std

    def blank(self, num_frames: int, size: int) -> torch.Tensor:
        """A mid-grey video ``(T, 3, S, S)``: what a skipped evaluation video scores on."""
        return self(np.full((num_frames, size, size, 3), 128, dtype=np.uint8))


def write_video(path: str | Path, frames: np.ndarray | Sequence[np.ndarray], fps: int = 8,
                codec: str = "libx264", crf: int = 18, gop: int | None = None) -> None:
    """Writes ``uint8`` RGB frames ``(T, H, W, 3)`` (even H and W) as an MP4 with PyAV (tests, generators).

    Args:
        path: output file (written to a temporary name, then renamed).
        frames: the frames.
        fps: frame rate.
        codec: ``libx264`` or ``mpeg4``.
        crf: libx264 quality (lower: closer to the input).
        gop: frames between keyframes (``None``: the codec's default; 250 for libx264).
    """
    import os

    import av

    path = Path(path)
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    h, w = frames[0].shape[:2]
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = int(gop)
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        else:
            stream.bit_rate = 2_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)

"""Video datasets in LAVIS's annotation formats: DiDeMo retrieval and MSRVTT-QA (builders in :mod:`unitrans.data`).

Retrieval (LAVIS ``didemo/annotations/retrieval_{train,val,test}.json``): train ``{"video", "caption"}``, one entry
per caption, grouped into videos by ``image_id`` / ``video_id`` when given, else by the video file and its times
(LAVIS's ``instance_id`` numbers entries, not videos, and is ignored); val / test ``{"video", "caption": [...]}``
(LAVIS's DiDeMo files give one paragraph string, accepted too). VideoQA (``qa_{train,val,test}.json``):
``{"question_id", "question", "answer": "...", "video"}``; candidates in ``answer_list.json`` or LAVIS's
``train_ans2label.json``. Any entry may restrict the sampled frames to ``"start"`` / ``"end"`` seconds or ``"times":
[start, end]``; times past the end of a clip are clamped to it, with one warning per annotation file.

:class:`VideoClips` reads a record's clip under the ``on_error`` policy of :class:`unitrans.data.base.MediaReader`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

from unitrans.data import VideoQAData, VideoRetrievalData
from unitrans.data.entries import N_AGREEING
from unitrans.data.base import MediaReader, log
from unitrans.data.video import STRATEGIES, VideoTransform, load_frames, open_video

__all__ = ["N_AGREEING", "VideoClips", "VideoQAData", "VideoRetrievalData", "check_video"]


class VideoClips(MediaReader):
    """Reads clips: frame sampling, decoding, normalisation, under the ``on_error`` policy.

    Args:
        num_frames: frames per clip (T).
        sampling: ``uniform``, ``random`` or ``headtail``.
        size: side of the decoded frames.
        mean, std: the backbone's normalisation.
        on_error: ``raise`` or ``skip``.
        num_threads: decoder threads per clip.
    """

    kind = "video"

    def __init__(self, num_frames: int, sampling: str, size: int, mean: Sequence[float], std: Sequence[float],
                 on_error: str = "raise", num_threads: int = 1):
        super().__init__(on_error)
        if sampling not in STRATEGIES:
            raise ValueError(f"unknown frame sampling '{sampling}'; expected one of {', '.join(STRATEGIES)}")
        self.num_frames, self.sampling, self.size, self.num_threads = int(num_frames), sampling, int(size), num_threads
        self.transform = VideoTransform(mean, std)
        self._clamp_warned = False

    def load(self, path: str | Path, start=None, end=None, rng: random.Random | None = None) -> Any:
        """``(T, 3, S, S)`` for one clip. Raises :class:`DataError` (naming ``path``) whatever the policy."""
        frames, _ = load_frames(path, self.num_frames, self.sampling, self.size, rng, start, end, self.num_threads,
                                on_clamp=self._note_clamp)
        return self.transform(frames)

    def _note_clamp(self, path: str, start: float | None, end: float | None, duration: float) -> None:
        if not self._clamp_warned:
            self._clamp_warned = True
            log.warning("times %s-%s s pass the end of %s (%.2f s) and are clamped to the clip; further clips are "
                        "not reported (`unitrans validate --deep` counts them)", start, end, path, duration)

    def blank(self) -> Any:
        """A mid-grey video ``(T, 3, S, S)``: what a skipped evaluation video scores on."""
        return self.transform.blank(self.num_frames, self.size)

    def __repr__(self) -> str:
        return f"VideoClips(T={self.num_frames}, {self.sampling}, size={self.size}, on_error={self.on_error})"


def check_video(path: str) -> float:
    """Opens a video and decodes its first frame (``validate --deep``); returns its duration in seconds."""
    vr = open_video(path, size=None)
    try:
        vr.get_batch([0])
    except Exception as exc:  # noqa: BLE001 - decord raises plain RuntimeError / DECORDError
        from unitrans.errors import DataError

        raise DataError(f"cannot decode video {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    return len(vr) / (float(vr.get_avg_fps()) or 1.0)

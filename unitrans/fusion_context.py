"""What a fused (text over video) call knows about its pairs, for parameter-free components that condition on it.

UniAdapter's frame-aware attention (``uniadapter.v1``, ``frame_aware_attention = true``) weights the frames of a
video in every cross-attention by how similar each frame is to the text of the pair. That similarity needs the ITC
features of the pair's text and of each frame, which only the backbone can compute; the cross-attention key point
where it acts sees only the video tokens. So a component that needs it says so (:func:`request`, while attached),
and a :class:`~unitrans.interfaces.FusionEncoder` whose ``fuse`` reads video tokens publishes the ``(B, T)``
text-frame cosine similarities for the duration of that call (:func:`frame_similarity`) when anyone asked
(:func:`requested`). Nothing is computed when no component asked; images (one frame) publish nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch

_SIMILARITY: ContextVar = ContextVar("unitrans_frame_similarity", default=None)
_REQUESTS: dict[int, int] = {}  # id(requester) -> how many times it asked


def request(owner: object) -> Callable[[], None]:
    """``owner`` needs text-frame similarities in fused calls from now on; returns the function that withdraws it."""
    _REQUESTS[id(owner)] = _REQUESTS.get(id(owner), 0) + 1
    done = []

    def withdraw() -> None:
        if done:
            return
        done.append(True)
        left = _REQUESTS.get(id(owner), 0) - 1
        if left > 0:
            _REQUESTS[id(owner)] = left
        else:
            _REQUESTS.pop(id(owner), None)

    return withdraw


def requested() -> bool:
    """Whether any attached component asked for text-frame similarities."""
    return bool(_REQUESTS)


@contextmanager
def frame_similarity(similarity: "torch.Tensor | None") -> Iterator[None]:
    """Publish ``similarity (B, T)``: cosine of the ITC features of row b's text and of its video's frame t, for the
    fused call inside the block (``None``: no video)."""
    token = _SIMILARITY.set(similarity)
    try:
        yield
    finally:
        _SIMILARITY.reset(token)


def current_frame_similarity() -> "torch.Tensor | None":
    """The ``(B, T)`` similarities of the fused call running now, or ``None`` (no video, or nobody published)."""
    return _SIMILARITY.get()

"""What a fused (text over video) call knows about its pairs, for parameter-free components that condition on it.

UniAdapter's frame-aware attention (``uniadapter.v1``, ``frame_aware_attention = true``) weights the frames of a
video in every cross-attention by how similar each frame is to the text of the pair. That similarity needs the ITC
features of the pair's text and of each frame, which only the backbone can compute; the cross-attention key point
where it acts sees only the video tokens. So a component that needs it says so on the module it acts on
(:func:`request`, while attached), and a :class:`~unitrans.interfaces.FusionEncoder` whose ``fuse`` reads video
tokens publishes the ``(B, T)`` text-frame cosine similarities for the duration of that call
(:func:`frame_similarity`) when a component asked on one of its modules (:func:`requested`). Nothing is computed
when none asked; images (one frame) publish nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import torch
    from torch import nn

_SIMILARITY: ContextVar = ContextVar("unitrans_frame_similarity", default=None)
_REQUESTS = "_unitrans_frame_similarity_requests"  # on the module that asks: how many components ask there


def request(module: "nn.Module") -> Callable[[], None]:
    """A component acting on ``module`` (a cross-attention key projection) needs text-frame similarities in the fused
    calls that run it, from now on; returns the function that withdraws the request. The count lives on the module,
    so a request concerns only the backbone that holds it."""
    object.__setattr__(module, _REQUESTS, getattr(module, _REQUESTS, 0) + 1)
    done = []

    def withdraw() -> None:
        if not done:
            done.append(True)
            object.__setattr__(module, _REQUESTS, getattr(module, _REQUESTS, 1) - 1)

    return withdraw


def requested(modules: "Iterable[nn.Module]") -> bool:
    """Whether a component asked for text-frame similarities on any of ``modules``."""
    return any(getattr(m, _REQUESTS, 0) > 0 for m in modules)


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

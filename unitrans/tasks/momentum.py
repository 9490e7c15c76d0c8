"""BLIP's retrieval recipe beside the trained model: a momentum (EMA) copy of the trainable tensors and the
image/text feature queues with their image ids (Li et al. 2022, ``BLIP_Retrieval``; ALBEF's momentum
distillation).

With a frozen backbone only the trainable tensors change, so the momentum model is the frozen backbone with the
momentum copy of those tensors swapped in: a run holds one copy of the frozen weights, not two.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F

from unitrans import distributed as dist
from unitrans.errors import UserError

QUEUE_FREE_ID = -100  # BLIP's id of a queue slot no image has filled yet: never a positive


class MomentumCopy:
    """An EMA copy of named trainable tensors: ``m <- μ m + (1 - μ) p`` after every optimizer step (BLIP's
    ``_momentum_update``, momentum 0.995)."""

    def __init__(self, live: Mapping[str, torch.Tensor], momentum: float):
        self.momentum = float(momentum)
        self.live = dict(live)
        self.copy = {k: v.detach().clone() for k, v in self.live.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step of every tensor, written as BLIP writes it."""
        mu = self.momentum
        for k, m in self.copy.items():
            m.copy_(m * mu + self.live[k].detach() * (1.0 - mu))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The live tensors hold the momentum values inside the block, their own values again after it.

        Values are copied in place (never rebound), so version counters move and caches keyed on them (VCRA's
        ``A x`` and folded matrices) cannot serve a stale result. Use it before the step's graph is built: an in-place
        change of a tensor the graph saved would fail its backward.
        """
        with torch.no_grad():
            saved = {k: v.detach().clone() for k, v in self.live.items()}
            for k, v in self.live.items():
                v.copy_(self.copy[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in self.live.items():
                    v.copy_(saved[k])

    def state_dict(self, prefix: str = "momentum.") -> dict[str, torch.Tensor]:
        return {prefix + k: v for k, v in self.copy.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = "momentum.") -> None:
        with torch.no_grad():
            for k, m in self.copy.items():
                if prefix + k not in state:
                    raise UserError(f"resume: the task state lacks the momentum copy of '{k}'; the checkpoint is from "
                                    "another spec")
                m.copy_(state[prefix + k])


class FeatureQueue:
    """BLIP's ring buffers of momentum image and text features ``(S, P)`` with their image ids ``(S,)`` (image
    features ``(S, Q, P)`` for multi-query images).

    They start as BLIP's: random unit vectors (from a fixed generator, equal on every rank) with id -100, so they
    act as negatives until real features replace them. Every rank holds the whole queue and enqueues the same
    gathered global batch, so the queues stay equal across ranks.
    """

    def __init__(self, size: int, dim: int, device, seed: int = 0, image_queries: int | None = None):
        """``dim``: P; ``image_queries``: Q when an image has Q features (BLIP-2's ``(B, Q, P)``), else ``None``."""
        g = torch.Generator().manual_seed(seed)
        image_shape = (size, dim) if image_queries is None else (size, image_queries, dim)
        self.image = F.normalize(torch.randn(*image_shape, generator=g, device="cpu"), dim=-1).to(device)
        self.text = F.normalize(torch.randn(size, dim, generator=g, device="cpu"), dim=1).to(device)
        self.ids = torch.full((size,), QUEUE_FREE_ID, dtype=torch.long, device=device)
        self.ptr = torch.zeros((), dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        """Replace the oldest ``G`` entries by ``image (G, P)``, ``text (G, P)``, ``ids (G,)`` (already gathered
        across ranks), in order, wrapping around the end."""
        g = image.shape[0]
        if g > self.size:
            raise UserError(f"task retrieval.v1: queue_size ({self.size}) is smaller than the global batch ({g}); "
                            "raise task.queue_size (BLIP: 57,600) or set it to 0")
        slots = (int(self.ptr) + torch.arange(g, device=self.ids.device)) % self.size
        self.image[slots] = image.to(self.image.dtype)
        self.text[slots] = text.to(self.text.dtype)
        self.ids[slots] = ids.to(self.ids.dtype)
        self.ptr.fill_((int(self.ptr) + g) % self.size)

    def state_dict(self, prefix: str = "queue.") -> dict[str, torch.Tensor]:
        return {prefix + "image": self.image, prefix + "text": self.text, prefix + "ids": self.ids,
                prefix + "ptr": self.ptr}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = "queue.") -> None:
        for name, t in self.state_dict(prefix).items():
            if name not in state or state[name].shape != t.shape:
                raise UserError(f"resume: the task state's '{name}' is missing or has another shape than "
                                f"{tuple(t.shape)}; the checkpoint is from another spec")
            t.copy_(state[name])


def gather_features(image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor):
    """This step's global batch (every rank's rows, in rank order), without gradient."""
    return dist.gather_nograd(image), dist.gather_nograd(text), dist.gather_nograd(ids)


def distill_alpha(alpha: float, step: int, epoch: int, steps_per_epoch: int) -> float:
    """BLIP's ramp: ``alpha · min(1, i / steps_per_epoch)`` at step i of the first epoch, ``alpha`` after."""
    if epoch > 0:
        return alpha
    return alpha * min(1.0, step / max(1, steps_per_epoch))

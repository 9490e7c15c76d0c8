"""Image-text contrastive loss (UniTrans eq. 7-8, BLIP's ITC)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unitrans.distributed import gather_nograd, gather_with_grad
from unitrans.interfaces import AlignmentLoss


def cross_similarities(image_feat, text_feat, image_ids):
    """Local rows against the global batch.

    Args:
        image_feat: ``(B, P)`` L2-normalised, this rank's images.
        text_feat: ``(B, P)`` L2-normalised, this rank's texts.
        image_ids: ``(B,)`` positives share an id.

    Returns:
        ``sim_i2t (B, G)`` cosine of each local image with every global text, ``sim_t2i (B, G)`` of each local
        text with every global image, and ``positives (B, G)`` (bool, same image id), with G the global batch.
    """
    image_all = gather_with_grad(image_feat)  # (G, P)
    text_all = gather_with_grad(text_feat)  # (G, P)
    ids_all = gather_nograd(image_ids)  # (G,)
    sim_i2t = image_feat @ text_all.t()
    sim_t2i = text_feat @ image_all.t()
    positives = image_ids[:, None] == ids_all[None, :]
    return sim_i2t, sim_t2i, positives


def itc_loss(sim_i2t, sim_t2i, positives, temperature: float) -> torch.Tensor:
    """Eq. 7 with several positives per row (BLIP): cross-entropy against the uniform target over positives."""
    targets = positives.float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    loss_i2t = -(F.log_softmax(sim_i2t / temperature, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i / temperature, dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


class ITC(AlignmentLoss):
    def __init__(self, temperature: float = 0.07, weight: float = 1.0):
        self.temperature, self.weight = temperature, weight

    def __call__(self, image_feat, text_feat, image_ids):
        sim_i2t, sim_t2i, pos = cross_similarities(image_feat, text_feat, image_ids)
        return {"itc_loss": self.weight * itc_loss(sim_i2t, sim_t2i, pos, self.temperature)}

"""Image-text contrastive loss (UniTrans eq. 7-8, BLIP's ITC)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unitrans.distributed import gather_nograd, gather_with_grad
from unitrans.interfaces import AlignmentLoss


def pair_similarity(image_feat: torch.Tensor, text_feat: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Image-text similarity ``(I, T)`` of L2-normalised features (the :class:`~unitrans.interfaces.DualEncoder`
    contract).

    ``image_feat (I, P)``: cosine ``image_feat @ text_feat.T``. ``image_feat (I, Q, P)`` (Q query features per
    image, BLIP-2's Q-Former): the best query's cosine, ``max_q image_feat[i, q] . text_feat[t]``, as
    ``Blip2ForImageTextRetrieval`` and LAVIS compute ITC (the gradient reaches the best query). Images are taken
    ``chunk`` at a time, so the ``(chunk, Q, T)`` intermediate bounds memory.
    """
    if image_feat.dim() == 2:
        return image_feat @ text_feat.t()
    rows = [torch.einsum("iqp,tp->iqt", part, text_feat).amax(dim=1) for part in image_feat.split(chunk)]
    return torch.cat(rows) if rows else image_feat.new_zeros(0, text_feat.shape[0])


def cross_similarities(image_feat, text_feat, image_ids):
    """Local rows against the global batch.

    Args:
        image_feat: ``(B, P)`` L2-normalised, this rank's images; or ``(B, Q, P)`` multi-query features (the
            similarity is then the best query's, :func:`pair_similarity`).
        text_feat: ``(B, P)`` L2-normalised, this rank's texts.
        image_ids: ``(B,)`` positives share an id.

    Returns:
        ``sim_i2t (B, G)`` cosine of each local image with every global text, ``sim_t2i (B, G)`` of each local
        text with every global image, and ``positives (B, G)`` (bool, same image id), with G the global batch.
    """
    image_all = gather_with_grad(image_feat)  # (G, P)
    text_all = gather_with_grad(text_feat)  # (G, P)
    ids_all = gather_nograd(image_ids)  # (G,)
    sim_i2t = pair_similarity(image_feat, text_all)
    sim_t2i = text_feat @ image_all.t() if image_all.dim() == 2 else pair_similarity(image_all, text_feat).t()
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

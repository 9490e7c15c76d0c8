"""Image-text contrastive loss (UniTrans eq. 7-8, BLIP's ITC), with BLIP's retrieval recipe when the task gives
one: a learned temperature, momentum-encoder candidates (this step's batch and the queues) and momentum
distillation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unitrans.distributed import gather_nograd, gather_with_grad
from unitrans.interfaces import AlignmentLoss


@dataclass
class MomentumCandidates:
    """ITC's candidates as BLIP's momentum encoder makes them.

    Attributes:
        image: ``(K, P)`` momentum image features: this step's global batch, then the image queue.
        text: ``(K, P)`` momentum text features, in the same order.
        ids: ``(K,)`` their image ids (positives are found by id, across batch and queue).
        image_local: ``(B, P)`` momentum features of this rank's images (rows of the distillation targets).
        text_local: ``(B, P)`` momentum features of this rank's texts.
        alpha: weight of the momentum model's softmax similarities in the targets (momentum distillation; 0: none).
    """

    image: torch.Tensor
    text: torch.Tensor
    ids: torch.Tensor
    image_local: torch.Tensor
    text_local: torch.Tensor
    alpha: float = 0.0


@dataclass
class ContrastBank:
    """What a retrieval task hands its alignment loss beyond the batch.

    Attributes:
        temperature: the learned τ1 (0-d, trainable), used in place of the loss's own ``temperature``.
        momentum: momentum-encoder candidates and distillation; ``None``: the global batch's online features.
    """

    temperature: torch.Tensor | None = None
    momentum: MomentumCandidates | None = None


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


def soft_itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i, temperature) -> torch.Tensor:
    """``(CE_i2t + CE_t2i) / 2``, each the mean over rows of ``-Σ_j target_ij log softmax(sim_i / τ)_j`` (BLIP).

    ``temperature`` is a float or a 0-d tensor (learned).
    """
    loss_i2t = -(F.log_softmax(sim_i2t / temperature, dim=1) * targets_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i / temperature, dim=1) * targets_t2i).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def id_targets(positives: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` bool -> the uniform distribution over each row's positives."""
    targets = positives.float()
    return targets / targets.sum(dim=1, keepdim=True)


def itc_loss(sim_i2t, sim_t2i, positives, temperature) -> torch.Tensor:
    """Eq. 7 with several positives per row (BLIP): cross-entropy against the uniform target over positives."""
    targets = id_targets(positives)
    return soft_itc_loss(sim_i2t, sim_t2i, targets, targets, temperature)


def momentum_itc_loss(image_feat, text_feat, image_ids, m: MomentumCandidates, temperature) -> torch.Tensor:
    """BLIP's ITC with a momentum encoder: online features ``(B, P)`` (images may be ``(B, Q, P)``) against the
    momentum candidates ``(K, P)``;
    targets ``(1 - α) · id positives + α · softmax(momentum similarities / τ)``."""
    sim_i2t = pair_similarity(image_feat, m.text)  # (B, K)
    sim_t2i = pair_similarity(m.image, text_feat).t()
    with torch.no_grad():
        hard = id_targets(image_ids[:, None] == m.ids[None, :])
        t_i2t, t_t2i = hard, hard
        if m.alpha > 0:
            tau = temperature.detach() if torch.is_tensor(temperature) else temperature
            t_i2t = m.alpha * F.softmax(pair_similarity(m.image_local, m.text) / tau, dim=1) + (1 - m.alpha) * hard
            t_t2i = m.alpha * F.softmax(pair_similarity(m.image, m.text_local).t() / tau, dim=1) + (1 - m.alpha) * hard
    return soft_itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, temperature)


def contrastive_loss(image_feat, text_feat, image_ids, bank: ContrastBank | None, temperature: float,
                     in_batch=None) -> torch.Tensor:
    """ITC of the local rows: against the momentum candidates when ``bank`` has them, else against the global
    batch (``in_batch``: its ``cross_similarities`` when already computed). The bank's learned τ wins."""
    tau = bank.temperature if bank is not None and bank.temperature is not None else temperature
    if bank is not None and bank.momentum is not None:
        return momentum_itc_loss(image_feat, text_feat, image_ids, bank.momentum, tau)
    sim_i2t, sim_t2i, pos = in_batch if in_batch is not None else cross_similarities(image_feat, text_feat, image_ids)
    return itc_loss(sim_i2t, sim_t2i, pos, tau)


class ITC(AlignmentLoss):
    def __init__(self, temperature: float = 0.07, weight: float = 1.0):
        self.temperature, self.weight = temperature, weight

    def __call__(self, image_feat, text_feat, image_ids, bank: ContrastBank | None = None):
        return {"itc_loss": self.weight * contrastive_loss(image_feat, text_feat, image_ids, bank, self.temperature)}

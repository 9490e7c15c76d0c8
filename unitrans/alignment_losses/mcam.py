"""MCAM: multimodal consistency alignment (UniTrans §3.3.2, eq. 9-10)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unitrans.alignment_losses.itc import ContrastBank, contrastive_loss, cross_similarities
from unitrans.interfaces import AlignmentLoss


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise Jensen-Shannon divergence from log-probabilities ``(N, K)`` -> ``(N,)`` (natural log)."""
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # log((p + q) / 2); finite where p, q underflow to 0
    return 0.5 * ((p * (log_p - log_m)).sum(-1) + (q * (log_q - log_m)).sum(-1))


def rank_consistency(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 9 per row: ``JS(softmax(S[i,:]/τ) ‖ softmax(S[:,i]/τ))``.

    ``sim_i2t[i]`` is row i of S (image i against every text) and ``sim_t2i[i]`` is column i of S (text i
    against every image), both over the same global candidate order. Returns ``(B,)``.
    """
    log_p = F.log_softmax(sim_i2t / temperature, dim=1)
    log_q = F.log_softmax(sim_t2i / temperature, dim=1)
    return js_divergence(log_p, log_q)


def reduce_rows(js: torch.Tensor, reduction: str) -> torch.Tensor:
    """``(B,)`` per-row JS -> the L_ITR term.

    ``as_itc`` (default): ``Σ_i JS_i / (2B)``. BLIP's ITC (``itc_loss``) is eq. 7's two sums divided by ``2B``
    (the mean over rows of each direction, halved); dividing eq. 9's sum by the same ``2B`` keeps L_ITR : L_ITC
    exactly as eq. 7 + 9 print it. ``mean``: ``Σ_i JS_i / B`` (twice that weight); ``sum``: ``Σ_i JS_i`` (eq. 9
    on its own scale).
    """
    if reduction == "as_itc":
        return js.sum() / (2 * js.shape[0])
    return js.mean() if reduction == "mean" else js.sum()


class MCAM(AlignmentLoss):
    """``L_all = itc_weight · L_ITC + weight · L_ITR``; parameter-free.

    L_ITR is computed on what eq. 9 names: the similarities of the mini-batch's image-text pairs under the
    encoders being trained (the online features of the global batch, gathered across ranks), never on the
    momentum encoder's or the queues' features. The rank lists ``S(x_i^V)`` and ``S(x_i^T)`` are row i and
    column i of one square matrix over the same pairs; a queue holds other pairs' features for each direction and
    has no such square. With BLIP's recipe on, ITC (eq. 7) uses the momentum candidates and the learned τ1 the
    task hands it; L_ITR keeps its own τ (``mcam_temperature``, "a hyperparameter" in the paper).
    """

    def __init__(self, temperature=0.07, mcam_temperature=0.07, weight=1.0, itc_weight=1.0, reduction="as_itc"):
        self.temperature, self.mcam_temperature = temperature, mcam_temperature
        self.weight, self.itc_weight, self.reduction = weight, itc_weight, reduction

    def __call__(self, image_feat, text_feat, image_ids, bank: ContrastBank | None = None):
        in_batch = cross_similarities(image_feat, text_feat, image_ids)
        js = rank_consistency(in_batch[0], in_batch[1], self.mcam_temperature)
        itc = contrastive_loss(image_feat, text_feat, image_ids, bank, self.temperature, in_batch=in_batch)
        return {
            "itc_loss": self.itc_weight * itc,
            "mcam_loss": self.weight * reduce_rows(js, self.reduction),
        }

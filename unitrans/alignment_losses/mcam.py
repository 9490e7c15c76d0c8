"""MCAM: multimodal consistency alignment (UniTrans §3.3.2, eq. 9-10)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unitrans.alignment_losses.itc import cross_similarities, itc_loss
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


class MCAM(AlignmentLoss):
    """``L_all = itc_weight · L_ITC + weight · L_ITR``; parameter-free."""

    def __init__(self, temperature=0.07, mcam_temperature=0.07, weight=1.0, itc_weight=1.0, reduction="mean"):
        self.temperature, self.mcam_temperature = temperature, mcam_temperature
        self.weight, self.itc_weight, self.reduction = weight, itc_weight, reduction

    def __call__(self, image_feat, text_feat, image_ids):
        sim_i2t, sim_t2i, pos = cross_similarities(image_feat, text_feat, image_ids)
        js = rank_consistency(sim_i2t, sim_t2i, self.mcam_temperature)
        itr = js.mean() if self.reduction == "mean" else js.sum()
        return {
            "itc_loss": self.itc_weight * itc_loss(sim_i2t, sim_t2i, pos, self.temperature),
            "mcam_loss": self.weight * itr,
        }

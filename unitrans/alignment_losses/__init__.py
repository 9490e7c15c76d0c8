"""Alignment losses: registered builders (light). Implementations: ``itc.py``, ``mcam.py``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from unitrans import registry

Temperature = Annotated[float, Field(gt=0, le=1)]


@registry.alignment_losses.register("itc.v1")
def itc_v1(temperature: Temperature = 0.07, weight: Annotated[float, Field(ge=0)] = 1.0):
    """BLIP's image-text contrastive loss (UniTrans eq. 7), positives by image id, negatives gathered across ranks.

    Args:
        temperature: τ1 of eq. 7.
        weight: multiplies ``itc_loss``.
    """
    from unitrans.alignment_losses.itc import ITC

    return ITC(temperature=temperature, weight=weight)


@registry.alignment_losses.register("mcam.v1")
def mcam_v1(
    temperature: Temperature = 0.07,
    mcam_temperature: Temperature = 0.07,
    weight: Annotated[float, Field(ge=0)] = 1.0,
    itc_weight: Annotated[float, Field(ge=0)] = 1.0,
    reduction: Literal["as_itc", "mean", "sum"] = "as_itc",
):
    """MCAM (UniTrans eq. 9-10): ``L_all = L_ITC + weight · Σ_i JS(softmax(S[i,:]/τ) ‖ softmax(S[:,i]/τ))``.

    S is the cosine similarity matrix of the mini-batch's pairs (the global batch's online features), as eq. 9
    defines it; with the retrieval task's BLIP recipe on, the ITC term uses the momentum candidates and the learned
    τ1, L_ITR does not.

    Args:
        temperature: τ1 of the ITC term (eq. 7), unless the retrieval task learns it (``learn_temperature``).
        mcam_temperature: τ of eq. 9.
        weight: multiplies ``mcam_loss`` (eq. 10 uses 1).
        itc_weight: multiplies ``itc_loss``.
        reduction: ``as_itc`` (default): eq. 9's sum divided by what BLIP's ITC divides eq. 7's sums by (2 x
            rows), so L_ITR : L_ITC is eq. 7 + 9's ratio as printed; ``mean``: the mean over rows (twice that
            relative weight; the default before); ``sum``: eq. 9's sum as is.
    """
    from unitrans.alignment_losses.mcam import MCAM

    return MCAM(temperature=temperature, mcam_temperature=mcam_temperature, weight=weight,
                itc_weight=itc_weight, reduction=reduction)

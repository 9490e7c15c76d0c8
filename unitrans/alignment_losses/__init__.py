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
    reduction: Literal["mean", "sum"] = "mean",
):
    """MCAM (UniTrans eq. 9-10): ``L_all = L_ITC + weight · Σ_i JS(softmax(S[i,:]/τ) ‖ softmax(S[:,i]/τ))``.

    Args:
        temperature: τ1 of the ITC term (eq. 7).
        mcam_temperature: τ of eq. 9.
        weight: multiplies ``mcam_loss`` (eq. 10 uses 1).
        itc_weight: multiplies ``itc_loss``.
        reduction: ``mean`` over the batch's rows (comparable with ITC, the default) or ``sum`` as eq. 9 writes it.
    """
    from unitrans.alignment_losses.mcam import MCAM

    return MCAM(temperature=temperature, mcam_temperature=mcam_temperature, weight=weight,
                itc_weight=itc_weight, reduction=reduction)

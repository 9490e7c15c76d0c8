"""Task heads: registered builders (light). Implementations: ``retrieval.py``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from unitrans import registry

PositiveInt = Annotated[int, Field(gt=0)]


@registry.tasks.register("retrieval.v1")
def retrieval_v1(
    k_test: PositiveInt = 16,
    rerank: Literal["itm+itc", "itm", "itc"] = "itm+itc",
    itm_weight: Annotated[float, Field(ge=0)] = 1.0,
    negatives: Literal["hard", "random"] = "hard",
    itm_batch: PositiveInt = 128,
    hard_negative_temperature: Annotated[float, Field(gt=0)] = 0.07,
):
    """Image-text retrieval as BLIP trains and evaluates it.

    Training: the alignment loss (ITC, or ITC + MCAM) on the unimodal features, plus ITM on hard negatives drawn
    from the ITC similarities (one negative text per image and one negative image per text).
    Evaluation: ITC similarities for all pairs, then the top ``k_test`` candidates of every query re-scored by the
    ITM head in chunks of ``itm_batch`` pairs; R@1/5/10 both ways and their mean.

    Args:
        k_test: candidates re-ranked per query (BLIP: 256 on COCO, 128 on Flickr30K).
        rerank: the score that ranks the top-k: ``itm+itc`` (BLIP: ITM match logit + cosine), ``itm`` alone, or
            ``itc`` (no re-ranking: cosine only).
        itm_weight: weight of the ITM loss (0 disables ITM training).
        negatives: ``hard`` (sampled by ITC similarity, BLIP) or ``random`` ITM negatives.
        itm_batch: image-text pairs per ITM forward during evaluation (bounds memory).
        hard_negative_temperature: temperature of the softmax that samples hard negatives.
    """
    from unitrans.tasks.retrieval import Retrieval

    return Retrieval(k_test=k_test, rerank=rerank, itm_weight=itm_weight, negatives=negatives,
                     itm_batch=itm_batch, hard_negative_temperature=hard_negative_temperature)

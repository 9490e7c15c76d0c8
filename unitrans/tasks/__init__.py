"""Task heads: registered builders (light). Implementations: ``retrieval.py``, ``captioning.py``, ``vqa.py``."""

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


@registry.tasks.register("captioning.v1")
def captioning_v1(
    prompt: str = "a picture of ",
    num_beams: PositiveInt = 3,
    max_length: PositiveInt = 20,
    min_length: Annotated[int, Field(ge=0)] = 5,
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0,
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1,
):
    """Image captioning on BLIP's decoder: prompted LM loss, beam search, BLEU-4 and CIDEr (x100).

    Training: next-token loss on ``[DEC] prompt caption [SEP]`` with ``[DEC]`` and the prompt masked out (BLIP).
    The spec's alignment loss is ignored (a captioning model has no unimodal text features): set
    ``alignment_loss = "none"``. Needs ``backbone.task_model = "captioning"``.
    Evaluation: beam search from ``[DEC] prompt``, prompt stripped; ``bleu4`` and ``cider`` (pycocoevalcap,
    built-in tokenizer, x100 as the paper reports); writes ``captions_<split>.json`` (``[{image_id, caption}]``).

    Args:
        prompt: text the decoder starts from (BLIP: ``"a picture of "``).
        num_beams: beam width.
        max_length: most tokens of a generated sequence, ``[DEC]`` and prompt included (BLIP: 20).
        min_length: fewest tokens of a generated sequence, prompt included (BLIP: 5).
        repetition_penalty: generation's repetition penalty (1.0: none; BLIP uses 1.0 with beam search).
        label_smoothing: of the LM loss (BLIP: 0.1).
    """
    if min_length > max_length:
        from unitrans.errors import UserError

        raise UserError(f"task captioning.v1: min_length ({min_length}) exceeds max_length ({max_length})")
    from unitrans.tasks.captioning import Captioning

    return Captioning(prompt=prompt, num_beams=num_beams, max_length=max_length, min_length=min_length,
                      repetition_penalty=repetition_penalty, label_smoothing=label_smoothing)


@registry.tasks.register("vqa.v1")
def vqa_v1(
    inference: Literal["rank", "generate"] = "rank",
    k_test: PositiveInt = 128,
    answer_list: str | None = None,
    max_answer_length: Annotated[int, Field(ge=2)] = 10,
    num_beams: PositiveInt = 3,
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1,
    normalize_answers: bool = False,
):
    """Visual question answering on BLIP's encoder-decoder: answer-weighted decoder loss, rank or generate, VQA acc.

    Training: the question runs through the text encoder with cross-attention to the image; each of its answers
    is decoded with a loss weighted by the fraction of humans who gave it (BLIP). Needs
    ``backbone.task_model = "vqa"``; the alignment loss is ignored (``alignment_loss = "none"``).
    Evaluation: ``rank`` (top ``k_test`` answers of the answer list by first-token probability, then by full
    log-likelihood) or ``generate`` (beam search); ``vqa_acc`` by the official VQA evaluation's rules (x100)
    where the questions have human answers; writes ``vqa_result_<split>.json`` (``[{question_id, answer}]``, the
    VQAv2 server's format).

    Args:
        inference: ``rank`` over an answer list (BLIP's VQAv2 setting) or free ``generate``.
        k_test: candidates re-scored by full log-likelihood per question (BLIP: 128).
        answer_list: a JSON list of candidate answers; ``None``: the data's ``answer_list``.
        max_answer_length: most tokens of a generated answer, ``[DEC]`` included (BLIP: 10).
        num_beams: beam width of ``generate``.
        label_smoothing: of the training loss (BLIP: 0.1).
        normalize_answers: ``false``: ``vqa_acc`` by the official rules (human answers processed only where they
            disagree); ``true``: every human answer normalised as the prediction is (lenient; not the number
            papers report).
    """
    from pathlib import Path

    from unitrans.tasks.vqa import VQA

    path = None if answer_list is None else str(Path(answer_list).expanduser().absolute())
    return VQA(inference=inference, k_test=k_test, answer_list=path, max_answer_length=max_answer_length,
               num_beams=num_beams, label_smoothing=label_smoothing, normalize_answers=normalize_answers)

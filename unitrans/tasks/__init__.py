"""Task heads: registered builders (light). Implementations: ``retrieval.py``, ``captioning.py``, ``vqa.py``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from unitrans import registry
from unitrans.options import NonNegativeFloat, NonNegativeInt, Options, PositiveFloat, PositiveInt, Probability, builds


@registry.tasks.register("retrieval.v1")
def retrieval_v1(
    k_test: PositiveInt = 16,
    rerank: Literal["itm+itc", "itm", "itc"] = "itm+itc",
    itm_weight: NonNegativeFloat = 1.0,
    negatives: Literal["hard", "random"] = "hard",
    itm_batch: PositiveInt = 128,
    hard_negative_temperature: PositiveFloat = 0.07,
    learn_temperature: bool = False,
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    queue_size: NonNegativeInt = 0,
    distill_alpha: Annotated[float, Field(ge=0, le=1)] = 0.0,
):
    """Image-text retrieval as BLIP trains and evaluates it.

    Training: the alignment loss (ITC, or ITC + MCAM) on the unimodal features, plus ITM on hard negatives drawn
    from the ITC similarities (one negative text per image and one negative image per text). BLIP's retrieval
    recipe, each part off by default and on in the paper specs: a learned temperature, a momentum (EMA) copy of
    the trainable tensors, feature queues with image ids and momentum distillation.
    Evaluation: ITC similarities for all pairs, then the top ``k_test`` candidates of every query re-scored by the
    ITM head in chunks of ``itm_batch`` pairs; R@1/5/10 both ways and their mean.

    Args:
        k_test: candidates re-ranked per query (BLIP: 256 on COCO, 128 on Flickr30K).
        rerank: the score that ranks the top-k: ``itm+itc`` (BLIP: ITM match logit + cosine), ``itm`` alone, or
            ``itc`` (no re-ranking: cosine only).
        itm_weight: weight of the ITM loss (0 disables ITM training).
        negatives: ``hard`` (sampled by ITC similarity, BLIP) or ``random`` ITM negatives.
        itm_batch: image-text pairs per ITM forward during evaluation (bounds memory).
        hard_negative_temperature: temperature of the softmax that samples hard negatives (with
            ``learn_temperature``: the learned one instead, as BLIP).
        learn_temperature: ITC's τ1 is a trainable scalar (BLIP's ``temp``), clamped to [0.001, 0.5] before every
            forward, started from the checkpoint's ``temp`` when the backbone carries one (BLIP's original
            checkpoints), else from the alignment loss's ``temperature``; ITC and hard-negative sampling use it.
        momentum: EMA momentum of the momentum encoder (BLIP: 0.995): a copy of the trainable tensors only, updated
            after every optimizer step; ITC's candidates are its features of the global batch (and the queues).
            0: no momentum encoder.
        queue_size: entries of the image and text feature queues with their image ids (BLIP: 57,600); positives
            are found by id across batch and queue. 0: no queue. Needs ``momentum``.
        distill_alpha: momentum distillation: ITC targets mix ``alpha`` of the momentum model's softmax
            similarities into the id targets, ramped from 0 over the first epoch as BLIP does (BLIP: 0.4). Needs
            ``momentum``.
    """
    if (queue_size or distill_alpha) and not momentum:
        from unitrans.errors import UserError

        raise UserError(f"task retrieval.v1: queue_size = {queue_size} and distill_alpha = {distill_alpha} use the "
                        "momentum encoder's features; set momentum (BLIP: 0.995) or turn them off (0)")
    from unitrans.tasks.retrieval import Recipe, Retrieval

    recipe = Recipe(learn_temperature=learn_temperature, momentum=momentum, queue_size=queue_size,
                    distill_alpha=distill_alpha)
    return Retrieval(k_test=k_test, rerank=rerank, itm_weight=itm_weight, negatives=negatives,
                     itm_batch=itm_batch, hard_negative_temperature=hard_negative_temperature, recipe=recipe)


class CaptioningOptions(Options):
    """Image captioning on an encoder-decoder (BLIP's decoder): prompted LM loss, beam search, BLEU-4 and CIDEr (x100).

    Training: next-token loss on ``[bos] prompt caption [eos]`` with ``[bos]`` and the prompt masked out (BLIP).
    The spec's alignment loss is ignored (a captioning model has no unimodal text features): set
    ``alignment_loss = "none"``. Needs a backbone with the ``EncoderDecoder`` capability (BLIP:
    ``backbone.task_model = "captioning"``).
    Evaluation: beam search from ``[bos] prompt``, prompt stripped; ``bleu4`` and ``cider`` (pycocoevalcap,
    built-in tokenizer, x100 as the paper reports); writes ``captions_<split>.json`` (``[{image_id, caption}]``).
    """

    prompt: str = "a picture of "
    """text the decoder starts from (BLIP: ``"a picture of "``)."""
    num_beams: PositiveInt = 3
    """beam width."""
    max_length: PositiveInt = 20
    """most tokens of a generated sequence, ``[bos]`` and prompt included (BLIP: 20)."""
    min_length: NonNegativeInt = 5
    """fewest tokens of a generated sequence, prompt included (BLIP: 5)."""
    repetition_penalty: PositiveFloat = 1.0
    """generation's repetition penalty (1.0: none; BLIP uses 1.0 with beam search)."""
    label_smoothing: Probability = 0.1
    """of the LM loss (BLIP: 0.1)."""

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) exceeds max_length ({self.max_length})")
        return self


@registry.tasks.register("captioning.v1")
@builds(CaptioningOptions)
def captioning_v1(options: CaptioningOptions):
    from unitrans.tasks.captioning import Captioning

    return Captioning(options)


class VQAOptions(Options):
    """Visual question answering on an encoder-decoder: answer-weighted decoder loss, rank or generate, VQA accuracy.

    Training: the question is encoded over the image (the fusion network, where QASN acts); each of its answers
    is decoded with a loss weighted by the fraction of humans who gave it (BLIP). Needs a backbone with the
    ``QuestionEncoder`` and ``EncoderDecoder`` capabilities (BLIP: ``backbone.task_model = "vqa"``); the alignment
    loss is ignored (``alignment_loss = "none"``).
    Evaluation: ``rank`` (top ``k_test`` answers of the answer list by first-token probability, then by full
    log-likelihood) or ``generate`` (beam search); ``vqa_acc`` by the official VQA evaluation's rules (x100)
    where the questions have human answers; writes ``vqa_result_<split>.json`` (``[{question_id, answer}]``, the
    VQAv2 server's format).

    """

    inference: Literal["rank", "generate"] = "rank"
    """``rank`` over an answer list (BLIP's VQAv2 setting) or free ``generate``."""
    k_test: PositiveInt = 128
    """candidates re-scored by full log-likelihood per question (BLIP: 128)."""
    answer_list: str | None = None
    """a JSON list of candidate answers; ``None``: the data's ``answer_list``."""
    max_answer_length: Annotated[int, Field(ge=2)] = 10
    """most tokens of a generated answer, ``[bos]`` included (BLIP: 10)."""
    num_beams: PositiveInt = 3
    """beam width of ``generate``."""
    label_smoothing: Probability = 0.1
    """of the training loss (BLIP: 0.1)."""
    normalize_answers: bool = False
    """``false``: ``vqa_acc`` by the official rules (human answers processed only where they disagree); ``true``:
    every human answer normalised as the prediction is (lenient; not the number papers report)."""


@registry.tasks.register("vqa.v1")
@builds(VQAOptions)
def vqa_v1(options: VQAOptions):
    from pathlib import Path

    from unitrans.tasks.vqa import VQA

    if options.answer_list is not None:  # relative to where the spec is built, then fixed
        options = options.model_copy(update={"answer_list": str(Path(options.answer_list).expanduser().absolute())})
    return VQA(options)

"""Visual question answering on an encoder-decoder (BLIP's ``blip_vqa.py:BLIP_VQA``), scored by VQA accuracy.

Through the backbone's :class:`~unitrans.interfaces.QuestionEncoder` and
:class:`~unitrans.interfaces.EncoderDecoder` capabilities:

* The question is encoded over the image tokens (BLIP: ``[ENC] question [SEP]`` through the text encoder with
  cross-attention, the fusion blocks where QASN acts); its token states are what the decoder attends to.
* Training: each question's distinct answers are decoded (``[bos] answer [eos]``) against the question states,
  repeated once per answer; the loss of an answer is its summed token loss times its weight (the fraction of the
  humans who gave it; 0.2 for a Visual Genome answer), summed and divided by the number of questions.
* ``rank`` inference: every candidate of the answer list is scored by the probability of its first token; the
  ``k_test`` best are re-scored by their full log-likelihood and the best one is the answer.
* ``generate`` inference: beam search from ``[bos]`` (beam 3, at most ``max_answer_length`` tokens).

BLIP ranks by its label-smoothed training loss; here the ranking uses the exact log-likelihood (no smoothing),
which is what "most likely answer" means and what a brute-force scorer computes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from unitrans.errors import UserError
from unitrans.interfaces import EncoderDecoder, QuestionEncoder, Task
from unitrans.options import Configured
from unitrans.tasks import VQAOptions
from unitrans.tasks import decoding


def answer_log_likelihood(backbone, states: torch.Tensor, states_mask: torch.Tensor, answer_ids: torch.Tensor,
                          answer_mask: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of each ``[bos] answer [eos]`` row given its question states: ``(A,)``."""
    logits = backbone.decode_logits(answer_ids, answer_mask, states, states_mask)  # (A, La, V)
    return -decoding.token_nll(logits, decoding.padding_ignored(answer_ids, answer_mask)).sum(1)


class VQA(Configured, Task):
    """BLIP's VQA recipe: answer-weighted decoder loss; ``rank`` or ``generate`` inference; VQA accuracy (x100).

    The ``alignment`` argument of :meth:`training_step` is ignored (VQA has no unimodal text features to align).
    """

    metric_keys = ("vqa_acc", "acc")
    primary_metric = "vqa_acc"
    options_class = VQAOptions
    name = "vqa.v1"

    def required_capabilities(self) -> tuple[type, ...]:
        return (QuestionEncoder, EncoderDecoder)

    # ---- training --------------------------------------------------------------------------------------------
    def training_step(self, backbone, batch, alignment):
        """``batch``: ``image (B, 3, H, W)``, ``question`` (B strings), ``answer`` (A strings, each question's
        answers in order), ``weight (A,)``, ``n (B,)`` answers per question."""
        image_embeds = backbone.encode_image(batch["image"])  # (B, N, Dv)
        states, q_mask = backbone.encode_question(batch["question"], image_embeds)  # (B, Lq, Dt)
        n = batch["n"].to(states.device)
        states, q_mask = states.repeat_interleave(n, dim=0), q_mask.repeat_interleave(n, dim=0)  # (A, Lq, Dt)
        ids, mask = backbone.decoder_tokenize(batch["answer"], states.device)  # (A, La)
        logits = backbone.decode_logits(ids, mask, states, q_mask)  # (A, La, V)
        labels = decoding.padding_ignored(ids, mask)
        per_answer = decoding.token_nll(logits, labels, self.options.label_smoothing).sum(1)  # (A,)
        weight = batch["weight"].to(per_answer.device, per_answer.dtype)
        return {"vqa_loss": (weight * per_answer).sum() / batch["image"].shape[0]}

    # ---- inference -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rank(self, backbone, states, q_mask, cand_ids, cand_mask) -> torch.Tensor:
        """Index of the best candidate per question: top ``k_test`` by first-token probability, then by full
        log-likelihood. ``cand_ids (C, La)`` are ``[DEC] answer [SEP]`` rows. Returns ``(Q,)``."""
        q = states.shape[0]
        bos = cand_ids[:1, :1].expand(q, 1)  # (Q, 1)
        start = backbone.decode_logits(bos, None, states, q_mask)[:, 0].float()  # (Q, V)
        first = F.softmax(start, dim=-1).index_select(1, cand_ids[:, 1])  # (Q, C)
        k = min(self.options.k_test, cand_ids.shape[0])
        _, top = first.topk(k, dim=1)  # (Q, k)
        ids, mask = cand_ids[top.reshape(-1)], cand_mask[top.reshape(-1)]  # (Q*k, La)
        ll = answer_log_likelihood(backbone, states.repeat_interleave(k, 0), q_mask.repeat_interleave(k, 0),
                                   ids, mask).view(q, k)
        return top.gather(1, ll.argmax(dim=1, keepdim=True)).squeeze(1)

    @torch.no_grad()
    def generate_answers(self, backbone, states, q_mask) -> list[str]:
        """Beam-search answers from ``[bos]`` over the question states."""
        o = self.options
        bos = torch.tensor([decoding.prefix_ids(backbone, "")], device=states.device)  # (1, 1): [bos]
        bos = bos.expand(states.shape[0], 1)  # (Q, 1)
        out = backbone.generate(bos, states, q_mask, num_beams=o.num_beams, max_length=o.max_answer_length)
        return backbone.decode_text(out[:, 1:])

    @torch.no_grad()
    def answer(self, backbone, pixel_values: torch.Tensor, questions: Sequence[str],
               answer_list: Sequence[str] | None = None) -> list[str]:
        """Answers for a batch of images and questions, by this task's inference mode."""
        image_embeds = backbone.encode_image(pixel_values)
        states, q_mask = backbone.encode_question(questions, image_embeds)
        if self.options.inference == "generate":
            return self.generate_answers(backbone, states, q_mask)
        if not answer_list:
            raise UserError("task vqa.v1 with inference = 'rank' needs an answer list: the data's answer_list "
                            "file, or task.answer_list")
        cand_ids, cand_mask = backbone.decoder_tokenize(answer_list, states.device)
        return [answer_list[i] for i in self.rank(backbone, states, q_mask, cand_ids, cand_mask).tolist()]

    def _answer_list(self, dataset) -> list[str] | None:
        if self.options.answer_list is not None:
            from unitrans.data.vqa_json import read_answer_list

            return read_answer_list(self.options.answer_list)
        return getattr(dataset, "answer_list", None)

    @torch.no_grad()
    def evaluate(self, backbone, dataset, batch_size, *, device="cpu", collate=None, num_workers=0,
                 output_dir=None, split="test"):
        from unitrans.metrics.vqa import vqa_metrics

        answer_list = self._answer_list(dataset) if self.options.inference == "rank" else None
        rows, gts = [], {}
        for batch in decoding.loader_over(dataset, decoding.shard(len(dataset)), batch_size, collate, num_workers):
            answers = self.answer(backbone, batch["image"].to(device), batch["question"], answer_list)
            rows += [{"question_id": q, "answer": a} for q, a in zip(batch["question_id"], answers)]
            gts.update({q: h for q, h in zip(batch["question_id"], batch["answers"]) if h})
        rows = decoding.concat_across_ranks(rows)
        gts = dict(decoding.concat_across_ranks(list(gts.items())))
        decoding.write_rows(output_dir, f"vqa_result_{split}.json", rows)
        if not gts:  # test-dev / test-std: the evaluation server scores vqa_result_<split>.json
            _say_unscored(len(rows), output_dir, split)
            return {"n_questions": float(len(rows))}
        return vqa_metrics({r["question_id"]: r["answer"] for r in rows}, gts, self.options.normalize_answers)


def _say_unscored(n: int, output_dir, split: str) -> None:
    """Says why a split without human answers gets no accuracy, and where its answers are (main rank)."""
    from pathlib import Path

    from unitrans import distributed

    if not distributed.is_main():
        return
    where = (f"written to {Path(output_dir) / f'vqa_result_{split}.json'}" if output_dir is not None
             else f"written to vqa_result_{split}.json in the output folder after training")
    print(f"[unitrans] vqa: the {split} split has no human answers (as VQAv2 test-dev / test-std): no accuracy "
          f"here; its {n} answers are {where}, the file the evaluation server scores", flush=True)

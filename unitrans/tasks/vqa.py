"""Visual question answering on BLIP's encoder + decoder (``blip_vqa.py:BLIP_VQA``), scored by VQA accuracy.

* The question, ``[ENC] question [SEP]``, runs through the text encoder with cross-attention to the image tokens
  (the fusion blocks, where QASN acts); its token states are what the decoder cross-attends to.
* Training: each question's distinct answers are decoded (``[DEC] answer [SEP]``) against the question states,
  repeated once per answer; the loss of an answer is its summed token loss times its weight (the fraction of the
  humans who gave it; 0.2 for a Visual Genome answer), summed and divided by the number of questions.
* ``rank`` inference: every candidate of the answer list is scored by the probability of its first token; the
  ``k_test`` best are re-scored by their full log-likelihood and the best one is the answer.
* ``generate`` inference: beam search from ``[DEC]`` (beam 3, at most ``max_answer_length`` tokens).

BLIP ranks by its label-smoothed training loss; here the ranking uses the exact log-likelihood (no smoothing),
which is what "most likely answer" means and what a brute-force scorer computes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from unitrans.errors import UserError
from unitrans.interfaces import Task
from unitrans.tasks.captioning import (
    decoder_tokenize,
    gather_objects,
    image_attention,
    loader_over,
    need_decoder,
    shard,
    token_nll,
    write_results,
)


def encode_question(backbone, questions: Sequence[str], image_embeds: torch.Tensor):
    """``[ENC] question`` through the text encoder over the image tokens.

    Returns:
        question states ``(B, Lq, Dt)`` and their attention mask ``(B, Lq)``.
    """
    tok = backbone.tokenize(questions, image_embeds.device)
    ids = tok["input_ids"].clone()
    ids[:, 0] = backbone.enc_token_id
    out = backbone.model.text_encoder(input_ids=ids, attention_mask=tok["attention_mask"],
                                      encoder_hidden_states=image_embeds,
                                      encoder_attention_mask=image_attention(image_embeds))
    return out.last_hidden_state, tok["attention_mask"]


def answer_log_likelihood(backbone, states: torch.Tensor, states_mask: torch.Tensor, answer_ids: torch.Tensor,
                          answer_mask: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of each ``[DEC] answer [SEP]`` row given its question states: ``(A,)``."""
    logits = backbone.model.text_decoder(input_ids=answer_ids, attention_mask=answer_mask,
                                         encoder_hidden_states=states, encoder_attention_mask=states_mask).logits
    labels = answer_ids.masked_fill(answer_mask == 0, -100)
    return -token_nll(logits, answer_ids, labels).sum(1)


class VQA(Task):
    """BLIP's VQA head: answer-weighted decoder loss; ``rank`` or ``generate`` inference; VQA accuracy (x100).

    The ``alignment`` argument of :meth:`training_step` is ignored (VQA has no unimodal text features to align).
    """

    metric_keys = ("vqa_acc", "acc")
    primary_metric = "vqa_acc"
    name = "vqa.v1"

    def __init__(self, inference="rank", k_test=128, answer_list=None, max_answer_length=10, num_beams=3,
                 label_smoothing=0.1, normalize_answers=False):
        self.inference, self.k_test, self.answer_list_file = inference, k_test, answer_list
        self.max_answer_length, self.num_beams, self.label_smoothing = max_answer_length, num_beams, label_smoothing
        self.normalize_answers = normalize_answers  # False: the official VQA rules; True: lenient

    def check_backbone(self, backbone) -> None:
        need_decoder(self.name, backbone, encoder=True, fix='Set backbone.task_model = "vqa" '
                     '(BlipForQuestionAnswering, e.g. pretrained = "Salesforce/blip-vqa-base").')

    # ---- training --------------------------------------------------------------------------------------------
    def training_step(self, backbone, batch, alignment):
        """``batch``: ``image (B, 3, H, W)``, ``question`` (B strings), ``answer`` (A strings, each question's
        answers in order), ``weight (A,)``, ``n (B,)`` answers per question."""
        image_embeds = backbone.encode_image(batch["image"])  # (B, N, Dv)
        states, q_mask = encode_question(backbone, batch["question"], image_embeds)  # (B, Lq, Dt)
        n = batch["n"].to(states.device)
        states, q_mask = states.repeat_interleave(n, dim=0), q_mask.repeat_interleave(n, dim=0)  # (A, Lq, Dt)
        ids, mask = decoder_tokenize(backbone, batch["answer"], states.device)  # (A, La)
        logits = backbone.model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=states,
                                             encoder_attention_mask=q_mask).logits
        per_answer = token_nll(logits, ids, ids.masked_fill(mask == 0, -100), self.label_smoothing).sum(1)  # (A,)
        weight = batch["weight"].to(per_answer.device, per_answer.dtype)
        return {"vqa_loss": (weight * per_answer).sum() / batch["image"].shape[0]}

    # ---- inference -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rank(self, backbone, states, q_mask, cand_ids, cand_mask) -> torch.Tensor:
        """Index of the best candidate per question: top ``k_test`` by first-token probability, then by full
        log-likelihood. ``cand_ids (C, La)`` are ``[DEC] answer [SEP]`` rows. Returns ``(Q,)``."""
        q = states.shape[0]
        bos = cand_ids[:1, :1].expand(q, 1)  # (Q, 1)
        start = backbone.model.text_decoder(input_ids=bos, encoder_hidden_states=states,
                                            encoder_attention_mask=q_mask).logits[:, 0].float()  # (Q, V)
        first = F.softmax(start, dim=-1).index_select(1, cand_ids[:, 1])  # (Q, C)
        k = min(self.k_test, cand_ids.shape[0])
        _, top = first.topk(k, dim=1)  # (Q, k)
        ids, mask = cand_ids[top.reshape(-1)], cand_mask[top.reshape(-1)]  # (Q*k, La)
        ll = answer_log_likelihood(backbone, states.repeat_interleave(k, 0), q_mask.repeat_interleave(k, 0),
                                   ids, mask).view(q, k)
        return top.gather(1, ll.argmax(dim=1, keepdim=True)).squeeze(1)

    @torch.no_grad()
    def generate(self, backbone, states, q_mask) -> list[str]:
        """Beam-search answers from ``[DEC]`` over the question states."""
        tok = backbone.tokenizer
        bos = torch.full((states.shape[0], 1), backbone.bos_token_id, dtype=torch.long, device=states.device)
        out = backbone.model.text_decoder.generate(
            input_ids=bos, encoder_hidden_states=states, encoder_attention_mask=q_mask, num_beams=self.num_beams,
            max_length=self.max_answer_length, min_length=1, do_sample=False, eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return [tok.decode(row[1:], skip_special_tokens=True).strip() for row in out]

    @torch.no_grad()
    def answer(self, backbone, pixel_values: torch.Tensor, questions: Sequence[str],
               answer_list: Sequence[str] | None = None) -> list[str]:
        """Answers for a batch of images and questions, by this task's inference mode."""
        image_embeds = backbone.encode_image(pixel_values)
        states, q_mask = encode_question(backbone, questions, image_embeds)
        if self.inference == "generate":
            return self.generate(backbone, states, q_mask)
        if not answer_list:
            raise UserError("task vqa.v1 with inference = 'rank' needs an answer list: the data's answer_list "
                            "file, or task.answer_list")
        cand_ids, cand_mask = decoder_tokenize(backbone, answer_list, states.device)
        return [answer_list[i] for i in self.rank(backbone, states, q_mask, cand_ids, cand_mask).tolist()]

    def _answer_list(self, dataset) -> list[str] | None:
        if self.answer_list_file is not None:
            from unitrans.data.vqa_json import read_answer_list

            return read_answer_list(self.answer_list_file)
        return getattr(dataset, "answer_list", None)

    @torch.no_grad()
    def evaluate(self, backbone, dataset, batch_size, *, device="cpu", collate=None, num_workers=0,
                 output_dir=None, split="test"):
        from unitrans.metrics.vqa import vqa_metrics

        answer_list = self._answer_list(dataset) if self.inference == "rank" else None
        rows, gts = [], {}
        for batch in loader_over(dataset, shard(len(dataset)), batch_size, collate, num_workers):
            answers = self.answer(backbone, batch["image"].to(device), batch["question"], answer_list)
            rows += [{"question_id": q, "answer": a} for q, a in zip(batch["question_id"], answers)]
            gts.update({q: h for q, h in zip(batch["question_id"], batch["answers"]) if h})
        rows = gather_objects(rows)
        gts = dict(gather_objects(list(gts.items())))
        write_results(output_dir, f"vqa_result_{split}.json", rows)
        if not gts:  # test-dev / test-std: the evaluation server scores vqa_result_<split>.json
            _say_unscored(len(rows), output_dir, split)
            return {"n_questions": float(len(rows))}
        return vqa_metrics({r["question_id"]: r["answer"] for r in rows}, gts, self.normalize_answers)


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

"""Image captioning on BLIP's text decoder: prompted LM loss, beam-search generation, BLEU-4 / CIDEr evaluation.

BLIP's recipe (``blip.py:BLIP_Decoder``): the decoder input is ``[DEC] prompt caption [SEP]`` (the tokenizer's
``[CLS]`` replaced by the ``[DEC]`` bos token); the loss is the next-token cross-entropy on the caption tokens
only (``[DEC]`` and the prompt are masked out), with label smoothing 0.1. Generation starts from ``[DEC] prompt``,
runs beam search over the image tokens (beam 3, at most 20 tokens prompt included, at least 5) and the prompt is
stripped from the output.

The helpers at the top (:func:`decoder_tokenize`, :func:`token_nll`, :func:`shard`, :func:`gather_objects`) are
shared with :mod:`unitrans.tasks.vqa`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from unitrans import distributed
from unitrans.errors import UserError
from unitrans.interfaces import Task


# ---- helpers shared with the VQA task ------------------------------------------------------------------------
def decoder_tokenize(backbone, texts: Sequence[str], device, max_length: int | None = None):
    """Decoder input as BLIP builds it: ``[DEC] text [SEP]`` then padding (right).

    Returns:
        ``input_ids (B, L)``, ``attention_mask (B, L)`` on ``device``.
    """
    tok = backbone.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=max_length or backbone.max_text_length, return_tensors="pt")
    ids = tok["input_ids"].clone()
    ids[:, 0] = backbone.bos_token_id
    return ids.to(device), tok["attention_mask"].to(device)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token loss per position: ``logits (B, L, V)`` predict ``labels[:, 1:]`` (``-100``: ignored).

    Returns:
        ``(B, L-1)`` losses, 0 where the label is ignored (with smoothing, BLIP's loss; without, the negative
        log-likelihood of each token).
    """
    del input_ids  # the labels are the inputs with ignored positions set to -100
    pred = logits[:, :-1, :].float()  # (B, L-1, V)
    target = labels[:, 1:]  # (B, L-1)
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="none", label_smoothing=label_smoothing)
    return loss.view(target.shape)


def image_attention(image_embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)  # (B, N)


def shard(n: int) -> list[int]:
    """This rank's indices of ``range(n)`` (strided; every rank gets a list, maybe empty)."""
    return list(range(distributed.rank(), n, distributed.world_size()))


def gather_objects(items: list) -> list:
    """Concatenates picklable lists from every rank (a no-op in one process)."""
    if not distributed.is_dist() or distributed.world_size() == 1:
        return items
    parts: list = [None] * distributed.world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def write_results(output_dir, name: str, rows: list[dict]) -> None:
    """Writes ``rows`` as JSON to ``output_dir/name`` on the main rank (atomically)."""
    if output_dir is None or not distributed.is_main():
        return
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)


def need_decoder(task: str, backbone, *, encoder: bool = False, fix: str) -> None:
    model = getattr(backbone, "model", None)
    missing = [n for n in (("text_encoder", "text_decoder") if encoder else ("text_decoder",))
               if not hasattr(model, n)]
    if missing:
        raise UserError(
            f"task {task} needs a BLIP model with {' and '.join(missing)}; backbone "
            f"{getattr(backbone, 'name', type(backbone).__name__)} built {type(model).__name__}. {fix}"
        )


def need_pycocoevalcap(task: str) -> None:
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise UserError(f"task {task} scores with pycocoevalcap (BLEU, CIDEr), which is not installed: "
                        "pip install 'unitrans[eval]'")


def loader_over(dataset, indices: list[int], batch_size: int, collate, num_workers: int):
    from torch.utils.data import DataLoader, Subset

    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collate,
                      num_workers=num_workers)


# ---- the task ------------------------------------------------------------------------------------------------
class Captioning(Task):
    """Prompted LM loss on the decoder; beam-search captions scored by BLEU-4 and CIDEr (x100).

    The ``alignment`` argument of :meth:`training_step` is ignored: ITC / MCAM align unimodal image and text
    features, which a captioning model (vision encoder + decoder, no text encoder) does not compute; a spec
    sets ``alignment_loss = "none"``.
    """

    metric_keys = ("bleu4", "cider")
    primary_metric = "cider"
    name = "captioning.v1"

    def __init__(self, prompt="a picture of ", num_beams=3, max_length=20, min_length=5, repetition_penalty=1.0,
                 label_smoothing=0.1):
        self.prompt, self.num_beams, self.max_length, self.min_length = prompt, num_beams, max_length, min_length
        self.repetition_penalty, self.label_smoothing = repetition_penalty, label_smoothing

    def check_backbone(self, backbone) -> None:
        need_decoder(self.name, backbone, fix='Set backbone.task_model = "captioning" '
                     '(BlipForConditionalGeneration, e.g. pretrained = "Salesforce/blip-image-captioning-base").')
        need_pycocoevalcap(self.name)

    def prompt_ids(self, backbone) -> list[int]:
        """``[DEC] prompt`` token ids (no ``[SEP]``): the generation start and the masked loss prefix."""
        ids = backbone.tokenizer(self.prompt)["input_ids"][:-1]
        return [backbone.bos_token_id] + list(ids[1:])

    # ---- training --------------------------------------------------------------------------------------------
    def training_step(self, backbone, batch, alignment):
        """LM loss on ``prompt + caption`` with the prompt masked out. ``alignment`` is ignored (see class)."""
        device = batch["image"].device
        texts = [self.prompt + c for c in batch["caption"]]
        ids, mask = decoder_tokenize(backbone, texts, device)  # (B, L)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :len(self.prompt_ids(backbone))] = -100  # [DEC] + prompt: not predicted
        image_embeds = backbone.encode_image(batch["image"])  # (B, N, Dv)
        logits = backbone.model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                             encoder_attention_mask=image_attention(image_embeds)).logits
        nll = token_nll(logits, ids, labels, self.label_smoothing)  # (B, L-1)
        n = (labels[:, 1:] != -100).sum().clamp(min=1)
        return {"lm_loss": nll.sum() / n}

    # ---- generation / evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, backbone, pixel_values: torch.Tensor) -> list[str]:
        """Beam-search captions for ``(B, 3, H, W)`` images, without the prompt."""
        image_embeds = backbone.encode_image(pixel_values)  # (B, N, Dv)
        start = self.prompt_ids(backbone)
        input_ids = torch.tensor([start], device=pixel_values.device).repeat(pixel_values.shape[0], 1)
        tok = backbone.tokenizer
        out = backbone.model.text_decoder.generate(
            input_ids=input_ids, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_attention(image_embeds), num_beams=self.num_beams,
            max_length=self.max_length, min_length=self.min_length, repetition_penalty=self.repetition_penalty,
            do_sample=False, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
        )  # (B, <= max_length)
        return [tok.decode(row[len(start):], skip_special_tokens=True).strip() for row in out]

    @torch.no_grad()
    def evaluate(self, backbone, dataset, batch_size, *, device="cpu", collate=None, num_workers=0,
                 output_dir=None, split="test"):
        from unitrans.metrics.caption import caption_metrics

        rows = []
        for batch in loader_over(dataset, shard(len(dataset)), batch_size, collate, num_workers):
            captions = self.generate(backbone, batch["image"].to(device))
            rows += [{"image_id": int(i), "caption": c} for i, c in zip(batch["image_id"].tolist(), captions)]
        rows = sorted(gather_objects(rows), key=lambda r: r["image_id"])
        write_results(output_dir, f"captions_{split}.json", rows)
        return caption_metrics({r["image_id"]: r["caption"] for r in rows}, dataset.references)

"""Image captioning on an encoder-decoder backbone: prompted LM loss, beam-search generation, BLEU-4 / CIDEr.

BLIP's recipe (``blip.py:BLIP_Decoder``), through the backbone's :class:`~unitrans.interfaces.EncoderDecoder`
capability: the decoder input is ``[bos] prompt caption [eos]``; the loss is the next-token cross-entropy on the
caption tokens only (``[bos]`` and the prompt are masked out), with label smoothing 0.1. Generation starts from
``[bos] prompt``, runs beam search over the image tokens (beam 3, at most 20 tokens prompt included, at least 5)
and the prompt is stripped from the output.
"""

from __future__ import annotations

import importlib.util

import torch

from unitrans.errors import UserError
from unitrans.interfaces import EncoderDecoder, Task
from unitrans.options import Configured
from unitrans.tasks import CaptioningOptions
from unitrans.tasks import decoding


def need_pycocoevalcap(task: str) -> None:
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise UserError(f"task {task} scores with pycocoevalcap (BLEU, CIDEr), which is not installed: "
                        "pip install 'unitrans[eval]'")


# ---- the task ------------------------------------------------------------------------------------------------
class Captioning(Configured, Task):
    """Prompted LM loss on the decoder; beam-search captions scored by BLEU-4 and CIDEr (x100).

    The ``alignment`` argument of :meth:`training_step` is ignored: ITC / MCAM align unimodal image and text
    features, which a captioning model (vision encoder + decoder, no text encoder) does not compute; a spec
    sets ``alignment_loss = "none"``.
    """

    metric_keys = ("bleu4", "cider")
    primary_metric = "cider"
    options_class = CaptioningOptions
    name = "captioning.v1"

    def required_capabilities(self) -> tuple[type, ...]:
        return (EncoderDecoder,)

    def check_backbone(self, backbone) -> None:
        super().check_backbone(backbone)
        need_pycocoevalcap(self.name)

    def prompt_ids(self, backbone) -> list[int]:
        """``[bos] prompt`` token ids (no ``[eos]``): the generation start and the masked loss prefix."""
        return decoding.prefix_ids(backbone, self.options.prompt)

    # ---- training --------------------------------------------------------------------------------------------
    def training_step(self, backbone, batch, alignment):
        """LM loss on ``prompt + caption`` with the prompt masked out. ``alignment`` is ignored (see class)."""
        device = batch["image"].device
        texts = [self.options.prompt + c for c in batch["caption"]]
        ids, mask = backbone.decoder_tokenize(texts, device)  # (B, L)
        labels = decoding.padding_ignored(ids, mask)
        labels[:, :len(self.prompt_ids(backbone))] = -100  # [bos] + prompt: not predicted
        image_embeds = backbone.encode_image(batch["image"])  # (B, N, Dv)
        logits = backbone.decode_logits(ids, mask, image_embeds, decoding.full_mask(image_embeds))  # (B, L, V)
        nll = decoding.token_nll(logits, labels, self.options.label_smoothing)  # (B, L-1)
        n = (labels[:, 1:] != -100).sum().clamp(min=1)
        return {"lm_loss": nll.sum() / n}

    # ---- generation / evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def captions(self, backbone, pixel_values: torch.Tensor) -> list[str]:
        """Beam-search captions for ``(B, 3, H, W)`` images, without the prompt."""
        o = self.options
        image_embeds = backbone.encode_image(pixel_values)  # (B, N, Dv)
        start = self.prompt_ids(backbone)
        prefix = torch.tensor([start], device=pixel_values.device).repeat(pixel_values.shape[0], 1)  # (B, P)
        out = backbone.generate(prefix, image_embeds, decoding.full_mask(image_embeds), num_beams=o.num_beams,
                                max_length=o.max_length, min_length=o.min_length,
                                repetition_penalty=o.repetition_penalty)  # (B, <= max_length)
        return backbone.decode_text(out[:, len(start):])

    @torch.no_grad()
    def evaluate(self, backbone, dataset, batch_size, *, device="cpu", collate=None, num_workers=0,
                 output_dir=None, split="test"):
        from unitrans.metrics.caption import caption_metrics

        rows = []
        for batch in decoding.loader_over(dataset, decoding.shard(len(dataset)), batch_size, collate, num_workers):
            captions = self.captions(backbone, batch["image"].to(device))
            rows += [{"image_id": int(i), "caption": c} for i, c in zip(batch["image_id"].tolist(), captions)]
        rows = sorted(decoding.concat_across_ranks(rows), key=lambda r: r["image_id"])
        decoding.write_rows(output_dir, f"captions_{split}.json", rows)
        return caption_metrics({r["image_id"]: r["caption"] for r in rows}, dataset.references)

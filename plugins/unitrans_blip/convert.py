"""BLIP's original checkpoints (``model_base.pth``, ``model_base_capfilt_large.pth``, the retrieval / caption / VQA
``.pth`` files of the BLIP and LAVIS code) onto the ``transformers`` BLIP classes.

The original layout (``models/vit.py``, ``models/med.py``, ``models/blip_*.py`` of salesforce/BLIP; LAVIS keeps
the same names) is mapped key by key:

* ``visual_encoder.{cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2}, norm}`` -> ``vision_model.{embeddings.class_embedding, embeddings.position_embedding,
  embeddings.patch_embedding, encoder.layers.i.{layer_norm1, self_attn.qkv, self_attn.projection, layer_norm2,
  mlp.fc1, mlp.fc2}, post_layernorm}``;
* ``text_encoder.*`` (BERT with cross-attention), ``text_decoder.{bert, cls}.*`` and the heads ``vision_proj``,
  ``text_proj``, ``itm_head`` keep their names (``transformers`` ported ``med.py`` with its names);
* ``temp`` (BLIP's learned ITC temperature) is carried beside the model; the momentum encoder (``*_m.*``), the
  feature queues and ``position_ids`` buffers are not model weights.

Loading never runs code from the file: ``torch.load(weights_only=True)`` only. The architecture is read off the
tensors (widths, depths, vocabulary, image size from ``pos_embed``); BLIP's ViT uses LayerNorm eps 1e-6, which
the config carries (``transformers``' default is 1e-5).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unitrans.errors import UserError

CHECKPOINT_SUFFIXES = (".pth", ".pt")
HEAD_WIDTH = 64  # BLIP's ViT-B / ViT-L and BERT-base all use 64-wide attention heads
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embedding.\1"),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
]
_SAME_NAME = ("text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")
_QUEUES = {"image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue"}


@dataclass
class ConversionReport:
    """What happened to every tensor of the file and every weight of the model.

    Attributes:
        loaded: model weights filled from the file.
        not_weights: file keys that are not model weights, by kind (momentum encoder, queues, buffers).
        other_heads: file keys of components this ``transformers`` class does not have (e.g. the text decoder of
            a pretraining checkpoint loaded for retrieval).
        unmapped: file keys that map nowhere (not BLIP's layout).
        unfilled: model weights the file did not fill (they keep their random init).
        notes: how gaps were closed (a decoder started from the encoder, a tied LM head).
        temperature: BLIP's learned ITC temperature ``temp``, when the file has one.
    """

    loaded: int = 0
    not_weights: dict[str, int] = field(default_factory=dict)
    other_heads: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    unfilled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    temperature: float | None = None

    def summary(self, path: str, target: str) -> str:
        """One paragraph for the run's log."""
        skipped = ", ".join(f"{n} {kind}" for kind, n in sorted(self.not_weights.items())) or "none"
        lines = [f"{path} -> {target}: {self.loaded} weights loaded; not model weights: {skipped}; "
                 f"for other heads: {len(self.other_heads)}" + (f" ({_first(self.other_heads)})" if self.other_heads else "")]
        lines.append(f"maps nowhere: {len(self.unmapped)}" + (f" ({_first(self.unmapped)})" if self.unmapped else ""))
        lines.append(f"left at init: {len(self.unfilled)}" + (f" ({_first(self.unfilled)})" if self.unfilled else ""))
        if self.temperature is not None:
            lines.append(f"temp {self.temperature:.4g}")
        return "; ".join(lines + self.notes)


def _first(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a BLIP / LAVIS ``.pth`` (its ``"model"`` entry, or the file itself when flat).

    Raises:
        UserError: the file is missing, ``torch.load(weights_only=True)`` refuses it (it would have to run code
            from the file to load it), or it holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"backbone blip.v1: pretrained checkpoint '{path}' does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every refusal of the safe unpickler is the same user-facing problem
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"backbone blip.v1: {path} cannot be loaded safely: torch.load(weights_only=True) refused "
                        f"it ({reason[:200]}); UniTrans never runs code from a checkpoint. Re-save its state dict "
                        "(torch.save({'model': model.state_dict()}, ...)) where you trust the file") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"backbone blip.v1: {path} holds no state dict (expected BLIP's {{'model': state_dict}} "
                        "or a flat state dict of tensors)")
    return state


def hf_name(key: str) -> str | None:
    """The ``transformers`` name of an original BLIP key, or ``None`` when BLIP's layout has no such weight."""
    if key.startswith("visual_encoder."):
        rest = key[len("visual_encoder."):]
        for pattern, repl in _VISION_RENAMES:
            if re.match(pattern, rest):
                return "vision_model." + re.sub(pattern, repl, rest)
        return None
    if key.startswith(_SAME_NAME) and not key.endswith(".position_ids"):
        return key
    return None


def _kind_of_non_weight(key: str) -> str | None:
    head = key.split(".", 1)[0]
    if head.endswith("_m"):
        return "momentum-encoder tensors"
    if key in _QUEUES:
        return "queue buffers"
    if key.endswith(".position_ids"):
        return "position_ids buffers"
    if key == "temp":
        return "temperature"
    return None


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state for m in [re.match(pattern, k)] if m})


def config_from_state(state: dict[str, torch.Tensor], tokenizer):
    """A ``BlipConfig`` whose sizes are the checkpoint's (heads: width / 64, as every BLIP model has them)."""
    from transformers import BlipConfig

    patch = state["visual_encoder.patch_embed.proj.weight"]
    grid = math.isqrt(state["visual_encoder.pos_embed"].shape[1] - 1)
    bert = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in state else "text_decoder.bert."
    words = state[bert + "embeddings.word_embeddings.weight"]
    vision = dict(hidden_size=patch.shape[0], num_hidden_layers=_count(state, r"^visual_encoder\.blocks\.(\d+)\."),
                  num_attention_heads=max(1, patch.shape[0] // HEAD_WIDTH), patch_size=patch.shape[2],
                  intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                  image_size=grid * patch.shape[2], layer_norm_eps=1e-6)
    text = dict(vocab_size=words.shape[0], hidden_size=words.shape[1],
                num_hidden_layers=_count(state, "^" + re.escape(bert) + r"encoder\.layer\.(\d+)\."),
                num_attention_heads=max(1, words.shape[1] // HEAD_WIDTH),
                intermediate_size=state[bert + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                encoder_hidden_size=state[bert + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
                max_position_embeddings=state[bert + "embeddings.position_embeddings.weight"].shape[0],
                layer_norm_eps=1e-12, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                sep_token_id=tokenizer.sep_token_id)
    proj = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=proj)


def map_state(state: dict[str, torch.Tensor], model_keys: dict[str, tuple]) -> tuple[dict, ConversionReport]:
    """Rename ``state`` onto a model whose state-dict keys and shapes are ``model_keys``.

    Returns:
        (tensors by ``transformers`` name, the report). A decoder missing from the file starts from its text
        encoder (BLIP ties the two in pretraining); an LM head missing from the file is tied to the decoder's word
        embeddings, as BLIP ties it.
    """
    report, mapped = ConversionReport(), {}
    if "temp" in state:
        report.temperature = float(state["temp"])
    for key, tensor in state.items():
        kind = _kind_of_non_weight(key)
        if kind is not None:
            report.not_weights[kind] = report.not_weights.get(kind, 0) + 1
            continue
        name = hf_name(key)
        if name is None:
            report.unmapped.append(key)
        elif name not in model_keys:
            report.other_heads.append(key)
        elif tuple(tensor.shape) != model_keys[name]:
            raise UserError(f"backbone blip.v1: checkpoint tensor '{key}' has shape {tuple(tensor.shape)}, the "
                            f"model's '{name}' {model_keys[name]}")
        else:
            mapped[name] = tensor
    _close_decoder_gaps(state, mapped, model_keys, report)
    report.loaded = len(mapped)
    report.unfilled = sorted(set(model_keys) - set(mapped))
    return mapped, report


def _close_decoder_gaps(state, mapped: dict, model_keys: dict, report: ConversionReport) -> None:
    """Decoder from encoder when the file has no decoder; LM head tied to the word embeddings when absent."""
    wants_decoder = any(k.startswith("text_decoder.bert.") for k in model_keys)
    if wants_decoder and not any(k.startswith("text_decoder.bert.") for k in mapped):
        n = 0
        for key, tensor in state.items():
            name = "text_decoder.bert." + key[len("text_encoder."):] if key.startswith("text_encoder.") else None
            if name in model_keys and tuple(tensor.shape) == model_keys[name]:
                mapped[name] = tensor
                n += 1
        if n:
            report.notes.append(f"the text decoder starts from the file's text encoder ({n} tensors)")
    tied = {"text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
            "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias"}
    for target, source in tied.items():
        if target in model_keys and target not in mapped and source in mapped:
            mapped[target] = mapped[source]
            report.notes.append(f"{target} tied to {source}")


def load_blip_checkpoint(path: str | Path, model_cls, tokenizer_for):
    """A ``transformers`` BLIP model of class ``model_cls`` with the weights of an original BLIP ``.pth``.

    Args:
        tokenizer_for: vocabulary size -> the tokenizer for it.

    Returns:
        (model, tokenizer, report).
    """
    state = read_state_dict(path)
    if "visual_encoder.patch_embed.proj.weight" not in state:
        raise UserError(f"backbone blip.v1: {path} is not a BLIP checkpoint (no visual_encoder.patch_embed.proj."
                        "weight; BLIP's and LAVIS's .pth files have it)")
    bert = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in state else "text_decoder.bert."
    vocab = state[bert + "embeddings.word_embeddings.weight"].shape[0]
    tokenizer = tokenizer_for(vocab)
    if vocab != len(tokenizer):
        raise UserError(f"backbone blip.v1: {path} has a vocabulary of {vocab} tokens; the tokenizer has "
                        f"{len(tokenizer)} (BLIP's: bert-base-uncased + [DEC] + [ENC] = 30,524)")
    model = model_cls(config_from_state(state, tokenizer))
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped, report = map_state(state, target)
    with torch.no_grad():
        own = model.state_dict()
        for name, tensor in mapped.items():
            own[name].copy_(tensor)
    return model, tokenizer, report

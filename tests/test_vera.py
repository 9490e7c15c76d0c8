"""VeRA (vera.v1) against PEFT's VeRA: the same frozen pair from the same seed, the same outputs; identity at init;
merge equals unmerged; the checkpoint holds the scaling vectors only; parameter accounting."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import (adapted_and_frozen, build_spec, make_inputs, randomise_, retrieval_forward, spec_dict,
                      tiny_backbone)
from unitrans.adapters import vera_v1
from unitrans.interfaces import match_points

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

QKV = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]


def _peft_names(point) -> str:
    """The module of the text encoder a point is, as PEFT names it (``encoder.layer.0.attention.self.query``)."""
    part = "attention" if point.name.startswith("text.") else "crossattention"
    role = {"q": "query", "k": "key", "v": "value"}[point.role]
    return f"encoder.layer.{point.layer}.{part}.self.{role}"


def test_vera_equals_peft_vera_on_the_tiny_blip_text_encoder():
    """Self- and cross-attention q, k, v of the text encoder, the cross-attention k, v reading a narrower (48-wide)
    vision stream: one pair over the largest widths, sliced per point, exactly as PEFT draws and slices it."""
    bb = tiny_backbone(vision_width=48)
    ref = peft.get_peft_model(copy.deepcopy(bb.model.text_encoder), peft.VeraConfig(
        r=8, target_modules=["query", "key", "value"], projection_prng_key=3, d_initial=0.1))
    points, _ = match_points(bb.injection_points(), ["text.attn.[qkv]", "fusion.attn.[qkv]"])
    assert len(points) == 12 and {p.in_features for p in points} == {64, 48}
    adapter = vera_v1(targets=["text.attn.[qkv]", "fusion.attn.[qkv]"], rank=8, projection_seed=3)
    adapter.attach(points)
    assert torch.equal(adapter.A, ref.base_model.vera_A["default"])  # (8, 64): the same draw from the same seed
    assert torch.equal(adapter.B, ref.base_model.vera_B["default"])  # (64, 8)
    modules = dict(ref.base_model.model.named_modules())
    for pt in points:  # PEFT's init: λd = d_initial, λb = 0
        layer = modules[_peft_names(pt)]
        assert torch.equal(adapter.lambda_d[pt.id.replace(".", "_")], layer.vera_lambda_d["default"])
        assert torch.equal(adapter.lambda_b[pt.id.replace(".", "_")], layer.vera_lambda_b["default"])
    randomise_([layer.vera_lambda_d["default"] for layer in (modules[_peft_names(p)] for p in points)], seed=1)
    randomise_([layer.vera_lambda_b["default"] for layer in (modules[_peft_names(p)] for p in points)], seed=2)
    with torch.no_grad():
        for pt in points:
            layer = modules[_peft_names(pt)]
            adapter.lambda_d[pt.id.replace(".", "_")].copy_(layer.vera_lambda_d["default"])
            adapter.lambda_b[pt.id.replace(".", "_")].copy_(layer.vera_lambda_b["default"])
    pixel, tok = make_inputs(bb, batch=3)
    ref.eval()
    with torch.no_grad():
        image = bb.encode_image(pixel)
        args = dict(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=image)
        ours = bb.model.text_encoder(**args).last_hidden_state
        theirs = ref(**args).last_hidden_state
        with ref.disable_adapter():
            frozen = ref(**args).last_hidden_state
    assert (theirs - frozen).abs().max() > 1e-2  # the update is not negligible
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_vera_is_the_identity_at_init_and_counts_r_plus_d_out_per_point():
    d = spec_dict([{"name": "vera.v1", "targets": QKV, "rank": 16}])
    _, built = build_spec(d)
    pixel, tok = make_inputs(built.backbone, batch=2)
    adapted, frozen = adapted_and_frozen(built, pixel, tok)
    for k in frozen:
        assert torch.equal(frozen[k], adapted[k]), k
    counts = built.parameter_counts()
    points = built.adapters[0].points
    assert len(points) == 18  # q, k, v x (vision, text, fusion) x 2 layers
    assert counts["trainable"] == sum(16 + p.out_features for p in points) == 18 * (16 + 64)
    assert counts["by_modality"] == {"V": 6 * 80, "T": 6 * 80, "C": 6 * 80}
    assert set(built.trainable_state()) == {f"adapters.0.{kind}.{p.id.replace('.', '_')}"
                                            for kind in ("lambda_d", "lambda_b") for p in points}


def test_vera_merge_equals_unmerged_and_unmerge_restores_the_weights():
    d = spec_dict([{"name": "vera.v1", "targets": QKV, "rank": 16}])
    _, built = build_spec(d)
    randomise_(built.trainable_parameters(), seed=4, std=0.5)
    bb = built.backbone
    weights = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    pixel, tok = make_inputs(bb, batch=2)
    with torch.no_grad():
        unmerged = retrieval_forward(bb, pixel, tok)
        with built.disabled():
            frozen = retrieval_forward(bb, pixel, tok)
        built.merge()
        merged = retrieval_forward(bb, pixel, tok)
        built.unmerge()
    assert (unmerged["fused"] - frozen["fused"]).abs().max() > 1e-2
    for k in unmerged:
        torch.testing.assert_close(merged[k], unmerged[k], atol=2e-5, rtol=1e-5, msg=k)
    for n, p in bb.model.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_vera_checkpoint_holds_the_scalings_and_the_pair_comes_back_from_the_seed(tmp_path):
    from safetensors.torch import load_file

    from unitrans.engine.checkpoint import load_adapter, save_adapter

    d = spec_dict([{"name": "vera.v1", "targets": QKV, "rank": 16, "projection_seed": 7}])
    spec, saved = build_spec(d)
    randomise_(saved.trainable_parameters(), seed=5, std=0.5)
    save_adapter(saved, spec, tmp_path)
    assert all(".lambda_" in k for k in load_file(str(tmp_path / "adapter.safetensors")))
    _, loaded = build_spec(d)
    load_adapter(loaded, tmp_path)
    assert torch.equal(loaded.adapters[0].A, saved.adapters[0].A)
    pixel, tok = make_inputs(saved.backbone, batch=2)
    with torch.no_grad():
        a, b = retrieval_forward(saved.backbone, pixel, tok), retrieval_forward(loaded.backbone, pixel, tok)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vera_exports_to_a_plain_transformers_model(tmp_path):
    from transformers import BlipForImageTextRetrieval

    d = spec_dict([{"name": "vera.v1", "targets": QKV, "rank": 16}])
    _, built = build_spec(d)
    randomise_(built.trainable_parameters(), seed=6, std=0.5)
    built.export(tmp_path / "exported")
    plain = BlipForImageTextRetrieval.from_pretrained(str(tmp_path / "exported")).eval()
    pixel, tok = make_inputs(built.backbone, batch=2)
    with torch.no_grad():
        ours = retrieval_forward(built.backbone, pixel, tok)
        with built.disabled():
            frozen = retrieval_forward(built.backbone, pixel, tok)
        itc = plain(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixel,
                    use_itm_head=False).itm_score
    assert (ours["image_feat"] - frozen["image_feat"]).abs().max() > 1e-3
    torch.testing.assert_close(itc, ours["image_feat"] @ ours["text_feat"].t(), atol=1e-5, rtol=1e-5)

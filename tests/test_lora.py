"""LoRA (eq. 2) against PEFT's LoRA and closed forms; identity at init; only adapter parameters train; merging."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CAPTIONS, build_spec, make_inputs, randomise_, retrieval_forward, spec_dict, tiny_backbone
from unitrans.adapters import lora_v1
from unitrans.interfaces import InjectionPoint, match_points

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def peft():
    """PEFT, the oracle of the tests that compare against it (those tests skip where it is not installed)."""
    return pytest.importorskip("peft")


def _key(point: InjectionPoint) -> str:
    return point.id.replace(".", "_")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10))


def _points_of(model: nn.Sequential) -> list[InjectionPoint]:
    """Hand-made injection points over the linears of a Sequential (one attention-free point per linear)."""
    pts = []
    for layer, idx in enumerate((0, 2, 4)):
        lin = model[idx]
        pts.append(InjectionPoint(name="mlp.fc", layer=layer, modality="T", module=lin, out_slice=None,
                                  in_features=lin.in_features, out_features=lin.out_features,
                                  input_group=f"g{layer}", attention=None))
    return pts


def test_lora_equals_peft_lora_on_a_small_mlp(peft):
    ours_model = _mlp()
    for p in ours_model.parameters():
        p.requires_grad_(False)
    ref = peft.get_peft_model(copy.deepcopy(ours_model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0", "2", "4"], init_lora_weights=False, lora_dropout=0.0))
    points = _points_of(ours_model)
    adapter = lora_v1(targets=["mlp.fc"], rank=4, alpha=8)
    adapter.attach(points)
    with torch.no_grad():
        for pt, idx in zip(points, (0, 2, 4)):
            peft_layer = ref.base_model.model[idx]
            adapter.lora_A[_key(pt)].copy_(peft_layer.lora_A["default"].weight)  # (r, in)
            adapter.lora_B[_key(pt)].copy_(peft_layer.lora_B["default"].weight)  # (out, r)
            assert peft_layer.scaling["default"] == pytest.approx(adapter.scaling) == pytest.approx(2.0)
    x = torch.randn(5, 7, 12, generator=torch.Generator().manual_seed(3))
    ours, theirs = ours_model(x), ref(x)
    frozen = ref.base_model.model  # sanity: the update is not zero (init_lora_weights=False draws B too)
    with ref.disable_adapter():
        base = frozen(x)
    assert not torch.allclose(theirs, base, atol=1e-3)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_lora_equals_peft_lora_on_the_tiny_blip_text_encoder(peft):
    bb = tiny_backbone()
    ref_encoder = copy.deepcopy(bb.model.text_encoder)
    ref = peft.get_peft_model(ref_encoder, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["attention.self.query", "attention.self.value"],
        init_lora_weights=False))
    points, _ = match_points(bb.injection_points(), ["text.attn.q", "text.attn.v"])
    assert len(points) == 4
    adapter = lora_v1(targets=["text.attn.q", "text.attn.v"], rank=4, alpha=8)
    adapter.attach(points)
    peft_modules = dict(ref.base_model.model.named_modules())
    with torch.no_grad():
        for pt in points:
            name = f"encoder.layer.{pt.layer}.attention.self.{'query' if pt.role == 'q' else 'value'}"
            layer = peft_modules[name]
            adapter.lora_A[_key(pt)].copy_(layer.lora_A["default"].weight)
            adapter.lora_B[_key(pt)].copy_(layer.lora_B["default"].weight)
    _, tok = make_inputs(bb, batch=3)
    ours = bb.encode_text(tok["input_ids"], tok["attention_mask"])
    ref.eval()
    theirs = ref(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_lora_is_the_identity_at_init():
    bb = tiny_backbone()
    pixel, tok = make_inputs(bb, batch=3)
    with torch.no_grad():
        frozen = retrieval_forward(bb, pixel, tok)
    points, _ = match_points(bb.injection_points(), ["vision.attn.*", "vision.mlp.*", "text.attn.*", "fusion.attn.*"])
    adapter = lora_v1(targets=["vision.attn.*"], rank=4, alpha=16)
    adapter.attach(points)
    assert all(torch.count_nonzero(b) == 0 for b in adapter.lora_B.values())
    assert all(torch.count_nonzero(a) > 0 for a in adapter.lora_A.values())
    with torch.no_grad():
        adapted = retrieval_forward(bb, pixel, tok)
    for k in frozen:
        assert torch.equal(frozen[k], adapted[k]), k


def test_only_adapter_parameters_get_gradients():
    d = spec_dict([{"name": "lora.v1", "targets": ["vision.attn.*", "text.attn.*", "fusion.attn.*"], "rank": 4}])
    _, built = build_spec(d)
    bb = built.backbone
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(3, 3, bb.image_size, bb.image_size, generator=g), "caption": CAPTIONS[:3],
             "image_id": torch.tensor([0, 1, 2])}
    losses = built.task.training_step(bb, batch, built.alignment)
    assert {"itc_loss", "itm_loss"} <= set(losses)
    sum(losses.values()).backward()
    for name, p in bb.model.named_parameters():
        assert p.grad is None, name
    params = dict(built.adapters[0].named_parameters())
    assert len(params) == 2 * 24  # A and B for q, k, v, out of vision/text/fusion in 2 layers
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # B starts at zero, so A's gradient is zero; B's is not
    assert any(torch.count_nonzero(p.grad) > 0 for n, p in params.items() if n.startswith("lora_B"))


def test_fused_qkv_only_changes_the_k_rows():
    bb = tiny_backbone()
    points, _ = match_points(bb.injection_points(), ["vision.attn.k"], layers=[0])
    (pt,) = points
    qkv = bb.model.vision_model.encoder.layers[0].self_attn.qkv
    assert pt.module is qkv and pt.out_slice == slice(64, 128)
    adapter = lora_v1(targets=["vision.attn.k"], rank=4, alpha=6)
    adapter.attach(points)
    randomise_(adapter.lora_B.values(), seed=1)
    a, b = adapter.lora_A[_key(pt)].detach(), adapter.lora_B[_key(pt)].detach()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = qkv(x)
        base = x @ qkv.weight.t() + qkv.bias
        update = (x @ a.t()) @ b.t() * (6 / 4)
        expected = base + F.pad(update, (64, 64))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert torch.equal(out[..., :64], F.linear(x, qkv.weight, qkv.bias)[..., :64])
    assert torch.equal(out[..., 128:], F.linear(x, qkv.weight, qkv.bias)[..., 128:])
    assert not torch.allclose(out[..., 64:128], base[..., 64:128], atol=1e-3)


def test_merge_equals_unmerged_and_unmerge_restores_w0():
    bb = tiny_backbone()
    pixel, tok = make_inputs(bb, batch=2)
    targets = ["vision.attn.[qv]", "vision.mlp.fc1", "text.attn.*", "fusion.attn.k", "text.mlp.fc2"]
    points, unmatched = match_points(bb.injection_points(), targets)
    assert not unmatched
    modules = {id(p.module): p.module for p in points}.values()
    w0 = {id(m): m.weight.detach().clone() for m in modules}
    adapter = lora_v1(targets=targets, rank=4, alpha=8)
    adapter.attach(points)
    randomise_(adapter.lora_B.values(), seed=4, std=0.2)
    with torch.no_grad():
        unmerged = retrieval_forward(bb, pixel, tok)
        adapter.merge()
        assert any(not torch.equal(m.weight, w0[id(m)]) for m in modules)
        assert all(len(m._forward_hooks) == 0 for m in modules)
        merged = retrieval_forward(bb, pixel, tok)
        adapter.unmerge()
        restored = retrieval_forward(bb, pixel, tok)
    for k in unmerged:
        torch.testing.assert_close(merged[k], unmerged[k], atol=1e-5, rtol=0)
        assert torch.equal(restored[k], unmerged[k]), k
    for m in modules:
        assert torch.equal(m.weight, w0[id(m)])

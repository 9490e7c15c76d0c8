"""Mode-aware injection points (``fusion.self.*``: the text encoder's linears in the fused pass only), the
``encoder`` sharing mode and cross-only k/v scalings: behaviour against hand-built equivalents, and parameter
counts against closed forms written here."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import make_inputs, randomise_, tiny_backbone, training_without_dropout
from unitrans.adapters import lora_v1, vcra_v1
from unitrans.errors import UserError
from unitrans.interfaces import match_points

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ["text.attn.[qkv]"]
FUSED = ["fusion.self.[qkv]"]


def _attach(bb, targets, **kw):
    adapter = vcra_v1(targets=targets, rank=6, **kw)
    points, unmatched = match_points(bb.injection_points(), targets)
    assert not unmatched
    adapter.attach(points)
    return adapter


def _randomise(adapter, seed):
    randomise_(adapter.lambda_a.values(), seed=seed, std=0.7, mean=0.3)
    randomise_(adapter.lambda_b.values(), seed=seed + 1, std=0.7)


def _as_text_key(key: str) -> str:
    """The text point's λ key of a fusion.self λ key: ``fusion_0_self_q`` -> ``text_0_attn_q``,
    ``fusion_self_0_attn_kv`` -> ``text_0_attn_kv``."""
    key = re.sub(r"^fusion_(\d+)_self_", r"text_\1_attn_", key)
    return re.sub(r"^fusion_self_(\d+)_attn_", r"text_\1_attn_", key)


def _copy_scalings(src, dst, rename=lambda k: k) -> int:
    """Copy every λ pair (and s) of ``src`` that ``dst`` has under ``rename(key)``; returns how many tensors."""
    n = 0
    with torch.no_grad():
        for group in ("lambda_a", "lambda_b"):
            target = getattr(dst, group)
            for key, value in getattr(src, group).items():
                if rename(key) in target:
                    target[rename(key)].copy_(value)
                    n += 1
        for m, s in src.scale.items():
            if m in dst.scale:
                dst.scale[m].copy_(s)
    return n


def _passes(bb, pixel, tok):
    """(text-only pass output, fused pass output) of the text encoder."""
    with torch.no_grad():
        image = bb.encode_image(pixel)
        return bb.encode_text(**tok), bb.fuse(tok["input_ids"], tok["attention_mask"], image)


def test_fused_pass_points_act_in_the_fused_pass_only():
    bb = tiny_backbone()
    pixel, tok = make_inputs(bb)
    frozen_text, frozen_fused = _passes(bb, pixel, tok)
    fused_only = _attach(bb, FUSED)
    _randomise(fused_only, seed=3)
    text_out, fused_out = _passes(bb, pixel, tok)
    torch.testing.assert_close(text_out, frozen_text, rtol=0, atol=0)  # the text-only pass is untouched
    assert not torch.allclose(fused_out, frozen_fused, atol=1e-3)
    # the same λ (and s: the fusion points' modality is C, the text points' T) on the mode-free text points,
    # which act in both passes, gives the same fused pass
    bb2 = tiny_backbone()
    both_passes = _attach(bb2, TEXT)
    with torch.no_grad():
        both_passes.scale["T"].copy_(fused_only.scale["C"])
    assert _copy_scalings(fused_only, both_passes, _as_text_key) == 2 * 2 * 2  # 2 layers x (q, kv) x (λa, λb)
    text2, fused2 = _passes(bb2, pixel, tok)
    torch.testing.assert_close(fused2, fused_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(text2, frozen_text, atol=1e-3)


def test_text_and_fused_twins_give_each_pass_its_own_scalings():
    """Targeted together, the text points act in the text-only pass and the fusion.self points in the fused pass
    (never both): each pass equals an adapter that targets that pass's points alone, with the same λ."""
    pixel, tok = make_inputs(tiny_backbone())
    bb = tiny_backbone()
    twins = _attach(bb, TEXT + FUSED)
    _randomise(twins, seed=5)
    assert len(twins.lambda_a) == 2 * 2 * 2  # text and fusion.self, 2 layers, (q, kv)
    text_out, fused_out = _passes(bb, pixel, tok)
    bb_t, bb_f = tiny_backbone(), tiny_backbone()
    text_only, fused_only = _attach(bb_t, TEXT), _attach(bb_f, FUSED)
    assert _copy_scalings(twins, text_only) == _copy_scalings(twins, fused_only) == 2 * 2 * 2
    torch.testing.assert_close(text_out, _passes(bb_t, pixel, tok)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_out, _passes(bb_f, pixel, tok)[1], atol=1e-5, rtol=1e-5)


def test_lora_on_fused_pass_points_leaves_the_text_pass_alone():
    bb = tiny_backbone()
    pixel, tok = make_inputs(bb)
    frozen_text, frozen_fused = _passes(bb, pixel, tok)
    lora = lora_v1(targets=FUSED, rank=4)
    lora.attach(match_points(bb.injection_points(), FUSED)[0])
    randomise_(lora.lora_B.values(), seed=1)
    text_out, fused_out = _passes(bb, pixel, tok)
    torch.testing.assert_close(text_out, frozen_text, rtol=0, atol=0)
    assert not torch.allclose(fused_out, frozen_fused, atol=1e-3)


@pytest.mark.parametrize("make", [lambda: vcra_v1(targets=FUSED, rank=4), lambda: lora_v1(targets=FUSED, rank=4)])
def test_pass_dependent_updates_are_not_merged(make):
    bb = tiny_backbone()
    adapter = make()
    adapter.attach(match_points(bb.injection_points(), FUSED)[0])
    with pytest.raises(UserError, match="fused pass"):
        adapter.merge()


def _count(adapter) -> int:
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


def test_encoder_sharing_gives_one_pair_to_the_vit_and_one_to_the_bert():
    bb = tiny_backbone()  # d = 64 everywhere, 2 layers per branch
    targets = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.self.[qkv]", "fusion.attn.[qkv]"]
    adapter = _attach(bb, targets, share="encoder")
    assert sorted(adapter.A) == ["text", "vision"]
    assert adapter.pair_modalities == {"vision": {"V"}, "text": {"T", "C"}}
    d, r, layers = 64, 6, 2
    n_pairs = layers * 2 * 4  # (q, kv) in vision, text, fusion.self and cross-attention
    assert _count(adapter) == 2 * (2 * d * r) + n_pairs * (d + r) + 3  # + s for V, T, C
    shared = _attach(tiny_backbone(), targets, share="all")
    assert _count(shared) == 2 * d * r + n_pairs * (d + r) + 3


def test_cross_only_kv_scalings():
    targets = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]
    adapter = _attach(tiny_backbone(), targets, share_kv_scaling="cross")
    d, r, layers = 64, 6, 2
    keys = set(adapter.lambda_a)
    assert {k for k in keys if k.endswith("kv")} == {f"fusion_{i}_attn_kv" for i in range(layers)}
    assert _count(adapter) == 2 * d * r + layers * (3 + 3 + 2) * (d + r) + 3


@pytest.mark.parametrize("targets", [TEXT + FUSED + ["fusion.attn.[qkv]"], ["text.attn.q"]])
def test_gradient_checkpointing_recomputes_each_pass_with_its_own_points(targets):
    """Under gradient checkpointing the BERT layers of both passes are recomputed in backward, after the fused
    pass ran last: each recomputed layer must still apply its own pass's points (the probe records the pass at
    every layer call, recomputation included). Gradients equal those without checkpointing. A lone mode-free point
    (``text.attn.q``: both passes, one λ pair) recomputes the same tensors too (it once raised a CheckpointError)."""
    from conftest import build_spec, retrieval_forward, spec_dict

    grads = {}
    for gc in (False, True):
        adapter = {"name": "vcra.v1", "targets": targets, "rank": 4}
        _, built = build_spec(spec_dict([adapter], {"name": "qasn.v1"}, backbone_extra={"gradient_checkpointing": gc}))
        bb = built.backbone
        training_without_dropout(bb.model)
        randomise_(built.trainable.parameters(), seed=9, std=0.1, mean=0.0)
        pixel, tok = make_inputs(bb, batch=2)
        built.trainable.zero_grad(set_to_none=True)
        out = retrieval_forward(bb, pixel, tok)  # text-only pass, then the fused pass
        (out["text_feat"].sum() + out["itm"].square().sum()).backward()
        grads[gc] = {n: p.grad.clone() for n, p in built.trainable.named_parameters() if p.grad is not None}
    text_grads = [n for n in grads[False] if "text_0_attn" in n]
    assert text_grads and (len(targets) == 1 or any("fusion_0_self" in n for n in grads[False]))
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-5, rtol=1e-4, msg=n)


def test_the_pass_probe_hooks_exist_only_while_a_pass_dependent_point_is_used():
    """The layers' pre-hooks that record the pass are installed with the first update on a ``fusion.self.*`` point
    and removed with the last one: a backbone nothing pass-dependent is attached to runs no extra hook."""
    bb = tiny_backbone()
    layers = list(bb.model.text_encoder.encoder.layer)
    hooked = lambda: sum(len(layer._forward_pre_hooks) for layer in layers)  # noqa: E731
    bb.injection_points()
    assert hooked() == 0
    first, second = _attach(bb, FUSED), _attach(bb, FUSED + TEXT)
    assert hooked() == len(layers)  # one probe hook per layer, however many points and adapters use it
    first.detach()
    assert hooked() == len(layers)
    second.detach()
    assert hooked() == 0

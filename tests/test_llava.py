"""The LLaVA backbone (``llava.v1``): fidelity to transformers' own LLaVA forward and generation with the image
placeholder tokens, the question layout, QASN on the language model's layers, VCRA across widths, refusals.
Tiny random-init models only, offline."""

from __future__ import annotations

import copy

import pytest
import torch

from test_blip2 import assert_merge_exact, build
from unitrans.errors import UserError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0):
    from unitrans_llava import llava_v1

    torch.manual_seed(seed)
    bb = llava_v1(preset="tiny")
    bb.model.eval()
    return bb


def reference(bb):
    ref = transformers.LlavaForConditionalGeneration(copy.deepcopy(bb.model.config))
    ref.load_state_dict(bb.model.state_dict(), strict=True)
    return ref.eval()


def pixels(bb, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, bb.image_size, bb.image_size, generator=g)


def spec(adapters=(), side_network=None, task=None) -> dict:
    return {"seed": 0, "output_dir": "runs/test_llava", "plugins": ["unitrans_llava"],
            "backbone": {"name": "llava.v1", "preset": "tiny"},
            "adapters": [copy.deepcopy(a) for a in adapters], "alignment_loss": "none",
            "side_network": side_network or "none", "task": task or {"name": "captioning.v1"},
            "data": {"name": "shapes_caption.v1", "root": "runs/data/shapes_caption"}}




def tokens(bb, text: str) -> list[int]:
    return bb.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_logits_and_generation_equal_transformers_llava():
    """``[image tokens; [bos] text]`` gives LlavaForConditionalGeneration's logits and beam search with the image
    placeholders in its own input (transformers scatters the projected features into them)."""
    from unitrans.tasks.decoding import full_mask, prefix_ids

    bb = tiny()
    ref = reference(bb)
    img = ref.config.image_token_id
    px = pixels(bb)
    ids, mask = bb.decoder_tokenize(["a picture of a red circle", "a picture of two squares"], "cpu")
    with torch.no_grad():
        ctx = bb.encode_image(px)
        n = ctx.shape[1]
        assert n == (bb.image_size // 8) ** 2  # the CLS token is dropped (strategy "default")
        got = bb.decode_logits(ids, mask, ctx, full_mask(ctx))
        full = torch.cat([torch.full((2, n), img), ids], 1)
        expected = ref(input_ids=full, pixel_values=px, attention_mask=torch.cat([full_mask(ctx), mask], 1)).logits
        torch.testing.assert_close(got[mask.bool()], expected[:, n:][mask.bool()], atol=1e-5, rtol=1e-4)
        prefix = torch.tensor([prefix_ids(bb, "a picture of")] * 2)
        _, eos, pad = bb.special_ids()
        gen = bb.generate(prefix, ctx, full_mask(ctx), num_beams=3, max_length=10, min_length=6)
        full = torch.cat([torch.full((2, n), img), prefix], 1)
        expected_gen = ref.generate(input_ids=full, pixel_values=px, num_beams=3, max_length=n + 10,
                                    min_length=n + 6, do_sample=False, eos_token_id=eos, pad_token_id=pad)[:, n:]
    assert torch.equal(gen, expected_gen) and gen.shape[1] > prefix.shape[1]


def test_question_layout_and_left_padding():
    """``USER: <image>\\n{question} ASSISTANT:`` puts the image tokens where LLaVA-1.5's prompt has them (transformers
    on the same ids gives the same answer logits), and a batch of questions of different lengths (left-padded)
    gives each question's logits alone: positions count valid tokens only."""
    bb = tiny()
    ref = reference(bb)
    questions = ["what colour is the circle?", "how many shapes?"]
    px = pixels(bb)
    ids, mask = bb.decoder_tokenize(["red", "two"], "cpu")
    with torch.no_grad():
        ctx = bb.encode_image(px)
        states, q_mask = bb.encode_question(questions, ctx)
        assert q_mask[1, 0] == 0 and q_mask[:, -1].all()  # left padding
        batch = bb.decode_logits(ids, mask, states, q_mask)
        for i, q in enumerate(questions):
            alone_states, alone_mask = bb.encode_question([q], ctx[i:i + 1])
            alone = bb.decode_logits(ids[i:i + 1], mask[i:i + 1], alone_states, alone_mask)
            torch.testing.assert_close(batch[i:i + 1][mask[i:i + 1].bool()], alone[mask[i:i + 1].bool()],
                                       atol=1e-5, rtol=1e-4)
            n = ctx.shape[1]
            full = tokens(bb, "USER: ") + [ref.config.image_token_id] * n + tokens(bb, f"\n{q} ASSISTANT:")
            full = torch.tensor([full + ids[i][mask[i].bool()].tolist()])
            expected = ref(input_ids=full, pixel_values=px[i:i + 1]).logits[:, -int(mask[i].sum()):]
            torch.testing.assert_close(alone[mask[i:i + 1].bool()], expected[0], atol=1e-5, rtol=1e-4)


def test_points_qasn_on_language_layers_and_merge():
    """Vision points stop at the projector's input layer (-2: 2 of 3 layers); QASN hooks the language model's
    layers (the image tokens' fusion blocks) and moves the logits; merged equals hooked, unmerge is exact."""
    from unitrans.tasks.decoding import full_mask

    built = build(spec([{"name": "vcra.v1", "targets": ["vision.*", "projector.*", "decoder.*"], "rank": 4}],
                       side_network={"name": "qasn.v1"}))
    bb = built.backbone
    names = {p.name for p in bb.injection_points()}
    assert {p.layer for p in bb.injection_points() if p.modality == "V"} == {0, 1}
    assert {"decoder.mlp.gate", "decoder.mlp.fc1", "decoder.mlp.fc2", "projector.fc1", "projector.fc2"} <= names
    assert len(built.side_network.lambda_a) == bb.model.config.text_config.num_hidden_layers
    px = pixels(bb)
    ids, mask = bb.decoder_tokenize(["a red circle", "two squares"], "cpu")
    with torch.no_grad():
        ctx = bb.encode_image(px)
        plain = bb.decode_logits(ids, mask, ctx, full_mask(ctx))
        for p in built.side_network.parameters():
            p.add_(0.5)
        moved = bb.decode_logits(ids, mask, ctx, full_mask(ctx))
    assert (moved - plain).abs().max() > 1e-3
    built.side_network.detach()  # a side network does not merge: drop it, move the adapter off its init
    with torch.no_grad():
        for p in built.adapters[0].parameters():
            p.add_(0.2)
    assert_merge_exact(built, px, ["a red circle", "two squares"])


def test_vcra_pair_spans_vision_and_projector_widths():
    """Vision (64) and projector (64 -> 96, 96 -> 96) share one pair sized (r, 96) / (96, r); each point slices
    it (A[:, :d_in], B[:d_out]); the language model (96) has its own pair."""
    built = build(spec([{"name": "vcra.v1", "targets": ["vision.attn.[qkv]", "projector.*", "decoder.attn.[qkv]"],
                         "rank": 8}]))
    vcra = built.adapters[0]
    assert tuple(vcra.A["shared"].shape) == (8, 96) and tuple(vcra.B["shared"].shape) == (96, 8)
    assert tuple(vcra.A["decoder"].shape) == (8, 96)
    with torch.no_grad():
        for p in vcra.parameters():
            p.add_(0.1)
    fc1 = next(p for p in vcra.points if p.name == "projector.fc1")
    sk = vcra._scaling_of[fc1.id].replace(".", "_")
    expected = vcra.scale["C"] * vcra.lambda_b[sk][:, None] * (
        vcra.B["shared"][:96] @ (vcra.lambda_a[sk][:, None] * vcra.A["shared"][:, :64]))
    x = torch.randn(4, 64)
    with torch.no_grad():
        out = fc1.module(x)
        with built.disabled():
            base = fc1.module(x)
    torch.testing.assert_close(out - base, x @ expected.t(), atol=1e-5, rtol=1e-4)


def test_retrieval_and_mcam_are_refused_by_name():
    with pytest.raises(UserError, match="retrieval.v1 .* needs backbone capability DualEncoder.*MCAM"):
        build({**spec(), "alignment_loss": {"name": "mcam.v1"},
               "task": {"name": "retrieval.v1", "itm_weight": 0, "rerank": "itc"}})

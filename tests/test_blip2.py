"""The BLIP-2 backbone (``blip2.v1``): fidelity to transformers' own BLIP-2 forward passes (ITC, ITM, the language
model's logits and generation), the Q-Former's two token streams, VCRA's shared pair across widths, merging and
refusals. Tiny random-init models only, offline."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_spec
from unitrans.errors import UserError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle above a blue square", "two green triangles", "a small yellow star left of a circle"]


def tiny(task_model: str = "retrieval", preset: str = "tiny", seed: int = 0):
    from unitrans_blip2 import blip2_v1

    torch.manual_seed(seed)
    bb = blip2_v1(preset=preset, task_model=task_model)
    bb.model.eval()
    return bb


def reference(bb):
    """A plain transformers BLIP-2 of the same class with the backbone's weights (no stream views, no hooks)."""
    ref = type(bb.model)(copy.deepcopy(bb.model.config))
    missing, unexpected = ref.load_state_dict(bb.model.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref.eval()


def pixels(bb, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, bb.image_size, bb.image_size, generator=g)


def spec(adapters=(), task_model: str = "retrieval", side_network=None, preset: str = "tiny", task=None) -> dict:
    d = {"seed": 0, "output_dir": "runs/test_blip2", "plugins": ["unitrans_blip2"],
         "backbone": {"name": "blip2.v1", "preset": preset, "task_model": task_model},
         "adapters": [copy.deepcopy(a) for a in adapters],
         "alignment_loss": {"name": "itc.v1"} if task_model == "retrieval" else "none",
         "task": task or ({"name": "retrieval.v1"} if task_model == "retrieval" else {"name": "captioning.v1"}),
         "data": {"name": "shapes_retrieval.v1", "root": "runs/data/shapes"}}
    if side_network is not None:
        d["side_network"] = side_network
    return d


def build(d: dict, seed: int = 0):
    """The spec's components on the CPU, backbone in eval mode (conftest's ``build_spec``, the handle only)."""
    return build_spec(d, seed)[1]


def perturb(module: torch.nn.Module, seed: int = 5) -> None:
    """Move every trainable tensor off its init (λb = 0 makes adapters the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


# ---- fidelity to transformers -------------------------------------------------------------------------------
def test_itc_and_itm_equal_transformers_blip2_retrieval():
    """ITC (the best query's cosine) and ITM (the head averaged over the query outputs) equal
    Blip2ForImageTextRetrieval's own outputs on the same inputs, for every image-text pair."""
    from unitrans.alignment_losses.itc import pair_similarity

    bb = tiny()
    ref = reference(bb)
    px, tok = pixels(bb), bb.tokenize(CAPTIONS, "cpu")
    with torch.no_grad():
        image_feat = bb.image_feat(bb.encode_image(px))  # (3, Q, P)
        assert image_feat.shape == (3, bb.num_queries, bb.model.config.image_text_hidden_size)
        sims = pair_similarity(image_feat, bb.text_feat(bb.encode_text(**tok)))
        expected = ref(pixel_values=px, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                       use_image_text_matching_head=False).logits_per_image
        torch.testing.assert_close(sims, expected, atol=1e-6, rtol=1e-5)
        itm = bb.itm_logits(bb.fuse(tok["input_ids"], tok["attention_mask"], bb.encode_image(px)))
        expected_itm = ref(pixel_values=px, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(itm, expected_itm, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(sims, sims[:, :1])  # the check is not between constants


@pytest.mark.parametrize("preset", ["tiny", "tiny_t5"])
def test_decoder_logits_equal_transformers_blip2_generation(preset):
    """Teacher-forced logits over ``[queries; [bos] text]`` (OPT) or ``decoder([bos] text | queries)`` (T5) equal
    Blip2ForConditionalGeneration's forward with the image tokens as placeholders of its own input."""
    from unitrans.tasks.decoding import full_mask

    bb = tiny("captioning", preset)
    ref = reference(bb)
    image_token = bb.tokenizer.mask_token_id  # a placeholder id the texts never use
    ref.config.image_token_id = image_token
    px = pixels(bb, 2)
    ids, mask = bb.decoder_tokenize(["a picture of a red circle", "a picture of two green squares"], "cpu")
    with torch.no_grad():
        ctx = bb.encode_image(px)
        got = bb.decode_logits(ids, mask, ctx, full_mask(ctx))
        q = bb.num_queries
        placeholders = torch.full((2, q), image_token)
        if preset == "tiny":
            full = torch.cat([placeholders, ids], 1)
            expected = ref(pixel_values=px, input_ids=full, attention_mask=torch.cat([full_mask(ctx), mask], 1)).logits
            expected = expected[:, q:]
        else:
            expected = ref(pixel_values=px, input_ids=placeholders, decoder_input_ids=ids,
                           decoder_attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-4)


def test_generate_equals_transformers_blip2_generate():
    """Beam search from ``[bos] prompt`` after the image gives Blip2ForConditionalGeneration.generate's tokens."""
    from unitrans.tasks.decoding import full_mask, prefix_ids

    bb = tiny("captioning")
    ref = reference(bb)
    image_token = bb.tokenizer.mask_token_id
    ref.config.image_token_id = image_token
    px = pixels(bb, 2)
    prefix = torch.tensor([prefix_ids(bb, "a picture of")] * 2)
    _, eos, pad = bb.special_ids()
    with torch.no_grad():
        ctx = bb.encode_image(px)
        got = bb.generate(prefix, ctx, full_mask(ctx), num_beams=3, max_length=12, min_length=5)
        q = bb.num_queries
        full = torch.cat([torch.full((2, q), image_token), prefix], 1)
        expected = ref.generate(pixel_values=px, input_ids=full, num_beams=3, max_length=q + 12, min_length=q + 5,
                                do_sample=False, eos_token_id=eos, pad_token_id=pad)[:, q:]
    assert torch.equal(got, expected)
    assert got.shape[1] > prefix.shape[1]


def test_questions_of_different_lengths_give_their_own_logits():
    """OPT's positions are learned and absolute: a batch of left-padded questions must count positions over valid
    tokens only, so each question's answer logits equal those it gets alone."""
    bb = tiny("vqa")
    questions = ["what colour is the circle on the left?", "how many?"]
    ids, mask = bb.decoder_tokenize(["red", "two"], "cpu")
    with torch.no_grad():
        ctx = bb.encode_image(pixels(bb, 2))
        states, q_mask = bb.encode_question(questions, ctx)
        assert q_mask[1, 0] == 0 and q_mask[:, -1].all()  # left padding
        batch = bb.decode_logits(ids, mask, states, q_mask)
        for i, question in enumerate(questions):
            alone = bb.decode_logits(ids[i:i + 1], mask[i:i + 1], *bb.encode_question([question], ctx[i:i + 1]))
            valid = mask[i:i + 1].bool()
            torch.testing.assert_close(batch[i:i + 1][valid], alone[valid], atol=1e-5, rtol=1e-4)


# ---- the Q-Former's two streams -------------------------------------------------------------------------------
def test_state_dict_keys_are_transformers_and_streams_are_views():
    bb = tiny()
    ref = reference(bb)
    assert list(bb.model.state_dict()) == list(ref.state_dict())
    split = bb.model.qformer.encoder.layer[0].attention.attention.query
    assert split.queries.weight is split.weight and split.text.weight is split.weight
    assert not list(split.queries.parameters(recurse=False))  # views own nothing


def test_stream_points_act_on_their_tokens_only():
    """An update on ``text.attn.*`` leaves the query pass (image features) bit-identical and changes text
    features; one on ``fusion.self.*`` does the reverse; with ``query_length = n`` the split linear computes
    ``W x + Δ_q x`` on the first n tokens and ``W x + Δ_t x`` on the rest (reference written out here)."""
    px = None
    for target, moved, kept in (("text.attn.*", "text", "image"), ("fusion.self.*", "image", "text")):
        built = build(spec([{"name": "vcra.v1", "targets": [target], "rank": 4}]))
        bb = built.backbone
        px = pixels(bb) if px is None else px
        tok = bb.tokenize(CAPTIONS, "cpu")
        with torch.no_grad():
            before = {"image": bb.image_feat(bb.encode_image(px)), "text": bb.text_feat(bb.encode_text(**tok))}
            perturb(built.trainable)
            after = {"image": bb.image_feat(bb.encode_image(px)), "text": bb.text_feat(bb.encode_text(**tok))}
        assert torch.equal(after[kept], before[kept]), target
        assert (after[moved] - before[moved]).abs().max() > 1e-3, target
    # the split linear against its definition, both streams adapted
    built = build(spec([{"name": "lora.v1", "targets": ["text.attn.q", "fusion.self.q"], "rank": 2, "layers": [0]}]))
    perturb(built.trainable)
    adapter, split = built.adapters[0], built.backbone.model.qformer.encoder.layer[0].attention.attention.query
    by_name = {p.name: p for p in adapter.points}
    x = torch.randn(2, 7, split.in_features)
    built.backbone._streams.query_length = 3
    with torch.no_grad():
        got = split(x)
        base = torch.nn.functional.linear(x, split.weight, split.bias)
        dq = x[:, :3] @ adapter.delta_weight(by_name["fusion.self.q"]).t()
        dt = x[:, 3:] @ adapter.delta_weight(by_name["text.attn.q"]).t()
    torch.testing.assert_close(got, base + torch.cat([dq, dt], 1), atol=1e-6, rtol=1e-5)


def test_merge_refuses_stream_points_and_merges_the_rest():
    built = build(spec([{"name": "vcra.v1", "targets": ["fusion.self.[qkv]"], "rank": 4}]))
    weight = built.backbone.model.qformer.encoder.layer[0].attention.attention.query.weight.clone()
    with pytest.raises(UserError, match=r"cannot merge the update of point fusion\.0\.self\.q: .*one weight"):
        built.merge()
    assert torch.equal(built.backbone.model.qformer.encoder.layer[0].attention.attention.query.weight, weight)
    # the generation model has no text stream: every point merges, merged equals unmerged, unmerge is exact
    built = build(spec([{"name": "vcra.v1", "targets": ["vision.*", "fusion.*", "projector.*", "decoder.*"],
                         "rank": 4}], task_model="captioning"))
    perturb(built.trainable)
    assert_merge_exact(built, pixels(built.backbone, 2), CAPTIONS[:2])


def assert_merge_exact(built, px: torch.Tensor, texts) -> None:
    """Merged adapters give the hooked decoder logits; unmerging restores every frozen tensor bit for bit."""
    from unitrans.tasks.decoding import full_mask

    bb = built.backbone
    frozen = {k: v.clone() for k, v in bb.model.state_dict().items()}
    ids, mask = bb.decoder_tokenize(texts, "cpu")
    logits = []
    with torch.no_grad():
        for step in (lambda: None, built.merge):
            step()
            ctx = bb.encode_image(px)
            logits.append(bb.decode_logits(ids, mask, ctx, full_mask(ctx)))
        built.unmerge()
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, frozen[k]) for k, v in bb.model.state_dict().items())


# ---- VCRA across widths --------------------------------------------------------------------------------------
def test_vcra_shared_pair_serves_points_of_every_width():
    """One pair for ViT (64), Q-Former (48) and the cross-attention k, v (64 -> 48), sized to the widest point;
    a point of width (d_out, d_in) uses B[:d_out] and A[:, :d_in]: its linear's output moves by exactly
    ``s · diag(λb) B[:d_out] diag(λa) A[:, :d_in] x``. The decoder (OPT, 96) has its own pair."""
    targets = ["vision.attn.[qkv]", "fusion.self.[qkv]", "fusion.attn.[qkv]", "text.attn.[qkv]", "decoder.attn.[qkv]"]
    built = build(spec([{"name": "vcra.v1", "targets": targets[:4], "rank": 8}]))
    vcra = built.adapters[0]
    assert tuple(vcra.A["shared"].shape) == (8, 64) and tuple(vcra.B["shared"].shape) == (64, 8)
    perturb(built.trainable)
    widths = {(p.out_features, p.in_features) for p in vcra.points}
    assert {(64, 64), (48, 48), (48, 64)} <= widths
    for p in vcra.points:
        if p.layer != 1:
            continue
        a, b = vcra.A["shared"], vcra.B["shared"]
        sk = vcra._scaling_of[p.id].replace(".", "_")
        expected = vcra.scale[p.modality] * vcra.lambda_b[sk][:, None] * (
            b[: p.out_features] @ (vcra.lambda_a[sk][:, None] * a[:, : p.in_features]))
        torch.testing.assert_close(vcra.delta_weight(p), expected)
        x = torch.randn(3, p.in_features)
        with torch.no_grad():
            out = p.module(x)
            with built.disabled():
                base = p.module(x)
        sl = p.out_slice or slice(0, p.module.out_features)
        torch.testing.assert_close(out[:, sl] - base[:, sl], x @ expected.t(), atol=1e-5, rtol=1e-4)
    gen = build(spec([{"name": "vcra.v1", "targets": ["vision.attn.[qkv]", "fusion.attn.[qkv]", "decoder.attn.[qkv]"],
                       "rank": 8}], task_model="captioning")).adapters[0]
    assert tuple(gen.A["decoder"].shape) == (8, 96) and tuple(gen.A["shared"].shape) == (8, 64)


# ---- capabilities, side network, refusals ---------------------------------------------------------------------
def test_adapters_are_the_identity_at_init_and_qasn_acts_on_image_calls_only():
    bb = tiny()
    px, tok = pixels(bb), bb.tokenize(CAPTIONS, "cpu")
    with torch.no_grad():
        plain = (bb.image_feat(bb.encode_image(px)), bb.text_feat(bb.encode_text(**tok)))
    built = build(spec([{"name": "vcra.v1", "targets": ["vision.*", "fusion.*", "text.*"], "rank": 4}],
                       side_network={"name": "qasn.v1"}))
    bb2 = built.backbone
    with torch.no_grad():
        assert torch.equal(bb2.image_feat(bb2.encode_image(px)), plain[0])
        assert torch.equal(bb2.text_feat(bb2.encode_text(**tok)), plain[1])
        with torch.no_grad():
            for p in built.side_network.parameters():
                p.add_(0.5)
        moved = bb2.image_feat(bb2.encode_image(px))
        text = bb2.text_feat(bb2.encode_text(**tok))
    assert (moved - plain[0]).abs().max() > 1e-3  # QASN on the query pass (reads the image)
    assert torch.equal(text, plain[1])  # the text pass does not read the image: QASN is silent
    assert len(built.side_network.lambda_a) == bb2.model.config.qformer_config.num_hidden_layers


def test_refusals_name_what_is_missing():
    from unitrans_blip2 import blip2_v1

    with pytest.raises(UserError, match="set exactly one of `preset`"):
        blip2_v1(task_model="retrieval")
    with pytest.raises(UserError, match="captioning.v1 needs backbone capability EncoderDecoder.*"
                                        'task_model = "captioning"'):
        build(spec(task={"name": "captioning.v1"}))
    with pytest.raises(UserError, match=r"target\(s\) 'text\.mlp\.\*' match no injection point"):
        build(spec([{"name": "vcra.v1", "targets": ["text.mlp.*"]}], task_model="captioning"))
    with pytest.raises(UserError, match="random_init needs the architecture of 'acme/blip2-x'"):
        blip2_v1(pretrained="acme/blip2-x", random_init=True)

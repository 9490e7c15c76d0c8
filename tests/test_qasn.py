"""QASN (eq. 5-6) against a hand-run loop over the fusion blocks; identity at init; what trains; refusals."""

from __future__ import annotations

import pytest
import torch

from conftest import build_spec, make_inputs, randomise_, retrieval_forward, spec_dict, tiny_backbone
from unitrans.errors import UserError
from unitrans.interfaces import Backbone

pytestmark = pytest.mark.usefixtures("one_thread")

VCRA = {"name": "vcra.v1", "targets": ["vision.attn.*", "text.attn.*", "fusion.attn.*"], "rank": 8}


def _itm(bb, pixel, tok):
    return retrieval_forward(bb, pixel, tok)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_gate_and_centred_modes_are_the_identity_at_init_and_literal_mode_is_not(with_adapter):
    adapters = [VCRA] if with_adapter else []
    bb = tiny_backbone()
    pixel, tok = make_inputs(bb, batch=3)
    with torch.no_grad():
        frozen = _itm(bb, pixel, tok)
    _, gate = build_spec(spec_dict(adapters, {"name": "qasn.v1", "filter": "gate"}))
    _, literal = build_spec(spec_dict(adapters, {"name": "qasn.v1", "filter": "literal"}))
    _, centred = build_spec(spec_dict(adapters, {"name": "qasn.v1", "filter": "centred"}))
    for built in (gate, literal, centred):  # same seed: the same frozen weights as `bb`
        for (n, p), (_, q) in zip(built.backbone.model.named_parameters(), bb.model.named_parameters()):
            assert torch.equal(p, q), n
    with torch.no_grad():
        out_gate = _itm(gate.backbone, pixel, tok)
        out_literal = _itm(literal.backbone, pixel, tok)
        out_centred = _itm(centred.backbone, pixel, tok)
    for k in frozen:
        assert torch.equal(out_gate[k], frozen[k]), k
        assert torch.equal(out_centred[k], frozen[k]), k
    assert not torch.allclose(out_literal["itm"], frozen["itm"], atol=1e-4)
    assert not torch.allclose(out_literal["fused"], frozen["fused"], atol=1e-2)
    # literal mode leaves the unimodal features alone
    assert torch.equal(out_literal["text_feat"], frozen["text_feat"])
    assert torch.equal(out_literal["image_feat"], frozen["image_feat"])


def test_only_side_network_and_adapter_parameters_train_and_a_step_changes_itm():
    _, built = build_spec(spec_dict([VCRA], {"name": "qasn.v1"}))
    bb, side = built.backbone, built.side_network
    assert side.uses_shared_pair
    pixel, tok = make_inputs(bb, batch=3)
    params = dict(built.trainable.named_parameters())
    assert any(n.startswith("side_network.") for n in params) and any(n.startswith("adapters.") for n in params)
    opt = torch.optim.SGD(params.values(), lr=1.0)
    with torch.no_grad():
        itm0 = _itm(bb, pixel, tok)["itm"]
    for _ in range(2):
        opt.zero_grad()
        out = _itm(bb, pixel, tok)
        loss = torch.nn.functional.cross_entropy(out["itm"], torch.tensor([1, 0, 1]))
        loss.backward()
        for n, p in bb.model.named_parameters():
            assert p.grad is None, n
        for n, p in params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        qasn_lb = [p.grad for n, p in params.items() if n.startswith("side_network.lambda_b")]
        assert all(torch.count_nonzero(gr) > 0 for gr in qasn_lb)
        opt.step()
    with torch.no_grad():
        itm2 = _itm(bb, pixel, tok)["itm"]
    assert not torch.allclose(itm0, itm2, atol=1e-4)


def _randomise_qasn_(side, seed=0):
    randomise_(side.lambda_a, seed=seed, std=0.8, mean=0.5)
    randomise_(side.lambda_b, seed=seed + 1, std=0.8)
    randomise_(side.alpha, seed=seed + 2, std=0.8, mean=1.0)
    randomise_(side.beta, seed=seed + 3, std=0.8)


@pytest.mark.parametrize("filter_", ["gate", "literal", "centred"])
@pytest.mark.parametrize("projections", ["shared", "own"])
def test_hooked_forward_equals_a_hand_run_loop_of_eq_5_6(filter_, projections):
    _, built = build_spec(spec_dict([VCRA], {"name": "qasn.v1", "filter": filter_, "projections": projections,
                                            "rank": 6}))
    bb, side, vcra = built.backbone, built.side_network, built.adapters[0]
    randomise_(vcra.lambda_b.values(), seed=20, std=0.3)  # the adapter acts too, identically in both paths
    _randomise_qasn_(side, seed=30)
    if projections == "shared":
        a, b = vcra.pair("shared")  # the paper reuses the fusion pair of VCRA
        assert side._pair[0] is a and side._pair[1] is b
    else:
        a, b = side._pair
        assert a.shape == (6, 64) and b.shape == (64, 6) and not a.requires_grad
    pixel, tok = make_inputs(bb, batch=2)
    encoder = bb.model.text_encoder
    ids = tok["input_ids"].clone()
    ids[:, 0] = bb.enc_token_id
    with torch.no_grad():
        image_embeds = bb.encode_image(pixel)
        hooked = encoder(input_ids=ids, encoder_hidden_states=image_embeds).last_hidden_state
        side.detach()  # from here the blocks run bare; eq. 5-6 by hand
        d = bb.fusion_width()
        x = encoder.embeddings(input_ids=ids)  # x_0 (B, L, d)
        h = torch.zeros_like(x)  # h_0 = 0
        for i, block in enumerate(encoder.encoder.layer):
            w = torch.diag(side.lambda_b[i]) @ b[:d] @ torch.diag(side.lambda_a[i]) @ a[:, :d]  # w_i (d, d)
            h = h + x @ w.t()  # eq. 5
            gate = torch.sigmoid(side.alpha[i] * h + side.beta[i])
            f = {"gate": gate * h, "literal": gate, "centred": gate - 0.5}[filter_]
            x = block(x, image_embeds) + f  # eq. 6
        reference = x
        bare = encoder(input_ids=ids, encoder_hidden_states=image_embeds).last_hidden_state
    assert not torch.allclose(bare, reference, atol=1e-3)
    torch.testing.assert_close(hooked, reference, atol=1e-5, rtol=1e-5)


def test_unimodal_text_pass_is_unchanged():
    _, built = build_spec(spec_dict([], {"name": "qasn.v1", "filter": "literal"}))
    bb, side = built.backbone, built.side_network
    _randomise_qasn_(side, seed=1)
    pixel, tok = make_inputs(bb, batch=3)
    with torch.no_grad():
        fused = bb.fuse(tok["input_ids"], tok["attention_mask"], bb.encode_image(pixel))  # leaves h, x behind
        text = bb.encode_text(tok["input_ids"], tok["attention_mask"])
        side.detach()
        text_bare = bb.encode_text(tok["input_ids"], tok["attention_mask"])
        fused_bare = bb.fuse(tok["input_ids"], tok["attention_mask"], bb.encode_image(pixel))
    assert torch.equal(text, text_bare)
    assert not torch.allclose(fused, fused_bare, atol=1e-3)


class _NoFusion(Backbone):
    name = "testonly.nofusion"
    contract_version = "2"

    def injection_points(self):
        return []

    def declared_points(self):
        return ["vision.attn.*"]

    def trainable_parameters(self):
        return {}


def test_backbone_without_fusion_blocks_is_refused():
    from unitrans.engine.build import attach_side_network
    from unitrans.side_networks import qasn_v1

    with pytest.raises(UserError, match=r"qasn.v1 needs backbone capability FusionNetwork \(fusion_blocks, "
                                        r"fusion_width\); backbone testonly.nofusion implements: none of them\. "
                                        r"Side networks hook injection point 'fusion\.blocks'"):
        attach_side_network(_NoFusion(), "qasn.v1", qasn_v1(), [])
    # through the spec: BLIP's captioning model has a decoder but no text encoder to fuse in
    d = spec_dict([{"name": "lora.v1", "targets": ["vision.attn.q"]}], {"name": "qasn.v1"},
                  {"task_model": "captioning"})
    with pytest.raises(UserError, match=r"fusion\.blocks"):
        build_spec(d)

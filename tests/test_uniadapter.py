"""UniAdapter (uniadapter.v1) against its BLIP code written out by hand: one ViT layer and one BERT layer in the
text-only and the fused pass (the query residual), the decoder's layers; the init; the parameter count's closed
form; frame-aware attention; gradients (with gradient checkpointing too); merge and export refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import (CAPTIONS, adapted_and_frozen, build_spec, make_inputs, randomise_, retrieval_forward,
                      spec_dict, tiny_backbone)
from unitrans.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _built(rank=8, backbone_extra=None, **options):
    d = spec_dict([{"name": "uniadapter.v1", "rank": rank, **options}], backbone_extra=backbone_extra)
    return build_spec(d)[1]


def _adapter_by_hand(x, module, branch, scale=0.1):
    """UniAdapter.forward (models/adapter.py, layer norm "in", add_residual=False) with the module's tensors."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), module.ln.weight, module.ln.bias, 1e-5)
    h = torch.relu(h @ module.down.weight.t() + module.down.bias)
    up = {b: h @ lin.weight.t() + lin.bias for b, lin in module.up.items()}
    if branch == "multimodal":
        out = F.layer_norm(up["C"] + up["T"], (d,), module.ln_cross.weight, module.ln_cross.bias, 1e-5)
    else:
        out = up["V" if branch == "visual" else "T"]
    return out * scale


def _bert_output_by_hand(layer, attention_output):
    """BertOutput(BertIntermediate(a), a) with no hook on the path: LayerNorm(dense(gelu(dense(a))) + a)."""
    inter = layer.intermediate(attention_output)
    out = layer.output
    return out.LayerNorm(F.linear(inter, out.dense.weight, out.dense.bias) + attention_output)


def test_a_vit_layer_equals_uniadapters_block_written_out():
    """vit.py Block.forward: x = x + attn(norm1(x)); x = x + (mlp(norm2(x)) + adapter(x, mode='visual'))."""
    built = _built()
    randomise_(built.trainable_parameters(), seed=1, std=0.3)
    layer = built.backbone.model.vision_model.encoder.layers[1]
    randomise_([layer.layer_norm2.weight], seed=10, std=0.3, mean=1.0)  # a trained norm2, as BLIP's: the adapter
    randomise_([layer.layer_norm2.bias], seed=11, std=0.3)  # must read its input, not its output
    module = built.adapters[0].layer["1"]
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = x + layer.self_attn(hidden_states=layer.layer_norm1(x))[0]
        mlp = layer.mlp
        hidden = mlp.activation_fn(F.linear(layer.layer_norm2(y), mlp.fc1.weight, mlp.fc1.bias))
        expected = y + (F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias) + _adapter_by_hand(y, module, "visual"))
        got = layer(x)
    assert _adapter_by_hand(y, module, "visual").abs().max() > 1e-2  # the adapter's share is not negligible
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _bert_layer_check(layer, module, image_tokens, text_pass: bool):
    """med.py BertLayer.forward, by hand, against the hooked layer: the fused pass, and the text-only pass when
    ``text_pass``."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        a = layer.attention(x)[0]
        # text mode: layer_output + adapter(attention_output)
        text_expected = _bert_output_by_hand(layer, a) + _adapter_by_hand(a, module, "text")
        # multimodal mode: adapt_x = adapter(self-attention output) (query residual), cross-attention, then
        # layer_output + adapt_x + adapter(cross-attention output, mode='multimodal')
        c = layer.crossattention(a, encoder_hidden_states=image_tokens)[0]
        fused_expected = (_bert_output_by_hand(layer, c) + _adapter_by_hand(a, module, "text")
                          + _adapter_by_hand(c, module, "multimodal"))
        fused = layer(x, image_tokens)
        text = layer(x) if text_pass else None
    assert (fused_expected - _bert_output_by_hand(layer, c)).abs().max() > 1e-2
    torch.testing.assert_close(fused, fused_expected, atol=1e-5, rtol=0)
    if text_pass:
        assert (text_expected - _bert_output_by_hand(layer, a)).abs().max() > 1e-2
        torch.testing.assert_close(text, text_expected, atol=1e-5, rtol=0)


def test_a_bert_layer_equals_uniadapters_layer_written_out_in_both_passes():
    built = _built()
    randomise_(built.trainable_parameters(), seed=4, std=0.3)
    layer = built.backbone.model.text_encoder.encoder.layer[0]
    image_tokens = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    _bert_layer_check(layer, built.adapters[0].layer["0"], image_tokens, text_pass=True)


def test_the_decoders_layers_take_the_query_residual_and_the_cross_modal_branch():
    """Captioning BLIP (vision + decoder): decoder layer i shares adapter i with vision layer i (UniAdapter's VQA
    model hands the encoder's adapters to its decoder)."""
    from unitrans.adapters import uniadapter_v1
    from unitrans.engine.build import attach_adapters

    bb = tiny_backbone(task_model="captioning")
    adapter = uniadapter_v1(rank=8)
    attach_adapters(bb, [("uniadapter.v1", adapter)])
    assert sorted({p.name for p in adapter.points}) == ["decoder.ffn", "decoder.query", "vision.ffn"]
    assert sorted(adapter.layer["1"].up) == ["C", "T", "V"]
    randomise_(adapter.parameters(), seed=6, std=0.3)
    layer = bb.model.text_decoder.bert.encoder.layer[1]
    image_tokens = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(7))
    _bert_layer_check(layer, adapter.layer["1"], image_tokens, text_pass=False)


def test_a_hub_that_skips_points_not_acting_now_gives_the_same_outputs(monkeypatch):
    """A hub that runs only the entries whose point acts in the current pass (``acts_now()``, as pass-dependent
    points need) must still run BERT's ``output`` entry in the fused pass, where its first point (``text.ffn``) does
    not act but ``fusion.ffn`` and ``fusion.query`` do."""
    from unitrans import injection

    def outputs():
        built = _built()
        randomise_(built.trainable_parameters(), seed=12, std=0.3)
        pixel, tok = make_inputs(built.backbone, batch=2)
        with torch.no_grad():
            return retrieval_forward(built.backbone, pixel, tok)

    plain = outputs()
    hook = injection._LinearHub._hook

    def skipping(self, module, args, output):
        every = self.entries
        self.entries = [e for e in every if getattr(e[1], "acts_now", lambda: True)()]
        try:
            return hook(self, module, args, output)
        finally:
            self.entries = every

    monkeypatch.setattr(injection._LinearHub, "_hook", skipping)
    for k, v in outputs().items():
        torch.testing.assert_close(v, plain[k], atol=0, rtol=0, msg=k)


def test_init_zero_is_the_identity_and_init_uniadapter_is_its_scripts():
    zero = _built(init="zero")
    pixel, tok = make_inputs(zero.backbone, batch=2)
    adapted, frozen = adapted_and_frozen(zero, pixel, tok)
    for k in frozen:
        assert torch.equal(adapted[k], frozen[k]), k
    torch.manual_seed(0)
    published = _built(rank=256)
    module = published.adapters[0].layer["0"]
    assert torch.count_nonzero(module.up["T"].weight) == 0 and torch.count_nonzero(module.down.bias) == 0
    bound = 1 / 64 ** 0.5  # kaiming_uniform_(a=√5) on (r, d): U(-1/√d, 1/√d)
    assert module.down.weight.abs().max() <= bound and module.down.weight.abs().max() > 0.9 * bound
    for branch in ("V", "C"):
        assert abs(module.up[branch].weight.std().item() - 0.02) < 0.002, branch
        assert torch.count_nonzero(module.up[branch].bias) == 0
    adapted, frozen = adapted_and_frozen(published, pixel, tok)  # the text-only pass: the zero text up-projection
    assert torch.equal(adapted["text_feat"], frozen["text_feat"])
    assert (adapted["image_feat"] - frozen["image_feat"]).abs().max() > 1e-4
    assert (adapted["fused"] - frozen["fused"]).abs().max() > 1e-2


def test_parameter_count_is_the_closed_form_and_widths_that_differ_get_their_own_module():
    """Per module with every branch: 4·d·r + r + 3·d (down, three up-projections, biases) + 4·d (two LayerNorms)."""
    r, d = 8, 64
    counts = _built(rank=r).parameter_counts()
    assert counts["trainable"] == 2 * (4 * d * r + r + 7 * d) == 5008
    # the down-projection, input LayerNorm and text up-projection serve T and C; up_V the vision; up_C, LN_cross C
    assert counts["by_modality"] == {"shared": 2 * (2 * d + 2 * (d * r) + r + d), "V": 2 * (d * r + d),
                                     "C": 2 * (d * r + d + 2 * d)}
    bb = tiny_backbone(vision_width=48)
    from unitrans.adapters import uniadapter_v1
    from unitrans.engine.build import attach_adapters

    adapter = uniadapter_v1(rank=r)
    attach_adapters(bb, [("uniadapter.v1", adapter)])
    assert sorted(adapter.layer) == ["0", "0_64", "1", "1_64"]  # vision (48 wide) first, then text
    vision = 2 * 48 + 48 * r + r + r * 48 + 48
    text = 2 * d + d * r + r + 2 * (r * d + d) + 2 * d  # T and C up-projections, no V
    assert sum(p.numel() for p in adapter.parameters()) == 2 * (vision + text)


def test_gradients_reach_every_used_tensor_and_equal_under_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        built = _built(backbone_extra={"gradient_checkpointing": checkpointing})
        randomise_(built.trainable_parameters(), seed=8, std=0.3)
        built.train()
        g = torch.Generator().manual_seed(0)
        bb = built.backbone
        batch = {"image": torch.randn(3, 3, bb.image_size, bb.image_size, generator=g), "caption": CAPTIONS[:3],
                 "image_id": torch.tensor([0, 1, 2])}
        torch.manual_seed(0)  # the ITM negatives
        sum(built.task.training_step(bb, batch, built.alignment).values()).backward()
        assert all(p.grad is None for p in bb.model.parameters())
        state = built.trainable_state()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in state.values()), \
            [k for k, p in state.items() if p.grad is None or p.grad.abs().sum() == 0]
        grads.append({k: p.grad.clone() for k, p in state.items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5, msg=k)


def test_merge_and_export_are_refused_and_disabled_still_works(tmp_path):
    from unitrans.engine.export import export_merged

    built = _built(init="zero")
    with pytest.raises(UserError, match="cannot be merged"):
        built.merge()
    with pytest.raises(UserError, match="cannot be merged"):
        export_merged(built, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    built.detach()
    watch = {h.id for h in getattr(built.backbone, "letter_watch", None).handles}  # the tiny preset's, not ours
    hooks = [m for m in built.backbone.model.modules()
             if set(m._forward_pre_hooks) - watch or m._forward_hooks]
    assert hooks == []  # the recorders' pre-hooks go with the adapter


def test_frame_aware_attention_scales_each_frames_keys_by_its_text_similarity():
    """models/med.py BertSelfAttention: key[:, :, t, 1:] *= T · softmax_t(sim(text, frame_t) / 4), sim with no
    gradient; frame features are the ITC features of each frame's [CLS] (BLIP's vision_proj), here taken from the
    frames encoded one by one (frame 0's [CLS] is not in the video's token layout)."""
    built = _built(init="zero", frame_aware_attention=True)
    bb = built.backbone
    g = torch.Generator().manual_seed(9)
    video = torch.randn(2, 3, 3, bb.image_size, bb.image_size, generator=g)  # (B, T, 3, H, W)
    tok = bb.tokenize(CAPTIONS[:2], "cpu")
    key = bb.model.text_encoder.encoder.layer[1].crossattention.self.key
    seen = []
    handle = key.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))  # after the adapter's hook
    with torch.no_grad():
        tokens = bb.encode_image(video)  # (2, 3 * N, D)
        bb.fuse(tok["input_ids"], tok["attention_mask"], tokens)
        frames = bb.encode_image(video.flatten(0, 1))[:, 0]  # (6, D): each frame's own [CLS]
        frame_feat = F.normalize(bb.model.vision_proj(frames), dim=-1).view(2, 3, -1)
        text_feat = bb.text_feat(bb.encode_text(tok["input_ids"], tok["attention_mask"]))
        w = 3 * torch.softmax(torch.einsum("bp,btp->bt", text_feat, frame_feat) / 4.0, dim=1)  # (2, 3)
        x, out = seen[-1]
        plain = F.linear(x, key.weight, key.bias).view(2, 3, -1, key.out_features)
        expected = plain.clone()
        expected[:, :, 1:] *= w[:, :, None, None]
        bb.fuse(tok["input_ids"], tok["attention_mask"], bb.encode_image(video[:, 0]))  # images: unchanged keys
        x1, out1 = seen[-1]
    handle.remove()
    assert (w - 1).abs().max() > 1e-3
    torch.testing.assert_close(out, expected.view_as(out), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1, F.linear(x1, key.weight, key.bias), atol=0, rtol=0)


def test_the_export_command_refuses_it_in_one_line(tmp_path, capsys):
    from unitrans import cli
    from unitrans.engine.build import build
    from unitrans.engine.checkpoint import save_adapter
    from unitrans.spec import load_spec

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(f"""
output_dir = "{tmp_path / 'run'}"
backbone = {{name = "blip.v1", preset = "tiny"}}
adapters = [{{name = "uniadapter.v1", rank = 8}}]
task = {{name = "retrieval.v1"}}
data = {{name = "shapes_retrieval.v1", root = "{tmp_path / 'data'}"}}
""")
    spec = load_spec(spec_path)
    torch.manual_seed(spec.seed)
    save_adapter(build(spec, "cpu", with_data=False), spec, tmp_path / "run")
    code = cli.main(["export", str(spec_path), "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "uniadapter.v1 is a bottleneck network with a ReLU" in err and "Traceback" not in err
    assert not (tmp_path / "x" / "config.json").exists()


UNIADAPTER = ("--set", 'adapters=[{name = "uniadapter.v1", rank = 8}]')


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    """A run resumed from its step-3 checkpoint (the later ones removed, as after a kill) ends with the adapter of
    the uninterrupted run, bit for bit."""
    import json
    import shutil

    from test_training_faults import _adapter, _args
    from unitrans import cli

    extra = (*UNIADAPTER, "--set", "train.max_steps=6", "--set", "train.checkpoint_every=3",
             "--set", "train.keep_last=3")
    assert cli.main(_args(tmp_path, "full", *extra)) == 0
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "cut" / "checkpoints")
    checkpoints = tmp_path / "cut" / "checkpoints"
    for later in [p for p in checkpoints.glob("step_*") if p.name != "step_00000003"]:
        shutil.rmtree(later)
    assert (checkpoints / "step_00000003" / "COMPLETE").is_file()
    (checkpoints / "latest").write_text("step_00000003")
    assert cli.main([*_args(tmp_path, "cut", *extra), "--resume"]) == 0
    logged = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logged and min(logged) > 3  # it resumed: steps 1 to 3 were not trained again
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert full.keys() == resumed.keys() and any(".up.C." in k for k in full)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """As tests/test_training_faults.py checks it for VCRA: same global batches, DDP averaging, ITM off."""
    from test_training_faults import _adapter, _args, _run_subprocess
    from unitrans import cli

    extra = (*UNIADAPTER, "--set", "train.max_steps=4", "--set", "task.itm_weight=0", "--set", "task.rerank=itc")
    assert cli.main(_args(tmp_path, "one", *extra)) == 0
    _run_subprocess([*_args(tmp_path, "two", *extra), "--nproc-per-node", "2"])
    one, two = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-4, msg=k)


def test_frame_similarities_are_asked_per_backbone_and_refused_without_itc_projections():
    """The request lives on the backbone the adapter is attached to: another backbone computes nothing. The VQA model
    has no ITC projections, so frame-aware attention on it is refused by name, and detaching withdraws the request."""
    from unitrans.adapters import uniadapter_v1
    from unitrans.engine.build import attach_adapters

    _built(init="zero", frame_aware_attention=True)  # attached to another backbone, never detached
    vqa = tiny_backbone(task_model="vqa")
    video = torch.randn(1, 2, 3, vqa.image_size, vqa.image_size, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        tokens = vqa.encode_image(video)
        vqa.encode_question(["what colour is the circle"], tokens)
        adapter = uniadapter_v1(rank=8, init="zero", frame_aware_attention=True)
        attach_adapters(vqa, [("uniadapter.v1", adapter)])
        with pytest.raises(UserError, match="ITC projections"):
            vqa.encode_question(["what colour is the circle"], tokens)
        adapter.detach()
        vqa.encode_question(["what colour is the circle"], tokens)

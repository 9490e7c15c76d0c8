"""The CLIP backbone (``clip.v1``, open_clip): attention replacement, injection points, adapters on both towers,
refusals that name CLIP's points, and one end-to-end run. Tiny random-init CLIP only, offline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from unitrans import cli
from unitrans.errors import UserError

open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle above a blue square", "two green triangles!", "a small yellow star left of a circle"]
QKV = ["vision.attn.[qkv]", "text.attn.[qkv]"]


def tiny_clip(seed: int = 0, **kwargs):
    from unitrans_clip.backbone import ClipBackbone

    torch.manual_seed(seed)
    bb = ClipBackbone(preset="tiny", **kwargs)
    bb.model.eval()
    return bb


def reference_clip(bb):
    """An untouched open_clip CLIP (its own nn.MultiheadAttention) with the backbone's weights."""
    from unitrans_clip.backbone import PRESETS

    ref = open_clip.CLIP(**copy.deepcopy(PRESETS["tiny"]))
    ref.load_state_dict(bb.model.state_dict())
    return ref.eval()


def clip_spec(adapters=(), side_network=None, task=None) -> dict:
    d = {
        "seed": 0,
        "output_dir": "runs/test_clip",
        "backbone": {"name": "clip.v1", "preset": "tiny"},
        "adapters": [copy.deepcopy(a) for a in adapters],
        "alignment_loss": {"name": "itc.v1"},
        "task": task or {"name": "retrieval.v1", "itm_weight": 0, "rerank": "itc"},
        "data": {"name": "shapes_retrieval.v1", "root": "runs/data/shapes"},
    }
    if side_network is not None:
        d["side_network"] = side_network
    return d


def build_clip(d: dict, seed: int = 0):
    from unitrans.engine.build import build
    from unitrans.spec import validate_dict

    torch.manual_seed(seed)
    built = build(validate_dict(d), "cpu", with_data=False)
    built.backbone.model.eval()
    return built


def inputs(bb, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, bb.image_size, bb.image_size, generator=g)
    return pixels, bb.tokenize(CAPTIONS[:batch], "cpu")


def features(bb, pixels, tok) -> tuple[torch.Tensor, torch.Tensor]:
    return bb.image_feat(bb.encode_image(pixels)), bb.text_feat(bb.encode_text(**tok))


# ---- the attention replacement ----------------------------------------------------------------------------------
def _masks(kind: str, batch: int, heads: int, n: int):
    causal = torch.full((n, n), float("-inf")).triu_(1)
    if kind == "none":
        return {}
    if kind == "causal":  # what open_clip's text tower passes
        return {"attn_mask": causal}
    if kind == "bool":
        return {"attn_mask": torch.ones(n, n, dtype=torch.bool).triu_(1)}
    if kind == "per_head":
        g = torch.Generator().manual_seed(3)
        return {"attn_mask": torch.randn(batch * heads, n, n, generator=g)}
    if kind == "padding":
        pad = torch.zeros(batch, n, dtype=torch.bool)
        pad[0, -2:] = True
        return {"attn_mask": torch.ones(n, n, dtype=torch.bool).triu_(1), "key_padding_mask": pad}
    raise ValueError(kind)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "per_head", "padding"])
@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_linear_self_attention_equals_multihead_attention(batch_first, mask, mode):
    from unitrans_clip.backbone import LinearSelfAttention

    torch.manual_seed(0)
    b, n, d, h = 2, 7, 32, 4
    mha = nn.MultiheadAttention(d, h, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    ours = LinearSelfAttention(mha)
    x = torch.randn(b, n, d) if batch_first else torch.randn(n, b, d)
    kw = _masks(mask, b, h, n)
    for m in (mha, ours):
        m.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        expected = mha(x, x, x, need_weights=False, **kw)[0]
        got, weights = ours(x, x, x, need_weights=False, **kw)
    assert weights is None and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # the very same tensors, nothing copied: a state dict of the block is the original module's
    assert ours.in_proj_weight is mha.in_proj_weight and ours.qkv.weight is mha.in_proj_weight
    assert ours.in_proj_bias is mha.in_proj_bias and ours.out_proj is mha.out_proj
    assert set(ours.state_dict()) == set(mha.state_dict())


def test_linear_self_attention_gradients_reach_the_shared_parameters():
    from unitrans_clip.backbone import LinearSelfAttention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    ours = LinearSelfAttention(copy.deepcopy(mha))
    x = torch.randn(2, 5, 16)
    mha(x, x, x, need_weights=False)[0].square().sum().backward()
    ours(x, x, x)[0].square().sum().backward()
    torch.testing.assert_close(ours.in_proj_weight.grad, mha.in_proj_weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.out_proj.weight.grad, mha.out_proj.weight.grad, atol=1e-5, rtol=1e-5)


def test_linear_self_attention_refuses_cross_attention():
    from unitrans_clip.backbone import LinearSelfAttention

    ours = LinearSelfAttention(nn.MultiheadAttention(8, 2, batch_first=True))
    x, y = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="self-attention"):
        ours(x, y, y)


def test_tiny_clip_equals_open_clip_and_keeps_its_state_dict():
    bb = tiny_clip()
    ref = reference_clip(bb)
    assert list(bb.model.state_dict()) == list(ref.state_dict())  # same keys, same order
    for blocks in (bb.model.visual.transformer.resblocks, bb.model.transformer.resblocks):
        for block in blocks:
            assert isinstance(block.attn.qkv, nn.Linear) and block.attn.qkv.weight is block.attn.in_proj_weight
    pixels, tok = inputs(bb)
    with torch.no_grad():
        image_feat, text_feat = features(bb, pixels, tok)
        full_ids = bb.tokenizer(CAPTIONS)  # padded to the context length, as open_clip's own encode_text needs
        torch.testing.assert_close(image_feat, ref.encode_image(pixels, normalize=True), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(text_feat, ref.encode_text(full_ids, normalize=True), atol=1e-6, rtol=1e-5)


def test_tokenize_is_offline_bpe_cut_to_the_longest_caption():
    bb = tiny_clip()
    tok = bb.tokenize(CAPTIONS, "cpu")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    sot, eot = bb.tokenizer.sot_token_id, bb.tokenizer.eot_token_id
    assert (ids[:, 0] == sot).all()
    lengths = mask.sum(1)
    assert ids.shape[1] == int(lengths.max()) < bb.context_length
    assert all(ids[i, lengths[i] - 1] == eot for i in range(len(CAPTIONS)))
    assert (ids[mask == 0] == 0).all()
    bb.model.attn_mask = None  # a bidirectional text tower (CLIPA): padding is attended, so nothing is cut
    assert bb.tokenize(CAPTIONS, "cpu")["input_ids"].shape == (3, bb.context_length)


# ---- injection points --------------------------------------------------------------------------------------------
def test_injection_points_vocabulary():
    bb = tiny_clip()
    points = bb.injection_points()
    assert bb.declared_points() == ["text.attn.*", "text.mlp.*", "vision.attn.*", "vision.mlp.*"]
    names = {p.name for p in points}
    assert names == {f"{t}.{r}" for t in ("vision", "text")
                     for r in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2")}
    assert {p.modality for p in points if p.name.startswith("vision")} == {"V"}
    assert {p.modality for p in points if p.name.startswith("text")} == {"T"}
    assert len(points) == 2 * 2 * 6  # towers x layers x points
    block = bb.model.visual.transformer.resblocks[1]
    q, k, v = (next(p for p in points if p.id == f"vision.1.attn.{r}") for r in "qkv")
    assert q.module is k.module is v.module is block.attn.qkv
    assert (q.out_slice, k.out_slice, v.out_slice) == (slice(0, 64), slice(64, 128), slice(128, 192))
    assert q.input_group == k.input_group == v.input_group and q.attention == v.attention == "vision.1.attn"
    fc1 = next(p for p in points if p.id == "text.0.mlp.fc1")
    assert fc1.module is bb.model.transformer.resblocks[0].mlp.c_fc and (fc1.in_features, fc1.out_features) == (64, 128)
    from unitrans.interfaces import DualEncoder, capability_names

    assert isinstance(bb, DualEncoder) and capability_names(bb) == ["DualEncoder"]  # no fusion network, no ITM


# ---- adapters on both towers ---------------------------------------------------------------------------------------
ADAPTERS = {
    "vcra": {"name": "vcra.v1", "targets": QKV + ["*.mlp.*", "*.attn.out"], "rank": 8},
    "lora": {"name": "lora.v1", "targets": QKV + ["*.mlp.*", "*.attn.out"], "rank": 4},
}


@pytest.mark.parametrize("kind", ["vcra", "lora"])
def test_identity_at_init(kind):
    frozen = tiny_clip()
    pixels, tok = inputs(frozen)
    with torch.no_grad():
        expected = features(frozen, pixels, tok)
    built = build_clip(clip_spec([ADAPTERS[kind]]))
    with torch.no_grad():
        got = features(built.backbone, pixels, tok)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _randomise(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["vcra", "lora"])
def test_merge_equals_unmerged_and_unmerge_restores_in_proj_weight(kind):
    built = build_clip(clip_spec([ADAPTERS[kind]]))
    bb, adapter = built.backbone, built.adapters[0]
    _randomise(adapter)
    pixels, tok = inputs(bb)
    attn = bb.model.transformer.resblocks[0].attn
    w0 = attn.in_proj_weight.detach().clone()
    with torch.no_grad():
        unmerged = features(bb, pixels, tok)
        adapter.merge()
        assert not torch.equal(attn.in_proj_weight, w0)  # the fused tensor itself took the update
        merged = features(bb, pixels, tok)
        adapter.unmerge()
        restored = features(bb, pixels, tok)
    for a, b in zip(merged, unmerged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert torch.equal(attn.in_proj_weight, w0)  # bit for bit
    for a, b in zip(restored, unmerged):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(unmerged[1], features(tiny_clip(), pixels, tok)[1].detach())  # the adapter did act


@pytest.mark.parametrize("rank", [4, 16])
@pytest.mark.parametrize("share_kv_scaling", [True, False])
def test_vcra_parameter_count_closed_form(rank, share_kv_scaling):
    """share="all" on q, k, v of both towers: one pair ``2·d_max·r``, λa (r) + λb (d) per scaling, one s per tower."""
    spec = clip_spec([{"name": "vcra.v1", "targets": QKV, "rank": rank, "share_kv_scaling": share_kv_scaling}])
    built = build_clip(spec)
    adapter = built.adapters[0]
    d, attentions, modalities = 64, 2 * 2, 2  # width, (towers x layers), V and T
    scalings = attentions * (2 if share_kv_scaling else 3)  # q alone, k and v shared (paper §4.1)
    expected = 2 * d * rank + scalings * (rank + d) + modalities
    assert sum(p.numel() for p in adapter.parameters()) == expected
    assert set(adapter.A) == {"shared"} and set(adapter.scale) == {"V", "T"}  # one pair across the two towers
    from unitrans.engine.build import count_parameters

    counts = count_parameters(built)
    assert counts["trainable"] == expected
    assert counts["by_modality"]["shared"] == 2 * d * rank


@pytest.mark.parametrize("rank", [2, 8])
def test_lora_parameter_count_closed_form(rank):
    built = build_clip(clip_spec([{"name": "lora.v1", "targets": QKV + ["*.mlp.fc1"], "rank": rank}]))
    points = [p for p in built.backbone.injection_points()
              if p.role in ("q", "k", "v") or p.name.endswith("mlp.fc1")]
    assert sum(p.numel() for p in built.adapters[0].parameters()) == sum(
        rank * (p.in_features + p.out_features) for p in points)
    assert sum(rank * (p.in_features + p.out_features) for p in points) == rank * (12 * 128 + 4 * (64 + 128))


@pytest.mark.parametrize("kind", ["vcra", "lora"])
def test_gradients_reach_only_adapter_parameters(kind):
    built = build_clip(clip_spec([ADAPTERS[kind]]))
    bb, adapter = built.backbone, built.adapters[0]
    _randomise(adapter)
    assert bb.trainable_parameters() == {}
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, bb.image_size, bb.image_size, generator=g),
             "caption": CAPTIONS + ["an orange square"], "image_id": torch.arange(4)}
    terms = built.task.training_step(bb, batch, built.alignment)
    assert set(terms) == {"itc_loss"}
    sum(terms.values()).backward()
    assert all(p.grad is None for p in bb.model.parameters())
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_train_parts_unfreeze_a_parameter_or_a_submodule():
    bb = tiny_clip(train_parts=["visual.proj", "ln_final"])
    assert set(bb.trainable_parameters()) == {"visual.proj", "ln_final.weight", "ln_final.bias"}
    with pytest.raises(UserError, match="train_parts entry 'nope'.*visual"):
        tiny_clip(train_parts=["nope"])


# ---- refusals that name both sides --------------------------------------------------------------------------------
def test_fusion_targets_are_refused_naming_clips_points():
    spec = clip_spec([{"name": "vcra.v1", "targets": ["vision.attn.[qkv]", "fusion.attn.*"]}])
    with pytest.raises(UserError) as info:
        build_clip(spec)
    msg = str(info.value)
    assert "'fusion.attn.*'" in msg and "clip.v1" in msg
    assert "vision.attn.*" in msg and "text.attn.*" in msg


def test_qasn_is_refused_naming_fusion_blocks_and_clips_points():
    spec = clip_spec([{"name": "vcra.v1", "targets": QKV}], side_network={"name": "qasn.v1"})
    with pytest.raises(UserError) as info:
        build_clip(spec)
    msg = str(info.value)
    assert "qasn.v1" in msg and "'fusion.blocks'" in msg and "clip.v1" in msg and "vision.attn.*" in msg


def test_itm_is_refused_by_the_retrieval_task():
    with pytest.raises(UserError, match="capability FusionEncoder .*clip.v1 implements: DualEncoder.*itm_weight = 0"):
        build_clip(clip_spec([ADAPTERS["lora"]], task={"name": "retrieval.v1"}))


def test_builder_errors_a_user_can_act_on(tmp_path):
    from unitrans_clip.backbone import ClipBackbone

    with pytest.raises(UserError, match="unknown open_clip model 'ViT-B-33'.*Did you mean.*ViT-B-32"):
        ClipBackbone(model="ViT-B-33", pretrained="openai")
    with pytest.raises(UserError, match="checkpoint file '.*missing.pt' does not exist"):
        ClipBackbone(model="ViT-B-32", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="not-a-tag.*tags: .*openai"):
        ClipBackbone(model="ViT-B-32", pretrained="not-a-tag")
    with pytest.raises(UserError, match="set one of `preset`"):
        ClipBackbone(preset="tiny", pretrained="openai")
    with pytest.raises(UserError, match="set `pretrained`.*laion2b_s34b_b79k.*preset"):
        ClipBackbone(model="ViT-B-32")
    with pytest.raises(UserError, match="does not adapt"):
        ClipBackbone(model="RN50", random_init=True)
    assert tiny_clip(max_text_length=40).context_length == 40  # for the preset it sets the context length


def test_random_init_builds_a_named_architecture_without_weights():
    """What ``unitrans params`` does for a pretrained spec: the architecture only, offline."""
    from unitrans_clip.backbone import ClipBackbone

    bb = ClipBackbone(model="ViT-B-32", pretrained="laion2b_s34b_b79k", random_init=True, image_size=64,
                      max_text_length=40)
    assert bb.context_length == 77 and bb.max_text_length == 40 and bb.image_size == 64
    assert bb.tokenize(["a long " * 50], "cpu")["input_ids"].shape == (1, 40)
    assert len(bb.injection_points()) == 12 * 6 * 2
    with pytest.raises(UserError, match="max_text_length = 99 exceeds the context length of 'ViT-B-32' \\(77\\)"):
        ClipBackbone(model="ViT-B-32", random_init=True, max_text_length=99)


def test_a_registered_architecture_loads_a_local_checkpoint_file(tmp_path):
    """Any open_clip architecture name works, including one a user registers with ``open_clip.add_model_config``;
    ``pretrained`` may be a checkpoint file with open_clip's own state-dict keys."""
    from unitrans_clip.backbone import PRESETS, ClipBackbone

    name = "unitrans-test-tiny-clip"
    (tmp_path / f"{name}.json").write_text(json.dumps(PRESETS["tiny"]))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    source = tiny_clip(seed=3)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": reference_clip(source).state_dict()}, path)
    loaded = ClipBackbone(model=name, pretrained=str(path))
    assert list(loaded.model.state_dict()) == list(source.model.state_dict())
    for (k, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k
    pixels, tok = inputs(source)
    loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(features(loaded, pixels, tok)[0], features(source, pixels, tok)[0])


# ---- end to end ---------------------------------------------------------------------------------------------------
def test_quickstart_clip_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    argv = [
        "run", str(ROOT / "examples" / "quickstart_clip.toml"), "--output-dir", str(out),
        "--set", f"data.root={tmp_path / 'data'}",
        "--set", "data.n_train=64", "--set", "data.n_val=8", "--set", "data.n_test=12",
        "--set", "train.max_steps=3", "--set", "train.batch_size=16", "--set", "train.progress=false",
        "--set", "train.log_every=1",
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3
    from metric_checks import check_retrieval_metrics

    check_retrieval_metrics(metrics, tmp_path / "data" / "test.json")
    assert (out / "metrics_initial.json").is_file() and (out / "adapter.safetensors").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "itm_loss" not in log[0]

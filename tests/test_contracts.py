"""The backbone plugin contract: capabilities declared as interfaces, checked when a spec is built, by name.

The done-when case of the architecture issue: a third backbone (the example plugin ``toy.v1``) that implements only
the dual-encoder capability trains ITC retrieval end to end and is refused for captioning and for ITM with an error
that names the missing capability.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import catalogue
import pytest
import torch

import unitrans
from unitrans import registry
from unitrans.errors import UserError
from unitrans.interfaces import (
    CONTRACT,
    Backbone,
    DualEncoder,
    EncoderDecoder,
    capability_names,
    check_capabilities,
)
from unitrans.spec import validate_dict

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "plugins" / "unitrans_toy_backbone"


@pytest.fixture()
def toy_plugin(monkeypatch):
    """The example plugin importable as a spec's local ``plugins = [...]`` module; unregistered afterwards."""
    monkeypatch.syspath_prepend(str(TOY))
    yield "unitrans_toy_backbone"
    for name in [m for m in sys.modules if m.partition(".")[0] == "unitrans_toy_backbone"]:
        del sys.modules[name]
    catalogue.REGISTRY.pop(("unitrans", "backbones", "toy.v1"), None)


def _toy_spec(tmp_path: Path, task: dict, steps: int = 150) -> dict:
    return {
        "seed": 0, "plugins": ["unitrans_toy_backbone"], "output_dir": str(tmp_path / "run"),
        "backbone": {"name": "toy.v1", "image_size": 32},
        "adapters": [{"name": "vcra.v1", "targets": ["vision.mlp.*", "text.mlp.*"], "rank": 8}],
        "alignment_loss": {"name": "itc.v1"}, "task": task,
        "data": {"name": "shapes_retrieval.v1", "root": str(tmp_path / "data"), "n_train": 96, "n_val": 4,
                 "n_test": 24},
        "train": {"epochs": 100, "max_steps": steps, "batch_size": 32, "lr": 1e-2, "progress": False,
                  "log_every": 1, "tensorboard": False},
        "eval": {"at_start": True, "batch_size": 24},
    }


def test_a_dual_encoder_trains_retrieval_and_is_refused_for_captioning(toy_plugin, tmp_path, one_thread):
    spec = validate_dict(_toy_spec(tmp_path, {"name": "retrieval.v1", "itm_weight": 0, "rerank": "itc"}))
    metrics = unitrans.run(spec)  # returns the metrics (what metrics.json holds)
    out = tmp_path / "run"
    assert metrics == json.loads((out / "metrics.json").read_text()) and metrics["steps"] == 150
    # ITC through the toy's DualEncoder methods learns: the loss ends well below chance, log(batch) = 3.47
    # (measured: 4.05 at step 1, about 2.85 over the last 10 steps; r_mean 16.0 -> 42.8)
    last = [json.loads(line)["itc_loss"] for line in (out / "log.jsonl").read_text().splitlines()][-10:]
    assert sum(last) / len(last) < math.log(32) - 0.3, last
    initial = json.loads((out / "metrics_initial.json").read_text())
    assert metrics["r_mean"] > initial["r_mean"] + 15, (initial["r_mean"], metrics["r_mean"])

    for task, missing in (({"name": "captioning.v1"}, "EncoderDecoder"), ({"name": "vqa.v1"}, "QuestionEncoder"),
                          ({"name": "retrieval.v1"}, "FusionEncoder")):
        with pytest.raises(UserError) as info:
            unitrans.build(_toy_spec(tmp_path, task))
        message = str(info.value)
        assert f"needs backbone capability {missing} (" in message, message
        assert "backbone toy.v1 implements: DualEncoder." in message


def test_load_adapter_rebuilds_a_run_from_its_folder(toy_plugin, tmp_path, one_thread):
    spec = validate_dict(_toy_spec(tmp_path, {"name": "retrieval.v1", "itm_weight": 0, "rerank": "itc"}, steps=2))
    unitrans.run(spec)
    handle = unitrans.load_adapter(None, tmp_path / "run")  # the backbone from the manifest's resolved spec
    assert handle.names == {"backbone": "toy.v1", "adapters.0": "vcra.v1"}
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    state = handle.trainable_state()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert any(saved[k].abs().sum() > 0 for k in saved if "lambda_b" in k)  # trained, not the zero init
    built = unitrans.build(spec)  # the public build: the same tensors load into it, on the same frozen weights
    assert built.load(tmp_path / "run").trainable_state().keys() == saved.keys()
    frozen, rebuilt = built.model.state_dict(), handle.model.state_dict()
    assert frozen.keys() == rebuilt.keys() and all(torch.equal(frozen[k], rebuilt[k]) for k in frozen)


class _Contract1(Backbone, DualEncoder):
    """A backbone written before capabilities were declared (no contract_version)."""

    name = "testonly.old"

    def injection_points(self):
        return []

    def declared_points(self):
        return []

    def trainable_parameters(self):
        return {}

    tokenize = encode_image = image_feat = encode_text = text_feat = None


def test_a_backbone_of_another_contract_is_refused():
    with pytest.raises(UserError, match=f"testonly.old .* is written for backbone contract 1; this UniTrans "
                                        f"implements contract {CONTRACT}"):
        check_capabilities(_Contract1(), (), "task retrieval.v1")
    _Contract1.contract_version = CONTRACT
    try:
        check_capabilities(_Contract1(), (DualEncoder,), "task retrieval.v1")
        with pytest.raises(UserError, match="task x needs backbone capability EncoderDecoder \\(decode_logits, "
                                            "decode_text, decoder_tokenize, encode_image, generate\\)"):
            check_capabilities(_Contract1(), (DualEncoder, EncoderDecoder), "task x")
    finally:
        del _Contract1.contract_version


def test_blip_heads_declare_what_their_models_have():
    from conftest import tiny_backbone

    caps = {t: capability_names(tiny_backbone(task_model=t)) for t in ("retrieval", "captioning", "vqa")}
    assert caps == {
        "retrieval": ["DualEncoder", "FusionNetwork", "FusionEncoder", "ItmHead", "Exportable"],
        "captioning": ["EncoderDecoder", "Exportable"],
        "vqa": ["FusionNetwork", "FusionEncoder", "EncoderDecoder", "QuestionEncoder", "Exportable"],
    }


def test_blip_decoder_capability_equals_the_model():
    """``decode_logits`` and ``encode_question`` are BLIP's own modules called as BLIP's VQA does (by hand here)."""
    from conftest import tiny_backbone

    bb = tiny_backbone(seed=5, task_model="vqa")
    pixel = torch.randn(2, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
    questions = ["what color is it?", "how many circles?"]
    with torch.no_grad():
        image = bb.model.vision_model(pixel_values=pixel).last_hidden_state
        tok = bb.tokenizer(questions, padding="longest", return_tensors="pt")
        ids = tok["input_ids"].clone()
        ids[:, 0] = bb.tokenizer.convert_tokens_to_ids("[ENC]")
        states = bb.model.text_encoder(input_ids=ids, attention_mask=tok["attention_mask"],
                                       encoder_hidden_states=image).last_hidden_state
        ours, mask = bb.encode_question(questions, bb.encode_image(pixel))
        torch.testing.assert_close(ours, states, rtol=0, atol=0)
        answers = bb.tokenizer(["red", "two"], padding="longest", return_tensors="pt")
        a_ids = answers["input_ids"].clone()
        a_ids[:, 0] = bb.tokenizer.bos_token_id
        reference = bb.model.text_decoder(input_ids=a_ids, attention_mask=answers["attention_mask"],
                                          encoder_hidden_states=states, encoder_attention_mask=mask).logits
        got_ids, got_mask = bb.decoder_tokenize(["red", "two"], "cpu")
        assert torch.equal(got_ids, a_ids) and torch.equal(got_mask, answers["attention_mask"])
        torch.testing.assert_close(bb.decode_logits(got_ids, got_mask, ours, mask), reference, rtol=0, atol=0)


def test_export_refuses_a_backbone_that_is_not_exportable(toy_plugin, tmp_path):
    from unitrans.engine.export import export_merged

    handle = unitrans.build(_toy_spec(tmp_path, {"name": "retrieval.v1", "itm_weight": 0, "rerank": "itc"}))
    with pytest.raises(UserError, match="export needs backbone capability Exportable \\(save_pretrained\\)"):
        export_merged(handle, tmp_path / "x")


def test_options_are_the_schema_and_the_docs():
    """A component's options class is its spec schema (cross-field rules included), its builder's signature and
    its documented ``Args``: declared once."""
    import inspect

    from unitrans.adapters import VCRAOptions, vcra_v1
    from unitrans.spec import SpecError, builder_schema, validate_dict
    from unitrans.tasks import captioning_v1

    assert builder_schema(vcra_v1) is VCRAOptions is vcra_v1.options
    assert list(inspect.signature(vcra_v1).parameters) == list(VCRAOptions.model_fields)
    assert "    rank: r, the rows of A." in vcra_v1.__doc__
    bad = {"backbone": {"name": "blip.v1", "preset": "tiny"}, "alignment_loss": "none",
           "task": {"name": "captioning.v1", "min_length": 9, "max_length": 4}, "data": {"name": "shapes_caption.v1"}}
    with pytest.raises(SpecError, match=r"task \(captioning.v1\).*min_length \(9\) exceeds max_length \(4\)"):
        validate_dict(bad)  # before anything is built: `unitrans validate` reports it
    assert captioning_v1(num_beams=1).options.num_beams == 1
    assert registry.get("adapters", "vcra")(rank=3).options == VCRAOptions(rank=3)

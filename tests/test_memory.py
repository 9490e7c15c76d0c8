"""``unitrans params --memory``: the peak-memory estimate (built on the meta device) against the peak measured on the
CPU for the tiny BLIP-2 and LLaVA configurations: every allocation and free of a real training step (forward,
backward, AdamW step) as the profiler records them, plus the weights that exist before it."""

from __future__ import annotations

import pytest
import torch

from unitrans.spec import validate_dict

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH = 8

BLIP2 = {"name": "blip2.v1", "preset": "tiny"}
CASES = {
    "blip2_retrieval_itc_itm": dict(
        backbone=BLIP2, adapters=[{"name": "vcra.v1", "targets": ["vision.attn.*", "fusion.*", "text.attn.*"]}],
        alignment_loss={"name": "itc.v1"}, task={"name": "retrieval.v1"}),
    "blip2_vqa_lora": dict(
        backbone={**BLIP2, "task_model": "vqa"}, adapters=[{"name": "lora.v1", "targets": ["decoder.*"]}],
        side_network={"name": "qasn.v1"}, alignment_loss="none", task={"name": "vqa.v1", "inference": "generate"}),
    "llava_caption_checkpointed": dict(
        backbone={"name": "llava.v1", "preset": "tiny", "gradient_checkpointing": True},
        adapters=[{"name": "vcra.v1", "targets": ["vision.attn.*", "projector.*", "decoder.*"]}],
        alignment_loss="none", task={"name": "captioning.v1"}),
}


def _spec(case: dict):
    return validate_dict({"seed": 0, "output_dir": "runs/test_memory", "plugins": ["unitrans_blip2", "unitrans_llava"],
                          "data": {"name": "shapes_retrieval.v1"},
                          "train": {"batch_size": BATCH, "device": "cpu"}, **case})


def measured_peak(spec) -> int:
    """Bytes alive at the peak of one real training step on the CPU (the profiler's allocation events), plus the
    parameters allocated before it."""
    from torch.profiler import ProfilerActivity, profile

    from unitrans.engine.build import build
    from unitrans.engine.memory import synthetic_batch

    torch.manual_seed(0)
    built = build(spec, "cpu", with_data=False)
    built.backbone.model.train()
    before = sum(p.numel() * p.element_size()
                 for p in [*built.backbone.model.parameters(), *built.trainable.parameters()])
    batch = synthetic_batch(BATCH, built.backbone.image_size, built.backbone.max_text_length, "cpu")
    opt = torch.optim.AdamW(list(built.trainable_state().values()), lr=1e-3)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        terms = built.task.training_step(built.backbone, batch, built.alignment)
        sum(terms.values()).backward()
        opt.step()
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    return before + peak


def estimated_peak(spec) -> dict:
    from unitrans.engine.build import build
    from unitrans.engine.memory import estimate_memory

    torch.manual_seed(0)
    return estimate_memory(build(spec, "meta", with_data=False), spec)


@pytest.mark.parametrize("case", sorted(CASES))
def test_estimate_is_within_20_percent_of_the_measured_peak(case):
    spec = _spec(CASES[case])
    estimate = estimated_peak(spec)
    measured = measured_peak(spec)
    assert estimate["world"] == 1 and estimate["per_device_batch"] == BATCH
    assert estimate["ddp"] == estimate["fsdp"]  # one process: nothing to shard
    assert abs(estimate["ddp"] - measured) <= 0.2 * measured, (case, estimate["parts"], measured)


def test_fsdp_shards_the_blocks_and_checkpointing_keeps_block_inputs():
    """With 4 processes FSDP holds a quarter of the blocks' weights plus two gathered blocks, DDP all of them; with
    checkpointing the activations are the blocks' inputs plus one block's."""
    from unitrans.engine.memory import ActivationProfile

    spec = validate_dict({**_spec(CASES["blip2_retrieval_itc_itm"]).model_dump(),
                          "train": {"batch_size": 4 * BATCH, "nproc_per_node": 4, "device": "cpu"}})
    e = estimated_peak(spec)
    w = e["weight_split"]
    assert e["per_device_batch"] == BATCH
    gathered = 2 * w["largest_block_numel"] * 4  # two blocks in float32
    assert e["ddp"] - e["fsdp"] == w["blocks"] - w["blocks"] // 4 - gathered > 0
    prof = ActivationProfile(saved=100, per_block=[30, 20], block_inputs=[5, 5])
    assert prof.with_checkpointing() == 100 - 50 + 10 + 30


def test_params_memory_prints_both_strategies(capsys):
    from pathlib import Path

    from unitrans import cli

    spec = Path(__file__).resolve().parents[1] / "examples" / "quickstart_llava.toml"
    assert cli.main(["params", str(spec), "--memory", "--set", "train.nproc_per_node=2"]) == 0
    out = capsys.readouterr().out
    assert "16 samples per device" in out and "weights under fsdp" in out
    assert "total under ddp" in out and "total under fsdp" in out and "24 GB: fits" in out

"""The linear probe (paper Table 9): the frozen BLIP with its heads alone trained (vision_proj, text_proj, itm_head), a
spec with no adapter and ``backbone.train_parts``: the count's closed form, what trains, the checkpoint, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CAPTIONS, build_spec, make_inputs, randomise_, retrieval_forward, spec_dict

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = ["vision_proj", "text_proj", "itm_head"]
ROOT = Path(__file__).resolve().parents[1]


def _probe():
    return build_spec(spec_dict([], backbone_extra={"train_parts": HEADS}))


def test_the_heads_alone_train_and_count_two_projections_plus_the_itm_head():
    _, built = _probe()
    d, p = 64, 64  # the tiny BLIP's text / vision width and ITC dimension
    counts = built.parameter_counts()
    assert counts["trainable"] == 2 * (d * p + p) + (d * 2 + 2) == 8450
    assert counts["by_modality"] == {"backbone": 8450}
    bb = built.backbone
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(3, 3, bb.image_size, bb.image_size, generator=g), "caption": CAPTIONS[:3],
             "image_id": torch.tensor([0, 1, 2])}
    sum(built.task.training_step(bb, batch, built.alignment).values()).backward()
    trained = {n for n, q in bb.model.named_parameters() if q.grad is not None}
    assert trained == {f"{h}.{w}" for h in HEADS for w in ("weight", "bias")}
    assert set(built.trainable_state()) == {f"backbone.{n}" for n in trained}


def test_the_checkpoint_holds_the_heads_and_export_reproduces_them(tmp_path):
    from safetensors.torch import load_file
    from transformers import BlipForImageTextRetrieval

    from unitrans.engine.checkpoint import load_adapter, save_adapter

    spec, built = _probe()
    randomise_([p for h in HEADS for p in getattr(built.backbone.model, h).parameters()], seed=3, std=0.2)
    save_adapter(built, spec, tmp_path / "run")
    saved = set(load_file(str(tmp_path / "run" / "adapter.safetensors")))
    assert saved == {f"backbone.{h}.{w}" for h in HEADS for w in ("weight", "bias")}
    _, loaded = _probe()
    load_adapter(loaded, tmp_path / "run")
    loaded.export(tmp_path / "exported")
    plain = BlipForImageTextRetrieval.from_pretrained(str(tmp_path / "exported")).eval()
    pixel, tok = make_inputs(loaded.backbone, batch=2)
    ids = tok["input_ids"].clone()
    ids[:, 0] = loaded.backbone.enc_token_id  # BLIP's ITM input (transformers' forward leaves the ids as given)
    with torch.no_grad():
        ours = retrieval_forward(built.backbone, pixel, tok)
        itm = plain(input_ids=ids, attention_mask=tok["attention_mask"], pixel_values=pixel).itm_score
        itc = plain(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixel,
                    use_itm_head=False).itm_score
    torch.testing.assert_close(itm, ours["itm"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itc, ours["image_feat"] @ ours["text_feat"].t(), atol=1e-5, rtol=1e-5)


def test_the_paper_spec_has_the_probe_row():
    from unitrans.engine.sweep import load_sweep

    sweep = load_sweep(ROOT / "examples" / "paper" / "table2_flickr30k.toml", only=["linear_probe"])
    (variant,) = sweep.variants
    assert variant.spec.adapters == [] and variant.spec.backbone.kwargs["train_parts"] == HEADS


@pytest.mark.slow
def test_the_comparison_rows_count_as_the_paper_on_blip_base(capsys):
    """`unitrans params` (architecture only, offline) of every row of examples/paper/table2_flickr30k.toml."""
    import json

    from unitrans.engine.params import params_command
    from unitrans.engine.sweep import load_sweep

    temperature = 1  # BLIP's retrieval recipe learns its ITC temperature in every row
    expected = {"linear_probe": 2 * (768 * 256 + 256) + (768 * 2 + 2),  # 395,266: the paper's 0.4M
                "uniadapter_r128": 12 * (4 * 768 * 128 + 128 + 7 * 768),  # 4,784,640: 4.8M
                "uniadapter_r512": 12 * (4 * 768 * 512 + 512 + 7 * 768),  # 18,945,024: the paper prints 19.0M
                "lora_r32": 216 * 2 * 768 * 32,  # 10,616,832: 10.6M
                "vera_r64": 108 * (64 + 768),  # 89,856
                # VCRA on 144 q, k, v points (ViT, text pass, fused pass, cross-attention) with k/v sharing λ
                # (96 λ pairs) + 3 scales + QASN: 206,595, the paper's Table 8 "+MCAM" count less the temperature
                "unitrans_r64": 2 * 768 * 64 + 96 * (64 + 768) + 3 + 28_416}
    expected = {name: count + temperature for name, count in expected.items()}
    sweep = load_sweep(ROOT / "examples" / "paper" / "table2_flickr30k.toml")
    assert sorted(v.name for v in sweep.variants) == sorted(expected)
    for variant in sweep.variants:
        params_command(variant.spec, as_json=True)
        assert json.loads(capsys.readouterr().out)["trainable"] == expected[variant.name], variant.name

"""`unitrans export`: the merged save_pretrained directory reproduces the adapted model with plain transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from unitrans import cli
from unitrans.engine.build import build
from unitrans.engine.checkpoint import load_adapter
from unitrans.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def _spec_file(tmp_path: Path, side: str = "none") -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(f"""
output_dir = "{tmp_path / 'run'}"
[backbone]
name = "blip.v1"
preset = "tiny"
train_parts = ["itm_head"]
[[adapters]]
name = "vcra.v1"
rank = 8
[side_network]
name = "{side}"
[task]
name = "retrieval.v1"
[data]
name = "shapes_retrieval.v1"
root = "{tmp_path / 'data'}"
n_train = 32
n_val = 4
n_test = 6
[train]
max_steps = 3
batch_size = 8
lr = 0.05
progress = false
""")
    return p


def test_export_matches_adapted_model(tmp_path):
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    spec_path = _spec_file(tmp_path)
    assert cli.main(["run", str(spec_path)]) == 0
    out = tmp_path / "exported"
    assert cli.main(["export", str(spec_path), "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0

    spec = load_spec(spec_path)
    torch.manual_seed(spec.seed)
    built = build(spec, "cpu", with_data=False)
    load_adapter(built, tmp_path / "run")
    bb = built.backbone
    bb.model.eval()
    plain = BlipForImageTextRetrieval.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    pixels = torch.randn(2, 3, bb.image_size, bb.image_size)
    tok = processor.tokenizer(["a red circle", "a large blue square"], padding=True, return_tensors="pt")
    tok = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    with torch.no_grad():
        adapted_itc = bb.image_feat(bb.encode_image(pixels)) @ bb.text_feat(bb.encode_text(**tok)).t()
        plain_itc = plain(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels,
                          use_itm_head=False).itm_score
    torch.testing.assert_close(plain_itc, adapted_itc, atol=1e-5, rtol=1e-5)
    # the adapted update is not zero, or the comparison would prove nothing
    trained_lb = [p for n, p in built.trainable.named_parameters() if "lambda_b" in n]
    assert any(p.abs().sum() > 0 for p in trained_lb)


def test_export_refuses_side_network(tmp_path, capsys):
    spec_path = _spec_file(tmp_path, side="qasn.v1")
    (tmp_path / "run").mkdir()
    code = cli.main(["export", str(spec_path), "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert code == 2
    assert "cannot be merged" in capsys.readouterr().err

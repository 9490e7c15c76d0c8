"""One end-to-end run through ``cli.main`` on the CPU: spec -> build -> train -> evaluate -> outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from unitrans import cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL_KEYS = {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}


def _tiny_run_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "run", str(ROOT / "examples" / "quickstart.toml"),
        "--output-dir", str(tmp_path / "run"),
        "--set", f"data.root={tmp_path / 'data'}",
        "--set", "data.n_train=64", "--set", "data.n_val=8", "--set", "data.n_test=12",
        "--set", "train.max_steps=4", "--set", "train.batch_size=16", "--set", "train.progress=false",
        "--set", "train.log_every=2", "--set", "task.k_test=5",
        *extra,
    ]


@pytest.mark.parametrize("adapter", ["vcra", "lora"])
def test_run_writes_every_output(tmp_path, adapter):
    extra = ("--set", "adapters.0.name=lora", "--set", "adapters.0.rank=32") if adapter == "lora" else ()
    assert cli.main(_tiny_run_args(tmp_path, *extra)) == 0
    out = tmp_path / "run"
    for name in ("spec.resolved.toml", "params.json", "log.jsonl", "metrics.json", "metrics_initial.json",
                 "adapter.safetensors", "adapter.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert RETRIEVAL_KEYS <= set(metrics)
    from metric_checks import check_retrieval_metrics

    check_retrieval_metrics(metrics, tmp_path / "data" / "test.json")
    assert metrics["steps"] == 4
    resolved = tomllib.loads((out / "spec.resolved.toml").read_text())
    assert resolved["adapters"][0]["name"] == f"{adapter}.v1"  # version pinned
    assert resolved["adapters"][0]["rank"] == 32
    assert ("share" in resolved["adapters"][0]) == (adapter == "vcra")  # defaults of the pinned builder filled in
    assert resolved["train"]["max_steps"] == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert {"loss", "itc_loss", "itm_loss", "lr", "samples_per_s"} <= set(log[0])
    params = json.loads((out / "params.json").read_text())
    manifest = json.loads((out / "adapter.json").read_text())
    assert params["trainable"] == manifest["numel"]  # every trainable tensor, and only those, is saved


def test_resolved_spec_reruns_identically(tmp_path):
    """The resolved spec is a complete spec: validating it again gives the same resolution."""
    from unitrans.spec import dump_toml, load_spec

    assert cli.main(_tiny_run_args(tmp_path)) == 0
    resolved_path = tmp_path / "run" / "spec.resolved.toml"
    first = tomllib.loads(resolved_path.read_text())
    assert tomllib.loads(dump_toml(load_spec(resolved_path))) == first


def test_missing_data_file_names_the_path(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
output_dir = "{tmp_path / 'out'}"
backbone = {{name = "blip.v1", preset = "tiny"}}
adapters = [{{name = "vcra"}}]
task = {{name = "retrieval"}}
data = {{name = "blip_retrieval", image_root = "{tmp_path}", train_file = "{tmp_path / 'nope_train.json'}",
        test_file = "{tmp_path / 'nope_test.json'}"}}
train = {{progress = false}}
""")
    assert cli.main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "nope_train.json" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    """The README's quickstart, as written: r_mean after fine-tuning clearly above the frozen model's."""
    args = ["run", str(ROOT / "examples" / "quickstart.toml"), "--output-dir", str(tmp_path / "run"),
            "--set", f"data.root={tmp_path / 'data'}", "--set", "train.progress=false"]
    assert cli.main(args) == 0
    before = json.loads((tmp_path / "run" / "metrics_initial.json").read_text())
    after = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert after["r_mean"] > before["r_mean"] + 15

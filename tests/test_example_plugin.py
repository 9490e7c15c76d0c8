"""The path a third party takes: an installed package that registers a backbone through the ``unitrans.plugins``
entry-point group (``examples/plugins/unitrans_toy_backbone``), discovered and run end to end through ``cli.main``.

Installing it with pip is slow and may need the network; instead the test lays out what an installation leaves
behind: the package directory on ``sys.path`` and a ``.dist-info`` folder whose ``entry_points.txt`` declares the
plugin. ``importlib.metadata`` finds both exactly as it finds an installed distribution.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap
from pathlib import Path

import catalogue
import pytest

from unitrans import cli, registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugins" / "unitrans_toy_backbone"

SPEC = """
seed = 0
backbone = {{name = "toy.v1", image_size = 32}}
alignment_loss = {{name = "itc.v1"}}
task = {{name = "retrieval.v1", itm_weight = 0, rerank = "itc"}}

[[adapters]]
name = "{adapter}"
targets = ["vision.mlp.*", "text.mlp.*"]
rank = 4

[data]
name = "shapes_retrieval.v1"
root = "{data}"
n_train = 32
n_val = 4
n_test = 8

[train]
epochs = 1
max_steps = 2
batch_size = 16
progress = false
log_every = 1

[eval]
at_start = true
batch_size = 8
"""


@pytest.fixture()
def installed_toy_plugin(tmp_path, monkeypatch):
    """What ``pip install examples/plugins/unitrans_toy_backbone`` leaves: the package importable and its
    entry point in a dist-info folder. Undone afterwards (module, registration, entry-point state)."""
    site = tmp_path / "site"
    dist = site / "unitrans_toy_backbone-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: unitrans-toy-backbone\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[unitrans.plugins]\ntoy = unitrans_toy_backbone\n")
    monkeypatch.syspath_prepend(str(PACKAGE))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)  # look at the entry points again
    yield
    for name in [m for m in sys.modules if m.partition(".")[0] == "unitrans_toy_backbone"]:
        del sys.modules[name]
    key = ("unitrans", "backbones", "toy.v1")
    if key in catalogue.REGISTRY:
        del catalogue.REGISTRY[key]  # keep the process's registries first-party only for the other tests


def test_entry_point_is_discovered(installed_toy_plugin):
    eps = importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    assert "unitrans_toy_backbone" in {ep.value for ep in eps}
    assert "toy.v1" not in registry.backbones  # nothing is imported before a lookup
    assert "toy.v1" in registry.available("backbones")  # loads the entry points
    builder = registry.get("backbones", "toy")  # an unversioned name resolves to the highest version
    assert builder.__module__ == "unitrans_toy_backbone"


@pytest.mark.parametrize("adapter", ["vcra.v1", "lora.v1"])
def test_toy_backbone_runs_end_to_end(installed_toy_plugin, tmp_path, adapter):
    spec = tmp_path / "toy.toml"
    spec.write_text(SPEC.format(adapter=adapter, data=tmp_path / "data"))
    out = tmp_path / "run"
    assert cli.main(["run", str(spec), "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2
    from metric_checks import check_retrieval_metrics

    check_retrieval_metrics(metrics, tmp_path / "data" / "test.json")
    resolved = (out / "spec.resolved.toml").read_text()
    assert 'name = "toy.v1"' in resolved and "vocab_size = 1024" in resolved  # the builder's defaults, pinned
    params = json.loads((out / "params.json").read_text())
    assert params["by_component"]["backbone (toy.v1)"]["trainable"] == 0 and params["trainable"] > 0


def test_toy_backbone_names_its_points_when_a_spec_asks_for_others(installed_toy_plugin, tmp_path, capsys):
    spec = tmp_path / "toy.toml"
    spec.write_text(SPEC.format(adapter="lora.v1", data=tmp_path / "data").replace(
        '["vision.mlp.*", "text.mlp.*"]', '["vision.attn.q"]'))
    assert cli.main(["run", str(spec), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'vision.attn.q' match no injection point" in err and "toy.v1 declares: vision.mlp.*, text.mlp.*" in err


def test_the_plugin_module_is_light(tmp_path):
    """Validating a spec that names toy.v1 imports the plugin through its entry point, but not torch."""
    import subprocess

    site = tmp_path / "site"
    dist = site / "unitrans_toy_backbone-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: unitrans-toy-backbone\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[unitrans.plugins]\ntoy = unitrans_toy_backbone\n")
    spec = tmp_path / "toy.toml"
    spec.write_text(SPEC.format(adapter="lora.v1", data=tmp_path / "data"))
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(site)!r}, {str(PACKAGE)!r}]
        from unitrans.cli import main
        rc = main(["validate", {str(spec)!r}])
        assert rc == 0, rc
        assert "unitrans_toy_backbone" in sys.modules and "torch" not in sys.modules, sorted(sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "toy.v1" in proc.stdout

"""The light commands: ``list`` and ``validate`` answer fast, never import torch or transformers, and report a
user's mistakes as lines on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from unitrans import cli
from unitrans.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "open_clip")
# modules `list` must not need: the engine, the components' implementations and the plugins' backbones (the
# registered builders and registry.toml say all that `list` prints)
IMPLEMENTATION = ("numpy", "PIL", "safetensors", "unitrans.engine", "unitrans.adapters.", "unitrans.tasks.",
                  "unitrans.data.", "unitrans.side_networks.", "unitrans.alignment_losses.", "unitrans.injection",
                  "unitrans_blip.backbone", "unitrans_clip.backbone")

PLUGIN = '''
"""Light test components (what a user's local plugin module looks like)."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from unitrans import registry


@registry.backbones.register("testonly_cli_backbone.v1")
def backbone(preset: str = "tiny"):
    """A test backbone."""


@registry.adapters.register("testonly_cli_adapter.v1")
def adapter(rank: Annotated[int, Field(gt=0)] = 8, targets: list[str] = ("vision.attn.q",)):
    """A test adapter."""


@registry.tasks.register("testonly_cli_task.v1")
def task():
    """A test task."""


@registry.datasets.register("testonly_cli_data.v1")
def data(root: str = "nowhere"):
    """A test dataset."""
'''

GOOD = """
plugins = ["testonly_cli_plugin"]
output_dir = "runs/testonly"
backbone = {name = "testonly_cli_backbone"}
alignment_loss = "none"
task = {name = "testonly_cli_task"}
data = {name = "testonly_cli_data"}

[[adapters]]
name = "testonly_cli_adapter"
rank = 4
"""

BAD = """
plugins = ["testonly_cli_plugin"]
backbone = {name = "testonly_cli_backbone", presett = "tiny"}
alignment_loss = "none"
task = {name = "testonly_cli_task"}
data = {name = "testonly_cli_data"}

[[adapters]]
name = "testonly_cli_adaptr"

[train]
lr = -1
"""

# Runs the CLI in a fresh interpreter and reports the exit status and which heavy or implementation modules got
# imported (what makes a light command slow, checked by name rather than by the clock).
PROBE = """
import json, sys
from unitrans.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.partition(".")[0] in {heavy!r})
implementation = sorted(m for m in sys.modules if m.startswith({implementation!r}))
print("@@PROBE@@" + json.dumps({{"rc": rc, "heavy": heavy, "implementation": implementation}}))
""".format(heavy=set(HEAVY), implementation=IMPLEMENTATION)


@pytest.fixture()
def spec_dir(tmp_path: Path) -> Path:
    (tmp_path / "testonly_cli_plugin.py").write_text(PLUGIN)
    (tmp_path / "good.toml").write_text(GOOD)
    (tmp_path / "bad.toml").write_text(BAD)
    return tmp_path


def _env(*extra: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO), *map(str, extra)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _probe(args: list[str], cwd: Path, *extra: Path) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, env=_env(*extra), capture_output=True, text=True, timeout=120
    )
    line = next((l for l in proc.stdout.splitlines() if l.startswith("@@PROBE@@")), None)
    assert line is not None, f"probe failed:\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return json.loads(line[len("@@PROBE@@") :]), proc


def _module(*args: str, cwd: Path, extra: tuple[Path, ...] = (), importtime: bool = False):
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "unitrans", *args],
        cwd=cwd,
        env=_env(*extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _imported_by_importtime(stderr: str) -> set[str]:
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_list_is_light_and_fast(tmp_path):
    proc = _module("list", cwd=tmp_path, importtime=True)
    assert proc.returncode == 0, proc.stderr
    imported = _imported_by_importtime(proc.stderr)
    assert "unitrans.cli" in imported  # the probe really saw our imports
    assert not {m for m in imported if m.partition(".")[0] in HEAVY}, "`unitrans list` imported a heavy module"
    for kind in ("backbones", "adapters", "side_networks", "alignment_losses", "tasks", "datasets"):
        assert f"{kind}:" in proc.stdout
    result, _ = _probe(["list"], tmp_path)
    assert result["rc"] == 0 and result["heavy"] == []
    assert result["implementation"] == [], f"`unitrans list` imported {result['implementation']}"


def test_list_shows_index_summaries(tmp_path):
    from unitrans import registry

    entries = registry.read_index()
    if not entries:
        pytest.skip("registry.toml lists nothing yet")
    proc = _module("list", entries[0].kind, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert entries[0].name in proc.stdout and entries[0].summary in proc.stdout


def test_list_unknown_kind_exits_2(tmp_path):
    proc = _module("list", "widgets", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "adapters" in proc.stderr


def test_validate_good_spec_is_light(spec_dir):
    result, proc = _probe(["validate", str(spec_dir / "good.toml"), "--set", "adapters.0.rank=16"], spec_dir)
    assert result["rc"] == 0, proc.stderr
    assert result["heavy"] == [], f"`unitrans validate` imported {result['heavy']}"
    assert f"ok: {spec_dir / 'good.toml'}" in proc.stdout
    assert "testonly_cli_adapter.v1" in proc.stdout  # pinned names in the summary


def test_validate_bad_spec_exits_2_without_traceback(spec_dir):
    proc = _module("validate", "bad.toml", "--set", "train.epochs=0", cwd=spec_dir)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "backbone (testonly_cli_backbone.v1) -> presett: unknown field; did you mean 'preset'?" in proc.stderr
    assert "adapters[0] -> name: unknown adapter 'testonly_cli_adaptr'" in proc.stderr
    assert "train -> lr:" in proc.stderr and "train -> epochs:" in proc.stderr
    assert "(4 problems)" in proc.stderr


def test_validate_toml_syntax_error_and_missing_file(spec_dir):
    (spec_dir / "broken.toml").write_text("seed = 1\nbackbone = {name = \n")
    proc = _module("validate", "broken.toml", cwd=spec_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "line 2" in proc.stderr
    proc = _module("validate", "missing.toml", cwd=spec_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "missing.toml" in proc.stderr


def test_first_party_examples_validate_without_heavy_imports():
    examples = sorted(f for pattern in ("*.toml", "ablation/*.toml", "paper/*.toml")
                      for f in (REPO / "examples").glob(pattern))  # sweeps validate every variant too
    if not examples:
        pytest.skip("no examples/*.toml yet")
    for example in examples:
        result, proc = _probe(["validate", str(example)], REPO)
        assert result["rc"] == 0, f"{example.name}:\n{proc.stderr}"
        assert result["heavy"] == [], f"validating {example.name} imported {result['heavy']}"


# ------------------------------------------------------------------------------------------------------------
# run / params, in process, with the engine replaced by a fake (the real one imports torch)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_engine(monkeypatch, spec_dir):
    calls: dict = {}

    def run(spec):
        calls["run"] = spec
        if spec.seed == 13:
            raise UserError("side network qasn.v1 needs injection point 'fusion.blocks'")
        return 0

    def params_command(spec, as_json=False):
        calls["params"] = (spec, as_json)
        return 0

    engine = types.ModuleType("unitrans.engine")
    engine.__path__ = []  # a package, so its submodules can be found in sys.modules
    run_mod = types.ModuleType("unitrans.engine.run")
    run_mod.run = run
    params_mod = types.ModuleType("unitrans.engine.params")
    params_mod.params_command = params_command
    monkeypatch.setitem(sys.modules, "unitrans.engine", engine)
    monkeypatch.setitem(sys.modules, "unitrans.engine.run", run_mod)
    monkeypatch.setitem(sys.modules, "unitrans.engine.params", params_mod)
    monkeypatch.syspath_prepend(str(spec_dir))
    return calls


def test_run_applies_output_dir_and_reports_user_errors(fake_engine, spec_dir, capsys):
    good = str(spec_dir / "good.toml")
    assert cli.main(["run", good, "--output-dir", str(spec_dir / "out")]) == 0
    assert fake_engine["run"].output_dir == str(spec_dir / "out")
    assert cli.main(["run", good, "--set", "seed=13"]) == 2
    err = capsys.readouterr().err
    assert "error: side network qasn.v1 needs injection point 'fusion.blocks'" in err and "Traceback" not in err
    assert cli.main(["run", str(spec_dir / "bad.toml")]) == 2
    assert "adapters[0] -> name:" in capsys.readouterr().err


def test_params_passes_json_flag(fake_engine, spec_dir):
    assert cli.main(["params", str(spec_dir / "good.toml"), "--json", "--set", "adapters.0.rank=2"]) == 0
    spec, as_json = fake_engine["params"]
    assert as_json is True and spec.adapters[0].kwargs["rank"] == 2


def test_usage_errors_return_status(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--version"]) == 0
    assert "0.1.0" in capsys.readouterr().out
    assert cli.main(["validate"]) == 2  # argparse: the spec argument is missing


def test_package_import_is_light(tmp_path):
    code = textwrap.dedent(
        """
        import sys, unitrans
        assert unitrans.__version__ == "0.1.0"
        loaded = [m for m in sys.modules if m.startswith("unitrans.") or m.partition(".")[0] in {heavy!r}]
        spec_cls = unitrans.Spec  # a lazy re-export
        print(loaded, spec_cls.__name__, unitrans.registry.__name__, unitrans.Adapter.__name__)
        """
    ).format(heavy=set(HEAVY))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] Spec unitrans.registry Adapter"


def test_score_is_light(tmp_path):
    """``score`` reads JSON and computes metrics in Python: no torch, no engine."""
    (tmp_path / "res.json").write_text(json.dumps([{"question_id": 1, "answer": "red"}]))
    (tmp_path / "ann.json").write_text(json.dumps([{"question_id": 1, "answer": ["red"] * 10}]))
    result, proc = _probe(["score", "vqa", "--results", "res.json", "--annotations", "ann.json"], tmp_path)
    assert result["rc"] == 0, proc.stderr
    assert json.loads(proc.stdout.split("@@PROBE@@")[0])["vqa_acc"] == 100.0
    assert result["heavy"] == [] and result["implementation"] == [], result

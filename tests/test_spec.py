"""The typed spec: all errors at once with suggestions, overrides, TOML errors, resolving and round trips."""

from __future__ import annotations

import textwrap
import tomllib
from typing import Annotated, Literal

import pytest
from pydantic import Field

from unitrans import registry
from unitrans.errors import UserError
from unitrans.spec import (
    Spec,
    SpecError,
    apply_overrides,
    component_kwargs,
    dump_toml,
    load_spec,
    resolve,
    resolved_builder,
    validate_dict,
    write_resolved,
)

# Fake, light components under test-only names (registered once per process; re-registering the same function
# is a no-op, so importing this module twice is harmless).


@registry.adapters.register("testonly_spec_adapter.v1")
def fake_adapter_v1(
    targets: list[str] = ("vision.attn.q", "vision.attn.v"),
    rank: Annotated[int, Field(gt=0)] = 8,
    share: Literal["all", "modality", "none"] = "all",
    layers: list[int] | None = None,
):
    """A test adapter (v1)."""
    return ("adapter.v1", targets, rank, share, layers)


@registry.adapters.register("testonly_spec_adapter.v2")
def fake_adapter_v2(rank: Annotated[int, Field(gt=0)] = 16, alpha: float = 1.0):
    """A test adapter (v2)."""
    return ("adapter.v2", rank, alpha)


@registry.backbones.register("testonly_spec_backbone.v1")
def fake_backbone(preset: str, freeze: bool = True):
    """A test backbone with a required argument."""


@registry.side_networks.register("testonly_spec_side.v1")
def fake_side(rank: Annotated[int, Field(gt=0)] = 4, filter: Literal["gate", "literal"] = "gate"):
    """A test side network."""


@registry.alignment_losses.register("testonly_spec_loss.v1")
def fake_loss(tau: Annotated[float, Field(gt=0)] = 0.07):
    """A test alignment loss."""


@registry.tasks.register("testonly_spec_task.v1")
def fake_task(k_test: int = 16):
    """A test task."""


@registry.datasets.register("testonly_spec_data.v1")
def fake_data(root: str = "data/none", image_size: int = 224):
    """A test dataset."""


def base() -> dict:
    """A valid spec dict using the fakes above."""
    return {
        "backbone": {"name": "testonly_spec_backbone", "preset": "tiny"},
        "adapters": [{"name": "testonly_spec_adapter.v1", "rank": 4}],
        "side_network": {"name": "testonly_spec_side"},
        "alignment_loss": {"name": "testonly_spec_loss"},
        "task": {"name": "testonly_spec_task"},
        "data": {"name": "testonly_spec_data"},
    }


def errors_of(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_dict(data)
    return info.value.errors


# ------------------------------------------------------------------------------------------------------------
# Validation: every problem, one line each
# ------------------------------------------------------------------------------------------------------------


def test_valid_spec_and_defaults():
    spec = validate_dict(base())
    assert isinstance(spec, Spec)
    assert spec.train.batch_size == 32 and spec.train.precision == "fp32" and spec.eval.split == "test"
    assert spec.seed == 42 and spec.plugins == []
    assert Spec.model_fields["alignment_loss"].get_default(call_default_factory=True).name == "itc.v1"


def test_three_problems_three_lines():
    data = base()
    data["adapters"] = [
        {"name": "testonly_spec_adapter.v1", "rnak": 8},  # misspelled key
        {"name": "testonly_spec_adapter.v1", "rank": -4},  # out of range
        {"name": "testonly_spec_adaptr"},  # unknown name
    ]
    lines = errors_of(data)
    assert len(lines) == 3, lines
    misspelled, negative, unknown = sorted(lines)
    assert misspelled.startswith("adapters[0] (testonly_spec_adapter.v1) -> rnak: unknown field")
    assert "did you mean 'rank'?" in misspelled and "Allowed: targets, rank, share, layers" in misspelled
    assert negative.startswith("adapters[1] (testonly_spec_adapter.v1) -> rank: ")
    assert "greater than 0" in negative and "(got -4)" in negative
    assert unknown.startswith("adapters[2] -> name: unknown adapter 'testonly_spec_adaptr'")
    assert "Did you mean 'testonly_spec_adapter'?" in unknown
    assert "testonly_spec_adapter.v1" in unknown and "testonly_spec_adapter.v2" in unknown  # available names
    assert "registry.toml" in unknown  # where names come from


def test_structure_errors_have_locations_and_suggestions():
    data = base()
    data["trian"] = {"epochs": 3}
    data["train"] = {"lr": 0, "precision": "fp64"}
    data["eval"] = {"splt": "val"}
    lines = errors_of(data)
    assert "train -> lr: Input should be greater than 0 (got 0)" in lines
    top = next(l for l in lines if l.startswith("(top level) -> trian"))
    assert "did you mean 'train'?" in top and "Allowed: seed, output_dir" in top
    assert any(l.startswith("train -> precision:") and "'fp64'" in l for l in lines)
    assert any(l.startswith("eval -> splt: unknown field; did you mean 'split'?") for l in lines)
    assert len(lines) == 4, lines


def test_missing_required_field_and_component_argument():
    data = base()
    del data["task"]
    data["backbone"] = {"name": "testonly_spec_backbone"}  # `preset` has no default
    lines = errors_of(data)
    assert "(top level) -> task: required field missing" in lines
    assert "backbone (testonly_spec_backbone.v1) -> preset: required field missing" in lines
    assert len(lines) == 2


def test_global_batch_must_divide_by_grad_accum():
    data = base() | {"train": {"batch_size": 32, "grad_accum": 3}}
    (line,) = errors_of(data)
    assert line.startswith("train -> grad_accum:") and "divisible" in line


def test_none_drops_optional_components_only():
    data = base() | {"side_network": {"name": "none"}, "alignment_loss": "none"}
    spec = validate_dict(data)
    assert spec.side_network is None and spec.alignment_loss is None
    assert resolve(spec)["side_network"] == {"name": "none"}
    # "none" is no adapter name, and takes no options
    data = base() | {"side_network": {"name": "none", "rank": 3}}
    (line,) = errors_of(data)
    assert line.startswith("(top level) -> side_network:") and "takes no options" in line


def test_default_alignment_loss_is_checked():
    data = base()
    del data["alignment_loss"]
    if "itc.v1" in registry.available("alignment_losses"):
        assert validate_dict(data).alignment_loss.name == "itc.v1"
    else:
        (line,) = errors_of(data)
        assert line.startswith("alignment_loss (default) -> name:") and "itc.v1" in line


def test_spec_error_is_a_user_error():
    err = SpecError(["a -> b: c", "d -> e: f"])
    assert isinstance(err, UserError)
    assert str(err) == "a -> b: c\nd -> e: f"


def test_component_kwargs_fill_defaults_and_coerce():
    adapters = [{"name": "testonly_spec_adapter.v1", "rank": "12"}, "testonly_spec_adapter"]
    spec = validate_dict(base() | {"adapters": adapters})
    kwargs = component_kwargs("adapters", spec.adapters[0])
    assert kwargs == {"targets": ("vision.attn.q", "vision.attn.v"), "rank": 12, "share": "all", "layers": None}
    assert fake_adapter_v1(**kwargs)[2] == 12
    name, builder = resolved_builder("adapters", spec.adapters[1])
    assert name == "testonly_spec_adapter.v2" and builder is fake_adapter_v2
    with pytest.raises(SpecError):
        component_kwargs("adapters", spec.adapters[0].model_copy(update={"name": "testonly_nope"}))
    bad = Spec.model_validate(base() | {"adapters": [{"name": "testonly_spec_adapter.v1", "rank": 0}]})
    with pytest.raises(SpecError) as info:  # a Spec built without validate_dict is checked when used
        resolve(bad)
    assert info.value.errors[0].startswith("adapters[0] (testonly_spec_adapter.v1) -> rank:")


def test_plugins_are_loaded_before_names_are_checked(tmp_path):
    (tmp_path / "testonly_spec_plugin_mod.py").write_text(
        textwrap.dedent(
            '''
            from unitrans import registry

            @registry.datasets.register("testonly_spec_plugin_data.v1")
            def build(root: str = "x"):
                """A dataset from a local plugin module."""
            '''
        )
    )
    spec_file = tmp_path / "spec.toml"  # the spec's folder is searched for plugin modules
    spec_file.write_text(
        textwrap.dedent(
            """
            plugins = ["testonly_spec_plugin_mod"]
            backbone = {name = "testonly_spec_backbone", preset = "tiny"}
            alignment_loss = "none"
            task = {name = "testonly_spec_task"}
            data = {name = "testonly_spec_plugin_data", root = "here"}
            """
        )
    )
    spec = load_spec(spec_file)
    assert resolve(spec)["data"] == {"name": "testonly_spec_plugin_data.v1", "root": "here"}
    with pytest.raises(SpecError) as info:
        validate_dict(base() | {"plugins": ["testonly_no_such_module"]})
    (line,) = info.value.errors
    assert line.startswith("plugins -> [0]:") and "testonly_no_such_module" in line


# ------------------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------------------


def test_overrides_parse_values():
    data = apply_overrides(
        base(),
        [
            "adapters.0.rank=32",
            "train.lr=1e-4",
            "train.progress=false",
            "adapters.0.name=testonly_spec_adapter.v2",
            "output_dir=runs/x y",
            'adapters.0.targets=["a", "b"]',
            "seed = 7",
        ],
    )
    assert data["adapters"][0]["rank"] == 32 and isinstance(data["adapters"][0]["rank"], int)
    assert data["train"]["lr"] == 1e-4 and isinstance(data["train"]["lr"], float)
    assert data["train"]["progress"] is False
    assert data["adapters"][0]["name"] == "testonly_spec_adapter.v2"  # not TOML: taken as a string
    assert data["output_dir"] == "runs/x y"
    assert data["adapters"][0]["targets"] == ["a", "b"]
    assert data["seed"] == 7


def test_overrides_create_tables_and_leave_input_alone():
    original = base()
    del original["side_network"]
    data = apply_overrides(original, ["eval.split=val", "side_network.name=none", "a.b.c=1"])
    assert data["eval"] == {"split": "val"} and data["a"] == {"b": {"c": 1}}
    assert "side_network" not in original and "eval" not in original
    assert validate_dict(apply_overrides(base(), ["side_network.name=none"])).side_network is None


def test_override_errors_name_the_override():
    with pytest.raises(SpecError) as info:
        apply_overrides(base(), ["adapters.3.rank=8", "no_equals_sign", "backbone.preset.deeper=1", "adapters.x=1"])
    lines = info.value.errors
    assert len(lines) == 4, lines
    assert lines[0].startswith("--set 'adapters.3.rank=8' -> adapters[3]:") and "past the end" in lines[0]
    assert "(it has 1 item)" in lines[0]
    assert lines[1].startswith("--set 'no_equals_sign' -> ") and "dotted.path=value" in lines[1]
    assert lines[2].startswith("--set 'backbone.preset.deeper=1' -> backbone.preset:")
    assert lines[3].startswith("--set 'adapters.x=1' -> adapters:") and "index" in lines[3]


def test_load_spec_reports_override_and_validation_errors_together(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(dump_toml(validate_dict(base())))
    with pytest.raises(SpecError) as info:
        load_spec(path, ["adapters.5.rank=1", "train.lr=-1"])
    assert len(info.value.errors) == 2
    assert load_spec(path, ["adapters.0.rank=32"]).adapters[0].kwargs["rank"] == 32


# ------------------------------------------------------------------------------------------------------------
# TOML files, resolving, round trip
# ------------------------------------------------------------------------------------------------------------


def test_toml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('seed = 1\n\n[train]\nlr = = 3\n')
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (line,) = info.value.errors
    assert str(path) in line and "line 4" in line and "column" in line and "lr = = 3" in line


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_spec(tmp_path / "nope.toml")


def test_resolve_fills_defaults_and_pins_versions():
    data = base()
    data["adapters"] = [{"name": "testonly_spec_adapter", "rank": 4}, {"name": "testonly_spec_adapter.v1"}]
    resolved = resolve(validate_dict(data))
    assert resolved["adapters"][0] == {"name": "testonly_spec_adapter.v2", "rank": 4, "alpha": 1.0}
    assert resolved["adapters"][1] == {
        "name": "testonly_spec_adapter.v1",
        "targets": ["vision.attn.q", "vision.attn.v"],
        "rank": 8,
        "share": "all",
        "layers": None,
    }
    assert resolved["backbone"] == {"name": "testonly_spec_backbone.v1", "preset": "tiny", "freeze": True}
    assert resolved["side_network"] == {"name": "testonly_spec_side.v1", "rank": 4, "filter": "gate"}
    assert resolved["train"]["weight_decay"] == 0.05 and resolved["eval"]["batch_size"] == 64
    assert list(resolved)[:4] == ["seed", "output_dir", "plugins", "backbone"]


@pytest.mark.parametrize(
    "overrides",
    [[], ["side_network.name=none", "alignment_loss.name=none", "train.max_steps=5", "train.grad_clip=1.0"]],
)
def test_dump_load_round_trip(tmp_path, overrides):
    spec = validate_dict(apply_overrides(base(), overrides))
    text = dump_toml(spec)
    again = validate_dict(tomllib.loads(text))
    assert resolve(again) == resolve(spec)
    assert dump_toml(again) == text
    path = write_resolved(spec, tmp_path / "out" / "spec.resolved.toml")
    assert resolve(load_spec(path)) == resolve(spec)

"""The registries: versioned names, refused duplicates, helpful unknown-name errors, plugins, and the index
(``registry.toml``) kept equal to the live registrations."""

from __future__ import annotations

import os
import textwrap
import uuid
from pathlib import Path

import pytest

from unitrans import registry
from unitrans.registry import DuplicateComponentError, RegistryError, UnknownComponentError

SNAPSHOT = Path(__file__).with_name("registry_snapshot.txt")
UPDATE_ENV = "UNITRANS_UPDATE_REGISTRY_SNAPSHOT"


def unique(base: str) -> str:
    """A name no other test (or run of this one in the same process) uses."""
    return f"testonly_{base}_{uuid.uuid4().hex[:8]}"


def test_duplicate_name_is_refused():
    name = unique("dup") + ".v1"

    def first():
        """First."""

    def second():
        """Second, same name."""

    registry.adapters.register(name)(first)
    registry.adapters.register(name)(first)  # the same function again (a module imported twice) is fine
    with pytest.raises(DuplicateComponentError) as info:
        registry.adapters.register(name)(second)
    message = str(info.value)
    assert name in message and "first" in message and "second" in message
    assert registry.get("adapters", name) is first


def test_unversioned_name_is_rejected_at_registration():
    name = unique("nover")
    with pytest.raises(RegistryError) as info:
        registry.adapters.register(name)(lambda: None)
    assert f"'{name}.v1'" in str(info.value)
    assert name not in registry.adapters


def test_unknown_name_lists_available_and_suggests():
    name = unique("adapter")
    registry.adapters.register(f"{name}.v1")(lambda: None)
    typo = name[:-1]  # one character short
    with pytest.raises(UnknownComponentError) as info:
        registry.get("adapters", typo)
    message = str(info.value)
    assert f"unknown adapter '{typo}'" in message
    assert f"Did you mean '{name}" in message
    assert f"{name}.v1" in message  # the available names
    assert "registry.toml" in message and "plugins" in message  # where names come from
    assert isinstance(info.value, RegistryError) and info.value.available == registry.available("adapters")


def test_unversioned_lookup_resolves_to_highest_version():
    name = unique("multi")

    def v1():
        """v1"""

    def v2():
        """v2"""

    def v10():
        """v10"""

    registry.tasks.register(f"{name}.v1")(v1)
    registry.tasks.register(f"{name}.v2")(v2)
    assert registry.resolve_name("tasks", name) == f"{name}.v2"
    assert registry.get("tasks", name) is v2
    registry.tasks.register(f"{name}.v10")(v10)  # versions compare as numbers, not strings
    assert registry.resolve_name("tasks", name) == f"{name}.v10"
    assert registry.get("tasks", f"{name}.v1") is v1  # a pinned name stays pinned


def test_unknown_kind():
    with pytest.raises(RegistryError) as info:
        registry.available("widgets")
    assert "adapters" in str(info.value)


def test_plugin_module_registers_components(tmp_path, monkeypatch):
    module = unique("plugin_mod")
    name = unique("plugin_adapter") + ".v1"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            f'''
            """A light plugin module, as a user keeps it beside a spec."""
            from unitrans import registry

            @registry.adapters.register("{name}")
            def build(rank: int = 4):
                """An adapter from a local plugin."""
                return rank
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert name not in registry.available("adapters")
    registry.load_plugins([module])
    assert name in registry.available("adapters")
    assert registry.get("adapters", name)(rank=3) == 3
    with pytest.raises(RegistryError) as info:
        registry.load_plugins([unique("missing_mod")])
    assert "could not be imported" in str(info.value)


def _first_party(func) -> bool:
    return getattr(func, "__module__", "").startswith(("unitrans.", "unitrans_")) or func.__module__ == "unitrans"


def test_registry_toml_is_generated_and_fresh():
    """registry.toml is exactly what ``python -m unitrans.registry`` writes from the registrations (so it lists
    every first-party component, with its builder's summary, and nothing else); and it parses."""
    assert registry.index_path().read_text(encoding="utf-8") == registry.render_index(), (
        "registry.toml is stale: run `python -m unitrans.registry` and commit the file")
    indexed = {(e.kind, e.name): e for e in registry.read_index()}
    assert indexed[("adapters", "vcra.v1")].target == "unitrans.adapters:vcra_v1"
    assert indexed[("adapters", "vcra.v1")].summary.startswith("VCRA (UniTrans eq. 3-4)")
    for kind in registry.KINDS:  # a first-party component registered outside the listed modules would be missed
        for name, func in registry.kind(kind).live().items():
            if func.__module__.startswith("unitrans."):
                assert func.__module__ in registry.FIRST_PARTY_MODULES, (
                    f"{func.__module__} registers {kind} '{name}'; add the module to registry.FIRST_PARTY_MODULES")


def test_registry_check_command_reports_a_stale_index(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "registry.toml"
    stale.write_text(registry.render_index().replace('[adapters."lora.v1"]', '[adapters."lora.v9"]'))
    monkeypatch.setattr(registry, "index_path", lambda: stale)
    assert registry.main(["--check"]) == 1 and "stale" in capsys.readouterr().out
    assert registry.main([]) == 0 and registry.main(["--check"]) == 0
    assert stale.read_text() == registry.render_index()


def _snapshot_lines() -> list[tuple[str, str]]:
    rows = []
    for raw in SNAPSHOT.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            kind, name = line.split()
            rows.append((kind, name))
    return rows


def _current_first_party() -> list[tuple[str, str]]:
    registry.import_all_indexed()
    rows = {(e.kind, e.name) for e in registry.read_index()}
    for kind in registry.KINDS:
        rows.update((kind, n) for n, f in registry.kind(kind).live().items() if _first_party(f))
    return sorted(rows, key=lambda r: (registry.KINDS.index(r[0]), r[1]))


def test_registered_names_never_disappear():
    """Every name in the committed snapshot is still available. To add new names to the snapshot, run
    ``UNITRANS_UPDATE_REGISTRY_SNAPSHOT=1 pytest tests/test_registry.py`` and commit the file."""
    if os.environ.get(UPDATE_ENV):
        header = (
            "# Registered first-party names (`kind name`). A test checks each one is still available: a name may\n"
            "# get a new version beside it, but never silently disappear. Regenerate with\n"
            f"#   {UPDATE_ENV}=1 pytest tests/test_registry.py\n"
        )
        previous = set(_snapshot_lines()) if SNAPSHOT.is_file() else set()
        rows = sorted(set(_current_first_party()) | previous, key=lambda r: (registry.KINDS.index(r[0]), r[1]))
        SNAPSHOT.write_text(header + "".join(f"{k} {n}\n" for k, n in rows))
    if not SNAPSHOT.is_file():
        pytest.skip(f"{SNAPSHOT.name} does not exist")
    rows = _snapshot_lines()
    if not rows:
        pytest.skip(f"{SNAPSHOT.name} lists no names yet")
    missing = [f"{k} {n}" for k, n in rows if k not in registry.KINDS or n not in registry.available(k)]
    assert not missing, (
        f"names in {SNAPSHOT.name} are no longer available: {', '.join(missing)}. Keep old versions registered "
        "beside new ones (specs and resolved specs name them)."
    )

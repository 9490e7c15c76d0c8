"""Component registries: one per kind, versioned names, lazy first-party index, third-party entry points.

Names carry a version (``"vcra.v1"``). A spec may name a component without its version (``"vcra"``); it then
resolves to the highest registered version, and the resolved spec pins it.

Where names come from, in the order they are consulted:

1. components already registered in this process (``@registry.adapters.register("my.v1")``);
2. ``registry.toml`` (in the package; the repository root links to it): the index of first-party components
   (kind, name, ``module:attr``, summary), *generated* from the registrations by ``python -m unitrans.registry``
   (a test checks it is fresh). Listing reads it without importing anything heavy; a module is imported only when
   a spec names one of its components;
3. modules named in a spec's ``plugins = [...]`` (local code) and the ``unitrans.plugins`` entry-point group
   (installed packages). The first-party BLIP and CLIP plugins load through that same entry-point group.

catalogue's registries silently overwrite a name registered twice; here a duplicate is refused.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import catalogue

from unitrans.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KINDS: tuple[str, ...] = ("backbones", "adapters", "side_networks", "alignment_losses", "tasks", "datasets")
ENTRY_POINT_GROUP = "unitrans.plugins"
SINGULAR = {"backbones": "backbone", "adapters": "adapter", "side_networks": "side network",
            "alignment_losses": "alignment loss", "tasks": "task", "datasets": "dataset"}
_VERSIONED = re.compile(r"^(?P<base>[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*?)\.v(?P<version>\d+)$")


class RegistryError(UserError):
    """A registration or lookup problem a user can act on."""


class DuplicateComponentError(RegistryError):
    pass


class UnknownComponentError(RegistryError):
    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        close = difflib.get_close_matches(name, available + sorted({split_version(a)[0] for a in available}), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(available) if available else "(none)"
        super().__init__(
            f"unknown {SINGULAR.get(kind, kind)} '{name}'.{hint} Available: {listing}. "
            f"Names come from registry.toml (first-party), the '{ENTRY_POINT_GROUP}' entry-point group "
            f"(installed plugins) and the spec's `plugins = [\"module\"]` list."
        )


def split_version(name: str) -> tuple[str, int | None]:
    """``"vcra.v1"`` -> ``("vcra", 1)``; ``"vcra"`` -> ``("vcra", None)``."""
    m = _VERSIONED.match(name)
    if m:
        return m.group("base"), int(m.group("version"))
    return name, None


@dataclass(frozen=True)
class IndexEntry:
    kind: str
    name: str
    target: str  # "module:attr"
    summary: str


class Kind:
    """One registry (e.g. adapters), backed by catalogue, that refuses duplicate names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._cat = catalogue.create("unitrans", kind, entry_points=False)

    def register(self, name: str, func: Callable | None = None):
        if split_version(name)[1] is None:
            raise RegistryError(f"{self.kind}: name '{name}' has no version; register it as '{name}.v1'")

        def do(f: Callable) -> Callable:
            if name in self._cat:
                existing = self._cat.get(name)
                if existing is f or (
                    getattr(existing, "__module__", None) == getattr(f, "__module__", None)
                    and getattr(existing, "__qualname__", None) == getattr(f, "__qualname__", None)
                ):
                    return f  # the same module imported twice (e.g. as a plugin and via the index)
                raise DuplicateComponentError(
                    f"{self.kind}: '{name}' is already registered by "
                    f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', '?')}; "
                    f"refusing {getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', '?')}. "
                    "Give the new component a new name or version."
                )
            self._cat.register(name, func=f)
            return f

        return do(func) if func is not None else do

    def live(self) -> dict[str, Callable]:
        return dict(self._cat.get_all())

    def __contains__(self, name: str) -> bool:
        return name in self._cat


backbones = Kind("backbones")
adapters = Kind("adapters")
side_networks = Kind("side_networks")
alignment_losses = Kind("alignment_losses")
tasks = Kind("tasks")
datasets = Kind("datasets")
_KINDS: dict[str, Kind] = {k: globals()[k] for k in KINDS}

def kind(name: str) -> Kind:
    if name not in _KINDS:
        raise RegistryError(f"unknown kind '{name}'; kinds are: {', '.join(KINDS)}")
    return _KINDS[name]


def index_path() -> Path:
    """``unitrans/registry.toml``, shipped inside the package (``registry.toml`` at the repo root links to it)."""
    return Path(__file__).resolve().parent / "registry.toml"


_index_cache: list[IndexEntry] | None = None


def read_index() -> list[IndexEntry]:
    """Entries of registry.toml (no import of any component module)."""
    global _index_cache
    if _index_cache is None:
        path = index_path()
        entries: list[IndexEntry] = []
        if path.is_file():
            data = tomllib.loads(path.read_text())
            for kind_name, table in data.items():
                if kind_name not in _KINDS:
                    raise RegistryError(f"{path}: unknown kind [{kind_name}]; kinds are: {', '.join(KINDS)}")
                for name, row in table.items():
                    entries.append(IndexEntry(kind_name, name, row["target"], row.get("summary", "")))
        _index_cache = entries
    return _index_cache


def _import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


_entry_points_loaded = False


def load_entry_points() -> None:
    """Import every module in the ``unitrans.plugins`` entry-point group (each registers its components)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plugin must not break every run
            print(f"warning: plugin entry point '{ep.name} = {ep.value}' failed to load: {exc!r}", file=sys.stderr)


def load_plugins(modules: Iterable[str]) -> None:
    """Import the spec's ``plugins = [...]`` modules (local code that registers components)."""
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as exc:  # ImportError, but also a SyntaxError or any error the plugin raises on import
            raise RegistryError(f"plugin module '{m}' could not be imported: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from exc


def available(kind_name: str) -> list[str]:
    """Every known name of a kind: live, indexed (without importing) and entry-point plugins."""
    load_entry_points()
    names = set(kind(kind_name).live())
    names.update(e.name for e in read_index() if e.kind == kind_name)
    return sorted(names)


def resolve_name(kind_name: str, name: str) -> str:
    """Pin a name to a version: ``"vcra"`` -> highest ``"vcra.vN"``; a versioned name is returned as is."""
    names = available(kind_name)
    if name in names:
        return name
    base, version = split_version(name)
    if version is None:
        versions = [(split_version(n)[1] or 0, n) for n in names if split_version(n)[0] == name]
        if versions:
            return max(versions)[1]
    raise UnknownComponentError(kind_name, name, names)


def get(kind_name: str, name: str) -> Callable:
    """The builder registered under ``name`` (versioned or not), importing its module if needed."""
    reg = kind(kind_name)
    if name in reg:
        return reg.live()[name]
    resolved = resolve_name(kind_name, name)
    if resolved not in reg:
        for e in read_index():
            if e.kind == kind_name and e.name == resolved:
                _import_target(e.target.partition(":")[0])
                break
    if resolved not in reg:
        raise UnknownComponentError(kind_name, name, available(kind_name))
    return reg.live()[resolved]


def import_all_indexed() -> None:
    """Import every module the index names (used by the test that keeps the index and the registries equal)."""
    for e in read_index():
        _import_target(e.target.partition(":")[0])
    load_entry_points()


# ---- the generated index ------------------------------------------------------------------------------------------
#: The modules that register first-party components (the first-party backbone plugins included).
FIRST_PARTY_MODULES: tuple[str, ...] = (
    "unitrans.adapters", "unitrans.side_networks", "unitrans.alignment_losses", "unitrans.tasks", "unitrans.data",
    "unitrans.data.generated", "unitrans_blip", "unitrans_clip", "unitrans_blip2", "unitrans_llava",
)
_INDEX_HEADER = """\
# GENERATED by `python -m unitrans.registry` from the first-party registrations: do not edit (a test checks it is
# fresh). Kind -> name -> target ("module:attr") and summary (the first paragraph of the builder's docstring).
# `unitrans list` reads this file without importing torch; a module is imported only when a spec names one of
# its components.
"""


def summary_of(builder: Callable) -> str:
    """The first paragraph of a builder's docstring, on one line (its one-line description)."""
    return " ".join(inspect.cleandoc(builder.__doc__ or "").split("\n\n")[0].split())


def first_party_registrations() -> list[IndexEntry]:
    """Every component the first-party modules register, in kind order then by name (imports them)."""
    for module in FIRST_PARTY_MODULES:
        importlib.import_module(module)
    entries = []
    for kind_name in KINDS:
        for name, builder in sorted(kind(kind_name).live().items()):
            if builder.__module__ in FIRST_PARTY_MODULES:
                target = f"{builder.__module__}:{builder.__qualname__}"
                entries.append(IndexEntry(kind_name, name, target, summary_of(builder)))
    return entries


def render_index() -> str:
    """The text of ``registry.toml`` for the current first-party registrations."""
    lines = [_INDEX_HEADER]
    for e in first_party_registrations():
        lines.append(f'\n[{e.kind}."{e.name}"]\ntarget = {json.dumps(e.target)}\n'
                     f"summary = {json.dumps(e.summary, ensure_ascii=False)}\n")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m unitrans.registry [--check]``: write ``registry.toml`` (``--check``: exit 1 when stale)."""
    fresh, path = render_index(), index_path()
    if "--check" in (argv if argv is not None else sys.argv[1:]):
        stale = not path.is_file() or path.read_text(encoding="utf-8") != fresh
        print(f"{path} is {'stale: run python -m unitrans.registry' if stale else 'fresh'}")
        return int(stale)
    path.write_text(fresh, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # run as a script, act on the package's registries (not this __main__ copy)
    sys.exit(importlib.import_module("unitrans.registry").main())

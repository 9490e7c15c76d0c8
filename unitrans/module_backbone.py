"""Any ``nn.Module`` as a backbone: injection points named by a map from the shared vocabulary to module globs.

``{"text.attn.q": "*.attention.self.query", "text.attn.v": "*.attention.self.value"}`` makes every
``nn.Linear`` whose dotted module name matches the glob a point of that name, in the layer given by the first
integer of its path (``encoder.layer.3.attention.self.query`` is layer 3). A fused projection is split by rows:
``"*.attn.qkv[0/3]"`` is the first third of the rows, ``"*.attn.qkv[0:64]"`` rows 0 to 63.
``"fusion.blocks": "encoder.layer.*"`` names the blocks a side network hooks (they must take the stream as their
first argument or as ``hidden_states``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Mapping, Sequence

from torch import nn

from unitrans.errors import UserError
from unitrans.interfaces import CONTRACT, Backbone, FusionNetwork, InjectionPoint

#: The first part of a point name -> its modality.
PREFIX_MODALITY = {"vision": "V", "text": "T", "fusion": "C", "decoder": "D"}
FUSION_BLOCKS = "fusion.blocks"
_ROWS = re.compile(r"^(?P<glob>.+?)\[(?:(?P<k>\d+)/(?P<n>\d+)|(?P<start>\d+):(?P<stop>\d+))\]$")
_INDEX = re.compile(r"^\d+$")


def _rows(target: str, module: nn.Linear) -> slice | None:
    """The row slice a target's suffix names (``[k/n]`` or ``[a:b]``), ``None`` without one."""
    m = _ROWS.match(target)
    if m is None:
        return None
    out = module.out_features
    if m["k"] is not None:
        k, n = int(m["k"]), int(m["n"])
        if n == 0 or out % n or k >= n:
            raise UserError(f"points: '{target}': {module.out_features} rows cannot be cut into block {k} of {n}")
        return slice(k * out // n, (k + 1) * out // n)
    start, stop = int(m["start"]), int(m["stop"])
    if not 0 <= start < stop <= out:
        raise UserError(f"points: '{target}': rows {start}:{stop} are outside the module's {out} rows")
    return slice(start, stop)


def _glob(target: str) -> str:
    m = _ROWS.match(target)
    return m["glob"] if m else target


def _matches(model: nn.Module, key: str, target: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule whose dotted name matches ``target``'s glob; refuses none."""
    named = [(n, m) for n, m in model.named_modules() if n]
    found = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, _glob(target))]
    if not found:
        raise UserError(f"points: '{key}' = '{target}' matches no submodule of {type(model).__name__}"
                        + _similar(_glob(target), [n for n, _ in named]))
    return found


def _similar(glob: str, names: list[str]) -> str:
    """``"; similar: bert.encoder.layer.0.attention.self.query, ..."``: names whose last part is close to the
    glob's last part (the part a typo usually is in), or ``""``."""
    last = {n.rsplit(".", 1)[-1]: n for n in reversed(names)}  # last part -> its first module
    close = difflib.get_close_matches(glob.rsplit(".", 1)[-1], list(last), n=3, cutoff=0.5)
    return f"; similar: {', '.join(last[c] for c in close)}" if close else ""


def _layer(path: str, ordinal: int) -> int:
    """The first integer part of a dotted module path (``encoder.layer.3.x`` -> 3), else ``ordinal``."""
    return next((int(part) for part in path.split(".") if _INDEX.match(part)), ordinal)


def _modality(key: str) -> str:
    head = key.split(".", 1)[0]
    if head not in PREFIX_MODALITY or "." not in key:
        raise UserError(f"points: '{key}' is not a point name; names are dotted and start with one of "
                        f"{', '.join(PREFIX_MODALITY)} (e.g. 'text.attn.q', 'vision.mlp.fc1')")
    return PREFIX_MODALITY[head]


def _points_of(model: nn.Module, key: str, target: str) -> list[InjectionPoint]:
    """The points one map entry names, one per matched linear, with distinct layer indices."""
    modality, points = _modality(key), []
    for i, (path, module) in enumerate(_matches(model, key, target)):
        if not isinstance(module, nn.Linear):
            raise UserError(f"points: '{key}' = '{target}' matches {path}, a {type(module).__name__}; injection "
                            "points are nn.Linear modules (narrow the glob)")
        rows = _rows(target, module)
        parent = path.rsplit(".", 1)[0]
        attention = parent if key.split(".")[1:2] == ["attn"] else None
        n_out = module.out_features if rows is None else rows.stop - rows.start
        points.append(InjectionPoint(key, _layer(path, i), modality, module, rows, module.in_features, n_out,
                                     input_group=f"{parent}.in", attention=attention))
    layers = [p.layer for p in points]
    if len(set(layers)) != len(layers):
        raise UserError(f"points: '{key}' = '{target}' matches {len(layers)} linears in layers {layers}; each layer "
                        "may hold one (narrow the glob, e.g. to one tower)")
    return points


def points_from_map(model: nn.Module, point_map: Mapping[str, str]) -> list[InjectionPoint]:
    """Every injection point a name map names, in map order (then layer order)."""
    points: list[InjectionPoint] = []
    for key, target in point_map.items():
        if key != FUSION_BLOCKS:
            points += sorted(_points_of(model, key, target), key=lambda p: p.layer)
    return points


class ModuleBackbone(Backbone):
    """A user's ``nn.Module``, frozen, with the injection points of a name map (see the module docstring).

    Args:
        model: the module; every parameter is frozen except those under ``train_parts``.
        points: name map, point name -> module glob (optionally with a row suffix).
        train_parts: submodule or parameter names that train anyway (a classifier head).
    """

    contract_version = CONTRACT

    def __init__(self, model: nn.Module, points: Mapping[str, str], train_parts: Sequence[str] = ()):
        self.model = model
        self.name = f"module:{type(model).__name__}"
        self.point_map = dict(points)
        self.train_parts = list(train_parts)
        self._points = points_from_map(model, self.point_map)
        model.requires_grad_(False)
        for part in self.train_parts:
            _part(model, part).requires_grad_(True)

    def injection_points(self) -> list[InjectionPoint]:
        return self._points

    def declared_points(self) -> list[str]:
        return list(self.point_map)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


class ModuleFusionBackbone(ModuleBackbone, FusionNetwork):
    """A :class:`ModuleBackbone` whose map names ``fusion.blocks``: side networks can hook them."""

    def __init__(self, model: nn.Module, points: Mapping[str, str], train_parts: Sequence[str] = (),
                 fusion_width: int | None = None):
        super().__init__(model, points, train_parts)
        self._blocks = _outermost(_matches(model, FUSION_BLOCKS, self.point_map[FUSION_BLOCKS]))
        self._width = fusion_width or _first_linear_width(self._blocks[0], self.point_map[FUSION_BLOCKS])

    def fusion_blocks(self) -> list[nn.Module]:
        return self._blocks

    def fusion_width(self) -> int:
        return self._width


def module_backbone(model: nn.Module, points: Mapping[str, str], train_parts: Sequence[str] = (),
                    fusion_width: int | None = None) -> ModuleBackbone:
    """The backbone over ``model`` that the map describes (with fusion blocks when it names ``fusion.blocks``)."""
    if not points:
        raise UserError("attach: a plain nn.Module needs points={'text.attn.q': '*.attention.self.query', ...}, "
                        "a map from point names to module globs")
    if FUSION_BLOCKS in points:
        return ModuleFusionBackbone(model, points, train_parts, fusion_width)
    return ModuleBackbone(model, points, train_parts)


def _part(model: nn.Module, name: str):
    """A submodule or a parameter of ``model`` by dotted name; refuses others, naming the top-level parts."""
    for getter in (model.get_submodule, model.get_parameter):
        try:
            return getter(name)
        except AttributeError:
            pass
    children = ", ".join(n for n, _ in model.named_children())
    raise UserError(f"train_parts: '{name}' is neither a submodule nor a parameter of {type(model).__name__}; "
                    f"top-level parts are: {children}")


def _outermost(found: list[tuple[str, nn.Module]]) -> list[nn.Module]:
    """The matched modules that lie in no other matched one (``encoder.layer.*`` also matches each layer's
    submodules: ``*`` crosses dots), in model order."""
    names = [n for n, _ in found]
    return [m for n, m in found if not any(n.startswith(f"{other}.") for other in names)]


def _first_linear_width(block: nn.Module, target: str) -> int:
    first = next((m for m in block.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise UserError(f"points: fusion.blocks = '{target}': the blocks hold no nn.Linear to read their width "
                        "from; pass fusion_width=")
    return first.in_features

"""The Python API: attach adapters to a backbone or to any ``nn.Module``, build a spec, save, load and export.

::

    import torch, transformers, unitrans

    model = transformers.BertForSequenceClassification(config)
    handle = unitrans.attach(model, "vcra", rank=8, train_parts=["classifier"],
                             points={"text.attn.q": "*.attention.self.query", "text.attn.v": "*.attention.self.value"})
    handle.print_trainable_parameters()
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
    ...                                   # the user's own loop calls model(...) as before
    handle.save("out/")                   # adapter.safetensors + adapter.json, as a run writes them
    again = unitrans.load_adapter(fresh_model, "out/")

Adapters act through hooks on the model's own linears (nothing is replaced, state-dict keys stay the model's);
``attach`` freezes the model's weights except ``train_parts``. Caches are the adapters' business: a training loop
needs no call besides its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from unitrans.engine.checkpoint import FORMAT  # the adapter.json / adapter.safetensors format a run writes
from unitrans.errors import UserError
from unitrans.handle import Handle

AdapterSpec = str | Mapping[str, Any]


def _table(spec: AdapterSpec, defaults: Mapping[str, Any]) -> Any:
    """A component spec from a name or a ``{"name": ..., **options}`` table, over ``defaults``."""
    from unitrans.spec import ComponentSpec

    return ComponentSpec(**{**defaults, **({"name": spec} if isinstance(spec, str) else dict(spec))})


def _component(kind: str, spec: AdapterSpec, location: str, defaults: Mapping[str, Any] = {}) -> tuple[str, Any, dict]:
    """``(name, component, resolved table)``: built and validated as a spec's component is (errors name
    ``location``); the resolved table, every option filled, is what ``adapter.json`` records."""
    from unitrans.engine.build import build_component
    from unitrans.spec import component_kwargs

    comp = _table(spec, defaults)
    name, obj = build_component(kind, comp, location)
    return name, obj, {"name": name, **component_kwargs(kind, comp, location)}


def _adapter_list(adapters: AdapterSpec | Sequence[AdapterSpec], options: Mapping[str, Any]) -> list[AdapterSpec]:
    if isinstance(adapters, (str, Mapping)):
        return [{"name": adapters, **options} if isinstance(adapters, str) else {**adapters, **options}]
    if options:
        raise UserError(f"attach: options {sorted(options)} apply to one adapter; with a list, put them in its "
                        "table: [{'name': 'vcra', 'rank': 8}, ...]")
    return list(adapters)


def attach(model, adapters: AdapterSpec | Sequence[AdapterSpec] = "vcra", *,
           points: Mapping[str, str] | None = None, side_network: AdapterSpec | None = None,
           train_parts: Sequence[str] = (), fusion_width: int | None = None, **options) -> Handle:
    """Attach adapters (and a side network) to a UniTrans backbone or to any ``nn.Module``.

    Args:
        model: a :class:`~unitrans.interfaces.Backbone`, or a plain ``nn.Module`` with ``points``.
        adapters: a registered adapter name (``"vcra"``, ``"lora.v1"``) with its options as keywords, a table
            ``{"name": "vcra", "rank": 8}``, or a list of tables. On a plain module, ``targets`` defaults to
            every point of the map.
        points: for a plain module, point name -> module glob (``{"text.attn.q": "*.attention.self.query"}``;
            ``"*.qkv[0/3]"`` takes a fused linear's first third of rows; ``"fusion.blocks"`` names the blocks a side
            network hooks). See :mod:`unitrans.module_backbone`.
        side_network: a side network name or table (``"qasn"``), or ``None``.
        train_parts: for a plain module, submodules or parameters that train with the adapters (a new head).
        fusion_width: for a plain module with ``fusion.blocks``, the blocks' width when it cannot be read off.
        **options: options of the one adapter named by ``adapters`` (``rank=8``).

    Returns:
        A :class:`~unitrans.handle.Handle`; the model itself now computes with the adapters.

    Raises:
        UserError: an unknown name or option (every problem, one line each), a point map that matches nothing,
            a target outside the points, a backbone without a capability the side network needs.
    """
    from unitrans.engine.build import attach_adapters, attach_side_network, trainable_module
    from unitrans.interfaces import Backbone, check_contract
    from unitrans.module_backbone import FUSION_BLOCKS, module_backbone

    if isinstance(model, Backbone):
        if points is not None or train_parts:
            raise UserError("attach: points= and train_parts= are for a plain nn.Module; a backbone has its own "
                            "injection points and its builder's train_parts")
        backbone, defaults, origin = model, {}, {"name": model.name}
    else:
        backbone = module_backbone(model, points or {}, train_parts, fusion_width)
        defaults = {"targets": [k for k in backbone.point_map if k != FUSION_BLOCKS]}
        origin = {"module": f"{type(model).__module__}.{type(model).__qualname__}", "points": backbone.point_map,
                  "train_parts": list(train_parts), "fusion_width": fusion_width}
    check_contract(backbone)
    tables = _adapter_list(adapters, options)
    made = [_component("adapters", t, f"adapters[{i}]", defaults) for i, t in enumerate(tables)]
    built = [a for _, a, _ in made]
    attach_adapters(backbone, [(n, a) for n, a, _ in made])
    names = {"backbone": backbone.name} | {f"adapters.{i}": n for i, (n, _, _) in enumerate(made)}
    side, side_table = None, None
    if side_network is not None and _name_of(side_network) != "none":
        names["side_network"], side, side_table = _component("side_networks", side_network, "side_network")
        attach_side_network(backbone, names["side_network"], side, built)
    manifest = {"backbone": origin, "adapters": [t for _, _, t in made], "side_network": side_table}
    return Handle(backbone, built, side, None, None, None, names, trainable_module(built, side), manifest=manifest)


def _name_of(spec: AdapterSpec) -> str:
    return spec if isinstance(spec, str) else str(spec.get("name"))


def build(spec, *, overrides: Sequence[str] = (), device: str = "cpu", with_data: bool = False) -> Handle:
    """Build a spec's components without training: backbone, adapters, side network, losses, task (and data).

    Args:
        spec: a :class:`~unitrans.spec.Spec`, a spec dict, or the path of a TOML spec.
        overrides: ``"dotted.key=value"`` changes, as ``--set`` gives them.
        device: where the backbone and the adapters live.
        with_data: build the data module too (``handle.data``; its ``setup`` prepares the splits).
    """
    from unitrans.engine.build import build as build_spec
    from unitrans.spec import Spec, apply_overrides, load_spec, resolve, validate_dict

    if isinstance(spec, (str, Path)):
        spec = load_spec(spec, overrides)
    elif not isinstance(spec, Spec):
        spec = validate_dict(apply_overrides(spec, overrides))
    elif overrides:
        spec = validate_dict(apply_overrides(resolve(spec), overrides))
    return build_spec(spec, device, with_data=with_data)


def save_adapter(handle: Handle, directory: str | Path) -> dict:
    """Write ``adapter.safetensors`` and ``adapter.json`` of ``handle`` into ``directory``; returns the manifest."""
    return handle.save(directory)


def write_adapter_files(handle: Handle, directory: Path) -> dict:
    """The adapter files of a handle made by :func:`attach` (no spec): tensors, and how to attach them again."""
    from safetensors.torch import save

    from unitrans.fileio import atomic_write_bytes, atomic_write_json

    state = {k: v.detach().contiguous().cpu() for k, v in handle.trainable_state().items()}
    manifest = {"format": FORMAT, "tensors": {k: list(v.shape) for k, v in state.items()},
                "components": handle.names, **handle.manifest, "numel": sum(v.numel() for v in state.values())}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / "adapter.safetensors", save(state, metadata={"format": FORMAT}))
    atomic_write_json(directory / "adapter.json", manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """``directory/adapter.json``, checked to be an adapter manifest."""
    path = Path(directory) / "adapter.json"
    if not path.is_file():
        raise UserError(f"no adapter manifest at {path} (a run folder, or a folder handle.save() wrote)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a UniTrans adapter manifest (format {FORMAT!r})")
    return manifest


def load_adapter(model, directory: str | Path) -> Handle:
    """The adapter saved in ``directory`` (``adapter.json`` + ``adapter.safetensors``), attached and loaded.

    Args:
        model: a :class:`~unitrans.handle.Handle` (its tensors are loaded in place); the plain ``nn.Module`` or
            backbone it was saved from (attached as the manifest says); or ``None`` for a run's folder, whose
            backbone is built from the manifest's backbone spec.
        directory: the folder holding the two files.

    Returns:
        The handle, with every trainable tensor loaded (names and shapes must match; the first mismatch is
        refused by name).
    """
    if isinstance(model, Handle):
        return model.load(directory)
    manifest = read_manifest(directory)
    origin = manifest.get("backbone") or {}
    side = manifest.get("side_network")
    side = None if not side or side.get("name") == "none" else side
    if model is None:
        model = _backbone_of(origin, Path(directory))
    keys = ("points", "train_parts", "fusion_width") if "module" in origin else ()
    extra = {k: origin[k] for k in keys if origin.get(k)}
    return attach(model, manifest.get("adapters", []), side_network=side, **extra).load(directory)


def _backbone_of(origin: Mapping[str, Any], directory: Path):
    """The backbone a run's manifest names (its resolved spec table), built here."""
    from unitrans.engine.build import build_component
    from unitrans.spec import ComponentSpec

    if "module" in origin or len(origin) <= 1:  # a plain module, or a backbone object given to attach()
        raise UserError(f"{directory / 'adapter.json'} was saved from {origin.get('module') or origin.get('name')}, "
                        "which the manifest cannot rebuild: pass the model, load_adapter(model, directory)")
    return build_component("backbones", ComponentSpec(**origin), "backbone")[1]

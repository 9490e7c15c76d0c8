"""Spec -> objects: registry lookups, backbone, injection points, adapters, side network, losses, task, data.

This is the only place that looks anything up in the registries; the loop receives built objects (a
:class:`~unitrans.handle.Handle`). :func:`unitrans.attach` uses the same attach functions on a user's model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unitrans import registry
from unitrans.errors import UserError
from unitrans.handle import Handle
from unitrans.interfaces import check_capabilities, check_contract, match_points


def build_component(kind: str, comp, location: str | None = None) -> tuple[str, Any]:
    """``(pinned name, component)`` of a component spec: its builder called with its validated options
    (``location``, e.g. ``"adapters[0]"``, starts each error line)."""
    from unitrans.spec import component_kwargs

    name = registry.resolve_name(kind, comp.name)
    return name, registry.get(kind, name)(**component_kwargs(kind, comp, location))


def _off(comp) -> bool:
    return comp is None or comp.name == "none"


def attach_adapters(backbone, adapters: list[tuple[str, Any]]) -> None:
    """Attach each ``(name, adapter)`` at the backbone's points its targets select (in list order).

    Raises:
        UserError: a target matches no point, or the targets and layers select none; the message names the
            backbone's declared points.
    """
    points = backbone.injection_points()
    for i, (name, adapter) in enumerate(adapters):
        usable = [p for p in points if adapter.accepts(p)]
        chosen, unmatched = match_points(usable, adapter.targets, adapter.layers)
        if unmatched:
            other = [u for u in unmatched if not match_points(points, [u])[1]]
            raise UserError(
                f"adapters[{i}] ({name}): target(s) {', '.join(repr(u) for u in unmatched)} match no injection point; "
                f"backbone {backbone.name} declares: {', '.join(backbone.declared_points())}"
                + (f". {', '.join(repr(u) for u in other)}: point(s) of a kind {name} cannot act on (a sub-block, "
                   "where a weight update needs a linear, or the reverse)" if other else "")
            )
        if not chosen:
            raise UserError(f"adapters[{i}] ({name}): targets {adapter.targets} with layers={adapter.layers} "
                            "select no injection point")
        if backbone.recomputes_activations:
            adapter.reuse_across_calls = False
        adapter.attach(chosen)


def attach_side_network(backbone, name: str, side, adapters: list) -> None:
    """Check the backbone has what the side network needs (by capability name), then attach it."""
    check_capabilities(backbone, side.required_capabilities(), f"side network {name}",
                       hint=f"Side networks hook injection point 'fusion.blocks'; backbone {backbone.name} "
                            f"declares: {', '.join(backbone.declared_points())}.")
    side.attach(backbone, adapters)


def trainable_module(adapters: list, side, task=None) -> nn.ModuleDict:
    """Adapters, side network and the task's own trainable tensors as one module (``adapters.0.*``,
    ``side_network.*``, ``task.*``: the checkpoint names)."""
    trainable = nn.ModuleDict({"adapters": nn.ModuleList(adapters)})
    if side is not None:
        trainable["side_network"] = side
    task_module = getattr(task, "trainable_module", None)  # e.g. retrieval's learned temperature
    if task_module is not None:
        trainable["task"] = task_module
    return trainable


def build(spec, device: torch.device | str = "cpu", with_data: bool = True) -> Handle:
    """Build every component of ``spec``; the backbone is moved to ``device`` before adapters attach.

    Every capability a component needs is checked against the backbone before any data is read.
    """
    registry.load_plugins(spec.plugins)
    names: dict[str, str] = {}
    names["backbone"], backbone = build_component("backbones", spec.backbone)
    check_contract(backbone)
    backbone.model.to(device)
    adapters = []
    for i, comp in enumerate(spec.adapters):
        names[f"adapters.{i}"], adapter = build_component("adapters", comp)
        adapters.append(adapter)
    attach_adapters(backbone, [(names[f"adapters.{i}"], a) for i, a in enumerate(adapters)])
    side = None
    if not _off(spec.side_network):
        names["side_network"], side = build_component("side_networks", spec.side_network)
        attach_side_network(backbone, names["side_network"], side, adapters)
    alignment = None
    if not _off(spec.alignment_loss):
        names["alignment_loss"], alignment = build_component("alignment_losses", spec.alignment_loss)
    names["task"], task = build_component("tasks", spec.task)
    task.check_backbone(backbone)  # e.g. captioning needs an encoder-decoder: refuse before any data is read
    data = None
    if with_data:
        names["data"], data = build_component("datasets", spec.data)
    trainable = trainable_module(adapters, side, task).to(device)
    return Handle(backbone, adapters, side, alignment, task, data, names, trainable, spec=spec)


def count_parameters(built: Handle) -> dict:
    """Total / trainable parameters, by component and by modality (the paper's "# Tunable")."""
    backbone_params = list(built.backbone.model.parameters())
    by_component: dict[str, dict[str, int]] = {
        f"backbone ({built.names['backbone']})": {
            "total": sum(p.numel() for p in backbone_params),
            "trainable": sum(p.numel() for p in backbone_params if p.requires_grad),
        }
    }
    by_modality: dict[str, int] = {}
    for i, adapter in enumerate(built.adapters):
        n_total = n_train = 0
        for name, p in adapter.named_parameters():
            n_total += p.numel()
            if p.requires_grad:
                n_train += p.numel()
                m = adapter.modality_of_parameter(name)
                by_modality[m] = by_modality.get(m, 0) + p.numel()
        by_component[f"adapters.{i} ({built.names[f'adapters.{i}']})"] = {"total": n_total, "trainable": n_train}
    if built.side_network is not None:
        ps = list(built.side_network.parameters())
        n_train = sum(p.numel() for p in ps if p.requires_grad)
        by_component[f"side_network ({built.names['side_network']})"] = {
            "total": sum(p.numel() for p in ps), "trainable": n_train}
        by_modality["C"] = by_modality.get("C", 0) + n_train
    task_module = built.trainable["task"] if "task" in built.trainable else None
    if task_module is not None:
        ps = list(task_module.parameters())
        by_component[f"task ({built.names['task']})"] = {
            "total": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if p.requires_grad)}
    n_backbone_train = by_component[f"backbone ({built.names['backbone']})"]["trainable"]
    if n_backbone_train:
        by_modality["backbone"] = n_backbone_train
    total = sum(v["total"] for v in by_component.values())
    trainable = sum(v["trainable"] for v in by_component.values())
    return {"total": total, "trainable": trainable, "by_component": by_component, "by_modality": by_modality}

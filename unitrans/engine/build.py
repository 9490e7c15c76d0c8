"""Spec -> objects: registry lookups, backbone, injection points, adapters, side network, losses, task, data.

This is the only place that looks anything up in the registries; the loop receives built objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unitrans import registry
from unitrans.errors import UserError
from unitrans.interfaces import match_points


@dataclass
class Built:
    backbone: Any
    adapters: list
    side_network: Any
    alignment: Any
    task: Any
    data: Any
    names: dict[str, str] = field(default_factory=dict)  # component slot -> pinned registered name
    trainable: nn.ModuleDict = None  # adapters + side network (the parts an adapter checkpoint holds)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by a stable name: adapters, side network and unfrozen backbone parts."""
        state = {n: p for n, p in self.trainable.named_parameters() if p.requires_grad}
        for n, p in self.backbone.trainable_parameters().items():
            state[f"backbone.{n}"] = p
        return state


def _build(kind: str, comp) -> tuple[str, Any]:
    from unitrans.spec import component_kwargs

    name = registry.resolve_name(kind, comp.name)
    return name, registry.get(kind, name)(**component_kwargs(kind, comp))


def _off(comp) -> bool:
    return comp is None or comp.name == "none"


def build(spec, device: torch.device | str = "cpu", with_data: bool = True) -> Built:
    """Build every component of ``spec``; the backbone is moved to ``device`` before adapters attach."""
    registry.load_plugins(spec.plugins)
    names: dict[str, str] = {}
    names["backbone"], backbone = _build("backbones", spec.backbone)
    backbone.model.to(device)
    points = backbone.injection_points()
    adapters = []
    for i, comp in enumerate(spec.adapters):
        name, adapter = _build("adapters", comp)
        names[f"adapters.{i}"] = name
        chosen, unmatched = match_points(points, adapter.targets, adapter.layers)
        if unmatched:
            raise UserError(
                f"adapters[{i}] ({name}): target(s) {', '.join(repr(u) for u in unmatched)} match no injection point; "
                f"backbone {names['backbone']} declares: {', '.join(backbone.declared_points())}"
            )
        if not chosen:
            raise UserError(f"adapters[{i}] ({name}): targets {adapter.targets} with layers={adapter.layers} "
                            "select no injection point")
        if getattr(backbone, "recomputes_activations", False):
            adapter.reuse_across_calls = False
        adapter.attach(chosen)
        adapters.append(adapter)
    side = None
    if not _off(spec.side_network):
        names["side_network"], side = _build("side_networks", spec.side_network)
        try:
            side.attach(backbone, adapters)
        except LookupError as exc:
            raise UserError(f"side network {names['side_network']} needs injection point 'fusion.blocks'; "
                            f"{exc}") from None
    alignment = None
    if not _off(spec.alignment_loss):
        names["alignment_loss"], alignment = _build("alignment_losses", spec.alignment_loss)
    names["task"], task = _build("tasks", spec.task)
    check = getattr(task, "check_backbone", None)
    if check is not None:
        check(backbone)  # e.g. ITM needs a fusion network: refuse before any data is read
    data = None
    if with_data:
        names["data"], data = _build("datasets", spec.data)
    trainable = nn.ModuleDict({"adapters": nn.ModuleList(adapters)})
    if side is not None:
        trainable["side_network"] = side
    task_module = getattr(task, "trainable_module", None)  # e.g. retrieval's learned temperature
    if task_module is not None:
        trainable["task"] = task_module
    trainable.to(device)
    return Built(backbone, adapters, side, alignment, task, data, names, trainable)


def count_parameters(built: Built) -> dict:
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

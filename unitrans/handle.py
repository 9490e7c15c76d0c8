"""What building a spec or attaching adapters gives back: the components, and what a user does with them.

A :class:`Handle` holds the backbone (or a plain module wrapped as one), the attached adapters and side network,
and, when built from a spec, the task, the alignment loss and the data. The adapters act on the backbone's own
modules through hooks, so the user keeps calling their model as before; the handle lists and counts what trains,
saves and loads the trainable tensors alone (``adapter.safetensors`` + ``adapter.json``, the files a run writes),
merges and unmerges, and switches the adapters off inside ``with handle.disabled():``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


@dataclass
class Handle:
    """The built components of a spec, or adapters attached to a model by :func:`unitrans.attach`.

    Attributes:
        backbone: the :class:`~unitrans.interfaces.Backbone` (for a plain module, a ``ModuleBackbone`` over it).
        adapters: the attached adapters, in spec order.
        side_network: the attached side network, or ``None``.
        alignment, task, data: the spec's other components (``None`` after :func:`unitrans.attach`).
        names: component slot -> registered name (``{"adapters.0": "vcra.v1", ...}``).
        trainable: adapters and side network as one module (what an adapter checkpoint holds, with the
            backbone's trainable parts).
        spec: the spec it was built from, or ``None``.
        manifest: what :meth:`save` writes to ``adapter.json`` besides the tensors (how to rebuild it).
    """

    backbone: Any
    adapters: list
    side_network: Any
    alignment: Any
    task: Any
    data: Any
    names: dict[str, str] = field(default_factory=dict)
    trainable: nn.ModuleDict = None
    spec: Any = None
    manifest: dict = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        """The backbone's ``nn.Module`` (the user's model after :func:`unitrans.attach`)."""
        return self.backbone.model

    # ---- what trains ---------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by a stable name: adapters, side network and unfrozen backbone parts."""
        state = {n: p for n, p in self.trainable.named_parameters() if p.requires_grad}
        for n, p in self.backbone.trainable_parameters().items():
            state[f"backbone.{n}"] = p
        return state

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The tensors an optimizer updates (``torch.optim.AdamW(handle.trainable_parameters())``)."""
        return list(self.trainable_state().values())

    def parameter_counts(self) -> dict:
        """Total and trainable parameters, by component and by modality (what ``params.json`` holds)."""
        from unitrans.engine.build import count_parameters

        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Prints ``trainable params: 5,827 || all params: 226,117 || trainable%: 2.5770``."""
        c = self.parameter_counts()
        print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
              f"trainable%: {100 * c['trainable'] / max(1, c['total']):.4f}")

    # ---- modes -----------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Handle":
        """Training mode for the model and the adapters (LoRA's dropout lives in the adapter)."""
        self.model.train(mode)
        self.trainable.train(mode)
        return self

    def eval(self) -> "Handle":
        return self.train(False)

    def merge(self) -> None:
        """Fold every adapter into the frozen weights (no overhead in forward); :meth:`unmerge` undoes it."""
        for adapter in self.adapters:
            adapter.merge()

    def unmerge(self) -> None:
        """Restore the frozen weights bit for bit and act through hooks again."""
        for adapter in self.adapters:
            adapter.unmerge()

    @contextmanager
    def disabled(self) -> Iterator["Handle"]:
        """Inside the block the model computes as if nothing were attached: no adapter update, no side network.
        Merged adapters are unmerged for the block and merged again after it."""
        from unitrans import injection

        merged = [a for a in self.adapters if _is_merged(a)]
        for adapter in merged:
            adapter.unmerge()
        points = [p for a in self.adapters for p in a.points]
        try:
            with ExitStack() as stack:
                stack.enter_context(injection.suspended(self.adapters, points))
                if self.side_network is not None:
                    stack.enter_context(self.side_network.suspended())
                yield self
        finally:
            for adapter in merged:
                adapter.merge()

    def detach(self) -> nn.Module:
        """Remove every adapter and the side network from the model (merge first to keep their effect in the
        weights); returns the model."""
        for adapter in self.adapters:
            adapter.detach()
        if self.side_network is not None:
            self.side_network.detach()
        return self.model

    # ---- files -------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> dict:
        """Write ``adapter.safetensors`` (the trainable tensors) and ``adapter.json`` to ``directory``, as a run
        does; returns the manifest. :func:`unitrans.load_adapter` reads them back."""
        from unitrans.engine.checkpoint import save_adapter

        if self.spec is not None:
            return save_adapter(self, self.spec, Path(directory))
        from unitrans.api import write_adapter_files

        return write_adapter_files(self, Path(directory))

    def load(self, directory: str | Path) -> "Handle":
        """Load ``directory/adapter.safetensors`` into the trainable tensors (every name and shape must match)."""
        from unitrans.engine.checkpoint import load_adapter

        load_adapter(self, Path(directory))
        return self

    def export(self, directory: str | Path) -> Path:
        """Merge the adapters and write the backbone in its own library's format (``save_pretrained``): it loads
        with no UniTrans code. The adapters are unmerged again afterwards."""
        from unitrans.engine.export import export_merged

        return export_merged(self, Path(directory))


def _is_merged(adapter) -> bool:
    """Whether ``adapter`` is folded into its backbone's weights."""
    from unitrans import injection

    return injection.is_merged(adapter, adapter.points)

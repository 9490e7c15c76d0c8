"""The abstract interfaces every component implements.

The folder is the interface, the file the implementation: ``unitrans/adapters/`` declares builders,
``unitrans/adapters/vcra.py`` implements VCRA. Helpers that several implementations use are free functions in
``unitrans/injection.py``; there is no implementation inheritance beyond these declarations.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # torch is imported lazily so `unitrans list` / `validate` stay light
    import torch
    from torch import nn

MODALITIES = {"V": "vision", "T": "text", "C": "cross-modal (fusion)", "D": "decoder"}


@dataclass(eq=False)
class InjectionPoint:
    """One place an adapter can act: the rows ``out_slice`` of the frozen linear ``module``.

    Attributes:
        name: layer-free dotted name that globs match, e.g. ``"vision.attn.q"``.
        layer: index of the transformer layer.
        modality: ``"V"``, ``"T"``, ``"C"`` (fusion / cross-attention) or ``"D"`` (decoder).
        module: the frozen ``nn.Linear`` computing this point (for a fused qkv, the whole fused linear).
        out_slice: the output rows of ``module`` that are this point (``None``: all of them).
        input_group: points with the same group read the same input tensor (q, k, v of one attention), so an
            adapter may compute ``A x`` once for all of them.
        attention: id of the attention block the point belongs to (k and v of one attention may share scalings).
        mode: ``None``: the point acts in every call of its linear. ``"fused"`` / ``"text"``: only in the passes of
            that kind (a BERT layer run with image tokens, i.e. as the fusion network, or without); such points sit
            on the same linears as mode-free ones (BLIP's ``fusion.self.*`` on ``text.attn.*``'s linears).
        current_pass: the backbone's probe that names the pass its encoder is in (``"fused"`` or ``"text"``);
            set together with ``mode``.
    """

    name: str
    layer: int
    modality: str
    module: "nn.Linear"
    out_slice: slice | None
    in_features: int
    out_features: int
    input_group: str
    attention: str | None = None
    mode: str | None = None
    current_pass: Callable[[], str] | None = field(default=None, repr=False)

    def acts_now(self) -> bool:
        """Whether the point's update applies in the call of its linear that is running now."""
        return self.mode is None or self.current_pass is None or self.current_pass() == self.mode

    @property
    def id(self) -> str:
        """Unique id, e.g. ``"vision.3.attn.q"`` (the layer index follows the first dotted part)."""
        head, _, rest = self.name.partition(".")
        return f"{head}.{self.layer}.{rest}" if rest else f"{head}.{self.layer}"

    @property
    def role(self) -> str:
        """Last part of the name: ``q``, ``k``, ``v``, ``out``, ``fc1``, ..."""
        return self.name.rsplit(".", 1)[-1]


def match_points(points: Sequence[InjectionPoint], patterns: Sequence[str], layers: Sequence[int] | None = None):
    """Points whose layer-free name matches any glob (``"vision.attn.*"``, ``"*.attn.q"``), in backbone order.

    Returns:
        (matched points, patterns that matched nothing)
    """
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(pt.name, p) for pt in points)]
    chosen = [
        pt
        for pt in points
        if any(fnmatch.fnmatchcase(pt.name, p) for p in patterns) and (layers is None or pt.layer in layers)
    ]
    return chosen, unmatched


class Backbone(ABC):
    """A frozen pre-trained model, as a plugin provides it.

    A backbone exposes *named injection points* for adapters, its fusion blocks for side networks, and the
    forward functions the task heads need. It never imports the loop, the CLI or the report.
    """

    name: str
    model: "nn.Module"
    # True when blocks are recomputed in backward (gradient checkpointing): a recomputed block must save the same
    # tensors it saved the first time, so adapters then compute nothing once for several blocks.
    recomputes_activations: bool = False

    @abstractmethod
    def injection_points(self) -> list[InjectionPoint]:
        """Every injection point, in forward order."""

    @abstractmethod
    def declared_points(self) -> list[str]:
        """The point vocabulary as globs (``"vision.attn.{q,k,v}"``), for error messages."""

    def fusion_blocks(self) -> list["nn.Module"]:
        """The blocks of the fusion network (``fusion.blocks``), in order. Backbones without one refuse."""
        raise LookupError(
            f"backbone {self.name} has no fusion network (no injection point 'fusion.blocks'); "
            f"it declares: {', '.join(self.declared_points())}"
        )

    def fusion_width(self) -> int:
        raise LookupError(f"backbone {self.name} has no fusion network")

    @abstractmethod
    def trainable_parameters(self) -> dict[str, "torch.nn.Parameter"]:
        """Backbone parameters that train (empty when frozen, everything when ``freeze = false``)."""


class Adapter(ABC):
    """Adds a trainable update to the frozen linears at a set of injection points (an ``nn.Module`` too).

    Lifecycle: built from its spec (unattached) -> ``attach(points)`` -> train -> ``merge()`` for
    zero-overhead inference, ``unmerge()`` to restore the frozen weights exactly.
    """

    targets: list[str]
    layers: list[int] | None
    # Set to False by the engine, before ``attach``, when the backbone recomputes activations: results (``A x``,
    # folded matrices) may then be reused only inside one linear's or one attention's call, never across blocks.
    reuse_across_calls: bool = True

    @abstractmethod
    def attach(self, points: Sequence[InjectionPoint]) -> None:
        """Create the parameters for these points and start acting on them."""

    @abstractmethod
    def delta_weight(self, point: InjectionPoint) -> "torch.Tensor":
        """The update of this point as a dense matrix, shape ``(out_features, in_features)`` (for merging)."""

    @abstractmethod
    def merge(self) -> None: ...

    @abstractmethod
    def unmerge(self) -> None: ...

    def clear_cache(self) -> None:
        """Drop whatever the adapter keeps between forward calls (the engine calls it after every backward and
        every evaluation, so no activation outlives its step). Default: nothing is kept."""

    def modality_of_parameter(self, name: str) -> str:
        """``V``/``T``/``C``/``D`` or ``shared`` for a parameter name (parameter accounting by modality)."""
        return "shared"


class SideNetwork(ABC):
    """Runs beside an ordered list of blocks through hooks on their inputs and outputs."""

    @abstractmethod
    def attach(self, backbone: Backbone, adapters: Sequence[Adapter]) -> None: ...

    @abstractmethod
    def detach(self) -> None: ...


class AlignmentLoss(ABC):
    """Image/text feature alignment. Returns named scalar terms; the total is their sum."""

    @abstractmethod
    def __call__(
        self, image_feat: "torch.Tensor", text_feat: "torch.Tensor", image_ids: "torch.Tensor"
    ) -> dict[str, "torch.Tensor"]:
        """Args: L2-normalised ``image_feat (B, P)``, ``text_feat (B, P)`` and ``image_ids (B,)`` of the local
        batch. Implementations gather across ranks themselves."""


class Task(ABC):
    """A task head: owns its task loss and its evaluation."""

    metric_keys: tuple[str, ...] = ()
    primary_metric: str = ""

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse (``UserError``, naming both sides) a backbone that lacks what this task needs. Called at build."""

    @abstractmethod
    def training_step(self, backbone: Backbone, batch: Mapping[str, Any], alignment: AlignmentLoss | None):
        """Returns a dict of named scalar loss terms (their sum is optimised)."""

    # ---- training hooks (the loop calls them; every default does nothing) ------------------------------------
    def setup(self, built: Any) -> None:
        """Called once after every component is built, before data or training (e.g. to keep a momentum copy of
        ``built.trainable_state()``)."""

    def on_step_start(self, step: int, epoch: int, steps_per_epoch: int) -> None:
        """Called before the micro-batches of optimizer step ``step`` (0-based; ``epoch = step // steps_per_epoch``)."""

    def on_optimizer_step(self) -> None:
        """Called after every ``optimizer.step()`` (e.g. a momentum (EMA) update of a copy of the trainable tensors)."""

    def state_dict(self) -> dict[str, "torch.Tensor"]:
        """Training state the task keeps between steps (queues, momentum copies, counters as 0-d tensors), saved
        in every resume checkpoint as tensors only (safetensors: nothing is ever unpickled). Default: none."""
        return {}

    def load_state_dict(self, state: Mapping[str, "torch.Tensor"]) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""

    @abstractmethod
    def evaluate(self, backbone: Backbone, dataset: Any, batch_size: int, *, device: Any = "cpu",
                 collate: Any = None, num_workers: int = 0, output_dir: Any = None, split: str = "test",
                 ) -> dict[str, float]:
        """Metrics on ``dataset`` (keys ``metric_keys``). Runs on every rank; each rank may score a shard and
        gather (``unitrans.distributed``); every rank returns the same dict. Files a task writes (e.g.
        ``captions_<split>.json``) go to ``output_dir`` and are written by the main rank only."""


@dataclass
class DataModule:
    """What a dataset builder returns: datasets per split plus the collate function."""

    train: Any
    val: Any | None
    test: Any | None
    collate: Any = None
    extras: dict = field(default_factory=dict)


@dataclass
class Preflight:
    """What a data builder can tell about its data before any model is built (``builder.preflight(deep)``).

    Attributes:
        sizes: items per split (``"train"``, ``"val"``, ``"test"``); ``None`` for a split the spec does not give;
            a split generated on first use reports the size it will have.
        problems: one line per problem found (missing or unparsable file, empty split, unreadable image with
            ``deep``), each naming the file; empty when all is well.
        checked_files: media files opened (``deep``) or checked to exist.
    """

    sizes: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    checked_files: int = 0

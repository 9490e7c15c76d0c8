"""The typed spec of a run: what a TOML file (plus ``--set`` overrides) says, validated all at once.

A spec names its components (backbone, adapters, side network, alignment loss, task, data) by registered,
versioned names; every other key of a component table is a keyword argument of that component's builder. The
builder's typed signature is the schema of those keys (confection's idea): a pydantic model is built from it, so
there is no second config class to keep in sync.

Validation collects *every* problem and raises one :class:`SpecError` with one line per problem::

    adapters[0] (vcra.v1) -> rnak: unknown field; did you mean 'rank'? Allowed: targets, rank, share
    train -> lr: Input should be greater than 0 (got 0)

The special name ``"none"`` for ``side_network`` or ``alignment_loss`` means "no component", so an ablation drops
QASN or MCAM by changing one field (``--set side_network.name=none``). In the :class:`Spec` object the field is
then ``None``; in the resolved dict and TOML it is written as ``{name = "none"}`` (``alignment_loss`` defaults to
``itc.v1`` when absent, so "absent" cannot mean "none" there).

This module never imports torch: builder modules registered for first-party components import their
implementation inside the builder's body.
"""

from __future__ import annotations

import copy
import difflib
import enum
import inspect
import re
import sys
import tomllib
import typing
from pathlib import Path, PurePath
from typing import Annotated, Any, Callable, Iterator, Literal, Mapping, Sequence

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic.fields import FieldInfo

from unitrans import registry
from unitrans.errors import UserError

__all__ = [
    "COMPONENT_SLOTS",
    "NONE_NAME",
    "ComponentSpec",
    "EvalSpec",
    "Spec",
    "SpecError",
    "SweepSpec",
    "TrainSpec",
    "apply_overrides",
    "builder_schema",
    "component_kwargs",
    "dump_toml",
    "iter_components",
    "load_spec",
    "resolve",
    "resolved_builder",
    "validate_dict",
    "write_resolved",
]

#: Spec field -> registry kind.
COMPONENT_SLOTS: dict[str, str] = {
    "backbone": "backbones",
    "adapters": "adapters",
    "side_network": "side_networks",
    "alignment_loss": "alignment_losses",
    "task": "tasks",
    "data": "datasets",
}
#: Slots where the name ``"none"`` means "no component".
OPTIONAL_SLOTS: tuple[str, ...] = ("side_network", "alignment_loss")
NONE_NAME = "none"
DEFAULT_ALIGNMENT_LOSS = "itc.v1"

_GOT_MAX = 80


class SpecError(UserError):
    """Every problem found in a spec, one line each (``location -> field: message``).

    Attributes:
        errors (list[str]): one line per problem.
    """

    def __init__(self, errors: Sequence[str] | str):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --------------------------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------------------------


def _component_shorthand(value: Any) -> Any:
    """Accept ``adapters = ["vcra"]`` / ``side_network = "none"`` as shorthand for ``{name = ...}``."""
    return {"name": value} if isinstance(value, str) else value


class ComponentSpec(BaseModel):
    """A registered component: its ``name`` plus the keyword arguments of its builder.

    Attributes:
        name (str): registered name, versioned (``"vcra.v1"``) or not (``"vcra"``: the highest version).

    Every other key is kept as an extra field and validated against the builder's signature by
    :func:`component_kwargs`.
    """

    model_config = ConfigDict(extra="allow")

    name: str

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments as written in the spec (no defaults filled, not coerced)."""
        return dict(self.model_extra or {})


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

#: Fields a resume may change on purpose (``--allow-change KEY``), and what the change means.
RESUME_CHANGES: dict[str, str] = {
    "train.lr": "the new peak lr; the schedule keeps its position, so from the resumed step the lr is the new peak "
                "times the schedule's factor at that step (warm-up and cosine are not restarted)",
    "train.weight_decay": "AdamW's decay (of the tensors train.decay names) from the resumed step on",
    "train.grad_clip": "gradient clipping from the resumed step on",
    "train.epochs": "a new run length; the cosine is recomputed over the new total, so the lr moves to the new "
                    "curve's value at the resumed step",
    "train.max_steps": "a new run length, as train.epochs",
}


class TrainSpec(BaseModel):
    """Optimisation settings.

    Attributes:
        epochs (int): passes over the training set.
        max_steps (int | None): stop after this many optimiser steps (overrides ``epochs`` when reached first).
        batch_size (int): the *global* batch (all ranks, all accumulation micro-steps together).
        lr (float): peak learning rate.
        weight_decay (float): AdamW weight decay.
        decay (str): which trainable tensors AdamW decays: ``"matrices"`` (2-D and up; vectors such as VCRA's λ,
            biases and norms are not decayed) or ``"all"`` (BLIP's recipe: ``AdamW(model.parameters(), wd)``).
        warmup_ratio (float): fraction of the steps spent warming up linearly, in [0, 1).
        min_lr_ratio (float): the cosine schedule ends at ``lr * min_lr_ratio``, in [0, 1].
        grad_accum (int): micro-steps per optimiser step; must divide ``batch_size``.
        grad_clip (float | None): max global gradient norm, ``None`` for no clipping.
        precision (str): ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 uses a grad scaler).
        num_workers (int): data-loader workers per rank.
        log_every (int): log every this many optimiser steps.
        device (str): ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        progress (bool): show a progress bar.
        nproc_per_node (int): processes on this machine; above 1, ``run`` starts torchrun itself (DDP).
        checkpoint_every (int | None): write a resume checkpoint every this many steps (and at each epoch end).
        keep_last (int): resume checkpoints kept (the best one is kept apart).
        best_metric (str | None): keep ``checkpoints/best`` by this metric (needs ``eval.every_epoch``);
            ``None``: the task's primary metric.
        resume (str): ``"none"``, ``"latest"`` (continue from ``output_dir/checkpoints/latest`` when present) or
            a checkpoint folder.
        find_unused_parameters (bool): DDP option, for components whose parameters skip some steps.
        strategy (str): with several processes, ``"ddp"`` (every rank holds the whole backbone) or ``"fsdp"``
            (PyTorch FSDP: the frozen backbone's blocks sharded across ranks, trainable tensors replicated;
            ``unitrans.engine.strategy``).
        tensorboard (bool): also log to TensorBoard (``output_dir/tb``) when it is installed.
        schedule (str): ``"cosine_step"`` (the cosine decays every step) or ``"cosine_epoch"`` (BLIP's
            ``cosine_lr_schedule``: one value per epoch).
        timeout_s (int): seconds a collective waits for a peer before the run stops naming the rank that stopped
            answering (multi-process runs).
        overwrite (bool): a fresh run may replace the run already in ``output_dir`` (its outputs are removed).
        allow_change (list[str]): on resume, fields that may differ from the checkpoint's spec on purpose
            (:data:`RESUME_CHANGES`).
        deterministic (bool | None): deterministic kernels (``torch.use_deterministic_algorithms``), so two runs
            of one spec give the same bits; ``None``: on the CPU yes (it costs little there), on GPUs no.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 32
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.05
    decay: Literal["matrices", "all"] = "matrices"
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    grad_accum: PositiveInt = 1
    grad_clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: NonNegativeInt = 0
    log_every: PositiveInt = 10
    device: str = "auto"
    progress: bool = True
    nproc_per_node: PositiveInt = 1
    checkpoint_every: PositiveInt | None = None
    keep_last: PositiveInt = 2
    best_metric: str | None = None
    resume: str = "none"
    find_unused_parameters: bool = True
    strategy: Literal["ddp", "fsdp"] = "ddp"
    tensorboard: bool = True
    schedule: Literal["cosine_step", "cosine_epoch"] = "cosine_step"
    timeout_s: PositiveInt = 300
    overwrite: bool = False
    allow_change: list[str] = Field(default_factory=list)
    deterministic: bool | None = None

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError("use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return value

    @field_validator("allow_change")
    @classmethod
    def _changeable(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v not in RESUME_CHANGES]
        if bad:
            raise ValueError(f"{', '.join(repr(b) for b in bad)} cannot change on resume; these can: "
                             f"{', '.join(RESUME_CHANGES)}")
        return value

    @field_validator("grad_accum")
    @classmethod
    def _accum_divides_batch(cls, value: int, info) -> int:
        batch = info.data.get("batch_size")
        if isinstance(batch, int) and batch % value:
            raise ValueError(
                f"batch_size ({batch}) is the global batch and must be divisible by grad_accum ({value}); "
                f"e.g. batch_size = {max(value, batch - batch % value)}"
            )
        return value


class EvalSpec(BaseModel):
    """Evaluation settings.

    Attributes:
        at_start (bool): evaluate before training (the frozen backbone's score).
        split (str): ``"val"`` or ``"test"``.
        batch_size (int): evaluation batch size per rank.
        every_epoch (bool): evaluate after every epoch, not only at the end.
    """

    model_config = ConfigDict(extra="forbid")

    at_start: bool = False
    split: Literal["val", "test"] = "test"
    batch_size: PositiveInt = 64
    every_epoch: bool = False


_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


class SweepSpec(BaseModel):
    """The variants of a sweep (``unitrans sweep``); ``unitrans run`` ignores this table.

    Each variant is the spec with a set of dotted overrides (keys as ``--set`` takes them). Named variants and a
    grid combine: every named variant (or the spec itself when there are none) crosses every grid point.

    Attributes:
        variants (dict[str, dict]): variant name (a folder name) -> ``{"adapters.0.name": "lora", ...}``.
        grid (dict[str, list]): dotted key -> values; the cartesian product of the lists.
        seeds (list[int]): each variant runs once per seed (empty: the spec's ``seed``).
    """

    model_config = ConfigDict(extra="forbid")

    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=list)

    @field_validator("grid", mode="before")
    @classmethod
    def _dotted_grid(cls, value: Any) -> Any:
        """``adapters.0.rank = [...]`` (unquoted: nested tables) means ``"adapters.0.rank" = [...]``."""

        def flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, item in table.items():
                dotted = f"{prefix}.{key}" if prefix else str(key)
                out.update(flat(item, dotted) if isinstance(item, Mapping) else {dotted: item})
            return out

        return flat(value) if isinstance(value, Mapping) else value

    @field_validator("variants")
    @classmethod
    def _folder_names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        bad = [name for name in value if not _VARIANT_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"variant names become folder names: use letters, digits and _ . + = - "
                             f"(got {', '.join(repr(b) for b in bad)})")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct (got {value})")
        return value


def _default_alignment_loss() -> ComponentSpec:
    return ComponentSpec(name=DEFAULT_ALIGNMENT_LOSS)


class Spec(BaseModel):
    """A whole run.

    Attributes:
        seed (int): global seed (data order, initialisation of components that draw from a generator).
        output_dir (str): where the run writes its outputs.
        plugins (list[str]): modules imported before component names are looked up (local code that registers
            components). A spec's own directory is searched too.
        backbone (ComponentSpec): registry kind ``backbones``.
        adapters (list[ComponentSpec]): registry kind ``adapters``; may be empty.
        side_network (ComponentSpec | None): registry kind ``side_networks``; ``None`` (name ``"none"``): none.
        alignment_loss (ComponentSpec | None): registry kind ``alignment_losses``; default ``itc.v1``;
            ``None`` (name ``"none"``): none.
        task (ComponentSpec): registry kind ``tasks``.
        data (ComponentSpec): registry kind ``datasets``.
        train (TrainSpec): optimisation settings.
        eval (EvalSpec): evaluation settings.
        sweep (SweepSpec | None): the variants ``unitrans sweep`` runs (ignored by ``run``).
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 42
    output_dir: str = "runs/default"
    plugins: list[str] = Field(default_factory=list)
    backbone: ComponentSpec
    adapters: list[ComponentSpec] = Field(default_factory=list)
    side_network: ComponentSpec | None = None
    alignment_loss: ComponentSpec | None = Field(default_factory=_default_alignment_loss)
    task: ComponentSpec
    data: ComponentSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    sweep: SweepSpec | None = None

    @field_validator("backbone", "task", "data", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _component_shorthand(value)

    @field_validator("adapters", mode="before")
    @classmethod
    def _shorthand_list(cls, value: Any) -> Any:
        return [_component_shorthand(v) for v in value] if isinstance(value, list) else value

    @field_validator("side_network", "alignment_loss", mode="before")
    @classmethod
    def _none_means_absent(cls, value: Any) -> Any:
        value = _component_shorthand(value)
        if isinstance(value, ComponentSpec):
            value = value.model_dump()
        if isinstance(value, Mapping) and value.get("name") == NONE_NAME:
            others = sorted(k for k in value if k != "name")
            if others:
                raise ValueError(
                    f"name 'none' means no component, so it takes no options; remove {', '.join(others)}"
                )
            return None
        return value


#: Models that forbid extra keys, by their (index-free) location; for "Allowed: ..." in error lines.
_MODELS_AT: dict[tuple[str, ...], type[BaseModel]] = {(): Spec, ("train",): TrainSpec, ("eval",): EvalSpec,
                                                      ("sweep",): SweepSpec}


# --------------------------------------------------------------------------------------------------------------
# Error lines
# --------------------------------------------------------------------------------------------------------------


def _fmt_path(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > _GOT_MAX:
        text = text[: _GOT_MAX - 3] + "..."
    return f" (got {text})"


def _unknown_field_message(field: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(field, list(allowed), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    listing = ", ".join(allowed) if allowed else "(none)"
    return f"unknown field{hint} Allowed: {listing}"


def _error_lines(
    exc: ValidationError,
    location: str | None = None,
    allowed_at: Callable[[tuple[str, ...]], Sequence[str] | None] | None = None,
) -> list[str]:
    """Turn a pydantic ValidationError into ``location -> field: message`` lines.

    Args:
        exc: the validation error.
        location: a fixed location (e.g. ``"adapters[0] (vcra.v1)"``); the whole error ``loc`` is then the field.
            When ``None``, the location is the ``loc`` minus its last part (``"(top level)"`` when empty).
        allowed_at: maps an index-free location to the allowed field names (for unknown-field errors).
    """
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        if location is not None:
            where, field_parts = location, loc
        else:
            where = _fmt_path(loc[:-1]) or "(top level)"
            field_parts = loc[-1:]
        field = _fmt_path(field_parts) or "(value)"
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            parent = tuple(p for p in loc[:-1] if isinstance(p, str))
            allowed = allowed_at(parent) if allowed_at else None
            message = _unknown_field_message(str(loc[-1]), allowed or [])
            if allowed is None:
                message = "unknown field"
        elif kind == "missing":
            message = "required field missing"
        else:
            message = str(err.get("msg", "invalid value"))
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            if "input" in err and kind != "value_error":
                message += _got(err["input"])
        lines.append(f"{where} -> {field}: {message}")
    return lines


def _spec_allowed(parent: tuple[str, ...]) -> list[str] | None:
    model = _MODELS_AT.get(parent)
    return list(model.model_fields) if model is not None else None


# --------------------------------------------------------------------------------------------------------------
# Builder signature -> schema
# --------------------------------------------------------------------------------------------------------------

_schema_cache: dict[Any, type[BaseModel]] = {}


def _type_hints(builder: Callable) -> dict[str, Any]:
    target = builder.__init__ if inspect.isclass(builder) else builder  # type: ignore[misc]
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # an annotation that only exists under TYPE_CHECKING: evaluate the others one by one
        hints: dict[str, Any] = {}
        globalns = getattr(inspect.unwrap(target), "__globals__", {})
        for pname, ann in getattr(target, "__annotations__", {}).items():
            if isinstance(ann, str):
                try:
                    ann = eval(ann, dict(globalns))  # noqa: S307 - the builder's own annotation
                except Exception:
                    ann = Any
            hints[pname] = ann
        return hints


def builder_schema(builder: Callable) -> type[BaseModel]:
    """The pydantic model of a builder's keyword arguments: its options class (a builder made with
    :func:`unitrans.options.builds`), else a model made from its typed signature (cached per builder).

    Parameters without a default are required; ``Annotated[int, Field(gt=0)]`` adds constraints; a ``**kwargs``
    parameter allows extra keys. Unannotated parameters accept anything.

    Args:
        builder: the registered function (or class).

    Returns:
        A model class with ``extra="forbid"`` (``"allow"`` when the builder takes ``**kwargs``).
    """
    options = getattr(builder, "options", None)
    if options is not None:  # made by unitrans.options.builds: its options class is the schema
        return options
    try:
        return _schema_cache[builder]
    except (KeyError, TypeError):
        pass
    sig = inspect.signature(builder)
    hints = _type_hints(builder)
    fields: dict[str, Any] = {}
    extra = "forbid"
    for pname, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            extra = "allow"
            continue
        hint = hints.get(pname, Any if param.annotation is inspect.Parameter.empty else param.annotation)
        if isinstance(hint, str):
            hint = Any
        default = param.default
        safe = not pname.startswith("_") and not hasattr(BaseModel, pname)
        fname = pname if safe else f"field_{pname.lstrip('_')}_"
        if isinstance(default, FieldInfo):
            info = default
        elif default is inspect.Parameter.empty:
            info = Field(alias=None if safe else pname)
        else:
            info = Field(default=default, alias=None if safe else pname)
        fields[fname] = (hint, info)
    model = create_model(
        f"{getattr(builder, '__name__', 'builder')}_kwargs",
        __config__=ConfigDict(extra=extra, arbitrary_types_allowed=True, protected_namespaces=()),
        **fields,
    )
    try:
        _schema_cache[builder] = model
    except TypeError:
        pass
    return model


def _field_names(schema: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in schema.model_fields.items()]


# --------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------


def _as_dict(comp: ComponentSpec | Mapping[str, Any]) -> dict[str, Any]:
    return comp.model_dump() if isinstance(comp, ComponentSpec) else dict(comp)


def _lookup(kind: str, name: str, location: str) -> tuple[str | None, Callable | None, list[str]]:
    """Pin and fetch a builder; problems become error lines."""
    try:
        pinned = registry.resolve_name(kind, name)
    except registry.RegistryError as exc:
        return None, None, [f"{location} -> name: {exc}"]
    try:
        builder = registry.get(kind, pinned)
    except registry.RegistryError as exc:
        return None, None, [f"{location} ({pinned}) -> name: {exc}"]
    except ImportError as exc:
        target = next((e.target for e in registry.read_index() if e.kind == kind and e.name == pinned), "its module")
        return None, None, [f"{location} ({pinned}) -> name: could not import {target}: {exc}"]
    return pinned, builder, []


def _check_component(
    kind: str, comp: Mapping[str, Any], location: str
) -> tuple[str | None, Callable | None, BaseModel | None, list[str]]:
    """Validate one component table. Returns (pinned name, builder, validated kwargs model, error lines)."""
    pinned, builder, errors = _lookup(kind, str(comp["name"]), location)
    if builder is None:
        return None, None, None, errors
    schema = builder_schema(builder)
    kwargs = {k: v for k, v in comp.items() if k != "name"}
    try:
        validated = schema.model_validate(kwargs)
    except ValidationError as exc:
        names = _field_names(schema)
        return pinned, builder, None, _error_lines(
            exc, f"{location} ({pinned})", lambda parent: names if not parent else None
        )
    return pinned, builder, validated, []


def _kwargs_of(validated: BaseModel) -> dict[str, Any]:
    out = {}
    for fname, info in type(validated).model_fields.items():
        out[info.alias or fname] = getattr(validated, fname)
    out.update(validated.model_extra or {})
    return out


def resolved_builder(kind: str, comp: ComponentSpec, location: str | None = None) -> tuple[str, Callable]:
    """The pinned name and the builder of a component.

    Args:
        kind: registry kind (``"adapters"``, ...).
        comp: the component's spec.
        location: where it sits in the spec, for error lines (default: the kind).

    Returns:
        ``(pinned name, builder)``, e.g. ``("vcra.v1", <function>)``.

    Raises:
        SpecError: the name is unknown or its module cannot be imported.
    """
    pinned, builder, errors = _lookup(kind, comp.name, location or kind)
    if errors:
        raise SpecError(errors)
    return pinned, builder  # type: ignore[return-value]


def component_kwargs(kind: str, comp: ComponentSpec, location: str | None = None) -> dict[str, Any]:
    """The validated keyword arguments for calling a component's builder (defaults filled, values coerced); the
    arguments are :func:`resolved_builder`'s.

    Returns:
        A dict to call the builder with: ``builder(**component_kwargs(kind, comp))``.

    Raises:
        SpecError: unknown name, unknown keys, missing or invalid values (all of them).
    """
    _, _, validated, errors = _check_component(kind, _as_dict(comp), location or kind)
    if errors:
        raise SpecError(errors)
    return _kwargs_of(validated)  # type: ignore[arg-type]


def iter_components(spec: Spec) -> Iterator[tuple[str, str, ComponentSpec]]:
    """Every component of a spec as ``(location, kind, comp)``, e.g. ``("adapters[0]", "adapters", ...)``.

    Absent optional components (``side_network``, ``alignment_loss`` set to none) are skipped.
    """
    for slot, kind in COMPONENT_SLOTS.items():
        value = getattr(spec, slot)
        if slot == "adapters":
            for i, comp in enumerate(value):
                yield f"adapters[{i}]", kind, comp
        elif value is not None:
            yield slot, kind, value


def _raw_components(data: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Component tables of an unvalidated spec dict that have a string name (others are structure errors)."""
    for slot, kind in COMPONENT_SLOTS.items():
        if slot == "alignment_loss" and slot not in data:
            yield f"{slot} (default)", kind, {"name": DEFAULT_ALIGNMENT_LOSS}
            continue
        value = data.get(slot)
        items = list(enumerate(value)) if slot == "adapters" and isinstance(value, list) else [(None, value)]
        for i, comp in items:
            comp = _component_shorthand(comp)
            if not isinstance(comp, Mapping) or not isinstance(comp.get("name"), str):
                continue
            if slot in OPTIONAL_SLOTS and comp["name"] == NONE_NAME:
                continue
            yield (slot if i is None else f"{slot}[{i}]"), kind, dict(comp)


# --------------------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """A TOML value when ``text`` parses as one (``32``, ``1e-4``, ``true``, ``["a", "b"]``), else the string."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if list(parsed) == ["v"] else text


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    data = copy.deepcopy(data)
    errors: list[str] = []
    for raw in overrides:
        if isinstance(raw, tuple):  # (dotted key, typed value), e.g. a sweep variant's override
            key, sep, text = str(raw[0]), "=", ""
            where = f"{key!r}"
        else:
            where = f"--set {raw!r}"
            key, sep, text = raw.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p.strip() for p in parts):
            errors.append(f"{where} -> (syntax): expected dotted.path=value, e.g. train.lr=1e-4 or adapters.0.rank=32")
            continue
        parts = [p.strip() for p in parts]
        value = copy.deepcopy(raw[1]) if isinstance(raw, tuple) else _parse_value(text.strip())
        node: Any = data
        done: list[Any] = []
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not re.fullmatch(r"\d+", part):
                    errors.append(
                        f"{where} -> {_fmt_path(done)}: is a list; address an item by its index "
                        f"0..{len(node) - 1}, not '{part}'"
                    )
                    break
                index = int(part)
                if index >= len(node):
                    errors.append(
                        f"{where} -> {_fmt_path(done + [index])}: index {index} is past the end of the list "
                        f"(it has {len(node)} item{'s' if len(node) != 1 else ''}); "
                        "add items in the spec file"
                    )
                    break
                if last:
                    node[index] = value
                    break
                node[index] = _component_shorthand(node[index])
                node = node[index]
                done.append(index)
                continue
            if not isinstance(node, dict):
                errors.append(
                    f"{where} -> {_fmt_path(done)}: is {node!r}, not a table, so it has no field '{part}'"
                )
                break
            if last:
                node[part] = value
                break
            if part not in node:
                node[part] = {}
            elif depth == 0 and part in COMPONENT_SLOTS:
                node[part] = _component_shorthand(node[part])
            node = node[part]
            done.append(part)
    return data, errors


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.path=value`` overrides to a spec dict (a copy; the input is left alone).

    Values parse as TOML values when they can (``32`` -> int, ``1e-4`` -> float, ``true``, ``["a","b"]``),
    otherwise they are strings (``adapters.0.name=lora``). List items are addressed by index
    (``adapters.0.rank=32``); missing intermediate tables are created.

    Args:
        data: the spec as a dict.
        overrides: ``["train.lr=1e-4", "adapters.0.rank=32"]``; an item may also be a ``(dotted key, value)``
            pair whose value is already typed (a sweep variant's overrides).

    Returns:
        The new dict.

    Raises:
        SpecError: malformed overrides and indices past the end of a list, every one, each naming its override.
    """
    out, errors = _apply_overrides(dict(data), overrides)
    if errors:
        raise SpecError(errors)
    return out


# --------------------------------------------------------------------------------------------------------------
# Loading and validating
# --------------------------------------------------------------------------------------------------------------


def _load_plugin_modules(data: Mapping[str, Any], search: Sequence[Path]) -> list[str]:
    plugins = data.get("plugins", [])
    if not isinstance(plugins, list):
        return []  # the structure check reports it
    for folder in search:
        if str(folder) not in sys.path:
            sys.path.append(str(folder))  # appended, so a spec's folder never shadows an installed module
    errors = []
    for i, module in enumerate(plugins):
        if isinstance(module, str):
            try:
                registry.load_plugins([module])
            except registry.RegistryError as exc:
                errors.append(f"plugins -> [{i}]: {exc}")
    return errors


def _validate(data: Mapping[str, Any], errors: list[str], search: Sequence[Path] = ()) -> Spec:
    errors = list(errors)
    if not isinstance(data, Mapping):
        raise SpecError([f"(top level) -> (value): a spec is a table of fields{_got(data)}"])
    errors += _load_plugin_modules(data, search)
    spec: Spec | None = None
    try:
        spec = Spec.model_validate(dict(data))
    except ValidationError as exc:
        errors += _error_lines(exc, allowed_at=_spec_allowed)
    for location, kind, comp in _raw_components(data):
        errors += _check_component(kind, comp, location)[3]
    if errors:
        raise SpecError(errors)
    return spec  # type: ignore[return-value]


def validate_dict(data: Mapping[str, Any]) -> Spec:
    """Validate a spec dict: its structure and every component's keyword arguments, all problems at once.

    The ``plugins`` modules are imported before any component name is looked up.

    Args:
        data: the spec as a dict (e.g. ``tomllib.loads(...)``).

    Returns:
        The validated :class:`Spec` (names as written; :func:`resolve` pins them).

    Raises:
        SpecError: with one line per problem.
    """
    return _validate(data, [])


def _toml_error_line(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", message)
    if match:
        line, column = int(match.group(1)), int(match.group(2))
        message = message[: match.start()]
        lines = text.splitlines()
        source = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        shown = f" in: {source}" if source else ""
        return f"{path} (line {line}, column {column}) -> TOML syntax: {message}{shown}"
    message = message.replace("(at end of document)", "").strip()
    return f"{path} (end of file, line {len(text.splitlines())}) -> TOML syntax: {message}"


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Read a TOML spec, apply overrides, load its plugins and validate it, reporting all problems at once.

    The spec's own folder is appended to ``sys.path`` so a ``plugins = ["my_module"]`` entry may sit beside it.

    Args:
        path: the TOML file.
        overrides: ``dotted.path=value`` strings (the command line's ``--set``).

    Returns:
        The validated :class:`Spec`.

    Raises:
        FileNotFoundError: the file does not exist.
        SpecError: a TOML syntax error (file, line, column), bad overrides, or any validation problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([_toml_error_line(path, text, exc)]) from None
    data, errors = _apply_overrides(data, overrides)
    return _validate(data, errors, search=[path.resolve().parent])


# --------------------------------------------------------------------------------------------------------------
# Resolving and writing
# --------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """TOML-friendly plain data: tuples/sets -> lists, paths -> str, enums -> values, models -> dicts."""
    if isinstance(value, BaseModel):
        return _plain(value.model_dump())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    return value


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


def _resolve_component(kind: str, comp: ComponentSpec, location: str) -> tuple[dict[str, Any], list[str]]:
    pinned, _, validated, errors = _check_component(kind, _as_dict(comp), location)
    if errors:
        return {}, errors
    # warnings=False: a builder's default is not validated (``targets: list[str] = ("a",)`` is fine)
    body = _plain(validated.model_dump(by_alias=True, warnings=False))  # type: ignore[union-attr]
    return {"name": pinned, **body}, []


def resolve(spec: Spec) -> dict[str, Any]:
    """The spec as a plain dict: every default filled, every component name pinned (``"lora"`` -> ``"lora.v1"``).

    Absent ``side_network`` / ``alignment_loss`` appear as ``{"name": "none"}``.

    Args:
        spec: a validated spec.

    Returns:
        A dict in the spec's field order, ready for :func:`dump_toml`.

    Raises:
        SpecError: when a component does not validate (a spec built without :func:`validate_dict`).
    """
    out: dict[str, Any] = {}
    errors: list[str] = []
    for field in Spec.model_fields:
        value = getattr(spec, field)
        kind = COMPONENT_SLOTS.get(field)
        if kind is None:
            out[field] = _plain(value)
        elif field == "adapters":
            items = []
            for i, comp in enumerate(value):
                resolved, errs = _resolve_component(kind, comp, f"adapters[{i}]")
                items.append(resolved)
                errors += errs
            out[field] = items
        elif value is None:
            out[field] = {"name": NONE_NAME}
        else:
            out[field], errs = _resolve_component(kind, value, field)
            errors += errs
    if errors:
        raise SpecError(errors)
    return out


def dump_toml(spec: Spec) -> str:
    """The resolved spec as TOML (``None`` values are left out: TOML has no null).

    Round trip: ``resolve(validate_dict(tomllib.loads(dump_toml(spec)))) == resolve(spec)``.
    """
    return tomli_w.dumps(_drop_none(resolve(spec)))


def write_resolved(spec: Spec, path: str | Path) -> Path:
    """Write :func:`dump_toml` of the spec to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved spec: every default filled, every component version pinned. Rerun with:\n"
    header += f"#   python -m unitrans run {path}\n"
    from unitrans.fileio import atomic_write_text

    return atomic_write_text(path, header + dump_toml(spec))

"""Pre-flight: every data problem a run would meet, found before any model is built and reported at once.

:func:`data_preflight` asks the spec's data builder (``builder.preflight(deep)``: files exist and parse, splits are
not empty, media folders and files exist; ``deep``: every image or video opened once) and adds what only the spec
knows: the global batch fits the train split (else the largest batch that fits is named), the evaluation split
exists. :func:`check_data` raises one :class:`UserError` listing every problem; ``run`` calls it first, and
``validate`` runs the same check as its second half. No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unitrans.errors import UserError
from unitrans.interfaces import Preflight

SHOWN = 30  # problems printed by a failing run (``validate --deep`` prints all of them)


def data_builder(spec) -> tuple[str, Any]:
    """The pinned name and the built data builder of ``spec`` (plugins loaded first)."""
    from unitrans import registry
    from unitrans.spec import component_kwargs

    registry.load_plugins(spec.plugins)
    name = registry.resolve_name("datasets", spec.data.name)
    return name, registry.get("datasets", name)(**component_kwargs("datasets", spec.data))


def largest_batch(n_items: int, multiple: int) -> int:
    """The largest global batch ``<= n_items`` that ``multiple`` (processes x grad_accum) divides; 0 if none."""
    return n_items - n_items % multiple


def spec_problems(spec, sizes: dict[str, int | None], world: int) -> list[str]:
    """What the spec asks of the data that ``sizes`` (items per split; a missing key: unknown) cannot give."""
    problems = []
    tr, split = spec.train, spec.eval.split
    if "train" in sizes and sizes["train"] is None:
        problems.append("the data gives no train split (set data.train_file, or data.train_files)")
    elif sizes.get("train") and sizes["train"] < tr.batch_size:
        n, multiple = sizes["train"], world * tr.grad_accum
        fit = largest_batch(n, multiple)
        hint = (f"the largest batch that fits is {fit} (--set train.batch_size={fit})" if fit else
                f"no batch fits: {world} process(es) x grad_accum {tr.grad_accum} need {multiple} items")
        problems.append(f"train.batch_size = {tr.batch_size} (the global batch) is larger than the train split "
                        f"({n} items): {hint}")
    if split in sizes and sizes[split] is None:
        problems.append(f"eval.split = '{split}' but the data gives no {split} split (set data.{split}_file, or "
                        f"eval.split = '{'val' if split == 'test' else 'test'}')")
    return problems


def data_preflight(spec, deep: bool = False, world: int | None = None) -> Preflight:
    """The builder's pre-flight plus the spec's own checks (``world``: processes; default the spec's)."""
    name, builder = data_builder(spec)
    check = getattr(builder, "preflight", None)
    report = check(deep) if check is not None else Preflight()
    report.problems = [f"data ({name}): {p}" for p in report.problems]
    report.problems += spec_problems(spec, report.sizes, world or spec.train.nproc_per_node)
    return report


def missing_data(spec) -> list[str]:
    """The data's named files and folders when none of them exists (the data is not on this machine), else []."""
    _, builder = data_builder(spec)
    named = getattr(builder, "named_paths", None)
    paths = named() if named is not None else {}
    if not paths or any(Path(p).exists() for p in paths.values()):
        return []
    return [f"{k} {p}" for k, p in paths.items()]


def format_problems(problems: list[str], shown: int | None = SHOWN) -> str:
    """One line per problem (the first ``shown``; ``None``: all), indented under a heading."""
    n = len(problems)
    lines = problems if shown is None or n <= shown else problems[:shown]
    text = f"the data is not ready ({n} problem{'s' if n != 1 else ''}; nothing was built):\n"
    text += "\n".join(f"  {p}" for p in lines)
    if len(lines) < n:
        text += f"\n  ... and {n - len(lines)} more (`python -m unitrans validate SPEC --deep` lists them all)"
    return text


def check_data(spec, deep: bool = False, world: int | None = None) -> Preflight:
    """:func:`data_preflight`, raising one :class:`UserError` that lists every problem."""
    report = data_preflight(spec, deep, world)
    if report.problems:
        raise UserError(format_problems(report.problems))
    return report

"""Resuming with a changed spec: compare before touching any file, refuse by default, allow a few on purpose.

Every resume checkpoint records the resolved spec it was trained with. ``--resume`` compares it with the spec of
the command: fields that do not change what is trained (output, logging, workers, process count, evaluation
settings) may differ freely; the fields in ``unitrans.spec.RESUME_CHANGES`` may change when named with ``--allow-change KEY`` (or
``train.allow_change``); any other difference (an adapter's rank, ``train_parts``, the data, the batch size, the
seed ...) refuses the resume with the list of differences.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from unitrans.errors import UserError
from unitrans.spec import RESUME_CHANGES as ALLOWED

#: Fields that do not change what is trained; they may differ on resume.
FREE = ("output_dir", "sweep", "train.resume", "train.overwrite", "train.allow_change", "train.progress",
        "train.log_every", "train.tensorboard", "train.num_workers", "train.nproc_per_node", "train.device",
        "train.timeout_s", "train.deterministic", "train.checkpoint_every", "train.keep_last", "eval.batch_size", "eval.at_start",
        "eval.every_epoch", "eval.split")

def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; list items of tables as ``adapters[0].rank``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        out = {f"{prefix}.len": len(value)}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FREE)


def spec_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, recorded value, current value)`` for every field that differs and matters."""
    old, new = _flat(recorded), _flat(current)
    missing = "(absent)"
    return [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
            if not _free(k) and old.get(k, missing) != new.get(k, missing)]


def check_resume_spec(recorded: Mapping[str, Any], current: Mapping[str, Any], allowed: Sequence[str],
                      checkpoint: Any) -> list[str]:
    """Refuse (one line listing every difference) unless each change is named in ``allowed``.

    Returns:
        One line per allowed change made, with its meaning (to print).
    """
    changes = spec_changes(recorded, current)
    refused = [c for c in changes if c[0] not in allowed]
    if refused:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in refused)
        may = [k for k, _, _ in refused if k in ALLOWED]
        hint = (f" To change {', '.join(may)} on purpose add --allow-change {' --allow-change '.join(may)}."
                if may else "")
        raise UserError(f"cannot resume from {checkpoint}: the spec differs from the one it was trained with "
                        f"({listed}).{hint} Only {', '.join(ALLOWED)} may change on resume; for anything else "
                        "start a new run (--overwrite or another --output-dir)")
    return [f"{k}: {o!r} -> {n!r} ({ALLOWED[k]})" for k, o, n in changes]


def apply_changes(opt: torch.optim.Optimizer, sched, tr, step: int) -> None:
    """After restoring the optimizer and scheduler: take the spec's lr and weight decay, and put each group's lr
    on the (possibly new) schedule at ``step``, as LambdaLR computes it."""
    sched.base_lrs = [tr.lr for _ in opt.param_groups]
    for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(step)
    opt.param_groups[0]["weight_decay"] = tr.weight_decay
    if len(opt.param_groups) > 1:  # the vectors' group (train.decay)
        opt.param_groups[1]["weight_decay"] = tr.weight_decay if tr.decay == "all" else 0.0
    sched._last_lr = [g["lr"] for g in opt.param_groups]

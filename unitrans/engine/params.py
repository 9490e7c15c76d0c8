"""``unitrans params SPEC``: build the model only (no data, no training) and count its parameters."""

from __future__ import annotations

import inspect
import json

from unitrans.engine.build import build, count_parameters

_MODALITY_NAMES = {"V": "vision", "T": "text", "C": "fusion", "D": "decoder", "shared": "shared (A, B)",
                   "backbone": "backbone parts"}


def architecture_spec(spec):
    """``spec`` with a backbone that has a ``random_init`` option set to build its architecture without weights."""
    from unitrans import registry
    from unitrans.spec import ComponentSpec

    builder = registry.get("backbones", spec.backbone.name)
    if "random_init" not in inspect.signature(builder).parameters or spec.backbone.kwargs.get("preset"):
        return spec
    backbone = ComponentSpec(name=spec.backbone.name, **{**spec.backbone.kwargs, "random_init": True})
    return spec.model_copy(update={"backbone": backbone})


def count_spec(spec, memory: bool = False) -> dict:
    """Parameter counts of ``spec``'s model (:func:`count_parameters`), built on the ``meta`` device: shapes
    only, no memory and no initialisation cost (BLIP-base in a fraction of a second). A backbone that cannot be
    built there is built on the CPU instead. With ``memory``, also the estimated peak memory per device of a
    training step (:mod:`unitrans.engine.memory`)."""
    import torch

    from unitrans import registry

    registry.load_plugins(spec.plugins)
    spec = architecture_spec(spec)
    torch.manual_seed(spec.seed)
    try:
        with torch.device("meta"):
            built = build(spec, "meta", with_data=False)
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError):
        torch.manual_seed(spec.seed)
        built = build(spec, "cpu", with_data=False)
    counts = count_parameters(built)
    counts["tunable_millions"] = round(counts["trainable"] / 1e6, 2)
    if memory:
        from unitrans.engine.memory import estimate_memory

        counts["memory"] = estimate_memory(built, spec)
    return counts


def params_command(spec, as_json: bool = False, memory: bool = False) -> int:
    """Print the parameter counts of ``spec`` (and, with ``memory``, the estimated peak memory per device)."""
    counts = count_spec(spec, memory=memory)
    if as_json:
        print(json.dumps(counts, indent=2))
        return 0
    total, trainable = counts["total"], counts["trainable"]
    print(f"{'component':<40} {'total':>14} {'trainable':>12}")
    for name, c in counts["by_component"].items():
        print(f"{name:<40} {c['total']:>14,} {c['trainable']:>12,}")
    print(f"{'all':<40} {total:>14,} {trainable:>12,}   ({trainable / 1e6:.3f}M tunable, "
          f"{100 * trainable / max(1, total):.4f}%)")
    if counts["by_modality"]:
        print("trainable by modality: " + ", ".join(
            f"{_MODALITY_NAMES.get(k, k)} {v:,}" for k, v in sorted(counts["by_modality"].items())))
    if memory:
        from unitrans.engine.memory import memory_report

        print(memory_report(counts["memory"]))
    return 0

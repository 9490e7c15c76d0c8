"""``unitrans params SPEC``: build the model only (no data, no training) and count its parameters."""

from __future__ import annotations

import inspect
import json

from unitrans.engine.build import build, count_parameters

_MODALITY_NAMES = {"V": "vision", "T": "text", "C": "fusion", "D": "decoder", "shared": "shared (A, B)",
                   "backbone": "backbone parts"}


def params_command(spec, as_json: bool = False, memory: bool = False) -> int:
    """Print the parameter counts of ``spec`` (built on the meta device: shapes only, no weights); with
    ``memory``, also the estimated peak memory per device of a training step (:mod:`unitrans.engine.memory`)."""
    import torch

    from unitrans import registry

    torch.manual_seed(spec.seed)
    builder = registry.get("backbones", spec.backbone.name)
    if "random_init" in inspect.signature(builder).parameters and not spec.backbone.kwargs.get("preset"):
        # the architecture is enough: never download weights to count parameters
        from unitrans.spec import ComponentSpec

        backbone = ComponentSpec(name=spec.backbone.name, **{**spec.backbone.kwargs, "random_init": True})
        spec = spec.model_copy(update={"backbone": backbone})
    built = build(spec, "meta", with_data=False)
    counts = count_parameters(built)
    if memory:
        from unitrans.engine.memory import estimate_memory

        counts["memory"] = estimate_memory(built, spec)
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

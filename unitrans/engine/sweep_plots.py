"""The plots of a sweep (matplotlib, PNG, beside ``results.md``).

* ``metric_vs_params.png`` (the paper's Fig. 1): the primary metric against trainable parameters on a log axis,
  one labelled marker per variant, error bars = sample std over seeds.
* ``params_vs_rank.png`` (the paper's Fig. 4c): trainable parameters against rank for LoRA, VCRA and a
  UniAdapter-style bottleneck adapter, in closed form from the widths of the spec's backbone (the closed forms
  equal ``count_parameters`` of the real LoRA and VCRA: ``tests/test_sweep.py`` checks it).
* ``loss_curves.png``: the training loss and each logged loss term per variant from ``log.jsonl`` (thin: one
  seed; thick: the mean over seeds).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Sequence

RANKS = (4, 8, 16, 32, 64, 128, 256)
DEFAULT_TARGETS = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]  # the paper's q, k, v (§4.1)
FORMULAS = ("LoRA: Σ_points r·(d_in + d_out) = 2·N·d·r    "
            "VCRA (share=all): r·(d_in,max + d_out,max) + Σ_λ-pairs (r + d_out) + #modalities ≈ 2·d·r + N·(d + r)\n"
            "bottleneck (UniAdapter-style, one down/up adapter per targeted block): Σ_blocks (2·d·r + d + r)")


# --------------------------------------------------------------------------------------------------------------
# Closed-form parameter counts (any object with the InjectionPoint attributes)
# --------------------------------------------------------------------------------------------------------------


def lora_params(points: Sequence[Any], rank: int) -> int:
    """LoRA: its own ``A (r, d_in)`` and ``B (d_out, r)`` per point."""
    return sum(rank * (p.in_features + p.out_features) for p in points)


def vcra_params(points: Sequence[Any], rank: int, share: str = "all", share_kv_scaling: bool = True) -> int:
    """VCRA with trained projections: the shared pairs, one ``(λa, λb)`` per scaling group, one ``s`` per modality."""
    pairs: dict[str, list[Any]] = {}
    scalings: dict[str, int] = {}
    for p in points:
        if share == "all":
            key = "decoder" if p.modality == "D" else "shared"
        else:
            key = p.modality if share == "modality" else p.id
        pairs.setdefault(key, []).append(p)
        role = p.name.rsplit(".", 1)[-1]
        sk = f"{p.attention}.kv" if share_kv_scaling and p.attention is not None and role in ("k", "v") else p.id
        scalings[sk] = p.out_features
    n = sum(rank * (max(p.in_features for p in pts) + max(p.out_features for p in pts)) for pts in pairs.values())
    n += sum(rank + d for d in scalings.values())
    return n + len({p.modality for p in points})


def bottleneck_params(points: Sequence[Any], rank: int) -> int:
    """A bottleneck adapter (down d->r, up r->d, with biases) per targeted (modality, layer) block."""
    blocks: dict[tuple[str, int], int] = {}
    for p in points:
        key = (p.modality, p.layer)
        blocks[key] = max(blocks.get(key, 0), p.out_features)
    return sum(2 * d * rank + d + rank for d in blocks.values())


def _targets(sweep) -> list[str]:
    from unitrans.spec import component_kwargs

    for variant in sweep.variants:
        for comp in variant.spec.adapters:
            targets = component_kwargs("adapters", comp).get("targets")
            if targets:
                return list(targets)
    return list(DEFAULT_TARGETS)


def backbone_points(spec) -> tuple[str, list[Any]]:
    """Build the spec's backbone (architecture only: ``random_init`` where the builder has it) and list its points."""
    from unitrans import registry
    from unitrans.spec import ComponentSpec, component_kwargs

    registry.load_plugins(spec.plugins)
    name = registry.resolve_name("backbones", spec.backbone.name)
    builder = registry.get("backbones", name)
    comp = spec.backbone
    if "random_init" in inspect.signature(builder).parameters and not comp.kwargs.get("preset"):
        comp = ComponentSpec(name=comp.name, **{**comp.kwargs, "random_init": True})
    backbone = builder(**component_kwargs("backbones", comp))
    return name, backbone.injection_points()


def rank_curves(sweep, ranks: Sequence[int] = RANKS) -> dict[str, Any]:
    """Fig. 4c's numbers for the sweep's backbone and adapter targets."""
    from unitrans.interfaces import match_points

    spec = sweep.variants[0].spec
    name, points = backbone_points(spec)
    targets = _targets(sweep)
    chosen, _ = match_points(points, targets)
    widths = sorted({p.out_features for p in chosen})
    return {"backbone": name, "preset": spec.backbone.kwargs.get("preset") or spec.backbone.kwargs.get("pretrained"),
            "targets": targets, "n_points": len(chosen), "widths": widths, "ranks": list(ranks),
            "lora": [lora_params(chosen, r) for r in ranks], "vcra": [vcra_params(chosen, r) for r in ranks],
            "bottleneck": [bottleneck_params(chosen, r) for r in ranks]}


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_params(results: dict, path: Path) -> Path | None:
    """Fig. 1: primary metric (mean ± std over seeds) against trainable parameters, log x; None without data."""
    metric = results.get("primary_metric")
    rows = [r for r in results["variants"]
            if metric and r["trainable_params"] is not None and (r["metrics"].get(metric) or {}).get("mean") is not None]
    if not rows:
        return None
    plt = _pyplot()
    positive = [r["trainable_params"] for r in rows if r["trainable_params"] > 0]
    zero_x = min(positive) / 10 if positive else 1.0  # where a variant with nothing to train sits on a log axis
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = plt.get_cmap("tab10")
    markers = "osD^vP*Xph<>"
    for i, row in enumerate(rows):
        s = row["metrics"][metric]
        x = row["trainable_params"] or zero_x
        std = f" ± {s['std']:.2f}" if s.get("std") else ""
        # a legend, not labels beside the points: variants of nearly equal size (VCRA rows) sit on one spot
        label = f"{row['variant']} ({_params_text(row['trainable_params'])}): {s['mean']:.2f}{std}"
        ax.errorbar([x], [s["mean"]], yerr=[s["std"] or 0.0], fmt=markers[i % len(markers)], ms=9, capsize=4,
                    color=colors(i % 10), label=label, alpha=0.85)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, title=f"variant (# trainable): {metric}",
              title_fontsize=9, frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)" + ("; 0 drawn at the left edge" if not all(
        r["trainable_params"] for r in rows) else ""))
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"{metric} against trainable parameters (cf. paper Fig. 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _params_text(n: int) -> str:
    from unitrans.engine.sweep import format_params

    return format_params(n)


def plot_params_vs_rank(curves: dict, path: Path) -> Path:
    """Fig. 4c: trainable parameters against rank for LoRA, VCRA and a bottleneck adapter (closed forms)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key, label, marker in (("lora", "LoRA", "s"), ("bottleneck", "bottleneck adapter (UniAdapter-style)", "^"),
                               ("vcra", "VCRA (UniTrans, share = all)", "o")):
        ax.plot(curves["ranks"], curves[key], marker=marker, label=label)
        ax.annotate(_params_text(curves[key][-1]), (curves["ranks"][-1], curves[key][-1]),
                    textcoords="offset points", xytext=(6, 0), fontsize=9, va="center")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(curves["ranks"], [str(r) for r in curves["ranks"]])
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable parameters (log scale)")
    ax.set_title(f"Trainable parameters against rank (cf. paper Fig. 4c): {curves['backbone']} {curves['preset']}, "
                 f"N = {curves['n_points']} points, d ∈ {curves['widths']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    ax.margins(x=0.12)
    fig.text(0.01, 0.01, FORMULAS + f"\ntargets: {', '.join(curves['targets'])}", fontsize=7.5, va="bottom")
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec and "eval" not in rec:
            rows.append(rec)
    return rows


def plot_loss_curves(results: dict, path: Path) -> Path | None:
    """Training loss and its logged terms per variant (thin: each seed; thick: mean over seeds); None without logs."""
    logs: dict[str, list[list[dict]]] = {}
    for row in results["variants"]:
        runs = [_read_log(Path(r["dir"]) / "log.jsonl") for r in row["runs"] if r["status"] == "ok"]
        runs = [r for r in runs if r]
        if runs:
            logs[row["variant"]] = runs
    if not logs:
        return None
    terms = ["loss"]
    for runs in logs.values():
        for key in runs[0][0]:
            if key.endswith("_loss") and key not in terms:
                terms.append(key)
    terms = terms[:4]
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(terms), figsize=(4.2 * len(terms) + 1.5, 4), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, term in zip(axes[0], terms):
        for i, (variant, runs) in enumerate(logs.items()):
            color = colors(i % 10)
            series = [{r["step"]: r[term] for r in run if term in r} for run in runs]
            series = [s for s in series if s]
            for s in series:
                ax.plot(list(s), list(s.values()), color=color, alpha=0.3, lw=1)
            common = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if common:
                mean = [sum(s[k] for s in series) / len(series) for k in common]
                ax.plot(common, mean, color=color, lw=2, marker="o" if len(common) < 15 else None, ms=3,
                        label=variant if term == terms[0] else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(term)
        ax.set_title(term if term != "loss" else "total loss")
        ax.grid(True, alpha=0.3)
    fig.legend(loc="center right", fontsize=9, title="variant")
    fig.suptitle("Training loss per variant (log.jsonl; thin: one seed, thick: mean over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(sweep, results: dict, say=print) -> list[Path]:
    """Every plot the sweep's data allows; returns the paths written."""
    out = sweep.output_dir
    written = [p for p in (plot_metric_vs_params(results, out / "metric_vs_params.png"),
                           plot_loss_curves(results, out / "loss_curves.png")) if p is not None]
    if sweep.variants:
        try:
            curves = rank_curves(sweep)
        except Exception as exc:  # a backbone that cannot be built here (no config for random_init, ...)
            say(f"[sweep] no params_vs_rank.png: could not build the backbone's architecture: {exc}")
        else:
            _write(out / "params_vs_rank.json", curves)
            written.append(plot_params_vs_rank(curves, out / "params_vs_rank.png"))
    return written


def _write(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


__all__ = ["RANKS", "backbone_points", "bottleneck_params", "lora_params", "plot_loss_curves",
           "plot_metric_vs_params", "plot_params_vs_rank", "rank_curves", "vcra_params", "write_plots"]

"""``unitrans sweep``: run the variants of a spec (ablation rows, a grid) x seeds, then tabulate and plot them.

A sweep is a spec with a ``[sweep]`` table::

    [sweep]
    seeds = [0, 1, 2]
    [sweep.variants.lora]
    "adapters.0.name" = "lora"
    [sweep.variants.vcra]
    "adapters.0.name" = "vcra"
    [sweep.grid]
    "adapters.0.rank" = [16, 32, 64]      # crossed with every named variant

Every variant is validated up front, all problems reported at once. Each (variant, seed) then runs as a normal
run, ``python -m unitrans run <variant spec> --output-dir OUT/<variant>/seed<k>``, in a subprocess: a crash stays
in its folder (``error.txt``: exit status and the end of its stderr) and the others go on, and a variant with
``nproc_per_node > 1`` starts torchrun exactly as ``run`` does. A run whose folder already holds ``metrics.json``
for the same spec is skipped, so rerunning a sweep resumes it; an interrupted run restarts from its latest
checkpoint when it wrote one.

Outputs in the sweep's output_dir: ``results.md``, ``results.json``, ``results.csv`` (one row per variant, mean
± sample std over seeds) and PNG plots (:mod:`unitrans.engine.sweep_plots`). Peak memory is the peak resident set
size of each run's process tree, read by the sweep from the kernel's accounting of the reaped child
(``os.wait4`` rusage ``ru_maxrss``: the largest single process of the tree, i.e. per rank under torchrun; host
memory, not accelerator memory). The run loop itself records nothing extra.

This module imports neither torch nor matplotlib at import time: expanding and validating a sweep stays light.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from unitrans.errors import UserError

#: metrics.json keys that describe the run rather than score it.
BOOKKEEPING = ("train_time_s", "steps", "world_size")
PEAK_MEMORY_NOTE = ("peak RSS: maximum resident set size of the largest process of each run's process tree, read "
                    "by the sweep from os.wait4 rusage (ru_maxrss) of the reaped child; host memory, not GPU memory")
_TAIL_LINES = 30


@dataclass
class Variant:
    """One row of a sweep: a name, its dotted overrides and the validated spec (without the sweep table)."""

    name: str
    overrides: dict[str, Any]
    data: dict[str, Any]  # the raw spec dict with the overrides applied (what the child run receives)
    spec: Any = None  # unitrans.spec.Spec


@dataclass
class Sweep:
    """An expanded sweep: variants x seeds, and where they go."""

    spec_path: Path
    variants: list[Variant]
    seeds: list[int]
    output_dir: Path
    base: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Expansion and validation (light)
# --------------------------------------------------------------------------------------------------------------


def flatten_overrides(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"adapters": {"0": {"name": "lora"}}}`` or ``{"adapters.0.name": "lora"}`` -> ``{"adapters.0.name": "lora"}``.

    Tables nest into dotted keys (so TOML's quoted and unquoted dotted keys mean the same); lists and scalars are
    leaves that replace what the spec has (``adapters = []`` drops every adapter).
    """
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_overrides(value, dotted))
        else:
            out[dotted] = value
    return out


def parse_grid_arg(text: str) -> tuple[str, list[Any]]:
    """``"adapters.0.rank=16,32"`` -> ``("adapters.0.rank", [16, 32])``; values parse as TOML, else as strings."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise UserError(f"--grid {text!r}: expected dotted.key=v1,v2,..., e.g. --grid adapters.0.rank=16,32,64")
    try:
        parsed = tomllib.loads(f"v = [{values}]")["v"]
    except tomllib.TOMLDecodeError:
        parsed = []
        for item in values.split(","):
            item = item.strip()
            try:
                parsed.append(tomllib.loads(f"v = {item}")["v"])
            except tomllib.TOMLDecodeError:
                parsed.append(item)
    return key, parsed


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected integers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: expected distinct integers, e.g. --seeds 0,1,2")
    return seeds


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The last dotted part of each key where that is unambiguous, else the whole key."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _value_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return "".join(c if c.isalnum() or c in "_.+-" else "_" for c in str(text)) or "_"


def expand(variants: Mapping[str, Mapping[str, Any]],
           grid: Mapping[str, Sequence[Any]]) -> list[tuple[str, dict[str, Any], str]]:
    """Named variants crossed with the grid's cartesian product, as ``(name, dotted overrides, location)``.

    With no named variants the spec itself is the one variant crossed with the grid; with neither, the spec
    alone (named ``base``). Grid points are named ``key=value`` joined by ``,`` (the last part of each dotted key
    when unambiguous: ``name=lora,rank=16``); a named variant crossed with a grid point is ``variant+point``.
    The location (``sweep.variants.lora``, ``sweep.grid rank=16``) is where error lines say the variant comes from.
    """
    named = [(name, flatten_overrides(ov)) for name, ov in variants.items()] or [("", {})]
    keys = list(grid)
    short = _short_keys(keys)
    points: list[tuple[str, dict]] = []
    for values in itertools.product(*(grid[k] for k in keys)):
        label = ",".join(f"{short[k]}={_value_text(v)}" for k, v in zip(keys, values))
        points.append((label, dict(zip(keys, values))))
    points = points or [("", {})]
    out = []
    for (vname, vov), (gname, gov) in itertools.product(named, points):
        name = "+".join(n for n in (vname, gname) if n) or "base"
        where = " x ".join(w for w in (vname and f"sweep.variants.{vname}", gname and f"sweep.grid {gname}") if w)
        out.append((name, {**vov, **gov}, where or "(the spec itself)"))
    return out


def _selects(name: str, variant: str) -> bool:
    """``--only name`` picks the variant of that name and, under a grid, every ``name+point`` crossed from it."""
    return variant == name or variant.startswith(name + "+")


def load_sweep(path: str | Path, overrides: Sequence[str] = (), grid_args: Sequence[str] = (),
               seeds: Sequence[int] | None = None, output_dir: str | Path | None = None,
               only: Sequence[str] = ()) -> Sweep:
    """Read a sweep spec and validate every variant, reporting every problem of every variant at once.

    Args:
        path: the TOML spec (its ``[sweep]`` table, if any, lists the variants).
        overrides: ``--set`` overrides, applied to the spec before the variants'.
        grid_args: ``--grid key=v1,v2`` items; a key here replaces the same key of ``[sweep.grid]``.
        seeds: replaces ``[sweep] seeds``; default: those, else the spec's ``seed``.
        output_dir: the sweep's folder (default: the spec's ``output_dir``).
        only: keep only these variant names (default: all); a named variant's name also keeps every grid point
            crossed with it (``lora`` keeps ``lora+lr=0.001``, ...).

    Raises:
        SpecError: the spec, or any variant, is invalid (each line names its variant).
        UserError: a malformed ``--grid``, unknown ``only`` names.
    """
    from unitrans.spec import SpecError, apply_overrides, load_spec, validate_dict

    path = Path(path)
    base_spec = load_spec(path, overrides)  # the spec as written must be valid itself
    data = apply_overrides(tomllib.loads(path.read_text(encoding="utf-8")), overrides)
    sweep_table = data.pop("sweep", None) or {}
    grid = flatten_overrides(sweep_table.get("grid", {}))
    for item in grid_args:
        key, values = parse_grid_arg(item)
        grid[key] = values
    expanded = expand(sweep_table.get("variants", {}), grid)
    if only:
        known = [e[0] for e in expanded]
        missing = [n for n in only if not any(_selects(n, k) for k in known)]
        if missing:
            raise UserError(f"--only: no variant named {', '.join(repr(m) for m in missing)}; "
                            f"the variants are: {', '.join(known)}")
        expanded = [e for e in expanded if any(_selects(n, e[0]) for n in only)]
    errors: list[str] = []
    variants: list[Variant] = []
    for name, ov, where in expanded:
        try:
            vdata = apply_overrides(data, list(ov.items()))
            spec = validate_dict(vdata)
        except SpecError as exc:
            errors += [f"{where}: {line}" for line in exc.errors]
            continue
        variants.append(Variant(name, ov, vdata, spec))
    if errors:
        raise SpecError(errors)
    seeds = list(seeds) if seeds else (base_spec.sweep.seeds if base_spec.sweep and base_spec.sweep.seeds
                                       else [base_spec.seed])
    out = Path(output_dir) if output_dir is not None else Path(base_spec.output_dir)
    return Sweep(path, variants, seeds, out, data)


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


def run_dir(sweep: Sweep, variant: Variant, seed: int) -> Path:
    return sweep.output_dir / variant.name / f"seed{seed}"


def _variant_toml(variant: Variant, seed: int, folder: Path) -> str:
    from unitrans.spec import dump_toml

    spec = variant.spec.model_copy(update={"seed": seed, "output_dir": str(folder)})
    header = (f"# Sweep variant '{variant.name}', seed {seed}: the resolved spec this run received.\n"
              f"# Overrides: {json.dumps(variant.overrides)}\n")
    return header + dump_toml(spec)


def _wait(proc: subprocess.Popen) -> tuple[int, int | None]:
    """Reap ``proc``; its exit status and the peak RSS (KiB) of its process tree's largest process."""
    if not hasattr(os, "wait4"):  # not POSIX: no per-child accounting
        return proc.wait(), None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(usage.ru_maxrss)


def spawn(cmd: list[str], stdout, stderr, env: dict[str, str]) -> tuple[int, int | None]:
    """Run one variant's command in a subprocess; its exit status and peak RSS (KiB, None where unknown)."""
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
    try:
        return _wait(proc)
    except BaseException:  # Ctrl-C reached the child too: let it stop, then stop the sweep
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def _tail(path: Path, n: int = _TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-n:])


def run_one(sweep: Sweep, variant: Variant, seed: int, say=print) -> dict:
    """Run (or skip) one (variant, seed); returns its record (also saved as ``sweep_run.json`` in its folder)."""
    folder = run_dir(sweep, variant, seed)
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / "sweep_variant.toml"
    text = _variant_toml(variant, seed, folder)
    same_spec = spec_file.is_file() and spec_file.read_text(encoding="utf-8") == text
    record_file = folder / "sweep_run.json"
    label = f"{variant.name}/seed{seed}"
    if same_spec and (folder / "metrics.json").is_file():
        say(f"[sweep] {label}: finished before, skipped")
        return {"variant": variant.name, "seed": seed, **(_read_json(record_file) or {}), "returncode": 0}
    if (folder / "metrics.json").is_file():  # kept aside, so a failing rerun cannot pass off stale numbers
        say(f"[sweep] {label}: the spec changed since its results were written (old ones kept as "
            "metrics.stale.json): running again")
        (folder / "metrics.json").replace(folder / "metrics.stale.json")
    resume = same_spec and (folder / "checkpoints").is_dir()
    spec_file.write_text(text, encoding="utf-8")
    cmd = [sys.executable, "-m", "unitrans", "run", str(spec_file), "--output-dir", str(folder)]
    cmd.append("--resume" if resume else "--overwrite")  # the sweep owns its run folders
    env = dict(os.environ)
    spec_folder = str(sweep.spec_path.resolve().parent)  # a spec's local plugins sit beside it
    env["PYTHONPATH"] = os.pathsep.join([spec_folder] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    say(f"[sweep] {label}: running{' (resuming from its latest checkpoint)' if resume else ''}; "
        f"logs in {folder}/stdout.log, stderr.log")
    t0 = time.monotonic()
    with open(folder / "stdout.log", "w") as out, open(folder / "stderr.log", "w") as err:
        rc, peak_kib = spawn(cmd, out, err, env)
    wall = time.monotonic() - t0
    record = {"variant": variant.name, "seed": seed, "returncode": rc, "wall_s": round(wall, 3),
              "peak_rss_mib": None if peak_kib is None else round(peak_kib / 1024, 1), "command": cmd}
    _write_json(record_file, record)
    error_file = folder / "error.txt"
    if rc == 0 and (folder / "metrics.json").is_file():
        error_file.unlink(missing_ok=True)
        say(f"[sweep] {label}: done in {wall:.1f}s")
    else:
        why = f"exit status {rc}" if rc != 0 else "exit status 0 but no metrics.json was written"
        tail = _tail(folder / "stderr.log")
        error_file.write_text(f"{label} failed: {why}\ncommand: {' '.join(cmd)}\n\nlast lines of stderr:\n{tail}\n",
                              encoding="utf-8")
        say(f"[sweep] {label}: FAILED ({why}); see {error_file}")
        for line in tail.splitlines()[-5:]:
            say(f"[sweep]   | {line}")
        record["returncode"] = rc or 1
    return record


def run_sweep(sweep: Sweep, plots: bool = True, say=print) -> int:
    """Run every (variant, seed) not yet finished, then write the results and plots. Returns the exit status."""
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    n = len(sweep.variants) * len(sweep.seeds)
    say(f"[sweep] {len(sweep.variants)} variant(s) x {len(sweep.seeds)} seed(s) = {n} run(s) in {sweep.output_dir}/: "
        + ", ".join(v.name for v in sweep.variants))
    failed = []
    try:
        for variant in sweep.variants:
            for seed in sweep.seeds:
                if run_one(sweep, variant, seed, say)["returncode"] != 0:
                    failed.append(f"{variant.name}/seed{seed}")
    finally:  # an interrupted sweep still tabulates what finished
        results = collect(sweep)
        paths = write_results(sweep, results)
        if plots:
            paths += _plots(sweep, results, say)
        say(f"[sweep] results: {', '.join(str(p) for p in paths)}")
    if failed:
        say(f"[sweep] {len(failed)} of {n} run(s) failed: {', '.join(failed)} (error.txt in each folder); "
            "rerun the same command to retry them (finished runs are skipped)")
        return 1
    return 0


def _plots(sweep: Sweep, results: dict, say) -> list[Path]:
    try:
        from unitrans.engine.sweep_plots import write_plots
    except ModuleNotFoundError as exc:
        say(f"[sweep] no plots: {exc} (pip install 'unitrans[plots]')")
        return []
    return write_plots(sweep, results, say)


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample std; None below 2 values), "n", "values"}``."""
    values = [float(v) for v in values]
    return {"mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def primary_metric(sweep: Sweep) -> str | None:
    """``train.best_metric`` when set, else the task's primary metric (builds the task object; None if that fails)."""
    spec = sweep.variants[0].spec if sweep.variants else None
    if spec is None:
        return None
    if spec.train.best_metric:
        return spec.train.best_metric
    try:
        from unitrans import registry
        from unitrans.spec import component_kwargs

        name = registry.resolve_name("tasks", spec.task.name)
        return registry.get("tasks", name)(**component_kwargs("tasks", spec.task)).primary_metric
    except Exception:  # a task without the attribute, or one that cannot be built here
        return None


def collect(sweep: Sweep) -> dict:
    """Read every run folder: one row per variant with mean ± std over its finished seeds."""
    rows, metric_keys = [], []
    for variant in sweep.variants:
        runs, per_key = [], {}
        params = None
        for seed in sweep.seeds:
            folder = run_dir(sweep, variant, seed)
            metrics = _read_json(folder / "metrics.json")
            record = _read_json(folder / "sweep_run.json") or {}
            params = params or _read_json(folder / "params.json")
            status = "ok" if metrics else ("failed" if (folder / "error.txt").is_file() else "not run")
            runs.append({"seed": seed, "dir": str(folder), "status": status, "returncode": record.get("returncode"),
                         "wall_s": record.get("wall_s"), "peak_rss_mib": record.get("peak_rss_mib")})
            if not metrics:
                continue
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    per_key.setdefault(key, []).append(value)
                    if key not in BOOKKEEPING and key not in metric_keys:
                        metric_keys.append(key)
            if record.get("peak_rss_mib") is not None:
                per_key.setdefault("peak_rss_mib", []).append(record["peak_rss_mib"])
        n_ok = sum(r["status"] == "ok" for r in runs)
        rows.append({
            "variant": variant.name,
            "overrides": variant.overrides,
            "seeds": [r["seed"] for r in runs if r["status"] == "ok"],
            "status": "ok" if n_ok == len(runs) else f"{len(runs) - n_ok} of {len(runs)} failed or not run",
            "trainable_params": params.get("trainable") if params else None,
            "total_params": params.get("total") if params else None,
            "metrics": {k: summarize(v) for k, v in per_key.items()},
            "runs": runs,
        })
    return {"spec": str(sweep.spec_path), "output_dir": str(sweep.output_dir), "seeds": sweep.seeds,
            "primary_metric": primary_metric(sweep), "metric_keys": metric_keys,
            "std": "sample standard deviation over seeds (statistics.stdev)", "peak_memory": PEAK_MEMORY_NOTE,
            "variants": rows}


def _fmt(summary: dict | None, digits: int = 2) -> str:
    if not summary or summary["mean"] is None:
        return "-"
    if summary["std"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def format_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}K" if n >= 1e3 else str(n))


def markdown(results: dict) -> str:
    keys = results["metric_keys"]
    head = ["variant", "# tunable", *keys, "train time (s)", "peak RSS (MiB)", "seeds", "status"]
    lines = [f"# Sweep results: {results['spec']}", "",
             f"Mean ± sample std over seeds {results['seeds']}; primary metric: {results['primary_metric']}.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 3) + ["---", "---"]) + "|"]
    for row in results["variants"]:
        m = row["metrics"]
        cells = [row["variant"], format_params(row["trainable_params"]), *(_fmt(m.get(k)) for k in keys),
                 _fmt(m.get("train_time_s"), 1), _fmt(m.get("peak_rss_mib"), 0),
                 ",".join(map(str, row["seeds"])) or "-", row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Variants (overrides of the spec):", ""]
    lines += [f"- `{row['variant']}`: {json.dumps(row['overrides']) if row['overrides'] else '(the spec as written)'}"
              for row in results["variants"]]
    lines += ["", f"Trainable parameters from each run's params.json; training time is metrics.json `train_time_s`; "
              f"{results['peak_memory']}.", ""]
    return "\n".join(lines)


def write_results(sweep: Sweep, results: dict) -> list[Path]:
    """``results.json``, ``results.md``, ``results.csv`` in the sweep's folder."""
    out = sweep.output_dir
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    columns = ["variant", "seeds", "n_ok", "status", "trainable_params", "total_params"]
    stats = results["metric_keys"] + ["train_time_s", "peak_rss_mib"]
    for key in stats:
        columns += [f"{key}_mean", f"{key}_std"]
    columns.append("overrides")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for row in results["variants"]:
            flat = {"variant": row["variant"], "seeds": " ".join(map(str, row["seeds"])), "n_ok": len(row["seeds"]),
                    "status": row["status"], "trainable_params": row["trainable_params"],
                    "total_params": row["total_params"], "overrides": json.dumps(row["overrides"])}
            for key in stats:
                s = row["metrics"].get(key)
                flat[f"{key}_mean"] = "" if not s or s["mean"] is None else s["mean"]
                flat[f"{key}_std"] = "" if not s or s["std"] is None else s["std"]
            writer.writerow(flat)
    return [out / "results.md", out / "results.json", out / "results.csv"]

"""``unitrans sweep``: variant expansion, all-at-once validation, results tables (mean ± std recomputed here from
the runs' own files), plots, skipping finished runs, resuming, and a crashing variant that leaves the others alone.

The tiny sweep runs its children in this process (``sweep.spawn`` replaced) so the file stays fast on 2 cores;
one test sends a crashing run through the real subprocess path.
"""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
import traceback
from pathlib import Path

import pytest

from unitrans import cli
from unitrans.engine import sweep as sweep_mod
from unitrans.errors import UserError
from unitrans.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.toml"
TINY = ["data.n_train=64", "data.n_val=8", "data.n_test=12", "train.max_steps=2", "train.batch_size=16",
        "train.progress=false", "train.log_every=1", "train.tensorboard=false", "eval.at_start=false", "task.k_test=5"]
OK_VARIANTS = ("lora", "vcra")
SEEDS = (0, 1)


def _sweep_spec(tmp: Path) -> Path:
    """The quickstart spec plus a [sweep] table: LoRA, VCRA, and a variant whose data root cannot be created."""
    (tmp / "not_a_folder").write_text("a file where the broken variant wants a folder\n")
    text = QUICKSTART.read_text() + f"""
[sweep]
seeds = [0, 1]

[sweep.variants.lora]
"adapters.0.name" = "lora"

[sweep.variants.vcra]
adapters.0.name = "vcra"

[sweep.variants.broken]
"data.root" = "{tmp / 'not_a_folder' / 'shapes'}"
"""
    path = tmp / "sweep.toml"
    path.write_text(text)
    return path


def _argv(spec: Path, out: Path, data: Path, *extra: str) -> list[str]:
    argv = ["sweep", str(spec), "--output-dir", str(out), "--set", f"data.root={data}"]
    for item in TINY:
        argv += ["--set", item]
    return argv + list(extra)


class InProcess:
    """Stands in for :func:`unitrans.engine.sweep.spawn`: runs ``unitrans run`` through ``cli.main`` here."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, cmd, stdout, stderr, env):
        self.calls.append(cmd)
        argv = cmd[cmd.index("run"):]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                rc = cli.main(argv)
            except Exception:  # a crash: what a subprocess would print before exiting with status 1
                traceback.print_exc()
                rc = 1
        return rc, None

    def ran(self) -> list[str]:
        """``variant/seedK`` of each call, from its --output-dir."""
        return ["/".join(Path(c[c.index("--output-dir") + 1]).parts[-2:]) for c in self.calls]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    spec = _sweep_spec(tmp)
    out, data = tmp / "out", tmp / "data"
    runner = InProcess()
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: fastest on one thread, and fair to the other tests sharing the cores
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sweep_mod, "spawn", runner)
            rc = cli.main(_argv(spec, out, data))
    finally:
        torch.set_num_threads(threads)
    return {"tmp": tmp, "spec": spec, "out": out, "data": data, "rc": rc, "runner": runner}


def _rerun(tiny) -> tuple[int, InProcess]:
    runner = InProcess()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "spawn", runner)
        rc = cli.main(_argv(tiny["spec"], tiny["out"], tiny["data"]))
    return rc, runner


def _mtimes(out: Path) -> dict[str, int]:
    return {f"{v}/seed{s}": (out / v / f"seed{s}" / "metrics.json").stat().st_mtime_ns
            for v in OK_VARIANTS for s in SEEDS}


# --------------------------------------------------------------------------------------------------------------
# Expansion and validation
# --------------------------------------------------------------------------------------------------------------


def test_grid_is_a_cartesian_product_crossed_with_named_variants():
    grid = {"adapters.0.name": ["lora", "vcra"], "adapters.0.rank": [16, 32, 64]}
    only_grid = sweep_mod.expand({}, grid)
    assert [name for name, _, _ in only_grid] == [
        "name=lora,rank=16", "name=lora,rank=32", "name=lora,rank=64",
        "name=vcra,rank=16", "name=vcra,rank=32", "name=vcra,rank=64"]
    assert only_grid[4][1] == {"adapters.0.name": "vcra", "adapters.0.rank": 32}

    named = {"qasn": {"side_network": {"name": "qasn"}}, "plain": {}}  # nested tables mean dotted keys
    crossed = sweep_mod.expand(named, {"adapters.0.rank": [8, 16]})
    assert [(n, ov) for n, ov, _ in crossed] == [
        ("qasn+rank=8", {"side_network.name": "qasn", "adapters.0.rank": 8}),
        ("qasn+rank=16", {"side_network.name": "qasn", "adapters.0.rank": 16}),
        ("plain+rank=8", {"adapters.0.rank": 8}),
        ("plain+rank=16", {"adapters.0.rank": 16})]
    assert crossed[0][2] == "sweep.variants.qasn x sweep.grid rank=8"
    assert [n for n, _, _ in sweep_mod.expand(named, {})] == ["qasn", "plain"]
    assert sweep_mod.expand({}, {}) == [("base", {}, "(the spec itself)")]

    assert sweep_mod.parse_grid_arg("adapters.0.rank=16,32") == ("adapters.0.rank", [16, 32])
    assert sweep_mod.parse_grid_arg("adapters.0.name=lora,vcra") == ("adapters.0.name", ["lora", "vcra"])
    assert sweep_mod.parse_seeds("0, 1,2") == [0, 1, 2]


def test_command_line_grid_and_seeds(tmp_path, capsys):
    rc = cli.main(["sweep", str(QUICKSTART), "--dry-run", "--grid", "adapters.0.name=lora,vcra",
                   "--grid", "adapters.0.rank=4,8", "--seeds", "3,4", "--output-dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "name=lora,rank=4: {'adapters.0.name': 'lora', 'adapters.0.rank': 4}" in out
    assert out.count("name=") == 4 and "seeds: [3, 4]" in out
    assert not (tmp_path / "o").exists()  # a dry run runs nothing


def test_only_a_named_variant_keeps_every_grid_point_crossed_with_it(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(QUICKSTART.read_text() + """
[sweep.variants.lora]
"adapters.0.name" = "lora"
[sweep.variants.lora_wide]
"adapters.0.name" = "lora"
"adapters.0.rank" = 16
""")
    grid = ["train.lr=1e-3,3e-3"]
    picked = sweep_mod.load_sweep(spec, grid_args=grid, only=["lora"])
    assert [v.name for v in picked.variants] == ["lora+lr=0.001", "lora+lr=0.003"]  # not lora_wide's points
    one = sweep_mod.load_sweep(spec, grid_args=grid, only=["lora_wide+lr=0.003"])
    assert [v.name for v in one.variants] == ["lora_wide+lr=0.003"]
    with pytest.raises(UserError, match="no variant named 'lor'"):
        sweep_mod.load_sweep(spec, grid_args=grid, only=["lor"])


def test_every_variant_error_is_reported_at_once(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text(QUICKSTART.read_text() + """
[sweep]
seeds = [0, 1]
[sweep.variants.typo]
"adapters.0.rnak" = 8
[sweep.variants.negative]
"adapters.0.rank" = -1
"train.lr" = 0
[sweep.variants.past_end]
"adapters.3.rank" = 8
[sweep.variants.fine]
"adapters.0.rank" = 8
""")
    with pytest.raises(SpecError) as info:
        sweep_mod.load_sweep(spec)
    lines = info.value.errors
    assert len(lines) == 4, lines
    assert any(l.startswith("sweep.variants.typo: adapters[0] (vcra.v1) -> rnak: unknown field; did you mean 'rank'?")
               for l in lines)
    assert sum(l.startswith("sweep.variants.negative: ") for l in lines) == 2
    assert any(l.startswith("sweep.variants.past_end: ") and "past the end" in l for l in lines)
    assert not any("fine" in l for l in lines)

    assert cli.main(["sweep", str(spec), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "(4 problems)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing ran
    assert cli.main(["validate", str(spec)]) == 2  # `validate` checks every variant too
    assert "sweep.variants.typo" in capsys.readouterr().err

    spec.write_text(QUICKSTART.read_text() + '[sweep]\nseedz = [1]\n[sweep.variants."a b"]\n')
    assert cli.main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "sweep -> seedz: unknown field; did you mean 'seeds'?" in err and "folder names" in err


# --------------------------------------------------------------------------------------------------------------
# The tiny sweep: 2 variants x 2 seeds (+ one that crashes)
# --------------------------------------------------------------------------------------------------------------


def test_tiny_sweep_results_are_mean_and_sample_std_of_the_runs(tiny):
    out = tiny["out"]
    assert tiny["rc"] == 1  # the broken variant failed, so the sweep reports failure ...
    assert sorted(tiny["runner"].ran()) == sorted(f"{v}/seed{s}" for v in (*OK_VARIANTS, "broken") for s in SEEDS)
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["variants"]}
    assert list(rows) == ["lora", "vcra", "broken"]
    assert results["primary_metric"] == "r_mean"
    assert {"txt_r1", "img_r10", "r_mean"} <= set(results["metric_keys"])
    md = (out / "results.md").read_text()
    csv_rows = {r["variant"]: r for r in csv.DictReader((out / "results.csv").open())}
    for variant in OK_VARIANTS:  # ... and the others completed
        row = rows[variant]
        assert row["status"] == "ok" and row["seeds"] == list(SEEDS)
        runs = [json.loads((out / variant / f"seed{s}" / "metrics.json").read_text()) for s in SEEDS]
        params = json.loads((out / variant / "seed0" / "params.json").read_text())
        assert row["trainable_params"] == params["trainable"] > 0
        for key in [*results["metric_keys"], "train_time_s"]:
            values = [m[key] for m in runs]
            assert row["metrics"][key]["mean"] == pytest.approx(statistics.mean(values))
            assert row["metrics"][key]["std"] == pytest.approx(statistics.stdev(values))
            assert float(csv_rows[variant][f"{key}_mean"]) == pytest.approx(statistics.mean(values))
            assert float(csv_rows[variant][f"{key}_std"]) == pytest.approx(statistics.stdev(values))
        r_mean = [m["r_mean"] for m in runs]
        line = next(l for l in md.splitlines() if l.startswith(f"| {variant} |"))
        assert f"{statistics.mean(r_mean):.2f} ± {statistics.stdev(r_mean):.2f}" in line
    assert rows["lora"]["trainable_params"] > rows["vcra"]["trainable_params"]  # LoRA r=32 vs VCRA r=32


def test_tiny_sweep_reports_the_crash_in_its_folder(tiny):
    out = tiny["out"]
    row = next(r for r in json.loads((out / "results.json").read_text())["variants"] if r["variant"] == "broken")
    assert row["status"] == "2 of 2 failed or not run" and row["seeds"] == []
    for seed in SEEDS:
        error = (out / "broken" / f"seed{seed}" / "error.txt").read_text()
        assert "exit status 2" in error and "not_a_folder" in error and "set data.root" in error  # one clear line
        assert not (out / "broken" / f"seed{seed}" / "metrics.json").exists()
    for variant in OK_VARIANTS:
        assert not (out / variant / "seed0" / "error.txt").exists()
    assert "| broken |" in (out / "results.md").read_text()


def test_tiny_sweep_plots_exist(tiny):
    pytest.importorskip("matplotlib")  # the `plots` extra: without it a sweep writes its tables only
    for name in ("metric_vs_params.png", "params_vs_rank.png", "loss_curves.png"):
        path = tiny["out"] / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert path.stat().st_size > 10_000, name
    curves = json.loads((tiny["out"] / "params_vs_rank.json").read_text())
    assert curves["n_points"] == 24 and curves["widths"] == [64]  # tiny BLIP: 2 layers x (V, T, C) x (q, k, v)
    assert curves["lora"] == [2 * 24 * 64 * r for r in curves["ranks"]]  # 2·N·d·r


def test_rerun_skips_finished_runs(tiny):
    before = _mtimes(tiny["out"])
    rc, runner = _rerun(tiny)
    assert rc == 1
    assert sorted(runner.ran()) == ["broken/seed0", "broken/seed1"]  # only the failed ones are retried
    assert _mtimes(tiny["out"]) == before


def test_resume_after_interruption_reruns_only_the_unfinished_run(tiny):
    out = tiny["out"]
    before = _mtimes(out)
    (out / "lora" / "seed1" / "metrics.json").unlink()  # as if the sweep had been stopped during this run
    rc, runner = _rerun(tiny)
    assert rc == 1
    assert sorted(runner.ran()) == ["broken/seed0", "broken/seed1", "lora/seed1"]
    lora_cmd = next(c for c in runner.calls if "lora" in c[c.index("--output-dir") + 1])
    assert "--resume" in lora_cmd  # continues from its latest checkpoint
    after = _mtimes(out)
    assert after["lora/seed1"] != before["lora/seed1"]
    assert {k: v for k, v in after.items() if k != "lora/seed1"} == {k: v for k, v in before.items() if k != "lora/seed1"}
    metrics = json.loads((out / "lora" / "seed1" / "metrics.json").read_text())
    assert metrics["steps"] == 2


def test_a_crash_in_a_real_subprocess_is_contained(tiny, capsys):
    """The real path: ``python -m unitrans run`` in a subprocess, its peak RSS read when it is reaped."""
    out = tiny["tmp"] / "real"
    rc = cli.main(_argv(tiny["spec"], out, tiny["data"], "--only", "broken", "--seeds", "0", "--no-plots"))
    assert rc == 1
    assert "broken/seed0: FAILED (exit status 2)" in capsys.readouterr().out  # the data root is a file
    folder = out / "broken" / "seed0"
    assert "set data.root to a writable folder" in (folder / "error.txt").read_text()
    record = json.loads((folder / "sweep_run.json").read_text())
    assert record["returncode"] == 2 and record["peak_rss_mib"] > 50  # python + torch are resident
    assert (out / "results.md").is_file() and not (out / "loss_curves.png").exists()


# --------------------------------------------------------------------------------------------------------------
# Fig. 4c's closed forms against the real modules
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, 16])
def test_closed_form_counts_equal_count_parameters(rank):
    from conftest import build_spec, spec_dict

    from unitrans.engine.build import count_parameters
    from unitrans.engine.sweep_plots import DEFAULT_TARGETS, lora_params, vcra_params
    from unitrans.interfaces import match_points

    for name, formula in (("lora", lora_params), ("vcra", vcra_params)):
        _, built = build_spec(spec_dict(adapters=[{"name": name, "rank": rank, "targets": DEFAULT_TARGETS}]))
        points, _ = match_points(built.backbone.injection_points(), DEFAULT_TARGETS)
        counted = count_parameters(built)["by_component"][f"adapters.0 ({name}.v1)"]["trainable"]
        assert formula(points, rank) == counted, name

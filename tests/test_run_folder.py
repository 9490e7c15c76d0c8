"""An output folder belongs to one run, resume is checked before any file is touched, nothing is unpickled, and
the user's mistakes around a run (bad folders, devices, spec files, plugins, data read in workers) are one line
with exit code 2."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from unitrans import cli
from unitrans.engine import checkpoint as ckpt
from unitrans.engine import outdir

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "examples" / "quickstart.toml")


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        "run", QUICKSTART, "--output-dir", str(out), "--set", f"data.root={data}", "--set", "data.n_train=32",
        "--set", "data.n_val=4", "--set", "data.n_test=8", "--set", "train.batch_size=16",
        "--set", "train.progress=false", "--set", "train.log_every=1", "--set", "task.k_test=4",
        "--set", "eval.at_start=false",
        "--set", "train.tensorboard=false", "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """One finished tiny run (4 steps, checkpoints at 2 and 4); tests work on copies of its folder."""
    base = tmp_path_factory.mktemp("finished")
    data, out = base / "data", base / "run"
    assert cli.main(_args(out, data)) == 0
    return {"data": data, "out": out}


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished["out"], out, symlinks=True)
    return out


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != outdir.LOCK_FILE}


# ---- one run per folder -----------------------------------------------------------------------------------------

def test_a_fresh_run_refuses_a_folder_holding_another_run(finished, run_copy, capsys):
    before = _snapshot(run_copy)
    assert cli.main(_args(run_copy, finished["data"])) == 2
    line = _error(capsys)
    assert f"output_dir {run_copy} holds another run" in line
    assert "finished: metrics.json, adapter.safetensors, 2 checkpoint(s) up to step_00000004" in line
    assert "--overwrite" in line and "--resume" in line
    assert _snapshot(run_copy) == before  # nothing was touched


def test_overwrite_replaces_the_run_and_keeps_other_files(finished, run_copy):
    old_id = json.loads((run_copy / "run.json").read_text())["run_id"]
    (run_copy / "notes.txt").write_text("mine")
    assert cli.main(_args(run_copy, finished["data"], "--set", "train.max_steps=2", "--overwrite")) == 0
    assert json.loads((run_copy / "run.json").read_text())["run_id"] != old_id
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert json.loads((run_copy / "metrics.json").read_text())["steps"] == 2


def test_a_second_live_run_is_refused_and_a_dead_ones_lock_is_taken_over(finished, run_copy, capsys):
    lock = outdir.RunLock(run_copy)  # a live run holding the folder
    try:
        assert cli.main(_args(run_copy, finished["data"], "--resume")) == 2
        line = _error(capsys)
        assert f"output folder {run_copy} is in use by a live run (pid {os.getpid()}" in line
    finally:
        lock.release()
    # a run that died: its record is still in the lock file, but no process holds the lock
    (run_copy / outdir.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then"}))
    assert cli.main(_args(run_copy, finished["data"], "--resume")) == 0
    assert "took over the lock of an earlier run" in capsys.readouterr().out


def test_resume_continues_only_the_run_the_folder_belongs_to(finished, run_copy, capsys):
    record = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**record, "run_id": "f" * 32}))
    before = _snapshot(run_copy)
    assert cli.main(_args(run_copy, finished["data"], "--resume")) == 2
    line = _error(capsys)
    assert "step_00000004 belongs to run" in line and "not to the run of" in line and "ffffffff" in line
    assert _snapshot(run_copy) == before


def test_a_fresh_run_killed_in_an_old_folder_never_resumes_the_old_checkpoint(finished, run_copy, monkeypatch):
    """--overwrite, then killed before the new run's first checkpoint: --resume starts over; it must not continue
    the old run's step-4 checkpoint (the old code did)."""
    monkeypatch.setenv("UNITRANS_FAULT", "raise@1")
    with pytest.raises(RuntimeError, match="injected fault"):
        cli.main(_args(run_copy, finished["data"], "--overwrite"))
    assert not (run_copy / "checkpoints").exists() or not list((run_copy / "checkpoints").glob("step_*"))
    monkeypatch.delenv("UNITRANS_FAULT")
    assert cli.main(_args(run_copy, finished["data"], "--resume", "--set", "train.max_steps=2")) == 0
    log = [json.loads(x) for x in (run_copy / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # trained from the start, not from step 4


@pytest.mark.parametrize("where", ["/", "~", "file", "read-only"])
def test_folders_that_cannot_be_a_runs_are_refused(finished, tmp_path, capsys, monkeypatch, where):
    out = {"/": Path("/"), "~": Path.home(), "file": tmp_path / "a_file",
           "read-only": tmp_path / "ro" / "run"}[where]
    if where == "file":
        out.write_text("x")
    if where == "read-only":  # root may write anywhere, so the read-only mount is simulated at the syscall
        real_mkdir = Path.mkdir

        def ro_mkdir(self, *a, **k):
            if str(self).startswith(str(tmp_path / "ro")):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", ro_mkdir)
    assert cli.main(_args(out, finished["data"])) == 2
    line = _error(capsys)
    expected = {"/": "is the filesystem root", "~": "is your home folder", "file": "is a file, not a folder",
                "read-only": "is on a read-only file system"}[where]
    assert expected in line


def test_stale_temporaries_are_removed_at_start(finished, run_copy):
    root = run_copy / "checkpoints"
    leftovers = [root / ".step_00000006.tmp-4242", root / ".step_00000002.old-4242", root / "best_step_00000099"]
    for p in leftovers:
        p.mkdir()
        (p / "state.safetensors").write_bytes(b"half")
    (run_copy / ".metrics.json.tmp-4242").write_text("{")
    assert cli.main(_args(run_copy, finished["data"], "--resume")) == 0
    assert not any(p.exists() for p in leftovers) and not (run_copy / ".metrics.json.tmp-4242").exists()


def test_a_full_disk_during_a_run_is_one_line(finished, run_copy, capsys, monkeypatch):
    real = ckpt.atomic_write_bytes

    def full_in_checkpoints(path, data):
        if "checkpoints" in Path(path).parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_in_checkpoints)
    extra = ("--resume", "--set", "train.max_steps=6", "--allow-change", "train.max_steps")
    assert cli.main(_args(run_copy, finished["data"], *extra)) == 2
    line = _error(capsys)
    assert f"no space left on device writing to {run_copy / 'checkpoints'}: about " in line and "bytes needed" in line
    assert ckpt.find_resume_checkpoint(run_copy / "checkpoints").name == "step_00000004"  # the last one is intact


# ---- resume checks, before any file is touched ------------------------------------------------------------------

def test_resume_with_a_changed_spec_is_refused_with_every_difference(finished, run_copy, capsys):
    before = _snapshot(run_copy)
    extra = ("--resume", "--set", "train.lr=0.01", "--set", "adapters.0.rank=8", "--set", "train.batch_size=8",
             "--set", "backbone.train_parts=[\"itm_head\"]")
    assert cli.main(_args(run_copy, finished["data"], *extra)) == 2
    line = _error(capsys)
    for diff in ("adapters[0].rank: 32 -> 8", "train.lr: 0.001 -> 0.01", "train.batch_size: 16 -> 8",
                 "backbone.train_parts: ['vision_proj', 'text_proj', 'itm_head'] -> ['itm_head']"):
        assert diff in line, diff
    assert "--allow-change train.lr" in line
    assert _snapshot(run_copy) == before  # spec.resolved.toml and params.json were not rewritten


def test_rank_and_train_parts_can_never_be_allowed(finished, run_copy, capsys):
    assert cli.main(_args(run_copy, finished["data"], "--resume", "--allow-change", "adapters.0.rank")) == 2
    err = capsys.readouterr().err
    assert "'adapters.0.rank' cannot change on resume" in err and "Traceback" not in err


def test_a_resume_with_free_changes_only_goes_through(finished, run_copy):
    extra = ("--resume", "--set", "train.log_every=5", "--set", "eval.batch_size=8", "--set", "train.keep_last=3",
             "--set", "train.num_workers=1", "--set", "train.timeout_s=60")
    assert cli.main(_args(run_copy, finished["data"], *extra)) == 0


# ---- nothing is unpickled; broken files are one line ------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant_pickle(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.pt").write_bytes(pickle.dumps({"step": 2, "trainable": _Payload(marker)}))
    (folder / "COMPLETE").write_text("{}")
    return folder / "state.pt"


def test_a_malicious_state_pt_is_never_unpickled(finished, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    control = _plant_pickle(tmp_path / "control", marker)
    pickle.loads(control.read_bytes())  # the file really runs code when unpickled
    assert marker.exists()
    marker.unlink()

    out = tmp_path / "victim"
    planted = _plant_pickle(out / "checkpoints" / "step_00000002", marker)
    (out / "checkpoints" / "latest").write_text("step_00000002")
    assert cli.main(_args(out, finished["data"], "--resume")) == 2
    line = _error(capsys)
    assert str(planted) in line and "pickle" in line
    assert not marker.exists()

    # beside a real checkpoint, and named explicitly by train.resume: still never read
    out2 = tmp_path / "victim2"
    shutil.copytree(finished["out"], out2, symlinks=True)
    _plant_pickle(out2 / "checkpoints" / "step_00000004", marker)
    assert cli.main(_args(out2, finished["data"], "--set", f"train.resume={out2 / 'checkpoints' / 'step_00000004'}",
                          "--set", "train.max_steps=5", "--allow-change", "train.max_steps")) == 0
    assert not marker.exists()


@pytest.mark.parametrize("broken", [ckpt.TENSORS, ckpt.META])
def test_a_truncated_checkpoint_file_is_named(finished, run_copy, capsys, broken):
    path = run_copy / "checkpoints" / "step_00000004" / broken
    path.write_bytes(path.read_bytes()[:37])
    assert cli.main(_args(run_copy, finished["data"], "--resume")) == 2
    assert str(path) in _error(capsys)


@pytest.mark.parametrize("broken", ["adapter.safetensors", "adapter.json"])
def test_a_garbage_adapter_file_is_named_by_export(finished, run_copy, tmp_path, capsys, broken):
    (run_copy / broken).write_bytes(b"\x00garbage\xff" * 3)
    argv = ["export", QUICKSTART, "--checkpoint", str(run_copy), "--out", str(tmp_path / "exported")]
    assert cli.main(argv) == 2
    assert str(run_copy / broken) in _error(capsys)


# ---- mistakes around a run: one line, exit 2 --------------------------------------------------------------------

@pytest.mark.parametrize("device,expected", [
    ("cuda", "train.device = 'cuda' but this machine has no CUDA GPU"),
    ("cuda:7", "train.device = 'cuda:7' but this machine has no CUDA GPU"),
    ("tpu", "train -> device: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
])
def test_a_device_that_is_not_there_is_one_line(finished, tmp_path, capsys, monkeypatch, device, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(_args(tmp_path / "run", finished["data"], "--set", f"train.device={device}")) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_lr_fails_validation(tmp_path, capsys, value):
    assert cli.main(["validate", QUICKSTART, "--set", f"train.lr={value}"]) == 2
    err = capsys.readouterr().err
    assert "train -> lr:" in err and "Traceback" not in err


def test_a_spec_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    spec = tmp_path / "latin1.toml"
    spec.write_bytes(Path(QUICKSTART).read_text().replace("Quickstart", "Quickstart caf\u00e9").encode("latin-1"))
    assert cli.main(["run", str(spec)]) == 2
    line = _error(capsys)
    assert str(spec) in line and "not UTF-8" in line


@pytest.mark.parametrize("body,expected", [
    ("def broken(:\n", "SyntaxError: "),
    ("raise RuntimeError('no licence server')\n", "RuntimeError: no licence server"),
])
def test_a_plugin_that_fails_on_import_is_named(tmp_path, capsys, body, expected):
    name = f"bad_plugin_{abs(hash(body)) % 10**6}"
    (tmp_path / f"{name}.py").write_text(body)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'plugins = ["{name}"]\n' + Path(QUICKSTART).read_text().split("seed = 0", 1)[1])
    assert cli.main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"plugin module '{name}' could not be imported: {expected}" in err and "Traceback" not in err


def test_a_bad_image_read_in_a_dataloader_worker_names_the_file(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(root / f"{i}.png")
    (root / "3.png").write_bytes(b"not a png at all")
    train = [{"image": f"{i}.png", "caption": f"picture {i} {j}", "image_id": i} for i in range(8) for j in range(2)]
    test = [{"image": f"{i}.png", "caption": [f"picture {i}"]} for i in (0, 1)]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    argv = ["run", QUICKSTART, "--output-dir", str(tmp_path / "run"), "--set", "data.name=blip_retrieval.v1",
            "--set", f"data.image_root={root}", "--set", f"data.train_file={tmp_path / 'train.json'}",
            "--set", f"data.test_file={tmp_path / 'test.json'}", "--set", "data.min_scale=0.5",
            "--set", "train.num_workers=1", "--set", "train.batch_size=16", "--set", "train.progress=false",
            "--set", "eval.at_start=false", "--set", "train.tensorboard=false", "--set", "task.k_test=2"]
    spec_text = Path(QUICKSTART).read_text().replace('root = "runs/data/shapes"\n', "")
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_text)
    argv[1] = str(spec)
    assert cli.main(argv) == 2
    line = _error(capsys)
    assert line.startswith(f"error: cannot read image {root / '3.png'}"), line

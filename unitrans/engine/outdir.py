"""An output folder belongs to one run.

A run records an id in ``run.json`` when it creates its folder, and every resume checkpoint carries that id. So:

- a fresh run refuses a folder that holds another run, saying what is there (``--overwrite`` /
  ``train.overwrite = true`` removes that run's files first; ``--resume`` continues it);
- ``--resume`` continues only the run the folder belongs to (a checkpoint with another id is refused);
- a lock (``.unitrans.lock``, an ``flock`` held for the life of the process, with the pid and host written in it)
  refuses a second live run into the same folder; the kernel releases it when the process ends, however it ends,
  so a lock left by a dead process is simply taken over;
- folders that cannot be a run's (the filesystem root, the home folder, a file, an unwritable or read-only
  folder) are refused with one line.

Only the main rank checks and writes; the other ranks wait for it and then read the same resume checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unitrans.engine.checkpoint import (clean_stale, find_resume_checkpoint, load_resume_checkpoint, read_json,
                                        write_file)
from unitrans.errors import UserError

RUN_FILE = "run.json"
LOCK_FILE = ".unitrans.lock"
#: What a run writes into its folder (``--overwrite`` removes exactly these; other files are left alone).
RUN_OUTPUTS = ("run.json", "spec.resolved.toml", "params.json", "log.jsonl", "metrics_initial.json", "metrics.json",
               "adapter.safetensors", "adapter.json", "checkpoints", "tb")
RUN_OUTPUT_GLOBS = ("captions_*.json", "vqa_result_*.json")


@dataclass
class ResumePoint:
    """A resume checkpoint read from disk: its folder, its tensors and its JSON record."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict


@dataclass
class RunFolder:
    """The claimed output folder: its run id, the lock (main rank) and the checkpoint to resume from, if any."""

    path: Path
    run_id: str
    resume: ResumePoint | None = None
    lock: "RunLock | None" = None
    notes: list[str] = field(default_factory=list)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.unitrans.lock`` holding this process's pid and host."""

    def __init__(self, folder: Path):
        import fcntl

        self.path = folder / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip() or "{}"
            os.close(self.fd)
            raise UserError(f"output folder {folder} is in use by a live run ({_describe_holder(holder)}); wait for "
                            "it to finish or use another --output-dir") from None
        self.previous = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip()
        os.ftruncate(self.fd, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(self.fd, (json.dumps(me) + "\n").encode(), 0)

    def release(self) -> None:
        """Clear the holder's record (an empty lock file means the last run released it) and unlock."""
        import fcntl

        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h.get('pid')} on {h.get('host')}, since {h.get('since')}"
    except (ValueError, AttributeError):
        return "holder unknown"


def check_folder_path(out: Path) -> Path:
    """``out`` resolved; one-line UserError for a folder that cannot be a run's."""
    path = Path(os.path.abspath(Path(out).expanduser()))
    if path == Path(path.anchor):
        raise UserError(f"output_dir = '{out}' is the filesystem root; give the run a folder of its own")
    if path == Path.home().resolve() or path == Path.home():
        raise UserError(f"output_dir = '{out}' is your home folder; give the run a folder of its own")
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir = '{out}' is a file, not a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir = '{out}': {existing} is not writable")
    return path


def make_folder(path: Path, shown: str) -> None:
    """Create the folder (parents too); a read-only file system or no permission -> one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        why = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable",
               errno.EPERM: "is not writable", errno.ENOSPC: "is on a full disk"}.get(
                   exc.errno, f"cannot be created ({exc.strerror})")
        raise UserError(f"output_dir = '{shown}': {path} {why}") from None


def run_outputs(path: Path) -> list[Path]:
    """The files and folders of a run that ``path`` holds (empty for a fresh folder)."""
    if not path.is_dir():
        return []
    found = [path / n for n in RUN_OUTPUTS if (path / n).exists()]
    for pattern in RUN_OUTPUT_GLOBS:
        found += sorted(path.glob(pattern))
    return found


def describe_run(path: Path) -> str:
    """What the run in ``path`` is and has: id, start, results, checkpoints."""
    record = _run_record(path)
    who = f"run {record.get('run_id', '?')[:8]} started {record.get('created', '?')}" if record else \
        "a run of an earlier version"
    what = [p.name for p in run_outputs(path) if p.name in ("metrics.json", "adapter.safetensors")]
    steps = sorted((path / "checkpoints").glob("step_*"))
    if steps:
        what.append(f"{len(steps)} checkpoint(s) up to {steps[-1].name}")
    state = "finished: " + ", ".join(what) if "metrics.json" in what else ", ".join(what) or "no checkpoint yet"
    return f"{who} ({state})"


def _run_record(path: Path) -> dict:
    file = path / RUN_FILE
    if not file.is_file():
        return {}
    record = read_json(file)
    return record if isinstance(record, dict) else {}


def remove_run(path: Path) -> None:
    """``--overwrite``: remove the previous run's outputs (only those; other files in the folder stay), except
    ``run.json``, which the new run has already replaced (so a kill half-way never leaves the old checkpoints
    looking like the new run's)."""
    for p in run_outputs(path):
        if p.name == RUN_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def new_run_record(path: Path, run_id: str | None = None) -> str:
    """Write ``run.json`` (a new id unless ``run_id`` is given, e.g. a run continued in a new folder)."""
    run_id = run_id or uuid.uuid4().hex
    record = {"run_id": run_id, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(),
              "pid": os.getpid()}
    write_file(path / RUN_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return run_id


def read_resume_point(checkpoint: Path) -> ResumePoint:
    """Load the checkpoint (tensors and record), refusing a foreign or old-format one by name."""
    tensors, meta = load_resume_checkpoint(checkpoint)
    return ResumePoint(Path(checkpoint), tensors, meta)


def checkpoint_to_resume(spec, path: Path) -> Path | None:
    """The checkpoint ``train.resume`` names for the folder ``path``: ``None`` for a fresh start."""
    r = spec.train.resume
    if r == "none":
        return None
    if r == "latest":
        return find_resume_checkpoint(path / "checkpoints")
    given = Path(r)
    if not given.is_dir():
        raise UserError(f"train.resume = '{r}': no such checkpoint folder (use 'latest' or 'none')")
    return given


def stale_cleanup(path: Path) -> list[Path]:
    """Temporaries left by an interrupted writer, in the folder and its ``checkpoints/`` (holding the lock)."""
    removed = clean_stale(path / "checkpoints")
    removed += [p for p in path.glob(".*.tmp-*") if p.is_file()]
    for p in removed:
        if p.parent == path:
            p.unlink(missing_ok=True)
    return removed


def claim(spec, main: bool = True) -> RunFolder:
    """Check and take ``spec.output_dir`` for this run, before any other file is touched.

    Main rank: refuse a folder that cannot be a run's, lock it, refuse another run's folder (fresh run) or another
    run's checkpoint or a changed spec (resume), clean stale temporaries, then record the run id. Other ranks:
    only the checks that read nothing; call :func:`join` after the main rank is done.
    """
    shown = str(spec.output_dir)
    path = check_folder_path(Path(shown))
    if spec.train.resume != "none" and spec.train.overwrite:
        raise UserError("--resume (train.resume) and --overwrite (train.overwrite) exclude each other: continue "
                        "the run in the folder, or replace it")
    if not main:
        return RunFolder(path, run_id="")
    make_folder(path, shown)
    lock = RunLock(path)
    try:
        folder = _claim_locked(spec, path) if spec.train.resume != "none" else _claim_fresh(spec, path)
    except BaseException:
        lock.release()
        raise
    folder.lock = lock
    if lock.previous and "pid" in lock.previous:
        folder.notes.append(f"took over the lock of an earlier run that is no longer running "
                            f"({_describe_holder(lock.previous)})")
    return folder


def _claim_fresh(spec, path: Path) -> RunFolder:
    previous = run_outputs(path)
    if previous and not spec.train.overwrite:
        raise UserError(f"output_dir {path} holds another run: {describe_run(path)}. Use --resume to continue "
                        "it, --overwrite (train.overwrite = true) to replace it, or another --output-dir")
    run_id = new_run_record(path)
    if previous:
        remove_run(path)
    stale_cleanup(path)
    return RunFolder(path, run_id)


def _claim_locked(spec, path: Path) -> RunFolder:
    """Resume: the checkpoint must be this folder's run's, and the spec the one it was trained with."""
    from unitrans.engine.resume import check_resume_spec
    from unitrans.spec import resolve

    record = _run_record(path)
    checkpoint = checkpoint_to_resume(spec, path)
    if checkpoint is None:
        if run_outputs(path) and not record:
            raise UserError(f"output_dir {path} holds {describe_run(path)} with no checkpoint to resume; use "
                            "--overwrite to replace it or another --output-dir")
        stale_cleanup(path)
        note = "no checkpoint to resume yet: training from the beginning"
        return RunFolder(path, record.get("run_id") or new_run_record(path), notes=[note])
    point = read_resume_point(checkpoint)
    ck_id = str(point.meta.get("run_id", ""))
    if record and record.get("run_id") != ck_id:
        raise UserError(f"{checkpoint} belongs to run {ck_id[:8]}, not to the run of {path} "
                        f"({str(record.get('run_id'))[:8]}); resume only continues the run that owns the folder")
    notes = check_resume_spec(point.meta.get("spec", {}), resolve(spec), spec.train.allow_change, checkpoint)
    stale_cleanup(path)
    run_id = record.get("run_id") or new_run_record(path, ck_id)
    return RunFolder(path, run_id, point, notes=[f"changed on purpose: {n}" for n in notes])


def join(spec, folder: RunFolder) -> RunFolder:
    """Other ranks, after the main rank claimed the folder: its run id and the same resume checkpoint."""
    record = _run_record(folder.path)
    checkpoint = checkpoint_to_resume(spec, folder.path)
    point = read_resume_point(checkpoint) if checkpoint is not None else None
    return RunFolder(folder.path, str(record.get("run_id", "")), point)

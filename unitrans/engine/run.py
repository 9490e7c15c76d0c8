"""The program: train and evaluate one spec, writing the run's outputs to ``output_dir``.

Runs in one process or in each torchrun worker (the same code path; see :mod:`unitrans.engine.launch`).
Outputs (main rank only): ``run.json``, ``spec.resolved.toml``, ``params.json``, ``log.jsonl``,
``metrics_initial.json`` (with ``eval.at_start``), ``metrics.json``, ``adapter.safetensors`` + ``adapter.json``,
``checkpoints/``. The loop itself is :mod:`unitrans.engine.loop`; the output folder's ownership (one run per
folder, a lock, resume checks) is :mod:`unitrans.engine.outdir`.
"""

from __future__ import annotations

import errno
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unitrans import distributed as dist
from unitrans.engine import outdir
from unitrans.engine.build import build, count_parameters
from unitrans.engine.checkpoint import base_identity, disk_full, save_adapter
from unitrans.engine.loop import (TrainingError, evaluate, format_metrics, lr_lambda, say, skipped_total, skipping,
                                  task_hook, train)
from unitrans.engine.preflight import check_data
from unitrans.errors import UserError
from unitrans.fileio import atomic_write_json

__all__ = ["EpochSampler", "TrainingError", "lr_lambda", "run", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch, in a permutation that depends on (seed, epoch) only.

    Global batch ``b`` is ``perm[b*G : (b+1)*G]`` (G = per-device batch x processes) whatever the number of
    processes, so 1 and N processes see the same global batches; rank r takes its r-th slice. Incomplete global
    batches are dropped. ``start_batch`` skips batches already trained on (resume) without loading them.
    """

    def __init__(self, n: int, per_device: int, world: int, rank: int, seed: int, shuffle: bool = True):
        self.n, self.per_device, self.world, self.rank = n, per_device, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.global_batch = per_device * world
        self.batches = n // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        else:
            perm = torch.arange(self.n)
        for b in range(self.start_batch, self.batches):
            start = b * self.global_batch + self.rank * self.per_device
            yield from perm[start:start + self.per_device].tolist()

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.per_device


def run(spec) -> dict:
    """Train and evaluate ``spec`` in this process (one rank of a torchrun job, or alone).

    Returns the final metrics (what ``metrics.json`` holds: the task's metrics, ``train_time_s``, ``steps``,
    ``world_size``), on every rank.

    Errors that are the user's or the environment's (a full disk, a peer that stopped answering, a bad file read
    in a DataLoader worker) are raised as one-line :class:`UserError`s.
    """
    device = dist.init_from_env(spec.train.device, timeout_s=spec.train.timeout_s)
    folder, kernels = None, _deterministic_kernels(spec.train, device)
    try:
        check_data(spec, world=dist.world_size())  # every data problem at once, before any file or model
        folder = outdir.claim(spec, main=dist.is_main())
        return _run(spec, device, folder)
    except UserError as exc:
        raise _worker_error(exc) from None
    except RuntimeError as exc:
        if dist.is_timeout(exc):
            message = dist.stall_report(spec.train.timeout_s)
            dist.abandon()
            raise TrainingError(message) from None
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full(Path(exc.filename).parent if exc.filename else Path(spec.output_dir), None) from None
        raise
    finally:
        if folder is not None:
            folder.release()
        _set_deterministic(*kernels)
        dist.cleanup()


def _deterministic_kernels(tr, device: torch.device) -> tuple[bool, bool]:
    """Switch on deterministic kernels where ``train.deterministic`` says (default: on the CPU, where the
    accumulating index backward of ITM's hard negatives otherwise differs by ~1e-7 between two runs with two or
    more threads). Returns the previous setting, restored when the run ends."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    want = tr.deterministic if tr.deterministic is not None else device.type == "cpu"
    _set_deterministic(want, True)
    return before


def _set_deterministic(mode: bool, warn_only: bool) -> None:
    """``torch.use_deterministic_algorithms``, without importing the compiler when nothing has: the public call
    imports ``torch._inductor`` (seconds at start-up) only to set a flag that matters to compiled code."""
    low = getattr(torch._C, "_set_deterministic_algorithms", None)
    if low is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        low(mode, warn_only=warn_only)


def _worker_error(exc: UserError) -> UserError:
    """A UserError raised in a DataLoader worker arrives wrapped ("Caught DataError in DataLoader worker process
    0. Original Traceback ..."): give back the original one-line message, naming the file."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    name = type(exc).__name__
    message = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return type(exc)(message)


def _run(spec, device: torch.device, folder: outdir.RunFolder) -> dict:
    """The run, once the output folder is this run's: data pre-flight, build, train, evaluate, write."""
    from unitrans.spec import write_resolved

    dist.barrier()  # the main rank has claimed the folder (lock, checks, run id)
    if not dist.is_main():
        folder = outdir.join(spec, folder)
    for note in folder.notes:
        say(note)
    out = folder.path
    if dist.is_main():
        write_resolved(spec, out / "spec.resolved.toml")
    seed_everything(spec.seed)
    t0 = time.time()
    built = build(spec, device)
    base = base_identity(built.backbone)
    _report_parameters(built, out, device)
    task_hook(built.task, "setup", built)
    data, eval_ds = _setup_data(built, spec)
    if spec.eval.at_start and folder.resume is None:
        m0 = evaluate(built, eval_ds, spec, device, data.collate)
        if dist.is_main():
            atomic_write_json(out / "metrics_initial.json", m0)
        say(f"before fine-tuning ({spec.eval.split}): {format_metrics(m0)}")
    stats = train(built, data, eval_ds, spec, device, folder)
    metrics = stats["metrics"] or evaluate(built, eval_ds, spec, device, data.collate, output_dir=out)
    metrics.update({"train_time_s": stats["train_time_s"], "steps": stats["steps"], "world_size": dist.world_size()})
    if skipping(data.train):
        metrics["skipped_train_items"] = skipped_total(data.train.skipped, device)
    if dist.is_main():
        save_adapter(built, spec, out, base=base)
        atomic_write_json(out / "metrics.json", metrics)
    keys = [k for k in built.task.metric_keys if k in metrics]
    say(f"after fine-tuning  ({spec.eval.split}): {format_metrics({k: metrics[k] for k in keys})}")
    say(f"done in {time.time() - t0:.1f}s; outputs in {out}/")
    return metrics


def _report_parameters(built, out: Path, device: torch.device) -> None:
    params = count_parameters(built)
    if dist.is_main():
        atomic_write_json(out / "params.json", params)
    say(f"{built.names['backbone']} on {device} x {dist.world_size()}: {params['total']:,} parameters, "
        f"{params['trainable']:,} trainable ({100 * params['trainable'] / max(1, params['total']):.3f}%)")
    for comp, c in params["by_component"].items():
        say(f"  {comp:<36} trainable {c['trainable']:>12,}")


def _setup_data(built, spec):
    """The data module (prepared by the main rank first, e.g. generated, then read by the others) and the
    evaluation split; a missing split -> UserError."""
    bb = built.backbone
    if dist.is_main():
        data = built.data.setup(bb.image_size, bb.image_mean, bb.image_std)
    dist.barrier()
    if not dist.is_main():
        data = built.data.setup(bb.image_size, bb.image_mean, bb.image_std)
    eval_ds = data.test if spec.eval.split == "test" else data.val
    if eval_ds is None:
        raise UserError(f"eval.split = '{spec.eval.split}' but the data spec ({built.names['data']}) gives no "
                        f"{spec.eval.split} split")
    if data.train is None:
        raise UserError(f"the data spec ({built.names['data']}) gives no train split")
    return data, eval_ds

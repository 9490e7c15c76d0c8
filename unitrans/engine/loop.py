"""The training loop, in named parts: the step plan, optimizer and schedule, restore, checkpointer, logging, one
step, end of epoch. :func:`train` reads top to bottom::

    while step < total:
        batches = epoch_batches(loop)
        while the epoch lasts:
            terms, samples = one_step(loop, batches)      # grad_accum micro-batches, one optimizer step
            log.record(...)
            end_of_epoch(...) or checkpoint when due

The task's training hooks are called here: ``setup`` (by the caller, after the build), ``on_step_start`` before
each optimizer step's micro-batches, ``on_optimizer_step`` after ``optimizer.step()``, ``state_dict`` /
``load_state_dict`` with every resume checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from unitrans import distributed as dist
from unitrans.engine import checkpoint as ckpt
from unitrans.engine.outdir import ResumePoint, RunFolder
from unitrans.engine.strategy import wrap_for_training
from unitrans.engine.train_state import (load_optimizer_state, optimizer_state, rng_state, set_rng_state,
                                         with_prefix)
from unitrans.errors import UserError
from unitrans.fileio import atomic_write_text


class TrainingError(UserError):
    """Training cannot go on (non-finite loss or weights, a peer that stopped answering); the message says where
    and which checkpoint was kept."""


def say(msg: str) -> None:
    """A ``[unitrans]`` line on stdout, from the main rank only."""
    if dist.is_main():
        print(f"[unitrans] {msg}", flush=True)


def format_metrics(m: dict) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, (int, float)))


def autocast(device: torch.device, precision: str):
    """Autocast to bf16 / fp16 for ``precision``; nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def clear_adapter_caches(built) -> None:
    """Adapters may cache results across the forward calls of one step (VCRA: ``A x``, folded matrices); once
    backward has run, those hold only stale activations."""
    for adapter in built.adapters:
        clear = getattr(adapter, "clear_cache", None)  # on the Adapter interface; duck-typed plugins may lack it
        if clear is not None:
            clear()


def evaluate(built, dataset, spec, device, collate, output_dir=None) -> dict:
    """The task's metrics on ``dataset`` (every rank; files written by the main rank into ``output_dir``).

    Under ``on_error = "skip"`` the metrics also hold ``skipped_items``: the items of this evaluation whose media
    could not be read (scored on a blank picture), summed over the ranks."""
    built.backbone.model.eval()
    built.trainable.eval()
    counting = skipping(dataset)
    before = dataset.skipped if counting else 0
    with autocast(device, spec.train.precision):
        metrics = built.task.evaluate(built.backbone, dataset, spec.eval.batch_size, device=device,
                                      collate=collate, num_workers=spec.train.num_workers,
                                      output_dir=output_dir if dist.is_main() else None, split=spec.eval.split)
    clear_adapter_caches(built)
    metrics = {k: float(v) for k, v in metrics.items()}
    if counting:
        metrics["skipped_items"] = skipped_total(dataset.skipped - before, device)
    return metrics


def skipping(dataset) -> bool:
    """Whether ``dataset`` skips unreadable media (``on_error = "skip"``) and counts them."""
    return getattr(getattr(dataset, "reader", None), "on_error", None) == "skip"


def skipped_total(count: int, device) -> float:
    """``count`` summed over the ranks."""
    return float(dist.all_reduce_sum(torch.tensor([float(count)], device=device)).item())


def task_hook(task, name: str, *args) -> Any:
    """Call a training hook of the Task contract; duck-typed tasks without it are skipped."""
    fn = getattr(task, name, None)
    return fn(*args) if fn is not None else None


def inject_fault(step: int) -> None:
    """Test hook: ``UNITRANS_FAULT="kill@7"`` (or ``stop@3@rank1``, ``raise@4``) makes this process SIGKILL or
    SIGSTOP itself, or raise, at the start of step 7 (0-based: after 7 optimizer steps). Unset in normal use."""
    fault = os.environ.get("UNITRANS_FAULT")
    if not fault:
        return
    action, at, *who = fault.split("@")
    if int(at) != step or (who and who[0] != f"rank{dist.rank()}"):
        return
    if action == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)


# ---- the step plan, the optimizer and the schedule --------------------------------------------------------------

@dataclass
class Plan:
    """How the optimizer steps are laid out: per-device batch, steps per epoch, total steps."""

    per_device: int
    steps_per_epoch: int
    total: int


def plan_steps(n_train: int, tr, world: int) -> Plan:
    """The step plan for ``n_train`` samples; a batch that does not divide or fit -> UserError."""
    per_device = tr.batch_size // (world * tr.grad_accum)
    if per_device * world * tr.grad_accum != tr.batch_size or per_device == 0:
        raise UserError(f"train.batch_size = {tr.batch_size} (the global batch) is not divisible by "
                        f"processes ({world}) x grad_accum ({tr.grad_accum})")
    batches = n_train // (per_device * world)
    if batches < tr.grad_accum:
        raise UserError(f"the train split has {n_train} samples, fewer than one global batch ({tr.batch_size})")
    steps_per_epoch = batches // tr.grad_accum
    return Plan(per_device, steps_per_epoch, tr.max_steps or tr.epochs * steps_per_epoch)


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float, schedule: str = "cosine_step",
              steps_per_epoch: int = 1) -> Callable[[int], float]:
    """The lr factor of optimizer step ``step`` (0-based): linear warm-up to 1, then a cosine to ``min_ratio``.

    ``cosine_step`` decays at every step, reaching ``min_ratio`` at ``total_steps``. ``cosine_epoch`` is BLIP's
    ``cosine_lr_schedule``: constant within epoch ``e``, ``min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * e /
    epochs))`` with ``epochs = ceil(total_steps / steps_per_epoch)``.
    """
    epochs = max(1, math.ceil(total_steps / steps_per_epoch))

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine_epoch":
            progress = (step // steps_per_epoch) / epochs
        else:
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class Optim:
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def make_optimizer(state: dict[str, torch.Tensor], tr, plan: Plan, device: torch.device) -> Optim:
    """AdamW (decay on the matrices, or on every tensor with ``train.decay = "all"``), the lr schedule and the
    fp16 grad scaler. Two parameter groups either way (matrices, vectors), so a checkpoint's optimizer state fits."""
    decay = [p for p in state.values() if p.ndim >= 2]
    vectors = [p for p in state.values() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                             {"params": vectors, "weight_decay": tr.weight_decay if tr.decay == "all" else 0.0}],
                            lr=tr.lr)
    fn = lr_lambda(plan.total, int(tr.warmup_ratio * plan.total), tr.min_lr_ratio, tr.schedule,
                   plan.steps_per_epoch)
    return Optim(opt, torch.optim.lr_scheduler.LambdaLR(opt, fn),
                 torch.amp.GradScaler(device.type, enabled=tr.precision == "fp16"))


class _StepModule(nn.Module):
    """What DDP wraps: the backbone and the trainable parts; ``forward`` is the task's training step."""

    def __init__(self, built):
        super().__init__()
        self.model = built.backbone.model
        self.trainable = built.trainable
        self._built = built

    def forward(self, batch):
        b = self._built
        return b.task.training_step(b.backbone, batch, b.alignment)


def step_module(built, tr, device: torch.device) -> nn.Module:
    """The module one step runs: alone in one process, else wrapped by ``train.strategy`` (DDP or FSDP)."""
    return wrap_for_training(_StepModule(built), tr.strategy, device,
                             find_unused_parameters=tr.find_unused_parameters, precision=tr.precision)


# ---- the loop's state and restore -------------------------------------------------------------------------------

@dataclass
class Loop:
    """Everything one step needs, and where training stands (``step``: optimizer steps done)."""

    built: Any
    spec: Any
    device: torch.device
    data: Any
    eval_ds: Any
    plan: Plan
    state: dict[str, torch.Tensor]
    optim: Optim
    module: nn.Module
    sampler: Any
    folder: RunFolder
    step: int = 0
    best: float | None = None

    @property
    def epoch(self) -> int:
        return self.step // self.plan.steps_per_epoch

    def checkpoint_due(self) -> bool:
        every = self.spec.train.checkpoint_every
        return bool(every) and self.step % every == 0


def restore(t: Loop, point: ResumePoint) -> None:
    """Load a resume checkpoint into the loop: tensors, optimizer, schedule, scaler, task state, RNG, position."""
    tensors, meta = point.tensors, point.meta
    saved = with_prefix(tensors, "trainable")
    for k in sorted(set(saved) | set(t.state)):
        if k not in saved or k not in t.state or saved[k].shape != t.state[k].shape:
            raise UserError(f"{point.path}: trainable tensor '{k}' is missing or has another shape; the checkpoint "
                            "is from another spec")
    if meta.get("steps_per_epoch") != t.plan.steps_per_epoch:
        raise UserError(f"{point.path}: {meta.get('steps_per_epoch')} steps per epoch when written, "
                        f"{t.plan.steps_per_epoch} now: the training data changed size; start a new run")
    with torch.no_grad():
        for k, v in t.state.items():
            v.copy_(saved[k])
    from unitrans.engine.resume import apply_changes

    load_optimizer_state(t.optim.opt, tensors, meta["optimizer"])
    t.optim.sched.load_state_dict(meta["scheduler"])
    t.optim.scaler.load_state_dict(meta["scaler"])
    task_hook(t.built.task, "load_state_dict", with_prefix(tensors, "task"))
    set_rng_state(tensors, meta["rng"])
    t.step, t.best = int(meta["step"]), meta.get("best")
    apply_changes(t.optim.opt, t.optim.sched, t.spec.train, t.step)
    say(f"resumed from {point.path} at step {t.step}")


# ---- the checkpointer -------------------------------------------------------------------------------------------

def _last_finite(root: Path) -> str:
    last = ckpt.find_resume_checkpoint(root)
    return f"the last finite checkpoint is {last}" if last else "no checkpoint was written before it"


class Checkpointer:
    """Writes resume checkpoints (main rank) after checking, on every rank, that every tensor is finite."""

    def __init__(self, folder: RunFolder, spec, metric: str):
        from unitrans.spec import resolve

        self.root = folder.path / "checkpoints"
        self.keep_last = spec.train.keep_last
        self.record = {"format": ckpt.RESUME_FORMAT, "run_id": folder.run_id, "best_metric": metric,
                       "spec": resolve(spec)}

    def contents(self, t: Loop) -> tuple[dict[str, torch.Tensor], dict]:
        """The loop's whole training state as tensors plus JSON-able data."""
        opt_tensors, opt_meta = optimizer_state(t.optim.opt)
        rng_tensors, rng_meta = rng_state()
        task_state = task_hook(t.built.task, "state_dict") or {}
        tensors = {**{f"trainable.{k}": v for k, v in t.state.items()}, **opt_tensors,
                   **{f"task.{k}": v for k, v in task_state.items()}, **rng_tensors}
        meta = {**self.record, "step": t.step, "best": t.best, "steps_per_epoch": t.plan.steps_per_epoch,
                "optimizer": opt_meta, "scheduler": t.optim.sched.state_dict(),
                "scaler": t.optim.scaler.state_dict(), "rng": rng_meta}
        return tensors, meta

    def check_finite(self, t: Loop, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Stop (TrainingError, on every rank) when a trained tensor is not finite: one sync for all of them."""
        tensors = tensors if tensors is not None else t.state
        floats = [(k, v) for k, v in tensors.items() if v.is_floating_point()]
        flags = torch.stack([v.detach().isfinite().all() for _, v in floats]) if floats else torch.ones(1, dtype=torch.bool)
        if dist.any_true(not bool(flags.all()), t.device):
            bad = next((k for (k, _), ok in zip(floats, flags.tolist()) if not ok), "a tensor on another rank")
            raise TrainingError(f"the trained tensors are not finite after step {t.step} (e.g. '{bad}'); training "
                                f"stopped, no checkpoint of them was written and {_last_finite(self.root)}. Lower "
                                "train.lr, set train.grad_clip, or use precision = 'fp32'.")

    def save(self, t: Loop, best: bool = False) -> None:
        """``step_N`` (and ``latest``), or ``best`` (``best=True``); written by the main rank, awaited by all."""
        tensors, meta = self.contents(t)
        self.check_finite(t, tensors)
        if dist.is_main():
            if best:
                ckpt.save_best_checkpoint(self.root, tensors, meta)
            else:
                ckpt.save_resume_checkpoint(self.root, f"step_{t.step:08d}", tensors, meta, keep_last=self.keep_last)
        dist.barrier()


# ---- logging ----------------------------------------------------------------------------------------------------

class TrainLog:
    """``log.jsonl`` (one line per logged step, plus evaluation and skipped-item records), TensorBoard, the
    progress bar and the throughput window. Main rank only; a no-op elsewhere."""

    def __init__(self, out: Path, tr, total: int, step: int, resumed: bool):
        self.on, self.every, self.total = dist.is_main(), tr.log_every, total
        self.t_start = self.window_t = time.time()
        self.window_n = 0
        self.file = self.tb = self.bar = None
        if not self.on:
            return
        if resumed:
            _drop_records_after(out / "log.jsonl", step)
        self.file = open(out / "log.jsonl", "a" if resumed else "w")
        self.tb = _tensorboard(out) if tr.tensorboard else None
        if tr.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def record(self, step: int, epoch: int, lr: float, terms: dict[str, float], samples: int) -> None:
        """Count ``samples``; every ``log_every`` steps (and at the end) write a line and update the bar."""
        self.window_n += samples
        if not self.on:
            return
        if step % self.every == 0 or step == self.total:
            now = time.time()
            rate = self.window_n / max(1e-9, now - self.window_t)
            self.window_t, self.window_n = now, 0
            loss = sum(terms.values())
            rec = {"step": step, "epoch": epoch, "lr": lr, "loss": loss, **terms, "samples_per_s": rate,
                   "elapsed_s": now - self.t_start}
            self.event(rec)
            for k, v in rec.items():
                if self.tb is not None and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, step)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{rate:.1f}")
        if self.bar is not None:
            self.bar.update(1)

    def event(self, rec: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def close(self) -> None:
        for thing in (self.bar, self.file, self.tb):
            if thing is not None:
                thing.close()

    @property
    def elapsed(self) -> float:
        return time.time() - self.t_start


def _drop_records_after(path: Path, step: int) -> None:
    """On resume: the lines of steps after the checkpoint are trained again, so their old lines go."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = [ln for ln in lines if ln.strip() and _step_of(ln) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


# ---- one step and the end of an epoch ---------------------------------------------------------------------------

def epoch_batches(t: Loop) -> Iterator[dict]:
    """This rank's batches of the current epoch, from the current position on; the model in training mode."""
    from torch.utils.data import DataLoader

    epoch, spec = t.epoch, t.spec
    if hasattr(t.data.train, "set_epoch"):
        t.data.train.set_epoch(epoch, spec.seed)
    t.sampler.set_epoch(epoch, start_batch=(t.step % t.plan.steps_per_epoch) * spec.train.grad_accum)
    loader = DataLoader(t.data.train, batch_size=t.plan.per_device, sampler=t.sampler, collate_fn=t.data.collate,
                        num_workers=spec.train.num_workers,
                        generator=torch.Generator().manual_seed(spec.seed + epoch),
                        pin_memory=t.device.type == "cuda")
    t.built.backbone.model.train()
    t.built.trainable.train()
    return iter(loader)


def one_step(t: Loop, batches: Iterator[dict]) -> tuple[dict[str, float], int]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns the loss terms (global means) and the samples
    seen by all ranks. The terms are summed on the device and read once per step, which is also where a
    non-finite loss stops the run (before ``optimizer.step()``, so the weights stay finite)."""
    tr, world = t.spec.train, dist.world_size()
    task_hook(t.built.task, "on_step_start", t.step, t.epoch, t.plan.steps_per_epoch)
    t.optim.opt.zero_grad(set_to_none=True)
    total, names, samples = None, [], 0
    for micro in range(tr.grad_accum):
        batch = {k: (v.to(t.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in next(batches).items()}
        sync = t.module.no_sync() if (world > 1 and micro < tr.grad_accum - 1) else nullcontext()
        with sync:
            with autocast(t.device, tr.precision):
                terms = t.module(batch)
            t.optim.scaler.scale(sum(terms.values()) / tr.grad_accum).backward()
        clear_adapter_caches(t.built)
        names = list(terms)
        vec = torch.stack([v.detach().float() for v in terms.values()]) / tr.grad_accum  # (terms,)
        total = vec if total is None else total + vec
        samples += batch["image"].shape[0] * world
    values = (dist.all_reduce_sum(total) / world).tolist()  # the step's one sync
    if not all(math.isfinite(v) for v in values):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, values))
        raise TrainingError(f"non-finite loss at step {t.step + 1} (epoch {t.epoch}): {shown}; training stopped "
                            f"and {_last_finite(t.folder.path / 'checkpoints')}. Lower train.lr, set "
                            "train.grad_clip, or use precision = 'fp32'.")
    _optimizer_step(t)
    return dict(zip(names, values)), samples


def _optimizer_step(t: Loop) -> None:
    tr = t.spec.train
    if tr.grad_clip:
        t.optim.scaler.unscale_(t.optim.opt)
        torch.nn.utils.clip_grad_norm_(list(t.state.values()), tr.grad_clip)
    t.optim.scaler.step(t.optim.opt)
    t.optim.scaler.update()
    t.optim.sched.step()
    task_hook(t.built.task, "on_optimizer_step")


def end_of_epoch(t: Loop, checkpointer: Checkpointer, log: TrainLog, metric: str) -> dict | None:
    """Report skipped items, evaluate (``eval.every_epoch``), then write the epoch's checkpoint, which records the
    best metric including this evaluation, and ``best`` when it improved. Returns the metrics when this was the
    last step (the run's final evaluation, with the task's files written)."""
    epoch, last = t.epoch - 1, t.step >= t.plan.total
    _report_skipped(t, log, epoch)
    metrics, improved = None, False
    if t.spec.eval.every_epoch:
        checkpointer.check_finite(t)
        metrics = evaluate(t.built, t.eval_ds, t.spec, t.device, t.data.collate,
                           output_dir=t.folder.path if last else None)
        say(f"epoch {epoch} ({t.spec.eval.split}): {format_metrics(metrics)}")
        log.event({"step": t.step, "epoch": epoch, "eval": metrics})
        value = metrics.get(metric)
        improved = value is not None and (t.best is None or value > t.best)
        t.best = value if improved else t.best
    checkpointer.save(t)
    if improved:
        checkpointer.save(t, best=True)
    return metrics if last else None


def _report_skipped(t: Loop, log: TrainLog, epoch: int) -> None:
    skipped = getattr(t.data.train, "skipped", None)
    if skipped is not None and int(skipped) > 0:
        say(f"epoch {epoch}: {int(skipped)} unreadable training item(s) skipped so far "
            "(data.on_error = 'skip'; the first of each is named in a warning above)")
        log.event({"step": t.step, "epoch": epoch, "skipped_items": int(skipped)})


# ---- the loop ---------------------------------------------------------------------------------------------------

def train(built, data, eval_ds, spec, device: torch.device, folder: RunFolder) -> dict:
    """Train from ``folder.resume`` (or the start) to the planned total. Returns ``train_time_s``, ``steps`` and
    ``metrics`` (the last epoch's evaluation when it ran at the last step, else ``None``)."""
    from unitrans.engine.run import EpochSampler

    tr, world = spec.train, dist.world_size()
    plan = plan_steps(len(data.train), tr, world)
    say(f"global batch {tr.batch_size} = {world} process(es) x {plan.per_device} per device x {tr.grad_accum} "
        f"accumulation; {plan.steps_per_epoch} steps/epoch, {plan.total} steps")
    state = built.trainable_state()
    if not state:
        say("nothing to train (no adapter, side network or unfrozen part): evaluating only")
        return {"train_time_s": 0.0, "steps": 0, "metrics": None}
    sampler = EpochSampler(len(data.train), plan.per_device, world, dist.rank(), spec.seed)
    t = Loop(built, spec, device, data, eval_ds, plan, state, make_optimizer(state, tr, plan, device),
             step_module(built, tr, device), sampler, folder)
    if folder.resume is not None:
        restore(t, folder.resume)
    metric = tr.best_metric or built.task.primary_metric
    checkpointer = Checkpointer(folder, spec, metric)
    log = TrainLog(folder.path, tr, plan.total, t.step, resumed=folder.resume is not None)
    final = None
    try:
        while t.step < plan.total:
            batches, epoch = epoch_batches(t), t.epoch
            while t.step < plan.total and t.epoch == epoch:
                inject_fault(t.step)
                dist.heartbeat(t.step)
                terms, samples = one_step(t, batches)
                t.step += 1
                log.record(t.step, epoch, t.optim.sched.get_last_lr()[0], terms, samples)
                if t.step % plan.steps_per_epoch == 0:
                    final = end_of_epoch(t, checkpointer, log, metric)
                elif t.checkpoint_due():
                    checkpointer.save(t)
    finally:
        log.close()
    if t.step % plan.steps_per_epoch and not t.checkpoint_due():
        checkpointer.save(t)  # the final state, so a rerun with --resume has nothing to redo
    return {"train_time_s": log.elapsed, "steps": t.step, "metrics": final}

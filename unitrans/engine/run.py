"""The program: train and evaluate one spec, writing the run's outputs to ``output_dir``.

Runs in one process or in each torchrun worker (the same code path; see :mod:`unitrans.engine.launch`).
Outputs (main rank only): ``spec.resolved.toml``, ``params.json``, ``log.jsonl``, ``metrics_initial.json`` (with
``eval.at_start``), ``metrics.json``, ``adapter.safetensors`` + ``adapter.json``, ``checkpoints/``.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unitrans import distributed as dist
from unitrans.engine.build import build, count_parameters
from unitrans.engine.checkpoint import (find_resume_checkpoint, load_resume_checkpoint, save_adapter,
                                        save_resume_checkpoint)
from unitrans.engine.strategy import wrap_for_training
from unitrans.errors import UserError


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, ...); the message says where and what was kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _format_metrics(m: dict) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, (int, float)))


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _say(msg: str) -> None:
    if dist.is_main():
        print(f"[unitrans] {msg}", flush=True)


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


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def evaluate(built, dataset, spec, device, collate, output_dir=None) -> dict:
    built.backbone.model.eval()
    built.trainable.eval()
    with _autocast(device, spec.train.precision):
        metrics = built.task.evaluate(built.backbone, dataset, spec.eval.batch_size, device=device,
                                      collate=collate, num_workers=spec.train.num_workers,
                                      output_dir=output_dir if dist.is_main() else None, split=spec.eval.split)
    _clear_adapter_caches(built)
    return {k: float(v) for k, v in metrics.items()}


def _clear_adapter_caches(built) -> None:
    """Adapters may cache results across the forward calls of one step (VCRA: ``A x``, folded matrices); once
    backward has run, those hold only stale activations."""
    for adapter in built.adapters:
        clear = getattr(adapter, "clear_cache", None)  # on the Adapter interface; duck-typed plugins may lack it
        if clear is not None:
            clear()


def run(spec) -> dict:
    """Train and evaluate ``spec`` in this process (one rank of a torchrun job, or alone).

    Returns:
        The final metrics (what ``metrics.json`` holds: the task's metrics, ``train_time_s``, ``steps``,
        ``world_size``), on every rank.
    """
    device = dist.init_from_env(spec.train.device)
    try:
        return _run(spec, device)
    finally:
        dist.cleanup()


def _run(spec, device: torch.device) -> dict:
    from unitrans.engine.preflight import check_data
    from unitrans.spec import write_resolved

    check_data(spec, world=dist.world_size())  # every data problem at once, before any file or model

    out = Path(spec.output_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_resolved(spec, out / "spec.resolved.toml")
    seed_everything(spec.seed)

    t0 = time.time()
    built = build(spec, device)
    params = count_parameters(built)
    if dist.is_main():
        write_json(out / "params.json", params)
    _say(f"{built.names['backbone']} on {device} x {dist.world_size()}: {params['total']:,} parameters, "
         f"{params['trainable']:,} trainable ({100 * params['trainable'] / max(1, params['total']):.3f}%)")
    for comp, c in params["by_component"].items():
        _say(f"  {comp:<36} trainable {c['trainable']:>12,}")

    bb = built.backbone
    if dist.is_main():  # the main rank prepares (e.g. generates) the data first; the others then read it
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

    resume_from = _resume_path(spec, out)
    if spec.eval.at_start and resume_from is None:
        m0 = evaluate(built, eval_ds, spec, device, data.collate)
        if dist.is_main():
            write_json(out / "metrics_initial.json", m0)
        _say(f"before fine-tuning ({spec.eval.split}): {_format_metrics(m0)}")

    stats = train(built, data, eval_ds, spec, device, out, resume_from)

    metrics = evaluate(built, eval_ds, spec, device, data.collate, output_dir=out)
    metrics.update({"train_time_s": stats["train_time_s"], "steps": stats["steps"],
                    "world_size": dist.world_size()})
    if dist.is_main():
        write_json(out / "metrics.json", metrics)
        save_adapter(built, spec, out)
    keys = [k for k in built.task.metric_keys if k in metrics]
    _say(f"after fine-tuning  ({spec.eval.split}): {_format_metrics({k: metrics[k] for k in keys})}")
    _say(f"done in {time.time() - t0:.1f}s; outputs in {out}/")
    return metrics


def _resume_path(spec, out: Path) -> Path | None:
    r = spec.train.resume
    if r == "none":
        return None
    if r == "latest":
        return find_resume_checkpoint(out / "checkpoints")
    path = Path(r)
    if not path.is_dir():
        raise UserError(f"train.resume = '{r}': no such checkpoint folder (use 'latest' or 'none')")
    return path


def train(built, data, eval_ds, spec, device, out: Path, resume_from: Path | None) -> dict:
    from torch.utils.data import DataLoader

    tr = spec.train
    world, rank = dist.world_size(), dist.rank()
    per_device = tr.batch_size // (world * tr.grad_accum)
    if per_device * world * tr.grad_accum != tr.batch_size or per_device == 0:
        raise UserError(f"train.batch_size = {tr.batch_size} (the global batch) is not divisible by "
                        f"processes ({world}) x grad_accum ({tr.grad_accum})")
    sampler = EpochSampler(len(data.train), per_device, world, rank, spec.seed)
    if sampler.batches < tr.grad_accum:
        raise UserError(f"the train split has {len(data.train)} samples, fewer than one global batch "
                        f"({tr.batch_size})")
    steps_per_epoch = sampler.batches // tr.grad_accum
    total = tr.max_steps or tr.epochs * steps_per_epoch
    _say(f"global batch {tr.batch_size} = {world} process(es) x {per_device} per device x {tr.grad_accum} "
         f"accumulation; {steps_per_epoch} steps/epoch, {total} steps")

    state = built.trainable_state()
    if not state:
        _say("nothing to train (no adapter, side network or unfrozen part): evaluating only")
        return {"train_time_s": 0.0, "steps": 0}
    decay = [p for p in state.values() if p.ndim >= 2]
    no_decay = [p for p in state.values() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tr.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(tr.warmup_ratio * total), tr.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=tr.precision == "fp16")

    step_module = wrap_for_training(_StepModule(built), tr.strategy, device,
                                    find_unused_parameters=tr.find_unused_parameters, precision=tr.precision)

    step, best = 0, None
    if resume_from is not None:
        ck = load_resume_checkpoint(resume_from)
        with torch.no_grad():
            for k, t in state.items():
                if k not in ck["trainable"]:
                    raise UserError(f"{resume_from}: tensor '{k}' missing; the checkpoint is from another spec")
                t.copy_(ck["trainable"][k])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        step, best = ck["step"], ck.get("best")
        _say(f"resumed from {resume_from} at step {step}")

    ckpt_root = out / "checkpoints"

    def checkpoint(name: str, update_latest: bool = True):
        if dist.is_main():
            payload = {"trainable": {k: v.detach().cpu().clone() for k, v in state.items()},
                       "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                       "rng": _rng_state(), "step": step, "best": best, "steps_per_epoch": steps_per_epoch}
            save_resume_checkpoint(ckpt_root, name, payload, keep_last=tr.keep_last if update_latest else None,
                                   update_latest=update_latest)
        dist.barrier()

    log = open(out / "log.jsonl", "a" if resume_from else "w") if dist.is_main() else None
    tb = _tensorboard(out) if (tr.tensorboard and dist.is_main()) else None
    bar = None
    if tr.progress and dist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=1.0)
    t_start = time.time()
    window_t, window_n = time.time(), 0
    metric_name = tr.best_metric or built.task.primary_metric
    try:
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if hasattr(data.train, "set_epoch"):
                data.train.set_epoch(epoch, spec.seed)
            sampler.set_epoch(epoch, start_batch=in_epoch * tr.grad_accum)
            loader = DataLoader(data.train, batch_size=per_device, sampler=sampler, collate_fn=data.collate,
                                num_workers=tr.num_workers, generator=torch.Generator().manual_seed(spec.seed + epoch),
                                pin_memory=device.type == "cuda")
            it = iter(loader)
            built.backbone.model.train()
            built.trainable.train()
            while step < total and step // steps_per_epoch == epoch:
                opt.zero_grad(set_to_none=True)
                terms_sum: dict[str, float] = {}
                for micro in range(tr.grad_accum):
                    batch = next(it)
                    batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                             for k, v in batch.items()}
                    last = micro == tr.grad_accum - 1
                    sync = step_module.no_sync() if (world > 1 and not last) else nullcontext()
                    with sync:
                        with _autocast(device, tr.precision):
                            terms = step_module(batch)
                        loss = sum(terms.values()) / tr.grad_accum
                        if dist.any_true(not bool(torch.isfinite(loss.detach())), device):
                            raise TrainingError(_nonfinite_message(step, epoch, terms, ckpt_root))
                        scaler.scale(loss).backward()
                    _clear_adapter_caches(built)
                    for k, v in terms.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / tr.grad_accum
                    window_n += batch["image"].shape[0] * world
                if tr.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(list(state.values()), tr.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                if world > 1:  # log the global mean of each term, not rank 0's share
                    keys = sorted(terms_sum)
                    t = dist.all_reduce_sum(torch.tensor([terms_sum[k] for k in keys], device=device)) / world
                    terms_sum = dict(zip(keys, t.tolist()))
                loss_val = sum(terms_sum.values())
                if dist.is_main() and (step % tr.log_every == 0 or step == total):
                    now = time.time()
                    rate = window_n / max(1e-9, now - window_t)
                    window_t, window_n = now, 0
                    rec = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], "loss": loss_val,
                           **terms_sum, "samples_per_s": rate, "elapsed_s": now - t_start}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if tb is not None:
                        for k, v in rec.items():
                            if k not in ("step", "epoch"):
                                tb.add_scalar(f"train/{k}", v, step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_val:.3f}", samples_s=f"{rate:.1f}")
                if bar is not None:
                    bar.update(1)
                epoch_done = step % steps_per_epoch == 0
                if epoch_done or (tr.checkpoint_every and step % tr.checkpoint_every == 0):
                    checkpoint(f"step_{step:08d}")
                skipped = getattr(data.train, "skipped", None)
                if epoch_done and skipped is not None and int(skipped) > 0:
                    _say(f"epoch {epoch}: {int(skipped)} unreadable training item(s) skipped so far "
                         "(data.on_error = 'skip'; the first of each is named in a warning above)")
                    if dist.is_main():
                        log.write(json.dumps({"step": step, "epoch": epoch, "skipped_items": int(skipped)}) + "\n")
                if epoch_done and spec.eval.every_epoch and step < total:
                    m = evaluate(built, eval_ds, spec, device, data.collate)
                    _say(f"epoch {epoch} ({spec.eval.split}): {_format_metrics(m)}")
                    if dist.is_main():
                        log.write(json.dumps({"step": step, "epoch": epoch, "eval": m}) + "\n")
                        log.flush()
                    value = m.get(metric_name)
                    if value is not None and (best is None or value > best):
                        best = value
                        checkpoint("best", update_latest=False)
                    built.backbone.model.train()
                    built.trainable.train()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
    if step % steps_per_epoch and not (tr.checkpoint_every and step % tr.checkpoint_every == 0):
        checkpoint(f"step_{step:08d}")  # the final state, so a rerun with resume = "latest" has nothing to redo
    return {"train_time_s": time.time() - t_start, "steps": step}


def _nonfinite_message(step, epoch, terms, ckpt_root: Path) -> str:
    last = find_resume_checkpoint(ckpt_root)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
    return (f"non-finite loss at step {step + 1} (epoch {epoch}): {values}; training stopped and {kept}. "
            "Lower train.lr, set train.grad_clip, or use precision = 'fp32'.")


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))

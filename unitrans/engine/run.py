"""The program: train and evaluate one spec, writing the run's outputs to ``output_dir``.

Outputs: ``spec.resolved.toml``, ``params.json``, ``log.jsonl``, ``metrics_initial.json`` (with
``eval.at_start``), ``metrics.json``, ``adapter.safetensors`` + ``adapter.json``.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unitrans.engine.build import build, count_parameters
from unitrans.engine.checkpoint import save_adapter
from unitrans.errors import UserError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def evaluate(built, dataset, spec, device, collate, output_dir=None) -> dict:
    built.backbone.model.eval()
    built.trainable.eval()
    with _autocast(device, spec.train.precision):
        metrics = built.task.evaluate(built.backbone, dataset, spec.eval.batch_size, device=device,
                                      collate=collate, num_workers=spec.train.num_workers,
                                      output_dir=output_dir, split=spec.eval.split)
    return {k: float(v) for k, v in metrics.items()}


def run(spec) -> int:
    """Train and evaluate ``spec`` in this process. Returns the exit code."""
    from unitrans.spec import write_resolved

    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(spec.seed)
    device = pick_device(spec.train.device)
    write_resolved(spec, out / "spec.resolved.toml")

    t0 = time.time()
    built = build(spec, device)
    params = count_parameters(built)
    write_json(out / "params.json", params)
    print(f"[unitrans] {built.names['backbone']} on {device}: {params['total']:,} parameters, "
          f"{params['trainable']:,} trainable ({100 * params['trainable'] / max(1, params['total']):.3f}%)")
    for comp, c in params["by_component"].items():
        print(f"[unitrans]   {comp:<36} trainable {c['trainable']:>12,}")

    bb = built.backbone
    data = built.data.setup(bb.image_size, bb.image_mean, bb.image_std)
    eval_ds = data.test if spec.eval.split == "test" else data.val
    if eval_ds is None:
        raise UserError(f"eval.split = '{spec.eval.split}' but the data spec ({built.names['data']}) gives no "
                        f"{spec.eval.split} split")
    if data.train is None:
        raise UserError(f"the data spec ({built.names['data']}) gives no train split")

    if spec.eval.at_start:
        m0 = evaluate(built, eval_ds, spec, device, data.collate)
        write_json(out / "metrics_initial.json", m0)
        print(f"[unitrans] before fine-tuning ({spec.eval.split}): {_format_metrics(m0)}")

    train_stats = train(built, data, spec, device, out)

    metrics = evaluate(built, eval_ds, spec, device, data.collate, output_dir=out)
    metrics.update({"train_time_s": train_stats["train_time_s"], "steps": train_stats["steps"]})
    write_json(out / "metrics.json", metrics)
    save_adapter(built, spec, out)
    print(f"[unitrans] after fine-tuning  ({spec.eval.split}): {_format_metrics({k: metrics[k] for k in built.task.metric_keys if k in metrics})}")
    print(f"[unitrans] done in {time.time() - t0:.1f}s; outputs in {out}/")
    return 0


def train(built, data, spec, device, out: Path) -> dict:
    from torch.utils.data import DataLoader

    tr = spec.train
    world = 1
    per_device = tr.batch_size // (world * tr.grad_accum)
    if per_device * world * tr.grad_accum != tr.batch_size or per_device == 0:
        raise UserError(f"train.batch_size = {tr.batch_size} is not divisible by processes ({world}) x "
                        f"grad_accum ({tr.grad_accum})")
    g = torch.Generator().manual_seed(spec.seed)
    loader = DataLoader(data.train, batch_size=per_device, shuffle=True, drop_last=len(data.train) >= per_device,
                        collate_fn=data.collate, num_workers=tr.num_workers, generator=g)
    steps_per_epoch = max(1, len(loader) // tr.grad_accum)
    total = tr.max_steps or tr.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)

    state = built.trainable_state()
    if not state:
        print("[unitrans] nothing to train (no adapter, side network or unfrozen part): evaluating only")
        return {"train_time_s": 0.0, "steps": 0}
    decay = [p for p in state.values() if p.ndim >= 2]
    no_decay = [p for p in state.values() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tr.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(tr.warmup_ratio * total), tr.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=tr.precision == "fp16")

    log = open(out / "log.jsonl", "w")
    bar = None
    if tr.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    step, t_start, seen = 0, time.time(), 0
    window_t, window_n = time.time(), 0
    built.backbone.model.train()
    built.trainable.train()
    try:
        for epoch in range(epochs):
            it = iter(loader)
            while step < total:
                opt.zero_grad(set_to_none=True)
                terms_sum: dict[str, float] = {}
                n_micro = 0
                for _ in range(tr.grad_accum):
                    batch = next(it, None)
                    if batch is None:
                        break
                    batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                             for k, v in batch.items()}
                    with _autocast(device, tr.precision):
                        terms = built.task.training_step(built.backbone, batch, built.alignment)
                    loss = sum(terms.values()) / tr.grad_accum
                    if not torch.isfinite(loss):
                        raise UserError(f"loss is {loss.item()} at step {step} (epoch {epoch}); terms: "
                                        + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
                    scaler.scale(loss).backward()
                    for k, v in terms.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + v.item() / tr.grad_accum
                    n_micro += 1
                    seen += batch["image"].shape[0]
                    window_n += batch["image"].shape[0]
                if n_micro == 0:
                    break  # epoch exhausted
                if tr.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(list(state.values()), tr.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                loss_val = sum(terms_sum.values())
                if step % tr.log_every == 0 or step == total:
                    now = time.time()
                    rate = window_n / max(1e-9, now - window_t)
                    window_t, window_n = now, 0
                    rec = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], "loss": loss_val,
                           **terms_sum, "samples_per_s": rate, "elapsed_s": now - t_start}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_val:.3f}", samples_s=f"{rate:.1f}")
                if bar is not None:
                    bar.update(1)
            if step >= total:
                break
    finally:
        if bar is not None:
            bar.close()
        log.close()
    return {"train_time_s": time.time() - t_start, "steps": step, "samples": seen}

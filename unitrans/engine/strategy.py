"""Distributed training strategies: ``train.strategy = "ddp" | "fsdp"``.

* ``ddp``: ``DistributedDataParallel`` over the step module (every rank holds the whole frozen backbone).
* ``fsdp``: PyTorch FSDP (``torch.distributed.fsdp.fully_shard``). Each transformer block of the frozen backbone
  (every element of the model's layer lists: the ViT's, the Q-Former's, the language model's) is a unit whose
  weights are sharded across the ranks; a block's full weights exist only while it runs (forward, and backward,
  where the adapters below it need the gradient through it), then are freed. The rest of the backbone (embeddings,
  norms, heads, query tokens: a few percent of the weights) and every trainable tensor (adapters, side network,
  ``train_parts``) stay whole on every rank; the trainable gradients are averaged across ranks once per optimizer
  step, as DDP does. So adapter-only checkpoints, resume and ``export`` read and write the same whole tensors as
  under DDP, with nothing to gather. Mixed precision: with ``train.precision = "bf16"`` or ``"fp16"`` the blocks
  compute in that type (gradients reduced in float32); activation checkpointing is the backbone's
  ``gradient_checkpointing`` option.

The training loop makes one call, :func:`wrap_for_training`, where it used to wrap DDP.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from unitrans import distributed as dist

STRATEGIES = ("ddp", "fsdp")


def wrap_for_training(step_module: nn.Module, strategy: str, device: torch.device, *,
                      find_unused_parameters: bool = True, precision: str = "fp32") -> nn.Module:
    """The module the loop trains: ``step_module`` itself in one process, else wrapped by ``strategy``.

    Args:
        step_module: holds the backbone's ``model`` and the ``trainable`` parts; its forward is one training step.
        strategy: ``"ddp"`` or ``"fsdp"``.
        device: this rank's device.
        find_unused_parameters: DDP's option.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: FSDP's compute type of the sharded blocks.

    Returns:
        A module whose call runs the step and that has ``no_sync()`` (a context manager in which backward
        accumulates gradients without synchronising them), like DDP.
    """
    if dist.world_size() == 1:
        return step_module
    if strategy == "fsdp":
        return ShardedStep(step_module, device, precision)
    import warnings

    with warnings.catch_warnings():  # broadcast_buffers' rename is announced, not yet in every torch we support
        warnings.simplefilter("ignore", FutureWarning)
        return nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards: the elements of every ``nn.ModuleList`` of ``model`` that hold parameters, outermost
    lists only (a T5 block's inner list of sub-layers stays inside its block)."""
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        for element in module:
            if any(True for _ in element.parameters()):
                units.append(element)
                inside.update(id(m) for m in element.modules())
    return units


def mixed_precision(precision: str):
    """FSDP's policy: blocks compute in bf16 / fp16 with gradients reduced in float32; ``fp32``: no casting."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


class ShardedStep(nn.Module):
    """The step module with its frozen blocks sharded by ``fully_shard`` and its trainable tensors replicated.

    The step module is the FSDP root (its forward is the training step, so every block a task calls, by whatever
    path, runs inside it); each block is an FSDP unit; trainable tensors and the backbone's weights outside the
    blocks are ``ignored_params`` (whole on every rank). At the end of a backward outside :meth:`no_sync`, the
    trainable gradients are summed across ranks in one flat buffer and divided by the number of ranks (a tensor
    that got a gradient on no rank keeps ``None``).
    """

    def __init__(self, step_module: nn.Module, device: torch.device, precision: str = "fp32"):
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.world_size(),))
        policy = mixed_precision(precision)
        self.trainable = [p for p in step_module.parameters() if p.requires_grad]
        keep = set(self.trainable)
        units = shard_units(step_module.model)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=keep & set(unit.parameters()))
        in_units = {id(p) for unit in units for p in unit.parameters()}
        outside = {p for p in step_module.parameters() if id(p) not in in_units} | keep
        fully_shard(step_module, mesh=mesh, mp_policy=policy, ignored_params=outside)
        self.module = step_module
        self.units = len(units)
        self._sync, self._queued = True, False
        for p in self.trainable:
            p.register_post_accumulate_grad_hook(self._on_gradient)

    def forward(self, batch):
        return self.module(batch)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside the block accumulates the local gradients only (gradient accumulation)."""
        before, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = before

    def _on_gradient(self, _param: torch.Tensor) -> None:
        if self._sync and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average_gradients)

    def _average_gradients(self) -> None:
        """Sum every trainable gradient across ranks in one buffer (plus a has-gradient flag per tensor) and
        divide by the number of ranks."""
        self._queued = False
        params = self.trainable
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params] + [torch.tensor([float(p.grad is not None) for p in params],
                                                           device=params[0].device)])
        flat = dist.all_reduce_sum(flat)
        flags, offset = flat[-len(params):], 0
        for p, flag in zip(params, flags.tolist()):
            n = p.numel()
            if flag > 0:
                p.grad = (flat[offset:offset + n] / dist.world_size()).view_as(p).to(p.dtype)
            offset += n

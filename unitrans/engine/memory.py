"""Peak memory per device of a training step, estimated before launching: ``unitrans params SPEC --memory``.

The spec's model is built on the meta device (shapes and dtypes, no storage), so a 7B model costs nothing. The
estimate, per device, is the sum of

* **weights**: every backbone and trainable tensor as stored (DDP: all of them on every rank; FSDP: the blocks'
  weights divided by the ranks, the rest whole, plus two blocks gathered in the compute type, the one running and
  the one prefetched);
* **trainable state**: a gradient and AdamW's two moments per trainable tensor (float32), and under DDP its
  gradient buckets;
* **activations**: the bytes autograd saves for backward in one training step at the per-device batch, measured by
  running the task's own training step on the meta model with a synthetic batch (images at the backbone's
  resolution, captions and questions of ``max_text_length`` tokens, one answer per question). Attention is costed as
  the kernel the device would pick (fused kernels save q, k, v, the output and a log-sum-exp; the math path saves
  the scores). With ``backbone.gradient_checkpointing``, each block keeps only its input, and one block's
  activations exist at a time (recomputed in backward). Under bf16 / fp16 autocast of float32 weights the
  activations are half precision and autocast's half copies of the weights are added;
* **transient**: twice the largest activation tensor (a gradient is allocated beside the tensor it flows from).

``tests/test_memory.py`` compares the estimate with the peak measured on the CPU (every allocation of a real step,
from the profiler) on tiny BLIP-2 and LLaVA configurations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from unitrans.engine.strategy import shard_units

aten = torch.ops.aten
GiB = 2**30


@dataclass
class ActivationProfile:
    """What one training step on the meta model saves for backward.

    Attributes:
        saved: bytes saved for backward (distinct storages, parameters excluded).
        largest: bytes of the largest tensor the step creates.
        per_block: bytes saved inside each shard unit (block), in call order.
        block_inputs: bytes of each block call's input.
    """

    saved: int = 0
    largest: int = 0
    per_block: list[int] = field(default_factory=list)
    block_inputs: list[int] = field(default_factory=list)

    def with_checkpointing(self) -> int:
        """Saved bytes when every block is recomputed: the blocks keep their inputs, one block's activations live."""
        inside = sum(self.per_block)
        return self.saved - inside + sum(self.block_inputs) + max(self.per_block, default=0)


class _MetaStep(TorchDispatchMode):
    """Runs a training step on meta tensors: answers the data-dependent questions a step asks (``bool(t)``,
    ``t.item()``) as an ordinary batch would (an ``all()`` holds, an ``any()`` does not: masks are full, no row
    lacks a negative), gives ``repeat_interleave`` its output size (one answer per question), and records the
    largest tensor created."""

    def __init__(self, params: set[int]):
        super().__init__()
        self.params, self.largest = params, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.is_nonzero.default, aten._local_scalar_dense.default):
            return getattr(args[0], "_unitrans_truth", False)
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            kwargs = {**kwargs, "output_size": args[0].shape[0]}
        out = func(*args, **kwargs)
        if func.overloadpacket in (aten.all, aten.any):
            out._unitrans_truth = func.overloadpacket is aten.all
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.params:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@contextlib.contextmanager
def _device_attention(device_type: str) -> Iterator[None]:
    """``scaled_dot_product_attention`` on meta tensors as ``device_type`` would run it: the fused kernel (whose
    autograd saves q, k, v, output, log-sum-exp) where the device's choice is fused, the math path otherwise (CPU
    picks math with dropout; GPUs run a fused kernel)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "meta":
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            enable_gqa=enable_gqa)
        if device_type == "cpu" and _cpu_choice(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) == 0:
            return aten._scaled_dot_product_attention_math(q, k, v, attn_mask, dropout_p, is_causal, None,
                                                           scale=scale, enable_gqa=enable_gqa)[0]
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, attn_mask=attn_mask,
                                                               scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _cpu_choice(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa) -> int:
    """The CPU's SDPA backend for inputs like these (0: math), asked with 2-token stand-ins."""
    def small(t):
        return torch.zeros((1,) * (t.dim() - 2) + (2, t.shape[-1]), dtype=t.dtype).requires_grad_(t.requires_grad)

    m = None if mask is None else torch.zeros((1,) * (mask.dim() - 2) + (2, 2), dtype=mask.dtype)
    return int(torch._fused_sdp_choice(small(q), small(k), small(v), m, dropout_p, is_causal, scale=scale,
                                       enable_gqa=enable_gqa))


def synthetic_batch(batch_size: int, image_size: int, text_tokens: int, device: str = "meta") -> dict[str, Any]:
    """Every key the built-in tasks read: ``image (B, 3, H, W)``, ``caption``/``question``/``answer`` of about
    ``text_tokens`` words, ``image_id``, ``weight``, ``n`` (one answer per question)."""
    text = " ".join(["shape"] * text_tokens)
    return {"image": torch.zeros(batch_size, 3, image_size, image_size, device=device),
            "caption": [text] * batch_size, "question": [text] * batch_size, "answer": [text] * batch_size,
            "image_id": torch.arange(batch_size, device=device), "weight": torch.ones(batch_size, device=device),
            "n": torch.ones(batch_size, dtype=torch.long, device=device)}


def profile_activations(built, batch: dict[str, Any], device_type: str = "cuda") -> ActivationProfile:
    """Run the task's training step on ``built`` (built on the meta device) and measure what it saves."""
    model = built.backbone.model
    params = {p.untyped_storage()._cdata for p in [*model.parameters(), *built.trainable.parameters()]}
    prof, stack, seen = ActivationProfile(), [], {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            if stack:
                prof.per_block[stack[-1]] += seen[key]
        return t

    handles = []
    for unit in shard_units(model):
        def enter(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            stack.append(len(prof.per_block))
            prof.per_block.append(0)
            prof.block_inputs.append(x.untyped_storage().nbytes() if torch.is_tensor(x) else 0)

        def leave(*_args) -> None:
            stack.pop()

        handles.append(unit.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(unit.register_forward_hook(leave))
    mode = _MetaStep(params)
    try:
        with _device_attention(device_type), mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            built.task.training_step(built.backbone, batch, built.alignment)
    finally:
        for h in handles:
            h.remove()
    prof.saved, prof.largest = sum(seen.values()), mode.largest
    return prof


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def weight_split(model: nn.Module) -> dict[str, int]:
    """Bytes of the backbone's weights inside the FSDP blocks and outside them, and of the largest block."""
    units = shard_units(model)
    inside = {id(p) for u in units for p in u.parameters()}
    return {"blocks": sum(_bytes(u.parameters()) for u in units),
            "outside": _bytes(p for p in model.parameters() if id(p) not in inside),
            "largest_block_numel": max((sum(p.numel() for p in u.parameters()) for u in units), default=0)}


def estimate_memory(built, spec) -> dict[str, Any]:
    """Peak bytes per device of a training step of ``spec``, under DDP and FSDP (module docstring).

    Args:
        built: the spec's components built on the meta device (``build(spec, "meta", with_data=False)``); the
            estimate runs a step on it and casts it, so it is not reusable afterwards.
        spec: the spec (its ``train`` section: processes, batch, accumulation, precision, device).

    Returns:
        ``world``, ``per_device_batch``, ``parts`` (bytes of each part, both strategies), ``ddp`` and ``fsdp``
        (total bytes per device).
    """
    tr = spec.train
    world = tr.nproc_per_node
    per_device = max(1, tr.batch_size // (world * tr.grad_accum))
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tr.precision)
    model, bb = built.backbone.model, built.backbone
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = _bytes(built.trainable_state().values())
    weights = _bytes(model.parameters()) + _bytes(built.trainable.parameters())
    split = weight_split(model)
    compute = 2 if half else max((p.element_size() for p in frozen), default=4)
    autocast = sum(p.numel() * 2 for p in frozen if p.dtype == torch.float32) if half else 0
    if half:  # autocast computes in half precision: on the meta model, store the frozen weights so
        for p in frozen:
            p.data = p.data.to(half)
    if bb.recomputes_activations:  # measured per block below, then costed as recomputed
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    model.train()
    built.trainable.train()
    batch = synthetic_batch(per_device, bb.image_size, getattr(bb, "max_text_length", 35))
    prof = profile_activations(built, batch, "cpu" if tr.device == "cpu" else "cuda")
    parts = {"weights": weights, "trainable_state": 3 * trainable + (trainable if world > 1 else 0),
             "activations": prof.with_checkpointing() if bb.recomputes_activations else prof.saved,
             "autocast_copies": autocast, "transient": 2 * prof.largest}
    common = parts["trainable_state"] + parts["activations"] + parts["autocast_copies"] + parts["transient"]
    sharded = (weights - split["blocks"] + split["blocks"] // world
               + (2 * split["largest_block_numel"] * compute if world > 1 else 0))
    return {"world": world, "per_device_batch": per_device, "parts": parts, "weight_split": split,
            "ddp": weights + common, "fsdp": sharded + common}


def memory_report(estimate: dict[str, Any], gpu_gib: tuple[int, ...] = (24, 40, 80)) -> str:
    """The table ``unitrans params --memory`` prints (GiB per device). A GPU of G GiB fits a total that leaves 1 GiB
    for the CUDA context and the allocator's slack."""
    e, p = estimate, estimate["parts"]
    lines = [f"peak memory per device, estimated ({e['world']} process(es), {e['per_device_batch']} samples per "
             "device per micro-step):"]
    for name, value in p.items():
        lines.append(f"  {name:<22} {_size(value)}")
    if e["world"] > 1:
        w = e["weight_split"]
        lines.append(f"  weights under fsdp     {_size(e['fsdp'] - e['ddp'] + p['weights'])}  (blocks "
                     f"{_size(w['blocks']).strip()} / {e['world']} + the rest {_size(w['outside']).strip()} "
                     "+ 2 gathered blocks)")
    for strategy in ("ddp", "fsdp"):
        fits = ", ".join(f"{g} GB: {'fits' if e[strategy] + GiB <= g * GiB else 'does not fit'}" for g in gpu_gib)
        lines.append(f"  total under {strategy:<10} {_size(e[strategy])}   ({fits})")
    return "\n".join(lines)


def _size(n: float) -> str:
    """Bytes as ``"   12.34 GiB"`` (or MiB below 1 GiB), right-aligned."""
    return f"{n / GiB:>9.2f} GiB" if n >= GiB else f"{n / 2**20:>9.2f} MiB"

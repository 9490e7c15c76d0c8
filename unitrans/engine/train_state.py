"""The training state of a resume checkpoint as tensors (for safetensors) plus plain JSON-able data.

Optimizer moments, the task's state and the torch RNG states are tensors; the step, optimizer groups, scheduler,
grad scaler and the Python / NumPy RNG states are numbers and lists. Nothing needs pickle, and restoring gives the
same bits back (JSON writes floats with ``repr``, which round-trips exactly).
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


def _split(prefix: str, mapping: Mapping[str, Any]) -> tuple[Tensors, dict[str, Any]]:
    """Tensor values under ``prefix.key``; the rest as a plain dict."""
    tensors = {f"{prefix}.{k}": v for k, v in mapping.items() if torch.is_tensor(v)}
    return tensors, {k: v for k, v in mapping.items() if not torch.is_tensor(v)}


def with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """The tensors whose key starts with ``prefix.``, with that part removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[Tensors, dict]:
    """``opt.state_dict()`` as ``optimizer.<param index>.<key>`` tensors plus ``{"param_groups", "scalars"}``."""
    sd = opt.state_dict()
    tensors: Tensors = {}
    scalars: dict[str, dict] = {}
    for index, per_param in sd["state"].items():
        t, rest = _split(f"optimizer.{index}", per_param)
        tensors.update(t)
        if rest:
            scalars[str(index)] = rest
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in with_prefix(tensors, "optimizer").items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, rest in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(rest)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else dict(g) for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[Tensors, dict]:
    """Python, NumPy, torch (and CUDA) generator states: torch's as tensors, the others as lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def set_rng_state(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states only where CUDA is available)."""
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = with_prefix(tensors, "rng.cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda[k] for k in sorted(cuda, key=int)])

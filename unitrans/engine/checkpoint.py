"""Adapter-only checkpoints: ``adapter.safetensors`` (trainable tensors) + ``adapter.json`` (what they belong to).

Files are written next to their destination and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from unitrans.errors import UserError

FORMAT = "unitrans.adapter.v1"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(built, spec, out: Path) -> dict:
    """Write the trainable tensors of ``built`` and a manifest; returns the manifest."""
    from safetensors.torch import save

    from unitrans.spec import resolve

    state = {k: v.detach().contiguous().cpu() for k, v in built.trainable_state().items()}
    resolved = resolve(spec)
    manifest = {
        "format": FORMAT,
        "tensors": {k: list(v.shape) for k, v in state.items()},
        "components": built.names,
        "backbone": resolved.get("backbone"),
        "adapters": resolved.get("adapters", []),
        "side_network": resolved.get("side_network"),
        "numel": sum(v.numel() for v in state.values()),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(out / "adapter.safetensors", save(state, metadata={"format": FORMAT}))
    _atomic_write_bytes(out / "adapter.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def load_adapter(built, directory: Path) -> None:
    """Load ``adapter.safetensors`` into ``built``, refusing the first key or shape that does not match."""
    from safetensors.torch import load_file

    path = Path(directory) / "adapter.safetensors"
    if not path.is_file():
        raise UserError(f"no adapter checkpoint at {path}")
    saved = load_file(str(path))
    target = built.trainable_state()
    for k in sorted(set(saved) | set(target)):
        if k not in target:
            raise UserError(f"{path}: tensor '{k}' is not in the built model (built model has {len(target)} "
                            f"trainable tensors, e.g. {', '.join(sorted(target)[:3])}); was it saved from another spec?")
        if k not in saved:
            raise UserError(f"{path}: the built model expects tensor '{k}' {tuple(target[k].shape)}, the checkpoint lacks it")
        if tuple(saved[k].shape) != tuple(target[k].shape):
            raise UserError(f"{path}: tensor '{k}' has shape {tuple(saved[k].shape)} in the checkpoint but "
                            f"{tuple(target[k].shape)} in the built model")
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(saved[k].to(t.device, t.dtype))

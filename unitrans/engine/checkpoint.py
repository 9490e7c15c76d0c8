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


# ---- resume checkpoints -----------------------------------------------------------------------------------------
# checkpoints/step_00000120/{state.pt, COMPLETE}  written as .step_00000120.tmp-PID/ then renamed: a reader sees a
# whole checkpoint or none. checkpoints/latest names the newest complete one (itself replaced atomically).

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_resume_checkpoint(root: Path, name: str, payload: dict, keep_last: int | None = None,
                           update_latest: bool = True) -> Path:
    """Write ``payload`` (tensors, optimizer state, RNG, position) as ``root/name`` atomically."""
    import shutil

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    _atomic_write_bytes(tmp / "COMPLETE", json.dumps({"step": payload.get("step")}).encode())
    _fsync_dir(tmp)
    if final.exists():  # e.g. "best" replaced by a better one
        old = root / f".{name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if update_latest:
        _atomic_write_bytes(root / "latest", name.encode())
    if keep_last:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "COMPLETE").is_file())
        for p in steps[:-keep_last]:
            if p.name != name:
                shutil.rmtree(p, ignore_errors=True)
    return final


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete ``step_*``; ``None`` when there is none."""
    root = Path(root)
    latest = root / "latest"
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if (cand / "COMPLETE").is_file():
            return cand
    steps = sorted(p for p in root.glob("step_*") if (p / "COMPLETE").is_file())
    return steps[-1] if steps else None


def load_resume_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise UserError(f"{path} is not a complete checkpoint (no COMPLETE marker: the write was interrupted)")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)

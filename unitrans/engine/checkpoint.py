"""Checkpoint files: the adapter alone (``adapter.safetensors`` + ``adapter.json``) and resume checkpoints.

Nothing here ever unpickles a file: tensors are read from safetensors files, everything else from JSON, so a
checkpoint or adapter taken from elsewhere cannot run code. Every file is written next to its destination and
renamed into place (:mod:`unitrans.fileio`), so a reader never sees half a file; a full disk is reported as "no
space left on device" with the folder and the bytes needed.

Resume checkpoints (``checkpoints/step_00000120/``)::

    state.safetensors   tensors: trainable.*, optimizer.<param>.<key>, task.*, rng.torch, rng.cuda.<i>
    state.json          the rest: step, best, run id, the resolved spec, optimizer groups, scheduler, scaler, RNG
    COMPLETE            written last: the folder is a whole checkpoint

A checkpoint is written as ``.step_00000120.tmp-PID/`` and renamed; ``checkpoints/latest`` (a file naming the
newest) is replaced atomically. ``checkpoints/best`` is a symbolic link to ``best_step_N/``, swapped atomically
after the new folder is complete, so there is always a ``best`` once one was written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from unitrans.errors import UserError
from unitrans.fileio import atomic_write_bytes, fsync_dir

FORMAT = "unitrans.adapter.v1"
RESUME_FORMAT = "unitrans.resume.v2"
TENSORS, META, COMPLETE = "state.safetensors", "state.json", "COMPLETE"
LEGACY_PICKLE = "state.pt"


class DiskFullError(UserError):
    """A write failed with ENOSPC; the message names the folder and the bytes the write needed."""


# ---- reading and writing files ----------------------------------------------------------------------------------

def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU; a missing, truncated or foreign file -> one-line UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable safetensors file (truncated or not one: {first})") from None


def read_json(path: Path) -> Any:
    """A JSON file's content; a missing, non-UTF-8 or malformed file -> one-line UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON (truncated or corrupt: {exc})") from None


def write_file(path: Path, data: bytes) -> None:
    """``atomic_write_bytes``, with a full disk reported as :class:`DiskFullError` (folder and size named)."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise disk_full(Path(path).parent, len(data)) from None


def disk_full(folder: Path, needed: int | None) -> DiskFullError:
    """The error for an ENOSPC while writing ``needed`` bytes (``None``: unknown) into ``folder``."""
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    size = f"about {needed:,} bytes needed" if needed is not None else "size needed unknown"
    return DiskFullError(f"no space left on device writing to {folder}: {size} ({free}); free some space and "
                         "rerun with --resume")


# ---- the adapter alone ------------------------------------------------------------------------------------------

def base_identity(backbone) -> str:
    """A hash of the frozen backbone at its injection points: name, shape, dtype and bytes of each parameter of
    each module there (a linear's weight and bias; a fused attention's ``in_proj_weight``).

    Another seed of a random-init preset, another pretrained checkpoint or an export with adapters already merged
    into it all change it. Cost: one pass over those weights (a fraction of a second at BLIP-base size).
    """
    h = hashlib.sha256(str(getattr(backbone, "name", "")).encode())
    seen: set[int] = set()
    for point in backbone.injection_points():
        for pname, weight in point.module.named_parameters(recurse=False):  # a Linear's weight and bias, ...
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            w = weight.detach().to("cpu").contiguous()
            h.update(f"{point.id}.{pname}:{tuple(w.shape)}:{w.dtype}".encode())
            h.update(w.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def save_adapter(built, spec, out: Path, base: str | None = None) -> dict:
    """Write the trainable tensors of ``built`` and a manifest; returns the manifest.

    ``base``: :func:`base_identity` of the backbone before training (computed now when not given: the same
    for a frozen backbone, not for one whose injection-point weights trained).
    """
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
        "base": {"identity": base or base_identity(built.backbone), "seed": spec.seed},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "adapter.safetensors", save(state, metadata={"format": FORMAT}))
    write_file(out / "adapter.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def check_base(built, directory: Path) -> None:
    """Refuse a backbone other than the one the adapter in ``directory`` was trained on (``adapter.json``'s
    ``base``); manifests written before the base was recorded are accepted as they are."""
    manifest_path = Path(directory) / "adapter.json"
    if not manifest_path.is_file():
        return
    manifest = read_json(manifest_path)
    recorded = (manifest.get("base") or {}).get("identity") if isinstance(manifest, dict) else None
    if recorded is None:
        return
    here = base_identity(built.backbone)
    if here != recorded:
        seed = (manifest.get("base") or {}).get("seed")
        raise UserError(
            f"{manifest_path}: the adapter was trained on base {recorded[:19]} (seed {seed}, backbone "
            f"{(manifest.get('backbone') or {}).get('name')}), but this spec builds base {here[:19]}: another "
            "pretrained checkpoint, seed or preset, or a base with adapters already merged into it. Use the spec "
            "(and seed) the adapter was trained with."
        )


def load_adapter(built, directory: Path, check: bool = True) -> None:
    """Load ``adapter.safetensors`` into ``built``, refusing another base (``check``) and the first key or shape
    that does not match."""
    path = Path(directory) / "adapter.safetensors"
    if not path.is_file():
        raise UserError(f"no adapter checkpoint at {path}")
    if check:
        check_base(built, directory)
    saved = read_safetensors(path)
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

def _encode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[bytes, bytes]:
    from safetensors.torch import save

    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(plain, metadata={"format": RESUME_FORMAT}), (json.dumps(meta, indent=1) + "\n").encode()


def _write_folder(root: Path, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """The complete checkpoint in ``root/.name.tmp-PID``; removed again when the write fails."""
    blob, text = _encode(tensors, meta)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for file, data in ((TENSORS, blob), (META, text)):
            write_file(tmp / file, data)
        write_file(tmp / COMPLETE, json.dumps({"step": meta.get("step"), "format": RESUME_FORMAT}).encode())
    except DiskFullError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full(root, len(blob) + len(text)) from None
    fsync_dir(tmp)
    return tmp


def _install(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final`` (an existing ``final`` is moved aside first, then removed)."""
    if final.is_symlink() or final.is_file():
        final.unlink()
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def save_resume_checkpoint(root: Path, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                           keep_last: int | None = None, update_latest: bool = True) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-able) as the checkpoint ``root/name``, atomically.

    ``update_latest`` repoints ``root/latest`` to it; ``keep_last`` then prunes older ``step_*`` folders.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    _install(_write_folder(root, name, tensors, meta), final)
    if update_latest:
        write_file(root / "latest", name.encode())
    if keep_last:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file())
        for p in steps[:-keep_last]:
            if p.name != name:
                shutil.rmtree(p, ignore_errors=True)
    return final


def save_best_checkpoint(root: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``best_step_N/`` and then swap the link ``root/best`` to it in one rename; older bests are removed
    only after the swap, so a kill at any point leaves a ``best``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"best_step_{int(meta['step']):08d}"
    _install(_write_folder(root, name, tensors, meta), root / name)
    link = root / f".best.tmp-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    best = root / "best"
    if best.is_dir() and not best.is_symlink():  # a checkpoint folder written before best was a link
        shutil.rmtree(best)
    os.replace(link, best)
    fsync_dir(root)
    for p in root.glob("best_step_*"):
        if p.name != name:
            shutil.rmtree(p, ignore_errors=True)
    return root / name


def clean_stale(root: Path) -> list[Path]:
    """Remove what an interrupted writer left in ``root``: ``.NAME.tmp-PID`` and ``.NAME.old-PID`` entries and
    ``best_step_*`` folders that ``best`` does not point to. Call only while holding the output folder's lock."""
    root = Path(root)
    if not root.is_dir():
        return []
    best = os.readlink(root / "best") if (root / "best").is_symlink() else None
    removed = [p for p in root.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    removed += [p for p in root.glob("best_step_*") if p.name != best]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete ``step_*``; ``None`` when there is none."""
    root = Path(root)
    latest = root / "latest"
    if latest.is_file():
        cand = root / latest.read_text(encoding="utf-8", errors="replace").strip()
        if (cand / COMPLETE).is_file():
            return cand
    steps = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    return steps[-1] if steps else None


def load_resume_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a checkpoint folder. Never unpickles: a folder holding only the old pickle format
    (``state.pt``) is refused, as is an incomplete, truncated or foreign one, each with one line naming the file."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise UserError(f"{path} is not a complete checkpoint (no COMPLETE marker: the write was interrupted)")
    if not (path / META).is_file() and (path / LEGACY_PICKLE).is_file():
        raise UserError(f"{path / LEGACY_PICKLE} is a checkpoint in the old pickle format, which UniTrans does not "
                        "load (unpickling a file can run code); start the run again with --overwrite")
    meta = read_json(path / META)
    if not isinstance(meta, dict) or meta.get("format") != RESUME_FORMAT:
        raise UserError(f"{path / META} is not a UniTrans resume checkpoint (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected '{RESUME_FORMAT}')")
    return read_safetensors(path / TENSORS), meta

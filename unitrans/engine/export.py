"""``unitrans export``: fold trained adapters into the backbone and write it in its own library's format."""

from __future__ import annotations

from pathlib import Path

from unitrans.engine.build import build
from unitrans.engine.checkpoint import load_adapter
from unitrans.errors import UserError
from unitrans.interfaces import Exportable, check_capabilities


def export(spec, checkpoint: Path, out: Path) -> Path:
    """Build ``spec``, load the adapter checkpoint of the run folder ``checkpoint``, merge and save the backbone.

    The result loads with the backbone's own ``from_pretrained`` (for BLIP, e.g.
    ``BlipForImageTextRetrieval.from_pretrained(out)``) and gives the adapted model's outputs with no UniTrans
    code on the path. A side network (QASN) is not a weight update and cannot be folded into the backbone's
    weights: such a spec is refused rather than exported without it.
    """
    import torch

    if spec.side_network is not None:
        raise UserError(_side_network_message(spec.side_network.name))
    torch.manual_seed(spec.seed)
    handle = build(spec, "cpu", with_data=False)
    load_adapter(handle, Path(checkpoint))
    return export_merged(handle, Path(out))


def export_merged(handle, out: Path) -> Path:
    """Merge every adapter of ``handle``, write the backbone with its :class:`Exportable` ``save_pretrained`` into
    ``out`` (created) and unmerge again. Returns ``out``."""
    if handle.side_network is not None:
        raise UserError(_side_network_message(handle.names.get("side_network", "side network")))
    check_capabilities(handle.backbone, (Exportable,), "export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handle.merge()
    try:
        handle.backbone.save_pretrained(out)
    finally:
        handle.unmerge()
    return out


def _side_network_message(name: str) -> str:
    return (f"export: side network {name} adds computation beside the fusion blocks and cannot be merged into the "
            "backbone's weights; export works for adapters (and trained backbone parts) only. Use the adapter "
            "checkpoint with `unitrans run`/the library to keep QASN.")

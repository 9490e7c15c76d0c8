"""``unitrans export``: fold trained adapters into the backbone and write a plain ``save_pretrained`` directory."""

from __future__ import annotations

from pathlib import Path

from unitrans.engine.build import build
from unitrans.engine.checkpoint import load_adapter
from unitrans.errors import UserError


def export(spec, checkpoint: Path, out: Path) -> Path:
    """Build ``spec``, load the adapter checkpoint, merge every adapter and save the backbone.

    The result loads with the backbone's own ``from_pretrained`` (for BLIP, e.g.
    ``BlipForImageTextRetrieval.from_pretrained(out)``) and gives the adapted model's outputs with no UniTrans
    code on the path. A side network (QASN) is not a weight update and cannot be folded into the backbone's
    weights: such a spec is refused rather than exported without it.
    """
    import torch

    if spec.side_network is not None:
        raise UserError(
            f"export: side network {spec.side_network.name} adds computation beside the fusion blocks and cannot be "
            "merged into the backbone's weights; export works for adapters (and trained backbone parts) only. "
            "Use the adapter checkpoint with `unitrans run`/the library to keep QASN."
        )
    torch.manual_seed(spec.seed)
    built = build(spec, "cpu", with_data=False)
    if getattr(built.backbone.model, "temporal_embedding", None) is not None:
        raise UserError("export: the backbone's learned temporal embedding is not part of the transformers "
                        "architecture (from_pretrained would drop it); export supports image backbones only")
    load_adapter(built, Path(checkpoint))
    for adapter in built.adapters:
        adapter.merge()
    model = built.backbone.model
    if not hasattr(model, "save_pretrained"):
        raise UserError(f"export: backbone {built.names['backbone']} has no save_pretrained")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for name in ("processor", "tokenizer"):
        obj = getattr(built.backbone, name, None)
        if obj is not None and hasattr(obj, "save_pretrained"):
            obj.save_pretrained(str(out))
            break
    return out

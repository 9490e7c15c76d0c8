"""Helpers shared by the tasks that decode text (captioning, VQA): token losses, prefixes, sharded evaluation.

Everything here goes through the backbone's :class:`~unitrans.interfaces.EncoderDecoder` capability; nothing
knows a particular model's modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from unitrans import distributed
from unitrans.fileio import atomic_write_json


def token_nll(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token loss per position: ``logits (B, L, V)`` predict ``labels[:, 1:]`` (``-100``: ignored).

    Returns:
        ``(B, L-1)`` losses, 0 where the label is ignored (with smoothing, BLIP's loss; without, the negative
        log-likelihood of each token).
    """
    pred = logits[:, :-1, :].float()  # (B, L-1, V)
    target = labels[:, 1:]  # (B, L-1)
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="none", label_smoothing=label_smoothing)
    return loss.view(target.shape)


def padding_ignored(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for :func:`token_nll`: the input ids with padding set to ``-100``, ``(B, L)``."""
    return input_ids.masked_fill(attention_mask == 0, -100)


def full_mask(tokens: torch.Tensor) -> torch.Tensor:
    """An all-valid mask ``(B, N)`` for context tokens ``(B, N, D)`` (every image token is attended to)."""
    return torch.ones(tokens.shape[:-1], dtype=torch.long, device=tokens.device)


def prefix_ids(backbone, text: str) -> list[int]:
    """``[bos] text`` token ids (no ``[eos]``): a generation start and a masked loss prefix (a prompt)."""
    ids, mask = backbone.decoder_tokenize([text], "cpu")  # (1, L): [bos] text [eos]
    return ids[0, : int(mask[0].sum()) - 1].tolist()


def shard(n: int) -> list[int]:
    """This rank's indices of ``range(n)`` (strided; every rank gets a list, maybe empty)."""
    return list(range(distributed.rank(), n, distributed.world_size()))


def concat_across_ranks(rows: list) -> list:
    """Every rank's ``rows`` (picklable) concatenated in rank order, on every rank (``rows`` in one process)."""
    return [row for part in distributed.gather_objects(rows) for row in part]


def write_rows(output_dir, name: str, rows: list[dict]) -> None:
    """Writes per-item results ``rows`` as JSON to ``output_dir/name`` on the main rank (atomically)."""
    if output_dir is None or not distributed.is_main():
        return
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, rows, indent=1)


def loader_over(dataset, indices: list[int], batch_size: int, collate, num_workers: int):
    """A sequential ``DataLoader`` over ``indices`` of ``dataset``."""
    from torch.utils.data import DataLoader, Subset

    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collate,
                      num_workers=num_workers)

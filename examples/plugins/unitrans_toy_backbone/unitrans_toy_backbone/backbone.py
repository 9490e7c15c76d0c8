"""A tiny dual encoder: a :class:`unitrans.interfaces.Backbone` with the one capability
:class:`~unitrans.interfaces.DualEncoder` (ITC retrieval). Tasks that need another capability (captioning needs
``EncoderDecoder``, ITM needs ``FusionEncoder`` and ``ItmHead``) refuse it by name when a spec is built."""

from __future__ import annotations

import re
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from unitrans.interfaces import Backbone, DualEncoder, InjectionPoint


class Tower(nn.Module):
    """Tokens -> one MLP block (the injection points) -> mean over valid tokens -> projection."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x (B, L, W), mask (B, L)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        m = mask[..., None].to(x.dtype)
        return self.proj((x * m).sum(1) / m.sum(1).clamp(min=1))  # (B, W)


class ToyModel(nn.Module):
    def __init__(self, width, hidden, patch_size, n_patches, vocab_size):
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(n_patches, width) * 0.1)
        self.vision = Tower(width, hidden)
        self.words = nn.Embedding(vocab_size, width, padding_idx=0)
        self.text = Tower(width, hidden)


class ToyBackbone(Backbone, DualEncoder):
    name = "toy.v1"
    contract_version = "2"  # the version of unitrans.interfaces this class was written against

    def __init__(self, options):
        """Args: ``options``, the validated ``unitrans_toy_backbone.ToyOptions``."""
        o = self.options = options
        torch.manual_seed(o.seed)
        self.model = ToyModel(o.width, o.hidden, o.patch_size, (o.image_size // o.patch_size) ** 2, o.vocab_size)
        self.model.requires_grad_(False)  # frozen: only adapters train
        self.image_size, self.vocab_size = o.image_size, o.vocab_size
        self.image_mean, self.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def injection_points(self) -> list[InjectionPoint]:
        pts = []
        for prefix, modality, tower in (("vision", "V", self.model.vision), ("text", "T", self.model.text)):
            for role, lin in (("fc1", tower.fc1), ("fc2", tower.fc2)):
                pts.append(InjectionPoint(f"{prefix}.mlp.{role}", 0, modality, lin, None, lin.in_features,
                                          lin.out_features, input_group=f"{prefix}.0.mlp_{role}"))
        return pts

    def declared_points(self) -> list[str]:
        return ["vision.mlp.*", "text.mlp.*"]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def tokenize(self, texts, device) -> dict[str, torch.Tensor]:
        """Lower-cased words hashed into ``vocab_size - 1`` buckets (0 is padding)."""
        words = [re.findall(r"[a-z0-9]+", t.lower()) or ["<empty>"] for t in texts]
        n = max(len(w) for w in words)
        ids = torch.zeros(len(texts), n, dtype=torch.long)
        for i, ws in enumerate(words):
            ids[i, : len(ws)] = torch.tensor([1 + zlib.crc32(w.encode()) % (self.vocab_size - 1) for w in ws])
        return {"input_ids": ids.to(device), "attention_mask": (ids != 0).long().to(device)}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.model.patch(pixel_values).flatten(2).transpose(1, 2) + self.model.pos  # (B, N, W)
        mask = torch.ones(x.shape[:2], device=x.device)
        return self.model.vision(x, mask)[:, None, :]  # (B, 1, W)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_embeds[:, 0], dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.text(self.model.words(input_ids), attention_mask)[:, None, :]  # (B, 1, W)

    def text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(text_embeds[:, 0], dim=-1)

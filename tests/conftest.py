"""Shared helpers for the numerical tests: tiny BLIP backbones built from config, inputs, spec dicts.

Everything here is random-init and offline; a tiny backbone builds in a few milliseconds after the first import.
"""

from __future__ import annotations

import copy

import pytest
import torch

CAPTIONS = ["a red circle above a blue square", "two green triangles", "a small yellow star left of a circle"]


def tiny_backbone(seed: int = 0, task_model: str = "retrieval", vision_width: int | None = None):
    """A frozen tiny BLIP in eval mode. ``vision_width``: rebuild it with a vision tower of another width."""
    from unitrans_blip.backbone import BlipBackbone, preset_config

    torch.manual_seed(seed)
    bb = BlipBackbone(preset="tiny", task_model=task_model)
    if vision_width is not None:
        import transformers

        config = preset_config("tiny", bb.tokenizer, None)
        config.vision_config.hidden_size = vision_width
        config.text_config.encoder_hidden_size = vision_width
        torch.manual_seed(seed)
        bb.model = transformers.BlipForImageTextRetrieval(config)
        for p in bb.model.parameters():
            p.requires_grad_(False)
        bb._points = None
    bb.model.eval()
    return bb


def make_inputs(bb, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixel = torch.randn(batch, 3, bb.image_size, bb.image_size, generator=g)
    tok = bb.tokenize(CAPTIONS[:batch], "cpu")
    return pixel, tok


def retrieval_forward(bb, pixel, tok) -> dict[str, torch.Tensor]:
    """The retrieval task's forward pieces: unimodal features and ITM logits of the matched pairs."""
    image_embeds = bb.encode_image(pixel)
    text_embeds = bb.encode_text(tok["input_ids"], tok["attention_mask"])
    fused = bb.fuse(tok["input_ids"], tok["attention_mask"], image_embeds)
    return {
        "image_embeds": image_embeds,
        "image_feat": bb.image_feat(image_embeds),
        "text_embeds": text_embeds,
        "text_feat": bb.text_feat(text_embeds),
        "fused": fused,
        "itm": bb.itm_logits(fused),
    }


def spec_dict(adapters=(), side_network=None, backbone_extra=None) -> dict:
    """A quickstart-like spec dict over the tiny BLIP (no data is built by the tests: ``with_data=False``)."""
    d = {
        "seed": 0,
        "output_dir": "runs/test",
        "backbone": {"name": "blip.v1", "preset": "tiny", **(backbone_extra or {})},
        "adapters": [copy.deepcopy(a) for a in adapters],
        "alignment_loss": {"name": "itc.v1"},
        "task": {"name": "retrieval.v1", "k_test": 4},
        "data": {"name": "shapes_retrieval.v1", "root": "runs/data/shapes"},
    }
    if side_network is not None:
        d["side_network"] = copy.deepcopy(side_network)
    return d


def build_spec(d: dict, seed: int = 0):
    from unitrans.engine.build import build
    from unitrans.spec import validate_dict

    spec = validate_dict(d)
    torch.manual_seed(seed)
    built = build(spec, "cpu", with_data=False)
    built.backbone.model.eval()
    return spec, built


def training_without_dropout(model) -> None:
    """``model.train()`` with every dropout off: training-mode code paths, deterministic outputs."""
    from torch import nn

    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


@torch.no_grad()
def randomise_(params, seed: int = 0, std: float = 0.5, mean: float = 0.0) -> None:
    """Overwrite every tensor in ``params`` with ``mean + std * N(0, 1)`` drawn from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(mean + std * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture
def tiny_bb():
    return tiny_backbone()


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread (and do not slow down when other processes share the CPUs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def adapted_and_frozen(built, pixel, tok) -> tuple[dict, dict]:
    """:func:`retrieval_forward` with the adapters of ``built`` on, and inside ``built.disabled()``."""
    with torch.no_grad():
        adapted = retrieval_forward(built.backbone, pixel, tok)
        with built.disabled():
            frozen = retrieval_forward(built.backbone, pixel, tok)
    return adapted, frozen

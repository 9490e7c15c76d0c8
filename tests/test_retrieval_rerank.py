"""ITM re-ranking of retrieval evaluation against a naive one-pair-at-a-time reference, with adapters and QASN
acting; one image's cross-attention keys and values are computed once for all its candidate texts."""

from __future__ import annotations

import pytest
import torch

from conftest import CAPTIONS, build_spec, randomise_, spec_dict

pytestmark = pytest.mark.usefixtures("one_thread")

VCRA = {"name": "vcra.v1", "targets": ["vision.attn.*", "text.attn.*", "fusion.attn.*"], "rank": 4}


def _naive(bb, sims, embeds, tok, k, image_queries):
    """BLIP's re-ranking, one ITM forward per (query, candidate) pair; -100 outside the top k."""
    scores = torch.full(sims.shape, -100.0)
    for q in range(sims.shape[0]):
        top = sims[q].topk(k)
        for s, c in zip(top.values.tolist(), top.indices.tolist()):
            i, t = (q, c) if image_queries else (c, q)
            logit = bb.itm_logits(bb.fuse(tok["input_ids"][t:t + 1], tok["attention_mask"][t:t + 1], embeds[i:i + 1]))
            scores[q, c] = float(logit[0, 1]) + s
    return scores


@pytest.mark.parametrize("image_queries", [True, False], ids=["image->text", "text->image"])
def test_rerank_equals_one_forward_per_pair_and_projects_each_image_once_per_chunk(image_queries):
    _, built = build_spec(spec_dict([VCRA], {"name": "qasn.v1"}))
    bb, task = built.backbone, built.task
    randomise_(built.trainable.parameters(), seed=5, std=0.3)
    assert bb.fuse_broadcasts_image
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 4, 9
    embeds = torch.randn(n_img, 65, 64, generator=g)  # (I, N, Dv) image tokens
    tok = bb.tokenize([CAPTIONS[i % len(CAPTIONS)] + " " + "red " * (i % 4) for i in range(n_txt)], "cpu")
    sims = torch.randn(n_img, n_txt, generator=g)
    sims = sims if image_queries else sims.t()
    task.k_test, task.itm_batch = 3, 2  # image->text: 3 texts per image in chunks of 2; text->image: by image
    rows = []
    key = bb.model.text_encoder.encoder.layer[0].crossattention.self.key
    handle = key.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    with torch.no_grad():
        ours = task._rerank(bb, sims, embeds, tok, "cpu", image_queries=image_queries)
        handle.remove()
        reference = _naive(bb, sims, embeds, tok, 3, image_queries)
        bb.fuse_broadcasts_image = False  # the path of a backbone that cannot broadcast: one image per pair
        plain = task._rerank(bb, sims, embeds, tok, "cpu", image_queries=image_queries)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-5)
    pairs = sims.shape[0] * 3
    assert set(rows) == {1} and len(rows) < pairs  # one image per chunk, each projected once for its texts

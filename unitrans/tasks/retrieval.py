"""Image-text retrieval: ITC (+ MCAM) and ITM training, BLIP's ITC-then-ITM evaluation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unitrans.errors import UserError
from unitrans.interfaces import Task


def sample_negatives(sim: torch.Tensor, positives: torch.Tensor, hard: bool) -> torch.Tensor:
    """One negative column per row of ``sim (B, G)``: by ``softmax(sim)`` (hard) or uniformly, never a positive.

    A row with no negative at all (every candidate shares its image) falls back to a uniform draw.
    """
    weights = F.softmax(sim.float(), dim=1) + 1e-5 if hard else torch.ones_like(sim, dtype=torch.float)
    weights = weights.masked_fill(positives, 0)
    empty = weights.sum(dim=1) == 0
    if empty.any():
        weights[empty] = 1.0
    return torch.multinomial(weights, 1).squeeze(1)


class Retrieval(Task):
    metric_keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
    primary_metric = "r_mean"

    def __init__(self, k_test=16, rerank="itm+itc", itm_weight=1.0, negatives="hard", itm_batch=128,
                 hard_negative_temperature=0.07):
        self.k_test, self.rerank, self.itm_weight = k_test, rerank, itm_weight
        self.negatives, self.itm_batch, self.hn_temp = negatives, itm_batch, hard_negative_temperature

    # ---- training --------------------------------------------------------------------------------------------
    def training_step(self, backbone, batch, alignment):
        device = batch["image"].device
        tok = backbone.tokenize(batch["caption"], device)
        image_ids = batch["image_id"].to(device)
        image_embeds = backbone.encode_image(batch["image"])  # (B, N, Dv)
        image_feat = backbone.image_feat(image_embeds)  # (B, P)
        text_feat = backbone.text_feat(backbone.encode_text(**tok))  # (B, P)
        losses = dict(alignment(image_feat, text_feat, image_ids)) if alignment is not None else {}
        if self.itm_weight > 0:
            losses["itm_loss"] = self.itm_weight * self._itm_loss(backbone, tok, image_ids, image_embeds,
                                                                  image_feat, text_feat)
        return losses

    def _itm_loss(self, backbone, tok, image_ids, image_embeds, image_feat, text_feat):
        b = image_embeds.shape[0]
        with torch.no_grad():
            sim = image_feat @ text_feat.t() / self.hn_temp  # (B, B) local batch
            pos = image_ids[:, None] == image_ids[None, :]
            hard = self.negatives == "hard"
            neg_text = sample_negatives(sim, pos, hard)  # a text for each image
            neg_image = sample_negatives(sim.t(), pos, hard)  # an image for each text
        ids, mask = tok["input_ids"], tok["attention_mask"]
        ids_all = torch.cat([ids, ids[neg_text], ids], dim=0)  # (3B, L)
        mask_all = torch.cat([mask, mask[neg_text], mask], dim=0)
        images_all = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]], dim=0)  # (3B, N, Dv)
        logits = backbone.itm_logits(backbone.fuse(ids_all, mask_all, images_all))  # (3B, 2)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return F.cross_entropy(logits.float(), labels)

    # ---- evaluation ------------------------------------------------------------------------------------------
    def check_backbone(self, backbone) -> None:
        """ITM training and ITM re-ranking need a fusion network; say so by name when the backbone has none."""
        if (self.itm_weight > 0 or self.rerank != "itc") and not hasattr(backbone, "fuse"):
            raise UserError(
                f"task retrieval.v1 with itm_weight = {self.itm_weight} and rerank = '{self.rerank}' needs an ITM "
                f"head on a fusion network; backbone {backbone.name} has none. Set task.itm_weight = 0 and "
                "task.rerank = 'itc' (ITC-only retrieval, as CLIP does)."
            )

    @torch.no_grad()
    def evaluate(self, backbone, dataset, batch_size, *, device="cpu", collate=None, num_workers=0,
                 output_dir=None, split="test"):
        """BLIP's evaluation. Every rank encodes all images and texts (the cheap part); the ITM re-ranking of the
        queries (the expensive part) is sharded across ranks and the score rows are summed back together."""
        from torch.utils.data import DataLoader

        from unitrans.metrics.retrieval import retrieval_metrics

        texts = dataset.texts
        tok = backbone.tokenize(texts, "cpu")
        text_feats = []
        for start in range(0, len(texts), batch_size):
            ids = tok["input_ids"][start:start + batch_size].to(device)
            mask = tok["attention_mask"][start:start + batch_size].to(device)
            text_feats.append(backbone.text_feat(backbone.encode_text(ids, mask)).float().cpu())
        text_feat = torch.cat(text_feats)  # (T, P)

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                            num_workers=num_workers)
        image_embeds, image_feats = [], []
        for batch in loader:
            emb = backbone.encode_image(batch["image"].to(device))
            image_feats.append(backbone.image_feat(emb).float().cpu())
            image_embeds.append(emb.cpu() if self.rerank != "itc" else None)
        image_feat = torch.cat(image_feats)  # (I, P)
        sims = image_feat @ text_feat.t()  # (I, T)

        if self.rerank == "itc":
            s_i2t, s_t2i = sims, sims.t()
        else:
            embeds = torch.cat(image_embeds)  # (I, N, Dv), kept on the CPU
            s_i2t = self._rerank(backbone, sims, embeds, tok, device, image_queries=True)
            s_t2i = self._rerank(backbone, sims.t(), embeds, tok, device, image_queries=False)
        return retrieval_metrics(s_i2t.numpy(), s_t2i.numpy(), dataset.img2txt, dataset.txt2img)

    def _rerank(self, backbone, sims, image_embeds, tok, device, image_queries: bool):
        """Re-score the top ``k_test`` candidates of each query (rows of ``sims``) with the ITM head.

        Rank r scores the queries r, r + W, r + 2W, ...; the rows are then summed across ranks (each row has one
        owner). Pairs are scored in chunks of at most ``itm_batch``; memory is bounded by the chunk, not by the
        data set. When the backbone's fusion accepts one image for many texts (``fuse_broadcasts_image``), the
        pairs are grouped by image and each chunk holds one image: its tokens' cross-attention keys and values
        (most of a pair's cost at 384 px) are computed once for all its candidate texts instead of once per pair.
        """
        from unitrans import distributed as dist

        n_q, n_c = sims.shape
        k = min(self.k_test, n_c)
        owned = torch.arange(dist.rank(), n_q, dist.world_size())  # (Q_r,)
        topk_sim, topk_idx = sims[owned].topk(k, dim=1)  # (Q_r, k)
        q_idx = owned[:, None].expand(len(owned), k).reshape(-1)  # (Q_r*k,)
        c_idx = topk_idx.reshape(-1)
        img_idx, txt_idx = (q_idx, c_idx) if image_queries else (c_idx, q_idx)
        out = torch.empty(len(q_idx))
        for sl, one_image in self._chunks(backbone, img_idx):
            imgs = image_embeds[img_idx[sl[:1]] if one_image else img_idx[sl]].to(device)  # (1 or n, N, Dv)
            ids = tok["input_ids"][txt_idx[sl]].to(device)
            mask = tok["attention_mask"][txt_idx[sl]].to(device)
            logits = backbone.itm_logits(backbone.fuse(ids, mask, imgs)).float()
            out[sl] = logits[:, 1].cpu()
        itm = out.view(len(owned), k)
        new = itm + topk_sim if self.rerank == "itm+itc" else itm
        rows = torch.full((len(owned), n_c), -100.0)  # BLIP's floor for candidates outside the top k
        rows.scatter_(1, topk_idx, new)
        scores = torch.zeros(n_q, n_c)
        scores[owned] = rows
        return dist.all_reduce_sum(scores.to(device)).cpu()

    def _chunks(self, backbone, img_idx: torch.Tensor):
        """``(pair indices (n,), one_image)`` chunks of at most ``itm_batch`` pairs: all of one image when the
        backbone broadcasts one image over many texts, else consecutive pairs."""
        n = len(img_idx)
        if not getattr(backbone, "fuse_broadcasts_image", False):
            for start in range(0, n, self.itm_batch):
                yield torch.arange(start, min(start + self.itm_batch, n)), False
            return
        order = torch.argsort(img_idx, stable=True)
        _, counts = torch.unique_consecutive(img_idx[order], return_counts=True)
        start = 0
        for count in counts.tolist():
            group = order[start:start + count]
            start += count
            for sub in range(0, count, self.itm_batch):
                yield group[sub:sub + self.itm_batch], True

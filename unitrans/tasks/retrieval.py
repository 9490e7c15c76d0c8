"""Image-text retrieval: ITC (+ MCAM) and ITM training, BLIP's ITC-then-ITM evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unitrans.alignment_losses.itc import ContrastBank, MomentumCandidates, pair_similarity
from unitrans.interfaces import DualEncoder, FusionEncoder, ItmHead, Task, check_capabilities
from unitrans.tasks.momentum import FeatureQueue, MomentumCopy, distill_alpha, gather_features


def sample_negatives(sim: torch.Tensor, positives: torch.Tensor, hard: bool) -> torch.Tensor:
    """One negative column per row of ``sim (B, G)``: by ``softmax(sim)`` (hard) or uniformly, never a positive.

    A row with no negative at all (every candidate shares its image) falls back to a uniform draw, as does a row of
    non-finite similarities (a diverged step: the loop's loss check then stops the run, naming the step).
    """
    weights = F.softmax(sim.float(), dim=1) + 1e-5 if hard else torch.ones_like(sim, dtype=torch.float)
    weights = weights.nan_to_num(0.0, posinf=0.0, neginf=0.0).masked_fill(positives, 0)
    empty = weights.sum(dim=1) == 0
    if empty.any():
        weights[empty] = 1.0
    return torch.multinomial(weights, 1).squeeze(1)


TEMPERATURE_RANGE = (0.001, 0.5)  # BLIP clamps its learned temperature to this range before every forward


@dataclass(frozen=True)
class Recipe:
    """BLIP's retrieval fine-tuning recipe; every part off is plain in-batch ITC at a fixed temperature."""

    learn_temperature: bool = False
    momentum: float = 0.0
    queue_size: int = 0
    distill_alpha: float = 0.0


class LearnedTemperature(nn.Module):
    """BLIP's ``temp``: ITC's τ1 as one trainable scalar (part of the run's trainable tensors as ``task.temp``)."""

    def __init__(self, value: float = 0.07):
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(float(value)))

    def clamped(self) -> torch.Tensor:
        """Clamp in place to BLIP's range (no gradient), then return the parameter (0-d)."""
        with torch.no_grad():
            self.temp.clamp_(*TEMPERATURE_RANGE)
        return self.temp


class Retrieval(Task):
    metric_keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
    primary_metric = "r_mean"

    def __init__(self, k_test=16, rerank="itm+itc", itm_weight=1.0, negatives="hard", itm_batch=128,
                 hard_negative_temperature=0.07, recipe: Recipe = Recipe()):
        self.k_test, self.rerank, self.itm_weight = k_test, rerank, itm_weight
        self.negatives, self.itm_batch, self.hn_temp = negatives, itm_batch, hard_negative_temperature
        self.recipe = recipe
        # trainable tensors of the task itself: the build puts them beside the adapters (``trainable["task"]``)
        self.trainable_module = LearnedTemperature() if recipe.learn_temperature else None
        self._momentum: MomentumCopy | None = None
        self._queue: FeatureQueue | None = None
        self._alpha = 0.0  # momentum distillation weight of the current step (BLIP: 0 at the first step)
        self._pending = None  # this step's gathered momentum features, enqueued once the loss is computed

    # ---- training hooks --------------------------------------------------------------------------------------
    def setup(self, built) -> None:
        """Start the learned temperature from the checkpoint's (or the alignment loss's) and take the momentum
        copy of every trainable tensor but the task's own."""
        if self.trainable_module is not None:
            start = getattr(built.backbone, "itc_temperature", None)
            if start is None:
                start = getattr(built.alignment, "temperature", 0.07)
            with torch.no_grad():
                self.trainable_module.temp.fill_(float(start))
        if self.recipe.momentum:
            live = {k: v for k, v in built.trainable_state().items() if not k.startswith("task.")}
            self._momentum = MomentumCopy(live, self.recipe.momentum)

    def on_step_start(self, step: int, epoch: int, steps_per_epoch: int) -> None:
        self._alpha = distill_alpha(self.recipe.distill_alpha, step, epoch, steps_per_epoch)

    def on_optimizer_step(self) -> None:
        if self._momentum is not None:
            self._momentum.update()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self._momentum.state_dict() if self._momentum is not None else {}
        if self._queue is not None:
            state.update(self._queue.state_dict())
        return state

    def load_state_dict(self, state) -> None:
        if self._momentum is not None:
            self._momentum.load_state_dict(state)
        if self.recipe.queue_size and "queue.image" in state:
            image = state["queue.image"]  # (S, P) or (S, Q, P)
            self._queue = FeatureQueue(self.recipe.queue_size, image.shape[-1], image.device,
                                       image_queries=image.shape[1] if image.dim() == 3 else None)
            self._queue.load_state_dict(state)

    # ---- training --------------------------------------------------------------------------------------------
    def training_step(self, backbone, batch, alignment):
        device = batch["image"].device
        tok = backbone.tokenize(batch["caption"], device)
        image_ids = batch["image_id"].to(device)
        # the momentum forward swaps tensors in place, so it runs before this step's graph exists
        bank = self._contrast_bank(backbone, batch["image"], tok, image_ids) if alignment is not None else None
        image_embeds = backbone.encode_image(batch["image"])  # (B, N, Dv)
        image_feat = backbone.image_feat(image_embeds)  # (B, P), or (B, Q, P) multi-query
        text_feat = backbone.text_feat(backbone.encode_text(**tok))  # (B, P)
        losses = {}
        if alignment is not None:
            extra = {} if bank is None else {"bank": bank}
            losses.update(alignment(image_feat, text_feat, image_ids, **extra))
        if self._pending is not None:
            self._queue.enqueue(*self._pending)
            self._pending = None
        if self.itm_weight > 0:
            tau = float(bank.temperature.detach()) if bank is not None and bank.temperature is not None else self.hn_temp
            losses["itm_loss"] = self.itm_weight * self._itm_loss(backbone, tok, image_ids, image_embeds,
                                                                  image_feat, text_feat, tau)
        return losses

    def _contrast_bank(self, backbone, images, tok, image_ids) -> ContrastBank | None:
        """The learned temperature and the momentum encoder's candidates for ITC (``None``: recipe off)."""
        temp = self.trainable_module.clamped() if self.trainable_module is not None else None
        if not self.recipe.momentum:
            return None if temp is None else ContrastBank(temperature=temp)
        if self._momentum is None:
            raise RuntimeError("task retrieval.v1: momentum needs Task.setup(built) before the first training step")
        with self._momentum.swapped_in(), torch.no_grad():
            image_m = backbone.image_feat(backbone.encode_image(images))  # (B, P) or (B, Q, P)
            text_m = backbone.text_feat(backbone.encode_text(**tok))  # (B, P)
        g_image, g_text, g_ids = gather_features(image_m, text_m, image_ids)  # (G, P), (G, P), (G,)
        if self.recipe.queue_size and self._queue is None:
            self._queue = FeatureQueue(self.recipe.queue_size, image_m.shape[-1], image_m.device,
                                       image_queries=image_m.shape[1] if image_m.dim() == 3 else None)
        if self._queue is not None:
            self._pending = (g_image, g_text, g_ids)
            g_image = torch.cat([g_image, self._queue.image.to(g_image.dtype)])  # (G + Q, P): batch, then queue
            g_text = torch.cat([g_text, self._queue.text.to(g_text.dtype)])
            g_ids = torch.cat([g_ids, self._queue.ids])
        cands = MomentumCandidates(g_image, g_text, g_ids, image_m, text_m, alpha=self._alpha)
        return ContrastBank(temperature=temp, momentum=cands)

    def _itm_loss(self, backbone, tok, image_ids, image_embeds, image_feat, text_feat, temperature: float):
        b = image_embeds.shape[0]
        with torch.no_grad():
            sim = pair_similarity(image_feat, text_feat) / temperature  # (B, B) local batch
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
    def required_capabilities(self) -> tuple[type, ...]:
        """ITC features always; the fusion encoder and ITM head when ITM trains or re-ranks."""
        itm = self.itm_weight > 0 or self.rerank != "itc"
        return (DualEncoder, FusionEncoder, ItmHead) if itm else (DualEncoder,)

    def check_backbone(self, backbone) -> None:
        """Refuse, naming the capability, a backbone that cannot do what the options ask (e.g. ITM on CLIP)."""
        check_capabilities(
            backbone, self.required_capabilities(),
            f"task retrieval.v1 with itm_weight = {self.itm_weight} and rerank = '{self.rerank}'",
            hint="For ITC-only retrieval (as CLIP does) set task.itm_weight = 0 and task.rerank = 'itc'.")

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
        image_feat = torch.cat(image_feats)  # (I, P) or (I, Q, P)
        sims = pair_similarity(image_feat, text_feat)  # (I, T)

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

"""Image-text retrieval recall, as BLIP's ``itm_eval`` reports it (percent).

Ties are broken pessimistically: the rank of a ground-truth candidate is the number of *non*-ground-truth
candidates whose score is ``>=`` its score (0 = retrieved first). A model that gives every candidate the same
score therefore gets R@K = 0 (while fewer than K non-ground-truth candidates exist), never 100; ordering by a
stable sort instead would reward ties with whatever order the data happens to have.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean")


def _ranks(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Pessimistic rank of each query's best ground-truth candidate.

    Args:
        scores: ``(Q, C)`` query-candidate scores.
        rows, cols: ``(G,)`` the ground-truth pairs (query ``rows[g]`` has candidate ``cols[g]``); every query
            appears at least once and no pair twice.

    Returns:
        ``(Q,)`` int ranks: non-ground-truth candidates scoring ``>=`` the query's best ground-truth score.
    """
    gt_scores = scores[rows, cols]  # (G,)
    best = np.full(scores.shape[0], -np.inf)  # (Q,)
    np.maximum.at(best, rows, gt_scores)
    at_least = (scores >= best[:, None]).sum(axis=1)  # (Q,) all candidates, ground truth included
    gt_at_least = np.bincount(rows, weights=gt_scores >= best[rows], minlength=scores.shape[0])  # (Q,)
    return at_least - gt_at_least.astype(np.int64)


def _recall(ranks: np.ndarray, k: int) -> float:
    return float(100.0 * np.mean(ranks < k)) if ranks.size else 0.0


def retrieval_metrics(
    scores_i2t: np.ndarray,
    scores_t2i: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
) -> dict[str, float]:
    """Recall@{1,5,10} for image->text (``txt_*``) and text->image (``img_*``) retrieval, in percent.

    An image query is ranked by its best-ranked ground-truth text; ties count against the model (see module).

    Args:
        scores_i2t: ``(n_img, n_txt)`` score of each text for each image query (higher = better).
        scores_t2i: ``(n_txt, n_img)`` score of each image for each text query.
        img2txt: for each image, the indices of its ground-truth texts (non-empty).
        txt2img: for each text, the index of its image.

    Returns:
        ``txt_r1 txt_r5 txt_r10 img_r1 img_r5 img_r10 txt_r_mean img_r_mean r_mean`` as floats; ``r_mean`` is
        the mean of the six recalls.

    Raises:
        ValueError: shapes that disagree with the ground truth, an image without texts, an index out of range
            or a NaN score.
    """
    s_i2t, s_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)  # no float64 copy of a float32 matrix
    n_img, n_txt = len(img2txt), len(txt2img)
    if s_i2t.shape != (n_img, n_txt):
        raise ValueError(f"scores_i2t has shape {s_i2t.shape}, expected (n_img, n_txt) = ({n_img}, {n_txt})")
    if s_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i has shape {s_t2i.shape}, expected (n_txt, n_img) = ({n_txt}, {n_img})")
    for m in (s_i2t, s_t2i):
        if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
            raise ValueError(f"retrieval scores must be real numbers, got dtype {m.dtype}")
    if np.isnan(s_i2t).any() or np.isnan(s_t2i).any():
        raise ValueError("retrieval scores contain NaN")

    if any(len(t) == 0 for t in img2txt):
        raise ValueError("every image needs at least one ground-truth text (img2txt has an empty list)")
    rows = np.repeat(np.arange(n_img), [len(t) for t in img2txt])  # (G,)
    cols = np.fromiter((t for ts in img2txt for t in ts), dtype=np.int64, count=rows.size)  # (G,)
    if cols.size and (cols.min() < 0 or cols.max() >= n_txt):
        raise ValueError(f"img2txt holds a text index outside [0, {n_txt})")
    rows, cols = np.divmod(np.unique(rows * n_txt + cols), n_txt)  # a text listed twice counts once
    t2i = np.asarray(txt2img, dtype=np.int64).reshape(-1)  # (n_txt,)
    if t2i.size and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError(f"txt2img holds an image index outside [0, {n_img})")

    txt_ranks = _ranks(s_i2t, rows, cols)  # (n_img,)
    img_ranks = _ranks(s_t2i, np.arange(n_txt), t2i)  # (n_txt,)
    out = {f"txt_r{k}": _recall(txt_ranks, k) for k in (1, 5, 10)}
    out.update({f"img_r{k}": _recall(img_ranks, k) for k in (1, 5, 10)})
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3.0
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3.0
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2.0
    return {k: out[k] for k in KEYS}

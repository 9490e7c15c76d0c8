"""retrieval_metrics against a brute-force sorting reference, hand cases and the pessimistic tie rule."""

from __future__ import annotations

import random

import numpy as np
import pytest

from unitrans.metrics.retrieval import KEYS, retrieval_metrics


def _reference_rank(row: list[float], gt: set[int]) -> int:
    """Sorts the candidates (score descending, non-ground-truth first among equals) and returns the position
    of the first ground-truth candidate."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j in gt))
    for pos, j in enumerate(order):
        if j in gt:
            return pos
    raise AssertionError("no ground truth")


def _reference(s_i2t, s_t2i, img2txt, txt2img) -> dict[str, float]:
    txt_ranks = [_reference_rank(list(s_i2t[i]), set(img2txt[i])) for i in range(len(img2txt))]
    img_ranks = [_reference_rank(list(s_t2i[t]), {txt2img[t]}) for t in range(len(txt2img))]
    out = {}
    for prefix, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(1 for r in ranks if r < k) / len(ranks)
        out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in (1, 5, 10)) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def _random_problem(rng: random.Random, integer: bool):
    n_img = rng.randint(1, 14)
    per_image = [rng.randint(1, 5) for _ in range(n_img)]
    owners = [i for i, n in enumerate(per_image) for _ in range(n)]
    rng.shuffle(owners)  # texts of one image are not contiguous
    txt2img = owners
    img2txt = [[t for t, i in enumerate(txt2img) if i == img] for img in range(n_img)]
    n_txt = len(txt2img)
    if integer:
        s_i2t = [[rng.randint(0, 3) for _ in range(n_txt)] for _ in range(n_img)]
        s_t2i = [[rng.randint(0, 3) for _ in range(n_img)] for _ in range(n_txt)]
    else:
        s_i2t = [[rng.random() for _ in range(n_txt)] for _ in range(n_img)]
        s_t2i = [[rng.random() for _ in range(n_img)] for _ in range(n_txt)]
    return s_i2t, s_t2i, img2txt, txt2img


@pytest.mark.parametrize("integer", [True, False])
def test_matches_bruteforce_reference(integer):
    rng = random.Random(1234 + integer)
    for _ in range(200):
        s_i2t, s_t2i, img2txt, txt2img = _random_problem(rng, integer)
        got = retrieval_metrics(np.array(s_i2t), np.array(s_t2i), img2txt, txt2img)
        want = _reference(s_i2t, s_t2i, img2txt, txt2img)
        assert list(got) == list(KEYS)
        for k in KEYS:
            assert got[k] == pytest.approx(want[k]), (k, s_i2t, s_t2i, img2txt, txt2img)


def test_perfect_scores_give_100():
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    gt = np.zeros((3, 6))
    for i, ts in enumerate(img2txt):
        gt[i, ts] = 1.0
    out = retrieval_metrics(gt, gt.T.copy(), img2txt, txt2img)
    assert all(v == 100.0 for v in out.values())


def test_constant_scores_give_zero():
    n_img, per = 12, 2
    img2txt = [[per * i + j for j in range(per)] for i in range(n_img)]
    txt2img = [i for i in range(n_img) for _ in range(per)]
    out = retrieval_metrics(np.zeros((n_img, n_img * per)), np.zeros((n_img * per, n_img)), img2txt, txt2img)
    # 22 (resp. 11) non-ground-truth candidates tie with the ground truth: every rank is >= 10.
    assert all(v == 0.0 for v in out.values())


def test_hand_computed_case_with_tie():
    img2txt, txt2img = [[0, 1], [2]], [0, 0, 1]
    s_i2t = np.array([[0.1, 0.9, 0.5], [0.2, 0.3, 0.1]])  # image 0: rank 0; image 1: rank 2
    s_t2i = np.array([[0.5, 0.5], [0.7, 0.2], [0.9, 0.95]])  # text 0: tie -> rank 1; texts 1, 2: rank 0
    out = retrieval_metrics(s_i2t, s_t2i, img2txt, txt2img)
    assert out["txt_r1"] == pytest.approx(50.0)
    assert out["txt_r5"] == out["txt_r10"] == pytest.approx(100.0)
    assert out["img_r1"] == pytest.approx(200.0 / 3)
    assert out["img_r5"] == out["img_r10"] == pytest.approx(100.0)
    assert out["txt_r_mean"] == pytest.approx(250.0 / 3)
    assert out["img_r_mean"] == pytest.approx((200.0 / 3 + 200.0) / 3)
    assert out["r_mean"] == pytest.approx((50 + 100 + 100 + 200.0 / 3 + 100 + 100) / 6)


def test_rank_is_best_ground_truth_text():
    # Image 0's second caption is first; its first caption is last: the query counts as a hit at rank 0.
    s_i2t = np.array([[0.0, 0.5, 0.4, 0.3, 0.2, 0.1, 1.0]])
    out = retrieval_metrics(s_i2t, np.ones((7, 1)), [[0, 6]], [0] * 7)
    assert out["txt_r1"] == 100.0


def test_dtypes_and_errors():
    img2txt, txt2img = [[0], [1]], [0, 1]
    eye32 = np.eye(2, dtype=np.float32)
    assert retrieval_metrics(eye32, eye32, img2txt, txt2img)["r_mean"] == 100.0
    assert retrieval_metrics(np.eye(2, dtype=np.int64), np.eye(2, dtype=np.int64), img2txt, txt2img)["r_mean"] == 100.0
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(np.eye(2), np.eye(3), img2txt, txt2img)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0], [0, 1]]), np.eye(2), img2txt, txt2img)
    with pytest.raises(ValueError, match="at least one"):
        retrieval_metrics(np.zeros((2, 2)), np.zeros((2, 2)), [[0, 1], []], txt2img)

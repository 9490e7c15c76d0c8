"""ITC (eq. 7) and MCAM (eq. 9-10) against loop-over-pairs references in plain Python floats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unitrans.alignment_losses import itc_v1, mcam_v1


def _feats(n=6, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)
    return img, txt


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def reference_mcam(img, txt, tau, reduction):
    """Eq. 9: Σ_i JS(softmax(S[i, :] / τ) ‖ softmax(S[:, i] / τ)), S[i, j] = <image i, text j>."""
    n = img.shape[0]
    s = [[float(img[i].double() @ txt[j].double()) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        p = _softmax([s[i][j] / tau for j in range(n)])  # image i over texts
        q = _softmax([s[j][i] / tau for j in range(n)])  # text i over images
        js = 0.0
        for pj, qj in zip(p, q):
            m = (pj + qj) / 2
            if pj > 0:
                js += 0.5 * pj * math.log(pj / m)
            if qj > 0:
                js += 0.5 * qj * math.log(qj / m)
        total += js
    return {"mean": total / n, "sum": total, "as_itc": total / (2 * n)}[reduction]


def reference_itc(img, txt, ids, tau):
    """Eq. 7 with several positives: cross-entropy against the uniform target over a row's positives, both ways."""
    n = img.shape[0]
    s = [[float(img[i].double() @ txt[j].double()) for j in range(n)] for i in range(n)]
    i2t = t2i = 0.0
    for i in range(n):
        positives = [j for j in range(n) if int(ids[i]) == int(ids[j])]
        p_row = _softmax([s[i][j] / tau for j in range(n)])
        p_col = _softmax([s[j][i] / tau for j in range(n)])  # text i against every image
        i2t += -sum(math.log(p_row[j]) for j in positives) / len(positives)
        t2i += -sum(math.log(p_col[j]) for j in positives) / len(positives)
    return (i2t / n + t2i / n) / 2


@pytest.mark.parametrize("reduction", ["as_itc", "mean", "sum"])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_mcam_equals_the_loop_reference(reduction, tau):
    img, txt = _feats(n=7, seed=1)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3])
    loss = mcam_v1(mcam_temperature=tau, temperature=0.1, weight=0.7, itc_weight=0.3, reduction=reduction)
    out = loss(img, txt, ids)
    assert set(out) == {"itc_loss", "mcam_loss"}
    expected = reference_mcam(img, txt, tau, reduction)
    assert expected > 1e-3
    assert float(out["mcam_loss"]) == pytest.approx(0.7 * expected, abs=1e-6, rel=1e-5)
    assert float(out["itc_loss"]) == pytest.approx(0.3 * reference_itc(img, txt, ids, 0.1), abs=1e-6, rel=1e-5)


def printed_itc(img, txt, tau):
    """Eq. 7 exactly as printed (one positive per row): -Σ_i log p_i2t(i, i) - Σ_i log p_t2i(i, i), no means."""
    n = img.shape[0]
    s = [[float(img[i].double() @ txt[j].double()) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        total -= math.log(_softmax([s[i][j] / tau for j in range(n)])[i])
        total -= math.log(_softmax([s[j][i] / tau for j in range(n)])[i])
    return total


def test_default_mcam_weighs_l_itr_against_l_itc_as_eq_7_and_9_print_them():
    """Eq. 10 adds eq. 9's sum to eq. 7's two sums. BLIP's ITC scales eq. 7 by 1 / (2N); the default reduction
    must scale eq. 9 by the same factor, so the two terms keep the printed ratio (the mean reduction doubles it)."""
    img, txt = _feats(n=9, seed=4)
    ids = torch.arange(9)
    out = mcam_v1(temperature=0.1, mcam_temperature=0.1)(img, txt, ids)
    printed_ratio = reference_mcam(img, txt, 0.1, "sum") / printed_itc(img, txt, 0.1)
    assert float(out["mcam_loss"] / out["itc_loss"]) == pytest.approx(printed_ratio, rel=1e-5)
    mean = mcam_v1(temperature=0.1, mcam_temperature=0.1, reduction="mean")(img, txt, ids)
    assert float(mean["mcam_loss"] / mean["itc_loss"]) == pytest.approx(2 * printed_ratio, rel=1e-5)


def test_mcam_is_zero_when_similarities_are_symmetric():
    img, _ = _feats(n=8, seed=2)
    out = mcam_v1()(img, img.clone(), torch.arange(8))  # S = F F^T is symmetric: row i == column i
    assert abs(float(out["mcam_loss"])) < 1e-7
    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    sym = (a + a.t()) / 10  # any symmetric S, not just a Gram matrix
    from unitrans.alignment_losses.mcam import rank_consistency

    assert torch.allclose(rank_consistency(sym, sym.t(), 0.07), torch.zeros(5), atol=1e-7)


@pytest.mark.parametrize(
    "case", ["random", "duplicate_ids", "near_identical", "all_same_id", "sharp_temperature"]
)
def test_mcam_gradients_are_finite(case):
    img, txt = _feats(n=6, seed=3)
    ids = torch.arange(6)
    tau = 0.07
    if case == "duplicate_ids":
        ids = torch.tensor([0, 0, 1, 1, 1, 2])
    elif case == "near_identical":
        base = F.normalize(torch.randn(1, 16), dim=-1)
        img = F.normalize(base + 1e-6 * torch.randn(6, 16), dim=-1)
        txt = F.normalize(base + 1e-6 * torch.randn(6, 16), dim=-1)
    elif case == "all_same_id":
        ids = torch.zeros(6, dtype=torch.long)
    elif case == "sharp_temperature":  # allowed by the schema (τ > 0); probabilities underflow to exactly 0
        tau = 0.002
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    out = mcam_v1(mcam_temperature=tau)(img, txt, ids)
    total = sum(out.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()
    if case == "sharp_temperature":
        assert out["mcam_loss"].item() == pytest.approx(reference_mcam(img.detach(), txt.detach(), tau, "as_itc"),
                                                        abs=1e-5)


@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 2], [7, 7, 7, 7, 7, 7]])
@pytest.mark.parametrize("tau", [0.07, 1.0])
def test_itc_equals_the_loop_reference_with_several_positives(ids, tau):
    img, txt = _feats(n=6, seed=4)
    ids_t = torch.tensor(ids)
    out = itc_v1(temperature=tau, weight=2.0)(img, txt, ids_t)
    assert set(out) == {"itc_loss"}
    assert float(out["itc_loss"]) == pytest.approx(2.0 * reference_itc(img, txt, ids_t, tau), abs=1e-5, rel=1e-5)


def test_itc_gradients_are_finite_and_reach_both_towers():
    img, txt = _feats(n=5, seed=5)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    itc_v1()(img, txt, torch.tensor([0, 0, 1, 2, 3]))["itc_loss"].backward()
    for g in (img.grad, txt.grad):
        assert torch.isfinite(g).all() and torch.count_nonzero(g) > 0

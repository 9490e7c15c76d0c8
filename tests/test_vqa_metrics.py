"""VQA accuracy against hand-computed cases (leave-one-out, normalisation)."""

from __future__ import annotations

import pytest

from unitrans.metrics.vqa import normalize_answer, vqa_accuracy, vqa_metrics


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("the dog.", "dog"), ("isnt", "isn't"), ("A Red Ball", "red ball"), ("3.5", "3.5"),
    ("black/white", "black white"), ("yes!", "yes"), ("1,000", "1000"), ("  ten\n", "10"), ("dont", "don't"),
    ("hot dog , ketchup", "hot dog ketchup"),
])
def test_normalization(raw, norm):
    assert normalize_answer(raw) == norm


def test_all_ten_agree():
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0  # normalised prediction
    assert vqa_accuracy("the dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("isnt", ["isn't"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_three_of_ten_by_hand():
    # leave out one of the 3 matching humans (3 subsets): 2 others match -> 2/3; leave out a non-matching one
    # (7 subsets): 3 match -> min(1, 3/3) = 1. Mean: (3 * 2/3 + 7 * 1) / 10 = 0.9
    gts = ["red"] * 3 + ["blue"] * 7
    assert vqa_accuracy("red", gts) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("red", gts) == pytest.approx(0.9)
    # four of ten: every subset keeps at least 3 -> 1.0
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == pytest.approx(1.0)


def test_one_of_ten_by_hand():
    # leaving out the matching human: 0; leaving out any other (9 subsets): 1/3. Mean 9 * (1/3) / 10 = 0.3
    gts = ["red"] + ["blue"] * 9
    assert vqa_accuracy("red", gts) == pytest.approx(0.3)
    assert vqa_accuracy("Red.", gts) == pytest.approx(0.3)
    # two of ten: leave out a match (2 subsets): 1/3; others (8): 2/3 -> (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)


def test_fewer_than_ten_answers():
    # 3 humans, 2 match: leave out a match (2): 1/3; leave out the other (1): 2/3 -> (2/3 + 2/3) / 3 = 4/9
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    assert vqa_accuracy("yes", ["yes"]) == 1.0


def test_official_mode_normalises_only_on_disagreement():
    assert vqa_accuracy("Two", ["2"] * 10, normalize="official") == 0.0  # the official script's quirk
    assert vqa_accuracy("Two", ["2"] * 9 + ["3"], normalize="official") == pytest.approx(1.0)


def test_vqa_metrics_mean_times_100_and_skips_unanswered():
    results = {1: "2", 2: "red", 3: "anything"}
    anns = {1: ["2"] * 10, 2: ["red"] + ["blue"] * 9, 3: []}
    m = vqa_metrics(results, anns)
    assert m["vqa_acc"] == pytest.approx(100 * (1.0 + 0.3) / 2)
    assert m["n_scored"] == 2


def test_exact_match_acc_against_the_majority_answer():
    """``acc`` (MSRVTT-QA's metric): exact match with the most common human answer, after normalisation."""
    from unitrans.metrics.vqa import vqa_metrics

    annotations = {1: ["two"] * 7 + ["3"] * 3, 2: ["dog"], 3: ["red", "red", "blue"]}
    results = {1: "2", 2: "the dog", 3: "blue"}
    m = vqa_metrics(results, annotations)
    assert m["acc"] == 100.0 * 2 / 3  # q1: "2" == "two" normalised; q2: articles dropped; q3: majority is red

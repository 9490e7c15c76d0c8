"""Captioning metrics against pycocoevalcap's own scorers (the oracle) and hand-checked properties."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

pytest.importorskip("pycocoevalcap")

from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402

from unitrans.errors import UserError  # noqa: E402
from unitrans.metrics.caption import caption_metrics, tokenize  # noqa: E402

REFS = {
    1: ["A man riding a horse on a beach.", "a person rides a brown horse along the shore",
        "Man on horseback near the ocean!"],
    2: ["Two dogs playing with a red ball in the grass", "two puppies play with a ball", "dogs chase a ball."],
    3: ["A plate of food with broccoli and rice.", "a dinner plate holding rice, broccoli and chicken"],
    42: ["a red circle above a blue square", "a small red circle over a square that is blue"],
}
CANDS = {1: "a man riding a horse on the beach", 2: "two dogs play with a ball on the grass",
         3: "a plate with rice and broccoli", 42: "a red circle above a square"}


def reference_tokenize(text: str) -> str:
    """Written independently of the module: keep letters and digits, lower-case, single spaces."""
    out, word = [], ""
    for ch in text.lower():
        if ch.isalnum():
            word += ch
        elif word:
            out.append(word)
            word = ""
    if word:
        out.append(word)
    return " ".join(out)


def test_tokenizer_matches_reference():
    for text in ["A man, riding a horse.", "  Two   dogs!!", "don't-stop 3.5 km", "(Hello) [World]"]:
        assert tokenize(text) == reference_tokenize(text)
    assert tokenize("A man, riding a horse.") == "a man riding a horse"


def test_equals_pycocoevalcap_on_fixed_set():
    gts = {k: [reference_tokenize(r) for r in v] for k, v in REFS.items()}
    res = {k: [reference_tokenize(c)] for k, c in CANDS.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    ours = caption_metrics(CANDS, REFS)
    assert ours["bleu4"] == pytest.approx(100 * bleu[3], abs=1e-9)
    assert ours["cider"] == pytest.approx(100 * cider, abs=1e-9)
    assert 0 < ours["bleu4"] < 100 and 0 < ours["cider"]


def test_identical_candidate_gives_bleu_100():
    refs = {i: [c] for i, c in enumerate(["a red circle above a blue square", "two green triangles on a table"])}
    res = {i: r[0] for i, r in refs.items()}
    assert caption_metrics(res, refs)["bleu4"] == pytest.approx(100.0)
    # punctuation and case do not matter after tokenization
    res_noisy = {0: "A red circle, above a BLUE square.", 1: "Two green triangles on a table!"}
    assert caption_metrics(res_noisy, refs)["bleu4"] == pytest.approx(100.0)


def _naive_bleu4(cand: str, refs: list[str]) -> float:
    """Corpus BLEU-4 of one sentence with the closest reference length, no smoothing (hand formula)."""
    c = cand.split()
    rs = [r.split() for r in refs]
    logp = 0.0
    for n in range(1, 5):
        grams = Counter(tuple(c[i:i + n]) for i in range(len(c) - n + 1))
        maxref = Counter()
        for r in rs:
            for g, k in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                maxref[g] = max(maxref[g], k)
        clipped = sum(min(k, maxref[g]) for g, k in grams.items())
        logp += math.log(clipped / max(1, len(c) - n + 1)) / 4
    ref_len = min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
    bp = 1.0 if len(c) > ref_len else math.exp(1 - ref_len / len(c))
    return bp * math.exp(logp)


def test_bleu_against_hand_formula_single_image():
    cand, refs = "the cat sat on the red mat", ["the cat sat on the mat", "a cat is sitting on a red mat"]
    ours = caption_metrics({7: cand}, {7: refs})["bleu4"]
    assert ours == pytest.approx(100 * _naive_bleu4(cand, refs), rel=1e-6)


def test_cider_ranks_better_caption_higher_and_zero_for_unrelated():
    good = caption_metrics(CANDS, REFS)["cider"]
    worse = {**CANDS, 1: "a plate of food", 2: "a horse on a beach"}
    assert caption_metrics(worse, REFS)["cider"] < good
    unrelated = {k: "zebra xylophone" for k in CANDS}
    assert caption_metrics(unrelated, REFS)["cider"] == 0.0


def test_missing_references_named():
    with pytest.raises(UserError, match="no reference"):
        caption_metrics({1: "a man", 99: "a dog"}, REFS)
    with pytest.raises(UserError):
        caption_metrics({}, REFS)


# ---- unitrans score caption --------------------------------------------------------------------------------------
def _caption_files(tmp_path, results: list[tuple]):
    import json

    gt = {"images": [{"id": i} for i in REFS],
          "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c} for i, refs in REFS.items()
                          for k, c in enumerate(refs)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in results]))
    return tmp_path / "res.json", tmp_path / "gt.json"


def test_score_caption_reports_coverage_and_warns(tmp_path, capsys):
    import json

    from unitrans import cli

    res, gt = _caption_files(tmp_path, [(1, CANDS[1]), (2, CANDS[2])])
    assert cli.main(["score", "caption", "--results", str(res), "--annotations", str(gt)]) == 0
    out = capsys.readouterr()
    metrics = json.loads(out.out)
    expected = caption_metrics({1: CANDS[1], 2: CANDS[2]}, REFS)
    assert metrics["cider"] == pytest.approx(expected["cider"]) and metrics["bleu4"] == pytest.approx(expected["bleu4"])
    assert (metrics["n_scored"], metrics["n_total"], metrics["coverage"]) == (2, 4, 0.5)
    assert out.err == ("warning: the results cover 2 of the 4 images of the ground truth (50.0%); the scores are "
                       "over those 2 only and are not comparable with scores over the whole split\n")
    res, gt = _caption_files(tmp_path, list(CANDS.items()))
    assert cli.main(["score", "caption", "--results", str(res), "--annotations", str(gt)]) == 0
    assert json.loads(capsys.readouterr().out)["coverage"] == 1.0


def test_score_caption_refuses_an_image_captioned_twice(tmp_path, capsys):
    from unitrans import cli

    res, gt = _caption_files(tmp_path, [(1, CANDS[1]), (42, "a circle"), (2, CANDS[2]), ("42", "a square")])
    assert cli.main(["score", "caption", "--results", str(res), "--annotations", str(gt)]) == 2
    assert capsys.readouterr().err == (f"error: {res}: image_id 42 appears twice (entries 1 and 3); a results file "
                                       "holds one answer per image\n")
    assert cli.main(["score", "caption", "--results", str(res), "--annotations", str(gt), "--normalize"]) == 2
    assert "--questions and --normalize are for score vqa" in capsys.readouterr().err

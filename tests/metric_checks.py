"""Checks of a run's metrics against what they are by definition (shared by the end-to-end tests).

Retrieval: a recall over Q queries is a count / Q; recall grows with k; with k at least the number of candidates
it is 100; ``r_mean`` is the mean of the six. VQA: the run's number is the official accuracy of its own results
file, recomputed by the reference of ``test_vqa_metrics``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

KS = (1, 5, 10)


def eval_sizes(annotation: str | Path) -> tuple[int, int]:
    """``(items, texts)`` of an evaluation file in BLIP's / LAVIS's layout (``caption`` a list or a string)."""
    entries = json.loads(Path(annotation).read_text())
    texts = sum(len(e["caption"]) if isinstance(e["caption"], list) else 1 for e in entries)
    return len(entries), texts


def check_retrieval_metrics(metrics: dict, annotation: str | Path) -> None:
    """Asserts that ``txt_r*`` (image queries), ``img_r*`` (text queries) and the means fit their definitions
    for the evaluation file ``annotation``."""
    n_items, n_texts = eval_sizes(annotation)
    for side, queries, candidates in (("txt", n_items, n_texts), ("img", n_texts, n_items)):
        values = [metrics[f"{side}_r{k}"] for k in KS]
        for k, v in zip(KS, values):
            hits = v * queries / 100
            assert hits == pytest.approx(round(hits), abs=1e-6), (side, k, v, queries)  # a count of queries
            if k >= candidates:
                assert v == pytest.approx(100.0), (side, k, v)  # every candidate is in the top k
        assert values == sorted(values), (side, values)
        if f"{side}_r_mean" in metrics:
            assert metrics[f"{side}_r_mean"] == pytest.approx(sum(values) / 3)
    six = [metrics[f"{side}_r{k}"] for side in ("txt", "img") for k in KS]
    assert metrics["r_mean"] == pytest.approx(sum(six) / 6)


def official_vqa_accuracy(results: str | Path, questions: str | Path) -> float:
    """x100 accuracy of a ``vqa_result_<split>.json`` against the question file it answers (BLIP's or LAVIS's
    layout: ``answer`` a list or one string), by the reference rules of ``test_vqa_metrics``; one human answer
    counts as a match or not (see ``unitrans.metrics.vqa``)."""
    from test_vqa_metrics import ref_accuracy, ref_punctuation, ref_words

    humans = {}
    for q in json.loads(Path(questions).read_text()):
        humans[q["question_id"]] = q["answer"] if isinstance(q["answer"], list) else [q["answer"]]
    rows = json.loads(Path(results).read_text())
    scores = []
    for r in rows:
        answers = humans[r["question_id"]]
        if len(answers) == 1:
            scores.append(float(ref_words(ref_punctuation(r["answer"].strip())) == answers[0]))
        else:
            scores.append(ref_accuracy(r["answer"], answers))
    return 100.0 * sum(scores) / len(scores)

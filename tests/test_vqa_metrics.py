"""VQA accuracy against a reference of the official evaluation's rules written here (``vqaEval.py`` of VQAv2, which
LAVIS reuses), on cases that exercise each of its quirks, on random cases, and through ``unitrans score vqa`` on
files in BLIP's layout and in the official one."""

from __future__ import annotations

import json
import random

import pytest

from unitrans import cli
from unitrans.metrics.vqa import normalize_answer, vqa_accuracy, vqa_metrics

# ---- the reference: the official rules, written independently (character by character, explicit subsets) ------
MARKS = ';/[]"{}()=+\\_-><@`,?!'  # the script's punctuation list; apostrophes, colons and periods are not in it
DIGITS = "0123456789"
WORD_NUMBERS = ["none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
NUMBER_OF = {w: str(max(0, i - 1)) for i, w in enumerate(WORD_NUMBERS)}  # none, zero -> 0; one -> 1; ...
# the entries of the script's contraction table that the cases below use (its capitalised keys never apply)
APOSTROPHE = {"dont": "don't", "isnt": "isn't", "whats": "what's", "cant": "can't", "youre": "you're",
              "oclock": "o'clock", "somebody'd": "somebodyd"}


def ref_punctuation(text: str) -> str:
    """Marks: deleted when the text has a digit-comma-digit group or the mark touches a space, else a space;
    then the first 32 periods that are not before a digit are deleted."""
    comma_number = any(a in DIGITS and b == "," and c in DIGITS for a, b, c in zip(text, text[1:], text[2:]))
    spaced = []
    for ch in text:
        if ch not in MARKS:
            spaced.append(ch)
        elif not (comma_number or f"{ch} " in text or f" {ch}" in text):
            spaced.append(" ")
    out, removed = [], 0
    for i, ch in enumerate(spaced):
        before_digit = i + 1 < len(spaced) and spaced[i + 1] in DIGITS
        if ch == "." and not before_digit and removed < 32:
            removed += 1
            continue
        out.append(ch)
    return "".join(out)


def ref_words(text: str) -> str:
    """Lower case; number words to digits; articles out; contractions back."""
    kept = [NUMBER_OF.get(w, w) for w in text.lower().split()]
    kept = [w for w in kept if w not in ("a", "an", "the")]
    return " ".join(APOSTROPHE.get(w, w) for w in kept)


def ref_accuracy(prediction: str, humans: list[str]) -> float:
    """The script's loop: the prediction always processed; the humans' answers punctuation-processed only when
    they are not all the same string; for each human left out, min(1, matches among the other 9 / 3); mean."""
    pred = ref_words(ref_punctuation(prediction.replace("\n", " ").replace("\t", " ").strip()))
    if len(set(humans)) > 1:
        humans = [ref_punctuation(h) for h in humans]
    scores = []
    for out in range(len(humans)):
        others = humans[:out] + humans[out + 1:]
        scores.append(min(1.0, others.count(pred) / 3))
    return sum(scores) / len(scores)


# (prediction, human answers, what the official script gives): one or more cases per quirk
QUIRKS = [
    ("2", ["two"] * 10, 0.0),                      # humans agree: their answers are not processed
    ("two", ["two"] * 10, 0.0),                    # ... while the prediction's "two" becomes "2"
    ("dog", ["the dog"] * 10, 0.0),                # the humans' article stays
    ("the dog", ["dog"] * 10, 1.0),                # the prediction's article goes
    ("Yes", ["yes"] * 10, 1.0),                    # the prediction is lower-cased
    ("yes", ["Yes"] * 10, 0.0),                    # the humans' answers are not
    ("yes", ["yes "] * 10, 0.0),                   # nor stripped
    (" yes\n", ["yes"] * 10, 1.0),                 # the prediction is
    ("black white", ["black/white"] * 10, 0.0),    # agreeing humans keep their slash
    ("black white", ["black/white"] * 4 + ["gray"] * 6, 1.0),  # disagreeing ones lose it
    ("2", ["two"] * 5 + ["2"] * 5, 1.0),           # disagreeing humans: punctuation only, "two" stays "two"
    ("2", ["two"] * 9 + ["2"], 0.3),
    ("2", ["2."] * 2 + ["3"] * 8, 0.6),            # ... and "2." becomes "2"
    ("Red", ["red"] * 3 + ["Red"] * 7, 0.9),       # the prediction matches the lower-case 3 only
    ("none", ["0"] * 10, 1.0),                     # number words, "none" included
    ("dont", ["don't"] * 10, 1.0),                 # contractions restored
    ("im", ["i'm"] * 10, 0.0),                     # the table's capitalised "Im" never applies
    ("whats up", ["what's up"] * 10, 1.0),
    ("1,000", ["1000"] * 10, 1.0),                 # a digit-comma-digit group: every mark deleted
    ("red,blue", ["red blue"] * 10, 1.0),          # otherwise a mark between words becomes a space
    ("hot dog , ketchup", ["hot dog ketchup"] * 10, 1.0),  # a mark beside a space is deleted
    ("3.5", ["3.5"] * 10, 1.0),                    # a period before a digit stays
    ("dog.", ["dog"] * 10, 1.0),
    ("yes" + "." * 33, ["yes."] * 10, 1.0),        # at most 32 periods are removed
    ("left-right", ["left right"] * 10, 1.0),      # "-" and "!" are marks, ":" is not
    ("yes!", ["yes"] * 10, 1.0),
    ("yes:", ["yes"] * 10, 0.0),
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),      # leave-one-out: (3 * 2/3 + 7 * 1) / 10
    ("red", ["red"] * 4 + ["blue"] * 6, 1.0),
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),
    ("yes", ["yes", "yes", "no"], 4 / 9),          # fewer than 10 humans: the same subsets
]


@pytest.mark.parametrize("prediction, humans, official", QUIRKS)
def test_official_rules_match_the_reference_on_each_quirk(prediction, humans, official):
    assert ref_accuracy(prediction, humans) == pytest.approx(official)  # the reference encodes the quirk
    assert vqa_accuracy(prediction, humans) == pytest.approx(official)


POOL = ["2", "two", "Two", "2.", "two.", "the dog", "dog", "Dog", "a dog", "dog.", "yes", "Yes", "yes!", "no", "yes ",
        "black/white", "black white", "black and white", "1,000", "1000", "3.5", "none", "0", "dont", "don't",
        "isnt", "isn't", "hot dog , ketchup", "hot dog ketchup", "red,blue", "red blue", "what's up", "whats up",
        "left-right", "left right", "o'clock", "oclock", "can't", "cant", "(red)", "red", " red", "red\t",
        "youre", "you're", "somebody'd", "somebodyd"]


def test_official_rules_match_the_reference_on_random_cases():
    rng = random.Random(0)
    for _ in range(2000):
        pool = rng.sample(POOL, rng.randint(1, 4))  # few distinct answers, so that matches and agreement happen
        humans = [rng.choice(pool) for _ in range(rng.choice([10, 10, 10, 3, 5]))]
        prediction = rng.choice(POOL)
        assert vqa_accuracy(prediction, humans) == pytest.approx(ref_accuracy(prediction, humans)), (prediction,
                                                                                                      humans)


def test_one_human_answer_scores_a_match_where_the_script_scores_zero():
    assert ref_accuracy("yes", ["yes"]) == 0.0  # nobody is left after leaving the one human out
    assert vqa_accuracy("yes", ["yes"]) == 1.0 and vqa_accuracy("no", ["yes"]) == 0.0


def test_lenient_rules_normalise_both_sides():
    assert vqa_accuracy("2", ["two"] * 10, normalize=True) == 1.0
    assert vqa_accuracy("dog", ["the dog"] * 10, normalize=True) == 1.0
    assert vqa_accuracy("yes", ["Yes."] * 10, normalize=True) == 1.0
    assert vqa_accuracy("2", ["two"] * 9 + ["3"], normalize=True) == pytest.approx(1.0)
    assert vqa_accuracy("red", ["Red"] + ["blue"] * 9, normalize=True) == pytest.approx(0.3)


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("the dog.", "dog"), ("isnt", "isn't"), ("A Red Ball", "red ball"), ("3.5", "3.5"),
    ("black/white", "black white"), ("yes!", "yes"), ("1,000", "1000"), ("  ten\n", "10"), ("dont", "don't"),
    ("hot dog , ketchup", "hot dog ketchup"), ("Im", "im"),
])
def test_prediction_processing(raw, norm):
    assert normalize_answer(raw) == norm == ref_words(ref_punctuation(raw.strip()))


# a six-question file on which the two rules differ: official 1.2 / 6 (20.0), lenient 5.9 / 6 (98.3)
SIX = {1: ("2", ["two"] * 10), 2: ("dog", ["the dog"] * 10), 3: ("yes", ["Yes"] * 10),
       4: ("red", ["red"] * 3 + ["blue"] * 7), 5: ("2", ["two"] * 9 + ["2"]), 6: ("black white", ["black/white"] * 10)}


def test_vqa_metrics_over_a_file_official_and_lenient():
    results = {q: p for q, (p, _) in SIX.items()}
    anns = {q: h for q, (_, h) in SIX.items()}
    official = vqa_metrics(results, anns)
    assert official["vqa_acc"] == pytest.approx(100 * sum(ref_accuracy(p, h) for p, h in SIX.values()) / 6)
    assert official["vqa_acc"] == pytest.approx(100 * (0.9 + 0.3) / 6)
    lenient = vqa_metrics(results, anns, normalize=True)
    assert lenient["vqa_acc"] == pytest.approx(100 * (4 + 0.9 + 1.0) / 6)
    assert official["n_scored"] == lenient["n_scored"] == 6


def test_vqa_metrics_skips_unanswered_questions():
    m = vqa_metrics({1: "2", 2: "red", 3: "anything"}, {1: ["2"] * 10, 2: ["red"] + ["blue"] * 9, 3: []})
    assert m["vqa_acc"] == pytest.approx(100 * (1.0 + 0.3) / 2) and m["n_scored"] == 2


def test_exact_match_acc_against_the_majority_answer():
    """``acc`` (MSRVTT-QA's metric): exact match with the most common human answer; lenient: after processing."""
    annotations = {1: ["two"] * 7 + ["3"] * 3, 2: ["dog"], 3: ["red", "red", "blue"], 4: ["cat"]}
    results = {1: "2", 2: "the dog", 3: "blue", 4: " cat"}
    assert vqa_metrics(results, annotations)["acc"] == pytest.approx(100.0 * 1 / 4)  # q4 only
    assert vqa_metrics(results, annotations, normalize=True)["acc"] == pytest.approx(100.0 * 3 / 4)


# ---- files and the command -------------------------------------------------------------------------------------
def _official_files(tmp_path, cases: dict, types: dict | None = None):
    """The official annotation and questions files, as VQAv2 ships them."""
    anns = [{"question_id": q, "image_id": 100 + q, "question_type": "what", "multiple_choice_answer": h[0],
             "answer_type": (types or {}).get(q, "other"),
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(h)]}
            for q, (_, h) in cases.items()]
    questions = [{"question_id": q, "image_id": 100 + q, "question": f"question {q}?"} for q in cases]
    (tmp_path / "ann.json").write_text(json.dumps({"info": {}, "data_subtype": "val2014", "annotations": anns}))
    (tmp_path / "q.json").write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "questions": questions}))
    return tmp_path / "ann.json", tmp_path / "q.json"


def _results(tmp_path, answers: dict, name: str = "res.json"):
    path = tmp_path / name
    path.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in answers.items()]))
    return path


def _score(capsys, *args) -> tuple[int, dict | None, str]:
    rc = cli.main(["score", "vqa", *map(str, args)])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc == 0 else None), out.err


def test_score_reads_the_official_files_and_reports_answer_types(tmp_path, capsys):
    types = {1: "number", 5: "number", 3: "yes/no"}
    ann, questions = _official_files(tmp_path, SIX, types)
    res = _results(tmp_path, {q: p for q, (p, _) in SIX.items()})
    rc, m, err = _score(capsys, "--results", res, "--annotations", ann, "--questions", questions)
    assert rc == 0 and err == ""
    assert m["vqa_acc"] == pytest.approx(100 * (0.9 + 0.3) / 6) and m["rules"] == "official"
    assert m["coverage"] == 1.0 and m["n_total"] == 6
    assert m["per_answer_type"] == pytest.approx({"number": 100 * 0.3 / 2, "yes/no": 0.0, "other": 100 * 0.9 / 3})
    rc, m, _ = _score(capsys, "--results", res, "--annotations", ann, "--normalize")
    assert rc == 0 and m["vqa_acc"] == pytest.approx(100 * 5.9 / 6) and m["rules"] == "normalized"


def test_score_reads_blip_lists(tmp_path, capsys):
    res = _results(tmp_path, {1: "Two", 2: "red"})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"question_id": 1, "question": "how many?", "answer": ["2"] * 10, "image": "x.jpg"},
                               {"question_id": 2, "question": "color?", "answer": ["red"] + ["blue"] * 9,
                                "image": "y.jpg"}]))
    rc, m, _ = _score(capsys, "--results", res, "--annotations", ann)
    assert rc == 0 and m["vqa_acc"] == pytest.approx(65.0)
    rc, _, err = _score(capsys, "--results", tmp_path / "missing.json", "--annotations", ann)
    assert rc == 2 and "missing.json" in err


def test_score_warns_when_results_cover_part_of_the_questions(tmp_path, capsys):
    ann, _ = _official_files(tmp_path, {1: ("x", ["red"] * 10), 2: ("x", ["blue"] * 10), 3: ("x", ["2"] * 10)})
    rc, m, err = _score(capsys, "--results", _results(tmp_path, {1: "red"}), "--annotations", ann)
    assert rc == 0 and m["vqa_acc"] == 100.0
    assert m["coverage"] == pytest.approx(1 / 3) and m["n_scored"] == 1 and m["n_total"] == 3
    assert err.count("\n") == 1 and "warning: the results cover 1 of the 3 annotated questions" in err


def test_score_refuses_duplicates_wrong_layouts_and_mismatched_questions(tmp_path, capsys):
    ann, questions = _official_files(tmp_path, {1: ("x", ["red"] * 10), 2: ("x", ["blue"] * 10)})
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "x"},
                               {"question_id": "1", "answer": "blue"}]))
    rc, _, err = _score(capsys, "--results", dup, "--annotations", ann)
    assert rc == 2 and "question_id 1 appears twice (entries 0 and 2)" in err and err.count("\n") == 1
    res = _results(tmp_path, {1: "red", 2: "blue"})
    rc, _, err = _score(capsys, "--results", res, "--annotations", questions)
    assert rc == 2 and "is a VQA questions file" in err and "--questions" in err
    (tmp_path / "other.json").write_text(json.dumps({"images": []}))
    rc, _, err = _score(capsys, "--results", res, "--annotations", tmp_path / "other.json")
    assert rc == 2 and "BLIP's list" in err and "official VQA annotation file" in err
    (tmp_path / "q_other.json").write_text(json.dumps({"questions": [{"question_id": 1, "question": "?"}]}))
    rc, _, err = _score(capsys, "--results", res, "--annotations", ann, "--questions", tmp_path / "q_other.json")
    assert rc == 2 and "do not belong together" in err and "[2]" in err
    bad = tmp_path / "bad_ann.json"
    bad.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": ["red"] * 10}]}))
    rc, _, err = _score(capsys, "--results", res, "--annotations", bad)
    assert rc == 2 and "annotation 0: every entry of 'answers' needs a string 'answer'" in err

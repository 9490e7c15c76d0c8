"""VQA accuracy as the official VQA evaluation computes it (VQAv2's ``vqaEval.py``, which LAVIS reuses unchanged;
the paper's Table 4 reports it x100).

Per question, with the humans' answers ``g_1..g_n`` (n = 10 in VQAv2) and a predicted answer ``a``::

    acc(a) = 1/n * sum_i min(1, #{j != i : g_j == a} / 3)

i.e. ``min(#humans that said a / 3, 1)`` averaged over the n leave-one-human-out subsets.

**The official rules** (the default, ``normalize=False``) process the two sides differently:

* the prediction, always: newlines and tabs to spaces, stripped, :func:`process_punctuation` (marks removed, or
  turned into spaces between words; periods not before a digit removed) then :func:`process_digit_article`
  (lower-cased, number words to digits, articles dropped, contractions written without an apostrophe restored);
* the human answers: compared as written when all of them agree; when they disagree, after
  :func:`process_punctuation` only (no lower-casing, no digits, no articles, no stripping).

So against ten humans who all wrote ``"two"``, the prediction ``"two"`` (processed to ``"2"``) scores 0, and
against ten ``"the dog"`` the prediction ``"dog"`` scores 0: VQAv2's released answers are already normalised, which
is what the rules assume. Two further details of the script are reproduced: the period rule removes at most 32
periods (the script passes ``re.UNICODE``, 32, as the ``count`` argument), and the contraction table's four
capitalised keys never apply. One is not: with a single human answer the script scores every prediction 0 (no
human is left after leaving one out); here one answer scores 1 on a match, so one-answer sets (MSRVTT-QA) stay
meaningful. The script leaves out one answer *record* at a time; VQAv2's records carry distinct ``answer_id`` s,
so that is one human at a time, as here.

**``normalize=True``** (lenient, ``unitrans score vqa --normalize``, ``task.normalize_answers = true``) applies
the prediction's full processing to the human answers as well, for every question: ``"2"`` against ten
``"two"`` then scores 1. Use it for ground truths that were not normalised the VQAv2 way, and say so next to the
number.

No torch here: ``python -m unitrans score vqa`` stays light.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from unitrans.errors import UserError
from unitrans.metrics.files import coverage, json_id, read_json, read_results, unique_ids

KEYS = ("vqa_acc",)

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its period)
_PERIOD_COUNT = 32  # the official script's count argument (re.UNICODE == 32 passed positionally)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")  # "1,000": punctuation is then deleted, never spaced


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings -> the contraction: the official evaluation's table, entry for entry.

    Its four capitalised keys (``Im``, ``Ive``, ``Id've``, ``I'dve``) are kept as the script has them: answers are
    lower-cased before the look-up, so they never apply (``"im"`` stays ``"im"``).
    """
    pairs = """
    aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've
    couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've
    hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's
    howd how'd | howll how'll | hows how's | Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't
    itd it'd | itd've it'd've | it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't
    mightnt've mightn't've | mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've
    neednt needn't | notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at
    'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's | shouldve should've
    shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd
    somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll | somebodys somebody's
    someoned someone'd | someoned've someone'd've | someone'dve someone'd've | someonell someone'll
    someones someone's | somethingd something'd | somethingd've something'd've | something'dve something'd've
    somethingll something'll | thats that's | thered there'd | thered've there'd've | there'dve there'd've
    therere there're | theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll
    theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've
    werent weren't | whatll what'll | whatre what're | whats what's | whatve what've | whens when's
    whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've | who'dve who'd've
    wholl who'll | whos who's | whove who've | whyll why'll | whyre why're | whys why's | wont won't
    wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've | wouldn'tve wouldn't've | yall y'all
    yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've
    youd you'd | youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
    """
    words = pairs.replace("|", " ").split()  # key value key value ...
    return dict(zip(words[0::2], words[1::2]))


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """Removes punctuation as the official evaluation does.

    A mark next to a space (``"dog ,"``), or any mark in an answer with a digit-comma-digit group, is deleted;
    otherwise it becomes a space (``"black/white"`` -> ``"black white"``). Then the first 32 periods not followed
    by a digit are deleted (``"dog."`` -> ``"dog"``, ``"3.5"`` unchanged). Apostrophes and colons stay.
    """
    out = text
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if delete or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-cases, maps number words to digits, drops articles, restores contractions; single spaces."""
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def _basic(answer: str) -> str:
    """Newlines and tabs to spaces, stripped: what the script does to a prediction before anything else."""
    return str(answer).replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The official processing of a prediction: ``"Two."`` -> ``"2"``, ``"the dog"`` -> ``"dog"``."""
    return process_digit_article(process_punctuation(_basic(answer)))


def compared_answers(prediction: str, human_answers: Sequence[str], normalize: bool = False) -> tuple[str, list[str]]:
    """The prediction and the human answers as the accuracy compares them.

    Args:
        prediction: the model's answer, as written.
        human_answers: the humans' answers, as written.
        normalize: ``False``: the official rules (see the module); ``True``: every answer fully processed.

    Returns:
        ``(prediction, human answers)`` after processing.
    """
    if normalize:
        return normalize_answer(prediction), [normalize_answer(a) for a in human_answers]
    humans = [str(a) for a in human_answers]
    if len(set(humans)) > 1:
        humans = [process_punctuation(a) for a in humans]
    return normalize_answer(prediction), humans


def vqa_accuracy(prediction: str, human_answers: Sequence[str], normalize: bool = False) -> float:
    """Accuracy of one prediction in ``[0, 1]``: leave-one-out average of ``min(#matching humans / 3, 1)``.

    Args:
        prediction: the model's answer.
        human_answers: the humans' answers (10 in VQAv2; fewer are averaged the same way; one scores 1 on a match).
        normalize: ``False``: the official rules; ``True``: the lenient ones (see the module).

    Raises:
        ValueError: no human answers.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred, humans = compared_answers(prediction, human_answers, normalize)
    matches = sum(h == pred for h in humans)
    if len(humans) == 1:
        return float(matches)  # the script would score 0: nobody is left after leaving the one human out
    return sum(min(1.0, (matches - (h == pred)) / 3.0) for h in humans) / len(humans)


def exact_match(prediction: str, human_answers: Sequence[str], normalize: bool = False) -> bool:
    """Whether the prediction is the most common human answer (MSRVTT-QA's accuracy; first one wins a tie).

    ``normalize=False`` compares the answers as written (newlines, tabs and outer spaces aside), ``True`` after
    the full processing of both.
    """
    prep = normalize_answer if normalize else _basic
    majority = Counter(prep(a) for a in human_answers).most_common(1)[0][0]
    return prep(prediction) == majority


def vqa_metrics(results: Mapping[Any, str], annotations: Mapping[Any, Sequence[str]],
                normalize: bool = False) -> dict[str, float]:
    """Mean VQA accuracy (x100, as Table 4 reports it) over the questions of ``results`` that have answers.

    Args:
        results: question id -> predicted answer.
        annotations: question id -> human answers; questions without answers (VQAv2 test-dev) are not scored.
        normalize: ``False``: the official rules; ``True``: the lenient ones (see the module).

    Returns:
        ``{"vqa_acc": ..., "acc": ..., "n_scored": ...}``; ``acc`` is exact-match accuracy against the most
        common human answer (:func:`exact_match`), the metric of MSRVTT-QA and other one-answer video QA sets.

    Raises:
        UserError: no result has human answers.
    """
    scored = [q for q in results if annotations.get(q)]
    if not scored:
        raise UserError("VQA metrics: no question of the results has human answers to score against "
                        "(test-dev / test-std results are scored by the evaluation server)")
    acc = sum(vqa_accuracy(results[q], annotations[q], normalize) for q in scored) / len(scored)
    exact = sum(exact_match(results[q], annotations[q], normalize) for q in scored)
    return {"vqa_acc": 100.0 * acc, "acc": 100.0 * exact / len(scored), "n_scored": float(len(scored))}


def per_answer_type(results: Mapping[Any, str], annotations: Mapping[Any, Sequence[str]],
                    answer_types: Mapping[Any, str], normalize: bool = False) -> dict[str, float]:
    """``vqa_acc`` (x100) per answer type (``yes/no``, ``number``, ``other`` in VQAv2), as the official script
    reports it; over the scored questions that have a type."""
    groups: dict[str, list[float]] = {}
    for q, pred in results.items():
        if annotations.get(q) and q in answer_types:
            groups.setdefault(answer_types[q], []).append(vqa_accuracy(pred, annotations[q], normalize))
    return {t: 100.0 * sum(v) / len(v) for t, v in sorted(groups.items())}


# ---- files ---------------------------------------------------------------------------------------------------
LAYOUTS = ("BLIP's list [{\"question_id\", \"answer\": [...]}, ...] (vqa_val.json, vqa_test.json), or the official "
           "VQA annotation file {\"annotations\": [{\"question_id\", \"answers\": [{\"answer\"}, ...]}, ...]} "
           "(v2_mscoco_val2014_annotations.json)")


@dataclass
class GroundTruth:
    """Human answers by question id, and each question's answer type where the file gives one."""

    answers: dict[Any, list[str]] = field(default_factory=dict)
    answer_types: dict[Any, str] = field(default_factory=dict)

    @property
    def n_answered(self) -> int:
        """Questions with at least one human answer (what a full results file is scored on)."""
        return sum(1 for a in self.answers.values() if a)


def read_vqa_results(path: str | Path) -> dict[Any, str]:
    """``[{"question_id", "answer"}, ...]`` (``vqa_result_<split>.json``, the server's format) -> id -> answer.

    Raises:
        UserError: not a list of such entries, or a question answered twice (named).
    """
    return read_results(path, "VQA results file", "question_id", "answer")


def _blip_ground_truth(path: str | Path, entries: list) -> GroundTruth:
    """BLIP's VQA json: ``answer`` is a list of strings (or one string); test files have none."""
    gt = GroundTruth()
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "question_id" not in e:
            raise UserError(f"{path}: entry {i} needs 'question_id'")
        answers = e.get("answer", [])
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise UserError(f"{path}: entry {i} key 'answer' must be a list of strings")
        gt.answers[json_id(e["question_id"])] = answers
    return gt


def _official_ground_truth(path: str | Path, annotations: list) -> GroundTruth:
    """The official annotation file's ``annotations``: ``answers`` is a list of ``{"answer", ...}`` records."""
    gt = GroundTruth()
    for i, a in enumerate(annotations):
        if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("answers"), list):
            raise UserError(f"{path}: annotation {i} needs 'question_id' and an 'answers' list")
        records = a["answers"]
        if not all(isinstance(r, dict) and isinstance(r.get("answer"), str) for r in records):
            raise UserError(f"{path}: annotation {i}: every entry of 'answers' needs a string 'answer'")
        q = json_id(a["question_id"])
        gt.answers[q] = [r["answer"] for r in records]
        if isinstance(a.get("answer_type"), str):
            gt.answer_types[q] = a["answer_type"]
    return gt


def read_vqa_ground_truth(path: str | Path) -> GroundTruth:
    """Human answers from either layout of :data:`LAYOUTS` (found from the file's shape).

    Raises:
        UserError: the file is neither (a questions file is named as such), or an entry is malformed.
    """
    data = read_json(path, "VQA annotation file")
    if isinstance(data, list):
        return _blip_ground_truth(path, data)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return _official_ground_truth(path, data["annotations"])
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        raise UserError(f"{path} is a VQA questions file (no answers): pass the matching annotations file "
                        "(..._annotations.json) as --annotations, and this one as --questions")
    raise UserError(f"{path}: not a VQA annotation file; read are {LAYOUTS}")


def read_vqa_annotations(path: str | Path) -> dict[Any, list[str]]:
    """Question id -> human answers, from either layout (see :func:`read_vqa_ground_truth`)."""
    return read_vqa_ground_truth(path).answers


def read_vqa_questions(path: str | Path) -> set:
    """The question ids of an official questions file (``{"questions": [{"question_id", ...}, ...]}``)."""
    data = read_json(path, "VQA questions file")
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list) or not all(isinstance(q, dict) and "question_id" in q for q in questions):
        raise UserError(f"{path}: expected the official questions file, {{\"questions\": [{{\"question_id\", "
                        "\"question\", ...}, ...]}} (v2_OpenEnded_mscoco_val2014_questions.json)")
    return {json_id(q["question_id"]) for q in questions}


def _check_ids(results: Mapping[Any, str], gt: GroundTruth, paths: tuple, questions: set | None) -> None:
    """Every answered question must be in the annotations (and in the questions file, when one is given)."""
    res_path, ann_path, q_path = paths
    missing = [q for q in results if q not in gt.answers]
    if missing:
        raise UserError(f"{res_path}: {len(missing)} question id(s) are not in {ann_path}, e.g. {missing[:5]}")
    if questions is not None:
        unknown = [q for q in gt.answers if q not in questions]
        if unknown:
            raise UserError(f"{ann_path} and {q_path} do not belong together: {len(unknown)} annotated question "
                            f"id(s) are not in the questions file, e.g. {unknown[:5]}")


def score_files(results: str | Path, annotations: str | Path, questions: str | Path | None = None,
                normalize: bool = False) -> dict[str, Any]:
    """``vqa_acc`` of a results file against a ground truth in either layout (``unitrans score vqa``).

    Args:
        results: ``[{"question_id", "answer"}, ...]``.
        annotations: BLIP's VQA json or the official annotation file (:data:`LAYOUTS`).
        questions: the official questions file, checked against the annotations (optional).
        normalize: ``False``: the official rules; ``True``: the lenient ones (see the module).

    Returns:
        :func:`vqa_metrics`'s keys, ``n_total`` (annotated questions) and ``coverage`` (``n_scored / n_total``),
        ``per_answer_type`` where the annotations give types, and ``rules`` (``official`` or ``normalized``).
    """
    res = read_vqa_results(results)
    gt = read_vqa_ground_truth(annotations)
    _check_ids(res, gt, (results, annotations, questions),
               None if questions is None else read_vqa_questions(questions))
    metrics: dict[str, Any] = vqa_metrics(res, gt.answers, normalize)
    metrics.update(coverage(int(metrics["n_scored"]), gt.n_answered))
    if gt.answer_types:
        metrics["per_answer_type"] = per_answer_type(res, gt.answers, gt.answer_types, normalize)
    metrics["rules"] = "normalized" if normalize else "official"
    return metrics

"""VQA accuracy as the official VQA evaluation computes it (VQAv2; the paper's Table 4 reports it x100).

Per question, with the humans' answers ``g_1..g_n`` (n = 10 in VQAv2) and a predicted answer ``a``::

    acc(a) = 1/n * sum_i min(1, #{j != i : g_j == a} / 3)

i.e. ``min(#humans that said a / 3, 1)`` averaged over the n leave-one-human-out subsets. Fewer than 10 answers
use the same formula over what there is. Answers are compared after the official normalisation: newlines / tabs
to spaces; punctuation removed (or turned into a space when it separates words); a period removed unless a
digit follows; lower-cased; number words to digits (``"two"`` -> ``"2"``); articles (a, an, the) dropped;
contractions written without an apostrophe restored (``"isnt"`` -> ``"isn't"``).

The official script normalises only the questions whose human answers disagree (the ground truth of VQAv2 is
already normalised, so this only matters for unnormalised predictions). ``normalize="always"`` (default) applies
the normalisation to every question; ``normalize="official"`` reproduces the script exactly.

No torch here: ``python -m unitrans score vqa`` stays light.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from unitrans.errors import UserError

KEYS = ("vqa_acc",)

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its period)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")  # "1,000": punctuation is then deleted, never spaced


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings -> the contraction (the table of the official evaluation)."""
    pairs = """
    aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've
    couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've
    hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's
    howd how'd | howll how'll | hows how's | id've i'd've | i'dve i'd've | im i'm | ive i've | isnt isn't
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
    otherwise it becomes a space (``"black/white"`` -> ``"black white"``). Periods not followed by a digit are
    deleted (``"dog."`` -> ``"dog"``, ``"3.5"`` unchanged).
    """
    out = text
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if delete or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """Lower-cases, maps number words to digits, drops articles, restores contractions; single spaces."""
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The official normalisation of one answer: ``"Two."`` -> ``"2"``, ``"the dog"`` -> ``"dog"``."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _basic(answer: str) -> str:
    return str(answer).replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, human_answers: Sequence[str],
                 normalize: Literal["always", "official"] = "always") -> float:
    """Accuracy of one prediction in ``[0, 1]``: leave-one-out average of ``min(#matching humans / 3, 1)``.

    Args:
        prediction: the model's answer.
        human_answers: the humans' answers (10 in VQAv2; fewer are averaged the same way).
        normalize: ``"always"`` normalises every answer; ``"official"`` only when the humans disagree, exactly as
            the official script.

    Raises:
        ValueError: no human answers.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    gts = [_basic(a) for a in human_answers]
    pred = _basic(prediction)
    if normalize == "always" or len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    n = len(gts)
    matches = sum(g == pred for g in gts)
    if n == 1:
        return float(matches)  # nothing to leave out
    total = 0.0
    for g in gts:  # leave human i out: the others that match
        total += min(1.0, (matches - (g == pred)) / 3.0)
    return total / n


def vqa_metrics(results: Mapping[Any, str], annotations: Mapping[Any, Sequence[str]],
                normalize: Literal["always", "official"] = "always") -> dict[str, float]:
    """Mean VQA accuracy (x100, as Table 4 reports it) over the questions of ``results`` that have answers.

    Args:
        results: question id -> predicted answer.
        annotations: question id -> human answers; questions without answers (VQAv2 test-dev) are not scored.
        normalize: see :func:`vqa_accuracy`.

    Returns:
        ``{"vqa_acc": ..., "acc": ..., "n_scored": ...}``; ``acc`` is exact-match accuracy against the most
        common human answer (after normalisation), the metric of MSRVTT-QA and other one-answer video QA sets.

    Raises:
        UserError: no result has human answers.
    """
    from collections import Counter

    scored = [q for q in results if annotations.get(q)]
    if not scored:
        raise UserError("VQA metrics: no question of the results has human answers to score against "
                        "(test-dev / test-std results are scored by the evaluation server)")
    acc = sum(vqa_accuracy(results[q], annotations[q], normalize) for q in scored) / len(scored)
    exact = 0
    for q in scored:
        majority = Counter(normalize_answer(_basic(a)) for a in annotations[q]).most_common(1)[0][0]
        exact += normalize_answer(_basic(results[q])) == majority
    return {"vqa_acc": 100.0 * acc, "acc": 100.0 * exact / len(scored), "n_scored": float(len(scored))}


# ---- files ---------------------------------------------------------------------------------------------------
def _read_list(path: str | Path, what: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: malformed JSON: {exc}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


def _qid(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def read_vqa_results(path: str | Path) -> dict[Any, str]:
    """``[{"question_id", "answer"}, ...]`` (``vqa_result_<split>.json``, the server's format) -> id -> answer."""
    out = {}
    for i, r in enumerate(_read_list(path, "VQA results file")):
        if not isinstance(r, dict) or "question_id" not in r or not isinstance(r.get("answer"), str):
            raise UserError(f"{path}: entry {i} needs 'question_id' and a string 'answer'")
        out[_qid(r["question_id"])] = r["answer"]
    return out


def read_vqa_annotations(path: str | Path) -> dict[Any, list[str]]:
    """BLIP's VQA json (``[{"question_id", "question", "answer": [...], ...}]``) -> question id -> answers."""
    out = {}
    for i, e in enumerate(_read_list(path, "VQA annotation file")):
        if not isinstance(e, dict) or "question_id" not in e:
            raise UserError(f"{path}: entry {i} needs 'question_id'")
        answers = e.get("answer", [])
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise UserError(f"{path}: entry {i} key 'answer' must be a list of strings")
        out[_qid(e["question_id"])] = answers
    return out


def score_files(results: str | Path, annotations: str | Path,
                normalize: Literal["always", "official"] = "always") -> dict[str, float]:
    """``vqa_acc`` of a results file against BLIP-format annotations (``unitrans score vqa``)."""
    res = read_vqa_results(results)
    missing = [q for q in res if q not in (anns := read_vqa_annotations(annotations))]
    if missing:
        raise UserError(f"{results}: {len(missing)} question id(s) are not in {annotations}, e.g. {missing[:5]}")
    return vqa_metrics(res, anns, normalize)

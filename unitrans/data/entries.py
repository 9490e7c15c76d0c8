"""Annotation files, read once and checked once, for every format (no torch, PIL or numpy: ``validate`` uses it).

Every dataset of :mod:`unitrans.data` is a list of :class:`Record` (one media file, optional start / end times,
and the item's other fields) plus the attributes a task reads (``texts``, ``img2txt``, ``references``, ...). This
module turns an annotation file into that list:

* :func:`read_json` / :func:`read_entries`: the one reader of a JSON file (missing, unreadable, malformed and
  wrongly shaped files all become a :class:`DataError` naming the file); :func:`read_entries` also reads the
  common downloads -- the Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``) and COCO's own
  ``captions_*.json`` -- as BLIP-format entries (see :mod:`unitrans.data.layouts`).
* :func:`pairs_train`, :func:`pairs_eval`, :func:`caption_eval`, :func:`questions`: the four formats (image or
  video, ``media_key``), each entry checked with :func:`require`.

Relative media paths are joined to the media root; nothing is opened here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from unitrans.errors import DataError

log = logging.getLogger("unitrans.data")

_CAPTION_PUNCT = re.compile(r"[.!\"()*#:;~\-/]")
_QUESTION_PUNCT = re.compile(r"[.!\"()*#:;~]")
VG_WEIGHT = 0.2  # BLIP's weight of a Visual Genome answer
N_AGREEING = 10  # a single-answer eval question counts as 10 agreeing annotators: VQA accuracy is exact match


def pre_caption(text: str, max_words: int = 30) -> str:
    """BLIP's caption cleaning: lower-case, each of ``. ! " ( ) * # : ; ~ - /`` -> space, first ``max_words``."""
    return " ".join(_CAPTION_PUNCT.sub(" ", text.lower()).split()[:max_words])


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's question cleaning: lower-case, drop ``. ! " ( ) * # : ; ~``, keep the first ``max_words`` words."""
    words = _QUESTION_PUNCT.sub("", question.lower()).rstrip().split(" ")
    return " ".join(words[:max_words])


@dataclass
class Record:
    """One item: its media file (absolute path), the part of it to use (seconds) and the item's other fields."""

    media: str
    fields: dict[str, Any]
    start: float | None = None
    end: float | None = None


@dataclass
class Parsed:
    """An annotation file read into records, plus the dataset attributes a task reads (``texts``, ...)."""

    file: Path
    records: list[Record]
    attrs: dict[str, Any] = field(default_factory=dict)


# ---- reading ---------------------------------------------------------------------------------------------------
def read_json(path: str | Path, what: str = "annotation file") -> Any:
    """The parsed JSON of ``path``. Raises :class:`DataError` (naming the file) when missing or malformed."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_entries(path: str | Path, slot: str = "train", root: Path | None = None) -> list[dict[str, Any]]:
    """The entries of an annotation file: a JSON list of objects, or a Karpathy / COCO captions file as BLIP entries.

    Args:
        path: the file.
        slot: ``train`` (one entry per caption) or ``val`` / ``test`` (one per image): which split of a
            Karpathy file to take, and which BLIP layout to produce from a Karpathy or COCO file.
        root: the image folder (a COCO file's images may sit in its ``<split>2014`` sub-folder).

    Raises:
        DataError: missing / malformed file, or neither a list of objects nor a known layout.
    """
    from unitrans.data.layouts import as_blip_entries

    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict):
        data = as_blip_entries(path, data, slot, root)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries (or a Karpathy dataset_*.json / COCO "
                        f"captions_*.json file), got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is a {type(entry).__name__}, expected an object")
    return data


def require(path: Path, i: int, entry: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    """``entry[key]``, checked to be of ``types`` (never a bool); a :class:`DataError` names file, entry and key."""
    if key not in entry:
        raise DataError(f"{path}: entry {i} lacks key '{key}' (has: {', '.join(sorted(entry)) or 'nothing'})")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(f"{path}: entry {i} key '{key}' has type {type(value).__name__}")
    return value


def check_dir(path: str | Path, what: str = "image_root") -> Path:
    """``path`` as a Path; :class:`DataError` when it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} is not a directory: {path}")
    return path


def times_of(path: Path, i: int, entry: dict[str, Any]) -> tuple[float | None, float | None]:
    """``(start, end)`` in seconds from ``start`` / ``end`` or ``times: [start, end]``; ``None`` where absent."""
    if "times" in entry:
        t = entry["times"]
        if (not isinstance(t, (list, tuple)) or len(t) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in t)):
            raise DataError(f"{path}: entry {i} key 'times' must be [start, end] in seconds, got {t!r}")
        start, end = float(t[0]), float(t[1])
    else:
        start, end = entry.get("start"), entry.get("end")
        for key, v in (("start", start), ("end", end)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise DataError(f"{path}: entry {i} key '{key}' must be a number of seconds, got {v!r}")
        start = None if start is None else float(start)
        end = None if end is None else float(end)
    if start is not None and end is not None and end <= start:
        raise DataError(f"{path}: entry {i}: end time {end} is not after start time {start}")
    return start, end


def _id(value: Any) -> Any:
    """An id as written, or None when it is not a usable one (a string of digits becomes an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return int(value) if isinstance(value, str) and value.isdigit() else value


def _media(path: Path, i: int, entry: dict[str, Any], key: str, root: Path) -> tuple[str, float | None, float | None]:
    rel = require(path, i, entry, key, str)
    start, end = times_of(path, i, entry) if key == "video" else (None, None)
    return str(root / rel), start, end


def _captions(path: Path, i: int, entry: dict[str, Any]) -> list[str]:
    captions = require(path, i, entry, "caption", (str, list))
    captions = [captions] if isinstance(captions, str) else captions
    if not captions or not all(isinstance(c, str) for c in captions):
        raise DataError(f"{path}: entry {i} key 'caption' must be a string or a non-empty list of strings")
    return captions


# ---- the formats -----------------------------------------------------------------------------------------------
def pairs_train(path: Path, root: Path, max_words: int, media_key: str = "image") -> Parsed:
    """Train pairs, one entry per caption: ``{image|video, caption, image_id?}`` -> fields ``caption, image_id``.

    Captions of one image are contrastive positives: entries are grouped by ``image_id`` (or ``video_id``) when
    given, else by the media file (and its times). ``image_id`` in the fields is the group's index.
    """
    records, image_ids = [], {}
    for i, e in enumerate(read_entries(path, "train", root)):
        media, start, end = _media(path, i, e, media_key, root)
        caption = require(path, i, e, "caption", str)
        raw = _id(e.get("image_id", e.get("video_id")))
        key = raw if raw is not None else (media, start, end)
        idx = image_ids.setdefault(key, len(image_ids))
        records.append(Record(media, {"caption": pre_caption(caption, max_words), "image_id": idx}, start, end))
    return Parsed(path, records, {"image_ids": image_ids})


def _merged(path: Path, root: Path, media_key: str, need_captions: bool = True, slot: str = "test") -> list[tuple]:
    """Eval entries grouped by media (and times), as ``(media, start, end, captions, first entry)``: a file with
    one entry per caption (a train file) becomes one entry per image, with a warning."""
    entries = read_entries(path, slot, root)
    groups: dict[tuple, tuple] = {}
    for i, e in enumerate(entries):
        media, start, end = _media(path, i, e, media_key, root)
        group = groups.setdefault((media, start, end), (media, start, end, [], e))
        own = _captions(path, i, e) if need_captions or e.get("caption") else []
        group[3].extend(c for c in own if c not in group[3])
    if len(entries) > len(groups):
        log.warning("%s: %d entries for %d %ss: entries naming the same %s (one per caption, as a train file has) "
                    "were merged, so copies of one %s are not each other's negatives", path, len(entries),
                    len(groups), media_key, media_key, media_key)
    return list(groups.values())


def pairs_eval(path: Path, root: Path, max_words: int, media_key: str = "image", slot: str = "test") -> Parsed:
    """Eval pairs, one entry per image with its captions (``caption``: a list or a string).

    Attributes: ``images`` (one path per image), ``times``, ``texts`` (every caption, cleaned, image by image),
    ``txt2img`` and ``img2txt`` (the ground truth both ways). Fields: ``index``. ``slot``: the split of a
    Karpathy file to read (``val`` or ``test``).
    """
    records, texts, txt2img, img2txt = [], [], [], []
    for k, (media, start, end, captions, _) in enumerate(_merged(path, root, media_key, slot=slot)):
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        texts += [pre_caption(c, max_words) for c in captions]
        txt2img += [k] * len(captions)
        records.append(Record(media, {"index": k}, start, end))
    return Parsed(path, records, {"images": [r.media for r in records], "texts": texts, "txt2img": txt2img,
                                  "img2txt": img2txt})


def image_id_from_path(path: str) -> int:
    """BLIP's eval image id: ``".../COCO_val2014_000000391895.jpg"`` -> ``391895``.

    Raises:
        ValueError: the file name does not end in ``_<digits>``.
    """
    tail = Path(path).stem.rsplit("_", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"image file name '{Path(path).name}' does not end in _<number> (e.g. "
                         "COCO_val2014_000000391895.jpg), so it gives no image id")
    return int(tail)


def _caption_id(path: Path, i: int, entry: dict[str, Any], has_gt: bool) -> int:
    """An eval image's integer id: its ``image_id`` (a number), else the number ending its file name (COCO),
    else (no ground-truth file to match) its position in the file."""
    raw = _id(entry.get("image_id"))
    if isinstance(raw, int):
        return raw
    try:
        return image_id_from_path(entry["image"])
    except ValueError as exc:
        if has_gt:
            raise DataError(f"{path}: entry {i}: {exc}, and the entry has no numeric 'image_id'; add "
                            "\"image_id\": <the id of this image in the ground-truth file> to each entry") from None
    return i


def caption_eval(path: Path, root: Path, gt_file: Path | None = None, slot: str = "test") -> Parsed:
    """Captioning eval, one entry per image: fields ``image_id`` (int); attrs ``images``, ``image_ids``,
    ``references`` (id -> reference captions: the ground-truth file's, else the entry's own)."""
    from unitrans.data.layouts import read_coco_gt

    records, own = [], {}
    for k, (media, _, _, captions, entry) in enumerate(_merged(path, root, "image", False, slot)):
        image_id = _caption_id(path, k, entry, gt_file is not None)
        if image_id in own:
            raise DataError(f"{path}: entry {k}: image id {image_id} is also the id of another image; give each "
                            "image its own \"image_id\"")
        own[image_id] = captions
        records.append(Record(media, {"image_id": image_id}))
    ids = [r.fields["image_id"] for r in records]
    if gt_file is None:
        empty = [k for k, v in own.items() if not v]
        if empty:
            raise DataError(f"{path}: {len(empty)} image(s) have no caption to use as reference (e.g. id "
                            f"{empty[0]}); give a COCO-format ground-truth file")
        refs = own
    else:
        gt = read_coco_gt(gt_file)
        missing = [k for k in ids if not gt.get(k)]
        if missing:
            raise DataError(f"{gt_file}: no caption for {len(missing)} image id(s) of {path.name}, e.g. {missing[:5]}")
        refs = {k: gt[k] for k in ids}
    return Parsed(path, records, {"images": [r.media for r in records], "image_ids": ids, "references": refs})


def _answers(path: Path, i: int, entry: dict[str, Any]) -> list[str]:
    answers = entry.get("answer", [])
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{path}: entry {i} key 'answer' must be a string or a list of strings")
    return answers


def answer_weights(answers: Sequence[str], dataset: str = "vqa") -> tuple[list[str], list[float]]:
    """Distinct answers (first-seen order) with the fraction of humans that gave each; ``vg``: weight 0.2."""
    if dataset == "vg":
        return [answers[0]], [VG_WEIGHT]
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1.0 / len(answers)
    return list(weights), list(weights.values())


def _question(path: Path, i: int, e: dict, roots: dict[str, Path | None], media_key: str, max_words: int,
              train: bool) -> Record:
    """One question entry as a train or eval record (see :func:`questions`)."""
    source = e.get("dataset", "vqa")
    if source not in roots:
        raise DataError(f"{path}: entry {i} key 'dataset' is '{source}'; expected 'vqa' or 'vg'")
    media, start, end = _media(path, i, e, media_key, roots[source] or roots["vqa"])
    question = pre_question(require(path, i, e, "question", str), max_words)
    answers = _answers(path, i, e)
    if train:
        if not answers:
            raise DataError(f"{path}: entry {i} has no answer to train on")
        answers, weights = answer_weights(answers, source)
        return Record(media, {"question": question, "answers": answers, "weights": weights}, start, end)
    qid = e.get("question_id", i)  # kept as written: the results file names questions by it
    if _id(qid) is None:
        raise DataError(f"{path}: entry {i} key 'question_id' has type {type(qid).__name__}")
    human = answers * N_AGREEING if len(answers) == 1 else answers
    return Record(media, {"question": question, "question_id": qid, "answers": human}, start, end)


def questions(paths: Sequence[Path], roots: dict[str, Path | None], max_words: int, train: bool,
              media_key: str = "image") -> Parsed:
    """VQA / video QA questions: ``{question_id, question, answer: [...] or "...", image|video, dataset?}``.

    ``dataset`` is ``"vqa"`` (media under ``roots["vqa"]``) or ``"vg"`` (Visual Genome: ``roots["vg"]``, one answer
    of weight 0.2). Train fields: ``question, answers, weights`` (each distinct answer with the fraction of humans
    who gave it); eval fields: ``question, question_id, answers`` (a single answer counts as ten agreeing humans).
    """
    records = []
    for path in paths:
        seen = set()
        for i, e in enumerate(read_entries(path)):
            rec = _question(path, i, e, roots, media_key, max_words, train)
            if not train:
                if rec.fields["question_id"] in seen:
                    raise DataError(f"{path}: entry {i}: question_id {rec.fields['question_id']!r} appears twice")
                seen.add(rec.fields["question_id"])
            records.append(rec)
    return Parsed(paths[0] if len(paths) == 1 else Path(", ".join(map(str, paths))), records)


def read_answer_list(path: str | Path) -> list[str]:
    """Candidate answers: BLIP's ``answer_list.json`` (a list) or LAVIS's ``{answer: label}`` (ordered by label).

    Raises:
        DataError: missing / malformed file, or neither a non-empty list of strings nor such a mapping.
    """
    data = read_json(path, "answer list file")
    if isinstance(data, dict):
        data = [a for a, _ in sorted(data.items(), key=lambda kv: (kv[1], kv[0]))]
    if not isinstance(data, list) or not data or not all(isinstance(a, str) for a in data):
        raise DataError(f"{path}: expected a non-empty JSON list of answers or an {{answer: label}} object")
    return data

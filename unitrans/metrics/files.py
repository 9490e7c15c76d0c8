"""Reading the results and ground-truth files that ``unitrans score`` takes (shared by caption and VQA).

No torch here: ``python -m unitrans score`` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from unitrans.errors import UserError


def read_json(path: str | Path, what: str) -> Any:
    """The parsed JSON of ``path``.

    Raises:
        UserError: the file is missing or is not UTF-8 JSON (the message names the file and ``what`` it is).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: malformed JSON: {exc}") from None


def json_id(value: Any) -> Any:
    """COCO / VQA ids are ints; ``"391895"`` and ``391895`` name the same item."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def unique_ids(path: str | Path, ids: Iterable[Any], key: str) -> None:
    """Refuses a results file that answers one item twice (the evaluation would keep one answer silently).

    Args:
        path: the results file (named in the message).
        ids: the ids of its entries, in file order.
        key: the id's field name (``question_id``, ``image_id``).

    Raises:
        UserError: naming the first repeated id and the two entries that hold it.
    """
    first: dict[Any, int] = {}
    for i, item in enumerate(ids):
        if item in first:
            raise UserError(f"{path}: {key} {item!r} appears twice (entries {first[item]} and {i}); a results file "
                            f"holds one answer per {key.removesuffix('_id')}")
        first[item] = i


def read_results(path: str | Path, what: str, key: str, value: str) -> dict[Any, str]:
    """A results file ``[{key: id, value: "text"}, ...]`` -> ``{id: text}`` (ids as :func:`json_id` reads them).

    Raises:
        UserError: missing or malformed, not a list of such entries, or an id answered twice (named).
    """
    data = read_json(path, what)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{\"{key}\", \"{value}\"}} objects, got "
                        f"{type(data).__name__}")
    for i, r in enumerate(data):
        if not isinstance(r, dict) or key not in r or not isinstance(r.get(value), str):
            raise UserError(f"{path}: entry {i} needs '{key}' and a string '{value}'")
    ids = [json_id(r[key]) for r in data]
    unique_ids(path, ids, key)
    return {i: r[value] for i, r in zip(ids, data)}


def coverage(n_scored: int, n_total: int) -> dict[str, float]:
    """``{"n_scored", "n_total", "coverage"}``: how many of the ground truth's items the results answered."""
    return {"n_scored": float(n_scored), "n_total": float(n_total),
            "coverage": n_scored / n_total if n_total else 0.0}


def coverage_warning(metrics: dict, what: str) -> str | None:
    """A one-line warning when a results file answers only part of the ground truth, else ``None``.

    Args:
        metrics: a ``score_files`` result (``n_scored``, ``n_total``, ``coverage``).
        what: what the items are (``questions``, ``images``).
    """
    if metrics.get("coverage", 1.0) >= 1.0:
        return None
    scored, total = int(metrics["n_scored"]), int(metrics["n_total"])
    return (f"warning: the results cover {scored} of the {total} {what} of the ground truth "
            f"({100.0 * metrics['coverage']:.1f}%); the scores are over those {scored} only and are not "
            "comparable with scores over the whole split")

"""Captioning metrics as the paper reports them: BLEU-4 and CIDEr(-D), x100 (Table 5: B@4 39.2, C 132.3).

Scoring goes through ``pycocoevalcap``'s own ``Bleu(4)`` and ``Cider()`` scorers (pure Python). The COCO caption
evaluation tokenizes with the Stanford PTB tokenizer, which needs Java; this module uses a built-in tokenizer
instead: lower-case, split on every run of characters that are not letters or digits, join with single spaces.
On COCO it removes the same punctuation PTBTokenizer removes; it differs only on contractions and hyphenated
words (``"don't"`` -> ``don t``), so numbers can differ from the Java pipeline in the last digit.

No torch here: ``python -m unitrans score caption`` stays light.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from unitrans.errors import UserError
from unitrans.metrics.files import coverage, json_id, read_json, read_results, unique_ids

_WORD = re.compile(r"[^\W_]+", re.UNICODE)  # runs of letters / digits (any script)
KEYS = ("bleu4", "cider")


def tokenize(text: str) -> str:
    """``"A man, riding a horse."`` -> ``"a man riding a horse"`` (lower-case, split on non-alphanumerics)."""
    return " ".join(_WORD.findall(str(text).lower()))


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "caption metrics need pycocoevalcap: pip install 'unitrans[eval]' (or pip install pycocoevalcap)",
            name="pycocoevalcap",
        ) from exc
    return Bleu, Cider


def caption_metrics(results: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr-D of generated captions, in the paper's x100 convention.

    Args:
        results: image id -> generated caption (raw text).
        references: image id -> reference captions (raw text); every id of ``results`` must have references.
            References of images without a result are ignored (CIDEr's document frequencies, like the COCO
            evaluation, are taken over the scored images only).

    Returns:
        ``{"bleu4": ..., "cider": ...}`` (e.g. 39.2 and 132.3 for the paper's COCO Karpathy test row).

    Raises:
        UserError: a result without references, or no results at all.
    """
    if not results:
        raise UserError("caption metrics: no generated captions to score")
    missing = [k for k in results if k not in references or not references[k]]
    if missing:
        raise UserError(f"caption metrics: {len(missing)} image id(s) have a caption but no reference, "
                        f"e.g. {missing[:5]}")
    Bleu, Cider = _scorers()
    ids = sorted(results, key=str)
    gts = {i: [tokenize(r) for r in references[i]] for i in ids}
    res = {i: [tokenize(results[i])] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": 100.0 * float(bleu[3]), "cider": 100.0 * float(cider)}


# ---- files ---------------------------------------------------------------------------------------------------
def read_coco_references(path: str | Path) -> dict[Any, list[str]]:
    """COCO-format ground truth (``{"annotations": [{"image_id", "caption"}, ...], "images": [...]}``) ->
    image id -> reference captions.

    Raises:
        UserError: missing file, malformed JSON, no ``annotations`` list, an annotation without the two keys.
    """
    data = read_json(path, "caption annotation file")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise UserError(f"{path}: expected a COCO caption file with an 'annotations' list "
                        "(e.g. BLIP's coco_karpathy_test_gt.json)")
    refs: dict[Any, list[str]] = {}
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise UserError(f"{path}: annotation {i} needs 'image_id' and a string 'caption'")
        refs.setdefault(json_id(a["image_id"]), []).append(a["caption"])
    return refs


def read_caption_results(path: str | Path) -> dict[Any, str]:
    """A results file (``[{"image_id", "caption"}, ...]``, as ``captions_<split>.json``) -> image id -> caption.

    Raises:
        UserError: not a list of such entries, or an image captioned twice (named; the COCO evaluation refuses
            it too).
    """
    return read_results(path, "caption results file", "image_id", "caption")


def score_files(results: str | Path, annotations: str | Path) -> dict[str, float]:
    """``bleu4`` / ``cider`` of a results file against a COCO-format ground truth (``unitrans score caption``).

    Returns:
        :func:`caption_metrics`'s keys, ``n_images`` (captioned), ``n_total`` (images of the ground truth) and
        ``coverage`` (``n_scored / n_total``).
    """
    res = read_caption_results(results)
    refs = read_coco_references(annotations)
    return {**caption_metrics(res, refs), "n_images": len(res), **coverage(len(res), len(refs))}

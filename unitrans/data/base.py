"""The one dataset every format uses: records (from :mod:`unitrans.data.entries`) served through a media reader.

* **Seeded items.** A training item's randomness (crop, flip, RandAugment, video frames) comes from
  ``random.Random(f"{seed}:{epoch}:{index}")``: the same on any number of processes or loader workers, in any
  order, and after a resume. The engine calls :meth:`MediaDataset.set_epoch` before each epoch.
* **Unreadable media** (``on_error``): ``"raise"`` a :class:`DataError` naming the file, or ``"skip"``: count it in
  ``dataset.skipped`` (shared with forked loader workers), log each file once, and serve a training item's next
  readable neighbour (drawn with the same generator, so still deterministic) or, in evaluation, a blank (mid-grey)
  image so the index maps stay aligned.
* :func:`media_preflight`: what a builder reports before any model is built (files exist and parse, splits are not
  empty, media exist; ``deep``: every media file opened once, with a progress bar).

No torch here: ``validate`` runs the pre-flight without it.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
from pathlib import Path
from typing import Any, Callable

from unitrans.data.entries import Parsed, Record
from unitrans.errors import DataError
from unitrans.interfaces import Preflight

log = logging.getLogger("unitrans.data")
ON_ERROR = ("raise", "skip")


class MediaError(DataError):
    """An image or video that cannot be read. Raised in a data-loader worker, torch re-creates it in the main
    process from ``"Caught MediaError in DataLoader worker ... Original Traceback ..."``: the message is cut back
    to the file's own line, so the error a user sees still starts with the file."""

    def __init__(self, message: str):
        name = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and name in message:
            message = message.rsplit(name, 1)[1].strip().splitlines()[0]
        super().__init__(message)


class MediaReader:
    """Loads the media of one record (an image, or a video's sampled frames) under an ``on_error`` policy.

    Subclasses define ``kind``, :meth:`load` and :meth:`blank`.
    """

    kind = "media"

    def __init__(self, on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self._skipped = multiprocessing.Value("i", 0)  # inherited by forked workers: one count for the run
        self._warned: set[str] = set()

    @property
    def skipped(self) -> int:
        """Items skipped so far (all processes forked from this one)."""
        return int(self._skipped.value)

    def load(self, path: str, start: float | None, end: float | None, rng: random.Random | None) -> Any:
        raise NotImplementedError

    def blank(self) -> Any:
        raise NotImplementedError

    def note_skip(self, path: str, exc: Exception) -> None:
        """Counts a skipped item and logs its file once (per process)."""
        with self._skipped.get_lock():
            self._skipped.value += 1
        if str(path) not in self._warned:
            self._warned.add(str(path))
            log.warning("skipping %s (on_error = 'skip'): %s", self.kind, exc)


class MediaDataset:
    """Items of one split: ``{"image": media, **record.fields}`` (``image`` holds a video ``(T, 3, S, S)`` too).

    Args:
        parsed: the annotation file read by :mod:`unitrans.data.entries` (records + task attributes, which
            become attributes of the dataset: ``texts``, ``img2txt``, ``references``, ...).
        reader: loads a record's media.
        train: training items (seeded randomness, skipped items replaced) or evaluation items (blank on skip).
    """

    def __init__(self, parsed: Parsed, reader: MediaReader, train: bool):
        self.ann_file = parsed.file
        self.records: list[Record] = parsed.records
        self.reader = reader
        self.train = train
        self.seed, self.epoch = 0, 0
        for name, value in parsed.attrs.items():
            setattr(self, name, value)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def skipped(self) -> int:
        """Unreadable items skipped so far under ``on_error = "skip"``."""
        return self.reader.skipped

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """Item randomness becomes a function of (seed, epoch, item)."""
        self.seed, self.epoch = seed, epoch

    def rng(self, i: int) -> random.Random:
        """The generator of item ``i`` in this epoch."""
        return random.Random(f"{self.seed}:{self.epoch}:{i}")

    def _load(self, j: int, rng: random.Random | None) -> Any:
        """Item ``j``'s media, or ``None`` when it cannot be read and ``on_error`` is ``"skip"`` (counted)."""
        rec = self.records[j]
        try:
            return self.reader.load(rec.media, rec.start, rec.end, rng)
        except DataError as exc:
            if self.reader.on_error == "raise":
                raise MediaError(str(exc)) from None
            self.reader.note_skip(rec.media, exc)
            return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.records)
        if not 0 <= i < n:
            raise IndexError(f"item {i} of a dataset of {n}")
        if not self.train:
            media = self._load(i, None)
            return {"image": self.reader.blank() if media is None else media, **_copy(self.records[i].fields)}
        rng = self.rng(i)
        for j in ((i + k) % n for k in range(n)):  # under "skip": the next readable item, same generator
            media = self._load(j, rng)
            if media is not None:
                return {"image": media, **_copy(self.records[j].fields)}
        raise DataError(f"{self.ann_file}: on_error = 'skip' but none of its {n} {self.reader.kind}s could be read")


def _copy(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in fields.items()}


# ---- pre-flight ------------------------------------------------------------------------------------------------
def split_size(split: str, parse: Callable[[], Parsed] | None, report: Preflight) -> Parsed | None:
    """Reads one split for the pre-flight: its size into ``report.sizes``, a problem when it fails or is empty."""
    if parse is None:
        report.sizes[split] = None
        return None
    try:
        parsed = parse()
    except DataError as exc:
        report.sizes[split] = 0
        report.problems.append(f"{split} split: {exc}")
        return None
    report.sizes[split] = len(parsed.records)
    if not parsed.records:
        report.problems.append(f"{split} split is empty: {parsed.file} has no entries")
    return parsed


def check_media(parsed: Parsed, kind: str, on_error: str, check: Callable[[str], float | None] | None,
                report: Preflight) -> None:
    """Every distinct media file of a split exists, or with ``check`` (``deep``) opens, with a progress bar.

    One problem per unreadable file (under ``on_error = "skip"``, one warning with the count instead). ``check``
    returns a video's duration in seconds: entries whose times pass it are counted in one warning per file.
    """
    paths = sorted({r.media for r in parsed.records})
    bad, durations = [], {}
    for path in _progress(paths, check is not None):
        try:
            if check is not None:
                durations[path] = check(path)
            elif not Path(path).is_file():
                raise DataError(f"{kind} not found: {path}")
        except DataError as exc:
            bad.append(str(exc))
    report.checked_files += len(paths)
    if bad and on_error == "skip":
        log.warning("%d of %d %ss cannot be read and will be skipped (on_error = 'skip'), e.g. %s", len(bad),
                    len(paths), kind, bad[0])
    else:
        report.problems += bad
    late = [r for r in parsed.records if durations.get(r.media) is not None and past_end(r, durations[r.media])]
    if late:
        log.warning("%s: %d entries have start / end times past the end of their clip; they are clamped to the "
                    "clip (e.g. %s, %s-%s s of %.2f s)", parsed.file, len(late), late[0].media, late[0].start,
                    late[0].end, durations[late[0].media])


def outside_roots(parsed: Parsed, roots: list[Path]) -> list[str]:
    """One line per media file of ``parsed`` that resolves (``..``, absolute paths and symbolic links followed)
    outside every folder of ``roots``."""
    bases = [Path(r).resolve() for r in roots]
    lines = []
    for media in sorted({r.media for r in parsed.records}):
        real = Path(media).resolve()
        if not any(real == b or b in real.parents for b in bases):
            lines.append(f"{parsed.file}: {media} lies outside {', '.join(str(b) for b in bases)} "
                         "(data.confine_to_root = true)")
    return lines


def past_end(record: Record, duration: float, tolerance: float = 0.5) -> bool:
    """True when the record's start or end time lies past ``duration`` seconds (by more than ``tolerance``)."""
    return any(t is not None and t > duration + tolerance for t in (record.start, record.end))


def _progress(paths: list[str], show: bool):
    if not show:
        return paths
    try:
        from tqdm import tqdm
    except ImportError:
        return paths
    return tqdm(paths, desc="opening media", unit="file", leave=False)


def check_writable(root: Path, report: Preflight) -> None:
    """A problem when the generated data cannot be written under ``root`` (nor the folder be made)."""
    import os

    root = Path(root)
    if root.exists() and not root.is_dir():
        report.problems.append(f"data root {root} is a file; set data.root to a folder")
        return
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK) and not (root / "manifest.json").is_file():
        report.problems.append(f"cannot write the generated data under {root}: {existing} is not writable; "
                               "set data.root to a writable folder")


def check_root(path: Path | None, what: str, report: Preflight) -> bool:
    """A problem when the media folder ``path`` is not a folder; True when it is."""
    if path is not None and not Path(path).is_dir():
        report.problems.append(f"{what} is not a directory: {path}")
        return False
    return True

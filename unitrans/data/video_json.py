"""Video datasets in LAVIS's annotation formats: DiDeMo retrieval and MSRVTT-QA.

Retrieval (LAVIS ``didemo/annotations/retrieval_{train,val,test}.json``):

* train: a JSON list of ``{"video": "xxx.mp4", "caption": "..."}``, one entry per caption. Captions of one video
  are contrastive positives: entries are grouped by ``image_id`` or ``video_id`` when an entry has one, else by
  the video file (as LAVIS does; LAVIS's ``instance_id`` numbers entries, not videos, and is ignored);
* val / test: a JSON list of ``{"video": "xxx.mp4", "caption": [...]}`` (one entry per video; LAVIS's DiDeMo
  files give one paragraph string, accepted too).

VideoQA (LAVIS ``msrvtt/annotations/qa_{train,val,test}.json``): a JSON list of ``{"question_id", "question",
"answer": "...", "video": "videoNNNN.mp4"}``; candidate answers in ``answer_list.json`` (a JSON list) or LAVIS's
``train_ans2label.json`` (``{answer: label}``).

Any entry may restrict the sampled frames to a moment: ``"start"`` / ``"end"`` (seconds) or ``"times": [start,
end]``. Video paths are relative to ``video_root``.

A missing or unreadable video raises :class:`DataError` naming the file (``on_error = "raise"``), or is counted
in ``dataset.skipped`` and logged once per file (``on_error = "skip"``): a training item is then replaced by the
next readable one, an evaluation item scores a blank (mid-grey) video, so the index maps stay aligned. The
counter is shared with forked data-loader workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from unitrans.data.blip_json import DataError, _check_root, _read_annotation, _require, collate_retrieval, pre_caption
from unitrans.data.vqa_json import read_answer_list
from unitrans.data.video import STRATEGIES, VideoTransform, load_frames
from unitrans.interfaces import DataModule

log = logging.getLogger("unitrans.data")

N_AGREEING = 10  # a single-answer question counts as 10 agreeing annotators: VQA accuracy is then exact match


def _times(path: Path, i: int, entry: dict) -> tuple[float | None, float | None]:
    """``(start, end)`` in seconds from ``start`` / ``end`` or ``times``; ``(None, None)`` when absent."""
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


class VideoClips:
    """Reads clips for a dataset: frame sampling, decoding, normalisation and the ``on_error`` policy.

    Args:
        num_frames: frames per clip (T).
        sampling: ``uniform``, ``random`` or ``headtail``.
        size: side of the decoded frames.
        mean, std: the backbone's normalisation.
        on_error: ``raise`` or ``skip``.
        num_threads: decoder threads per clip.
    """

    def __init__(self, num_frames: int, sampling: str, size: int, mean: Sequence[float], std: Sequence[float],
                 on_error: str = "raise", num_threads: int = 1):
        if sampling not in STRATEGIES:
            raise ValueError(f"unknown frame sampling '{sampling}'; expected one of {', '.join(STRATEGIES)}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.num_frames, self.sampling, self.size = int(num_frames), sampling, int(size)
        self.on_error, self.num_threads = on_error, num_threads
        self.transform = VideoTransform(mean, std)
        self._skipped = multiprocessing.Value("i", 0)  # inherited by forked workers: one count for the run
        self._warned: set[str] = set()

    @property
    def skipped(self) -> int:
        return int(self._skipped.value)

    def load(self, path: str | Path, start=None, end=None, rng: random.Random | None = None) -> torch.Tensor:
        """``(T, 3, S, S)`` for one clip. Raises :class:`DataError` (naming ``path``) whatever the policy."""
        frames, _ = load_frames(path, self.num_frames, self.sampling, self.size, rng, start, end, self.num_threads)
        return self.transform(frames)

    def note_skip(self, path: str | Path, exc: Exception) -> None:
        """Counts a skipped clip and logs the file once (per process)."""
        with self._skipped.get_lock():
            self._skipped.value += 1
        if str(path) not in self._warned:
            self._warned.add(str(path))
            log.warning("skipping video (on_error = 'skip'): %s", exc)

    def blank(self) -> torch.Tensor:
        return self.transform.blank(self.num_frames, self.size)

    def __repr__(self) -> str:
        return f"VideoClips(T={self.num_frames}, {self.sampling}, size={self.size}, on_error={self.on_error})"


class _Epoch:
    """Per-item augmentation randomness as a function of (seed, epoch, item) (see ``RetrievalTrainDataset``)."""

    seed = 0
    epoch = 0

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        self.seed, self.epoch = seed, epoch

    def _rng(self, i: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{i}")


def _train_item(dataset, i: int, make) -> dict[str, Any]:
    """Item ``i``, or under ``skip`` the next readable item (same generator, so still deterministic)."""
    rng = dataset._rng(i)
    n = len(dataset)
    for k in range(n):
        j = (i + k) % n
        path, start, end = dataset.clip_of(j)
        try:
            video = dataset.clips.load(path, start, end, rng)
        except DataError as exc:
            if dataset.clips.on_error == "raise":
                raise
            dataset.clips.note_skip(path, exc)
            continue
        return make(j, video)
    raise DataError(f"{dataset.ann_file}: on_error = 'skip' but none of its {n} videos could be read "
                    f"(under {dataset.video_root})")


def _eval_video(dataset, i: int) -> torch.Tensor:
    path, start, end = dataset.clip_of(i)
    try:
        return dataset.clips.load(path, start, end, None)
    except DataError as exc:
        if dataset.clips.on_error == "raise":
            raise
        dataset.clips.note_skip(path, exc)
        return dataset.clips.blank()


class VideoRetrievalTrainDataset(_Epoch, torch.utils.data.Dataset):
    """One item per caption: ``{"image": (T, 3, S, S), "caption", "image_id"}`` (``image`` is the video, so the
    retrieval loop and collate work unchanged).

    Attributes:
        annotation: ``(video path, start, end, cleaned caption, integer video id)``.
        skipped: videos skipped so far under ``on_error = "skip"``.
    """

    def __init__(self, ann_file: str | Path, video_root: str | Path, clips: VideoClips, max_words: int = 30):
        self.ann_file = Path(ann_file)
        entries = _read_annotation(self.ann_file)
        self.video_root = _check_root(video_root)
        self.clips = clips
        self.image_ids: dict[Any, int] = {}
        self.annotation: list[tuple[Path, float | None, float | None, str, int]] = []
        for i, e in enumerate(entries):
            video = _require(self.ann_file, i, e, "video", str)
            caption = _require(self.ann_file, i, e, "caption", str)
            start, end = _times(self.ann_file, i, e)
            raw = e.get("image_id", e.get("video_id"))
            key = raw if isinstance(raw, (str, int)) and not isinstance(raw, bool) else (video, start, end)
            idx = self.image_ids.setdefault(key, len(self.image_ids))
            self.annotation.append((self.video_root / video, start, end, pre_caption(caption, max_words), idx))

    @property
    def skipped(self) -> int:
        return self.clips.skipped

    def clip_of(self, i: int):
        return self.annotation[i][:3]

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, i: int) -> dict[str, Any]:
        def make(j, video):
            return {"image": video, "caption": self.annotation[j][3], "image_id": self.annotation[j][4]}

        return _train_item(self, i, make)


class VideoRetrievalEvalDataset(torch.utils.data.Dataset):
    """One item per video: ``{"image": (T, 3, S, S), "index"}``; every caption in ``texts``.

    Attributes:
        images: video paths, one per video; texts: the cleaned captions, video by video; txt2img: each text's
            video; img2txt: each video's texts; skipped: videos that scored blank under ``on_error = "skip"``.
    """

    def __init__(self, ann_file: str | Path, video_root: str | Path, clips: VideoClips, max_words: int = 30):
        self.ann_file = Path(ann_file)
        entries = _read_annotation(self.ann_file)
        self.video_root = _check_root(video_root)
        self.clips = clips
        self.images: list[str] = []
        self.times: list[tuple[float | None, float | None]] = []
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for i, e in enumerate(entries):
            video = _require(self.ann_file, i, e, "video", str)
            captions = _require(self.ann_file, i, e, "caption", (str, list))
            captions = [captions] if isinstance(captions, str) else captions
            if not captions or not all(isinstance(c, str) for c in captions):
                raise DataError(f"{self.ann_file}: entry {i} key 'caption' must be a string or a non-empty list "
                                "of strings")
            self.images.append(str(self.video_root / video))
            self.times.append(_times(self.ann_file, i, e))
            ids = []
            for c in captions:
                ids.append(len(self.texts))
                self.texts.append(pre_caption(c, max_words))
                self.txt2img.append(i)
            self.img2txt.append(ids)

    @property
    def skipped(self) -> int:
        return self.clips.skipped

    def clip_of(self, i: int):
        return (self.images[i], *self.times[i])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": _eval_video(self, i), "index": i}


def _qa_entries(path: Path, need_answer: bool, max_words: int):
    from unitrans.data.vqa_json import pre_question

    out = []
    seen = set()
    for i, e in enumerate(_read_annotation(path)):
        video = _require(path, i, e, "video", str)
        question = _require(path, i, e, "question", str)
        qid = e.get("question_id", i)
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise DataError(f"{path}: entry {i} key 'question_id' has type {type(qid).__name__}")
        if qid in seen:
            raise DataError(f"{path}: entry {i}: question_id {qid!r} appears twice")
        seen.add(qid)
        answer = e.get("answer")
        answers = [answer] if isinstance(answer, str) else answer if isinstance(answer, list) else []
        if not all(isinstance(a, str) for a in answers):
            raise DataError(f"{path}: entry {i} key 'answer' must be a string (or a list of strings)")
        if need_answer and not answers:
            raise DataError(f"{path}: entry {i} has no answer to train on")
        start, end = _times(path, i, e)
        out.append((video, start, end, pre_question(question, max_words), qid, answers))
    return out


class VideoQATrainDataset(_Epoch, torch.utils.data.Dataset):
    """One item per question: ``{"image": (T, 3, S, S), "question", "answers", "weights"}`` (``vqa.v1``'s train
    items; a single answer has weight 1, several are weighted by frequency)."""

    def __init__(self, ann_file: str | Path, video_root: str | Path, clips: VideoClips, max_words: int = 50):
        from unitrans.data.vqa_json import answer_weights

        self.ann_file = Path(ann_file)
        self.video_root = _check_root(video_root)
        self.clips = clips
        self.annotation = []
        for video, start, end, question, _, answers in _qa_entries(self.ann_file, True, max_words):
            answers, weights = answer_weights(answers)
            self.annotation.append((self.video_root / video, start, end, question, answers, weights))

    @property
    def skipped(self) -> int:
        return self.clips.skipped

    def clip_of(self, i: int):
        return self.annotation[i][:3]

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, i: int) -> dict[str, Any]:
        def make(j, video):
            _, _, _, question, answers, weights = self.annotation[j]
            return {"image": video, "question": question, "answers": list(answers), "weights": list(weights)}

        return _train_item(self, i, make)


class VideoQAEvalDataset(torch.utils.data.Dataset):
    """One item per question: ``{"image": (T, 3, S, S), "question", "question_id", "answers"}``.

    MSRVTT-QA has one answer per question; it is repeated :data:`N_AGREEING` times so that ``vqa.v1``'s VQA
    accuracy is 1 for a (normalised) exact match and 0 otherwise, i.e. MSRVTT-QA's accuracy.

    Attributes:
        answer_list: candidate answers for ``rank`` inference.
    """

    def __init__(self, ann_file: str | Path, video_root: str | Path, clips: VideoClips,
                 answer_list: list[str] | None = None, max_words: int = 50):
        self.ann_file = Path(ann_file)
        self.video_root = _check_root(video_root)
        self.clips = clips
        self.answer_list = answer_list
        self.items = []
        for video, start, end, question, qid, answers in _qa_entries(self.ann_file, False, max_words):
            human = answers * N_AGREEING if len(answers) == 1 else answers
            self.items.append((str(self.video_root / video), start, end, question, qid, human))

    @property
    def skipped(self) -> int:
        return self.clips.skipped

    def clip_of(self, i: int):
        return self.items[i][:3]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        _, _, _, question, qid, answers = self.items[i]
        return {"image": _eval_video(self, i), "question": question, "question_id": qid, "answers": list(answers)}


class VideoRetrievalData:
    """The ``didemo_retrieval.v1`` dataset: LAVIS retrieval files over a video folder, built by :meth:`setup`."""

    def __init__(self, video_root, train_file=None, val_file=None, test_file=None, num_frames_train=8,
                 num_frames_eval=16, sampling_train="random", sampling_eval="uniform", on_error="raise", max_words=30,
                 num_threads=1):
        self.video_root = Path(video_root)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.frames = {"train": (num_frames_train, sampling_train), "eval": (num_frames_eval, sampling_eval)}
        self.on_error, self.max_words, self.num_threads = on_error, max_words, num_threads

    def _clips(self, which: str, size: int, mean, std) -> VideoClips:
        n, sampling = self.frames[which]
        return VideoClips(n, sampling, size, mean, std, self.on_error, self.num_threads)

    def setup(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> DataModule:
        """Reads and checks the annotation files (not the videos). Batches: ``image (B, T, 3, S, S)``."""
        f = self.files
        train = None if f["train"] is None else VideoRetrievalTrainDataset(
            f["train"], self.video_root, self._clips("train", image_size, mean, std), self.max_words)

        def ev(path):
            return None if path is None else VideoRetrievalEvalDataset(
                path, self.video_root, self._clips("eval", image_size, mean, std), self.max_words)

        return DataModule(train=train, val=ev(f["val"]), test=ev(f["test"]), collate=collate_retrieval,
                          extras={"video_root": str(self.video_root)})

    def __repr__(self) -> str:
        files = ", ".join(f"{k}_file={v}" for k, v in self.files.items() if v is not None)
        return f"VideoRetrievalData(video_root={self.video_root}, {files}, frames={self.frames})"


class VideoQAData(VideoRetrievalData):
    """The ``msrvtt_qa.v1`` dataset: LAVIS's MSRVTT-QA files (+ answer list) over a video folder.

    Without an answer list, the distinct answers of the train file (most frequent first) are the candidates.
    """

    def __init__(self, video_root, train_file=None, val_file=None, test_file=None, answer_list=None,
                 num_frames_train=8, num_frames_eval=16, sampling_train="random", sampling_eval="uniform",
                 on_error="raise", max_words=50, num_threads=1):
        super().__init__(video_root, train_file, val_file, test_file, num_frames_train, num_frames_eval,
                         sampling_train, sampling_eval, on_error, max_words, num_threads)
        self.answer_list = answer_list

    def setup(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> DataModule:
        from unitrans.data.vqa_json import collate_vqa

        f = self.files
        train = None if f["train"] is None else VideoQATrainDataset(
            f["train"], self.video_root, self._clips("train", image_size, mean, std), self.max_words)
        if self.answer_list is not None:
            answers = read_answer_list(self.answer_list)
        elif train is not None:
            counts: dict[str, int] = {}
            for *_, ans, _ in train.annotation:
                for a in ans:
                    counts[a] = counts.get(a, 0) + 1
            answers = sorted(counts, key=lambda a: (-counts[a], a))
        else:
            answers = None

        def ev(path):
            return None if path is None else VideoQAEvalDataset(
                path, self.video_root, self._clips("eval", image_size, mean, std), answers, self.max_words)

        return DataModule(train=train, val=ev(f["val"]), test=ev(f["test"]), collate=collate_vqa,
                          extras={"video_root": str(self.video_root), "answer_list": answers})

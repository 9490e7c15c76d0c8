"""Datasets: the registered builders (light: no torch, PIL or numpy at import).

A builder is a dataclass whose fields are its spec options (its ``__init__`` signature is the schema), declared
once: option groups shared by several formats (:class:`ImageOptions`, :class:`VideoOptions`,
:class:`ShapesScenes`) are base classes. Every builder has

* ``setup(image_size, mean, std) -> DataModule``: reads and checks the annotation files (not the media) and returns
  the datasets (:class:`unitrans.data.base.MediaDataset`) with their collate function;
* ``preflight(deep) -> Preflight``: what can be known before any model is built (files exist and parse, splits are
  not empty, media folders and files exist; ``deep``: every media file opened once). Generated datasets report
  the sizes they will have without generating.

Path options are resolved against the current directory when the builder is called. Implementations:
``generated.py`` (builders of generated data), ``entries.py`` (reading and checking every format),
``layouts.py`` (Karpathy and COCO files), ``base.py`` (the dataset, seeded items, ``on_error``, pre-flight
helpers), ``images.py`` / ``augment.py`` (images), ``video.py`` / ``video_json.py`` (videos), ``shapes*.py`` /
``easy_vqa.py`` (the generators).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal

from pydantic import Field

from unitrans import registry
from unitrans.errors import DataError
from unitrans.options import PositiveInt

if TYPE_CHECKING:
    from unitrans.data.entries import Parsed
    from unitrans.data.base import MediaReader
    from unitrans.interfaces import DataModule, Preflight

CropScale = Annotated[float, Field(gt=0, le=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
ImageSide = Annotated[int, Field(ge=32)]
Augment = Literal["crop", "blip", "none"]
OnError = Literal["raise", "skip"]
FrameSampling = Literal["uniform", "random", "headtail"]
SPLITS = ("train", "val", "test")


def _is_path(name: str) -> bool:
    if name == "confine_to_root":  # a switch, not a folder
        return False
    return name == "root" or name == "answer_list" or name.endswith(("_root", "_file", "_files"))


def _abs(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_abs(v) for v in value]
    return Path(value).expanduser().absolute()


@dataclass
class _Builder:
    """Base of the registered builders: path options (``root``, ``*_root``, ``*_file(s)``, ``answer_list``) become
    absolute paths when the builder is called."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if _is_path(f.name):
                setattr(self, f.name, _abs(getattr(self, f.name)))


# ---- option groups ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ImageOptions(_Builder):
    """How image items are read.

    Args:
        max_words: captions / questions are cut to this many words.
        min_scale: smallest area fraction of the train random resized crop.
        augment: train augmentation: ``"crop"`` (random resized crop, no flip: captions say left and right),
            ``"blip"`` (BLIP's: crop, horizontal flip, RandAugment N=2 M=5) or ``"none"``.
        on_error: an unreadable image ``"raise"``s a DataError naming it, or is ``"skip"``ped (counted in
            ``dataset.skipped``; a train item is replaced by the next readable one, an eval item scores blank).
        confine_to_root: refuse annotation entries whose image resolves (``..``, absolute paths and symbolic
            links followed) outside the image folder(s): for annotation files taken from elsewhere.
    """

    max_words: PositiveInt = 30
    min_scale: CropScale = 0.5
    augment: Augment = "crop"
    on_error: OnError = "raise"
    confine_to_root: bool = False


@dataclass(kw_only=True)
class VideoOptions(_Builder):
    """How video items are read (decord decodes only the sampled frames).

    Args:
        num_frames_train: frames per training clip (paper: 8).
        num_frames_eval: frames per evaluation clip (paper: 16).
        sampling_train: ``random`` (one frame per segment), ``uniform`` (segment midpoints) or ``headtail``.
        sampling_eval: frame sampling for evaluation.
        on_error: ``raise`` a DataError naming an unreadable video, or ``skip`` it (counted, logged once).
        confine_to_root: refuse entries whose video resolves outside ``video_root`` (``..``, absolute paths and
            symbolic links followed).
        max_words: captions / questions are cut to this many words.
        decode_threads: decoder threads per clip (1 when data-loader workers do the parallel work).
    """

    num_frames_train: PositiveInt = 8
    num_frames_eval: PositiveInt = 16
    sampling_train: FrameSampling = "random"
    sampling_eval: FrameSampling = "uniform"
    on_error: OnError = "raise"
    confine_to_root: bool = False
    max_words: PositiveInt = 30
    decode_threads: PositiveInt = 1


@dataclass(kw_only=True)
class ShapesScenes(_Builder):
    """The synthetic shapes generator (:func:`unitrans.data.shapes.make_shapes`): one output per parameter set.

    Args:
        n_train: train images.
        n_val: validation images.
        n_test: test images.
        image_size: side of the generated PNGs (the model input size is the backbone's).
        seed: generator seed.
        p_single: fraction of single-object images (1.0: the 36 single-object descriptions, an easy task).
    """

    n_train: PositiveInt = 2000
    n_val: PositiveInt = 100
    n_test: PositiveInt = 100
    image_size: ImageSide = 64
    seed: int = 0
    p_single: Fraction = 0.25


@dataclass(kw_only=True)
class SplitFiles(_Builder):
    """The annotation file of each split (``None``: no such split).

    Args:
        train_file: train annotation, one entry per caption (or question); ``None``: no train split.
        val_file: validation annotation, one entry per image or video (or question).
        test_file: test annotation.
    """

    train_file: str | None = None
    val_file: str | None = None
    test_file: str | None = None


# ---- annotation files ------------------------------------------------------------------------------------------
class _Files:
    """``setup`` and ``preflight`` of a builder that reads annotation files over a media folder.

    A subclass says which parser reads each split (:meth:`parsers`; default: train and eval pairs), how media are
    read (:meth:`reader`, :meth:`deep_check`; default: images) and what the data module holds besides the datasets
    (:meth:`module`; default: the retrieval collate).
    """

    media_key = "image"

    def media_root(self) -> Path:
        return getattr(self, f"{self.media_key}_root")

    def media_roots(self) -> list[Path]:
        """The folders the media may lie in (``confine_to_root``)."""
        return [self.media_root()]

    def _outside(self, parsed: "Parsed") -> list[str]:
        """Entries whose media lie outside :meth:`media_roots`, when ``confine_to_root`` is set."""
        from unitrans.data.base import outside_roots

        return outside_roots(parsed, self.media_roots()) if getattr(self, "confine_to_root", False) else []

    def parsers(self) -> dict[str, Callable[[], "Parsed"] | None]:
        return _pair_parsers(self)

    def reader(self, train: bool, image_size: int, mean, std) -> "MediaReader":
        return _image_reader(self, train, image_size, mean, std)

    def module(self, sets: dict[str, Any]) -> "DataModule":
        return _pairs_module(self, sets)

    def setup(self, image_size: int, mean, std) -> "DataModule":
        """Reads and checks the annotation files (not the media) into datasets."""
        from unitrans.data.entries import check_dir
        from unitrans.data.base import MediaDataset

        check_dir(self.media_root(), f"{self.media_key}_root")
        sets = {}
        for split, parse in self.parsers().items():
            parsed = None if parse is None else parse()
            outside = [] if parsed is None else self._outside(parsed)
            if outside:
                raise DataError(outside[0] + (f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""))
            train = split == "train"
            sets[split] = None if parsed is None else MediaDataset(
                parsed, self.reader(train, image_size, mean, std), train)
        return self.module(sets)

    def preflight(self, deep: bool = False) -> "Preflight":
        """Sizes, and every problem of the files (``deep``: every media file opened once)."""
        from unitrans.data.base import check_media, check_root, split_size
        from unitrans.interfaces import Preflight

        report = Preflight()
        root_ok = check_root(self.media_root(), f"{self.media_key}_root", report)
        check = self.deep_check() if deep else None
        for split, parse in self.parsers().items():
            parsed = split_size(split, parse, report)
            if parsed is not None and root_ok:
                report.problems += self._outside(parsed)
                check_media(parsed, self.media_key, getattr(self, "on_error", "raise"), check, report)
        return report

    def named_paths(self) -> dict[str, Path]:
        """The files and folders the spec names (path options that are set)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _is_path(f.name) and value:
                items = value if isinstance(value, list) else [value]
                out.update({f.name if len(items) == 1 else f"{f.name}[{i}]": p for i, p in enumerate(items)})
        return out

    def deep_check(self) -> Callable[[str], None]:
        from unitrans.data.images import check_image

        return check_image


def _pair_parsers(b: Any, eval_parse: Callable[[Path, Path | None, str], "Parsed"] | None = None) -> dict[str, Any]:
    """Parsers of a train / val / test builder: train pairs, and ``eval_parse(file, gt_file, split)`` (default:
    eval pairs) for val and test."""
    from unitrans.data import entries as ann

    root, key = b.media_root(), b.media_key
    if eval_parse is None:
        eval_parse = lambda path, _, split: ann.pairs_eval(path, root, b.max_words, key, split)  # noqa: E731
    out: dict[str, Any] = {"train": None if b.train_file is None else
                           (lambda: ann.pairs_train(b.train_file, root, b.max_words, key))}
    for split in ("val", "test"):
        path, gt = getattr(b, f"{split}_file"), getattr(b, f"{split}_gt_file", None)
        out[split] = None if path is None else (lambda p, g, s: lambda: eval_parse(p, g, s))(path, gt, split)
    return out


def _image_reader(b: ImageOptions, train: bool, image_size: int, mean, std) -> "MediaReader":
    from unitrans.data.images import ImageReader, ImageTransform

    tf = ImageTransform(image_size, mean, std, train=train, min_scale=b.min_scale, augment=b.augment)
    return ImageReader(tf, b.on_error)


def _pairs_module(b: Any, sets: dict[str, Any]) -> "DataModule":
    from unitrans.data.blip_json import collate_retrieval
    from unitrans.interfaces import DataModule

    return DataModule(train=sets["train"], val=sets["val"], test=sets["test"], collate=collate_retrieval,
                      extras={f"{b.media_key}_root": str(b.media_root())})


@registry.datasets.register("blip_retrieval.v1")
@dataclass
class BlipRetrievalData(_Files, SplitFiles, ImageOptions):
    """Image-text retrieval from BLIP annotation files (``coco_karpathy_*.json``, ``flickr30k_*.json``), a Karpathy
    split file (``dataset_coco.json``) or COCO captions (``captions_val2014.json``).

    Train entries: one per caption, grouped into images by ``image_id`` (else by image file). Eval entries: one
    per image, ``caption`` a list (entries naming one image twice are merged, with a warning).

    Args:
        image_root: folder the annotations' image paths are relative to.
    """

    image_root: str


@registry.datasets.register("blip_caption.v1")
@dataclass
class BlipCaptionData(_Files, SplitFiles, ImageOptions):
    """Image captioning from BLIP's Karpathy files (``coco_karpathy_{train,val,test}.json`` + ``*_gt.json``), a
    Karpathy split file or COCO captions.

    An eval image's id: its ``image_id``, else the number ending its file name (COCO), else (no ground-truth
    file to match) its position in the file.

    Args:
        image_root: folder the annotations' image paths are relative to.
        val_gt_file: COCO-format ground truth of ``val_file`` (``None``: the eval file's captions).
        test_gt_file: COCO-format ground truth of ``test_file``.
    """

    image_root: str
    val_gt_file: str | None = None
    test_gt_file: str | None = None

    def parsers(self):
        from unitrans.data.entries import caption_eval

        return _pair_parsers(self, lambda path, gt, split: caption_eval(path, self.image_root, gt, split))


def _qa_module(b: Any, sets: dict[str, Any], answers: list[str] | None) -> "DataModule":
    from unitrans.data.vqa_json import collate_vqa
    from unitrans.interfaces import DataModule

    for split in ("val", "test"):
        if sets[split] is not None:
            sets[split].answer_list = answers
    return DataModule(train=sets["train"], val=sets["val"], test=sets["test"], collate=collate_vqa,
                      extras={f"{b.media_key}_root": str(b.media_root()), "answer_list": answers})


def _qa_parsers(b: Any, train_files: list[Path], roots: dict[str, Path | None]) -> dict[str, Any]:
    from unitrans.data.entries import questions

    out: dict[str, Any] = {"train": None, "val": None, "test": None}
    if train_files:
        out["train"] = lambda: questions(train_files, roots, b.max_words, True, b.media_key)
    for split, path in (("val", b.val_file), ("test", b.test_file)):
        if path is not None:
            out[split] = (lambda p: lambda: questions([p], roots, b.max_words, False, b.media_key))(path)
    return out


@registry.datasets.register("blip_vqa.v1")
@dataclass
class BlipVQAData(_Files, ImageOptions):
    """VQA from BLIP's files (``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``, ``vqa_test.json``,
    ``answer_list.json``).

    Args:
        image_root: folder of the COCO images (entries with ``dataset: "vqa"``).
        train_files: question files to train on (BLIP: vqa_train, vqa_val and vg_qa); empty: no train split.
        val_file: eval questions with answers (scored locally).
        test_file: eval questions (VQAv2 test-dev has no answers: results go to the evaluation server).
        answer_list: JSON list of candidate answers for ``rank`` inference.
        vg_root: folder of the Visual Genome images (entries with ``dataset: "vg"``); ``None``: ``image_root``.
    """

    image_root: str
    train_files: list[str] = ()
    val_file: str | None = None
    test_file: str | None = None
    answer_list: str | None = None
    vg_root: str | None = None
    max_words: PositiveInt = field(default=50, kw_only=True)

    def parsers(self):
        return _qa_parsers(self, list(self.train_files), {"vqa": self.image_root, "vg": self.vg_root})

    def media_roots(self):
        return [Path(r) for r in (self.image_root, self.vg_root) if r]

    def module(self, sets):
        from unitrans.data.entries import read_answer_list

        return _qa_module(self, sets, None if self.answer_list is None else read_answer_list(self.answer_list))


# ---- videos ----------------------------------------------------------------------------------------------------
class _VideoFiles(_Files):
    media_key = "video"

    def reader(self, train, image_size, mean, std):
        from unitrans.data.video_json import VideoClips

        n, sampling = (self.num_frames_train, self.sampling_train) if train else (self.num_frames_eval,
                                                                                   self.sampling_eval)
        return VideoClips(n, sampling, image_size, mean, std, self.on_error, self.decode_threads)

    def deep_check(self):
        from unitrans.data.video_json import check_video

        return check_video


@registry.datasets.register("didemo_retrieval.v1")
@dataclass
class VideoRetrievalData(_VideoFiles, SplitFiles, VideoOptions):
    """Video-text retrieval from LAVIS's DiDeMo files (``retrieval_{train,val,test}.json``), decoded with decord.

    Train entries ``{"video", "caption"}`` (one per caption; grouped by ``image_id`` / ``video_id``, else by the
    video and its times), eval entries ``{"video", "caption": [...]}``; any entry may give ``start`` / ``end``
    seconds or ``times: [start, end]``. Batches hold ``image (B, T, 3, S, S)`` (S: the backbone's image size).

    Args:
        video_root: folder the annotations' video paths are relative to.
    """

    video_root: str


@registry.datasets.register("msrvtt_qa.v1")
@dataclass
class VideoQAData(_VideoFiles, SplitFiles, VideoOptions):
    """Video QA from LAVIS's MSRVTT-QA files (``qa_{train,val,test}.json``), for task ``vqa.v1``.

    Entries ``{"question_id", "question", "answer", "video"}``; one answer per question, so ``vqa_acc`` is the
    exact-match accuracy (after VQA answer normalisation). Batches hold ``image (B, T, 3, S, S)``.

    Args:
        video_root: folder the annotations' video paths are relative to.
        answer_list: candidates for ``rank`` inference: a JSON list or LAVIS's ``train_ans2label.json``;
            ``None``: the train file's distinct answers, most frequent first.
    """

    video_root: str
    answer_list: str | None = None
    max_words: PositiveInt = field(default=50, kw_only=True)

    def parsers(self):
        return _qa_parsers(self, [] if self.train_file is None else [self.train_file], {"vqa": self.video_root})

    def module(self, sets):
        from unitrans.data.entries import read_answer_list

        if self.answer_list is not None:
            answers = read_answer_list(self.answer_list)
        elif sets["train"] is not None:
            counts: dict[str, int] = {}
            for rec in sets["train"].records:
                for a in rec.fields["answers"]:
                    counts[a] = counts.get(a, 0) + 1
            answers = sorted(counts, key=lambda a: (-counts[a], a))
        else:
            answers = None
        return _qa_module(self, sets, answers)


# ---- generated data (generated.py: shapes, easy-VQA, shapes videos; registered on import) ----------------------
from unitrans.data.generated import (  # noqa: E402
    EasyVQAData,
    ShapesCaptionData,
    ShapesRetrievalData,
    ShapesVideoQAData,
    ShapesVideoRetrievalData,
    ShapesVQAData,
)

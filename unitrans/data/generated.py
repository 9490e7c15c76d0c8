"""Registered builders of generated data (light): written under ``root`` on first use, then read by the file
builders of :mod:`unitrans.data` (shapes images, easy-VQA from its package, shapes videos)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from unitrans import registry
from unitrans.data import (
    SPLITS,
    BlipCaptionData,
    BlipRetrievalData,
    BlipVQAData,
    ImageOptions,
    PositiveInt,
    ShapesScenes,
    VideoOptions,
    VideoQAData,
    VideoRetrievalData,
    _Files,
)

if TYPE_CHECKING:
    from unitrans.interfaces import DataModule, Preflight


class _Generated:
    """``setup`` and ``preflight`` of a builder that writes its files under ``root`` on first use, then reads them
    with a file builder (:meth:`files`, which generates)."""

    extras_key = "shapes"

    def files(self) -> tuple[_Files, dict[str, str]]:
        raise NotImplementedError

    def sizes(self) -> dict[str, int | None]:
        raise NotImplementedError

    def setup(self, image_size: int, mean, std) -> "DataModule":
        """Generates the files if needed, then reads them."""
        files, paths = self.files()
        module = files.setup(image_size, mean, std)
        module.extras[self.extras_key] = paths
        return module

    def preflight(self, deep: bool = False) -> "Preflight":
        """The sizes the splits will have, and whether ``root`` can be written (nothing is generated)."""
        from unitrans.data.base import check_writable
        from unitrans.interfaces import Preflight

        report = Preflight(sizes=self.sizes())
        check_writable(self.root, report)
        return report


def _options(b: Any, group: type) -> dict[str, Any]:
    """``b``'s values of an option group's fields (to hand them to the file builder that reads generated files)."""
    return {f.name: getattr(b, f.name) for f in dataclasses.fields(group)}


def _split_files(paths: dict[str, str], prefix: str, counts: dict[str, int]) -> dict[str, str | None]:
    return {f"{s}_file": (paths[f"{prefix}{s}"] if counts[s] > 0 else None) for s in SPLITS}


@dataclass(kw_only=True)
class _ShapesImages(_Generated, ShapesScenes, ImageOptions):
    root: str = "runs/data/shapes"
    captions_per_image: PositiveInt = 3

    def counts(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}

    def generator_args(self) -> dict[str, Any]:
        return dict(n_train=self.n_train, n_val=self.n_val, n_test=self.n_test, image_size=self.image_size,
                    captions_per_image=self.captions_per_image, seed=self.seed, p_single=self.p_single)

    def sizes(self):
        return {"train": self.n_train * self.captions_per_image, "val": self.n_val, "test": self.n_test}


@registry.datasets.register("shapes_retrieval.v1")
@dataclass(kw_only=True)
class ShapesRetrievalData(_ShapesImages):
    """Synthetic coloured shapes with compositional captions, generated on first use, read by ``blip_retrieval``.

    Args:
        root: output folder (generated once per parameter set; a matching ``manifest.json`` skips generation).
        captions_per_image: paraphrased captions per image (each gives a train entry).
    """

    def files(self):
        from unitrans.data.shapes import make_shapes

        paths = make_shapes(self.root, **self.generator_args())
        return BlipRetrievalData(paths["image_root"], **_split_files(paths, "", self.counts()),
                                 **_options(self, ImageOptions)), paths


@registry.datasets.register("shapes_caption.v1")
@dataclass(kw_only=True)
class ShapesCaptionData(_ShapesImages):
    """Synthetic shapes with captions in BLIP's Karpathy format + COCO-format ground truth (offline captioning).

    Args:
        root: the shapes generator's folder (shared with ``shapes_retrieval`` for the same parameters).
        captions_per_image: paraphrased captions per image (the references of an eval image).
    """

    def files(self):
        from unitrans.data.shapes_tasks import make_shapes_caption

        paths = make_shapes_caption(self.root, **self.generator_args())
        split = _split_files(paths, "", self.counts())
        gt = {f"{s}_gt_file": paths[f"{s}_gt"] if split[f"{s}_file"] else None for s in ("val", "test")}
        return BlipCaptionData(paths["image_root"], **split, **gt, **_options(self, ImageOptions)), paths


@registry.datasets.register("shapes_vqa.v1")
@dataclass(kw_only=True)
class ShapesVQAData(_Generated, ShapesScenes, ImageOptions):
    """Synthetic shapes with questions and 10 human-like answers each, in BLIP's VQA format (offline VQA).

    Questions ("what color is the circle?", "what shape is left of the red square?", "how many shapes are
    there?", "is there a blue triangle?") come from each image's layout; answers are mostly right, some
    paraphrased ("two", "Red"), some wrong; the answer list holds the 13 canonical answers.

    Args:
        root: the shapes generator's folder.
        questions_per_image: at most this many questions per image (every image has at least 3).
        answer_noise: probability that one human answer is wrong.
    """

    root: str = "runs/data/shapes_vqa"
    questions_per_image: PositiveInt = 3
    answer_noise: Annotated[float, Field(ge=0, lt=1)] = 0.15
    max_words: PositiveInt = 50

    def sizes(self):
        per = min(self.questions_per_image, 3)  # every scene has at least 3 questions: exact up to 3
        return {"train": self.n_train * per, "val": self.n_val * per, "test": self.n_test * per}

    def files(self):
        from unitrans.data.shapes_tasks import make_shapes_vqa

        paths = make_shapes_vqa(self.root, self.questions_per_image, self.answer_noise, n_train=self.n_train,
                                n_val=self.n_val, n_test=self.n_test, image_size=self.image_size,
                                captions_per_image=1, seed=self.seed, p_single=self.p_single)
        return BlipVQAData(paths["image_root"], [paths["vqa_train"]], paths["vqa_val"], paths["vqa_test"],
                           paths["answer_list"], **_options(self, ImageOptions)), paths


@registry.datasets.register("easy_vqa.v1")
@dataclass(kw_only=True)
class EasyVQAData(_Generated, ImageOptions):
    """easy-VQA (MIT): 5,000 real 64x64 shape images and 48k questions with 13 answers, from the ``easy-vqa``
    package (offline), written once into BLIP's VQA format and read by ``blip_vqa``'s loader.

    Each question's single answer counts as ten identical human answers, so ``vqa_acc`` is exact-match accuracy.

    Args:
        root: folder of the written question files and answer list (the images stay in the package).
        n_val_images: the last train images whose questions form the val split (0: no val split).
        max_train: at most this many train questions (a seeded random subset; ``None``: all 36k or so).
        max_val: at most this many val questions.
        max_test: at most this many test questions (``None``: all 9,673).
        seed: seed of the subsets.
    """

    extras_key = "easy_vqa"
    root: str = "runs/data/easy_vqa"
    n_val_images: Annotated[int, Field(ge=0)] = 200
    max_train: PositiveInt | None = None
    max_val: PositiveInt | None = None
    max_test: PositiveInt | None = None
    seed: int = 0
    max_words: PositiveInt = 50

    def generator_args(self) -> dict[str, Any]:
        return dict(n_val_images=self.n_val_images, max_train=self.max_train, max_val=self.max_val,
                    max_test=self.max_test, seed=self.seed)

    def sizes(self):
        from unitrans.data.easy_vqa import split_sizes

        return split_sizes(**self.generator_args())

    def files(self):
        from unitrans.data.easy_vqa import make_easy_vqa

        paths = make_easy_vqa(self.root, **self.generator_args())
        val = paths["vqa_val"] if self.n_val_images > 0 else None
        return BlipVQAData(paths["image_root"], [paths["vqa_train"]], val, paths["vqa_test"], paths["answer_list"],
                           **_options(self, ImageOptions)), paths


@dataclass(kw_only=True)
class _ShapesVideo(_Generated, VideoOptions):
    """Project-made MP4s of a coloured shape moving left, right, up or down (:mod:`unitrans.data.shapes_video`).

    Args:
        root: output folder (generated once per parameter set; shared by the retrieval and QA datasets).
        n_train: train clips.
        n_val: validation clips.
        n_test: test clips.
        clip_frames: frames written per clip.
        clip_size: frame side written (the model input size is the backbone's).
        captions_per_video: paraphrased captions per clip.
        seed: generator seed.
    """

    extras_key = "shapes_video"
    root: str = "runs/data/shapes_video"
    n_train: PositiveInt = 400
    n_val: PositiveInt = 60
    n_test: PositiveInt = 60
    clip_frames: Annotated[int, Field(ge=2)] = 16
    clip_size: Annotated[int, Field(ge=32, multiple_of=2)] = 64
    captions_per_video: PositiveInt = 2
    seed: int = 0
    num_frames_train: PositiveInt = 4
    num_frames_eval: PositiveInt = 8

    def generate(self) -> dict[str, str]:
        from unitrans.data.shapes_video import make_shapes_video

        return make_shapes_video(self.root, n_train=self.n_train, n_val=self.n_val, n_test=self.n_test,
                                 num_frames=self.clip_frames, image_size=self.clip_size,
                                 captions_per_video=self.captions_per_video, seed=self.seed)


@registry.datasets.register("shapes_video_retrieval.v1")
@dataclass(kw_only=True)
class ShapesVideoRetrievalData(_ShapesVideo):
    """Project-made MP4s of a coloured shape moving across the frame, with captions ("a red circle moves from left
    to right"), written in LAVIS's DiDeMo format and read by ``didemo_retrieval``'s loader (offline)."""

    def sizes(self):
        return {"train": self.n_train * self.captions_per_video, "val": self.n_val, "test": self.n_test}

    def files(self):
        paths = self.generate()
        counts = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
        return VideoRetrievalData(paths["video_root"], **_split_files(paths, "ret_", counts),
                                  **_options(self, VideoOptions)), paths


@registry.datasets.register("shapes_video_qa.v1")
@dataclass(kw_only=True)
class ShapesVideoQAData(_ShapesVideo):
    """The ``shapes_video_retrieval`` clips with three questions each ("which direction does the red circle
    move?", colour, shape), in LAVIS's MSRVTT-QA format with an answer list, for ``vqa.v1`` (offline)."""

    max_words: PositiveInt = 50

    def sizes(self):
        return {"train": self.n_train * 3, "val": self.n_val * 3, "test": self.n_test * 3}

    def files(self):
        paths = self.generate()
        counts = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
        return VideoQAData(paths["video_root"], **_split_files(paths, "qa_", counts), answer_list=paths["answer_list"],
                           **_options(self, VideoOptions)), paths

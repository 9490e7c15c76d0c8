"""Datasets: registered builders (light: no torch, PIL or numpy at import).

Implementations: ``blip_json.py`` (BLIP annotation format), ``caption_json.py`` / ``vqa_json.py`` (BLIP's
captioning and VQA files), ``images.py`` (loading, transforms), ``shapes.py`` (synthetic data) and
``shapes_tasks.py`` (captioning / VQA files derived from it), ``easy_vqa.py`` (the easy-VQA package's data); ``video.py`` (decord decoding, frame sampling),
``video_json.py`` (LAVIS DiDeMo / MSRVTT-QA files) and ``shapes_video.py`` (synthetic MP4s). A builder's typed signature is its spec schema; the builder returns an object whose
``setup(image_size, mean, std)`` returns a :class:`unitrans.interfaces.DataModule`. Relative paths in a spec are
relative to the current working directory when the builder is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from unitrans import registry

PositiveInt = Annotated[int, Field(gt=0)]
CropScale = Annotated[float, Field(gt=0, le=1)]


def _abs(path: str | None) -> Path | None:
    return None if path is None else Path(path).expanduser().absolute()


@registry.datasets.register("blip_retrieval.v1")
def blip_retrieval_v1(
    image_root: str,
    train_file: str | None = None,
    val_file: str | None = None,
    test_file: str | None = None,
    max_words: PositiveInt = 30,
    min_scale: CropScale = 0.5,
):
    """Image-text retrieval from BLIP annotation files (``coco_karpathy_*.json``, ``flickr30k_*.json``).

    Args:
        image_root: folder the annotations' image paths are relative to.
        train_file: train annotation (one entry per caption, with ``image_id``); ``None``: no train split.
        val_file: eval annotation (one entry per image, ``caption`` a list); ``None``: no val split.
        test_file: eval annotation; ``None``: no test split.
        max_words: captions are cut to this many words.
        min_scale: smallest area fraction of the train random resized crop.
    """
    from unitrans.data.blip_json import BlipRetrievalData

    return BlipRetrievalData(
        image_root=_abs(image_root),
        train_file=_abs(train_file),
        val_file=_abs(val_file),
        test_file=_abs(test_file),
        max_words=max_words,
        min_scale=min_scale,
    )


@registry.datasets.register("shapes_retrieval.v1")
def shapes_retrieval_v1(
    root: str = "runs/data/shapes",
    n_train: PositiveInt = 2000,
    n_val: PositiveInt = 100,
    n_test: PositiveInt = 100,
    image_size: Annotated[int, Field(ge=32)] = 64,
    captions_per_image: PositiveInt = 3,
    seed: int = 0,
    max_words: PositiveInt = 30,
    min_scale: CropScale = 0.5,
    p_single: Annotated[float, Field(ge=0, le=1)] = 0.25,
):
    """Synthetic coloured shapes with compositional captions, generated on first use, read by ``blip_retrieval``.

    Args:
        root: output folder (generated once per parameter set; a matching ``manifest.json`` skips generation).
        n_train: train images (each gives ``captions_per_image`` train entries).
        n_val: validation images.
        n_test: test images.
        image_size: side of the generated PNGs (the model input size is the backbone's).
        captions_per_image: paraphrased captions per image.
        seed: generator seed.
        max_words: captions are cut to this many words.
        min_scale: smallest area fraction of the train random resized crop (1.0: no crop).
        p_single: fraction of single-object images (1.0 keeps the 36 single-object descriptions: an easy task).
    """
    from unitrans.data.shapes import ShapesRetrievalData

    return ShapesRetrievalData(
        root=_abs(root),
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        image_size=image_size,
        captions_per_image=captions_per_image,
        seed=seed,
        max_words=max_words,
        min_scale=min_scale,
        p_single=p_single,
    )


@registry.datasets.register("blip_caption.v1")
def blip_caption_v1(
    image_root: str,
    train_file: str | None = None,
    val_file: str | None = None,
    test_file: str | None = None,
    val_gt_file: str | None = None,
    test_gt_file: str | None = None,
    max_words: PositiveInt = 30,
    min_scale: CropScale = 0.5,
):
    """Image captioning from BLIP's Karpathy files (``coco_karpathy_{train,val,test}.json`` + ``*_gt.json``).

    Args:
        image_root: folder the annotations' image paths are relative to.
        train_file: train annotation (one entry per caption); ``None``: no train split.
        val_file: eval annotation (one entry per image; its id is the number ending the file name).
        test_file: eval annotation.
        val_gt_file: COCO-format ground truth of ``val_file`` (``None``: the eval file's captions).
        test_gt_file: COCO-format ground truth of ``test_file``.
        max_words: train captions are cut to this many words.
        min_scale: smallest area fraction of the train random resized crop.
    """
    from unitrans.data.caption_json import BlipCaptionData

    return BlipCaptionData(
        image_root=_abs(image_root), train_file=_abs(train_file), val_file=_abs(val_file),
        test_file=_abs(test_file), val_gt_file=_abs(val_gt_file), test_gt_file=_abs(test_gt_file),
        max_words=max_words, min_scale=min_scale,
    )


@registry.datasets.register("blip_vqa.v1")
def blip_vqa_v1(
    image_root: str,
    train_files: list[str] = [],
    test_file: str | None = None,
    answer_list: str | None = None,
    val_file: str | None = None,
    vg_root: str | None = None,
    max_words: PositiveInt = 50,
    min_scale: CropScale = 0.5,
):
    """VQA from BLIP's files (``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``, ``vqa_test.json``,
    ``answer_list.json``).

    Args:
        image_root: folder of the COCO images (entries with ``dataset: "vqa"``).
        train_files: question files to train on (BLIP: vqa_train, vqa_val and vg_qa); empty: no train split.
        test_file: eval questions (VQAv2 test-dev has no answers: results go to the evaluation server).
        answer_list: JSON list of candidate answers for ``rank`` inference.
        val_file: eval questions with answers (scored locally).
        vg_root: folder of the Visual Genome images (entries with ``dataset: "vg"``); ``None``: ``image_root``.
        max_words: questions are cut to this many words.
        min_scale: smallest area fraction of the train random resized crop.
    """
    from unitrans.data.vqa_json import BlipVQAData

    return BlipVQAData(
        image_root=_abs(image_root), train_files=[_abs(f) for f in train_files], val_file=_abs(val_file),
        test_file=_abs(test_file), answer_list=_abs(answer_list), vg_root=_abs(vg_root), max_words=max_words,
        min_scale=min_scale,
    )


@registry.datasets.register("shapes_caption.v1")
def shapes_caption_v1(
    root: str = "runs/data/shapes",
    n_train: PositiveInt = 2000,
    n_val: PositiveInt = 100,
    n_test: PositiveInt = 100,
    image_size: Annotated[int, Field(ge=32)] = 64,
    captions_per_image: PositiveInt = 3,
    seed: int = 0,
    max_words: PositiveInt = 30,
    min_scale: CropScale = 0.5,
    p_single: Annotated[float, Field(ge=0, le=1)] = 0.25,
):
    """Synthetic shapes with captions in BLIP's Karpathy format + COCO-format ground truth (offline captioning).

    Args:
        root: the shapes generator's folder (shared with ``shapes_retrieval`` for the same parameters).
        n_train: train images (each gives ``captions_per_image`` train entries).
        n_val: validation images.
        n_test: test images.
        image_size: side of the generated PNGs.
        captions_per_image: paraphrased captions per image (the references of an eval image).
        seed: generator seed.
        max_words: train captions are cut to this many words.
        min_scale: smallest area fraction of the train random resized crop (1.0: no crop).
        p_single: fraction of single-object images.
    """
    from unitrans.data.shapes_tasks import ShapesCaptionData

    return ShapesCaptionData(
        root=_abs(root), max_words=max_words, min_scale=min_scale, n_train=n_train, n_val=n_val, n_test=n_test,
        image_size=image_size, captions_per_image=captions_per_image, seed=seed, p_single=p_single,
    )


@registry.datasets.register("shapes_vqa.v1")
def shapes_vqa_v1(
    root: str = "runs/data/shapes_vqa",
    n_train: PositiveInt = 2000,
    n_val: PositiveInt = 100,
    n_test: PositiveInt = 100,
    image_size: Annotated[int, Field(ge=32)] = 64,
    questions_per_image: PositiveInt = 3,
    answer_noise: Annotated[float, Field(ge=0, lt=1)] = 0.15,
    seed: int = 0,
    min_scale: CropScale = 0.5,
    p_single: Annotated[float, Field(ge=0, le=1)] = 0.25,
):
    """Synthetic shapes with questions and 10 human-like answers each, in BLIP's VQA format (offline VQA).

    Questions ("what color is the circle?", "what shape is left of the red square?", "how many shapes are
    there?", "is there a blue triangle?") come from each image's layout; answers are mostly right, some
    paraphrased ("two", "Red"), some wrong; the answer list holds the 13 canonical answers.

    Args:
        root: the shapes generator's folder.
        n_train: train images.
        n_val: validation images.
        n_test: test images.
        image_size: side of the generated PNGs.
        questions_per_image: at most this many questions per image.
        answer_noise: probability that one human answer is wrong.
        seed: generator seed.
        min_scale: smallest area fraction of the train random resized crop (1.0: no crop).
        p_single: fraction of single-object images.
    """
    from unitrans.data.shapes_tasks import ShapesVQAData

    return ShapesVQAData(
        root=_abs(root), questions_per_image=questions_per_image, answer_noise=answer_noise, min_scale=min_scale,
        n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, captions_per_image=1, seed=seed,
        p_single=p_single,
    )


@registry.datasets.register("easy_vqa.v1")
def easy_vqa_v1(
    root: str = "runs/data/easy_vqa",
    n_val_images: Annotated[int, Field(ge=0)] = 200,
    max_train: PositiveInt | None = None,
    max_val: PositiveInt | None = None,
    max_test: PositiveInt | None = None,
    seed: int = 0,
    max_words: PositiveInt = 50,
    min_scale: CropScale = 0.5,
):
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
        max_words: questions are cut to this many words.
        min_scale: smallest area fraction of the train random resized crop (1.0: no crop).
    """
    from unitrans.data.easy_vqa import EasyVQAData

    return EasyVQAData(root=_abs(root), n_val_images=n_val_images, max_train=max_train, max_val=max_val,
                       max_test=max_test, seed=seed, max_words=max_words, min_scale=min_scale)


# ---- video (implementations: video.py decoding + sampling, video_json.py datasets, shapes_video.py) -----------
FrameSampling = Literal["uniform", "random", "headtail"]
OnError = Literal["raise", "skip"]


@registry.datasets.register("didemo_retrieval.v1")
def didemo_retrieval_v1(
    video_root: str,
    train_file: str | None = None,
    val_file: str | None = None,
    test_file: str | None = None,
    num_frames_train: PositiveInt = 8,
    num_frames_eval: PositiveInt = 16,
    sampling_train: FrameSampling = "random",
    sampling_eval: FrameSampling = "uniform",
    on_error: OnError = "raise",
    max_words: PositiveInt = 30,
    decode_threads: PositiveInt = 1,
):
    """Video-text retrieval from LAVIS's DiDeMo files (``retrieval_{train,val,test}.json``), decoded with decord.

    Train entries ``{"video", "caption"}`` (one per caption), eval entries ``{"video", "caption": [...]}``; any
    entry may give ``start`` / ``end`` seconds or ``times: [start, end]``. Batches hold ``image (B, T, 3, S, S)``
    (S: the backbone's image size), so ``retrieval.v1`` runs unchanged on a backbone that encodes videos.

    Args:
        video_root: folder the annotations' video paths are relative to.
        train_file: train annotation; ``None``: no train split.
        val_file: eval annotation; ``None``: no val split.
        test_file: eval annotation; ``None``: no test split.
        num_frames_train: frames per training clip (paper: 8).
        num_frames_eval: frames per evaluation clip (paper: 16).
        sampling_train: ``random`` (one frame per segment), ``uniform`` (segment midpoints) or ``headtail``.
        sampling_eval: frame sampling for evaluation.
        on_error: ``raise`` a DataError naming an unreadable video, or ``skip`` it (counted, logged once).
        max_words: captions are cut to this many words.
        decode_threads: decoder threads per clip (1 when data-loader workers do the parallel work).
    """
    from unitrans.data.video_json import VideoRetrievalData

    return VideoRetrievalData(
        video_root=_abs(video_root), train_file=_abs(train_file), val_file=_abs(val_file),
        test_file=_abs(test_file), num_frames_train=num_frames_train, num_frames_eval=num_frames_eval,
        sampling_train=sampling_train, sampling_eval=sampling_eval, on_error=on_error, max_words=max_words,
        num_threads=decode_threads,
    )


@registry.datasets.register("msrvtt_qa.v1")
def msrvtt_qa_v1(
    video_root: str,
    train_file: str | None = None,
    val_file: str | None = None,
    test_file: str | None = None,
    answer_list: str | None = None,
    num_frames_train: PositiveInt = 8,
    num_frames_eval: PositiveInt = 16,
    sampling_train: FrameSampling = "random",
    sampling_eval: FrameSampling = "uniform",
    on_error: OnError = "raise",
    max_words: PositiveInt = 50,
    decode_threads: PositiveInt = 1,
):
    """Video QA from LAVIS's MSRVTT-QA files (``qa_{train,val,test}.json``), for task ``vqa.v1``.

    Entries ``{"question_id", "question", "answer", "video"}``; one answer per question, so ``vqa_acc`` is the
    exact-match accuracy (after VQA answer normalisation). Batches hold ``image (B, T, 3, S, S)``.

    Args:
        video_root: folder the annotations' video paths are relative to.
        train_file: train questions; ``None``: no train split.
        val_file: eval questions; ``None``: no val split.
        test_file: eval questions; ``None``: no test split.
        answer_list: candidates for ``rank`` inference: a JSON list or LAVIS's ``train_ans2label.json``;
            ``None``: the train file's distinct answers, most frequent first.
        num_frames_train: frames per training clip (paper: 8).
        num_frames_eval: frames per evaluation clip (paper: 16).
        sampling_train: ``random``, ``uniform`` or ``headtail``.
        sampling_eval: frame sampling for evaluation.
        on_error: ``raise`` a DataError naming an unreadable video, or ``skip`` it (counted, logged once).
        max_words: questions are cut to this many words.
        decode_threads: decoder threads per clip.
    """
    from unitrans.data.video_json import VideoQAData

    return VideoQAData(
        video_root=_abs(video_root), train_file=_abs(train_file), val_file=_abs(val_file),
        test_file=_abs(test_file), answer_list=_abs(answer_list), num_frames_train=num_frames_train,
        num_frames_eval=num_frames_eval, sampling_train=sampling_train, sampling_eval=sampling_eval,
        on_error=on_error, max_words=max_words, num_threads=decode_threads,
    )


def _shapes_video(task, root, n_train, n_val, n_test, clip_frames, clip_size, captions_per_video, seed,
                  num_frames_train, num_frames_eval, sampling_train, sampling_eval, max_words):
    from unitrans.data.shapes_video import ShapesVideoData

    generator = dict(n_train=n_train, n_val=n_val, n_test=n_test, num_frames=clip_frames, image_size=clip_size,
                     captions_per_video=captions_per_video, seed=seed)
    loader = dict(num_frames_train=num_frames_train, num_frames_eval=num_frames_eval, sampling_train=sampling_train,
                  sampling_eval=sampling_eval, max_words=max_words)
    return ShapesVideoData(task, _abs(root), generator, loader)


@registry.datasets.register("shapes_video_retrieval.v1")
def shapes_video_retrieval_v1(
    root: str = "runs/data/shapes_video",
    n_train: PositiveInt = 400,
    n_val: PositiveInt = 60,
    n_test: PositiveInt = 60,
    clip_frames: Annotated[int, Field(ge=2)] = 16,
    clip_size: Annotated[int, Field(ge=32, multiple_of=2)] = 64,
    captions_per_video: PositiveInt = 2,
    seed: int = 0,
    num_frames_train: PositiveInt = 4,
    num_frames_eval: PositiveInt = 8,
    sampling_train: FrameSampling = "random",
    sampling_eval: FrameSampling = "uniform",
    max_words: PositiveInt = 30,
):
    """Project-made MP4s of a coloured shape moving left, right, up or down, with captions ("a red circle moves
    from left to right"), written in LAVIS's DiDeMo format and read by ``didemo_retrieval``'s loader (offline).

    Args:
        root: output folder (generated once per parameter set; shared with ``shapes_video_qa``).
        n_train: train clips (each gives ``captions_per_video`` train entries).
        n_val: validation clips.
        n_test: test clips.
        clip_frames: frames written per clip.
        clip_size: frame side written (the model input size is the backbone's).
        captions_per_video: paraphrased captions per clip.
        seed: generator seed.
        num_frames_train: frames sampled per training clip.
        num_frames_eval: frames sampled per evaluation clip.
        sampling_train: ``random``, ``uniform`` or ``headtail``.
        sampling_eval: frame sampling for evaluation.
        max_words: captions are cut to this many words.
    """
    return _shapes_video("retrieval", root, n_train, n_val, n_test, clip_frames, clip_size, captions_per_video,
                         seed, num_frames_train, num_frames_eval, sampling_train, sampling_eval, max_words)


@registry.datasets.register("shapes_video_qa.v1")
def shapes_video_qa_v1(
    root: str = "runs/data/shapes_video",
    n_train: PositiveInt = 400,
    n_val: PositiveInt = 60,
    n_test: PositiveInt = 60,
    clip_frames: Annotated[int, Field(ge=2)] = 16,
    clip_size: Annotated[int, Field(ge=32, multiple_of=2)] = 64,
    captions_per_video: PositiveInt = 2,
    seed: int = 0,
    num_frames_train: PositiveInt = 4,
    num_frames_eval: PositiveInt = 8,
    sampling_train: FrameSampling = "random",
    sampling_eval: FrameSampling = "uniform",
    max_words: PositiveInt = 50,
):
    """The ``shapes_video_retrieval`` clips with three questions each ("which direction does the red circle
    move?", colour, shape), in LAVIS's MSRVTT-QA format with an answer list, for ``vqa.v1`` (offline).

    Args:
        root: output folder (shared with ``shapes_video_retrieval`` for the same parameters).
        n_train: train clips (three questions each).
        n_val: validation clips.
        n_test: test clips.
        clip_frames: frames written per clip.
        clip_size: frame side written.
        captions_per_video: captions per clip (the retrieval files; part of the generator's parameters).
        seed: generator seed.
        num_frames_train: frames sampled per training clip.
        num_frames_eval: frames sampled per evaluation clip.
        sampling_train: ``random``, ``uniform`` or ``headtail``.
        sampling_eval: frame sampling for evaluation.
        max_words: questions are cut to this many words.
    """
    return _shapes_video("qa", root, n_train, n_val, n_test, clip_frames, clip_size, captions_per_video, seed,
                         num_frames_train, num_frames_eval, sampling_train, sampling_eval, max_words)

"""Datasets: registered builders (light: no torch, PIL or numpy at import).

Implementations: ``blip_json.py`` (BLIP annotation format), ``images.py`` (loading, transforms), ``shapes.py``
(synthetic data). A builder's typed signature is its spec schema; the builder returns an object whose
``setup(image_size, mean, std)`` returns a :class:`unitrans.interfaces.DataModule`. Relative paths in a spec are
relative to the current working directory when the builder is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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

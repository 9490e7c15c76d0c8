"""Captioning in BLIP's format (``coco_karpathy_{train,val,test}.json`` + COCO-format ``*_gt.json``).

Train file: as for retrieval, one entry per caption. Eval file: one entry per image. An eval image's integer id is
its ``image_id``; else, as BLIP does, the number ending its file name (``COCO_val2014_000000391895.jpg`` ->
391895); else, when no ground-truth file has to be matched, its position in the file. Ground truth: a COCO-format
file, or the eval file's own captions. Reading: :func:`unitrans.data.entries.caption_eval`.
"""

from unitrans.data import BlipCaptionData
from unitrans.data.entries import image_id_from_path
from unitrans.data.layouts import read_coco_gt

__all__ = ["BlipCaptionData", "image_id_from_path", "read_coco_gt"]

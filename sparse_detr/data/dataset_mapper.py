"""Dataset mappers of Sparse DETR, chosen by INPUT.DATASET_MAPPER ("detr" or "default")."""
import logging
from typing import Dict

import numpy as np
from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n

from .transforms import build_detr_train_augmentation

__all__ = ["DetrDatasetMapper", "build_dataset_mapper", "drop_invalid_boxes"]

WARNED_IMAGES = 10  # images with invalid boxes that get a warning (per process)


def drop_invalid_boxes(dataset_dict: Dict) -> Dict:
    """`dataset_dict` without the annotations whose box has zero or negative width or height (Detectron2
    drops the zero-size ones after augmentation but turns a negative size into a positive one), with a
    warning for the first WARNED_IMAGES images that have such boxes or boxes leaving the image (which
    Detectron2 clips); the image size comes from the dict's "height" and "width". The input is not modified."""
    annos = dataset_dict.get("annotations", [])
    if not annos:
        return dataset_dict
    boxes = np.array([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                     dtype=np.float64).reshape(-1, 4)
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    outside = np.zeros(len(boxes), dtype=bool)
    if "height" in dataset_dict and "width" in dataset_dict:
        h, w = dataset_dict["height"], dataset_dict["width"]
        outside = ~empty & ((boxes[:, :2] < 0).any(1) | (boxes[:, 2] > w) | (boxes[:, 3] > h))
    if empty.any() or outside.any():
        log_first_n(logging.WARNING,
                    f"{dataset_dict.get('file_name', 'an image')}: {int(empty.sum())} of {len(annos)} boxes have "
                    f"zero or negative width or height (dropped), {int(outside.sum())} extend outside the image "
                    f"(clipped); warned for the first {WARNED_IMAGES} such images only", n=WARNED_IMAGES, key="caller")
    if not empty.any():
        return dataset_dict
    return {**dataset_dict, "annotations": [a for a, bad in zip(annos, empty) if not bad]}


class DetrDatasetMapper(DatasetMapper):
    """Detectron2's `DatasetMapper` with the official DETR training augmentation.

    Reading (any PIL mode is converted to INPUT.FORMAT, e.g. grayscale/RGBA -> RGB), crowd removal,
    box transformation and clipping, and the removal of empty boxes are Detectron2's; boxes of zero or
    negative size in the dataset are dropped first, with a warning (`drop_invalid_boxes`). The output
    `instances.gt_boxes` are absolute XYXY boxes in the augmented image, whose (H, W) is the
    `image` tensor's shape; the model normalises them with `ImageList.image_sizes`. At test time
    the image is resized by INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, as the official 800/1333.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        # Detectron2's own augmentation list is replaced; its flip would reject RANDOM_FLIP "both".
        base = cfg.clone()
        base.defrost()
        base.INPUT.RANDOM_FLIP = "none"
        ret = super().from_config(base, is_train)
        if is_train:
            ret["augmentations"] = build_detr_train_augmentation(cfg)
        return ret

    def __call__(self, dataset_dict: Dict) -> Dict:
        if self.is_train:
            dataset_dict = drop_invalid_boxes(dataset_dict)
        return super().__call__(dataset_dict)


_MAPPERS = {"detr": DetrDatasetMapper, "default": DatasetMapper}


def build_dataset_mapper(cfg, is_train: bool):
    """The mapper named by cfg.INPUT.DATASET_MAPPER."""
    name = cfg.INPUT.DATASET_MAPPER
    if name not in _MAPPERS:
        raise ValueError(f"INPUT.DATASET_MAPPER must be one of {sorted(_MAPPERS)}, got {name!r}")
    return _MAPPERS[name](cfg, is_train)

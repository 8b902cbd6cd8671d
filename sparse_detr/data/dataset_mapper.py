"""Dataset mappers of Sparse DETR, chosen by INPUT.DATASET_MAPPER ("detr" or "default")."""
import copy
import logging
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances
from detectron2.utils.logger import log_first_n

from .box_windows import annotation_boxes
from .image_cache import ImageCache
from .mosaic import build_mosaic, sample_mosaic_layout
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
    boxes = annotation_boxes(annos)
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

    With INPUT.DETR_MOSAIC_PROB > 0, a training image is replaced with that probability by a mosaic
    (`sparse_detr.data.mosaic`) of itself and three images drawn from `mosaic_pool` (the training
    datasets), before the augmentation.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, mosaic_prob: float = 0.0, mosaic_pool: Sequence[Dict] = (),
                 image_cache_mb: int = 0, **kwargs):
        super().__init__(is_train, **kwargs)
        if not 0.0 <= mosaic_prob <= 1.0:
            raise ValueError(f"INPUT.DETR_MOSAIC_PROB={mosaic_prob} must be in [0, 1]")
        if mosaic_prob > 0 and not mosaic_pool:
            raise ValueError("INPUT.DETR_MOSAIC_PROB > 0 needs training images to draw from (DATASETS.TRAIN)")
        if image_cache_mb < 0:
            raise ValueError(f"DATALOADER.IMAGE_CACHE_MB={image_cache_mb} must be >= 0 (0: no cache)")
        self.mosaic_prob, self.mosaic_pool = mosaic_prob, list(mosaic_pool)
        self.image_cache = ImageCache(image_cache_mb * 2**20)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        # Detectron2's own augmentation list is replaced; its flip would reject RANDOM_FLIP "both".
        base = cfg.clone()
        base.defrost()
        base.INPUT.RANDOM_FLIP = "none"
        ret = super().from_config(base, is_train)
        if is_train:
            ret["augmentations"] = build_detr_train_augmentation(cfg)
            ret["mosaic_prob"] = cfg.INPUT.DETR_MOSAIC_PROB
            ret["image_cache_mb"] = cfg.DATALOADER.IMAGE_CACHE_MB
            if cfg.INPUT.DETR_MOSAIC_PROB > 0:
                ret["mosaic_pool"] = get_detection_dataset_dicts(
                    cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        return ret

    def __call__(self, dataset_dict: Dict) -> Dict:
        if not self.is_train:
            return super().__call__(dataset_dict)
        dataset_dict = drop_invalid_boxes(dataset_dict)
        if self.mosaic_prob > 0 and np.random.uniform() < self.mosaic_prob:
            others = np.random.randint(len(self.mosaic_pool), size=3)
            return self._map_mosaic([dataset_dict] + [drop_invalid_boxes(self.mosaic_pool[i]) for i in others])
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below
        return self._augment(dataset_dict, self._read_image(dataset_dict))

    def _read_image(self, dataset_dict: Dict) -> np.ndarray:
        """The dict's image, through the image cache (DATALOADER.IMAGE_CACHE_MB);
        a missing "width"/"height" is set from it."""
        image = self.image_cache.get(dataset_dict["file_name"],
                                     lambda: utils.read_image(dataset_dict["file_name"], format=self.image_format))
        utils.check_image_size(dataset_dict, image)
        return image

    def _augment(self, dataset_dict: Dict, image: np.ndarray) -> Dict:
        """`dataset_dict` (modified) with the augmented "image" (C, H, W) uint8 tensor and its "instances"."""
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict

    def _transform_annotations(self, dataset_dict: Dict, transforms, image_shape) -> None:
        """Detectron2's box transformation (boxes to XYXY_ABS, transformed, clipped to the image; crowd
        boxes dropped; empty boxes filtered) on all boxes of the image at once: Detectron2 transforms one
        annotation at a time, about 0.2 ms each, 4 ms for a DeepForest tile's 20 trees in the data
        loader, whose worker takes its time from the training step on 2 CPU cores. In float64 also for
        integer boxes, which Detectron2 transforms in integer arithmetic. Masks and keypoints take
        Detectron2's own path."""
        if self.use_instance_mask or self.use_keypoint:
            return super()._transform_annotations(dataset_dict, transforms, image_shape)
        annos = [a for a in dataset_dict.pop("annotations") if a.get("iscrowd", 0) == 0]
        height, width = image_shape
        boxes = transforms.apply_box(annotation_boxes(annos)).clip(min=0)
        boxes = np.minimum(boxes, np.array([width, height, width, height], dtype=boxes.dtype))
        instances = Instances(image_shape)
        instances.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
        instances.gt_classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)

    def _map_mosaic(self, dataset_dicts: List[Dict]) -> Dict:
        """The mapped mosaic of the four dicts, the size of the first; it keeps the first's other keys."""
        images = [self._read_image(dict(source)) for source in dataset_dicts]
        height, width = images[0].shape[:2]
        centre, origins = sample_mosaic_layout(height, width, [im.shape[:2] for im in images], np.random)
        image, annotations = build_mosaic([(im, d.get("annotations", [])) for im, d in zip(images, dataset_dicts)],
                                          height, width, centre, origins)
        return self._augment({**dataset_dicts[0], "annotations": annotations}, image)


_MAPPERS = {"detr": DetrDatasetMapper, "default": DatasetMapper}


def build_dataset_mapper(cfg, is_train: bool):
    """The mapper named by cfg.INPUT.DATASET_MAPPER."""
    name = cfg.INPUT.DATASET_MAPPER
    if name not in _MAPPERS:
        raise ValueError(f"INPUT.DATASET_MAPPER must be one of {sorted(_MAPPERS)}, got {name!r}")
    return _MAPPERS[name](cfg, is_train)

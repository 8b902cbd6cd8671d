"""The official (DETR / Deformable DETR) training augmentation as Detectron2 augmentations."""
import sys
from typing import List

from detectron2.data import transforms as T

__all__ = ["RandomSelect", "build_detr_train_augmentation"]


class RandomSelect(T.Augmentation):
    """Apply the augmentations `first` with probability `prob`, else the augmentations `second`."""

    def __init__(self, first: List[T.Augmentation], second: List[T.Augmentation], prob: float = 0.5):
        super().__init__()
        self.first = T.AugmentationList(first)
        self.second = T.AugmentationList(second)
        self.prob = prob

    def __call__(self, aug_input):
        chosen = self.first if self._rand_range() < self.prob else self.second
        return chosen(aug_input)


def build_detr_train_augmentation(cfg) -> List[T.Augmentation]:
    """Flip, then either a multi-scale resize or (resize, random-size crop, multi-scale resize), the
    crop branch with probability INPUT.DETR_CROP_PROB (official `datasets/coco.py:make_coco_transforms
    ("train")`: 0.5).

    Keys: INPUT.RANDOM_FLIP, INPUT.DETR_RESIZE_MIN_SIZES / DETR_RESIZE_MAX_SIZE (the multi-scale
    resize), INPUT.DETR_CROP_PRE_SIZES (shortest edge before the crop, no max size),
    INPUT.DETR_CROP_SIZE (min, max crop height and width, sampled independently), INPUT.DETR_CROP_PROB.
    """
    crop_prob = cfg.INPUT.DETR_CROP_PROB
    if not 0.0 <= crop_prob <= 1.0:
        raise ValueError(f"INPUT.DETR_CROP_PROB={crop_prob} must be in [0, 1]")
    resize = T.ResizeShortestEdge(
        cfg.INPUT.DETR_RESIZE_MIN_SIZES, cfg.INPUT.DETR_RESIZE_MAX_SIZE, sample_style="choice"
    )
    crop_branch = [
        T.ResizeShortestEdge(cfg.INPUT.DETR_CROP_PRE_SIZES, sys.maxsize, sample_style="choice"),
        T.RandomCrop("absolute_range", tuple(cfg.INPUT.DETR_CROP_SIZE)),
        resize,
    ]
    augs = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    augs.append(RandomSelect([resize], crop_branch, prob=1.0 - crop_prob))
    return augs

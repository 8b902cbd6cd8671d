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


FLIP_MODES = ("horizontal", "vertical", "both", "none")


def _flips(mode: str) -> List[T.Augmentation]:
    """INPUT.RANDOM_FLIP as augmentations: each flip with probability 0.5 ("both": independently)."""
    if mode not in FLIP_MODES:
        raise ValueError(f"INPUT.RANDOM_FLIP={mode!r}; allowed: {', '.join(FLIP_MODES)}")
    horizontal = [T.RandomFlip(horizontal=True, vertical=False)] if mode in ("horizontal", "both") else []
    vertical = [T.RandomFlip(horizontal=False, vertical=True)] if mode in ("vertical", "both") else []
    return horizontal + vertical


def build_detr_train_augmentation(cfg) -> List[T.Augmentation]:
    """Flip, then either a multi-scale resize or (resize, random-size crop, multi-scale resize), the
    crop branch with probability INPUT.DETR_CROP_PROB (official `datasets/coco.py:make_coco_transforms
    ("train")`: 0.5). For overhead imagery, where no direction is "up", two optional extras (off by
    default, as officially): a rotation by 0/90/180/270 degrees before the flips (INPUT.DETR_ROTATE_90;
    with the flips "both" it gives all 8 orientations) and a colour jitter after the resize.

    Keys: INPUT.RANDOM_FLIP ("horizontal", "vertical", "both", "none"), INPUT.DETR_RESIZE_MIN_SIZES /
    DETR_RESIZE_MAX_SIZE (the multi-scale resize), INPUT.DETR_CROP_PRE_SIZES (shortest edge before the
    crop, no max size), INPUT.DETR_CROP_SIZE (min, max crop height and width, sampled independently),
    INPUT.DETR_CROP_PROB, INPUT.DETR_ROTATE_90, INPUT.DETR_COLOR_JITTER (s: brightness, contrast and
    saturation each scaled by a factor drawn from [1 - s, 1 + s]; 0 is off).
    """
    crop_prob, jitter = cfg.INPUT.DETR_CROP_PROB, cfg.INPUT.DETR_COLOR_JITTER
    if not 0.0 <= crop_prob <= 1.0:
        raise ValueError(f"INPUT.DETR_CROP_PROB={crop_prob} must be in [0, 1]")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"INPUT.DETR_COLOR_JITTER={jitter} must be in [0, 1)")
    resize = T.ResizeShortestEdge(
        cfg.INPUT.DETR_RESIZE_MIN_SIZES, cfg.INPUT.DETR_RESIZE_MAX_SIZE, sample_style="choice"
    )
    crop_branch = [
        T.ResizeShortestEdge(cfg.INPUT.DETR_CROP_PRE_SIZES, sys.maxsize, sample_style="choice"),
        T.RandomCrop("absolute_range", tuple(cfg.INPUT.DETR_CROP_SIZE)),
        resize,
    ]
    augs: List[T.Augmentation] = []
    if cfg.INPUT.DETR_ROTATE_90:  # exact for multiples of 90 degrees (boxes stay tight)
        augs.append(T.RandomRotation([0, 90, 180, 270], expand=True, sample_style="choice"))
    augs += _flips(cfg.INPUT.RANDOM_FLIP)
    augs.append(RandomSelect([resize], crop_branch, prob=1.0 - crop_prob))
    if jitter > 0:
        low, high = 1.0 - jitter, 1.0 + jitter
        augs += [T.RandomBrightness(low, high), T.RandomContrast(low, high), T.RandomSaturation(low, high)]
    return augs

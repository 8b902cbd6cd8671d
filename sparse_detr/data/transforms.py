"""The official (DETR / Deformable DETR) training augmentation as Detectron2 augmentations."""
import sys
from typing import List

import cv2
import numpy as np
from detectron2.data import transforms as T

__all__ = ["RandomSelect", "Rotate90Transform", "RandomRotate90", "RandomColorJitter", "RandomHueRotation",
           "build_detr_train_augmentation"]


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


class Rotate90Transform(T.Transform):
    """Rotation by k * 90 degrees counterclockwise (k in 1..3) of an image of (height, width), exact: the
    pixels are moved, not resampled (as `np.rot90`). The same image and boxes as Detectron2's
    `RotationTransform(height, width, 90 * k, expand=True)`, which warps the image through OpenCV at
    about 30x the cost."""

    def __init__(self, k: int, height: int, width: int):
        super().__init__()
        if k not in (1, 2, 3):
            raise ValueError(f"Rotate90Transform: k={k} must be 1, 2 or 3 quarter turns")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(img, self.k))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        x, y = coords[:, 0], coords[:, 1]
        turned = {1: (y, self.width - x), 2: (self.width - x, self.height - y), 3: (self.height - y, x)}[self.k]
        return np.stack(turned, axis=1).astype(coords.dtype, copy=False)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def inverse(self) -> T.Transform:
        height, width = (self.width, self.height) if self.k % 2 else (self.height, self.width)
        return Rotate90Transform(4 - self.k, height, width)


class RandomRotate90(T.Augmentation):
    """A rotation by 0, 90, 180 or 270 degrees, drawn uniformly (`Rotate90Transform`). It draws its angle
    as Detectron2's `RandomRotation([0, 90, 180, 270], expand=True, sample_style="choice")` and gives the
    same images and boxes, so a seeded run is unchanged."""

    def get_transform(self, image):
        angle = np.random.choice([0, 90, 180, 270])
        if angle == 0:
            return T.NoOpTransform()
        return Rotate90Transform(int(angle) // 90, *image.shape[:2])


# Luma weights (ITU-R BT.601), those of Detectron2's RandomSaturation and the Y row of YIQ; they sum to 1.
_LUMA_RGB = np.array([0.299, 0.587, 0.114])


class RandomColorJitter(T.Augmentation):
    """Brightness, contrast and saturation, each scaled by a factor drawn uniformly from [low, high] (in
    that order, as Detectron2's RandomBrightness, RandomContrast and RandomSaturation one after the
    other), applied as one affine colour map: pixel -> c*b*(s*I + (1-s)*1*luma^T) @ pixel + (1-c)*b*mean,
    with `mean` the image's mean value. The chain of the three Detectron2 augmentations is the same map
    except for its clipping to [0, 255] after each step (here once, at the end); one pass over the image
    (OpenCV's `transform`) costs the data loader 0.1 ms instead of 10 ms for a 448 px tile, and on 2 CPU
    cores the loader's worker takes its time from the training step. `image_format`: "RGB" or "BGR"."""

    def __init__(self, low: float, high: float, image_format: str = "RGB"):
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"RandomColorJitter needs an RGB or BGR image, got INPUT.FORMAT={image_format!r}")
        self.low, self.high = low, high
        self.luma = _LUMA_RGB if image_format == "RGB" else _LUMA_RGB[::-1]

    def get_transform(self, image):
        brightness, contrast, saturation = (self._rand_range(self.low, self.high) for _ in range(3))
        mix = saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), self.luma)
        matrix = contrast * brightness * mix  # acts on pixel column vectors
        pivot = (1.0 - contrast) * brightness

        def jitter(img: np.ndarray) -> np.ndarray:
            offset = pivot * np.mean(cv2.mean(img)[:3])
            affine = np.concatenate([matrix, np.full((3, 1), offset)], axis=1)
            out = cv2.transform(img, affine)  # saturates uint8 results to [0, 255]
            return out if img.dtype == np.uint8 else np.clip(out, 0, 255)

        return T.ColorTransform(jitter)


# RGB <-> YIQ (NTSC): Y is the luma, (I, Q) the chroma plane, in which a rotation turns the hue.
_RGB_TO_YIQ = np.array([_LUMA_RGB, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


class RandomHueRotation(T.Augmentation):
    """Turn the hue of the whole image by an angle drawn uniformly from [-max_degrees, max_degrees]: a
    rotation of the chroma plane in YIQ space, which keeps the luma and greys. One 3x3 colour matrix
    per image, so it is cheaper than a round trip through HSV; values are clipped to [0, 255].
    `image_format` is the channel order of the images it gets ("RGB" or "BGR")."""

    def __init__(self, max_degrees: float, image_format: str = "RGB"):
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"RandomHueRotation needs an RGB or BGR image, got INPUT.FORMAT={image_format!r}")
        self.max_degrees = max_degrees
        self.image_format = image_format

    def get_transform(self, image):
        theta = np.deg2rad(self._rand_range(-self.max_degrees, self.max_degrees))
        cos, sin = np.cos(theta), np.sin(theta)
        rotate_chroma = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
        matrix = _YIQ_TO_RGB @ rotate_chroma @ _RGB_TO_YIQ  # acts on RGB column vectors
        if self.image_format == "BGR":
            matrix = matrix[::-1, ::-1]
        matrix = matrix.T.astype(np.float32)  # for row vectors: pixels (H, W, 3) @ matrix

        def turn_hue(img: np.ndarray) -> np.ndarray:
            return np.clip(img.astype(np.float32) @ matrix, 0, 255).astype(img.dtype)

        return T.ColorTransform(turn_hue)


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
    saturation each scaled by a factor drawn from [1 - s, 1 + s]; 0 is off), INPUT.DETR_HUE_JITTER
    (degrees: the hue turned by an angle drawn from [-d, d], `RandomHueRotation`; 0 is off),
    INPUT.DETR_GRAYSCALE_PROB (the probability of turning the image grey, luma in all 3 channels; 0 is off).
    """
    crop_prob, jitter = cfg.INPUT.DETR_CROP_PROB, cfg.INPUT.DETR_COLOR_JITTER
    hue_degrees, grayscale_prob = cfg.INPUT.DETR_HUE_JITTER, cfg.INPUT.DETR_GRAYSCALE_PROB
    if not 0.0 <= crop_prob <= 1.0:
        raise ValueError(f"INPUT.DETR_CROP_PROB={crop_prob} must be in [0, 1]")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"INPUT.DETR_COLOR_JITTER={jitter} must be in [0, 1)")
    if not 0.0 <= hue_degrees <= 180.0:
        raise ValueError(f"INPUT.DETR_HUE_JITTER={hue_degrees} must be in [0, 180] (degrees)")
    if not 0.0 <= grayscale_prob <= 1.0:
        raise ValueError(f"INPUT.DETR_GRAYSCALE_PROB={grayscale_prob} must be in [0, 1]")
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
        augs.append(RandomRotate90())
    augs += _flips(cfg.INPUT.RANDOM_FLIP)
    augs.append(RandomSelect([resize], crop_branch, prob=1.0 - crop_prob))
    if jitter > 0:
        augs.append(RandomColorJitter(1.0 - jitter, 1.0 + jitter, cfg.INPUT.FORMAT))
    if hue_degrees > 0:
        augs.append(RandomHueRotation(hue_degrees, cfg.INPUT.FORMAT))
    if grayscale_prob > 0:  # a saturation factor of 0 is the luma alone
        augs.append(T.RandomApply(T.RandomSaturation(0.0, 0.0), prob=grayscale_prob))
    return augs

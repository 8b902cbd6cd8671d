"""Mosaic: one training image made of four, each filling one quadrant around a random centre.

YOLOv4's mosaic at the images' own scale (no resizing): every object keeps its size, but meets new
neighbours, backgrounds and image edges, and a batch mixes the sites of several photographs.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
from detectron2.structures import BoxMode

from .box_windows import Window, annotation_boxes, cut_boxes_to_window

__all__ = ["MOSAIC_CENTRE_RANGE", "build_mosaic", "sample_mosaic_layout"]

MOSAIC_CENTRE_RANGE = (0.25, 0.75)  # the centre's place, as a fraction of the height and of the width


def quadrants(height: int, width: int, centre: Tuple[int, int]) -> List[Window]:
    """The four windows (top-left, top-right, bottom-left, bottom-right) around `centre` = (y, x)."""
    cy, cx = centre
    return [(0, 0, cx, cy), (cx, 0, width, cy), (0, cy, cx, height), (cx, cy, width, height)]


def sample_mosaic_layout(height: int, width: int, source_sizes: Sequence[Tuple[int, int]],
                         rng: np.random.RandomState) -> Tuple[Tuple[int, int], List[Tuple[int, int]]]:
    """A random centre (y, x) of a `height` x `width` mosaic and, for each of the four sources of size
    (h, w), the top-left corner (y, x) of its crop, uniform over the places where the crop fits."""
    low, high = MOSAIC_CENTRE_RANGE
    centre = (int(rng.uniform(low, high) * height), int(rng.uniform(low, high) * width))
    origins = []
    for (x0, y0, x1, y1), (h, w) in zip(quadrants(height, width, centre), source_sizes):
        origins.append((rng.randint(0, max(h - (y1 - y0), 0) + 1), rng.randint(0, max(w - (x1 - x0), 0) + 1)))
    return centre, origins


def build_mosaic(sources: Sequence[Tuple[np.ndarray, List[Dict]]], height: int, width: int,
                 centre: Tuple[int, int], origins: Sequence[Tuple[int, int]]) -> Tuple[np.ndarray, List[Dict]]:
    """The mosaic of four (image (H, W, C), annotations) sources.

    Source k fills quadrant k (`quadrants`) with its crop whose top-left corner is `origins[k]` = (y, x);
    a source too small for its quadrant leaves the rest black. Each annotation's box is moved with its
    crop and cut to the quadrant; it is kept if at least half of its area is inside (the rule of the
    DeepForest tiles). Returns the (height, width, C) image and the annotations (XYXY_ABS boxes, the
    other keys of the source annotations kept).
    """
    image = np.zeros((height, width, sources[0][0].shape[2]), dtype=sources[0][0].dtype)
    annotations: List[Dict] = []
    for (source, annos), window, (oy, ox) in zip(sources, quadrants(height, width, centre), origins):
        x0, y0, x1, y1 = window
        crop = source[oy:oy + y1 - y0, ox:ox + x1 - x0]
        image[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        if not annos:
            continue
        shift = np.array([x0 - ox, y0 - oy, x0 - ox, y0 - oy])  # source -> mosaic
        visible = (x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])
        cut, keep = cut_boxes_to_window(annotation_boxes(annos) + shift, visible)
        annotations += [{**anno, "bbox": box.tolist(), "bbox_mode": BoxMode.XYXY_ABS}
                        for anno, box, kept in zip(annos, cut, keep) if kept]
    return image, annotations

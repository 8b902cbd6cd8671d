"""Boxes of annotation dicts, and boxes cut to a window of an image (the rule shared by the DeepForest
tiling and the mosaic)."""
from typing import Dict, List, Tuple

import numpy as np
from detectron2.structures import BoxMode

__all__ = ["MIN_VISIBLE_FRACTION", "Window", "annotation_boxes", "cut_boxes_to_window", "clip_boxes_to_window"]

Window = Tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, end exclusive)

MIN_VISIBLE_FRACTION = 0.5  # a box cut by a window edge is kept if at least this much of it is inside


def annotation_boxes(annotations: List[Dict]) -> np.ndarray:
    """The boxes of Detectron2 annotation dicts as an (N, 4) float64 XYXY_ABS array (converted all at
    once when they share one box mode, as a dataset's do)."""
    modes = {a["bbox_mode"] for a in annotations}
    if len(modes) == 1:
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        return BoxMode.convert(boxes, modes.pop(), BoxMode.XYXY_ABS)
    return np.array([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations],
                    dtype=np.float64).reshape(-1, 4)


def cut_boxes_to_window(boxes: np.ndarray, window: Window,
                        min_visible: float = MIN_VISIBLE_FRACTION) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) XYXY clipped to `window` (same coordinates), and which of them to keep (N,) bool:
    those with at least `min_visible` of their area, and some area, inside the window."""
    x0, y0, x1, y1 = window
    clipped = np.stack([np.clip(boxes[:, 0], x0, x1), np.clip(boxes[:, 1], y0, y1),
                        np.clip(boxes[:, 2], x0, x1), np.clip(boxes[:, 3], y0, y1)], axis=1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    return clipped, (inside > 0) & (inside >= min_visible * area)


def clip_boxes_to_window(boxes: np.ndarray, window: Window,
                         min_visible: float = MIN_VISIBLE_FRACTION) -> np.ndarray:
    """The kept boxes (`cut_boxes_to_window`) in window coordinates."""
    clipped, keep = cut_boxes_to_window(boxes, window, min_visible)
    return clipped[keep] - np.array([window[0], window[1], window[0], window[1]], dtype=boxes.dtype)

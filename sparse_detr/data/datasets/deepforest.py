"""The DeepForest tree-crown photographs as a COCO-format detection dataset, split by geography.

The `deepforest` wheel ships four annotated aerial RGB photographs (Pascal VOC boxes) in its
`data/` folder; its code is never imported. They are cut into 400x400 tiles and written as PNG
files plus one COCO json per split. Training tiles start every 200 px (half a tile), so that each
tree is seen in up to four tiles, at different places in the tile and with different neighbours
(measured on the main job: docs/workflows.md); validation tiles start every 400 px. The last tile
of a row or column is shifted back to end at the region's edge, so validation tiles may overlap
each other there. One class: "tree" (SOAP_061's
"Alive"/"Dead" labels both become "tree").

The split is geographic; train and validation regions are disjoint rectangles, so no validation
pixel is in a training tile:

=======================================  ===============================  ==========================
photograph                               train region (x0, y0, x1, y1)    validation region
=======================================  ===============================  ==========================
2019_YELL_2_528000_4978000_image_crop2   top, (0, 0, 2299, 2072)          bottom 400 rows
2019_YELL_2_541000_4977000_image_crop    left, (0, 0, 849, 1035)          right 400 columns
SOAP_061 (400x400)                       whole image                      -
OSBS_029 (400x400)                       -                                whole image
=======================================  ===============================  ==========================

A box cut by a tile edge is clipped to the tile and kept if at least half of its area is inside.

Run `python -m sparse_detr.data.datasets` (idempotent) to write the files under
`$DETECTRON2_DATASETS/deepforest` (default `datasets/deepforest`); `import sparse_detr.data`
registers `deepforest_trees_train` and `deepforest_trees_val` with `register_coco_instances`.
"""
import importlib.util
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from ..box_windows import Window, clip_boxes_to_window

__all__ = [
    "DEEPFOREST_SPLITS",
    "TILE_STRIDES",
    "deepforest_data_dir",
    "read_voc_boxes",
    "tile_windows",
    "clip_boxes_to_window",
    "prepare_deepforest",
    "register_deepforest",
    "photograph_of_tile",
    "in_training_split",
]

logger = logging.getLogger(__name__)

TILE_SIZE = 400
TILE_STRIDES = {"train": TILE_SIZE // 2, "val": TILE_SIZE}  # pixels between tile origins, per split
# Bump when the tiling or the split changes: prepared folders with another version are rebuilt.
FORMAT_VERSION = 2
# split -> [(photograph, region or None for the whole image)]
DEEPFOREST_SPLITS: Dict[str, List[Tuple[str, Optional[Window]]]] = {
    "train": [
        ("2019_YELL_2_528000_4978000_image_crop2", (0, 0, 2299, 2072)),
        ("2019_YELL_2_541000_4977000_image_crop", (0, 0, 849, 1035)),
        ("SOAP_061", None),
    ],
    "val": [
        ("2019_YELL_2_528000_4978000_image_crop2", (0, 2072, 2299, 2472)),
        ("2019_YELL_2_541000_4977000_image_crop", (849, 0, 1249, 1035)),
        ("OSBS_029", None),
    ],
}
CATEGORIES = [{"id": 1, "name": "tree"}]


def deepforest_data_dir() -> str:
    """The `data/` folder of the installed `deepforest` wheel (located without importing it)."""
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the deepforest wheel is not installed; run tools/setup.sh")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def read_voc_boxes(xml_path: str) -> np.ndarray:
    """(N, 4) float32 XYXY pixel boxes of a Pascal VOC annotation file (every object is a tree)."""
    root = ET.parse(xml_path).getroot()
    boxes = [
        [float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
        for obj in root.iter("object")
    ]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _starts(lo: int, hi: int, tile: int, stride: int) -> List[int]:
    """Tile origins covering [lo, hi): every `stride` pixels, the last one shifted back to end at hi."""
    if hi - lo <= tile:
        return [lo]
    starts = list(range(lo, hi - tile + 1, stride))
    if starts[-1] + tile < hi:
        starts.append(hi - tile)
    return starts


def tile_windows(region: Window, tile: int = TILE_SIZE, stride: Optional[int] = None) -> List[Window]:
    """Windows of at most `tile` x `tile` pixels covering `region`, row by row, their origins `stride`
    pixels apart (default `tile`: no overlap but at the region's far edges)."""
    stride = tile if stride is None else stride
    if not 0 < stride <= tile:
        raise ValueError(f"tile stride {stride} must be in (0, {tile}]: larger strides leave gaps")
    x0, y0, x1, y1 = region
    return [
        (x, y, min(x + tile, x1), min(y + tile, y1))
        for y in _starts(y0, y1, tile, stride)
        for x in _starts(x0, x1, tile, stride)
    ]


def _tile_file_name(photograph: str, window: Window) -> str:
    return f"{photograph}_x{window[0]}_y{window[1]}.png"


def photograph_of_tile(file_name: str) -> str:
    """The photograph a tile was cut from, from the tile's file name ("<photograph>_x<x0>_y<y0>.png")."""
    match = re.fullmatch(r"(.+)_x\d+_y\d+\.png", os.path.basename(file_name))
    if match is None:
        raise ValueError(f"{file_name!r} is not a DeepForest tile name (<photograph>_x<x0>_y<y0>.png)")
    return match.group(1)


def in_training_split(photograph: str) -> bool:
    """Whether any part of `photograph` is in the training split (False: a site unseen in training)."""
    return any(name == photograph for name, _ in DEEPFOREST_SPLITS["train"])


def _json_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"deepforest_{split}.json")


def _is_prepared(root: str) -> bool:
    for split in DEEPFOREST_SPLITS:
        try:
            with open(_json_path(root, split)) as f:
                if json.load(f)["info"].get("format_version") != FORMAT_VERSION:
                    return False
        except (OSError, ValueError, KeyError):
            return False
    return True


def _is_tile_name(file_name: str) -> bool:
    try:
        photograph_of_tile(file_name)
    except ValueError:
        return False
    return True


def _write_split(root: str, split: str, source_dir: str) -> Dict[str, int]:
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    for stale in filter(_is_tile_name, os.listdir(image_dir)):  # tiles of an earlier tiling
        os.remove(os.path.join(image_dir, stale))
    images, annotations = [], []
    for name, region in DEEPFOREST_SPLITS[split]:
        photo = Image.open(os.path.join(source_dir, name + ".png")).convert("RGB")
        boxes = read_voc_boxes(os.path.join(source_dir, name + ".xml"))
        region = region or (0, 0, photo.width, photo.height)
        for window in tile_windows(region, stride=TILE_STRIDES[split]):
            file_name = _tile_file_name(name, window)
            photo.crop(window).save(os.path.join(image_dir, file_name))
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": window[2] - window[0],
                    "height": window[3] - window[1],
                }
            )
            for x0, y0, x1, y1 in clip_boxes_to_window(boxes, window).tolist():
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
    coco = {
        "info": {"description": f"DeepForest tree crowns, {split} split", "format_version": FORMAT_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path = _json_path(root, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(coco, f)
    os.replace(path + ".tmp", path)  # the json appears last: its presence means the split is complete
    return {"images": len(images), "boxes": len(annotations)}


def prepare_deepforest(root: str, force: bool = False) -> Dict[str, Dict[str, int]]:
    """Write the tiles and COCO jsons of both splits under `root` (skipped if already there).

    Returns {split: {"images": n, "boxes": n}}.
    """
    if force or not _is_prepared(root):
        source_dir = deepforest_data_dir()
        for split in DEEPFOREST_SPLITS:
            stats = _write_split(root, split, source_dir)
            logger.info(f"DeepForest {split}: {stats['images']} tiles, {stats['boxes']} boxes")
    out = {}
    for split in DEEPFOREST_SPLITS:
        with open(_json_path(root, split)) as f:
            coco = json.load(f)
        out[split] = {"images": len(coco["images"]), "boxes": len(coco["annotations"])}
    return out


def register_deepforest(root: str) -> None:
    """Register `deepforest_trees_{train,val}` (COCO json under `root`; evaluator_type "coco")."""
    for split in DEEPFOREST_SPLITS:
        name = f"deepforest_trees_{split}"
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, _json_path(root, split), os.path.join(root, split))

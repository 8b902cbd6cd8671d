"""Tiny synthetic detection data and a tiny Sparse DETR config for the CPU tests of the engine,
train_net.py, the distributed launch and the demo (not a test module)."""
import json
import os
from typing import List

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

# R-18, hidden 32, one encoder and one decoder layer, 10 queries, 64-px images.
TINY_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.SPARSE_DETR.NUM_CLASSES", "2",
    "MODEL.SPARSE_DETR.HIDDEN_DIM", "32",
    "MODEL.SPARSE_DETR.NHEADS", "4",
    "MODEL.SPARSE_DETR.DIM_FEEDFORWARD", "64",
    "MODEL.SPARSE_DETR.ENC_LAYERS", "1",
    "MODEL.SPARSE_DETR.DEC_LAYERS", "1",
    "MODEL.SPARSE_DETR.NUM_QUERIES", "10",
    "INPUT.DETR_RESIZE_MIN_SIZES", "[64, 80]",
    "INPUT.DETR_RESIZE_MAX_SIZE", "128",
    "INPUT.DETR_CROP_PRE_SIZES", "[64, 80]",
    "INPUT.DETR_CROP_SIZE", "[48, 64]",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0",
]


def write_synthetic_coco(root: str, num_images: int = 4, seed: int = 0, size=(96, 64)) -> str:
    """Noise images with 1-3 uniformly coloured rectangles (class 1 red-ish, class 2 blue-ish); returns
    the COCO json path. Images are `<root>/images/<i>.png`."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    width, height = size
    images, annotations = [], []
    for i in range(num_images):
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(1, 3))
            w, h = (int(v) for v in rng.integers(12, 30, 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            pixels[y:y + h, x:x + w] = (220, 60, 40) if cls == 1 else (40, 80, 220)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        Image.fromarray(pixels).save(os.path.join(root, "images", f"{i}.png"))
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": width, "height": height})
    path = os.path.join(root, "synthetic.json")
    with open(path, "w") as f:
        json.dump({"info": {"description": "synthetic rectangles"}, "images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}, f)
    return path


def register_synthetic(name: str, root: str, **kwargs) -> str:
    """Write (if needed) and register a synthetic COCO dataset as `name` (replacing an older one)."""
    path = os.path.join(root, "synthetic.json")
    if not os.path.exists(path):
        write_synthetic_coco(root, **kwargs)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, path, os.path.join(root, "images"))
    return name


def tiny_opts(train: str, test: str, output_dir: str, max_iter: int, extra: List[str] = ()) -> List[str]:
    """Command-line opts of train_net.py for the tiny model on registered datasets."""
    return TINY_OPTS + [
        "DATASETS.TRAIN", f"('{train}',)",
        "DATASETS.TEST", f"('{test}',)",
        "OUTPUT_DIR", output_dir,
        "SOLVER.MAX_ITER", str(max_iter),
        *extra,
    ]

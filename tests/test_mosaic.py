"""The mosaic augmentation: four images in the quadrants of one, boxes moved with their crops."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode
from PIL import Image

from sparse_detr import add_sparse_detr_config
from sparse_detr.data import DetrDatasetMapper
from sparse_detr.data.mosaic import MOSAIC_CENTRE_RANGE, build_mosaic, sample_mosaic_layout


def _anno(box, mode=BoxMode.XYXY_ABS):
    return {"bbox": box, "bbox_mode": mode, "category_id": 0}


def test_build_mosaic_places_crops_and_cuts_boxes():
    sources = [
        (np.full((100, 100, 3), 10, np.uint8), [_anno([10, 10, 30, 30])]),
        (np.full((100, 100, 3), 20, np.uint8), [_anno([5, 5, 20, 20], BoxMode.XYWH_ABS)]),  # [5, 5, 25, 25]
        # quadrant 2 takes x 0..60 of its source: 8 of this box's 20 px of width are inside -> dropped
        (np.full((100, 100, 3), 30, np.uint8), [_anno([52, 10, 72, 30]), _anno([0, 0, 10, 10])]),
        (np.full((100, 100, 3), 40, np.uint8), [_anno([30, 20, 50, 40])]),
    ]
    origins = [(0, 0), (0, 0), (0, 0), (10, 20)]  # (y, x) of each crop in its source
    image, annos = build_mosaic(sources, 100, 100, centre=(40, 60), origins=origins)
    assert image.shape == (100, 100, 3)
    assert (image[:40, :60] == 10).all() and (image[:40, 60:] == 20).all()
    assert (image[40:, :60] == 30).all() and (image[40:, 60:] == 40).all()
    boxes = [a["bbox"] for a in annos]
    assert boxes == [[10, 10, 30, 30], [65, 5, 85, 25], [0, 40, 10, 50], [70, 50, 90, 70]]
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS and a["category_id"] == 0 for a in annos)
    assert sources[1][1][0]["bbox"] == [5, 5, 20, 20]  # the sources' annotations are not modified


def test_build_mosaic_leaves_black_where_a_source_is_too_small():
    small = (np.full((20, 30, 3), 50, np.uint8), [_anno([0, 0, 30, 20])])
    big = (np.full((100, 100, 3), 90, np.uint8), [])
    image, annos = build_mosaic([small, big, big, big], 100, 100, centre=(50, 50), origins=[(0, 0)] * 4)
    assert (image[:20, :30] == 50).all() and (image[20:50, :50] == 0).all() and (image[:20, 30:50] == 0).all()
    assert [a["bbox"] for a in annos] == [[0, 0, 30, 20]]


def test_sample_mosaic_layout_stays_inside_the_sources():
    rng = np.random.RandomState(0)
    low, high = MOSAIC_CENTRE_RANGE
    for _ in range(50):
        (cy, cx), origins = sample_mosaic_layout(100, 200, [(100, 200), (120, 250), (10, 10), (100, 200)], rng)
        assert low * 100 <= cy <= high * 100 and low * 200 <= cx <= high * 200
        quadrant_sizes = [(cy, cx), (cy, 200 - cx), (100 - cy, cx), (100 - cy, 200 - cx)]
        for (oy, ox), (qh, qw), (h, w) in zip(origins, quadrant_sizes, [(100, 200), (120, 250), (10, 10), (100, 200)]):
            assert 0 <= oy <= max(h - qh, 0) and 0 <= ox <= max(w - qw, 0)
        assert origins[2] == (0, 0)


def _register_colour_tiles(tmp_path, name):
    """Four 64x64 tiles, each one flat colour with one 16x16 box; registered as dataset `name`."""
    dicts = []
    for k in range(4):
        path = str(tmp_path / f"tile{k}.png")
        Image.fromarray(np.full((64, 64, 3), 40 + 50 * k, np.uint8)).save(path)
        dicts.append({"file_name": path, "image_id": k, "height": 64, "width": 64,
                      "annotations": [_anno([8 + 8 * k, 8, 24 + 8 * k, 24])]})
    DatasetCatalog.register(name, lambda: dicts)
    return dicts


def test_mosaic_mapper_mixes_training_images(tmp_path):
    dicts = _register_colour_tiles(tmp_path, "mosaic_colour_tiles")
    try:
        cfg = add_sparse_detr_config(get_cfg())
        cfg.DATASETS.TRAIN = ("mosaic_colour_tiles",)
        cfg.INPUT.DETR_RESIZE_MIN_SIZES, cfg.INPUT.DETR_RESIZE_MAX_SIZE = [64], 64
        cfg.INPUT.DETR_CROP_PROB, cfg.INPUT.RANDOM_FLIP = 0.0, "none"
        cfg.INPUT.DETR_MOSAIC_PROB = 1.0
        mapper = DetrDatasetMapper(cfg, is_train=True)
        np.random.seed(0)
        mixed = 0
        for _ in range(8):
            out = mapper(dict(dicts[0]))
            image, inst = out["image"], out["instances"]
            assert tuple(image.shape) == (3, 64, 64) and inst.image_size == (64, 64)
            colours = set(torch.unique(image).tolist())
            assert colours <= {40, 90, 140, 190, 0}
            mixed += len(colours - {0}) > 1
            boxes = inst.gt_boxes.tensor
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            # every kept box covers pixels of one tile's colour, the tile it came from
            for box in boxes.round().int().tolist():
                assert len(set(torch.unique(image[:, box[1]:box[3], box[0]:box[2]]).tolist()) - {0}) == 1
        assert mixed >= 6
        assert (dicts[0]["annotations"][0]["bbox"]) == [8, 8, 24, 24]
        cfg.INPUT.DETR_MOSAIC_PROB = 1.5
        with pytest.raises(ValueError, match="INPUT.DETR_MOSAIC_PROB"):
            DetrDatasetMapper(cfg, is_train=True)
    finally:
        DatasetCatalog.remove("mosaic_colour_tiles")

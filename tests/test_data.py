"""Data: the DETR dataset mapper (official augmentation) and the DeepForest dataset."""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from sparse_detr import add_sparse_detr_config
from sparse_detr.data import (
    DetrDatasetMapper, RandomHueRotation, RandomSelect, build_dataset_mapper, build_detr_train_augmentation,
)
from sparse_detr.data.datasets.deepforest import (
    DEEPFOREST_SPLITS,
    TILE_STRIDES,
    clip_boxes_to_window,
    in_training_split,
    photograph_of_tile,
    prepare_deepforest,
    register_deepforest,
    tile_windows,
)


def _cfg(**input_overrides):
    cfg = add_sparse_detr_config(get_cfg())
    for key, value in input_overrides.items():
        setattr(cfg.INPUT, key, value)
    return cfg


def _write_image(path, mode, size=(120, 90)):
    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)
    return path


def _dataset_dict(path, width=120, height=90):
    return {
        "file_name": path,
        "image_id": 0,
        "width": width,
        "height": height,
        "annotations": [
            {"bbox": [10, 10, 40, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
            {"bbox": [50, 20, 50, 60], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # zero width
            {"bbox": [60, 40, 100, 80], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1},
            {"bbox": [0, 0, 30, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 1},
        ],
    }


def test_random_select_uses_both_branches():
    first, second = T.RandomFlip(prob=1.0), T.RandomCrop("absolute", (10, 10))
    aug = RandomSelect([first], [second], prob=0.5)
    np.random.seed(0)
    kinds = set()
    for _ in range(20):
        tfms = aug(T.AugInput(np.zeros((20, 30, 3), np.uint8))).transforms
        kinds.add(type(tfms[0]).__name__)
    assert kinds == {"HFlipTransform", "CropTransform"}
    assert "RandomSelect" in repr(aug)


@pytest.mark.parametrize("crop_prob, expected",
                         [(0.0, {"ResizeTransform"}), (1.0, {"ResizeTransform", "CropTransform"})])
def test_detr_crop_prob_selects_the_branch(crop_prob, expected):
    cfg = _cfg(DETR_RESIZE_MIN_SIZES=[64], DETR_RESIZE_MAX_SIZE=160, DETR_CROP_PRE_SIZES=[80],
               DETR_CROP_SIZE=[40, 60], DETR_CROP_PROB=crop_prob, RANDOM_FLIP="none")
    aug = T.AugmentationList(build_detr_train_augmentation(cfg))
    np.random.seed(0)
    kinds = set()
    for _ in range(20):
        kinds |= {type(t).__name__ for t in aug(T.AugInput(np.zeros((90, 120, 3), np.uint8))).transforms}
    assert kinds & {"ResizeTransform", "CropTransform"} == expected


def test_detr_crop_prob_out_of_range_names_the_key():
    with pytest.raises(ValueError, match="INPUT.DETR_CROP_PROB"):
        build_detr_train_augmentation(_cfg(DETR_CROP_PROB=1.5))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_detr_mapper_train(tmp_path, mode):
    cfg = _cfg(
        DETR_RESIZE_MIN_SIZES=[64, 96],
        DETR_RESIZE_MAX_SIZE=160,
        DETR_CROP_PRE_SIZES=[80, 100],
        DETR_CROP_SIZE=[60, 80],
    )
    mapper = build_dataset_mapper(cfg, is_train=True)
    assert type(mapper) is DetrDatasetMapper
    path = _write_image(str(tmp_path / f"img_{mode}.png"), mode)
    np.random.seed(0)
    for _ in range(10):
        out = mapper(_dataset_dict(path))
        image, inst = out["image"], out["instances"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        h, w = image.shape[1:]
        assert max(h, w) <= 160
        boxes = inst.gt_boxes.tensor
        assert inst.image_size == (h, w)
        # Absolute XYXY inside the augmented image, no empty box, crowd box removed.
        assert len(inst) <= 2
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_detr_mapper_resize_branch_keeps_boxes(tmp_path):
    cfg = _cfg(DETR_RESIZE_MIN_SIZES=[180], DETR_RESIZE_MAX_SIZE=1000, RANDOM_FLIP="none")
    mapper = DetrDatasetMapper(cfg, is_train=True)
    mapper.augmentations = T.AugmentationList(mapper.augmentations.augs[-1].first.augs)  # resize only
    out = mapper(_dataset_dict(_write_image(str(tmp_path / "a.png"), "RGB")))
    assert tuple(out["image"].shape[1:]) == (180, 240)
    torch.testing.assert_close(
        out["instances"].gt_boxes.tensor, torch.tensor([[20.0, 20, 80, 60], [120, 80, 200, 160]])
    )
    assert out["instances"].gt_classes.tolist() == [0, 1]


def test_mapper_test_mode_and_selection(tmp_path):
    cfg = _cfg(MIN_SIZE_TEST=45, MAX_SIZE_TEST=1000)
    path = _write_image(str(tmp_path / "b.png"), "RGBA")
    out = build_dataset_mapper(cfg, is_train=False)(_dataset_dict(path))
    assert tuple(out["image"].shape) == (3, 45, 60)
    cfg.INPUT.DATASET_MAPPER = "default"
    assert type(build_dataset_mapper(cfg, is_train=True)) is DatasetMapper
    cfg.INPUT.DATASET_MAPPER = "nope"
    with pytest.raises(ValueError, match="DATASET_MAPPER"):
        build_dataset_mapper(cfg, is_train=True)


def test_tile_windows_cover_region():
    windows = tile_windows((0, 100, 1000, 500), tile=400)
    assert windows == [(0, 100, 400, 500), (400, 100, 800, 500), (600, 100, 1000, 500)]
    assert tile_windows((0, 0, 300, 250), tile=400) == [(0, 0, 300, 250)]
    # Overlapping tiles: origins every `stride` pixels, the last still shifted back to the edge.
    assert tile_windows((0, 0, 1000, 400), tile=400, stride=200) == [
        (0, 0, 400, 400), (200, 0, 600, 400), (400, 0, 800, 400), (600, 0, 1000, 400)]
    assert [w[0] for w in tile_windows((0, 0, 1099, 400), tile=400, stride=300)] == [0, 300, 600, 699]
    with pytest.raises(ValueError, match="stride 500"):
        tile_windows((0, 0, 1000, 400), tile=400, stride=500)
    with pytest.raises(ValueError, match="stride 0"):  # not read as "the default"
        tile_windows((0, 0, 1000, 400), tile=400, stride=0)


def test_clip_boxes_to_window():
    boxes = np.array([[10, 10, 30, 30], [90, 10, 130, 30], [95, 10, 115, 30]], np.float32)
    out = clip_boxes_to_window(boxes, (0, 0, 100, 100))
    # Boxes 2 and 3 are 25% inside the first window (dropped), wholly inside the second.
    np.testing.assert_array_equal(out, [[10, 10, 30, 30]])
    out = clip_boxes_to_window(boxes, (80, 0, 200, 100))
    np.testing.assert_array_equal(out, [[10, 10, 50, 30], [15, 10, 35, 30]])


def _overlap(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_deepforest_split_is_geographic():
    """No validation pixel in a training tile: per photograph the regions are disjoint."""
    train = dict(DEEPFOREST_SPLITS["train"])
    for name, val_region in DEEPFOREST_SPLITS["val"]:
        if name in train:
            assert val_region is not None and train[name] is not None
            assert not _overlap(val_region, train[name])
            for tw in tile_windows(train[name], stride=TILE_STRIDES["train"]):
                for vw in tile_windows(val_region, stride=TILE_STRIDES["val"]):
                    assert not _overlap(tw, vw)


def test_photograph_of_tile_reads_tile_names():
    assert photograph_of_tile("2019_YELL_2_541000_4977000_image_crop_x849_y400.png") == \
        "2019_YELL_2_541000_4977000_image_crop"
    with pytest.raises(ValueError, match="not a DeepForest tile name"):
        photograph_of_tile("OSBS_029.png")


def test_prepare_and_register_deepforest(tmp_path):
    root = str(tmp_path / "deepforest")
    stats = prepare_deepforest(root)
    assert stats["train"]["images"] >= 40 and stats["val"]["images"] >= 8
    assert stats["val"]["boxes"] >= 200
    json_path = os.path.join(root, "annotations", "deepforest_val.json")
    mtime = os.path.getmtime(json_path)
    assert prepare_deepforest(root) == stats and os.path.getmtime(json_path) == mtime  # idempotent
    # Rebuilding (a new tiling) removes the tiles of the old one and nothing else.
    stale, other = os.path.join(root, "train", "OSBS_029_x7_y7.png"), os.path.join(root, "train", "notes.txt")
    for path in (stale, other):
        open(path, "w").close()
    assert prepare_deepforest(root, force=True) == stats
    assert not os.path.exists(stale) and os.path.exists(other)
    with open(os.path.join(root, "annotations", "deepforest_train.json")) as f:
        train_files = {image["file_name"] for image in json.load(f)["images"]}
    assert train_files == {n for n in os.listdir(os.path.join(root, "train")) if n.endswith(".png")}
    with open(json_path) as f:
        val = json.load(f)
    assert val["categories"] == [{"id": 1, "name": "tree"}]
    photographs = {photograph_of_tile(image["file_name"]) for image in val["images"]}
    assert photographs == {name for name, _ in DEEPFOREST_SPLITS["val"]}
    assert {p for p in photographs if not in_training_split(p)} == {"OSBS_029"}  # the unseen site

    DatasetCatalog.remove("deepforest_trees_val")  # registered at import under datasets/
    MetadataCatalog.remove("deepforest_trees_val")
    register_deepforest(root)
    dicts = DatasetCatalog.get("deepforest_trees_val")
    meta = MetadataCatalog.get("deepforest_trees_val")
    assert meta.thing_classes == ["tree"] and meta.evaluator_type == "coco"
    assert len(dicts) == stats["val"]["images"]
    for d in dicts:
        assert os.path.exists(d["file_name"])
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x + w <= d["width"] and y + h <= d["height"]


def test_random_flip_both_and_bad_value():
    kinds = [type(a).__name__ for a in build_detr_train_augmentation(_cfg(RANDOM_FLIP="both"))]
    assert kinds[:2] == ["RandomFlip", "RandomFlip"]
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP='diagonal'; allowed: horizontal, vertical, both, none"):
        build_detr_train_augmentation(_cfg(RANDOM_FLIP="diagonal"))
    with pytest.raises(ValueError, match="INPUT.DETR_COLOR_JITTER"):
        build_detr_train_augmentation(_cfg(DETR_COLOR_JITTER=1.0))
    with pytest.raises(ValueError, match=r"INPUT.DETR_HUE_JITTER=200.0 must be in \[0, 180\]"):
        build_detr_train_augmentation(_cfg(DETR_HUE_JITTER=200.0))
    with pytest.raises(ValueError, match=r"INPUT.DETR_GRAYSCALE_PROB=1.5 must be in \[0, 1\]"):
        build_detr_train_augmentation(_cfg(DETR_GRAYSCALE_PROB=1.5))


def test_grayscale_augmentation_greys_every_image_at_probability_1():
    """DETR_GRAYSCALE_PROB 1: every pixel becomes its luma (0.299 R + 0.587 G + 0.114 B) in all 3
    channels; at 0 the augmentation is not in the list."""
    cfg = _cfg(DETR_RESIZE_MIN_SIZES=[2], DETR_RESIZE_MAX_SIZE=1000, DETR_CROP_PROB=0.0, RANDOM_FLIP="none",
               DETR_GRAYSCALE_PROB=1.0)
    image = np.array([[[200, 40, 10], [0, 255, 0]], [[10, 20, 250], [128, 128, 128]]], np.uint8)
    aug_input = T.AugInput(image.copy())
    T.AugmentationList(build_detr_train_augmentation(cfg))(aug_input)
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(aug_input.image, np.repeat(luma[..., None], 3, axis=2), atol=1)
    kinds = [type(a).__name__ for a in build_detr_train_augmentation(_cfg(DETR_GRAYSCALE_PROB=0.0))]
    assert "RandomApply" not in kinds


def _hue_degrees(rgb):
    import colorsys
    return 360.0 * colorsys.rgb_to_hsv(*(np.asarray(rgb, np.float64) / 255.0))[0]


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_hue_rotation_turns_hue_and_keeps_greys(image_format):
    """A fixed 30-degree turn (the range's end, drawn by a patched sampler): greys stay, a saturated
    green moves by about 30 degrees of HSV hue (YIQ and HSV hues differ a little), in either channel order."""
    pixels = np.array([[[128, 128, 128], [40, 160, 40], [200, 200, 200]]], np.uint8)  # RGB
    aug = RandomHueRotation(30.0, image_format)
    aug._rand_range = lambda low, high: high
    image = pixels if image_format == "RGB" else pixels[..., ::-1].copy()
    out = aug.get_transform(image).apply_image(image)
    out = out if image_format == "RGB" else out[..., ::-1]
    assert out.dtype == np.uint8
    np.testing.assert_allclose(out[0, [0, 2]], pixels[0, [0, 2]], atol=1)
    turned = (_hue_degrees(out[0, 1]) - _hue_degrees(pixels[0, 1]) + 180) % 360 - 180
    assert 20 < abs(turned) < 40
    aug._rand_range = lambda low, high: low  # the opposite end turns the other way
    back = aug.get_transform(image).apply_image(image)
    back = back if image_format == "RGB" else back[..., ::-1]
    assert np.sign((_hue_degrees(back[0, 1]) - _hue_degrees(pixels[0, 1]) + 180) % 360 - 180) == -np.sign(turned)
    with pytest.raises(ValueError, match="RGB or BGR"):
        RandomHueRotation(10.0, "L")


def test_rotate_90_and_colour_jitter_keep_boxes_on_their_pixels(tmp_path):
    """Through the mapper, with every orientation: each box still frames its white rectangle."""
    cfg = _cfg(DETR_RESIZE_MIN_SIZES=[90], DETR_RESIZE_MAX_SIZE=1000, DETR_CROP_PROB=0.0, RANDOM_FLIP="both",
               DETR_ROTATE_90=True, DETR_COLOR_JITTER=0.2, DETR_HUE_JITTER=20.0)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    image = np.zeros((90, 120, 3), np.uint8)
    image[10:30, 10:40] = 255  # the first annotation's box (XYXY 10, 10, 40, 30)
    path = str(tmp_path / "r.png")
    Image.fromarray(image).save(path)
    record = {"file_name": path, "image_id": 0, "width": 120, "height": 90,
              "annotations": [{"bbox": [10, 10, 40, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}]}
    np.random.seed(0)
    shapes = set()
    for _ in range(24):
        out = mapper(dict(record))
        img = out["image"].float().mean(0)
        ys, xs = torch.nonzero(img > img.max() / 2, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        torch.testing.assert_close(out["instances"].gt_boxes.tensor[0], found, atol=1.0, rtol=0)
        shapes.add(tuple(out["image"].shape[1:]))
    assert shapes == {(90, 120), (120, 90)}  # rotated by 90 degrees some of the time

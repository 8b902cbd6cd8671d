"""The DETR mapper's cheaper paths give what Detectron2's own would: the one-pass colour jitter, the
exact quarter-turn rotation, the all-boxes-at-once annotation transform and the image cache."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from sparse_detr import add_sparse_detr_config
from sparse_detr.data import DetrDatasetMapper
from sparse_detr.data.image_cache import ImageCache
from sparse_detr.data.transforms import RandomColorJitter, RandomRotate90, Rotate90Transform


def _fixed_draws(aug, values):
    draws = iter(values)
    aug._rand_range = lambda low, high: next(draws)
    return aug


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_colour_jitter_is_detectron2s_brightness_contrast_saturation_chain(image_format):
    rng = np.random.default_rng(0)
    image = rng.integers(70, 170, (30, 40, 3), dtype=np.uint8)  # no step of the chain saturates
    factors = (1.15, 0.85, 1.2)  # brightness, contrast, saturation
    jitter = _fixed_draws(RandomColorJitter(0.8, 1.2, image_format), factors)
    ours = jitter.get_transform(image).apply_image(image if image_format == "RGB" else image[..., ::-1].copy())
    ours = ours if image_format == "RGB" else ours[..., ::-1]
    chain = image
    for aug, factor in zip([T.RandomBrightness, T.RandomContrast, T.RandomSaturation], factors):
        chain = aug(factor, factor).get_transform(chain).apply_image(chain)
    assert ours.dtype == np.uint8 and ours.shape == image.shape
    assert np.abs(ours.astype(int) - chain.astype(int)).max() <= 3  # each of the chain's 3 steps truncates
    assert np.abs(ours.astype(int) - image.astype(int)).max() > 10  # and it did change the image


def test_colour_jitter_saturates_instead_of_wrapping():
    image = np.full((4, 4, 3), 250, np.uint8)
    out = _fixed_draws(RandomColorJitter(0.8, 1.2), (1.2, 1.0, 1.0)).get_transform(image).apply_image(image)
    assert (out == 255).all()
    with pytest.raises(ValueError, match="RGB or BGR"):
        RandomColorJitter(0.8, 1.2, "L")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotate_90_is_detectron2s_rotation_exactly(k):
    rng = np.random.default_rng(k)
    image = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    boxes = np.array([[3.0, 4.0, 20.0, 9.0], [0.0, 0.0, 50.0, 30.0], [41.5, 12.25, 49.0, 29.0]])
    ours, theirs = Rotate90Transform(k, 30, 50), T.RotationTransform(30, 50, 90 * k, expand=True)
    assert np.array_equal(ours.apply_image(image), theirs.apply_image(image))
    np.testing.assert_allclose(ours.apply_box(boxes), theirs.apply_box(boxes), atol=1e-4)
    back = ours.inverse()
    assert np.array_equal(back.apply_image(ours.apply_image(image)), image)
    np.testing.assert_allclose(back.apply_box(ours.apply_box(boxes)), boxes, atol=1e-9)
    with pytest.raises(ValueError, match="k=4"):
        Rotate90Transform(4, 30, 50)


def test_random_rotate_90_draws_as_detectron2s_random_rotation():
    image = np.zeros((30, 50, 3), np.uint8)
    np.random.seed(3)
    ours = [RandomRotate90().get_transform(image) for _ in range(24)]
    np.random.seed(3)
    theirs = [T.RandomRotation([0, 90, 180, 270], expand=True, sample_style="choice").get_transform(image)
              for _ in range(24)]
    for a, b in zip(ours, theirs):
        if isinstance(b, T.NoOpTransform):
            assert isinstance(a, T.NoOpTransform)
        else:
            assert a.k * 90 == b.angle
    assert {getattr(a, "k", 0) for a in ours} == {0, 1, 2, 3}


def _cfg(**overrides):
    cfg = add_sparse_detr_config(get_cfg())
    cfg.INPUT.DETR_RESIZE_MIN_SIZES = [60]
    cfg.INPUT.DETR_RESIZE_MAX_SIZE = 1000
    cfg.INPUT.DETR_CROP_PROB = 0.0
    cfg.INPUT.RANDOM_FLIP = "both"
    cfg.INPUT.DETR_ROTATE_90 = True
    cfg.INPUT.DETR_COLOR_JITTER = 0.2
    cfg.merge_from_list([item for pair in overrides.items() for item in pair])
    return cfg


def _record(tmp_path):
    path = str(tmp_path / "tile.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    # Float boxes, as datasets load them: Detectron2 transforms integer boxes in integer arithmetic
    # (truncating them), the mapper in float64.
    annotations = [
        {"bbox": [10.0, 10.0, 40.0, 30.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
        {"bbox": [60.0, 40.0, 40.0, 60.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1},  # leaves the image
        {"bbox": [0.0, 0.0, 30.0, 30.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 1},
        {"bbox": [121.0, 5.0, 125.0, 20.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # empty once clipped
    ]
    return {"file_name": path, "image_id": 0, "width": 120, "height": 90, "annotations": annotations}


def test_all_boxes_at_once_give_detectron2s_instances(tmp_path):
    mapper = DetrDatasetMapper(_cfg(), is_train=True)
    record = _record(tmp_path)
    np.random.seed(0)
    for _ in range(8):
        image = utils.read_image(record["file_name"], "RGB")
        aug_input = T.AugInput(image)
        transforms = mapper.augmentations(aug_input)
        ours, theirs = dict(record), dict(record, annotations=[dict(a) for a in record["annotations"]])
        mapper._transform_annotations(ours, transforms, aug_input.image.shape[:2])
        DatasetMapper._transform_annotations(mapper, theirs, transforms, aug_input.image.shape[:2])
        assert len(ours["instances"]) == len(theirs["instances"]) == 2
        torch.testing.assert_close(ours["instances"].gt_boxes.tensor, theirs["instances"].gt_boxes.tensor)
        assert torch.equal(ours["instances"].gt_classes, theirs["instances"].gt_classes)


def test_image_cache_keeps_images_up_to_its_size_as_copies():
    reads = []

    def reader(value):
        return lambda: reads.append(value) or np.full((10, 10, 3), value, np.uint8)  # 300 bytes

    cache = ImageCache(max_bytes=700)
    first = cache.get("a", reader(1))
    first[0, 0, 0] = 5  # the caller's copy: the cached image stays as read
    assert cache.get("a", reader(9))[0, 0, 0] == 1
    cache.get("b", reader(2))
    cache.get("c", reader(3))  # over the budget: read and returned, not kept
    cache.get("c", reader(3))
    assert reads == [1, 2, 3, 3] and len(cache) == 2 and cache.bytes == 600
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(-1)


def test_mapper_with_image_cache_maps_as_without(tmp_path):
    record = _record(tmp_path)
    outputs = []
    for cache_mb in (0, 1):
        mapper = DetrDatasetMapper(_cfg(**{"DATALOADER.IMAGE_CACHE_MB": cache_mb}), is_train=True)
        np.random.seed(0)
        outputs.append([mapper(dict(record)) for _ in range(6)])
        assert len(mapper.image_cache) == cache_mb
    for plain, cached in zip(*outputs):
        assert torch.equal(plain["image"], cached["image"])
        torch.testing.assert_close(plain["instances"].gt_boxes.tensor, cached["instances"].gt_boxes.tensor)
    with pytest.raises(ValueError, match="DATALOADER.IMAGE_CACHE_MB"):
        DetrDatasetMapper(_cfg(**{"DATALOADER.IMAGE_CACHE_MB": -1}), is_train=True)

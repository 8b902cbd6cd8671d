"""Robustness to unusual inputs and settings (docs/robustness.md): images without annotations, tiny and
extreme-aspect images, mixed sizes, fewer tokens than queries, tiny rho, invalid boxes and classes,
non-contiguous category ids, grayscale / RGBA files, config errors that name the key."""
import collections
import json
import logging

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils import logger as d2_logger
from detectron2.utils.events import EventStorage
from PIL import Image

from sparse_detr.data import DetrDatasetMapper
from synthetic import write_synthetic_coco
from utils import make_inputs, tiny_cfg


def _build(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**overrides))


def _train_step(model, inputs):
    """Weighted losses of one training forward; checks they are finite and that backward works."""
    model.train()
    with EventStorage():
        losses = model(inputs)
    assert all(torch.isfinite(v) for v in losses.values()), {k: float(v) for k, v in losses.items()}
    model.zero_grad()
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return losses


def _predict(model, inputs):
    model.eval()
    with torch.no_grad():
        return [r["instances"] for r in model(inputs)]


# ---------------------------------------------------------------------------------------------- images
def test_batch_with_one_image_without_annotations():
    """(A batch where every image is empty: test_modeling.py::test_training_step_with_empty_ground_truth.)"""
    model = _build()
    inputs = make_inputs([(64, 96)], num_boxes=3) + make_inputs([(64, 96)], num_boxes=0, seed=1)
    losses = _train_step(model, inputs)
    assert losses["loss_ce"] > 0 and losses["loss_bbox"] > 0 and losses["loss_giou"] > 0
    # the empty image alone: classification (and scoring) loss only
    alone = _train_step(model, inputs[1:])
    assert alone["loss_ce"] > 0 and alone["loss_bbox"] == 0 and alone["loss_giou"] == 0


@pytest.mark.parametrize("hidden", [32, 256])
@pytest.mark.parametrize("size", [(16, 16), (33, 17)])
def test_tiny_images_with_a_1x1_coarsest_level(size, hidden):
    """Strides 8/16/32/64: the coarsest level is 1x1 (GroupNorm with one value per group at hidden 32);
    16x16 has 7 tokens, fewer than NUM_QUERIES (10): the two-stage top-k takes every token."""
    model = _build(HIDDEN_DIM=hidden)
    inputs = make_inputs([size], num_boxes=1)
    model.eval()
    with torch.no_grad():
        out = model.forward_raw(inputs)
    assert out["spatial_shapes_list"][-1] == (1, 1)
    tokens = sum(h * w for h, w in out["spatial_shapes_list"])
    queries = out["pred_logits"].shape[1]
    assert queries == min(tokens, model.num_queries) and (queries < model.num_queries) == (size == (16, 16))
    _train_step(model, inputs)
    inst = _predict(model, inputs)[0]
    assert len(inst) == min(20, queries * 5) and inst.image_size == size


def test_extreme_aspect_ratio():
    model = _build()
    inputs = make_inputs([(64, 2048)], num_boxes=2)
    _train_step(model, inputs)
    boxes = _predict(model, inputs)[0].pred_boxes.tensor
    assert (boxes[:, 2] <= 2048).all() and (boxes[:, 3] <= 64).all() and (boxes >= 0).all()


def test_batch_of_very_different_sizes():
    model = _build()
    inputs = make_inputs([(24, 24), (160, 256)], num_boxes=2)
    _train_step(model, inputs)
    small, large = _predict(model, inputs)
    assert small.image_size == (24, 24) and large.image_size == (160, 256)
    assert (small.pred_boxes.tensor <= 24).all()


def test_rho_so_small_that_the_count_would_be_zero_keeps_one_token():
    model = _build(RHO=1e-6)
    inputs = make_inputs([(64, 96), (32, 32)])
    with torch.no_grad():
        out = model.eval().forward_raw(inputs)
    assert out["sparse_token_nums"].tolist() == [1, 1]
    _train_step(model, inputs)


def test_more_objects_than_queries():
    losses = _train_step(_build(), make_inputs([(64, 96)], num_boxes=25))
    assert losses["loss_bbox"] > 0


# ---------------------------------------------------------------------------------------------- ground truth
def test_invalid_ground_truth_is_refused_with_a_clear_error():
    model = _build().train()
    inputs = make_inputs([(64, 96)])
    inputs[0]["instances"].gt_classes[0] = 5  # NUM_CLASSES is 5
    with pytest.raises(ValueError, match=r"class 5 is outside \[0, 5\).*NUM_CLASSES=5"), EventStorage():
        model(inputs)
    inputs = make_inputs([(64, 96)])
    inputs[0]["instances"].gt_boxes.tensor[1] = torch.tensor([50.0, 10, 40, 30])  # x2 < x1
    with pytest.raises(ValueError, match="not a finite XYXY box"), EventStorage():
        model(inputs)
    inputs = make_inputs([(64, 96)])
    del inputs[0]["instances"]
    with pytest.raises(ValueError, match="'annotations' list"), EventStorage():
        model(inputs)


def _dataset_dict(path, boxes):
    return {"file_name": path, "image_id": 0, "height": 60, "width": 80,
            "annotations": [{"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0} for b in boxes]}


def test_mapper_drops_empty_boxes_and_clips_outside_ones_with_a_warning(tmp_path, monkeypatch, caplog):
    cfg = tiny_cfg()
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.DETR_RESIZE_MIN_SIZES = [60]
    cfg.INPUT.DETR_RESIZE_MAX_SIZE = 1000
    mapper = DetrDatasetMapper(cfg, is_train=True)
    mapper.augmentations.augs[-1].prob = 1.0  # the resize branch (to the same size): boxes unchanged
    path = str(tmp_path / "a.png")
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(path)
    boxes = [[10, 10, 20, 20], [30, 5, 0, 10], [40, 20, -15, 10], [70, 50, 30, 30], [-5, -5, 10, 10]]
    monkeypatch.setattr(d2_logger, "_LOG_COUNTER", collections.Counter())  # fresh warn-once counters
    monkeypatch.setattr(logging.getLogger("sparse_detr"), "propagate", True)  # demo.py's setup_logger turns it off
    with caplog.at_level(logging.WARNING):
        out = mapper(_dataset_dict(path, boxes))
    assert "2 of 5 boxes have zero or negative width or height (dropped), 2 extend outside the image" in caplog.text
    torch.testing.assert_close(out["instances"].gt_boxes.tensor,
                               torch.tensor([[10.0, 10, 30, 30], [70, 50, 80, 60], [0, 0, 5, 5]]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mapper(_dataset_dict(path, boxes[:1]))
    assert caplog.text == ""


def test_non_contiguous_category_ids(tmp_path):
    """Category ids 3 and 7 in the json: Detectron2's loader maps them to 0 and 1; a training step runs."""
    path = write_synthetic_coco(str(tmp_path), num_images=1)
    with open(path) as f:
        data = json.load(f)
    ids = {1: 3, 2: 7}
    for item in data["annotations"] + data["categories"]:
        key = "category_id" if "category_id" in item else "id"
        item[key] = ids[item[key]]
    with open(path, "w") as f:
        json.dump(data, f)
    name = "robustness_noncontiguous"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name), MetadataCatalog.remove(name)
    register_coco_instances(name, {}, path, str(tmp_path / "images"))
    record = DatasetCatalog.get(name)[0]
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    cfg = tiny_cfg(NUM_CLASSES=2)
    cfg.INPUT.DETR_RESIZE_MIN_SIZES, cfg.INPUT.DETR_RESIZE_MAX_SIZE = [64], 128
    cfg.INPUT.DETR_CROP_PROB = 0.0  # a random crop may cut every box away, whatever the ids
    out = DetrDatasetMapper(cfg, is_train=True)(record)
    classes = out["instances"].gt_classes
    assert set(classes.tolist()) <= {0, 1} and len(classes) > 0
    _train_step(_build(NUM_CLASSES=2), [out])


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_files_through_the_predictor(tmp_path, mode):
    """As demo.py reads files (read_image(path, "BGR")); the mapper: test_data.py::test_detr_mapper_train
    (L / RGB / RGBA in training) and ::test_mapper_test_mode_and_selection (RGBA at test time)."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (50, 70, 4 if mode == "RGBA" else 1), dtype=np.uint8)
    path = str(tmp_path / f"image_{mode}.png")
    Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode).save(path)
    cfg = tiny_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 128
    torch.manual_seed(0)
    image = read_image(path, format="BGR")
    assert image.shape == (50, 70, 3)
    inst = DefaultPredictor(cfg)(image)["instances"]
    assert inst.image_size == (50, 70) and len(inst) == cfg.TEST.DETECTIONS_PER_IMAGE


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, backbone, match", [
    ({}, "build_nope_backbone", r"MODEL.BACKBONE.NAME='build_nope_backbone' is not a registered backbone.*"
                                r"'build_resnet_backbone'.*'build_sparse_detr_swin_backbone'"),
    ({"IN_FEATURES": ["res3", "res4", "res6"]}, None, r"IN_FEATURES \['res6'\] are not outputs of the backbone "
                                                      r"\(\['res3', 'res4', 'res5'\]\)"),
    ({"HIDDEN_DIM": 48, "NHEADS": 2}, None, r"HIDDEN_DIM=48 must be a multiple of 32"),
    ({"ENC_LAYERS": 0}, None, r"ENC_LAYERS=0 must be >= 1"),
])
def test_more_invalid_configs_name_the_key(overrides, backbone, match):
    """(RHO / TEST_RHO range, TEST_RHO without a scoring network, NHEADS, NUM_FEATURE_LEVELS < inputs:
    test_modeling.py::test_invalid_configs_raise.)"""
    cfg = tiny_cfg(**overrides)
    if backbone:
        cfg.MODEL.BACKBONE.NAME = backbone
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_more_feature_levels_than_inputs_add_extra_levels():
    """NUM_FEATURE_LEVELS above len(IN_FEATURES) is valid: more stride-2 levels (5 here, down to 1x1)."""
    model = _build(NUM_FEATURE_LEVELS=5)
    with torch.no_grad():
        out = model.eval().forward_raw(make_inputs([(64, 96)]))
    assert out["spatial_shapes_list"] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    assert len(model.input_proj) == 5
    _train_step(model, make_inputs([(64, 96)]))

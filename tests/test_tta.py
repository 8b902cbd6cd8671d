"""Test-time augmentation (SparseDETRWithTTA, TEST.AUG.*): weighted box fusion, exact view geometry,
agreement with plain inference for a single view, evaluation through train_net.py."""
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from sparse_detr.modeling import SparseDETRWithTTA
from sparse_detr.modeling.test_time_augmentation import weighted_box_fusion
from utils import make_inputs, tiny_cfg


def _tta_cfg(min_sizes=(64,), flip=True, rotate=True, iou=0.55):
    cfg = tiny_cfg()
    cfg.TEST.AUG.MIN_SIZES = min_sizes
    cfg.TEST.AUG.MAX_SIZE = 200
    cfg.TEST.AUG.FLIP = flip
    cfg.TEST.AUG.ROTATE_90 = rotate
    cfg.TEST.AUG.FUSION_IOU = iou
    return cfg


def test_weighted_box_fusion():
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.], [0., 0., 10., 10.]])
    scores = torch.tensor([0.8, 0.4, 0.6, 0.5])
    classes = torch.tensor([0, 0, 0, 1])  # the last box overlaps the first but is another class
    fused_boxes, fused_scores, fused_classes = weighted_box_fusion(boxes, scores, classes, num_views=2,
                                                                   iou_threshold=0.55)
    # cluster {0, 1}: score-weighted box, mean score * 2/2; lone boxes: their score * 1/2
    torch.testing.assert_close(fused_boxes[0], (0.8 * boxes[0] + 0.4 * boxes[1]) / 1.2)
    torch.testing.assert_close(fused_scores, torch.tensor([0.6, 0.3, 0.25]))
    assert fused_classes.tolist() == [0, 0, 1]
    torch.testing.assert_close(fused_boxes[1:], boxes[[2, 3]])
    # IoU(box 0, box 1) = 81 / 119 = 0.68: a higher threshold keeps them apart
    assert len(weighted_box_fusion(boxes, scores, classes, 2, 0.7)[0]) == 4


def test_views_are_exact_and_invertible():
    model = build_model(_tta_cfg()).eval()
    tta = SparseDETRWithTTA(_tta_cfg(min_sizes=(64, 96)), model)
    h, w = 48, 80
    tfms = list(tta.view_transforms(h, w))
    assert len(tfms) == tta.num_views == 16
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[10, 20] = 255  # one bright pixel, whose centre (20.5, 10.5) every view must move exactly
    box = np.array([[5.0, 7.0, 30.0, 40.0]])
    for tfm in tfms[:8]:  # scale 1 (short edge 48 -> 64: x4/3), all 8 orientations
        view = tfm.apply_image(image)
        ys, xs = np.nonzero(view[..., 0] > 100)
        centre = tfm.apply_coords(np.array([[20.5, 10.5]]))[0]
        assert abs(xs.mean() + 0.5 - centre[0]) < 0.5 and abs(ys.mean() + 0.5 - centre[1]) < 0.5
        np.testing.assert_allclose(tfm.inverse().apply_box(tfm.apply_box(box)), box, atol=1e-4)
    shapes = {tfm.apply_image(image).shape[:2] for tfm in tfms}
    assert shapes == {(64, 107), (107, 64), (96, 160), (160, 96)}


def test_single_view_equals_plain_inference():
    cfg = _tta_cfg(flip=False, rotate=False, iou=0.999)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = make_inputs([(64, 96)])
    with torch.no_grad():
        plain = model(inputs)[0]["instances"]
        fused = SparseDETRWithTTA(cfg, model)(inputs)[0]["instances"]
    torch.testing.assert_close(fused.scores, plain.scores)
    torch.testing.assert_close(fused.pred_boxes.tensor, plain.pred_boxes.tensor)
    assert torch.equal(fused.pred_classes, plain.pred_classes)


def test_eight_orientations_fused_into_the_requested_output_size():
    cfg = _tta_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = make_inputs([(64, 96)])
    inputs[0].update(height=128, width=192)  # outputs at twice the input size
    with torch.no_grad():
        inst = SparseDETRWithTTA(cfg, model)(inputs)[0]["instances"]
    assert inst.image_size == (128, 192) and 0 < len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert torch.all(inst.scores[:-1] >= inst.scores[1:]) and inst.scores.max() <= 1
    boxes = inst.pred_boxes.tensor
    assert boxes[:, 0::2].max() <= 192 and boxes[:, 1::2].max() <= 128 and boxes.min() >= 0


@pytest.mark.parametrize("key, value, match", [("FUSION_IOU", 1.0, "TEST.AUG.FUSION_IOU=1.0"),
                                               ("MIN_SIZES", (), "TEST.AUG.MIN_SIZES")])
def test_invalid_tta_config_raises(key, value, match):
    cfg = _tta_cfg()
    setattr(cfg.TEST.AUG, key, value)
    with pytest.raises(ValueError, match=match):
        SparseDETRWithTTA(cfg, build_model(tiny_cfg()))


def test_training_mode_and_other_models_are_refused():
    model = build_model(tiny_cfg())
    with pytest.raises(RuntimeError, match="eval"):
        SparseDETRWithTTA(_tta_cfg(), model.train())(make_inputs([(64, 96)]))
    with pytest.raises(TypeError, match="SparseDETR"):
        SparseDETRWithTTA(_tta_cfg(), torch.nn.Linear(2, 2))

"""One-to-many training queries (MODEL.SPARSE_DETR.ONE_TO_MANY_*): the extra group trains with repeated
targets, never changes what the one-to-one queries compute, and is absent at inference."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from sparse_detr.modeling.criterion import build_weight_dict
from sparse_detr.modeling.one_to_many import group_self_attn_mask, repeat_targets
from utils import make_inputs, tiny_cfg

ONE_TO_MANY = dict(ONE_TO_MANY_QUERIES=12, ONE_TO_MANY_REPEATS=3, ONE_TO_MANY_LOSS_WEIGHT=0.5)


def _build(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**overrides))


def test_group_mask_blocks_across_groups_only():
    mask = group_self_attn_mask(2, 5, torch.device("cpu"))
    expected = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    assert torch.equal(mask, expected.bool())


def test_repeat_targets():
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.rand(2, 4)}, {"labels": torch.zeros(0, dtype=torch.long),
                                                                          "boxes": torch.zeros(0, 4)}]
    rep = repeat_targets(targets, 3)
    assert rep[0]["labels"].tolist() == [1, 4, 1, 4, 1, 4]
    assert torch.equal(rep[0]["boxes"][4:], targets[0]["boxes"])
    assert rep[1]["boxes"].shape == (0, 4)


def test_weight_dict_adds_weighted_decoder_losses_only():
    weights = build_weight_dict(2, 5, 2, 1, dec_layers=3, two_stage=True, enc_aux_layers=2, one_to_many_weight=0.5)
    extra = {k: v for k, v in weights.items() if k.endswith("_one2many")}
    assert set(extra) == {f"loss_{n}{s}_one2many" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_1")}
    assert extra["loss_bbox_one2many"] == 2.5 and extra["loss_ce_1_one2many"] == 1.0
    assert "_one2many" not in "".join(build_weight_dict(2, 5, 2, 1, 3, True, 2))


def test_training_losses_gradients_and_repeated_matching():
    model = _build(**ONE_TO_MANY).train()
    inputs = make_inputs([(64, 96), (80, 64)], num_boxes=3)
    images = model.preprocess_image(inputs)
    out = model.run(images, model.rho, with_enc_aux=True)
    assert out["pred_logits"].shape[1] == 10 and out["sampling_locations_dec"].shape[2] == 10
    many = out["one_to_many_outputs"]
    assert many["pred_boxes"].shape[1] == 12 and len(many["aux_outputs"]) == 1
    # every object is matched to `repeats` different queries of the extra group
    targets = repeat_targets(model.prepare_targets(inputs, images), 3)
    for query_idx, target_idx in model.criterion.matcher(many, targets):
        assert len(set(query_idx.tolist())) == 9 and sorted(t % 3 for t in target_idx.tolist()) == [0] * 3 + [1] * 3 + [2] * 3

    with EventStorage():
        losses = model(inputs)
    extra = {k for k in losses if k.endswith("_one2many")}
    assert extra == {f"loss_{n}{s}_one2many" for n in ("ce", "bbox", "giou") for s in ("", "_0")}
    assert all(torch.isfinite(v) for v in losses.values())
    model.zero_grad()
    sum(v for k, v in losses.items() if k in extra).backward()
    assert model.class_embed[0].weight.grad.abs().sum() > 0  # the shared heads learn from the extra group
    assert model.transformer.decoder.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0


def test_one_to_one_queries_compute_the_same_with_and_without_the_extra_group():
    """The group mask keeps the extra queries invisible, and the first NUM_QUERIES of the larger two-stage
    selection are the queries selected without extras (no dropout in the tiny config: deterministic)."""
    model = _build(**ONE_TO_MANY).train()
    images = model.preprocess_image(make_inputs([(64, 96), (80, 64)]))
    with_extra = model.run(images, model.rho, with_enc_aux=True)
    model.one_to_many_queries = 0
    without = model.run(images, model.rho, with_enc_aux=True)
    assert "one_to_many_outputs" not in without
    for key in ("pred_logits", "pred_boxes", "sampling_locations_dec", "attn_weights_dec"):
        torch.testing.assert_close(with_extra[key], without[key])
    torch.testing.assert_close(with_extra["aux_outputs"][0]["pred_boxes"], without["aux_outputs"][0]["pred_boxes"])


def test_inference_uses_the_one_to_one_queries_only():
    model = _build(**ONE_TO_MANY).eval()
    images = model.preprocess_image(make_inputs([(64, 96)]))
    with torch.no_grad():
        out = model.run(images, model.test_rho, with_enc_aux=False)
        results = model(make_inputs([(64, 96)]))
    assert "one_to_many_outputs" not in out and out["pred_logits"].shape[1] == 10
    assert len(results[0]["instances"]) == 20


@pytest.mark.parametrize("overrides, match", [
    ({"ONE_TO_MANY_QUERIES": -1}, "ONE_TO_MANY_QUERIES=-1"),
    ({"ONE_TO_MANY_QUERIES": 5, "ONE_TO_MANY_REPEATS": 0}, "ONE_TO_MANY_REPEATS=0"),
    ({"ONE_TO_MANY_QUERIES": 5, "ONE_TO_MANY_LOSS_WEIGHT": 0.0}, "ONE_TO_MANY_LOSS_WEIGHT=0.0"),
    ({"ONE_TO_MANY_QUERIES": 5, "TWO_STAGE": False, "EFF_QUERY_INIT": False, "EFF_SPECIFIC_HEAD": False},
     "ONE_TO_MANY_QUERIES=5 needs two-stage"),
    ({"ENC_AUX_REPEATS": 0}, r"MODEL.SPARSE_DETR.ENC_AUX_REPEATS=0 must be >= 1"),
])
def test_invalid_one_to_many_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny_cfg(**overrides))

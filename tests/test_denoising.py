"""Denoising training queries (MODEL.SPARSE_DETR.DN_*): jittered ground truth, the self-attention mask,
known-assignment losses, no effect on the matching queries, absent at inference."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from sparse_detr.modeling.criterion import build_weight_dict
from sparse_detr.modeling.denoising import denoising_indices, denoising_self_attn_mask, noised_ground_truth
from sparse_detr.modeling.one_to_many import repeat_targets
from utils import make_inputs, tiny_cfg

DENOISING = dict(DN_GROUPS=2, DN_BOX_NOISE_SCALE=0.4, DN_LABEL_NOISE_RATIO=0.2)


def _targets():
    return [{"labels": torch.tensor([1, 3, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.2, 0.3, 0.1, 0.1],
                                                                      [0.8, 0.7, 0.3, 0.2]])},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.5, 0.5]])}]


def test_noised_ground_truth_stays_within_the_noise_and_pads_to_the_largest_image():
    g = torch.Generator().manual_seed(0)
    targets = _targets()
    labels, boxes, group_size = noised_ground_truth(targets, 4, 0.4, 0.0, 5, generator=g)
    assert group_size == 3 and labels.shape == (2, 12) and boxes.shape == (2, 12, 4)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        for grp in range(4):
            real = slice(grp * 3, grp * 3 + n)
            assert torch.equal(labels[i, real], t["labels"])  # no label noise at ratio 0
            bound = torch.cat([t["boxes"][:, 2:] / 2, t["boxes"][:, 2:]], 1) * 0.4 + 1e-6
            assert ((boxes[i, real] - t["boxes"]).abs() <= bound).all()
            assert not torch.equal(boxes[i, real], t["boxes"])
            pad = slice(grp * 3 + n, grp * 3 + 3)
            assert (labels[i, pad] == 0).all() and torch.equal(boxes[i, pad], torch.tensor([0.5, 0.5, 1, 1]).expand(3 - n, 4))
    # every label is redrawn at ratio 1 (from 5 classes: most differ), never the padding's
    labels, _, _ = noised_ground_truth(targets, 50, 0.4, 1.0, 5, generator=g)
    assert (labels[0].view(50, 3) != targets[0]["labels"]).float().mean() > 0.6
    assert (labels[1].view(50, 3)[:, 1:] == 0).all()
    # no objects in the batch: one padding query per group
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    labels, boxes, group_size = noised_ground_truth(empty, 2, 0.4, 0.2, 5)
    assert group_size == 1 and labels.shape == (1, 2)


def test_mask_matching_queries_never_see_denoising_groups_which_never_see_each_other():
    mask = denoising_self_attn_mask(2, 2, 2, torch.device("cpu"))
    expected = torch.tensor([[0, 0, 1, 1, 1, 1],
                             [0, 0, 1, 1, 1, 1],
                             [0, 0, 0, 0, 1, 1],
                             [0, 0, 0, 0, 1, 1],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0, 0]])
    assert torch.equal(mask, expected.bool())


def test_indices_pair_each_query_with_its_own_object_in_the_repeated_targets():
    targets = _targets()
    indices = denoising_indices(targets, 2, 3)
    repeated = repeat_targets(targets, 2)
    assert indices[0][0].tolist() == [0, 1, 2, 3, 4, 5] and indices[1][0].tolist() == [0, 3]
    for t, rep, (q, j) in zip(targets, repeated, indices):
        n = len(t["labels"])
        assert torch.equal(rep["labels"][j], t["labels"][(q % 3)]) and (q % 3 < n).all()


def test_weight_dict_adds_the_decoder_losses_with_their_own_weights():
    weights = build_weight_dict(2, 5, 2, 1, dec_layers=3, two_stage=True, enc_aux_layers=2, denoising=True)
    extra = {k: v for k, v in weights.items() if k.endswith("_dn")}
    assert extra == {f"loss_{n}{s}_dn": w for n, w in (("ce", 2), ("bbox", 5), ("giou", 2)) for s in ("", "_0", "_1")}


def _model_and_batch(num_boxes):
    """A tiny training-mode model with denoising, two images with `num_boxes` objects each: model,
    inputs, preprocessed images, targets."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**DENOISING)).train()
    inputs = make_inputs([(64, 96), (80, 64)], num_boxes=num_boxes)
    images = model.preprocess_image(inputs)
    return model, inputs, images, model.prepare_targets(inputs, images)


def test_training_losses_are_the_known_assignment_losses_and_reach_the_label_embedding():
    model, inputs, images, targets = _model_and_batch(num_boxes=3)
    out = model.run(images, model.rho, with_enc_aux=True, targets=targets)
    assert out["pred_logits"].shape[1] == 10 and out["sampling_locations_dec"].shape[2] == 10
    dn = out["denoising_outputs"]
    assert out["denoising_group_size"] == 3 and dn["pred_boxes"].shape[1] == 6 and len(dn["aux_outputs"]) == 1

    with EventStorage():
        losses = model(inputs)
    assert set(build_weight_dict(2, 5, 2, 1, dec_layers=2, two_stage=True, enc_aux_layers=1, denoising=True)) == set(losses)
    extra = {k for k in losses if k.endswith("_dn")}
    assert extra == {f"loss_{n}{s}_dn" for n in ("ce", "bbox", "giou") for s in ("", "_0")}
    assert all(torch.isfinite(v) for v in losses.values())
    model.zero_grad()
    sum(v for k, v in losses.items() if k in extra).backward()
    assert model.dn_label_embed.weight.grad.abs().sum() > 0
    assert model.transformer.pos_trans.weight.grad.abs().sum() > 0
    # the box losses are those of query j against object j (no matching)
    with EventStorage():
        torch.manual_seed(1)
        out = model.run(images, model.rho, with_enc_aux=True, targets=targets)
    pred = out["denoising_outputs"]["pred_boxes"]
    expected = sum((pred[i, q] - t["boxes"][q % 3]).abs().sum() for i, t in enumerate(targets) for q in range(6)) / 12
    got = model.criterion(out["denoising_outputs"], repeat_targets(targets, 2), denoising_indices(targets, 2, 3))
    torch.testing.assert_close(got["loss_bbox"], expected)


def test_matching_queries_compute_the_same_with_and_without_denoising_and_inference_has_none():
    model, _, images, targets = _model_and_batch(num_boxes=2)
    with_dn = model.run(images, model.rho, with_enc_aux=True, targets=targets)
    without = model.run(images, model.rho, with_enc_aux=True)
    assert "denoising_outputs" not in without and set(with_dn) - set(without) == {"denoising_outputs", "denoising_group_size"}
    torch.testing.assert_close(with_dn["enc_outputs"], without["enc_outputs"])
    for key in ("pred_logits", "pred_boxes", "sampling_locations_dec", "attn_weights_dec"):
        torch.testing.assert_close(with_dn[key], without[key])
    model.eval()
    with torch.no_grad():
        out = model.run(images, model.test_rho, with_enc_aux=False, targets=targets)
    assert "denoising_outputs" not in out and out["pred_logits"].shape[1] == 10


@pytest.mark.parametrize("overrides, match", [
    ({"DN_GROUPS": -1}, "DN_GROUPS=-1"),
    ({"DN_GROUPS": 2, "DN_LABEL_NOISE_RATIO": 1.5}, r"DN_LABEL_NOISE_RATIO=1.5 is outside \[0, 1\]"),
    ({"DN_GROUPS": 2, "DN_BOX_NOISE_SCALE": -0.1}, "DN_BOX_NOISE_SCALE=-0.1"),
    ({"DN_GROUPS": 2, "ONE_TO_MANY_QUERIES": 4}, "cannot be combined"),
    ({"DN_GROUPS": 2, "TWO_STAGE": False, "EFF_QUERY_INIT": False, "EFF_SPECIFIC_HEAD": False},
     "DN_GROUPS=2 needs two-stage"),
])
def test_invalid_denoising_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny_cfg(**overrides))

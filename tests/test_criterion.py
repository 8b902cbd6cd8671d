"""Hungarian matcher and set criterion: brute force, hand computation, empty targets, normalisation,
and the official losses of the parity fixture."""
import io
import itertools
import lzma
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_detr.modeling.criterion import SetCriterion, build_weight_dict
from sparse_detr.modeling.matcher import HungarianMatcher, focal_class_cost

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "official_sparse_detr_small.pt.xz"


def _random_boxes(n, generator):
    cxcy = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([cxcy, wh], 1)


def _random_case(bs, queries, classes, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(bs, queries, classes, generator=g) * 2,
               "pred_boxes": _random_boxes(bs * queries, g).view(bs, queries, 4)}
    targets = [{"labels": torch.randint(0, classes, (n,), generator=g), "boxes": _random_boxes(n, g)}
               for n in sizes]
    return outputs, targets


def _pair_cost(logits, box, label, tgt_box, m):
    """Matching cost of one prediction/target pair, written out from the official formula."""
    p = logits[label].sigmoid()
    a = m.focal_alpha
    c_cls = a * (1 - p) ** 2 * -math.log(p + 1e-8) - (1 - a) * p**2 * -math.log(1 - p + 1e-8)
    c_l1 = (box - tgt_box).abs().sum()

    def xyxy(b):
        return torch.stack([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])

    b1, b2 = xyxy(box), xyxy(tgt_box)
    inter = (torch.min(b1[2:], b2[2:]) - torch.max(b1[:2], b2[:2])).clamp(min=0).prod()
    union = (b1[2:] - b1[:2]).prod() + (b2[2:] - b2[:2]).prod() - inter
    hull = (torch.max(b1[2:], b2[2:]) - torch.min(b1[:2], b2[:2])).prod()
    giou = inter / union - (hull - union) / hull
    return m.cost_class * c_cls + m.cost_bbox * c_l1 - m.cost_giou * giou


@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal_brute_force(seed):
    matcher = HungarianMatcher()
    sizes = [3, 0, 2]
    outputs, targets = _random_case(3, 4, 5, sizes, seed)
    indices = matcher(outputs, targets)
    for b, ((src, tgt), t) in enumerate(zip(indices, targets)):
        n = len(t["labels"])
        assert src.dtype == tgt.dtype == torch.int64 and len(src) == len(tgt) == n
        if n == 0:
            continue
        cost = torch.tensor([[float(_pair_cost(outputs["pred_logits"][b, q], outputs["pred_boxes"][b, q],
                                                t["labels"][j], t["boxes"][j], matcher))
                              for j in range(n)] for q in range(4)])
        best = min(sum(cost[q, j] for q, j in zip(perm, range(n)))
                   for perm in itertools.permutations(range(4), n))
        assert float(cost[src, tgt].sum()) == pytest.approx(float(best), abs=1e-5)
        assert len(set(src.tolist())) == n and sorted(tgt.tolist()) == list(range(n))


def test_focal_class_cost_formula():
    p = torch.tensor([0.1, 0.5, 0.9])
    expected = [0.25 * (1 - x) ** 2 * -math.log(x + 1e-8) - 0.75 * x**2 * -math.log(1 - x + 1e-8)
                for x in p.tolist()]
    assert torch.allclose(focal_class_cost(p, 0.25), torch.tensor(expected), atol=1e-6)


def test_matcher_rejects_non_finite_costs():
    outputs, targets = _random_case(2, 3, 4, [1, 2], 0)
    outputs["pred_boxes"][1, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite.*per image: \[0, 2\].*pred_boxes 1"):
        HungarianMatcher()(outputs, targets)


def test_matcher_all_images_empty():
    outputs, targets = _random_case(2, 3, 4, [0, 0], 0)
    for src, tgt in HungarianMatcher()(outputs, targets):
        assert src.numel() == tgt.numel() == 0 and src.dtype == torch.int64


def _focal(x, t, alpha=0.25):
    p = 1 / (1 + math.exp(-x))
    ce = -math.log(p) if t else -math.log(1 - p)
    pt = p if t else 1 - p
    return (alpha if t else 1 - alpha) * ce * (1 - pt) ** 2


def test_losses_against_hand_computation():
    logits = torch.tensor([[[0.5, -1.0, 2.0], [-0.3, 0.8, -2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.4]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.5, 0.2, 0.2]])}]
    criterion = SetCriterion(3, HungarianMatcher())
    # Query 1 matched to the target: it is close in class, the other is far in box.
    indices = criterion.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert indices[0][0].tolist() == [1] and indices[0][1].tolist() == [0]
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)

    onehot = [[0, 0, 0], [0, 1, 0]]
    ce = sum(_focal(logits[0, q, c].item(), onehot[q][c]) for q in range(2) for c in range(3))
    assert losses["loss_ce"].item() == pytest.approx(ce, abs=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.0 + 0.1 + 0.0 + 0.2, abs=1e-6)
    # pred x 0.2..0.4, y 0.2..0.6 ; target x 0.2..0.4, y 0.4..0.6 -> target inside pred: GIoU = 0.04/0.08
    assert losses["loss_giou"].item() == pytest.approx(1 - 0.5, abs=1e-6)


def test_varifocal_loss_against_hand_computation():
    """Same case as above with CLASS_LOSS "varifocal": the matched query's class-1 target is its box's
    IoU with the ground truth (0.5: the target covers half of the prediction); box losses unchanged."""
    logits = torch.tensor([[[0.5, -1.0, 2.0], [-0.3, 0.8, -2.0]]], requires_grad=True)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.4]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.5, 0.2, 0.2]])}]
    focal = SetCriterion(3, HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes}, targets)
    losses = SetCriterion(3, HungarianMatcher(), class_loss="varifocal")(
        {"pred_logits": logits, "pred_boxes": boxes}, targets)

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = 0.5 * bce(0.8, 0.5)  # the positive: weight = target = IoU 0.5
    expected += sum(0.75 * (1 / (1 + math.exp(-logits[0, q, c].item()))) ** 2 * bce(logits[0, q, c].item(), 0.0)
                    for q in range(2) for c in range(3) if (q, c) != (1, 1))
    assert losses["loss_ce"].item() == pytest.approx(expected, abs=1e-6)
    for k in ("loss_bbox", "loss_giou"):
        assert losses[k].item() == pytest.approx(focal[k].item(), abs=1e-7)
    losses["loss_ce"].backward()
    # The positive logit is pulled towards the IoU, not towards 1: sigmoid(0.8) = 0.69 > 0.5 pushes it down.
    assert logits.grad[0, 1, 1] > 0


def test_unknown_class_loss_names_key_and_allowed_values():
    with pytest.raises(ValueError, match=r"MODEL.SPARSE_DETR.CLASS_LOSS='ce'.*focal.*varifocal"):
        SetCriterion(3, HungarianMatcher(), class_loss="ce")


def test_all_prediction_sets_and_binary_encoder_head():
    outputs, targets = _random_case(2, 5, 4, [2, 1], 3)
    aux = [_random_case(2, 5, 4, [], s)[0] for s in (10, 11)]
    outputs["aux_outputs"] = aux
    outputs["enc_outputs"] = _random_case(2, 7, 4, [], 12)[0]
    outputs["aux_outputs_enc"] = [_random_case(2, 6, 4, [], 13)[0]]
    losses = SetCriterion(4, HungarianMatcher())(outputs, targets)
    suffixes = ["", "_0", "_1", "_enc", "_enc_0"]
    assert set(losses) == {k + s for s in suffixes for k in ("loss_ce", "loss_bbox", "loss_giou")}
    assert set(losses) | {"loss_mask_prediction"} == set(build_weight_dict(2, 5, 2, 1, 3, True, 1))

    binary = SetCriterion(4, HungarianMatcher(), enc_class_specific=False)
    bin_losses = binary(outputs, targets)
    zero_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    expected = binary.set_losses(outputs["enc_outputs"], zero_targets, 3.0)
    for k, v in expected.items():
        assert torch.allclose(bin_losses[k + "_enc"], v)
    assert not torch.allclose(bin_losses["loss_ce_enc"], losses["loss_ce_enc"])
    # Only the two-stage proposals are binary; the encoder auxiliary heads keep the real labels.
    assert torch.allclose(bin_losses["loss_ce_enc_0"], losses["loss_ce_enc_0"])


def test_encoder_aux_sets_match_repeated_targets_one_to_many():
    outputs, targets = _random_case(2, 5, 4, [2, 1], 3)
    outputs["enc_outputs"] = _random_case(2, 7, 4, [], 12)[0]
    outputs["aux_outputs_enc"] = [_random_case(2, 8, 4, [], 13)[0]]
    one = SetCriterion(4, HungarianMatcher())(outputs, targets)
    criterion = SetCriterion(4, HungarianMatcher(), enc_aux_repeats=3)
    many = criterion(outputs, targets)
    # Every object is matched to 3 distinct tokens of the set (8 tokens >= 3 x 2 objects).
    repeated = [{"labels": t["labels"].repeat(3), "boxes": t["boxes"].repeat(3, 1)} for t in targets]
    indices = criterion.matcher(outputs["aux_outputs_enc"][0], repeated)
    assert [len(set(q.tolist())) for q, _ in indices] == [6, 3]
    # Normalised by 3x the batch's 3 boxes: the set keeps its weight.
    expected = criterion.set_losses(outputs["aux_outputs_enc"][0], repeated, 3.0 * 3, indices)
    for k, v in expected.items():
        assert torch.allclose(many[k + "_enc_0"], v)
    assert not torch.allclose(many["loss_ce_enc_0"], one["loss_ce_enc_0"])
    # The decoder and two-stage sets stay one-to-one.
    for suffix in ("", "_enc"):
        for k in ("loss_ce", "loss_bbox", "loss_giou"):
            assert torch.equal(many[k + suffix], one[k + suffix])
    with pytest.raises(ValueError, match="enc_aux_repeats=0 must be >= 1"):
        SetCriterion(4, HungarianMatcher(), enc_aux_repeats=0)


def test_empty_targets_positive_ce_zero_box_losses_finite_grads():
    outputs, _ = _random_case(2, 4, 3, [], 5)
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    losses = SetCriterion(3, HungarianMatcher())(outputs, targets)
    assert losses["loss_ce"].item() > 0
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    assert torch.isfinite(outputs["pred_boxes"].grad).all() and not outputs["pred_boxes"].grad.any()


def test_num_boxes_normalisation():
    outputs, targets = _random_case(2, 6, 3, [2, 1], 7)
    criterion = SetCriterion(3, HungarianMatcher())
    indices = criterion.matcher(outputs, targets)
    per_box = criterion.set_losses(outputs, targets, 1.0, indices)
    losses = criterion(outputs, targets)
    for k in per_box:
        assert torch.allclose(losses[k], per_box[k] / 3)


def _distributed_worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    outputs, targets = _random_case(1, 5, 3, [3] if rank == 0 else [1], rank)
    criterion = SetCriterion(3, HungarianMatcher())
    per_box = criterion.set_losses(outputs, targets, 1.0)
    losses = criterion(outputs, targets)
    # (3 + 1) boxes over 2 processes -> num_boxes 2 on both.
    results[rank] = all(torch.allclose(losses[k], per_box[k] / 2) for k in per_box)
    dist.destroy_process_group()


def test_num_boxes_all_reduced_across_processes():
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_distributed_worker, args=(os.path.join(tmp, "init"), results), nprocs=2)
        assert dict(results) == {0: True, 1: True}


@pytest.fixture(scope="module")
def official():
    if not FIXTURE.exists():
        pytest.skip(f"parity fixture not found at {FIXTURE} (it lives in ../shared/fixtures/)")
    return torch.load(io.BytesIO(lzma.open(FIXTURE).read()), weights_only=True)


def test_official_losses_from_official_outputs(official):
    """The fixture's official predictions and targets (91 official ids) give the official losses."""
    targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in official["train"]["targets"]]
    losses = SetCriterion(91, HungarianMatcher())(official["eval"]["outputs"], targets)
    reference = official["train"]["losses"]
    assert len(losses) == 18
    for k, v in losses.items():
        assert v.item() == pytest.approx(reference[k], abs=1e-5), k
    weights = {k: v for k, v in official["train"]["weight_dict"].items() if not k.endswith("_backbone")}
    assert build_weight_dict(2, 5, 2, 1, dec_layers=3, two_stage=True, enc_aux_layers=2) == weights

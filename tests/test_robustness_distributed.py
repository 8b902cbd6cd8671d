"""2 processes (Detectron2's `launch`, gloo on CPU) where one rank has no ground-truth box at all.

Rank 0 trains on an image with 2 boxes, rank 1 on one without any (same size, no padding). The box count
is all-reduced: (2 + 0) / 2 = 1 on both ranks, so the mean of the ranks' losses is, loss by loss, the loss
of one process on both images, and DDP's averaged gradients are that process's gradients. Two steps, so
that a parameter without a gradient on the empty rank would stall DDP. (Ranks with 1 and 2 boxes through
the Trainer: test_distributed.py::test_two_process_cpu_training_matches_one_process; the criterion alone:
test_criterion.py::test_num_boxes_all_reduced_across_processes.)
"""
import datetime

import torch
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch.nn.parallel import DistributedDataParallel

import sparse_detr.modeling.criterion as criterion_module
from utils import make_inputs, tiny_cfg

STEPS = 2


def _inputs():
    """Per rank: one 64x96 image, with 2 boxes (rank 0) or none (rank 1)."""
    return [make_inputs([(64, 96)], num_boxes=2, seed=0), make_inputs([(64, 96)], num_boxes=0, seed=1)]


def _steps(model, inputs, num_boxes):
    """STEPS SGD steps of `model` (DDP or not) on `inputs`; returns the losses and gradients of each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    history = []
    for _ in range(STEPS):
        with EventStorage():
            losses = model(inputs)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        history.append({"losses": {k: v.item() for k, v in losses.items()}, "num_boxes": num_boxes[-1],
                        "grads": {n: p.grad.clone() for n, p in getattr(model, "module", model).named_parameters()
                                  if p.grad is not None}})
        optimizer.step()
    return history


def _model():
    torch.manual_seed(0)
    return build_model(tiny_cfg()).train()


def _spy_num_boxes(set_attribute=setattr):
    """Record every box count the criterion normalises by (patched with `set_attribute`)."""
    seen, average = [], criterion_module._average_num_boxes

    def spy(*args):
        seen.append(average(*args))
        return seen[-1]

    set_attribute(criterion_module, "_average_num_boxes", spy)
    return seen


def _worker(result_path: str):
    rank = comm.get_rank()
    seen = _spy_num_boxes()
    model = DistributedDataParallel(_model(), broadcast_buffers=False)
    torch.save(_steps(model, _inputs()[rank], seen), f"{result_path}.rank{rank}")


def test_rank_without_boxes_all_reduces_the_box_count(tmp_path, monkeypatch):
    result = str(tmp_path / "ddp")
    launch(_worker, 2, dist_url="auto", args=(result,), timeout=datetime.timedelta(seconds=120))
    ranks = [torch.load(f"{result}.rank{r}") for r in (0, 1)]
    single = _steps(_model(), sum(_inputs(), []), _spy_num_boxes(monkeypatch.setattr))
    for step in range(STEPS):
        r0, r1, one = ranks[0][step], ranks[1][step], single[step]
        assert r0["num_boxes"] == r1["num_boxes"] == 1.0 and one["num_boxes"] == 2.0
        assert r1["losses"]["loss_bbox"] == 0 and r0["losses"]["loss_bbox"] > 0
        for k, v in one["losses"].items():
            assert abs((r0["losses"][k] + r1["losses"][k]) / 2 - v) <= 1e-5 * max(1.0, abs(v)), (step, k)
        assert r0["grads"].keys() == r1["grads"].keys() == one["grads"].keys()
        for n in one["grads"]:
            assert torch.equal(r0["grads"][n], r1["grads"][n]), n  # all-reduced
        # The one-process gradient, up to float noise (a 1x2 coarsest level: GroupNorm over 2 values
        # per group amplifies rounding differences between batch sizes to ~1e-2 of some tensors). Step 1
        # starts from parameters that already differ by step 0's rounding: both below 1e-5 relative with
        # the NCHW convolutions of float32 CPU training (8e-5 at step 1 when they ran channels_last).
        ddp = torch.cat([r0["grads"][n].flatten() for n in one["grads"]])
        ref = torch.cat([g.flatten() for g in one["grads"].values()])
        assert (ddp - ref).norm() <= 2e-5 * ref.norm(), step

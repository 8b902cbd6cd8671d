"""The paper's analyses as features: objectness-score selection, DAM correlation, dynamic sparsity sweep."""
import importlib.util
import json
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from sparse_detr.evaluation import DAMCorrelationEvaluator
from sparse_detr.modeling.dam import dam_coverage, decoder_attention_map
from sparse_detr.modeling.token_scoring import ObjectnessTokenScorer, box_token_target
from synthetic import register_synthetic, tiny_opts
from utils import make_inputs, tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORR = "corr_mask_attn_map_dec_"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------- criteria
@pytest.mark.parametrize("selection", ["dam", "objectness"])
def test_both_criteria_train_a_step_and_select_rho_tokens(selection):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(SELECTION=selection)).train()
    inputs = make_inputs([(64, 96), (80, 64)])  # padded batch
    with EventStorage() as storage:
        losses = model(inputs)
        logged = storage.latest()
    assert {f"{CORR}{n}" for n in ("all", 0, 1, 2, 3)} <= set(logged)  # the correlation reaches the storage
    sum(losses.values()).backward()
    scorer = model.transformer.enc_mask_predictor
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in scorer.parameters())
    raw = model.forward_raw(inputs)
    valid = (~raw["mask_flatten"]).sum(1)
    assert raw["sparse_token_nums"].tolist() == [int(v * 0.3) + 1 for v in valid.tolist()]
    for i, count in enumerate(raw["sparse_token_nums"].tolist()):
        assert not raw["mask_flatten"][i, raw["backbone_topk_proposals"][i, :count]].any()  # never padding
    target = raw["scoring_target"]
    assert set(target.unique().tolist()) <= {0.0, 1.0} and not target[raw["mask_flatten"]].any()
    if selection == "dam":
        assert target.sum(1).tolist() == raw["sparse_token_nums"].float().tolist()


def test_objectness_target_marks_tokens_on_boxes():
    # one level of 4 x 4 cells (centres 0.125, 0.375, ...), the last column padded for image 1
    shapes = [(4, 4)]
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[1].view(4, 4)[:, 3] = True
    box = torch.tensor([[0.5, 0.5, 0.5, 0.5]])  # x, y in [0.25, 0.75]: the centres of cells 1..2
    tiny = torch.tensor([[0.9, 0.1, 0.01, 0.01]])  # covers no centre: only the cell holding its centre
    target = box_token_target(mask, shapes, [torch.cat([box, tiny]), box]).view(2, 4, 4)
    expected = torch.zeros(4, 4)
    expected[1:3, 1:3] = 1
    expected[0, 3] = 1
    torch.testing.assert_close(target[0], expected)
    # image 1: 3 valid columns (centres 1/6, 1/2, 5/6): column 1 only; box centre cell (1, 1) inside
    expected = torch.zeros(4, 4)
    expected[1:3, 1] = 1
    torch.testing.assert_close(target[1], expected)
    assert box_token_target(mask, shapes, [box[:0], box[:0]]).sum() == 0  # no ground truth


def test_objectness_target_needs_ground_truth():
    model = build_model(tiny_cfg(SELECTION="objectness")).eval()
    assert isinstance(model.transformer.enc_mask_predictor, ObjectnessTokenScorer)
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in make_inputs()]
    with torch.no_grad():
        raw = model.forward_raw(inputs)
    assert "scoring_target" not in raw and f"{CORR}all" in raw["metrics"]  # correlation without targets


# ---------------------------------------------------------------------------------------------- correlation
def _brute_force_dam(locations, weights, shapes):
    """The DAM by explicit loops: every point's weight split bilinearly over the cells around
    (x * W, y * H) (official convention), neighbours outside the level dropped."""
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    dam = torch.zeros(locations.shape[0], starts[-1])
    for index in torch.cartesian_prod(*[torch.arange(s) for s in weights.shape]).tolist():
        b, lvl = index[0], index[4]
        h, w = shapes[lvl]
        x, y = (locations[tuple(index)] * torch.tensor([w, h])).tolist()
        x0, y0 = int(torch.tensor(x).floor()), int(torch.tensor(y).floor())
        for col, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            for row, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                if 0 <= col < w and 0 <= row < h:
                    dam[b, starts[lvl] + row * w + col] += weights[tuple(index)] * wx * wy
    return dam, starts


def test_correlation_equals_brute_force_on_a_hand_made_attention_map():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    start = torch.tensor([0, 20])
    # (B, layers, Q, M, L, P, 2): 2 images, 2 layers, 3 queries, 2 heads, 2 levels, 2 points
    locations = torch.rand(2, 2, 3, 2, 2, 2, 2, generator=g) * 1.2 - 0.1  # some points fall outside
    weights = torch.rand(2, 2, 3, 2, 2, 2, generator=g)
    dam = decoder_attention_map(locations, weights, shapes, start, "official")
    brute, starts = _brute_force_dam(locations, weights, shapes)
    torch.testing.assert_close(dam, brute)
    selected = torch.stack([torch.randperm(26, generator=g)[:8] for _ in range(2)])
    counts = torch.tensor([8, 5])
    corr = dam_coverage(dam, selected, start, counts=counts, reduce=False)
    for i in range(2):
        chosen = selected[i, :counts[i]].tolist()
        for name, (a, b) in {"all": (0, 26), "0": (0, 20), "1": (20, 26)}.items():
            on = sum(float(brute[i, t]) for t in chosen if a <= t < b)
            assert corr[CORR + name][i].item() == pytest.approx(on / float(brute[i, a:b].sum()), rel=1e-5)
    # a selection covering all the mass gives 1, one covering none gives 0
    everything = torch.arange(26).expand(2, -1)
    assert all(v.tolist() == pytest.approx([1.0, 1.0]) for v in dam_coverage(dam, everything, start,
                                                                               reduce=False).values())
    sparse = torch.zeros(1, 26)
    sparse[0, [3, 21]] = torch.tensor([2.0, 1.0])
    nowhere = torch.tensor([[0, 1, 20, 22]])
    assert all(v.item() == 0.0 for v in dam_coverage(sparse, nowhere, start).values())
    assert dam_coverage(sparse, torch.tensor([[3, 21, 0]]), start, counts=torch.tensor([1]))[CORR + "all"] == \
        pytest.approx(2 / 3)  # only the image's own count


def test_inference_reports_the_correlation_of_the_selected_tokens():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(SELECTION="objectness", TEST_DAM_CORRELATION=True)).eval()
    inputs = make_inputs([(64, 96)])
    with torch.no_grad():
        result = model(inputs)[0]
        raw = model.forward_raw(inputs)
    assert set(result["dam_correlation"]) == {f"{CORR}{n}" for n in ("all", 0, 1, 2, 3)}
    for name, value in result["dam_correlation"].items():  # batch of one: the official batch mean
        assert 0.0 <= value <= 1.0 and value == pytest.approx(raw["metrics"][name].item(), abs=1e-6)
    model.test_rho = 0.0  # dense encoder: nothing selected, nothing reported
    with torch.no_grad():
        assert "dam_correlation" not in model(inputs)[0]


def test_evaluator_averages_over_images():
    evaluator = DAMCorrelationEvaluator()
    evaluator.reset()
    evaluator.process([{}, {}], [{"dam_correlation": {f"{CORR}all": 0.2, f"{CORR}0": 1.0}},
                                 {"dam_correlation": {f"{CORR}all": 0.6, f"{CORR}0": 0.0}}])
    evaluator.process([{}], [{"instances": None}])  # outputs without it are skipped
    assert evaluator.evaluate() == {"dam_correlation": {f"{CORR}all": pytest.approx(0.4), f"{CORR}0": 0.5}}
    evaluator.reset()
    assert evaluator.evaluate() == {}


# ---------------------------------------------------------------------------------------------- trainer, sweep
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("synthetic"))
    register_synthetic("analyses_train", data)
    register_synthetic("analyses_val", data)
    return data


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_objectness_trains_and_evaluates_through_the_trainer(synthetic, tmp_path):
    from detectron2.engine import default_argument_parser

    train_net = _load("projects/SparseDETR/train_net.py", "train_net")
    opts = tiny_opts("analyses_train", "analyses_val", str(tmp_path), 2, [
        "MODEL.SPARSE_DETR.SELECTION", "objectness", "MODEL.SPARSE_DETR.TEST_DAM_CORRELATION", "True"])
    train_net.main(default_argument_parser().parse_args(
        ["--config-file", os.path.join(ROOT, "configs/Base-SparseDETR.yaml"), *opts]))
    with open(tmp_path / "metrics.json") as f:
        metrics = [json.loads(line) for line in f]
    assert any(f"{CORR}all" in m for m in metrics)  # training-time logging
    final = metrics[-1]
    assert "bbox/AP" in final and 0.0 <= final[f"dam_correlation/{CORR}all"] <= 1.0  # evaluation


def test_sweep_runs_at_two_rhos(synthetic, tmp_path):
    sweep_rho = _load("projects/SparseDETR/sweep_rho.py", "sweep_rho")
    opts = tiny_opts("analyses_train", "analyses_val", str(tmp_path), 1)
    cfg = sweep_rho.setup_cfg(os.path.join(ROOT, "configs/Base-SparseDETR.yaml"), opts)
    weights = str(tmp_path / "model.pth")
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    rows = sweep_rho.main(["--config-file", os.path.join(ROOT, "configs/Base-SparseDETR.yaml"), "--rhos", "0.1", "0.5",
                           "--output-dir", str(tmp_path / "sweep"), *opts, "MODEL.WEIGHTS", weights])
    assert [r["rho"] for r in rows] == [0.1, 0.5]
    for r in rows:
        assert r["AP"] is not None and r["latency_ms"] > 0 and r["images"] == 4
        assert 0.0 <= r["corr"][f"{CORR}all"] <= 1.0
    table = (tmp_path / "sweep" / "sweep_rho.md").read_text()
    assert "| 0.1 |" in table and "| 0.5 |" in table
    assert (tmp_path / "sweep" / "sweep_rho.png").stat().st_size > 0
    assert json.loads((tmp_path / "sweep" / "sweep_rho.json").read_text())["rows"][1]["rho"] == 0.5

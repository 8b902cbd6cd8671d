"""Engine and projects/SparseDETR/train_net.py: optimizer recipe, training, --eval-only, --resume,
DefaultPredictor, every shipped config."""
import torch
from detectron2.config import get_cfg
from torch import nn

from sparse_detr import add_sparse_detr_config
from sparse_detr.engine import CPUAMPTrainer, Trainer, build_sparse_detr_optimizer, get_sparse_detr_param_groups
from sparse_detr.engine import trainer as trainer_module


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.sampling_offsets = nn.Linear(4, 4)
        self.value_proj = nn.Linear(4, 4)


class _ToyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.backbone[0].weight.requires_grad_(False)  # frozen: left out of the optimizer
        self.backbone.reference_points = nn.Linear(4, 4)  # linear-proj name wins over backbone
        self.attn = _Attn()
        self.head = nn.Linear(4, 1)


def _cfg():
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file("configs/Base-SparseDETR.yaml")
    return cfg


def test_param_groups_follow_the_official_recipe():
    model = _ToyDetector()
    groups = get_sparse_detr_param_groups(model, 2e-4, 1e-4, 0.1, 0.1, ["reference_points", "sampling_offsets"])
    by_name = {g["name"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in by_name["linear_proj"]["params"]} == {
        "backbone.reference_points.weight", "backbone.reference_points.bias",
        "attn.sampling_offsets.weight", "attn.sampling_offsets.bias",
    }
    assert {names[id(p)] for p in by_name["backbone"]["params"]} == {
        "backbone.0.bias", "backbone.1.weight", "backbone.1.bias",
    }
    assert {names[id(p)] for p in by_name["rest"]["params"]} == {
        "attn.value_proj.weight", "attn.value_proj.bias", "head.weight", "head.bias",
    }
    assert by_name["rest"]["lr"] == 2e-4
    assert abs(by_name["backbone"]["lr"] - 2e-5) < 1e-12 and abs(by_name["linear_proj"]["lr"] - 2e-5) < 1e-12
    assert all(g["weight_decay"] == 1e-4 for g in groups)


def test_optimizer_is_adamw_with_full_model_clipping():
    cfg = _cfg()
    model = _ToyDetector()
    optimizer = build_sparse_detr_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    optimizer.step()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert abs(total.item() - cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE) < 1e-5  # clipped jointly
    ratios = {round((g / 10.0).flatten()[0].item(), 8) for g in grads}
    assert len(ratios) == 1  # one common scale, not per-parameter clipping

    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = build_sparse_detr_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == cfg.SOLVER.MOMENTUM


def test_adamw_is_fused_on_cpu_and_steps_like_the_plain_loop():
    models, optimizers = [], []
    for device in ("cpu", "cuda"):  # the CUDA config builds the plain AdamW (parameters stay on CPU)
        cfg = _cfg()
        cfg.MODEL.DEVICE = device
        torch.manual_seed(0)
        models.append(_ToyDetector())
        optimizers.append(build_sparse_detr_optimizer(cfg, models[-1]))
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    for step in range(3):
        for model, optimizer in zip(models, optimizers):
            torch.manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn_like(p) if p.requires_grad else None
            optimizer.step()
    for fused, plain in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(fused, plain)


# ---------------------------------------------------------------------------------------------------
# train_net.py end to end on the tiny model and a registered synthetic dataset.
import glob  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from detectron2.engine import DefaultPredictor, default_argument_parser  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from synthetic import register_synthetic, tiny_opts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "Base-SparseDETR.yaml")


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(ROOT, "projects/SparseDETR/train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_net = _load_train_net()


def _args(output_dir, max_iter, *flags, extra=()):
    opts = tiny_opts("synthetic_train", "synthetic_val", output_dir, max_iter,
                     ["SOLVER.CHECKPOINT_PERIOD", "2", *extra])
    return default_argument_parser().parse_args(["--config-file", BASE, *flags, *opts])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train_net.main for 4 iterations (checkpoints every 2); returns the output folder."""
    data = str(tmp_path_factory.mktemp("synthetic"))
    register_synthetic("synthetic_train", data)
    register_synthetic("synthetic_val", data)
    output_dir = str(tmp_path_factory.mktemp("train"))
    train_net.main(_args(output_dir, 4))
    return output_dir


def test_train_writes_checkpoints_and_metrics(trained):
    assert os.path.exists(os.path.join(trained, "model_final.pth"))
    assert os.path.exists(os.path.join(trained, "model_0000001.pth"))
    with open(os.path.join(trained, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f]
    train = [m for m in metrics if "total_loss" in m]
    assert train[-1]["iteration"] == 3 and np.isfinite(train[-1]["total_loss"])
    assert "loss_mask_prediction" in train[-1]
    assert "bbox/AP50" in metrics[-1]  # COCOEvaluator ran after the last iteration


def test_eval_only_runs_coco_evaluator(trained):
    res = train_net.main(_args(trained, 4, "--eval-only", extra=[
        "MODEL.WEIGHTS", os.path.join(trained, "model_final.pth")]))
    bbox = res["bbox"]  # DefaultTrainer.test unwraps a single test dataset
    assert {"AP", "AP50", "AP75", "APs"} <= set(bbox)
    assert os.path.exists(os.path.join(trained, "inference", "coco_instances_results.json"))


def test_eval_only_with_test_time_augmentation(trained):
    res = train_net.main(_args(trained, 4, "--eval-only", extra=[
        "MODEL.WEIGHTS", os.path.join(trained, "model_final.pth"), "TEST.AUG.ENABLED", "True",
        "TEST.AUG.MIN_SIZES", "(64,)", "TEST.AUG.ROTATE_90", "True"]))
    assert {"AP", "AP50"} <= set(res["bbox"]) and {"AP", "AP50"} <= set(res["bbox_TTA"])
    assert os.path.exists(os.path.join(trained, "inference_TTA", "coco_instances_results.json"))
    with open(os.path.join(trained, "log.txt")) as f:  # the project's own log messages are kept too
        assert "sparse_detr.engine.trainer INFO: Running inference with test-time augmentation" in f.read()


def test_tta_evaluation_hook_runs_before_the_writer(trained):
    cfg = train_net.setup(_args(trained, 4, extra=["TEST.AUG.ENABLED", "True"]))
    names = [type(h).__name__ for h in Trainer(cfg)._hooks]
    assert names.count("EvalHook") == 2 and names[-1] == "PeriodicWriter"


def test_resume_continues_at_the_next_iteration(trained, tmp_path):
    output_dir = str(tmp_path / "resume")
    os.makedirs(output_dir)
    # Resume from the iteration-1 checkpoint (model_0001.pth: iterations 0 and 1 done).
    with open(os.path.join(output_dir, "last_checkpoint"), "w") as f:
        f.write(os.path.join(trained, "model_0000001.pth"))
    cfg = train_net.setup(_args(output_dir, 4, "--resume"))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    assert trainer.scheduler.last_epoch == 2
    trainer.train()
    final = torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=False)
    assert final["iteration"] == 3
    with open(os.path.join(output_dir, "metrics.json")) as f:
        assert [m["iteration"] for m in map(json.loads, f) if "total_loss" in m] == [3]


def test_amp_on_cpu_trains_in_bfloat16_with_float32_losses(trained, tmp_path, monkeypatch):
    """SOLVER.AMP.ENABLED with a CPU model: CPUAMPTrainer runs the convolutions and linear layers in
    bfloat16, the losses come out in float32 and finite, and the weights move (on any CPU: the check
    for bfloat16 instructions, which picks float32 on CPUs without them, is tested in test_time_budget.py)."""
    monkeypatch.setattr(trainer_module, "cpu_has_native_bfloat16", lambda: True)
    cfg = train_net.setup(_args(str(tmp_path), 2, extra=["SOLVER.AMP.ENABLED", "True"]))
    trainer = train_net.Trainer(cfg)
    assert type(trainer._trainer) is CPUAMPTrainer
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen, losses = [], {}
    hooks = [model.transformer.encoder.layers[0].linear1.register_forward_hook(lambda m, i, o: seen.append(o.dtype)),
             model.register_forward_hook(lambda m, i, o: losses.update(o) if isinstance(o, dict) else None)]
    trainer.train()  # 2 iterations, then the COCO evaluation (in float32)
    for hook in hooks:
        hook.remove()
    assert seen[0] == torch.bfloat16
    assert losses and all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert "transformer.encoder.layers.0.linear1.weight" in moved


def test_default_predictor_on_trained_weights(trained):
    cfg = train_net.setup(_args(trained, 4, extra=["MODEL.WEIGHTS", os.path.join(trained, "model_final.pth")]))
    predictor = DefaultPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)  # BGR, any size
    inst = predictor(image)["instances"]
    sd = cfg.MODEL.SPARSE_DETR
    assert inst.image_size == (50, 70)
    assert len(inst) == min(cfg.TEST.DETECTIONS_PER_IMAGE, sd.NUM_QUERIES * sd.NUM_CLASSES)
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 2] <= 70).all() and (boxes[:, 3] <= 50).all() and (inst.scores <= 1).all()


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_every_config_builds(path):
    cfg = train_net.setup(default_argument_parser().parse_args(["--config-file", path, "MODEL.DEVICE", "cpu"]))
    model = build_model(cfg)
    assert type(model).__name__ == "SparseDETR"
    assert model.transformer.two_stage == cfg.MODEL.SPARSE_DETR.TWO_STAGE
    assert (model.transformer.enc_mask_predictor is not None) == (cfg.MODEL.SPARSE_DETR.RHO > 0)


SCALED_SIZE_KEYS = ["INPUT.DETR_RESIZE_MIN_SIZES", "INPUT.DETR_RESIZE_MAX_SIZE", "INPUT.MIN_SIZE_TEST",
                    "INPUT.MAX_SIZE_TEST", "TEST.AUG.MIN_SIZES", "TEST.AUG.MAX_SIZE"]


@pytest.mark.parametrize("name", ["sparse_detr_R_50_rho_0.1_os", "deformable_detr_R_50_topk_bbr"])
def test_float32_cpu_configs_are_their_twins_at_0_8_scale(name):
    """The DeepForest configs for CPUs without bfloat16 instructions change nothing but the input sizes and
    res3's fine-tuning: the test size, the middle TTA scale, the centre of the training range and the size
    caps are 0.8x, and res3 is frozen (FREEZE_AT 3) where the bfloat16 config fine-tunes it (2)."""
    def flat(path):
        cfg = add_sparse_detr_config(get_cfg())
        cfg.merge_from_file(path)
        items = {}
        def walk(node, prefix):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.") if isinstance(value, dict) else items.update({prefix + key: value})
        walk(cfg, "")
        return items

    native = flat(os.path.join(ROOT, "configs", "DeepForest", f"{name}_cpu.yaml"))
    scaled = flat(os.path.join(ROOT, "configs", "DeepForest", f"{name}_fp32_cpu.yaml"))
    assert {k for k in native if native[k] != scaled[k]} == set(SCALED_SIZE_KEYS) | {"OUTPUT_DIR", "MODEL.BACKBONE.FREEZE_AT"}
    assert (native["MODEL.BACKBONE.FREEZE_AT"], scaled["MODEL.BACKBONE.FREEZE_AT"]) == (2, 3)
    for key in ["INPUT.DETR_RESIZE_MAX_SIZE", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "TEST.AUG.MAX_SIZE"]:
        assert scaled[key] == 0.8 * native[key], key
    assert sorted(scaled["TEST.AUG.MIN_SIZES"])[1] == 0.8 * sorted(native["TEST.AUG.MIN_SIZES"])[1]
    centre = lambda sizes: (min(sizes) + max(sizes)) / 2  # noqa: E731
    assert centre(scaled["INPUT.DETR_RESIZE_MIN_SIZES"]) == 0.8 * centre(native["INPUT.DETR_RESIZE_MIN_SIZES"])


FIXTURE = os.path.join(ROOT, "..", "shared", "fixtures", "official_sparse_detr_small.pt.xz")


@pytest.mark.skipif(not os.path.exists(FIXTURE), reason="official parity fixture not available")
def test_default_predictor_on_a_converted_official_checkpoint(tmp_path):
    """The official small fixture's weights, converted, through DefaultPredictor: its detections on
    the fixture's unpadded first image are the official post-processed ones (boxes clipped)."""
    import io
    import lzma

    from sparse_detr.checkpoint import convert_official_checkpoint

    fx = torch.load(io.BytesIO(lzma.open(FIXTURE).read()), weights_only=True)
    source, converted = str(tmp_path / "official.pth"), str(tmp_path / "converted.pth")
    torch.save({"model": fx["model"], "args": fx["args"]}, source)
    summary = convert_official_checkpoint(source, converted, keep_official_classes=True)
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file(BASE)
    cfg.merge_from_list(list(summary.overrides) + [
        "MODEL.WEIGHTS", converted, "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "320", "INPUT.MAX_SIZE_TEST", "1000"])
    image = fx["inputs"]["images_uint8_rgb"][0].numpy()  # 320x480: no resize, no padding
    inst = DefaultPredictor(cfg)(np.ascontiguousarray(image[:, :, ::-1]))["instances"]  # BGR in
    expected = fx["eval"]["postprocess"][0]
    expected_boxes = expected["boxes"].float().clone()  # Detectron2's detector_postprocess clips to the image
    expected_boxes[:, 0::2] = expected_boxes[:, 0::2].clamp(0, 480)
    expected_boxes[:, 1::2] = expected_boxes[:, 1::2].clamp(0, 320)
    torch.testing.assert_close(inst.scores, expected["scores"].float(), atol=1e-4, rtol=0)
    assert torch.equal(inst.pred_classes, expected["labels"])
    # Equal scores may come in either order: every official detection has a twin (label, score, box).
    twin = ((inst.pred_classes[:, None] == expected["labels"][None])
            & ((inst.scores[:, None] - expected["scores"][None].float()).abs() < 1e-4)
            & ((inst.pred_boxes.tensor[:, None] - expected_boxes[None]).abs().amax(-1) < 1e-2))
    assert twin.any(0).all() and twin.any(1).all()

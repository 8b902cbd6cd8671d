"""Engine and projects/SparseDETR/train_net.py: optimizer recipe, training, --eval-only, --resume,
DefaultPredictor, every shipped config."""
import torch
from detectron2.config import get_cfg
from torch import nn

from sparse_detr import add_sparse_detr_config
from sparse_detr.engine import build_sparse_detr_optimizer, get_sparse_detr_param_groups


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

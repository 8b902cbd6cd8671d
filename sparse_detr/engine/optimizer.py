"""The official optimisation recipe: AdamW parameter groups and full-model gradient clipping."""
import functools
from typing import Any, Dict, List

import torch
from detectron2.solver.build import (
    _generate_optimizer_class_with_gradient_clipping,
    maybe_add_gradient_clipping,
)

__all__ = ["get_sparse_detr_param_groups", "maybe_add_full_model_gradient_clipping", "build_sparse_detr_optimizer"]


def get_sparse_detr_param_groups(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    backbone_multiplier: float,
    linear_proj_multiplier: float,
    linear_proj_names: List[str],
) -> List[Dict[str, Any]]:
    """Three groups, as the official `main.py`: parameters whose name contains one of
    `linear_proj_names` get `base_lr * linear_proj_multiplier` (checked first), the other
    parameters of `model.backbone` get `base_lr * backbone_multiplier`, the rest `base_lr`.
    Every group has the same weight decay; frozen parameters are left out; empty groups are dropped.
    """
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups = {"linear_proj": [], "backbone": [], "rest": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(key in name for key in linear_proj_names):
            groups["linear_proj"].append(param)
        elif id(param) in backbone_ids:
            groups["backbone"].append(param)
        else:
            groups["rest"].append(param)
    lrs = {
        "rest": base_lr,
        "backbone": base_lr * backbone_multiplier,
        "linear_proj": base_lr * linear_proj_multiplier,
    }
    return [
        {"params": params, "lr": lrs[key], "weight_decay": weight_decay, "name": key}
        for key, params in groups.items()
        if params
    ]


def maybe_add_full_model_gradient_clipping(cfg, optimizer_type):
    """`optimizer_type`, or a subclass clipping the norm of all gradients together before each step
    when SOLVER.CLIP_GRADIENTS has CLIP_TYPE "full_model" (the official `clip_grad_norm_` of the
    whole model); other clip types are Detectron2's per-parameter clipping.

    Under AMP, `GradScaler.step` unscales the gradients before calling `step`, so the norm is that
    of the true gradients (and skips `step` when they overflowed). A non-finite norm otherwise raises
    a RuntimeError before the weights change (the official code would clip every gradient to NaN).
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return optimizer_type
    if clip.CLIP_TYPE != "full_model":
        return maybe_add_gradient_clipping(cfg, optimizer_type)
    clip_all = functools.partial(
        torch.nn.utils.clip_grad_norm_, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE,
        error_if_nonfinite=True,
    )
    return _generate_optimizer_class_with_gradient_clipping(optimizer_type, global_clipper=clip_all)


def build_sparse_detr_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER "ADAMW" (official) or "SGD" (momentum SOLVER.MOMENTUM, the official `--sgd`),
    over `get_sparse_detr_param_groups`, with `maybe_add_full_model_gradient_clipping`."""
    groups = get_sparse_detr_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
        linear_proj_multiplier=cfg.SOLVER.LINEAR_PROJ_MULTIPLIER,
        linear_proj_names=list(cfg.SOLVER.LINEAR_PROJ_NAMES),
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        # On CPU the fused AdamW step is 2.6x faster than the default per-parameter loop (20 vs 54 ms per
        # step for the main job's 34 M trainable parameters on 2 threads, whose steps take about 0.55 s).
        # Not on CUDA, where GradScaler would hand a fused step still-scaled gradients to clip.
        optimizer_type, kwargs = torch.optim.AdamW, {"fused": True} if cfg.MODEL.DEVICE == "cpu" else {}
    elif name == "SGD":
        optimizer_type, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    optimizer_type = maybe_add_full_model_gradient_clipping(cfg, optimizer_type)
    return optimizer_type(groups, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)

"""Training of Sparse DETR with Detectron2's engine."""
from .optimizer import (
    build_sparse_detr_optimizer,
    get_sparse_detr_param_groups,
    maybe_add_full_model_gradient_clipping,
)
from .time_budget import TrainTimeBudget
from .trainer import CPUAMPTrainer, Trainer, cpu_has_native_bfloat16
from .weight_ema import WeightEMA

__all__ = [
    "Trainer",
    "CPUAMPTrainer",
    "WeightEMA",
    "TrainTimeBudget",
    "cpu_has_native_bfloat16",
    "build_sparse_detr_optimizer",
    "get_sparse_detr_param_groups",
    "maybe_add_full_model_gradient_clipping",
]
from . import pretrained  # noqa: E402,F401  (registers the imgsim:// path handler)

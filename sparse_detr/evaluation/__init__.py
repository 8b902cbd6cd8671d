"""Evaluators for the paper's analyses (usable with Detectron2's `DatasetEvaluators`) and a per-group
breakdown of COCO AP."""
from .ap_by_group import coco_ap_by_group
from .dam_correlation import DAMCorrelationEvaluator

__all__ = ["DAMCorrelationEvaluator", "coco_ap_by_group"]

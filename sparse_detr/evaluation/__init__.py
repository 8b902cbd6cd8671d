"""Evaluators for the paper's analyses (usable with Detectron2's `DatasetEvaluators`)."""
from .dam_correlation import DAMCorrelationEvaluator

__all__ = ["DAMCorrelationEvaluator"]

"""Sparse DETR model: importing registers META_ARCH_REGISTRY["SparseDETR"] and the Swin backbone builder."""
from .backbone import build_sparse_detr_swin_backbone
from .meta_arch import SparseDETR, validate_sparse_detr_config
from .test_time_augmentation import SparseDETRWithTTA
from .token_scoring import TOKEN_SCORERS, register_token_scorer

__all__ = ["SparseDETR", "SparseDETRWithTTA", "validate_sparse_detr_config", "build_sparse_detr_swin_backbone", "TOKEN_SCORERS",
           "register_token_scorer"]

"""Data loading of Sparse DETR: the DETR dataset mapper and the project's datasets."""
from . import datasets  # noqa: F401  (registers the DeepForest splits)
from .dataset_mapper import DetrDatasetMapper, build_dataset_mapper
from .transforms import RandomHueRotation, RandomSelect, build_detr_train_augmentation

__all__ = ["DetrDatasetMapper", "build_dataset_mapper", "RandomSelect", "RandomHueRotation", "build_detr_train_augmentation"]

"""Datasets of this project. Importing registers them under Detectron2's usual root
($DETECTRON2_DATASETS, default `datasets/`); COCO itself is registered by Detectron2."""
import os

from .deepforest import prepare_deepforest, register_deepforest

__all__ = ["prepare_deepforest", "register_deepforest"]

register_deepforest(os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "deepforest"))

"""Sparse DETR for Detectron2. Importing this package registers the `SparseDETR` meta-architecture,
its backbones, the project's datasets (DeepForest) and the `imgsim://` weights path, and exposes
`add_sparse_detr_config`."""
__version__ = "0.1.0"

from .config import add_sparse_detr_config  # noqa: E402
from . import modeling  # noqa: E402,F401  (registers META_ARCH_REGISTRY["SparseDETR"] and backbones)
from . import data  # noqa: E402,F401  (registers the DeepForest datasets)
from . import engine  # noqa: E402,F401  (registers the imgsim:// weights path)

__all__ = ["add_sparse_detr_config", "__version__"]

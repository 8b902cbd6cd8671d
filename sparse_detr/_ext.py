"""Loads the compiled extension `sparse_detr._C` if it was built; never raises."""
import os

try:
    from . import _C  # noqa: F401  (loading registers torch.ops.sparse_detr.*)

    EXTENSION_ERROR = None
except ImportError as e:  # not built, or built for another torch
    _C = None
    EXTENSION_ERROR = str(e)


def has_extension():
    return _C is not None


def has_cuda_kernels():
    return _C is not None and bool(_C.has_cuda())


def force_reference():
    """`SPARSE_DETR_MSDA=reference` forces the pure-PyTorch attention path."""
    return os.environ.get("SPARSE_DETR_MSDA", "").lower() == "reference"

"""`python -m sparse_detr.collect_env`: versions and which attention backend runs on each device."""
import platform
import sys

import torch
import torchvision

from . import __version__, _ext
from .layers.ms_deform_attn import backend_for_device


def collect_env_info():
    import detectron2

    rows = [
        ("Python", sys.version.split()[0] + f" ({platform.machine()})"),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()})"),
        ("torchvision", torchvision.__version__),
        ("detectron2", detectron2.__version__),
        ("sparse_detr", __version__),
        ("sparse_detr._C", "loaded" if _ext.has_extension() else f"not loaded ({_ext.EXTENSION_ERROR})"),
        ("  CPU kernels", "yes" if _ext.has_extension() else "no"),
        ("  CUDA kernels", "yes (CUDA %s)" % _ext._C.cuda_version() if _ext.has_cuda_kernels() else "no"),
        ("SPARSE_DETR_MSDA", "reference (forced)" if _ext.force_reference() else "auto"),
        ("attention backend on cpu", backend_for_device("cpu")),
        ("attention backend on cuda", backend_for_device("cuda") if torch.cuda.is_available() else "n/a (no GPU)"),
        ("CPU threads", str(torch.get_num_threads())),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


if __name__ == "__main__":
    print(collect_env_info())

"""Build script: the `sparse_detr` package and its `sparse_detr._C` extension.

The C++ (CPU) kernels are always compiled. The CUDA kernels are added when nvcc is found and
either a GPU is visible or FORCE_CUDA=1 is set (TORCH_CUDA_ARCH_LIST picks the architectures).
One shared object then carries both and still imports on a machine without a GPU.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    if CUDA_HOME is None or not torch.version.cuda:
        return False
    return torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"


def get_extensions():
    csrc = os.path.join("csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "*", "*.cu")))
    extra = {"cxx": ["-O3", "-std=c++20"]}
    define_macros = []
    ext_cls = CppExtension
    if os.environ.get("SPARSE_DETR_OPENMP", "1") == "1":
        extra["cxx"].append("-fopenmp")
    if _want_cuda() and cuda_sources:
        ext_cls = CUDAExtension
        sources += cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
    return [
        ext_cls(
            "sparse_detr._C",
            sources,
            include_dirs=[os.path.abspath(csrc)],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"] if "-fopenmp" in extra["cxx"] else [],
        )
    ]


setup(
    name="sparse_detr",
    version="0.1.0",
    description="Sparse DETR (Roh et al., ICLR 2022) as a Detectron2 plugin, with a CPU/CUDA "
    "multi-scale deformable attention op",
    packages=find_packages(include=["sparse_detr", "sparse_detr.*"]),
    python_requires=">=3.10",
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

"""Runs a script or module with `sparse_detr` importable where Detectron2 is not installed (the GPU machine).

    python tests/gpu/light.py projects/SparseDETR/benchmark_ops.py --device cuda
    python tests/gpu/light.py -m pytest -q tests/test_ms_deform_attn.py

Without Detectron2, `sparse_detr/__init__.py` (which registers the meta-architecture) cannot run; the op and
its module need only torch, so the package is stood in for by an empty one over the same folder. With
Detectron2 installed nothing is stubbed (SPARSE_DETR_LIGHT=1 stubs it anyway, to try this out).
"""
import importlib.util
import os
import runpy
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if importlib.util.find_spec("detectron2") is None or os.environ.get("SPARSE_DETR_LIGHT") == "1":
    package = types.ModuleType("sparse_detr")
    package.__path__ = [os.path.join(ROOT, "sparse_detr")]
    sys.modules["sparse_detr"] = package
sys.path.insert(0, ROOT)

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "-m":
        sys.argv = [sys.argv[2]] + sys.argv[3:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")

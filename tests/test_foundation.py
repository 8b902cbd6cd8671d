"""The package installs, registers itself with Detectron2, and its extension loads."""
import subprocess
import sys

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

import sparse_detr
from sparse_detr import _ext


def test_import_registers_meta_arch():
    assert META_ARCH_REGISTRY.get("SparseDETR") is not None


def test_import_alone_registers_datasets_and_weights_path():
    """In a fresh interpreter, `import sparse_detr` is all a user needs for the project's datasets and
    the `imgsim://` weights."""
    code = ("import sparse_detr\n"
            "from detectron2.data import DatasetCatalog\n"
            "from detectron2.utils.file_io import PathManager\n"
            "print({'deepforest_trees_train', 'deepforest_trees_val'} <= set(DatasetCatalog.list()),\n"
            "      'imgsim://' in PathManager._path_handlers)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_add_config_adds_keys_and_is_idempotent():
    cfg = get_cfg()
    assert "SPARSE_DETR" not in cfg.MODEL
    sparse_detr.add_sparse_detr_config(cfg)
    assert cfg.MODEL.SPARSE_DETR.RHO == pytest.approx(0.1)
    assert cfg.MODEL.SPARSE_DETR.NUM_QUERIES == 300
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == pytest.approx(0.1)
    cfg.MODEL.SPARSE_DETR.RHO = 0.3
    sparse_detr.add_sparse_detr_config(cfg)  # a second call keeps user values
    assert cfg.MODEL.SPARSE_DETR.RHO == pytest.approx(0.3)


def test_base_config_merges():
    cfg = sparse_detr.add_sparse_detr_config(get_cfg())
    cfg.merge_from_file("configs/Base-SparseDETR.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "SparseDETR"
    assert cfg.INPUT.FORMAT == "RGB"


def test_extension_loads_with_cpu_kernels():
    assert _ext.has_extension(), f"sparse_detr._C did not load: {_ext.EXTENSION_ERROR}"
    assert isinstance(_ext._C.has_cuda(), bool)


def test_collect_env_reports_backends():
    out = subprocess.run([sys.executable, "-m", "sparse_detr.collect_env"], capture_output=True, text=True,
                         check=True).stdout
    for field in ("torch", "detectron2", "sparse_detr._C", "CUDA kernels", "attention backend on cpu"):
        assert field in out
    assert "compiled kernel" in out.split("attention backend on cpu")[1].splitlines()[0]


def test_reference_forced_by_environment():
    env = {"SPARSE_DETR_MSDA": "reference", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "sparse_detr.collect_env"], capture_output=True, text=True,
                         check=True, env=env).stdout
    assert "reference" in out.split("attention backend on cpu")[1].splitlines()[0]

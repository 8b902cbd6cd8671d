"""projects/SparseDETR/benchmark_train_step.py on the tiny model and synthetic data (CPU, seconds)."""
import importlib.util
import os

import pytest

from synthetic import register_synthetic, tiny_opts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(ROOT, "projects/SparseDETR/benchmark_train_step.py")
    spec = importlib.util.spec_from_file_location("benchmark_train_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_time_the_same_batches(bench, tmp_path, capsys):
    name = register_synthetic("bench_step_synthetic", str(tmp_path / "data"))
    opts = tiny_opts(name, name, str(tmp_path / "out"), max_iter=10)
    times = bench.main(["--config-file", os.path.join(ROOT, "configs/Base-SparseDETR.yaml"), "--batches", "2",
                        "--rounds", "2", "--memory-format", "--variant", "no encoder aux loss",
                        "MODEL.SPARSE_DETR.USE_ENC_AUX_LOSS", "False", "--opts", *opts])
    assert list(times) == ["baseline", "baseline, channels_last backbone input", "no encoder aux loss"]
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    table = capsys.readouterr().out
    assert "| no encoder aux loss |" in table and "1.00x" in table


def test_rounds_alternate_the_row_order(bench):
    rows = ["baseline", "a", "b"]
    assert [bench.round_order(rows, r) for r in range(3)] == [rows, ["b", "a", "baseline"], rows]


def test_variant_needs_key_value_pairs(bench):
    with pytest.raises(SystemExit):
        bench.main(["--config-file", "configs/Base-SparseDETR.yaml", "--variant", "odd", "SEED"])

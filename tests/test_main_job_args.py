"""tools/main_job.sh refuses a missing config file and odd overrides before doing any work."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args, message", [
    (["configs/DeepForest/missing.yaml"], "config file not found: configs/DeepForest/missing.yaml"),
    (["SEED"], "overrides come in KEY VALUE pairs"),
    (["configs/DeepForest/sparse_detr_R_50_rho_0.1_cpu.yaml", "SEED", "1", "OUTPUT_DIR"], "KEY VALUE pairs"),
])
def test_bad_arguments_are_refused_before_setup(args, message):
    run = subprocess.run(["bash", os.path.join(ROOT, "tools", "main_job.sh"), *args],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert message in run.stderr
    assert "[setup]" not in run.stdout

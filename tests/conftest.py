"""Shared pytest fixtures."""
import os
import shutil

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One thread: tiny ops on a busy machine otherwise wait on OpenMP thread scheduling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_FAILED_TESTS_TMP_PATHS = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and "tmp_path" in getattr(item, "funcargs", {}):
        _FAILED_TESTS_TMP_PATHS.add(item.funcargs["tmp_path"])
    return report


@pytest.fixture(scope="module", autouse=True)
def free_module_temp_folders(tmp_path_factory):
    """Deletes, when a module ends, the temp folders made while it ran (its module-scoped fixtures' training
    runs and converted checkpoints, 0.1-0.4 GB each; a failed test's tmp_path stays): kept to the session's
    end they add up to 6 GB, more than a CI disk may hold. SPARSE_DETR_KEEP_TEST_TMP=1 keeps them all."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if os.environ.get("SPARSE_DETR_KEEP_TEST_TMP") != "1":
        for path in set(base.iterdir()) - before - _FAILED_TESTS_TMP_PATHS:
            shutil.rmtree(path, ignore_errors=True)

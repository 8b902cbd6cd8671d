"""Robustness of training (docs/robustness.md): non-finite losses stop training naming the loss; a run
killed with SIGKILL resumes with --resume at the next iteration with its optimizer and scheduler state;
truncated, foreign and official-format checkpoints give clear errors naming the file."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import sparse_detr.data  # noqa: F401  (as train_net.py)
from sparse_detr import add_sparse_detr_config
from sparse_detr.checkpoint import CheckpointError, SparseDETRCheckpointer
from sparse_detr.engine import Trainer, build_sparse_detr_optimizer
from sparse_detr.modeling import SparseDETR
from synthetic import register_synthetic, tiny_opts
from utils import tiny_cfg

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
BASE = os.path.join(ROOT, "configs", "Base-SparseDETR.yaml")
DATASET = "robustness_synthetic"


def _opts(output_dir: str, max_iter: int):
    """Tiny model on the synthetic dataset, AdamW, lr x0.1 after iteration 1, checkpoint every 2, no test."""
    return tiny_opts(DATASET, DATASET, output_dir, max_iter, [
        "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.STEPS", "(1,)", "DATASETS.TEST", "()"])


def _cfg(output_dir: str, max_iter: int):
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file(BASE)
    cfg.merge_from_list(_opts(output_dir, max_iter))
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("synthetic"))
    register_synthetic(DATASET, path)
    return path


# ---------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("name, value", [("loss_mask_prediction", "nan"), ("loss_giou_enc", "inf"),
                                         ("loss_ce", "nan")])
def test_non_finite_loss_stops_training_naming_the_loss(data_dir, tmp_path, monkeypatch, name, value):
    """Every loss, the scoring loss included, reaches Detectron2's check, which raises before the
    optimizer step. (NaN/inf predictions stop earlier, in the matcher: test_criterion.py::
    test_matcher_rejects_non_finite_costs.)"""
    losses = SparseDETR.losses

    def broken(self, out, targets):
        result = losses(self, out, targets)
        result[name] = result[name] * float(value)
        return result

    monkeypatch.setattr(SparseDETR, "losses", broken)
    trainer = Trainer(_cfg(str(tmp_path), max_iter=5))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=rf"(?s)iteration=0.*'{name}': {value}") as error:
        trainer.train()
    assert set(re.findall(r"'(loss_\w+)'", str(error.value))) == set(trainer.model.weight_dict)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no optimizer step on the broken losses
    assert not os.path.exists(tmp_path / "model_final.pth")


def test_non_finite_gradient_stops_the_step_before_the_weights_change():
    """Finite losses but a NaN gradient (which the official clipping would spread to every weight)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    optimizer = build_sparse_detr_optimizer(_cfg("", 1), model)  # AdamW, full-model clipping
    model(torch.ones(2, 3)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------------------------------------- interruption
RUNNER = """
import runpy, sys
sys.path.insert(0, {tests!r})
from synthetic import register_synthetic
register_synthetic({dataset!r}, {data!r})
sys.argv = [{train_net!r}] + {argv!r}
runpy.run_path({train_net!r}, run_name="__main__")
"""


def _train_until_checkpoint_then_kill(data_dir: str, output_dir: str, timeout: float = 240.0) -> str:
    """Run projects/SparseDETR/train_net.py (1000 iterations) in a subprocess and SIGKILL it as soon as a
    checkpoint is tagged in `last_checkpoint`; returns the path of the checkpoint to resume from."""
    train_net = os.path.join(ROOT, "projects", "SparseDETR", "train_net.py")
    argv = ["--config-file", BASE, *_opts(output_dir, 1000)]
    code = RUNNER.format(tests=TESTS, dataset=DATASET, data=data_dir, train_net=train_net, argv=argv)
    tag = os.path.join(output_dir, "last_checkpoint")
    with open(os.path.join(os.path.dirname(output_dir), "train_net.log"), "w+") as log:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not os.path.exists(tag) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert process.poll() is None, "train_net.py ended before writing a checkpoint:\n" + open(log.name).read()
            assert os.path.exists(tag), "no checkpoint after %.0f s:\n%s" % (timeout, open(log.name).read())
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    with open(tag) as f:
        return os.path.join(output_dir, f.read().strip())


@pytest.fixture(scope="module")
def killed_run(data_dir, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("killed") / "output")
    os.makedirs(output_dir)
    return output_dir, _train_until_checkpoint_then_kill(data_dir, output_dir)


def test_killed_training_resumes_at_the_next_iteration_with_optimizer_and_scheduler(killed_run):
    output_dir, checkpoint_path = killed_run
    saved = torch.load(checkpoint_path, weights_only=False)
    last = saved["iteration"]
    saved_optimizer = saved["trainer"]["_trainer"]["optimizer"]
    saved_scheduler = saved["trainer"]["hooks"]["LRScheduler"]
    assert last >= 1 and (last + 1) % 2 == 0

    trainer = Trainer(_cfg(output_dir, max_iter=last + 3))
    fresh_lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == last + 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, saved["model"][k]), k
    state = trainer.optimizer.state_dict()
    assert state["param_groups"] == saved_optimizer["param_groups"]
    assert len(state["state"]) == len(saved_optimizer["state"]) > 0
    for i, entry in state["state"].items():  # AdamW step count and moments
        for key, value in entry.items():
            assert torch.equal(value, saved_optimizer["state"][i][key]), (i, key)
    assert trainer.scheduler.state_dict() == saved_scheduler
    assert trainer.scheduler.last_epoch == last + 1
    # lr x0.1 after iteration 1 (SOLVER.STEPS): restored, not the fresh run's
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([lr * 0.1 for lr in fresh_lrs])

    trainer.train()
    final = torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=False)
    assert final["iteration"] == last + 2
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == last + 3


def _output_with_last_checkpoint(root, name: str, checkpoint: str) -> str:
    output_dir = os.path.join(str(root), name)
    os.makedirs(output_dir)
    with open(os.path.join(output_dir, "last_checkpoint"), "w") as f:
        f.write(checkpoint)
    return output_dir


def test_resuming_from_a_truncated_or_foreign_checkpoint_names_the_file(killed_run, tmp_path):
    _, checkpoint_path = killed_run
    truncated = str(tmp_path / "truncated.pth")
    with open(checkpoint_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[: os.path.getsize(checkpoint_path) // 2])
    output_dir = _output_with_last_checkpoint(tmp_path, "truncated", truncated)
    trainer = Trainer(_cfg(output_dir, max_iter=10))
    with pytest.raises(CheckpointError, match=rf"cannot read the checkpoint {re.escape(truncated)}.*truncated"):
        trainer.resume_or_load(resume=True)

    other = _cfg(str(tmp_path), 10)
    other.MODEL.SPARSE_DETR.NUM_CLASSES = 3
    foreign = str(tmp_path / "other_model.pth")
    torch.save({"model": build_model(other).state_dict(), "iteration": 5}, foreign)
    output_dir = _output_with_last_checkpoint(tmp_path, "foreign", foreign)
    trainer = Trainer(_cfg(output_dir, max_iter=10))
    with pytest.raises(CheckpointError, match=rf"cannot resume from {re.escape(foreign)}.*shape mismatches \d+ "
                                              r"\['class_embed.0.weight'"):
        trainer.resume_or_load(resume=True)


def test_initial_weights_from_a_foreign_or_official_checkpoint_are_refused(tmp_path):
    """MODEL.WEIGHTS may match in part (backbone-only weights, another NUM_CLASSES), but not at all, and
    an official checkpoint must be converted first (the converter's own errors: test_converter.py)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    foreign = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), foreign)
    with pytest.raises(CheckpointError, match=rf"none of the 122 tensors of {re.escape(foreign)} fits"):
        SparseDETRCheckpointer(model).resume_or_load(foreign, resume=False)
    official = str(tmp_path / "official.pth")
    torch.save({"model": {k.replace("backbone.", "backbone.0.body.", 1): v for k, v in model.state_dict().items()}},
               official)
    with pytest.raises(CheckpointError, match="official Sparse DETR checkpoint; convert it first"):
        SparseDETRCheckpointer(model).resume_or_load(official, resume=False)
    other = build_model(tiny_cfg(NUM_CLASSES=3))
    partial = str(tmp_path / "three_classes.pth")
    torch.save({"model": other.state_dict()}, partial)
    SparseDETRCheckpointer(model).resume_or_load(partial, resume=False)  # fine-tuning: heads skipped
    torch.testing.assert_close(model.transformer.level_embed, other.transformer.level_embed)

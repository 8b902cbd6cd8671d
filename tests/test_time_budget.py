"""SOLVER.TRAIN_TIME_BUDGET (TrainTimeBudget): the schedule shrinks to fit the budget, learning-rate
drop and final checkpoint included, and --resume continues it; bfloat16 autocast only where the CPU has
bfloat16 kernels."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from detectron2.engine import AMPTrainer, SimpleTrainer, default_argument_parser  # noqa: E402

from sparse_detr.engine import CPUAMPTrainer, Trainer, TrainTimeBudget  # noqa: E402
from sparse_detr.engine import trainer as trainer_module  # noqa: E402
from sparse_detr.engine.time_budget import shortened_schedule  # noqa: E402
from synthetic import register_synthetic, tiny_opts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "Base-SparseDETR.yaml")
sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR"))
import train_net  # noqa: E402


def _cfg(output_dir, max_iter, *extra):
    opts = tiny_opts("budget_train", "budget_val", output_dir, max_iter,
                     ["SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.STEPS", "(9,)", *extra])
    return train_net.setup(default_argument_parser().parse_args(["--config-file", BASE, *opts]))


@pytest.fixture(scope="module", autouse=True)
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("budget_data"))
    register_synthetic("budget_train", root)
    register_synthetic("budget_val", root)


def _trainer(cfg, clock_readings, resume=False):
    """A Trainer whose budget hook probes iterations 1..2 and reads `clock_readings` as its clock."""
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    budget = next(h for h in trainer._hooks if isinstance(h, TrainTimeBudget))
    readings = iter(clock_readings)
    budget.warmup_iters, budget.probe_iters, budget._clock = 1, 2, lambda: next(readings)
    return trainer


def _lrs(trainer):
    return {it: lr for lr, it in trainer.storage.history("lr").values()}


def test_steps_keep_their_fraction_of_the_schedule():
    assert shortened_schedule(1500, (1280,), 750) == (640,)
    assert shortened_schedule(12, (9, 11), 7) == (5, 6)
    assert shortened_schedule(100, (1,), 10) == (1,)


def test_a_slow_machine_gets_a_shorter_schedule_that_resume_continues(tmp_path):
    out = str(tmp_path / "run")
    # started at 0 s; the probe (iterations 1 and 2) from 1 s to 21 s: 10 s an iteration. Budget 61 s:
    # 40 s left = 4 more iterations after the third, so 7 instead of 12, the lr drop at 5 instead of 9.
    trainer = _trainer(_cfg(out, 12, "SOLVER.TRAIN_TIME_BUDGET", "61"), [0.0, 1.0, 21.0])
    trainer.train()
    assert trainer.iter == trainer.max_iter == 7
    base_lr = trainer.cfg.SOLVER.BASE_LR
    lrs = _lrs(trainer)
    assert sorted(lrs) == list(range(7))
    assert all(lrs[i] == pytest.approx(base_lr) for i in range(5))
    assert all(lrs[i] == pytest.approx(base_lr * 0.1) for i in (5, 6))
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert final["iteration"] == 6
    assert final["trainer"]["hooks"]["TrainTimeBudget"] == {"decided": True, "max_iter": 7, "steps": (5,)}

    # interrupted after iteration 2 (the probe had decided): the resumed run keeps 7 iterations and the
    # drop at 5 without probing again (its clock is read once, at the start)
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write(os.path.join(out, "model_0000002.pth"))
    trainer = _trainer(_cfg(resumed, 12, "SOLVER.TRAIN_TIME_BUDGET", "61"), [0.0], resume=True)
    assert (trainer.start_iter, trainer.max_iter) == (3, 7)
    trainer.train()
    lrs = _lrs(trainer)
    assert sorted(lrs) == [3, 4, 5, 6]
    assert lrs[4] == pytest.approx(base_lr) and lrs[5] == pytest.approx(base_lr * 0.1)
    assert torch.load(os.path.join(resumed, "model_final.pth"), weights_only=False)["iteration"] == 6


def test_a_schedule_that_fits_is_unchanged(tmp_path):
    trainer = _trainer(_cfg(str(tmp_path), 4, "SOLVER.TRAIN_TIME_BUDGET", "1000", "DATASETS.TEST", "()"),
                       [0.0, 1.0, 21.0])
    trainer.train()
    assert trainer.iter == trainer.max_iter == 4
    assert not any(isinstance(h, TrainTimeBudget) for h in Trainer(_cfg(str(tmp_path / "off"), 4))._hooks)


def test_a_negative_budget_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"SOLVER.TRAIN_TIME_BUDGET=-5 must be >= 0"):
        Trainer(_cfg(str(tmp_path), 4, "SOLVER.TRAIN_TIME_BUDGET", "-5"))


def test_cpu_autocast_needs_bfloat16_kernels(monkeypatch, caplog):
    cfg = _cfg("unused", 4, "SOLVER.AMP.ENABLED", "True")
    monkeypatch.setattr(trainer_module, "cpu_has_bfloat16_kernels", lambda: True)
    assert Trainer.step_runner_type(cfg, on_cpu=True) is CPUAMPTrainer
    assert Trainer.step_runner_type(cfg, on_cpu=False) is AMPTrainer
    monkeypatch.setattr(trainer_module, "cpu_has_bfloat16_kernels", lambda: False)
    trainer_module.logger.addHandler(caplog.handler)  # Detectron2's logger setup stops propagation
    try:
        assert Trainer.step_runner_type(cfg, on_cpu=True) is SimpleTrainer
    finally:
        trainer_module.logger.removeHandler(caplog.handler)
    assert "no bfloat16 kernels" in caplog.text and "training in float32" in caplog.text
    cfg.defrost()
    cfg.SOLVER.AMP.ENABLED = False
    assert Trainer.step_runner_type(cfg, on_cpu=True) is SimpleTrainer

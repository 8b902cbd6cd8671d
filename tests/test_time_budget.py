"""SOLVER.TRAIN_TIME_BUDGET (TrainTimeBudget): the schedule shrinks to fit the budget, learning-rate
drop and final checkpoint included, --resume continues it and several processes stop together;
bfloat16 autocast only where the CPU has bfloat16 instructions."""
import os
import sys
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import AMPTrainer, SimpleTrainer, default_argument_parser, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from sparse_detr import add_sparse_detr_config  # noqa: E402
from sparse_detr.engine import CPUAMPTrainer, Trainer, TrainTimeBudget  # noqa: E402
from sparse_detr.engine import time_budget  # noqa: E402
from sparse_detr.engine import trainer as trainer_module  # noqa: E402
from sparse_detr.engine.time_budget import shortened_schedule  # noqa: E402
from synthetic import register_synthetic, tiny_opts, write_synthetic_coco  # noqa: E402

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


def _trainer(cfg, seconds_at, resume=False):
    """A Trainer whose budget hook times from iteration 1, re-estimates every 2 iterations, and reads
    `seconds_at(i)` as its clock after iteration i (and at the start, i = the first iteration)."""
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    budget = next(h for h in trainer._hooks if isinstance(h, TrainTimeBudget))
    budget.warmup_iters, budget.probe_iters = 1, 2
    budget._clock = lambda: seconds_at(trainer.storage.iter)
    return trainer, budget


def _lrs(trainer):
    return {it: lr for lr, it in trainer.storage.history("lr").values()}


def test_steps_keep_their_fraction_of_the_schedule():
    assert shortened_schedule(1500, (1280,), 750) == (640,)
    assert shortened_schedule(12, (9, 11), 7) == (5, 6)
    assert shortened_schedule(100, (1,), 10) == (1,)


def test_a_slow_machine_gets_a_shorter_schedule_that_resume_continues(tmp_path):
    out = str(tmp_path / "run")
    # 10 s an iteration, budget 61 s: after iteration 2 (20 s) 4 more fit, so 7 instead of 12 and the
    # lr drop at 5 instead of 9; the drop is then too near for another estimate
    trainer, budget = _trainer(_cfg(out, 12, "SOLVER.TRAIN_TIME_BUDGET", "61"), lambda i: 10.0 * i)
    trainer.train()
    assert trainer.iter == trainer.max_iter == 7 and budget.final
    base_lr = trainer.cfg.SOLVER.BASE_LR
    lrs = _lrs(trainer)
    assert sorted(lrs) == list(range(7))
    assert all(lrs[i] == pytest.approx(base_lr) for i in range(5))
    assert all(lrs[i] == pytest.approx(base_lr * 0.1) for i in (5, 6))
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert final["iteration"] == 6
    assert final["trainer"]["hooks"]["TrainTimeBudget"] == {"max_iter": 7, "steps": (5,)}

    # interrupted after iteration 2 (the schedule was chosen there): the resumed run keeps 7 iterations
    # and the drop at 5 without measuring again
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write(os.path.join(out, "model_0000002.pth"))
    trainer, budget = _trainer(_cfg(resumed, 12, "SOLVER.TRAIN_TIME_BUDGET", "61"), lambda i: 1e6 * i,
                               resume=True)
    assert (trainer.start_iter, trainer.max_iter, budget.final) == (3, 7, True)
    trainer.train()
    lrs = _lrs(trainer)
    assert sorted(lrs) == [3, 4, 5, 6]
    assert lrs[4] == pytest.approx(base_lr) and lrs[5] == pytest.approx(base_lr * 0.1)
    assert torch.load(os.path.join(resumed, "model_final.pth"), weights_only=False)["iteration"] == 6


def test_later_estimates_correct_a_slow_start(tmp_path):
    """Iterations 1 and 2 take 10 s, the later ones 2 s: the first estimate gives 7 of 20 iterations,
    the later ones give more while the lr drop is ahead; training still ends within the 60 s."""
    seconds_at = lambda i: 10.0 * i if i <= 2 else 20.0 + 2.0 * (i - 2)  # noqa: E731
    cfg = _cfg(str(tmp_path), 20, "SOLVER.TRAIN_TIME_BUDGET", "60", "SOLVER.STEPS", "(16,)", "DATASETS.TEST", "()")
    trainer, budget = _trainer(cfg, seconds_at)
    chosen = []
    apply = budget._apply
    budget._apply = lambda max_iter, steps: (chosen.append(max_iter), apply(max_iter, steps))
    trainer.train()
    assert chosen[0] == 7 and chosen == sorted(chosen) and len(chosen) > 2
    assert trainer.iter == trainer.max_iter == chosen[-1] < 20
    assert seconds_at(trainer.max_iter - 1) <= 60
    assert budget.steps == shortened_schedule(20, (16,), trainer.max_iter)
    lrs, base_lr = _lrs(trainer), trainer.cfg.SOLVER.BASE_LR
    assert [i for i in sorted(lrs) if lrs[i] < base_lr / 2] == list(range(budget.steps[0], trainer.max_iter))


def test_a_schedule_that_fits_is_unchanged(tmp_path):
    trainer, budget = _trainer(_cfg(str(tmp_path), 4, "SOLVER.TRAIN_TIME_BUDGET", "1000", "DATASETS.TEST", "()"),
                               lambda i: 10.0 * i)
    trainer.train()
    assert trainer.iter == trainer.max_iter == 4 and budget.max_iter == 4
    assert not any(isinstance(h, TrainTimeBudget) for h in Trainer(_cfg(str(tmp_path / "off"), 4))._hooks)


def test_with_several_processes_the_main_one_decides(tmp_path, monkeypatch):
    """Each rank measures its own pace; they must agree on where to stop, so rank 0's estimate (here
    8 iterations, against this rank's 7) is the one used."""
    trainer, budget = _trainer(_cfg(str(tmp_path), 12, "SOLVER.TRAIN_TIME_BUDGET", "61", "DATASETS.TEST", "()"),
                               lambda i: 10.0 * i)
    gathered = []
    two_ranks = SimpleNamespace(get_world_size=lambda: 2,
                                all_gather=lambda value: gathered.append(value) or [8, value])
    monkeypatch.setattr(time_budget, "comm", two_ranks)  # the hook's view only: the rest stays one process
    trainer.train()
    assert gathered and set(gathered) == {7}  # asked at every estimate
    assert trainer.iter == trainer.max_iter == 8 and budget.steps == shortened_schedule(12, (9,), 8)


def _train_two_ranks(data_dir: str, output_dir: str, result_path: str):
    """One rank of a 2-process run in which rank 0 measures 10 s an iteration and rank 1 5 s."""
    register_synthetic("budget_pair", data_dir)
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file(BASE)
    cfg.merge_from_list(tiny_opts("budget_pair", "budget_pair", output_dir, 12, [
        "SOLVER.STEPS", "(9,)", "SOLVER.TRAIN_TIME_BUDGET", "61", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "DATASETS.TEST", "()"]))
    seconds_per_iter = 10.0 if comm.get_rank() == 0 else 5.0
    trainer, _ = _trainer(cfg, lambda i: seconds_per_iter * i)
    trainer.train()
    torch.save({"iter": trainer.iter, "max_iter": trainer.max_iter}, f"{result_path}.rank{comm.get_rank()}")


def test_two_processes_stop_together(tmp_path):
    """Over gloo, with different clocks: rank 0 alone would stop at 7 of 12, rank 1 would not shorten;
    both stop at 7 (a rank that stopped early would leave the other waiting in DDP forever)."""
    write_synthetic_coco(str(tmp_path / "data"), num_images=2)
    launch(_train_two_ranks, 2, dist_url="auto", timeout=timedelta(seconds=60),  # a stuck rank fails, not hangs
           args=(str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "result")))
    for rank in (0, 1):
        assert torch.load(tmp_path / f"result.rank{rank}") == {"iter": 7, "max_iter": 7}


def test_a_negative_budget_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"SOLVER.TRAIN_TIME_BUDGET=-5 must be >= 0"):
        Trainer(_cfg(str(tmp_path), 4, "SOLVER.TRAIN_TIME_BUDGET", "-5"))


def test_cpu_autocast_needs_bfloat16_instructions(tmp_path, monkeypatch, caplog):
    cfg = _cfg(str(tmp_path), 4, "SOLVER.AMP.ENABLED", "True")
    monkeypatch.setattr(trainer_module, "cpu_has_native_bfloat16", lambda: True)
    assert Trainer.step_runner_type(cfg, on_cpu=True) is CPUAMPTrainer
    assert Trainer.step_runner_type(cfg, on_cpu=False) is AMPTrainer
    monkeypatch.setattr(trainer_module, "cpu_has_native_bfloat16", lambda: False)
    trainer_module.logger.addHandler(caplog.handler)  # Detectron2's logger setup stops propagation
    try:
        assert Trainer.step_runner_type(cfg, on_cpu=True) is SimpleTrainer
    finally:
        trainer_module.logger.removeHandler(caplog.handler)
    assert "no bfloat16 instructions" in caplog.text and "training in float32" in caplog.text
    cfg.defrost()
    cfg.SOLVER.AMP.ENABLED = False
    assert Trainer.step_runner_type(cfg, on_cpu=True) is SimpleTrainer


@pytest.mark.parametrize("mkldnn_bf16, avx512_bf16, amx, expected", [
    (True, True, False, True),    # AVX512-BF16 (AMD Zen 4)
    (True, False, True, True),    # AMX (Intel Sapphire Rapids and later)
    (True, False, False, False),  # AVX512 without BF16: oneDNN converts to float32, slower than float32
    (False, False, False, False),  # AVX2 only: reference code
])
def test_native_bfloat16_needs_the_instructions_not_only_onednn_kernels(monkeypatch, mkldnn_bf16, avx512_bf16,
                                                                        amx, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert trainer_module.cpu_has_native_bfloat16() is expected

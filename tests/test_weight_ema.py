"""SOLVER.EMA: the moving average of the weights (WeightEMA), its arithmetic, final model and resume."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from detectron2.engine import default_argument_parser  # noqa: E402

from sparse_detr.engine import Trainer, WeightEMA  # noqa: E402
from synthetic import register_synthetic, tiny_opts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "Base-SparseDETR.yaml")


def test_average_follows_the_decay_schedule_and_replaces_the_weights_after_the_last_step():
    model = nn.BatchNorm1d(2)  # weight, bias (trainable); running_mean, running_var (float buffers)
    model.bias.requires_grad_(False)  # frozen: not tracked
    trainer = SimpleNamespace(model=model, iter=0, max_iter=3)
    ema = WeightEMA(decay=0.5)
    ema.trainer = trainer
    ema.before_train()
    assert set(ema.average) == {"weight", "running_mean", "running_var"}
    expected = model.weight.detach().clone()
    for step, value in enumerate([2.0, 4.0, 8.0]):
        trainer.iter = step
        with torch.no_grad():
            model.weight.fill_(value)
        decay = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.18..., then 0.5
        expected = decay * expected + (1 - decay) * value
        ema.after_step()
        torch.testing.assert_close(ema.average["weight"], expected)
    assert ema.updates == 3
    torch.testing.assert_close(model.weight.detach(), expected)  # the last step put the average in
    assert not torch.equal(expected, torch.full((2,), 8.0))


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match=rf"SOLVER.EMA.DECAY={decay} must be in \(0, 1\)"):
        WeightEMA(decay)


def _args(data, output_dir, *flags):
    opts = tiny_opts("ema_train", "ema_val", output_dir, 4,
                     ["SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.6"])
    return default_argument_parser().parse_args(["--config-file", BASE, *flags, *opts])


def _checkpoint(path):
    return torch.load(path, weights_only=False)


def test_final_checkpoint_holds_the_average_and_resume_continues_it(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR"))
    import train_net

    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    register_synthetic("ema_train", data)
    register_synthetic("ema_val", data)
    train_net.main(_args(data, out))
    names = [type(h).__name__ for h in Trainer(train_net.setup(_args(data, str(tmp_path / "x"))))._hooks]
    assert names.index("WeightEMA") < names.index("PeriodicCheckpointer") < names.index("EvalHook")

    middle, final = _checkpoint(f"{out}/model_0000001.pth"), _checkpoint(f"{out}/model_final.pth")
    assert middle["trainer"]["hooks"]["WeightEMA"]["updates"] == 2 and final["trainer"]["hooks"]["WeightEMA"]["updates"] == 4
    average = final["trainer"]["hooks"]["WeightEMA"]["average"]
    assert "transformer.encoder.layers.0.linear1.weight" in average
    for name, tensor in average.items():  # the final model is the average
        assert torch.equal(final["model"][name], tensor), name
    middle_average = middle["trainer"]["hooks"]["WeightEMA"]["average"]  # mid-run checkpoints hold the raw weights
    assert any(not torch.equal(middle["model"][n], t) for n, t in middle_average.items())

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write(f"{out}/model_0000001.pth")
    train_net.main(_args(data, resumed, "--resume"))
    assert _checkpoint(f"{resumed}/model_final.pth")["trainer"]["hooks"]["WeightEMA"]["updates"] == 4


def test_every_rank_gets_the_hook(tmp_path, monkeypatch):
    """Non-main ranks have no PeriodicCheckpointer; the hook still goes in, after the LR scheduler."""
    sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR"))
    import train_net
    from detectron2.utils import comm

    register_synthetic("ema_train", str(tmp_path / "data"))
    register_synthetic("ema_val", str(tmp_path / "data"))
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    names = [type(h).__name__ for h in Trainer(train_net.setup(_args(None, str(tmp_path / "x"))))._hooks]
    assert "PeriodicCheckpointer" not in names
    assert names.index("WeightEMA") == names.index("LRScheduler") + 1

"""`WeightEMA`: an exponential moving average of the model's weights during training (SOLVER.EMA.*)."""
from typing import Dict

import torch
from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel

__all__ = ["WeightEMA"]


class WeightEMA(HookBase):
    """Averages the trainable parameters and the floating-point buffers after every step, with decay
    min(decay, (1 + t) / (10 + t)) at the t-th update (the average forgets its random start quickly),
    and puts the average into the model after the last step: the final checkpoint (model_final.pth)
    and the evaluations after training use it. Evaluations during training (TEST.EVAL_PERIOD) see the
    raw weights. The average is part of the trainer's state, so every checkpoint carries it and
    `--resume` continues it. The average is kept in float32 whatever the training precision.

    Detectron2 has no weight averaging of its own; this hook follows its HookBase protocol (it must run
    before PeriodicCheckpointer, see `Trainer.build_hooks`)."""

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY={decay} must be in (0, 1), e.g. 0.9998 for long schedules")
        self.decay = decay
        self.updates = 0
        self.average: Dict[str, torch.Tensor] = {}

    def _tracked(self) -> Dict[str, torch.Tensor]:
        """The model's tensors that change during training and are saved with it: trainable parameters
        and persistent floating-point buffers, name -> tensor (sharing the model's storage)."""
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        saved = model.state_dict(keep_vars=True)
        tracked = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
        tracked.update((name, b) for name, b in model.named_buffers() if b.is_floating_point() and name in saved)
        return tracked

    def before_train(self):
        self._model_tensors = self._tracked()  # in-place optimizer updates keep these tensors current
        if self.average:  # restored by `load_state_dict` (--resume), on the CPU
            self.average = {name: t.to(self._model_tensors[name].device) for name, t in self.average.items()}
        else:
            self.average = {name: t.detach().float().clone() for name, t in self._model_tensors.items()}

    def after_step(self):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        names = list(self.average)
        with torch.no_grad():
            torch._foreach_lerp_([self.average[n] for n in names],
                                 [self._model_tensors[n].float() for n in names], 1.0 - decay)
            if self.trainer.iter == self.trainer.max_iter - 1:
                for name in names:
                    self._model_tensors[name].copy_(self.average[name])

    def state_dict(self):
        return {"updates": self.updates, "average": self.average}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        self.average = {name: t.float() for name, t in state["average"].items()}

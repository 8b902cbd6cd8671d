"""`TrainTimeBudget` (SOLVER.TRAIN_TIME_BUDGET): shortens the schedule once so that training ends within
a wall-clock budget on a machine slower than the one the schedule was made for."""
import logging
import time
from typing import Callable, Tuple

from detectron2.engine import HookBase, hooks
from detectron2.utils.events import CommonMetricPrinter

__all__ = ["TrainTimeBudget", "shortened_schedule"]

logger = logging.getLogger(__name__)


def shortened_schedule(max_iter: int, steps: Tuple[int, ...], new_max_iter: int) -> Tuple[int, ...]:
    """SOLVER.STEPS scaled by new_max_iter / max_iter (each at least 1): the learning-rate drops stay at
    the same fractions of the schedule."""
    return tuple(max(1, round(step * new_max_iter / max_iter)) for step in steps)


class TrainTimeBudget(HookBase):
    """Times iterations `warmup_iters` .. `warmup_iters + probe_iters` of a run; if the remaining
    iterations at that pace would end training more than `budget_s` seconds after it started, MAX_ITER
    and STEPS are scaled down by the same factor, once, so that it ends within the budget. A schedule
    that fits is left alone, so a fast machine trains exactly as configured.

    With no warm-up and no learning-rate step before the probe ends (the shipped configs), the shortened
    schedule gives every iteration the learning rate it would have had if chosen from the start. The new
    schedule is saved in the trainer state: `--resume` continues it without probing again.

    Place it after the LR scheduler hook (it replaces `trainer.scheduler`, keeping its position) and
    before the checkpointer (whose final save follows the new MAX_ITER).
    """

    def __init__(self, budget_s: float, warmup_iters: int = 5, probe_iters: int = 20,
                 clock: Callable[[], float] = time.perf_counter):
        if budget_s <= 0:
            raise ValueError(f"SOLVER.TRAIN_TIME_BUDGET={budget_s} must be > 0 seconds to be used (0: off)")
        self.budget_s = budget_s
        self.warmup_iters, self.probe_iters = warmup_iters, probe_iters
        self._clock = clock
        self.decided = False  # the schedule is final: probed (shortened or not) or restored on resume
        self.max_iter = self.steps = None  # the shortened schedule, if any

    def before_train(self):
        self._start = self._clock()
        self._probe_start = None

    def after_step(self):
        if self.decided:
            return
        done = self.trainer.iter + 1 - self.trainer.start_iter
        if done == self.warmup_iters:
            self._probe_start = self._clock()
        elif done == self.warmup_iters + self.probe_iters and self._probe_start is not None:
            now = self._clock()
            seconds_per_iter = (now - self._probe_start) / self.probe_iters
            left = max(0, int((self.budget_s - (now - self._start)) / seconds_per_iter))
            new_max_iter = self.trainer.iter + 1 + left
            self.decided = True
            if new_max_iter < self.trainer.max_iter:
                cfg = self.trainer.cfg.SOLVER
                logger.warning(
                    f"SOLVER.TRAIN_TIME_BUDGET={self.budget_s:g} s: at {seconds_per_iter:.2f} s/iteration, "
                    f"{cfg.MAX_ITER} iterations would take {cfg.MAX_ITER * seconds_per_iter / 60:.1f} min; "
                    f"shortening the schedule to {new_max_iter} iterations")
                self._apply(new_max_iter, shortened_schedule(cfg.MAX_ITER, tuple(cfg.STEPS), new_max_iter))
            else:
                logger.info(f"SOLVER.TRAIN_TIME_BUDGET={self.budget_s:g} s: at {seconds_per_iter:.2f} "
                            f"s/iteration the schedule of {self.trainer.max_iter} iterations fits")

    def _apply(self, max_iter: int, steps: Tuple[int, ...]):
        """Make `max_iter`/`steps` the schedule of the running trainer: its loop bound, a learning-rate
        scheduler built for it at the current iteration, and the hooks that cached MAX_ITER."""
        trainer = self.trainer
        self.max_iter, self.steps = max_iter, steps
        cfg = trainer.cfg.clone()
        cfg.defrost()
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = max_iter, steps
        lrs = [group["lr"] for group in trainer.optimizer.param_groups]
        scheduler = trainer.build_lr_scheduler(cfg, trainer.optimizer)  # its construction steps once
        scheduler.load_state_dict(trainer.scheduler.state_dict())  # base lrs and the iteration reached
        for group, lr in zip(trainer.optimizer.param_groups, lrs):
            group["lr"] = lr  # the current iteration keeps its rate; the scheduler's next step sets the next
        trainer.scheduler = scheduler
        trainer.max_iter = max_iter
        for hook in trainer._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.max_iter = max_iter  # it saves model_final at max_iter - 1
            if isinstance(hook, hooks.PeriodicWriter):
                for writer in hook._writers:
                    if isinstance(writer, CommonMetricPrinter):
                        writer._max_iter = max_iter  # its ETA

    def state_dict(self):
        return {"decided": self.decided, "max_iter": self.max_iter, "steps": self.steps}

    def load_state_dict(self, state_dict):
        self.decided = state_dict["decided"]
        if state_dict["max_iter"] is not None:
            logger.info(f"Resuming the schedule shortened to {state_dict['max_iter']} iterations "
                        f"by SOLVER.TRAIN_TIME_BUDGET")
            self._apply(state_dict["max_iter"], tuple(state_dict["steps"]))

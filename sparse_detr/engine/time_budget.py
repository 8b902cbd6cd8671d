"""`TrainTimeBudget` (SOLVER.TRAIN_TIME_BUDGET): shortens the schedule so that training ends within a
wall-clock budget on a machine slower than the one the schedule was made for."""
import logging
import time
from typing import Callable, Tuple

from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter

__all__ = ["TrainTimeBudget", "shortened_schedule"]

logger = logging.getLogger(__name__)


def shortened_schedule(max_iter: int, steps: Tuple[int, ...], new_max_iter: int) -> Tuple[int, ...]:
    """SOLVER.STEPS scaled by new_max_iter / max_iter (each at least 1): the learning-rate drops stay at
    the same fractions of the schedule."""
    return tuple(max(1, round(step * new_max_iter / max_iter)) for step in steps)


class TrainTimeBudget(HookBase):
    """Fits the schedule to a wall-clock budget of `budget_s` seconds from the start of training.

    The pace is measured from iteration `warmup_iters` on (the first iterations are the slowest).
    Every `probe_iters` iterations after that, while the first learning-rate drop is still ahead, the
    schedule becomes the configured MAX_ITER and STEPS scaled down together to what fits the budget at
    the pace measured so far (never above the configured ones): a first estimate that was too
    pessimistic is corrected by the later, longer measurements. A schedule that fits is unchanged, so a
    fast machine trains exactly as configured.

    With no warm-up and no learning-rate drop before the schedule is final (the shipped configs), every
    iteration gets the learning rate it would have had if the final schedule had been chosen from the
    start. The schedule is saved in the trainer state: `--resume` continues it without measuring again.

    With several processes, the main process's estimate decides for all (they must stop together).

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
        self.final = False  # no more changes: the first lr drop is near, or a checkpoint gave the schedule
        self.max_iter = self.steps = None  # the schedule chosen last, if any

    def before_train(self):
        self._start = self._clock()
        self._pace_start = None

    def after_step(self):
        if self.final:
            return
        done = self.trainer.iter + 1 - self.trainer.start_iter
        if done == self.warmup_iters:
            self._pace_start = self._clock()
        timed = done - self.warmup_iters
        if self._pace_start is None or timed <= 0 or timed % self.probe_iters:
            return
        now = self._clock()
        seconds_per_iter = (now - self._pace_start) / timed
        next_iter = self.trainer.iter + 1
        cfg = self.trainer.cfg.SOLVER
        left = max(0, int((self.budget_s - (now - self._start)) / seconds_per_iter))
        max_iter = min(cfg.MAX_ITER, next_iter + left)
        if comm.get_world_size() > 1:  # every rank must stop at the same iteration: the main one decides
            max_iter = comm.all_gather(max_iter)[0]
        steps = shortened_schedule(cfg.MAX_ITER, tuple(cfg.STEPS), max_iter)
        steps = tuple(max(next_iter, step) for step in steps)  # a drop the new pace puts in the past: now
        self.final = not any(next_iter + self.probe_iters < step < max_iter for step in steps)
        configured = (cfg.MAX_ITER, tuple(cfg.STEPS))
        current = configured if self.max_iter is None else (self.max_iter, self.steps)
        if self.max_iter is None and (max_iter, steps) == configured:
            logger.info(f"SOLVER.TRAIN_TIME_BUDGET={self.budget_s:g} s: at {seconds_per_iter:.2f} "
                        f"s/iteration the schedule of {max_iter} iterations fits")
        elif (max_iter, steps) != current:
            log = logger.warning if current == configured else logger.info  # later changes only adjust
            log(f"SOLVER.TRAIN_TIME_BUDGET={self.budget_s:g} s: at {seconds_per_iter:.2f} s/iteration "
                f"{cfg.MAX_ITER} iterations would take {cfg.MAX_ITER * seconds_per_iter / 60:.1f} min; "
                f"training for {max_iter} iterations, lr drops at {list(steps)}")
            self._apply(max_iter, steps)
        self.max_iter, self.steps = max_iter, steps  # saved even if unchanged: a resumed run keeps them

    def _apply(self, max_iter: int, steps: Tuple[int, ...]):
        """Make `max_iter`/`steps` the schedule of the running trainer: its loop bound, a learning-rate
        scheduler built for it at the current iteration, and the hooks that cached MAX_ITER."""
        trainer = self.trainer
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
        return {"max_iter": self.max_iter, "steps": self.steps}

    def load_state_dict(self, state_dict):
        if state_dict["max_iter"] is not None:
            logger.info(f"Resuming the schedule of {state_dict['max_iter']} iterations (lr drops at "
                        f"{list(state_dict['steps'])}) chosen by SOLVER.TRAIN_TIME_BUDGET")
            self.max_iter, self.steps = state_dict["max_iter"], tuple(state_dict["steps"])
            self._apply(self.max_iter, self.steps)
            self.final = True

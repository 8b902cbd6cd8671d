"""`Trainer`: Detectron2's DefaultTrainer with Sparse DETR's data mapper, optimizer and evaluator."""
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, verify_results
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger

from ..checkpoint import SparseDETRCheckpointer
from ..data import build_dataset_mapper
from ..evaluation import DAMCorrelationEvaluator
from ..modeling.test_time_augmentation import SparseDETRWithTTA
from .adapt_batchnorm import adapt_frozen_batchnorm
from .optimizer import build_sparse_detr_optimizer
from .time_budget import TrainTimeBudget
from .weight_ema import WeightEMA

__all__ = ["Trainer", "CPUAMPTrainer", "cpu_has_native_bfloat16"]

logger = logging.getLogger(__name__)


def cpu_has_native_bfloat16() -> bool:
    """Whether bfloat16 autocast is fast on this CPU: oneDNN has bfloat16 kernels for it and the CPU has
    bfloat16 instructions for them (AVX512-BF16 or AMX). Without AVX512 the kernels are reference code
    (a main-job step over 8x slower than float32 on a 2-core AMD EPYC, Zen 3); with AVX512 but without
    its BF16 extension they convert every operand to float32 (2.6x slower than float32 on a 2-core Intel
    Xeon, family 6 model 207, whose hypervisor hides AVX512-BF16 and AMX)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class CPUAMPTrainer(SimpleTrainer):
    """SimpleTrainer whose steps run under CPU autocast to bfloat16 (SOLVER.AMP.ENABLED with a CPU model;
    Detectron2's AMPTrainer is CUDA-only). bfloat16 has float32's range, so no gradient scaler is
    needed. The whole step is inside autocast: backward ops run in the dtypes their forward ops
    chose whatever the autocast state, and the optimizer's and the clipping's ops have no autocast
    rule; the model computes its matching and losses in float32 (`SparseDETR.forward`)."""

    def run_step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


class Trainer(DefaultTrainer):
    """DefaultTrainer for Sparse DETR.

    * train/test loaders use the mapper named by INPUT.DATASET_MAPPER ("detr": official augmentation);
    * the optimizer is `build_sparse_detr_optimizer` (AdamW groups, full-model gradient clipping);
    * the evaluator is chosen by the test dataset's `evaluator_type` ("coco": COCOEvaluator), plus
      DAMCorrelationEvaluator with MODEL.SPARSE_DETR.TEST_DAM_CORRELATION;
    * checkpoints load through `SparseDETRCheckpointer` (clear errors for truncated, official-format
      or other models' checkpoints; strict when resuming);
    * several processes also work on CPU (gloo): DistributedDataParallel gets no `device_ids`
      for a CPU model, where stock DefaultTrainer passes the local rank and DDP refuses it;
    * SOLVER.AMP.ENABLED: Detectron2's AMPTrainer (float16) on CUDA, `CPUAMPTrainer` (bfloat16) on a CPU
      with bfloat16 instructions (float32, with a warning, on one without: bfloat16 would be much slower);
    * SOLVER.TRAIN_TIME_BUDGET > 0: the schedule is shortened to end within that many seconds when the
      machine is too slow for it (`TrainTimeBudget`);
    * SOLVER.EMA.ENABLED: an exponential moving average of the weights (`WeightEMA`) becomes the final
      model;
    * MODEL.BACKBONE.ADAPT_BN_IMAGES > 0: before a fresh start (not when resuming), the backbone's
      frozen batch-norm statistics are re-estimated on that many training images
      (`adapt_frozen_batchnorm`);
    * TEST.AUG.ENABLED: after training, also `test_with_TTA` (results "bbox_TTA/*", written to the
      metrics like the plain evaluation's), as Detectron2's tools/train_net.py does for R-CNN.
    """

    def __init__(self, cfg):
        # Same construction order as DefaultTrainer.__init__, which cannot be reused because it
        # calls create_ddp_model(model) with the local rank as device id, invalid for CPU models.
        super(DefaultTrainer, self).__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        model = create_ddp_model(
            model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {})
        )
        self._trainer = self.step_runner_type(cfg, on_cpu)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SparseDETRCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @staticmethod
    def step_runner_type(cfg, on_cpu: bool) -> type:
        """The SimpleTrainer class that runs the steps: AMP is float16 + GradScaler on CUDA, bfloat16 on
        a CPU with bfloat16 instructions; plain float32 otherwise."""
        if not cfg.SOLVER.AMP.ENABLED:
            return SimpleTrainer
        if not on_cpu:
            return AMPTrainer
        if not cpu_has_native_bfloat16():
            logger.warning(
                f"SOLVER.AMP.ENABLED: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bfloat16 "
                "instructions (AVX512-BF16 or AMX), so bfloat16 autocast would be several times slower "
                "than float32: training in float32")
            return SimpleTrainer
        return CPUAMPTrainer

    def train(self):
        """DefaultTrainer.train, with Detectron2's training loop rewritten to check `self.max_iter` before
        every iteration (Detectron2's iterates over a range fixed at the start), so that
        `TrainTimeBudget` can shorten a running schedule. Returns what DefaultTrainer.train returns."""
        loop_logger = logging.getLogger("detectron2.engine.train_loop")
        loop_logger.info(f"Starting training from iteration {self.start_iter}")
        self.iter = self.start_iter
        with EventStorage(self.start_iter) as self.storage:
            try:
                self.before_train()
                while self.iter < self.max_iter:
                    self.before_step()
                    self.run_step()
                    self.after_step()
                    self.iter += 1  # == max_iter at the end: after_train hooks read it as "finished"
            except Exception:
                logger.exception("Exception during training:")
                raise
            finally:
                self.after_train()
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            assert hasattr(self, "_last_eval_results"), "No evaluation results obtained during training!"
            verify_results(self.cfg, self._last_eval_results)
            return self._last_eval_results

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume)
        num_images = self.cfg.MODEL.BACKBONE.ADAPT_BN_IMAGES
        if num_images < 0:
            raise ValueError(f"MODEL.BACKBONE.ADAPT_BN_IMAGES={num_images} must be >= 0 (0: off)")
        if num_images > 0 and self.start_iter == 0:
            model = self.model.module if hasattr(self.model, "module") else self.model  # unwrap DDP
            adapt_frozen_batchnorm(model, self.build_train_loader(self.cfg), num_images)

    def build_hooks(self):
        ret = super().build_hooks()
        # Right after the LR scheduler, which every rank has (the checkpointer only the main one), so
        # before the checkpointer and the evaluations: model_final.pth and they get the average, and the
        # checkpointer saves model_final at the shortened schedule's end.
        scheduler_at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler))
        if self.cfg.SOLVER.EMA.ENABLED:
            ret.insert(scheduler_at + 1, WeightEMA(self.cfg.SOLVER.EMA.DECAY))
        budget = self.cfg.SOLVER.TRAIN_TIME_BUDGET
        if budget < 0:
            raise ValueError(f"SOLVER.TRAIN_TIME_BUDGET={budget} must be >= 0 seconds (0: off)")
        if budget > 0:
            ret.insert(scheduler_at + 1, TrainTimeBudget(budget))
        if self.cfg.TEST.AUG.ENABLED:  # before the writer, so that it records the TTA results too
            writer_at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)), len(ret))
            ret.insert(writer_at, hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model)))
        return ret

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate `SparseDETRWithTTA(cfg, model)` on cfg.DATASETS.TEST (predictions under
        OUTPUT_DIR/inference_TTA); the result keys get the suffix "_TTA"."""
        tta = SparseDETRWithTTA(cfg, model)
        logging.getLogger(__name__).info(f"Running inference with test-time augmentation ({tta.num_views} views)")
        evaluators = [cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
                      for name in cfg.DATASETS.TEST]
        res = cls.test(cfg, tta, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_sparse_detr_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_dataset_mapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
        if evaluator_type != "coco":
            raise NotImplementedError(
                f"no evaluator for dataset {dataset_name!r} of evaluator_type {evaluator_type!r}"
            )
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator = COCOEvaluator(dataset_name, output_dir=output_folder)
        # the paper's DAM correlation (projects/SparseDETR/README.md, "The paper's analyses")
        if cfg.MODEL.SPARSE_DETR.TEST_DAM_CORRELATION:
            return DatasetEvaluators([evaluator, DAMCorrelationEvaluator()])
        return evaluator

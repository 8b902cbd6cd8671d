"""Re-estimate the backbone's frozen batch-norm statistics on the training images before training.

A pretrained ResNet's `FrozenBatchNorm2d` layers normalise with the mean and variance of the
pretraining images (here ImageNet, seen by a self-supervised model); on another domain, such as aerial
photographs, the features arrive with other statistics. Re-estimating them on the new domain with the
weights unchanged is AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain
Adaptation", 2016); the MoCo paper makes the related point that self-supervised features need
normalisation statistics of the detection data. The statistics are estimated once, in float32, by
fvcore's `update_bn_stats` (the true average of per-batch statistics) on a copy of the backbone whose
frozen norms are turned into `BatchNorm2d`, and copied back; the layers stay frozen during training.
"""
import copy
import itertools
import logging
from typing import Iterable, Iterator, List

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils import comm
from fvcore.nn.precise_bn import update_bn_stats
from torch import nn

__all__ = ["adapt_frozen_batchnorm"]

logger = logging.getLogger(__name__)


def _frozen_norms(module: nn.Module) -> List[FrozenBatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]


def adapt_frozen_batchnorm(meta_arch: nn.Module, batches: Iterable[List[dict]], num_images: int) -> int:
    """Replace the running mean and variance of every `FrozenBatchNorm2d` in `meta_arch.backbone` by
    their averages over `num_images` images from `batches` (lists of Detectron2 input dicts, e.g. the
    training loader). Each image goes through the backbone alone (no padding in the statistics), after
    `meta_arch.preprocess_image`. With several processes the statistics are averaged over them.
    Returns how many norms were updated (0 for a backbone without frozen batch norms, e.g. Swin)."""
    backbone = meta_arch.backbone
    frozen = _frozen_norms(backbone)
    if not frozen:
        logger.warning("MODEL.BACKBONE.ADAPT_BN_IMAGES: the backbone has no frozen batch norm; nothing to adapt")
        return 0
    estimator = FrozenBatchNorm2d.convert_frozenbatchnorm2d_to_batchnorm2d(copy.deepcopy(backbone)).float()
    estimated = [m for m in estimator.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(estimated) == len(frozen)

    def images() -> Iterator[torch.Tensor]:
        for batch in batches:
            for item in batch:
                yield meta_arch.preprocess_image([item]).tensor.float()

    estimator.train()  # batch statistics in the pass, as update_bn_stats expects
    with torch.no_grad(), torch.autocast(meta_arch.device.type, enabled=False):
        update_bn_stats(estimator, itertools.islice(images(), num_images), num_iters=num_images)
    with torch.no_grad():
        for target, source in zip(frozen, estimated):
            for name in ("running_mean", "running_var"):
                value = getattr(source, name).to(getattr(target, name))
                if comm.get_world_size() > 1:
                    torch.distributed.all_reduce(value)
                    value /= comm.get_world_size()
                getattr(target, name).copy_(value)
    logger.info(f"Re-estimated the statistics of {len(frozen)} frozen batch norms of the backbone on "
                f"{num_images} training images (MODEL.BACKBONE.ADAPT_BN_IMAGES)")
    return len(frozen)

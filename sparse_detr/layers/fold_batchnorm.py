"""Fold the frozen batch norms of a Detectron2 backbone into their convolutions, for inference.

A Detectron2 `Conv2d` whose `norm` is a `FrozenBatchNorm2d` computes conv(x) * scale + shift with
constant scale and shift; folding them into the convolution's weight and bias removes one pass over
every feature map (about 10 % of Sparse DETR's CPU inference at 800x1216: `native_batch_norm` in the
benchmark's profile). The outputs are the same up to float rounding.

The folded model is for inference only: the convolutions' weights change, so it must not be trained
or saved as a training checkpoint.
"""
from typing import Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["fold_frozen_batchnorm", "folded_conv_weights"]


def folded_conv_weights(conv: Conv2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the convolution `conv` followed by its `FrozenBatchNorm2d` norm (or by no norm),
    as one convolution: (out, in/groups, kh, kw), (out,); detached. The bias is zeros where `conv` has
    none and no norm."""
    with torch.no_grad():
        bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.weight.shape[0])
        if conv.norm is None:
            return conv.weight.detach(), bias.detach()
        bn = conv.norm
        weight, bias = fuse_conv_bn_weights(conv.weight, bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        return weight.detach(), bias.detach()


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every `FrozenBatchNorm2d` that directly follows a Detectron2 `Conv2d` (its `norm`) into that
    convolution, in place, and drop the norm. Returns how many were folded."""
    folded = 0
    for module in model.modules():
        if isinstance(module, Conv2d) and isinstance(module.norm, FrozenBatchNorm2d):
            weight, bias = folded_conv_weights(module)
            module.weight = nn.Parameter(weight, requires_grad=False)
            module.bias = nn.Parameter(bias, requires_grad=False)
            module.norm = None
            folded += 1
    return folded

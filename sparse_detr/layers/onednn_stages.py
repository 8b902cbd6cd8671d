"""Backbone stages that run on oneDNN tensors in CPU float32 wherever no gradient flows through them.

PyTorch runs a float32 CPU convolution with oneDNN, but on ordinary (NCHW or channels_last) tensors:
each call reorders its input, weight and output between that layout and oneDNN's blocked one, and a
`FrozenBatchNorm2d` pass follows every convolution of a Detectron2 ResNet. Where no gradient is
needed (the stages frozen by FREEZE_AT or MODEL.BACKBONE.DETACHED_STAGES in training, every stage in
inference) none of that has to be paid per call: the batch norm folds into the convolution, the folded
weight is reordered once, and the stage's activations stay oneDNN ("mkldnn") tensors from its input to
its output. On a 2-core AMD EPYC (Zen 3, AVX2) the main job's float32 training step (frozen stem, res2,
res3 and res5) takes 0.83-0.95x as long with it (four paired timings) and its test-time-augmented
evaluation about 0.8x (projects/SparseDETR/README.md, "Inference speed-ups"). TorchScript's
`optimize_for_inference` does the same and is as fast here, but needs a traced copy of every stage, and
TorchScript is deprecated.

`use_onednn_stages(backbone)` sets this up for every child stage made only of Detectron2's ResNet
blocks. Each stage keeps its module, parameters and state dict; a forward pre-hook moves the input to
oneDNN when the stage qualifies (CPU float32, no autocast, no tracing, and no gradient through it),
the stage's `OneDNNConv2d`s then take their oneDNN path, and a forward hook returns an ordinary tensor.
The outputs agree with the plain path to float rounding (1e-6 relative).
"""
from typing import List, Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from torch import nn

from .fold_batchnorm import folded_conv_weights

__all__ = ["OneDNNConv2d", "use_onednn_stages"]

# The modules whose forward works unchanged on oneDNN tensors (convolutions, relu_, +=, max_pool2d).
_SUPPORTED = (BasicStem, BottleneckBlock, BasicBlock, nn.Sequential, Conv2d, FrozenBatchNorm2d)


class OneDNNConv2d(Conv2d):
    """Detectron2 `Conv2d` (norm: `FrozenBatchNorm2d` or none; no activation) that, given a oneDNN
    tensor, convolves it with its weight folded with the norm and reordered for oneDNN, and returns a
    oneDNN tensor. Any other input takes `Conv2d.forward`. The folded weight is cached and rebuilt when
    the weight or the norm's tensors change (a checkpoint load, `.to()`, training steps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_mkldnn:
            return super().forward(x)
        weight, bias = self._folded()
        return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)

    def _tensors(self) -> List[torch.Tensor]:
        norm = [self.norm.weight, self.norm.bias, self.norm.running_mean, self.norm.running_var] if self.norm else []
        return [self.weight] + ([self.bias] if self.bias is not None else []) + norm

    def _folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # inference tensors (made under torch.inference_mode) have no version counter: their storage only
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in self._tensors())
        cached = self.__dict__.get("_onednn_weights")
        if cached is None or cached[0] != key:
            weight, bias = folded_conv_weights(self)
            weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups)
            cached = (key, weight, bias.contiguous())
            self.__dict__["_onednn_weights"] = cached  # not a buffer: out of the state dict
        return cached[1], cached[2]

    def __getstate__(self):  # oneDNN tensors cannot be copied or pickled; the cache is rebuilt on use
        state = self.__dict__.copy()
        state.pop("_onednn_weights", None)
        return state


def _convertible_conv(conv: Conv2d) -> bool:
    return (conv.activation is None and (conv.norm is None or isinstance(conv.norm, FrozenBatchNorm2d))
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


def _stage_qualifies(stage: nn.Module) -> bool:
    modules = list(stage.modules())
    convs = [m for m in modules if isinstance(m, Conv2d)]
    return (bool(convs) and all(isinstance(m, _SUPPORTED) for m in modules)
            and all(_convertible_conv(c) for c in convs))


def _to_onednn(stage: nn.Module, args):
    x = args[0]
    if (not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype != torch.float32 or x.is_mkldnn
            or torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.jit.is_scripting()):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in stage.parameters())):
        return None  # a gradient flows through the stage: the ordinary path
    if not _stage_qualifies(stage):
        return None  # changed since set up, e.g. frozen norms made BatchNorm2d again (adapt_frozen_batchnorm)
    return (x.contiguous().to_mkldnn(),) + tuple(args[1:])


def _to_dense(stage: nn.Module, args, output):
    return output.to_dense() if isinstance(output, torch.Tensor) and output.is_mkldnn else None


def use_onednn_stages(backbone: nn.Module) -> List[str]:
    """Make every child stage of `backbone` built only of Detectron2 ResNet blocks (stem, res2..res5)
    run on oneDNN tensors where it qualifies (module docstring), in place. Returns the stages' names;
    none where PyTorch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return []
    names = []
    for name, stage in backbone.named_children():
        if not _stage_qualifies(stage):
            continue
        names.append(name)
        if any(isinstance(m, OneDNNConv2d) for m in stage.modules()):
            continue  # set up already (a backbone passed to a second model)
        for module in stage.modules():
            if type(module) is Conv2d:
                module.__class__ = OneDNNConv2d  # same object, parameters and state-dict names
        stage.register_forward_pre_hook(_to_onednn)
        stage.register_forward_hook(_to_dense)
    return names

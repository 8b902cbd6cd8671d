"""torchvision ResNet parameter names -> Detectron2 ResNet parameter names.

torchvision: `conv1`, `bn1`, `layer{1..4}.{j}.conv{k}` / `.bn{k}` / `.downsample.{0,1}`, `fc`.
Detectron2:  `stem.conv1`, `stem.conv1.norm`, `res{2..5}.{j}.conv{k}` / `.conv{k}.norm` /
`.shortcut` / `.shortcut.norm`. Used for the official Sparse DETR backbone and for any
torchvision-layout ResNet checkpoint (e.g. imgsim's self-supervised ResNet-50).
"""
import re
from typing import Dict

import torch

__all__ = ["torchvision_to_detectron2_resnet_name", "convert_torchvision_resnet_state_dict"]

_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(.+)$")


def torchvision_to_detectron2_resnet_name(name: str) -> str:
    """Map one torchvision ResNet state-dict name (no prefix) to Detectron2's.

    "layer1.0.bn2.running_var" -> "res2.0.conv2.norm.running_var". Raises ValueError on a name
    that is not part of a torchvision ResNet trunk (e.g. "fc.weight").
    """
    stem = _STEM.match(name)
    if stem:
        module, leaf = stem.groups()
        return f"stem.conv1.{'norm.' if module == 'bn1' else ''}{leaf}"
    block = _BLOCK.match(name)
    if block is None:
        raise ValueError(f"{name!r} is not a torchvision ResNet trunk parameter "
                         f"(expected conv1/bn1/layer1..4 names)")
    stage, index, module, leaf = block.groups()
    target = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(module)
    if target is None:
        target = module if module.startswith("conv") else f"conv{module[2]}.norm"
    return f"res{int(stage) + 1}.{index}.{target}.{leaf}"


def convert_torchvision_resnet_state_dict(state_dict: Dict[str, torch.Tensor], strip_prefix: str = "",
                                          add_prefix: str = "", drop_fc: bool = True,
                                          drop_num_batches_tracked: bool = True) -> Dict[str, torch.Tensor]:
    """Rename a torchvision ResNet state dict for Detectron2's ResNet.

    Args:
        state_dict: torchvision names, each starting with `strip_prefix` (e.g. "module.pre.").
        add_prefix: prepended to every output name (e.g. "backbone.").
        drop_fc: drop the classifier `fc.*` (Detectron2's ResNet trunk has none).
        drop_num_batches_tracked: drop BatchNorm counters (Detectron2's FrozenBN has none).
    Returns:
        a new dict with the same tensors under Detectron2 names.
    """
    converted = {}
    for name, tensor in state_dict.items():
        if not name.startswith(strip_prefix):
            raise ValueError(f"{name!r} does not start with the prefix {strip_prefix!r}")
        local = name[len(strip_prefix):]
        if (drop_fc and local.startswith("fc.")) or (
                drop_num_batches_tracked and local.endswith(".num_batches_tracked")):
            continue
        converted[add_prefix + torchvision_to_detectron2_resnet_name(local)] = tensor
    return converted

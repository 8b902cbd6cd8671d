"""Backbone pieces for Sparse DETR: the Swin Transformer (Detectron2's `SwinTransformer`, official
settings) and `detach_stages` (MODEL.BACKBONE.DETACHED_STAGES) for any backbone."""
from typing import Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.swin import SwinTransformer
from torch import nn
from torchvision.ops import StochasticDepth

__all__ = ["SparseDETRSwin", "build_sparse_detr_swin_backbone", "detach_stages"]


class SparseDETRSwin(SwinTransformer):
    """Detectron2's Swin Transformer whose frozen stages stay in eval mode under `train()` (as the
    official Swin), with stochastic depth from torchvision (no timm dependency)."""

    def __init__(self, *, drop_path_rate: float = 0.2, **kwargs):
        super().__init__(drop_path_rate=0.0, **kwargs)
        blocks = [blk for layer in self.layers for blk in layer.blocks]
        for blk, rate in zip(blocks, torch.linspace(0, drop_path_rate, len(blocks)).tolist()):
            if rate > 0:
                blk.drop_path = StochasticDepth(rate, mode="row")
        self._freeze_stages()

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        return self


@BACKBONE_REGISTRY.register()
def build_sparse_detr_swin_backbone(cfg, input_shape):
    """Swin from `MODEL.SWIN.*`: outputs "p1", "p2", "p3" (strides 8/16/32 for Swin-T: 192/384/768
    channels), each with its own LayerNorm (`norm1..3`), as the official Sparse DETR Swin-T."""
    swin = cfg.MODEL.SWIN
    out_indices = tuple(int(name.lstrip("p")) for name in swin.OUT_FEATURES)
    return SparseDETRSwin(
        in_chans=input_shape.channels, embed_dim=swin.EMBED_DIM, depths=tuple(swin.DEPTHS),
        num_heads=tuple(swin.NUM_HEADS), window_size=swin.WINDOW_SIZE, drop_path_rate=swin.DROP_PATH_RATE,
        out_indices=out_indices, frozen_stages=swin.FROZEN_STAGES)


def _detach_input(stage: nn.Module, args):
    return (args[0].detach(),) + tuple(args[1:])


def detach_stages(backbone: nn.Module, names: Sequence[str]) -> None:
    """Freeze the named stages of `backbone` (its children, e.g. a ResNet's "res5") or blocks of a stage
    (dotted paths, e.g. "res4.0") and detach their input, so that no backward pass runs through them: a
    cheaper step than FREEZE_AT alone can give when the frozen stage is the last one, or when the first
    blocks of the first trained stage are frozen. The stages before them train through their own
    outputs only. On the main job's AVX2 CPU, ["res5"] made float32 steps 18 % faster; the DeepForest
    configs use it (docs/workflows.md, eleventh and twelfth sessions)."""
    def module_with_parameters(name):
        try:
            module = backbone.get_submodule(name)
        except AttributeError:
            return None
        return module if next(module.parameters(), None) is not None else None

    unknown = [name for name in names if module_with_parameters(name) is None]
    if unknown:
        stages = [name for name, _ in backbone.named_children() if module_with_parameters(name) is not None]
        raise ValueError(f"MODEL.BACKBONE.DETACHED_STAGES: {unknown} are not stages of the backbone nor "
                         f"blocks of one (e.g. '{stages[-1]}.0'); its stages: {stages}")
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        # batch norms too, as FREEZE_AT
        stage = FrozenBatchNorm2d.convert_frozen_batchnorm(backbone.get_submodule(name))
        for p in stage.parameters():
            p.requires_grad_(False)
        stage.register_forward_pre_hook(_detach_input)
        setattr(parent, child_name, stage)

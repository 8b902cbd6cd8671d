"""Swin Transformer backbone for Sparse DETR (Detectron2's `SwinTransformer`, official settings)."""
import torch
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.swin import SwinTransformer
from torchvision.ops import StochasticDepth

__all__ = ["SparseDETRSwin", "build_sparse_detr_swin_backbone"]


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

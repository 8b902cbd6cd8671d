"""Deformable DETR decoder with optional iterative box refinement."""
import copy
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..layers.ms_deform_attn_module import MSDeformAttn
from .utils import box_from_delta

__all__ = ["DecoderLayer", "Decoder"]


class DecoderLayer(nn.Module):
    """Self-attention (norm2) -> deformable cross-attention (norm1) -> ReLU FFN (norm3), post-norm,
    with the official parameter names."""

    @configurable
    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    @classmethod
    def from_config(cls, cfg):
        sd = cfg.MODEL.SPARSE_DETR
        return {"d_model": sd.HIDDEN_DIM, "d_ffn": sd.DIM_FEEDFORWARD, "dropout": sd.DROPOUT,
                "n_levels": sd.NUM_FEATURE_LEVELS, "n_heads": sd.NHEADS, "n_points": sd.DEC_N_POINTS}

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask,
                self_attn_mask=None):
        """
        Args:
            tgt, query_pos: (B, Q, C). reference_points: (B, Q, L, 2 or 4), already scaled by the valid
            ratios. memory: (B, N, C). spatial_shapes (L, 2), level_start_index (L,), padding_mask (B, N).
            self_attn_mask: optional (Q, Q) bool, True where query i must not attend to query j.
        Returns:
            tgt (B, Q, C), sampling_locations (B, Q, M, L, P, 2), attention_weights (B, Q, M, L, P).
        """
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]))
        out, locations, weights = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                                                  level_start_index, padding_mask, return_sampling=True)
        tgt = self.norm1(tgt + self.dropout1(out))
        tgt = self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))
        return tgt, locations, weights


class Decoder(nn.Module):
    """A stack of `DecoderLayer`s; with `bbox_heads` the reference boxes are refined after every layer."""

    @configurable
    def __init__(self, layer: nn.Module, num_layers: int, look_forward_twice: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice

    @classmethod
    def from_config(cls, cfg):
        sd = cfg.MODEL.SPARSE_DETR
        return {"layer": DecoderLayer(cfg), "num_layers": sd.DEC_LAYERS,
                "look_forward_twice": sd.LOOK_FORWARD_TWICE}

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                memory: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                valid_ratios: torch.Tensor, padding_mask: torch.Tensor,
                bbox_heads: Optional[Sequence[nn.Module]] = None,
                self_attn_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """
        Args:
            tgt, query_pos: (B, Q, C). reference_points: (B, Q, 4) boxes or (B, Q, 2) points, normalised
                to each image's valid region. memory: (B, N, C). valid_ratios: (B, L, 2).
            bbox_heads: one per layer for iterative refinement: the next layer's reference is
                sigmoid(head(out) + inverse_sigmoid(reference)), detached. None: fixed references.
                With `look_forward_twice` (DINO, Zhang et al., ICLR 2023) the references returned for the
                loss keep their gradient, so a layer's box loss also trains the previous layer's
                refinement; the next layer's attention still samples around the detached box.
            self_attn_mask: optional (Q, Q) bool, True where query i must not attend to query j.
        Returns:
            "hs" (layers, B, Q, C) every layer's output; "references": per layer, the (B, Q, 2|4)
            reference its output is relative to (its input reference; points become boxes once refined);
            "sampling_locations_dec" (B, layers, Q, M, L, P, 2); "attn_weights_dec" (B, layers, Q, M, L, P).
        """
        hs, references, locations, weights = [], [], [], []
        loss_reference = reference_points  # the reference the layer's boxes are predicted from
        for lid, layer in enumerate(self.layers):
            scale = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            tgt, loc, w = layer(tgt, query_pos, reference_points[:, :, None] * scale[:, None], memory,
                                spatial_shapes, level_start_index, padding_mask, self_attn_mask)
            hs.append(tgt)
            references.append(loss_reference)
            locations.append(loc)
            weights.append(w)
            if bbox_heads is not None:
                refined = box_from_delta(bbox_heads[lid](tgt), reference_points)
                reference_points = refined.detach()
                loss_reference = refined if self.look_forward_twice else reference_points
        return {"hs": torch.stack(hs), "references": references,
                "sampling_locations_dec": torch.stack(locations, 1), "attn_weights_dec": torch.stack(weights, 1)}

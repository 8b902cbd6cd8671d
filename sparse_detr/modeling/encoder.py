"""Sparse deformable encoder: selected tokens are the queries, all tokens are keys and values."""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..layers.ms_deform_attn_module import MSDeformAttn

__all__ = ["SparseEncoderLayer", "SparseEncoder"]


class SparseEncoderLayer(nn.Module):
    """Post-norm deformable self-attention + ReLU FFN (official names: self_attn, norm1, linear1/2, norm2)."""

    @configurable
    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    @classmethod
    def from_config(cls, cfg):
        sd = cfg.MODEL.SPARSE_DETR
        return {"d_model": sd.HIDDEN_DIM, "d_ffn": sd.DIM_FEEDFORWARD, "dropout": sd.DROPOUT,
                "n_levels": sd.NUM_FEATURE_LEVELS, "n_heads": sd.NHEADS, "n_points": sd.ENC_N_POINTS}

    def forward(self, query, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask):
        """
        Args:
            query, query_pos: (B, K, C). reference_points: (B, K, L, 2). memory: (B, N, C) keys/values.
            spatial_shapes: (L, 2) int64. level_start_index: (L,). padding_mask: (B, N) bool.
        Returns:
            query (B, K, C), sampling_locations (B, K, M, L, P, 2), attention_weights (B, K, M, L, P).
        """
        out, locations, weights = self.self_attn(query + query_pos, reference_points, memory, spatial_shapes,
                                                 level_start_index, padding_mask, return_sampling=True)
        query = self.norm1(query + self.dropout1(out))
        query = self.norm2(query + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(query))))))
        return query, locations, weights


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, *rest), index (B, K) -> (B, K, *rest)."""
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


class SparseEncoder(nn.Module):
    """A stack of `SparseEncoderLayer`s refining only the selected tokens.

    With `topk_inds` (B, K), the K selected tokens of each image (their backbone features, positions and
    reference points) are the queries of every layer and are carried from layer to layer; after each
    layer the first `counts[i]` of image i are written back into the token sequence, which is the key and
    value set of the next layer. Unselected tokens keep their backbone features. Without `topk_inds`
    every token is a query: the dense Deformable DETR encoder.
    """

    @configurable
    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    @classmethod
    def from_config(cls, cfg):
        return {"layer": SparseEncoderLayer(cfg), "num_layers": cfg.MODEL.SPARSE_DETR.ENC_LAYERS}

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, padding_mask: torch.Tensor,
                topk_inds: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None,
                aux_heads: Sequence[Tuple[nn.Module, nn.Module]] = (), anchors: Optional[torch.Tensor] = None,
                return_sampling: bool = False) -> Dict:
        """
        Args:
            src, pos: (B, N, C) backbone tokens and their position (+ level) embedding.
            reference_points: (B, N, L, 2). spatial_shapes, level_start_index, padding_mask: see the layer.
            topk_inds: (B, K) selected token indices, or None (dense). counts: (B,) <= K, tokens of each
                image written back (required with topk_inds).
            aux_heads: (class_head, bbox_head) applied to the queries after layers 0 .. len-1 (at most
                num_layers - 1 of them); boxes are sigmoid(anchors + bbox_head(query)).
            anchors: (B, N, 4) inverse-sigmoid anchor boxes of the tokens (needed with aux_heads).
            return_sampling: also return the sampling locations and weights of every layer.
        Returns:
            "memory" (B, N, C); "aux_outputs_enc": list of {"pred_logits" (B, K, classes), "pred_boxes"
            (B, K, 4)}; with return_sampling "sampling_locations_enc" (B, layers, K, M, L, P, 2) and
            "attn_weights_enc" (B, layers, K, M, L, P).
        """
        if len(aux_heads) >= self.num_layers:
            raise ValueError(f"{len(aux_heads)} encoder auxiliary heads for {self.num_layers} layers")
        memory = src
        if topk_inds is None:
            query, query_pos, query_ref, query_anchors = src, pos, reference_points, anchors
        else:
            query, query_pos, query_ref = (_gather_tokens(t, topk_inds) for t in (src, pos, reference_points))
            query_anchors = _gather_tokens(anchors, topk_inds) if aux_heads else None
            index = topk_inds[..., None].expand(-1, -1, src.shape[-1])
            write = (torch.arange(topk_inds.shape[1], device=src.device)[None] < counts[:, None])[..., None]
        # Without autograd the write-back goes in place into one copy of src (autograd needs every layer's
        # memory, which the next layer's value projection saves, so it gets a new tensor per layer).
        in_place = topk_inds is not None and not torch.is_grad_enabled()
        if in_place:
            memory = src.clone()
        aux_outputs: List[Dict[str, torch.Tensor]] = []
        locations, weights = [], []
        for lid, layer in enumerate(self.layers):
            query, loc, w = layer(query, query_pos, query_ref, memory, spatial_shapes, level_start_index,
                                  padding_mask)
            if topk_inds is None:
                memory = query
            else:  # write back the first counts[i] queries; the others rewrite the current value
                update = torch.where(write, query, memory.gather(1, index))
                memory = memory.scatter_(1, index, update) if in_place else memory.scatter(1, index, update)
            if lid < len(aux_heads):
                class_head, bbox_head = aux_heads[lid]
                aux_outputs.append({"pred_logits": class_head(query),
                                    "pred_boxes": (query_anchors + bbox_head(query)).sigmoid()})
            if return_sampling:
                locations.append(loc)
                weights.append(w)
        out = {"memory": memory, "aux_outputs_enc": aux_outputs}
        if return_sampling:
            out["sampling_locations_enc"] = torch.stack(locations, 1)
            out["attn_weights_enc"] = torch.stack(weights, 1)
        return out

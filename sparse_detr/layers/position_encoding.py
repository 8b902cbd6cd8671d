"""Sine position embeddings of Deformable / Sparse DETR: for feature maps and for boxes."""
import math

import torch
from detectron2.config import configurable
from torch import nn

__all__ = ["PositionEmbeddingSine", "box_sine_embedding"]


def _sine_cosine(coords: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(..., ) coordinates -> (..., num_feats) with sin on even and cos on odd frequencies, interleaved."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = coords[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Normalised sine embedding of the (y, x) position of every valid cell of a padded feature map.

    The coordinate of a cell is its 1-based index among the valid cells of its column (row), minus
    `offset`, divided by the number of valid cells and multiplied by `scale`: with the defaults
    (offset 0.5, scale 2 pi), cell centres map to (0, 2 pi), as in the official Deformable DETR.
    """

    @configurable
    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = 0.5, eps: float = 1e-6):
        """
        Args:
            num_pos_feats: channels per axis; the embedding has 2 * num_pos_feats channels (y then x).
        """
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    @classmethod
    def from_config(cls, cfg):
        return {"num_pos_feats": cfg.MODEL.SPARSE_DETR.HIDDEN_DIM // 2}

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: (B, H, W) bool, True on padding.
        Returns:
            (B, 2 * num_pos_feats, H, W) float32 embedding (padding cells get a value too).
        """
        not_mask = (~mask).float()
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_x = _sine_cosine(x_embed, self.num_pos_feats, self.temperature)
        pos_y = _sine_cosine(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(boxes_unact: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0,
                       scale: float = 2 * math.pi) -> torch.Tensor:
    """Sine embedding of boxes given in logit space (the two-stage query position of Deformable DETR).

    Args:
        boxes_unact: (..., 4) inverse-sigmoid (cx, cy, w, h).
    Returns:
        (..., 4 * num_pos_feats): each coordinate sigmoid()*scale embedded with `num_pos_feats` channels.
    """
    return _sine_cosine(boxes_unact.sigmoid() * scale, num_pos_feats, temperature).flatten(-2)

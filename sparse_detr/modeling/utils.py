"""Geometry of the flattened multi-scale token sequence: masks, valid ratios, reference points, anchors;
small tensor helpers of the model."""
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["inverse_sigmoid", "box_from_delta", "MLP", "GroupNorm", "level_masks", "valid_ratio",
           "encoder_reference_points", "encoder_anchors", "to_float32"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps (the official helper)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (official names: layers.0 ... layers.{n-1})."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same op, same numbers) that also accepts groups holding a single value.

    `nn.GroupNorm` refuses an input whose groups have one element each (batch 1, one channel per group,
    a 1 x 1 map: HIDDEN_DIM 32 on the coarsest level of a tiny image); such a group normalises to 0, so
    the output is the bias.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


def level_masks(image_mask: torch.Tensor, sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """Padding mask of each feature level: the image mask nearest-resized to the level (official rule).

    Args:
        image_mask: (B, H, W) bool, True on padding. sizes: (H_l, W_l) per level.
    Returns:
        list of (B, H_l, W_l) bool.
    """
    m = image_mask[None].float()
    return [F.interpolate(m, size=tuple(s)).to(torch.bool)[0] for s in sizes]


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2) fraction (w, h) of valid columns and rows."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / H
    valid_w = (~mask[:, 0, :]).sum(1).float() / W
    return torch.stack([valid_w, valid_h], -1)


def _cell_centres(H: int, W: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row-major) x and y of the cell centres of an H x W grid, in cells: (H*W,), (H*W,)."""
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=device) + 0.5,
                            torch.arange(W, dtype=torch.float32, device=device) + 0.5, indexing="ij")
    return xs.reshape(-1), ys.reshape(-1)


def encoder_reference_points(shapes: Sequence[Tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Reference point of every token on every level, normalised to the padded maps.

    Args:
        shapes: (H_l, W_l) per level. valid_ratios: (B, L, 2) (w, h).
    Returns:
        (B, N, L, 2) (x, y): the token's cell centre relative to the valid region of its own level,
        then scaled by each level's valid ratio.
    """
    refs = []
    for lvl, (H, W) in enumerate(shapes):
        xs, ys = _cell_centres(H, W, valid_ratios.device)
        ref_y = ys[None] / (valid_ratios[:, None, lvl, 1] * H)
        ref_x = xs[None] / (valid_ratios[:, None, lvl, 0] * W)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def encoder_anchors(mask_flatten: torch.Tensor, shapes: Sequence[Tuple[int, int]]
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed anchor box of every token (official `gen_encoder_output_proposals`, without the features).

    A token's anchor is centred on its cell, relative to the valid part of its level, with width and
    height 0.05 * 2^level. Anchors of padded tokens, and of tokens whose anchor is not strictly inside
    (0.01, 0.99) on all four coordinates (official rule: some border cells of the fine levels), are
    invalid.

    Args:
        mask_flatten: (B, N) bool, True on padding. shapes: (H_l, W_l) per level.
    Returns:
        anchors (B, N, 4) inverse-sigmoid (cx, cy, w, h), +inf where invalid; valid (B, N) bool.
    """
    B = mask_flatten.shape[0]
    anchors, start = [], 0
    for lvl, (H, W) in enumerate(shapes):
        mask = mask_flatten[:, start:start + H * W].view(B, H, W)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        xs, ys = _cell_centres(H, W, mask.device)
        cx = xs[None] / valid_w[:, None]
        cy = ys[None] / valid_h[:, None]
        wh = torch.full_like(cx, 0.05 * (2.0 ** lvl))
        anchors.append(torch.stack((cx, cy, wh, wh), -1))
        start += H * W
    anchors = torch.cat(anchors, 1)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1) & ~mask_flatten
    anchors = torch.log(anchors / (1 - anchors)).masked_fill(~valid[..., None], float("inf"))
    return anchors, valid


def box_from_delta(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sigmoid(delta + inverse_sigmoid(reference)): (..., 4) boxes from a head's output and a
    (..., 4) reference box, or a (..., 2) reference point (then only the centre is offset)."""
    ref = inverse_sigmoid(reference)
    if ref.shape[-1] == 2:
        return torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1).sigmoid()
    return (delta + ref).sigmoid()


def to_float32(obj: Any) -> Any:
    """`obj` (nested dicts, lists and tuples of tensors) with every reduced-precision floating tensor
    (float16, bfloat16: autocast outputs) converted to float32; everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() and obj.element_size() < 4 else obj
    if isinstance(obj, dict):
        return {k: to_float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(v) for v in obj)
    return obj

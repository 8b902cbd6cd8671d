"""Decoder cross-attention map (DAM): where the decoder looks, splatted on the flattened token grid."""
from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = ["decoder_attention_map", "topk_token_target", "dam_coverage", "check_dam_convention", "DAM_CONVENTIONS"]

# "official": pixel coordinate loc * size (the official code, half a cell right/down of where the
# attention op samples); "exact": loc * size - 0.5, the op's own bilinear footprint.
DAM_CONVENTIONS = {"official": 0.0, "exact": 0.5}


def check_dam_convention(name: str) -> None:
    if name not in DAM_CONVENTIONS:
        raise ValueError(f"MODEL.SPARSE_DETR.DAM_CONVENTION={name!r}; allowed: {sorted(DAM_CONVENTIONS)}")


@torch.no_grad()
def decoder_attention_map(sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                          shapes: Sequence[Tuple[int, int]], level_start_index: torch.Tensor,
                          convention: str = "official") -> torch.Tensor:
    """Bilinearly splat every sampling point's attention weight on the token grid, summed.

    Args:
        sampling_locations: (B, layers, Q, M, L, P, 2) normalised (x, y).
        attention_weights: (B, layers, Q, M, L, P).
        shapes: (H_l, W_l) per level. level_start_index: (L,) int64.
        convention: a key of DAM_CONVENTIONS.
    Returns:
        (B, N) float32 DAM summed over layers, queries, heads and points; the four bilinear
        neighbours of a point share its weight, neighbours outside their level's map are dropped.
    """
    B, L = sampling_locations.shape[0], len(shapes)
    locs = sampling_locations.detach().float().transpose(-3, -2).reshape(B, -1, L, 2)  # level last
    weights = attention_weights.detach().float().transpose(-2, -1).reshape(B, -1, L)
    size_wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=locs.device)
    pix = locs * size_wh - DAM_CONVENTIONS[convention]  # (B, S, L, 2) pixel coordinates (col, row)
    low = pix.floor()
    frac = pix - low
    low = low.long()
    size_wh = size_wh.long()
    dam = weights.new_zeros(B, sum(h * w for h, w in shapes))
    for dx in (0, 1):
        for dy in (0, 1):
            col, row = low[..., 0] + dx, low[..., 1] + dy
            bilinear = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
            inside = (col >= 0) & (col < size_wh[:, 0]) & (row >= 0) & (row < size_wh[:, 1])
            index = (row * size_wh[:, 0] + col + level_start_index) * inside
            dam.scatter_add_(1, index.flatten(1), (weights * bilinear * inside).flatten(1))
    return dam


@torch.no_grad()
def topk_token_target(scores: torch.Tensor, mask_flatten: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Binary (B, N) target: 1 on the top-`counts[i]` tokens of image i by `scores`, padding excluded."""
    scores = scores.masked_fill(mask_flatten, float("-inf"))
    k = int(counts.max())
    index = scores.topk(k, dim=1).indices
    keep = torch.arange(k, device=scores.device)[None] < counts[:, None]
    return torch.zeros_like(scores).scatter_(1, index, keep.to(scores.dtype))


@torch.no_grad()
def dam_coverage(dam: torch.Tensor, topk_inds: torch.Tensor, level_start_index: torch.Tensor,
                 counts: Optional[torch.Tensor] = None, reduce: bool = True) -> Dict[str, torch.Tensor]:
    """Share of the DAM mass on the selected tokens: the paper's DAM correlation (official `corr`).

    Args:
        dam: (B, N). topk_inds: (B, K) selected tokens of every image, sorted by score.
        level_start_index: (L,).
        counts: (B,) tokens selected by image i (its first counts[i] indices); None: all K (official
            training diagnostics: the surplus of the smaller images of a batch included).
        reduce: average over the batch (official); False keeps one value per image.
    Returns:
        "corr_mask_attn_map_dec_all" and "corr_mask_attn_map_dec_{l}" per level: per image, the selected
        tokens' share of the DAM mass (of the level; 0 where it has none), averaged over the batch (0-d)
        or per image (B,).
    """
    keep = torch.ones_like(topk_inds, dtype=dam.dtype)
    if counts is not None:
        keep = (torch.arange(topk_inds.shape[1], device=dam.device)[None] < counts[:, None]).to(dam.dtype)
    selected = torch.zeros_like(dam).scatter_(1, topk_inds, keep)
    bounds = level_start_index.tolist() + [dam.shape[1]]
    spans = {"all": (0, dam.shape[1])}
    spans.update({str(lvl): (bounds[lvl], bounds[lvl + 1]) for lvl in range(len(bounds) - 1)})
    corr = {f"corr_mask_attn_map_dec_{name}":
            (dam[:, a:b] * selected[:, a:b]).sum(1) / dam[:, a:b].sum(1).clamp(min=1e-12)
            for name, (a, b) in spans.items()}
    return {k: v.mean() for k, v in corr.items()} if reduce else corr

"""Multi-scale deformable attention: the functional op and its pure-PyTorch reference.

Shapes (official / Hugging Face semantics):
    value               (N, S, M, D)      S = sum of H_l*W_l over levels, M heads, D channels per head
    spatial_shapes      (L, 2) int64      (H_l, W_l) per level
    level_start_index   (L,)  int64       offset of each level in S
    sampling_locations  (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1]
    attention_weights   (N, Lq, M, L, P)
    output              (N, Lq, M*D)
Bilinear sampling at pixel coordinate `loc * size - 0.5`, zero outside the map.
"""
import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """`grid_sample` implementation; runs anywhere autograd runs and is what fvcore counts."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()] if torch.is_tensor(spatial_shapes) else spatial_shapes
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Dispatching entry point (compiled kernel when available, else the reference)."""
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def backend_for_device(device):
    """Name of the implementation `ms_deform_attn` uses for tensors on `device` ("cpu"/"cuda")."""
    from .. import _ext

    if _ext.force_reference() or not _ext.has_extension():
        return "reference (grid_sample)"
    if str(device).startswith("cuda") and not _ext.has_cuda_kernels():
        return "reference (grid_sample)"
    return "compiled kernel"

"""Multi-scale deformable attention: the functional op, its dispatch, and its pure-PyTorch reference.

Shapes (official / Hugging Face semantics):
    value               (N, S, M, D)      S = sum of H_l*W_l over levels, M heads, D channels per head
    spatial_shapes      (L, 2) int64      (H_l, W_l) per level
    level_start_index   (L,)  int64       offset of each level in S
    sampling_locations  (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1]
    attention_weights   (N, Lq, M, L, P)
    output              (N, Lq, M*D)
Bilinear sampling at pixel coordinate `loc * size - 0.5`, zero outside the map.

Backends: the compiled kernels `torch.ops.sparse_detr.ms_deform_attn_forward/_backward` (csrc/ms_deform_attn/,
CPU always, CUDA when built with it) and `ms_deform_attn_reference` (`grid_sample`). `ms_deform_attn` takes the
kernel for the tensor's device when there is one, else the reference; `SPARSE_DETR_MSDA=reference` forces the
reference. Importing this module registers the op's autograd formula and its fake (meta) kernels, so the
compiled op works under autograd, `torch.compile` and `torch.export`; its autocast rule is in C++.
"""
import torch
import torch.nn.functional as F

from .. import _ext

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "backend_for_device"]


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


def _use_kernel(device):
    if _ext.force_reference() or not _ext.has_extension():
        return False
    return device.type == "cpu" or (device.type == "cuda" and _ext.has_cuda_kernels())


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Dispatching entry point: the compiled kernel for `value.device` when present, else the reference.

    `spatial_shapes` may also be a list of (H, W) and `level_start_index` a list; the kernel honours
    `level_start_index` as given (each level must fit inside S).
    """
    if not _use_kernel(value.device):
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)
    if not torch.is_tensor(spatial_shapes):
        spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=value.device)
    if not torch.is_tensor(level_start_index):
        level_start_index = torch.as_tensor(level_start_index, dtype=torch.long, device=value.device)
    return torch.ops.sparse_detr.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                                        sampling_locations, attention_weights)


def backend_for_device(device):
    """Name of the implementation `ms_deform_attn` uses for tensors on `device` ("cpu"/"cuda")."""
    return "compiled kernel" if _use_kernel(torch.device(device)) else "reference (grid_sample)"


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.sparse_detr.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return grad_value, None, None, grad_locations, grad_weights


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


if _ext.has_extension():
    torch.library.register_autograd("sparse_detr::ms_deform_attn_forward", _backward, setup_context=_setup_context)
    torch.library.register_fake("sparse_detr::ms_deform_attn_forward")(_forward_fake)
    torch.library.register_fake("sparse_detr::ms_deform_attn_backward")(_backward_fake)

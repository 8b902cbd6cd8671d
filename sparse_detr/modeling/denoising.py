"""Denoising training queries (Li et al., "DN-DETR: Accelerate DETR Training by Introducing Query
DeNoising", CVPR 2022).

Not part of Sparse DETR: an optional training-time addition (MODEL.SPARSE_DETR.DN_GROUPS > 0) for short
schedules. In training, the decoder also runs DN_GROUPS groups of queries made from the ground truth:
each object's box jittered by up to DN_BOX_NOISE_SCALE of its size (the query's reference box) and its
label, replaced by a random class with probability DN_LABEL_NOISE_RATIO (the query's content, a label
embedding). Query j of a group is supervised by object j (no matching), so every step trains the decoder
to move a nearby box onto its object. The groups come after the matching queries; the matching queries
cannot see them in self-attention and the groups cannot see each other, so the matching queries compute
what they compute without them, and inference (matching queries only) is unchanged.
"""
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["noised_ground_truth", "denoising_self_attn_mask", "denoising_indices"]


def noised_ground_truth(targets: List[Dict[str, torch.Tensor]], groups: int, box_noise_scale: float,
                        label_noise_ratio: float, num_classes: int,
                        generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The denoising queries' labels and reference boxes.

    Every image gets `groups` groups of `group_size` = max(1, most objects in an image of the batch)
    queries; query j of a group is object j, jittered, or padding (label 0, the box covering the image:
    supervised as background) for j >= the image's object count.

    Args:
        targets: B dicts with "labels" (n_i,) int64 and "boxes" (n_i, 4) cxcywh in [0, 1].
        box_noise_scale: centre moved by up to scale * (w/2, h/2), size scaled by 1 +- up to scale.
        label_noise_ratio: probability that a label is replaced by a uniformly drawn class.
    Returns:
        labels (B, groups * group_size) int64, boxes (B, groups * group_size, 4) cxcywh in [0, 1], group_size.
    """
    device = targets[0]["boxes"].device
    group_size = max([1] + [len(t["labels"]) for t in targets])
    B, Q = len(targets), groups * group_size
    labels = torch.zeros(B, groups, group_size, dtype=torch.int64, device=device)
    boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(B, groups, group_size, 1)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        labels[i, :, :n] = t["labels"].to(device)
        boxes[i, :, :n] = t["boxes"].to(device=device, dtype=boxes.dtype)
    real = torch.arange(group_size, device=device)[None, None, :] < torch.as_tensor(
        [len(t["labels"]) for t in targets], device=device)[:, None, None]  # (B, groups, group_size)

    flip = (torch.rand(labels.shape, generator=generator, device=device) < label_noise_ratio) & real
    random_labels = torch.randint(0, num_classes, labels.shape, generator=generator, device=device)
    labels = torch.where(flip, random_labels, labels)

    wh = boxes[..., 2:]
    extent = torch.cat([wh / 2, wh], -1)  # how far each of cx, cy, w, h may move at scale 1
    jitter = (torch.rand(boxes.shape, generator=generator, device=device) * 2 - 1) * extent * box_noise_scale
    boxes = torch.where(real[..., None], (boxes + jitter).clamp(0.0, 1.0), boxes)
    return labels.view(B, Q), boxes.view(B, Q, 4), group_size


def denoising_self_attn_mask(num_matching: int, groups: int, group_size: int, device: torch.device) -> torch.Tensor:
    """(Q, Q) bool self-attention mask, Q = num_matching + groups * group_size, True where blocked: the
    matching queries (first) see only each other; a denoising group sees itself and the matching queries."""
    group = torch.arange(num_matching + groups * group_size, device=device) - num_matching
    group = torch.where(group < 0, -1, group.div(group_size, rounding_mode="floor"))  # -1: matching
    return (group[None, :] != group[:, None]) & (group[None, :] >= 0)


def denoising_indices(targets: List[Dict[str, torch.Tensor]], groups: int, group_size: int
                      ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per image, (query index, target index) pairs of the denoising queries against its targets repeated
    `groups` times (`one_to_many.repeat_targets`): query g * group_size + j <-> target g * n + j."""
    indices = []
    for t in targets:
        n = len(t["labels"])
        g, j = torch.meshgrid(torch.arange(groups), torch.arange(n), indexing="ij")
        indices.append(((g * group_size + j).flatten(), (g * n + j).flatten()))
    return indices

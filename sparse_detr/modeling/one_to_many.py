"""One-to-many training queries (hybrid matching, Jia et al., "DETRs with Hybrid Matching", CVPR 2023).

Not part of Sparse DETR: an optional training-time addition (MODEL.SPARSE_DETR.ONE_TO_MANY_QUERIES > 0)
for short schedules. In training, the two-stage selection takes NUM_QUERIES + ONE_TO_MANY_QUERIES
encoder proposals; the first NUM_QUERIES are the usual one-to-one queries, the rest are matched
(Hungarian, per decoder layer) to the ground truth repeated ONE_TO_MANY_REPEATS times, so that every
object supervises several queries per step. The two groups share the decoder and the heads but cannot
see each other in self-attention, so the one-to-one queries compute exactly what they compute without
the extra group, and inference (which runs the one-to-one queries only) is unchanged.
"""
from typing import Dict, List, Tuple

import torch

__all__ = ["group_self_attn_mask", "split_query_groups", "repeat_targets"]


def group_self_attn_mask(num_one_to_one: int, num_total: int, device: torch.device) -> torch.Tensor:
    """(num_total, num_total) bool self-attention mask, True where attention is blocked: query i sees
    query j only when both are among the first `num_one_to_one` or both are after them."""
    group = torch.arange(num_total, device=device) >= num_one_to_one
    return group[:, None] != group[None, :]


def split_query_groups(dec: Dict, num_one_to_one: int) -> Tuple[Dict, Dict]:
    """Split a `Decoder.forward` output (every query group) into the first `num_one_to_one` queries and
    the rest, each with the same keys ("hs" (layers, B, Q, C), "references" per layer (B, Q, 2|4),
    "sampling_locations_dec" (B, layers, Q, ...), "attn_weights_dec" (B, layers, Q, ...))."""
    groups = []
    for part in (slice(None, num_one_to_one), slice(num_one_to_one, None)):
        groups.append({"hs": dec["hs"][:, :, part], "references": [r[:, part] for r in dec["references"]],
                       "sampling_locations_dec": dec["sampling_locations_dec"][:, :, part],
                       "attn_weights_dec": dec["attn_weights_dec"][:, :, part]})
    return groups[0], groups[1]


def repeat_targets(targets: List[Dict[str, torch.Tensor]], repeats: int) -> List[Dict[str, torch.Tensor]]:
    """Every image's "labels" (n,) and "boxes" (n, 4) repeated `repeats` times: (repeats * n,)."""
    return [{"labels": t["labels"].repeat(repeats), "boxes": t["boxes"].repeat(repeats, 1)} for t in targets]

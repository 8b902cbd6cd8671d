"""Hungarian matcher of (Deformable / Sparse) DETR: one-to-one assignment of predictions to targets."""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_class_cost"]


def focal_class_cost(prob: torch.Tensor, alpha: float, gamma: float = 2.0) -> torch.Tensor:
    """Focal-style matching cost of predicting each class with probability `prob` (any shape).

    alpha*(1-p)^gamma*(-log(p+1e-8)) - (1-alpha)*p^gamma*(-log(1-p+1e-8)), the official formula.
    """
    pos = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
    neg = (1 - alpha) * prob**gamma * (-(1 - prob + 1e-8).log())
    return pos - neg


class HungarianMatcher(nn.Module):
    """Minimum-cost bipartite matching between the queries of each image and its targets.

    Cost = cost_bbox * L1(cxcywh) + cost_class * focal class cost + cost_giou * (-GIoU), computed in
    float32 for the whole batch at once, then solved per image by scipy's `linear_sum_assignment`.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor],
                targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, C) class logits, "pred_boxes" (B, Q, 4) cxcywh in [0, 1].
            targets: B dicts with "labels" (n_i,) int64 in [0, C) and "boxes" (n_i, 4) normalised cxcywh.
        Returns:
            B pairs (pred_idx, tgt_idx), int64 CPU tensors of length min(Q, n_i): query pred_idx[k]
            is matched to target tgt_idx[k].
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bs, num_queries = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in sizes]

        prob = logits.flatten(0, 1).float().sigmoid()  # (B*Q, C)
        out_boxes = boxes.flatten(0, 1).float()  # (B*Q, 4)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()

        cost_class = focal_class_cost(prob[:, tgt_ids], self.focal_alpha)
        cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(out_boxes, "cxcywh", "xyxy"),
                                         box_convert(tgt_boxes, "cxcywh", "xyxy"))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        blocks = [c[i] for i, c in enumerate(cost.view(bs, num_queries, -1).cpu().split(sizes, -1))]
        self._check_finite(blocks, cost_class, cost_bbox, cost_giou, logits, boxes)

        indices = [linear_sum_assignment(c) for c in blocks]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
                for i, j in indices]

    @staticmethod
    def _check_finite(blocks, cost_class, cost_bbox, cost_giou, logits, boxes):
        """Raise a descriptive error instead of scipy's "invalid numeric entries" (no sanitising:
        a NaN/inf cost means the predictions themselves are broken, e.g. a diverged or fp16 run).
        `blocks`: per image, the (Q, n_i) costs of its queries against its own targets."""
        per_image = [int((~torch.isfinite(c)).sum()) for c in blocks]
        if not any(per_image):
            return
        terms = {name: int((~torch.isfinite(t)).sum()) for name, t in
                 (("class", cost_class), ("bbox L1", cost_bbox), ("GIoU", cost_giou))}
        raise FloatingPointError(
            f"HungarianMatcher: the cost matrix has {sum(per_image)} non-finite entries "
            f"(per image: {per_image}; per term, whole batch: {terms}; non-finite inputs: "
            f"pred_logits {int((~torch.isfinite(logits)).sum())}, "
            f"pred_boxes {int((~torch.isfinite(boxes)).sum())}). The model produced NaN/inf "
            f"predictions: training diverged, an input image holds NaN/inf, or half precision "
            f"overflowed (run the heads and losses in float32 under AMP, lower the learning rate, or check the "
            f"gradient clip).")

"""Test-time augmentation for SparseDETR: the model on several views of an image (scales, rotations by
multiples of 90 degrees, horizontal flips), boxes mapped back through Detectron2's transforms and fused
by weighted box fusion. The counterpart of Detectron2's `GeneralizedRCNNWithTTA` (R-CNN only), driven
by the same keys: TEST.AUG.ENABLED, MIN_SIZES, MAX_SIZE, FLIP, plus TEST.AUG.ROTATE_90 and
TEST.AUG.FUSION_IOU (added by `add_sparse_detr_config`)."""
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.ops import box_iou

from ..data.transforms import Rotate90Transform
from .meta_arch import SparseDETR

__all__ = ["SparseDETRWithTTA", "weighted_box_fusion"]


def weighted_box_fusion(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, num_views: int,
                        iou_threshold: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuse the detections of `num_views` views of one image (weighted boxes fusion, Solovyev et al.,
    Image and Vision Computing 2021).

    In descending score order, a box joins the cluster of its class whose fused box it overlaps most if
    that IoU exceeds `iou_threshold`, else it starts a cluster. A cluster's box is the score-weighted mean
    of its members; its score is their mean score times min(members, num_views) / num_views, so that
    objects found in few views rank lower. Written here rather than taken from the `ensemble-boxes`
    package, which imports numba and pandas for these few lines and works on NumPy only.

    Args:
        boxes: (M, 4) XYXY. scores: (M,) in (0, 1]. classes: (M,) int64.
    Returns:
        boxes (K, 4), scores (K,), classes (K,), sorted by descending score.
    """
    M = len(boxes)
    weighted_sum = boxes.new_zeros(M, 4)  # per cluster: sum of score * box
    score_sum, count = scores.new_zeros(M), scores.new_zeros(M)
    fused, fused_classes = boxes.new_zeros(M, 4), classes.new_zeros(M)
    K = 0
    for i in scores.argsort(descending=True).tolist():
        j = K
        if K:
            iou = box_iou(boxes[i:i + 1], fused[:K])[0].masked_fill(fused_classes[:K] != classes[i], -1.0)
            best = int(iou.argmax())
            if iou[best] > iou_threshold:
                j = best
        if j == K:
            fused_classes[K] = classes[i]
            K += 1
        weighted_sum[j] += scores[i] * boxes[i]
        score_sum[j] += scores[i]
        count[j] += 1
        fused[j] = weighted_sum[j] / score_sum[j]
    fused_scores = score_sum[:K] / count[:K] * count[:K].clamp(max=num_views) / num_views
    order = fused_scores.argsort(descending=True)
    return fused[:K][order], fused_scores[order], fused_classes[:K][order]


class SparseDETRWithTTA(nn.Module):
    """A SparseDETR (in eval mode) run on every view of each input, its detections fused.

    Views: for every short-edge size of TEST.AUG.MIN_SIZES (longest edge at most TEST.AUG.MAX_SIZE), the
    rotations by 0/90/180/270 degrees if TEST.AUG.ROTATE_90, each also flipped horizontally if
    TEST.AUG.FLIP (8 orientations with both). Same inputs and outputs as `SparseDETR.forward` in
    inference; the top TEST.DETECTIONS_PER_IMAGE fused detections are kept.
    """

    def __init__(self, cfg, model: nn.Module):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, SparseDETR):
            raise TypeError(f"SparseDETRWithTTA needs a SparseDETR model, got {type(model).__name__}")
        aug = cfg.TEST.AUG
        if not 0.0 < aug.FUSION_IOU < 1.0:
            raise ValueError(f"TEST.AUG.FUSION_IOU={aug.FUSION_IOU} must be in (0, 1)")
        if not aug.MIN_SIZES:
            raise ValueError("TEST.AUG.MIN_SIZES is empty: give at least one short-edge size")
        self.model = model
        self.min_sizes: Sequence[int] = tuple(aug.MIN_SIZES)
        self.max_size: int = aug.MAX_SIZE
        self.angles = (0, 90, 180, 270) if aug.ROTATE_90 else (0,)
        self.flips = (False, True) if aug.FLIP else (False,)
        self.fusion_iou: float = aug.FUSION_IOU
        self.detections_per_image: int = cfg.TEST.DETECTIONS_PER_IMAGE

    @property
    def num_views(self) -> int:
        return len(self.min_sizes) * len(self.angles) * len(self.flips)

    def view_transforms(self, height: int, width: int) -> Iterator[T.TransformList]:
        """The transform of every view of an image of the given size (inputs to outputs)."""
        for min_size in self.min_sizes:
            resize = T.ResizeShortestEdge(min_size, self.max_size).get_transform(np.empty((height, width, 0)))
            h, w = resize.new_h, resize.new_w
            for angle in self.angles:
                rotation = [Rotate90Transform(angle // 90, h, w)] if angle else []  # exact quarter turns
                view_w = h if angle in (90, 270) else w
                for flip in self.flips:
                    yield T.TransformList([resize] + rotation + ([T.HFlipTransform(view_w)] if flip else []))

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        if self.model.training:
            raise RuntimeError("SparseDETRWithTTA is for inference: call model.eval() first")
        return [self._inference_one_image(x) for x in batched_inputs]

    def _inference_one_image(self, inputs: Dict) -> Dict:
        image = inputs["image"].permute(1, 2, 0).cpu().numpy()  # (H, W, C) as the test mapper gave it
        h, w = image.shape[:2]
        boxes, scores, classes = [], [], []
        for tfm in self.view_transforms(h, w):
            view = torch.as_tensor(np.ascontiguousarray(tfm.apply_image(image).transpose(2, 0, 1)))
            inst = self.model([{"image": view}])[0]["instances"]  # boxes in the view's coordinates
            back = tfm.inverse().apply_box(inst.pred_boxes.tensor.cpu().numpy())
            boxes.append(torch.as_tensor(back, dtype=torch.float32))
            scores.append(inst.scores.float().cpu())
            classes.append(inst.pred_classes.cpu())
        fused_boxes, fused_scores, fused_classes = weighted_box_fusion(
            torch.cat(boxes), torch.cat(scores), torch.cat(classes), self.num_views, self.fusion_iou)
        keep = slice(0, self.detections_per_image)
        result = Instances((h, w))
        result.pred_boxes = Boxes(fused_boxes[keep])
        result.scores = fused_scores[keep]
        result.pred_classes = fused_classes[keep]
        return {"instances": detector_postprocess(result, inputs.get("height", h), inputs.get("width", w))}

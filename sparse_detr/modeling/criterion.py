"""Set criterion of Sparse DETR: Hungarian-matched focal (or varifocal), L1 and GIoU losses on every prediction set."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou, sigmoid_focal_loss

from .one_to_many import repeat_targets

__all__ = ["SetCriterion", "build_weight_dict", "varifocal_loss", "LOSS_NAMES", "ONE_TO_MANY_SUFFIX",
           "DENOISING_SUFFIX", "CLASS_LOSSES"]

LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")
ONE_TO_MANY_SUFFIX = "_one2many"  # losses of the one-to-many query group (sparse_detr/modeling/one_to_many.py)
DENOISING_SUFFIX = "_dn"  # losses of the denoising query groups (sparse_detr/modeling/denoising.py)
# Classification losses (MODEL.SPARSE_DETR.CLASS_LOSS): "focal" is the official sigmoid focal loss with
# 0/1 targets; "varifocal" trains the matched query's score towards the IoU of its box (IoU-aware scores).
CLASS_LOSSES = ("focal", "varifocal")
VARIFOCAL_ALPHA, VARIFOCAL_GAMMA = 0.75, 2.0  # the VarifocalNet paper's defaults (Zhang et al., CVPR 2021)


def build_weight_dict(cls: float, bbox: float, giou: float, mask_prediction: float,
                      dec_layers: int, two_stage: bool, enc_aux_layers: int,
                      one_to_many_weight: float = 0.0, denoising: bool = False) -> Dict[str, float]:
    """The official loss weights for every loss the criterion and the scoring loss produce.

    Args:
        dec_layers: number of supervised decoder layers (suffixes `_0 .. _{dec_layers-2}` for the
            auxiliary ones; pass 1 when decoder auxiliary losses are off).
        two_stage: add the `_enc` (two-stage proposal) losses.
        enc_aux_layers: number of encoder auxiliary heads (suffixes `_enc_0 ..`); 0 when off.
        one_to_many_weight: > 0 adds the decoder losses of the one-to-many query group (names with
            ONE_TO_MANY_SUFFIX after the decoder suffix), each weighted by this factor times its own weight.
        denoising: add the decoder losses of the denoising groups (names with DENOISING_SUFFIX after the
            decoder suffix), with the same weights as the matching queries' (DN-DETR).
    Returns:
        {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou, "loss_ce_0": cls, ...,
        "loss_mask_prediction": mask_prediction}
    """
    base = dict(zip(LOSS_NAMES, (cls, bbox, giou)))
    decoder_suffixes = [""] + [f"_{i}" for i in range(dec_layers - 1)]
    suffixes = decoder_suffixes + (["_enc"] if two_stage else []) + [f"_enc_{i}" for i in range(enc_aux_layers)]
    weights = {k + s: w for s in suffixes for k, w in base.items()}
    if one_to_many_weight > 0:
        weights.update({k + s + ONE_TO_MANY_SUFFIX: w * one_to_many_weight
                        for s in decoder_suffixes for k, w in base.items()})
    if denoising:
        weights.update({k + s + DENOISING_SUFFIX: w for s in decoder_suffixes for k, w in base.items()})
    weights["loss_mask_prediction"] = mask_prediction
    return weights


def varifocal_loss(logits: torch.Tensor, positive: torch.Tensor, quality: torch.Tensor,
                   alpha: float = VARIFOCAL_ALPHA, gamma: float = VARIFOCAL_GAMMA) -> torch.Tensor:
    """Varifocal loss (VarifocalNet), summed: binary cross-entropy towards `quality` on the positives,
    weighted by that quality, and towards 0 elsewhere, weighted by alpha * p**gamma.

    Args:
        logits: (..., C) class logits.
        positive: (..., C) bool, True at each matched query's ground-truth class.
        quality: (..., C) target score of the positives (the matched box's IoU, no gradient), 0 elsewhere.
    """
    negative_weight = alpha * logits.detach().sigmoid().pow(gamma)
    weight = torch.where(positive, quality, negative_weight)
    return F.binary_cross_entropy_with_logits(logits, quality, weight=weight, reduction="sum")


def _average_num_boxes(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> float:
    """Number of target boxes averaged over processes (all-reduced when distributed), at least 1."""
    num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = comm.get_world_size()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
    return torch.clamp(num_boxes / world_size, min=1).item()


class SetCriterion(nn.Module):
    """Hungarian-matched detection losses (unweighted) for the final, auxiliary and encoder outputs.

    For a prediction set {"pred_logits": (B, Q, C), "pred_boxes": (B, Q, 4) cxcywh}:
    `loss_ce` sigmoid focal loss (no background class; unmatched queries have all-zero targets) or,
    with class_loss="varifocal", the varifocal loss towards each matched box's IoU with its target,
    `loss_bbox` L1 and `loss_giou` 1 - GIoU over matched pairs; all summed and divided by the
    average number of target boxes per process. Every set is matched independently.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, focal_alpha: float = 0.25,
                 enc_class_specific: bool = True, class_loss: str = "focal", enc_aux_repeats: int = 1):
        """
        Args:
            num_classes: C, the number of class logits.
            matcher: callable (outputs, targets) -> list of (pred_idx, tgt_idx).
            focal_alpha: alpha of the focal loss (gamma is 2).
            enc_class_specific: supervise the two-stage proposals ("enc_outputs") with the real
                labels; False supervises class 0 only (the official binary proposal head).
            class_loss: one of CLASS_LOSSES.
            enc_aux_repeats: the encoder auxiliary sets ("aux_outputs_enc") are matched to the ground
                truth repeated this many times, so every object supervises up to that many selected
                tokens (one-to-many, as the hybrid matching of one_to_many.py); their losses are divided
                by the repeats too, so each set keeps its weight. 1: the official one-to-one matching.
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.focal_alpha = focal_alpha
        self.enc_class_specific = enc_class_specific
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"MODEL.SPARSE_DETR.CLASS_LOSS={class_loss!r}; allowed: {list(CLASS_LOSSES)}")
        self.class_loss = class_loss
        if enc_aux_repeats < 1:
            raise ValueError(f"enc_aux_repeats={enc_aux_repeats} must be >= 1 (1: one-to-one matching)")
        self.enc_aux_repeats = enc_aux_repeats

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]],
                indices: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits", "pred_boxes", and optionally "aux_outputs" (list of sets),
                "enc_outputs" (one set), "aux_outputs_enc" (list of sets).
            targets: B dicts with "labels" (n_i,) int64 in [0, C) and "boxes" (n_i, 4) cxcywh in [0, 1].
            indices: per image (query indices, target indices) used for every set instead of matching
                (the denoising queries, whose targets are known).
        Returns:
            unweighted losses: loss_{ce,bbox,giou} with suffixes "", "_{i}", "_enc", "_enc_{i}".
        """
        num_boxes = _average_num_boxes(targets, outputs["pred_logits"].device)
        sets: List[Tuple[str, Dict, List[Dict]]] = [("", outputs, targets)]
        sets += [(f"_{i}", aux, targets) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if outputs.get("enc_outputs") is not None:
            enc_targets = targets if self.enc_class_specific else [
                {**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            sets.append(("_enc", outputs["enc_outputs"], enc_targets))
        losses = {}
        for suffix, preds, tgts in sets:
            losses.update({k + suffix: v for k, v in self.set_losses(preds, tgts, num_boxes, indices).items()})
        enc_aux_targets = repeat_targets(targets, self.enc_aux_repeats) if self.enc_aux_repeats > 1 else targets
        for i, aux in enumerate(outputs.get("aux_outputs_enc", [])):
            aux_losses = self.set_losses(aux, enc_aux_targets, num_boxes * self.enc_aux_repeats, indices)
            losses.update({f"{k}_enc_{i}": v for k, v in aux_losses.items()})
        return losses

    def set_losses(self, preds: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                   num_boxes: float, indices: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
                   ) -> Dict[str, torch.Tensor]:
        """Losses of one prediction set; matches it first unless `indices` are given."""
        if indices is None:
            indices = self.matcher(preds, targets)
        logits, boxes = preds["pred_logits"].float(), preds["pred_boxes"].float()  # fp32 under AMP
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([src for src, _ in indices]).to(device)
        matched_labels = torch.cat([t["labels"][j.to(t["labels"].device)]
                                    for t, (_, j) in zip(targets, indices)]).to(device)
        matched_tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)]
                                       for t, (_, j) in zip(targets, indices)])

        src_boxes = boxes[batch_idx, query_idx]
        tgt_boxes = matched_tgt_boxes.to(src_boxes)
        src_xyxy, tgt_xyxy = box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        loss_bbox = (src_boxes - tgt_boxes).abs().sum() / num_boxes
        loss_giou = (1 - torch.diag(generalized_box_iou(src_xyxy, tgt_xyxy))).sum() / num_boxes

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, matched_labels] = 1
        if self.class_loss == "focal":
            loss_ce = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=2.0, reduction="sum")
        else:
            quality = torch.zeros_like(logits)
            quality[batch_idx, query_idx, matched_labels] = torch.diag(box_iou(src_xyxy, tgt_xyxy)).detach()
            loss_ce = varifocal_loss(logits, onehot.bool(), quality)
        return {"loss_ce": loss_ce / num_boxes, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

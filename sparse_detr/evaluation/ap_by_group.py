"""COCO box AP and AP50 over groups of images (e.g. the photographs a tiled dataset was cut from).

One COCO number over a whole validation split can hide that a model does well on some sources and
fails on another (the DeepForest split holds a site absent from training); this breaks the number down.
pycocotools' own `COCOeval` runs once per group, restricted to that group's images
(`params.imgIds`), so each group's numbers are exactly what COCOEvaluator would report for it alone.
"""
import contextlib
import io
import json
from collections import defaultdict
from typing import Callable, Dict

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["coco_ap_by_group"]


def coco_ap_by_group(gt_json: str, results_json: str, group_of: Callable[[str], str]) -> Dict[str, Dict]:
    """AP and AP50 (in %, as COCOEvaluator prints them) of the detections in `results_json` (COCO results
    format, e.g. COCOEvaluator's `coco_instances_results.json`) against `gt_json`, for each group of
    images; `group_of(file_name)` names an image's group.

    Returns {group: {"images": n, "boxes": n ground-truth boxes, "AP": float, "AP50": float}}, groups in
    order of first appearance; a group without any detection gets AP = AP50 = 0.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(gt_json)
        gt.dataset.setdefault("info", {})  # loadRes copies it; COCO files may lack it
        with open(results_json) as f:
            results = json.load(f)
        detections = gt.loadRes(results) if results else None
    image_ids = defaultdict(list)
    for image_id in sorted(gt.getImgIds()):
        image_ids[group_of(gt.imgs[image_id]["file_name"])].append(image_id)
    out = {}
    for group, ids in image_ids.items():
        ap = ap50 = 0.0
        if detections is not None and any(detections.getAnnIds(imgIds=ids)):
            with contextlib.redirect_stdout(io.StringIO()):
                evaluation = COCOeval(gt, detections, "bbox")
                evaluation.params.imgIds = ids
                evaluation.evaluate()
                evaluation.accumulate()
                evaluation.summarize()
            ap, ap50 = (100 * max(float(v), 0.0) for v in evaluation.stats[:2])  # -1: no ground truth
        out[group] = {"images": len(ids), "boxes": len(gt.getAnnIds(imgIds=ids)), "AP": ap, "AP50": ap50}
    return out

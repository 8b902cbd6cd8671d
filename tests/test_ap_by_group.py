"""`coco_ap_by_group`: COCO AP / AP50 broken down by groups of images."""
import json

import pytest

from sparse_detr.evaluation import coco_ap_by_group


def _write(tmp_path, detections):
    images = [{"id": i, "file_name": f"{group}_{i}.png", "width": 100, "height": 100}
              for i, group in enumerate(["a", "a", "b", "c"], start=1)]
    boxes = {1: [10, 10, 30, 30], 2: [50, 50, 20, 40], 3: [5, 5, 40, 40], 4: [60, 10, 30, 30]}  # XYWH
    gt = {"images": images, "categories": [{"id": 1, "name": "tree"}],
          "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                          for i, b in boxes.items()]}
    gt_path, results_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    results_path.write_text(json.dumps(detections(boxes)))
    return str(gt_path), str(results_path)


def _group(file_name):
    return file_name.split("_")[0]


def test_each_group_is_scored_on_its_own_images(tmp_path):
    """Group a: exact boxes (AP50 100); b: a box shifted to IoU 0.33 (AP50 0); c: no detection at all."""
    def detections(boxes):
        exact = [{"image_id": i, "category_id": 1, "bbox": boxes[i], "score": 0.9} for i in (1, 2)]
        x, y, w, h = boxes[3]
        return exact + [{"image_id": 3, "category_id": 1, "bbox": [x + w / 2, y, w, h], "score": 0.8}]

    out = coco_ap_by_group(*_write(tmp_path, detections), _group)
    assert list(out) == ["a", "b", "c"]
    assert out["a"]["images"] == 2 and out["a"]["boxes"] == 2
    assert out["a"]["AP50"] == pytest.approx(100.0) and out["a"]["AP"] == pytest.approx(100.0)
    assert out["b"]["AP50"] == 0.0 and out["c"] == {"images": 1, "boxes": 1, "AP": 0.0, "AP50": 0.0}


def test_one_group_gives_the_whole_split_number(tmp_path):
    """Every image in one group: the same AP50 as pycocotools over the whole split (2 of 4 found: 50)."""
    def detections(boxes):
        return [{"image_id": i, "category_id": 1, "bbox": boxes[i], "score": s} for i, s in ((1, 0.9), (4, 0.3))]

    out = coco_ap_by_group(*_write(tmp_path, detections), lambda name: "all")
    assert out["all"]["images"] == 4 and out["all"]["boxes"] == 4
    assert out["all"]["AP50"] == pytest.approx(50.0, abs=0.5)
    empty = coco_ap_by_group(*_write(tmp_path, lambda boxes: []), lambda name: "all")
    assert empty["all"]["AP50"] == 0.0

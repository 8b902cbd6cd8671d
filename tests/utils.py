"""Tiny Sparse DETR configs and inputs for CPU tests (not a test module; reusable by other test files)."""
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from sparse_detr import add_sparse_detr_config

BASE_CONFIG = "configs/Base-SparseDETR.yaml"


def tiny_cfg(**sparse_detr_overrides):
    """Base config shrunk for CPU tests: R-18 (64-channel res2), hidden 32, 2 heads, 2 points, FFN 64,
    2 encoder + 2 decoder layers, 10 queries, 5 classes, no dropout, rho 0.3, 20 detections.
    Keyword arguments override MODEL.SPARSE_DETR keys (e.g. RHO=0.0)."""
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file(BASE_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    sd = cfg.MODEL.SPARSE_DETR
    sd.NUM_CLASSES = 5
    sd.HIDDEN_DIM = 32
    sd.NHEADS = 2
    sd.DIM_FEEDFORWARD = 64
    sd.ENC_LAYERS = 2
    sd.DEC_LAYERS = 2
    sd.ENC_N_POINTS = 2
    sd.DEC_N_POINTS = 2
    sd.NUM_QUERIES = 10
    sd.DROPOUT = 0.0
    sd.RHO = 0.3
    for key, value in sparse_detr_overrides.items():
        setattr(sd, key, value)
    return cfg


def make_inputs(sizes=((64, 96),), num_boxes=2, seed=0, num_classes=5):
    """Random 0..255 RGB images of the given (h, w) sizes with `num_boxes` random boxes each."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for h, w in sizes:
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        inst = Instances((h, w))
        xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(num_boxes, 2, generator=g) * 0.3 + 0.1) * torch.tensor([w, h])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
        inputs.append({"image": image, "instances": inst, "height": h, "width": w})
    return inputs

#!/usr/bin/env python
"""Peak resident memory of Sparse DETR training steps on CPU (forward, backward, optimizer step).

    python projects/SparseDETR/measure_memory.py
    python projects/SparseDETR/measure_memory.py --config-file configs/COCO-Detection/sparse_detr_R_50_rho_0.3.yaml \
        --size 800 1216 --batch-size 2 --steps 3 --threads 2

Builds the config's model with random weights (MODEL.WEIGHTS is ignored: the memory does not depend on
the values), the official optimizer (AdamW groups, full-model gradient clipping), and runs --steps
training steps on random images of --size with 10 random boxes each (from the second step on, the
optimizer's moments exist during the forward and backward: the steady state of training). Prints the
process's resident memory (VmRSS) after building and its peak (VmHWM, from /proc/self/status) after each
step: the peak is what the machine must hold. Linux only.
"""
import argparse
import re
import time

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import sparse_detr  # noqa: F401  (registers the SparseDETR meta-architecture)
from sparse_detr import add_sparse_detr_config
from sparse_detr.engine import build_sparse_detr_optimizer

DEFAULT_CONFIG = "configs/COCO-Detection/sparse_detr_R_50_rho_0.1.yaml"


def memory_mib(field: str) -> float:
    """`field` of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def random_training_batch(batch_size: int, size, num_boxes: int = 10, seed: int = 0):
    """Detectron2 training inputs: random uint8 RGB images of `size` (h, w) with random boxes and classes."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    inputs = []
    for _ in range(batch_size):
        inst = Instances((h, w))
        xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (torch.rand(num_boxes, 2, generator=g) * 0.25 + 0.05) * torch.tensor([w, h])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, 80, (num_boxes,), generator=g)
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        inputs.append({"image": image, "instances": inst, "height": h, "width": w})
    return inputs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="the 2nd step is the steady state (AdamW moments exist)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *args.opts])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_sparse_detr_optimizer(cfg, model)
    inputs = random_training_batch(args.batch_size, args.size)
    built = memory_mib("VmRSS")
    print(f"{args.config_file}: RHO {cfg.MODEL.SPARSE_DETR.RHO}, {args.batch_size} x {args.size[0]}x{args.size[1]}, "
          f"{torch.get_num_threads()} threads; resident after building: {built:.0f} MiB", flush=True)
    for step in range(args.steps):
        start = time.perf_counter()
        with EventStorage():
            losses = model(inputs)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        print(f"step {step}: total loss {total.item():.3f}, {time.perf_counter() - start:.1f} s, "
              f"peak resident so far {memory_mib('VmHWM'):.0f} MiB", flush=True)
    peak = memory_mib("VmHWM")
    print(f"peak resident memory (VmHWM): {peak:.0f} MiB ({peak / 1024:.2f} GiB); the steps added "
          f"{peak - built:.0f} MiB to the {built:.0f} MiB after building")
    return peak


if __name__ == "__main__":
    main()

"""Model-level GPU checks (needs Detectron2; run by tests/gpu/run_gpu_checks.sh after the op checks).

    python tests/gpu/model_checks.py --output model_checks.md
    python tests/gpu/model_checks.py --device cpu --train-iters 2 --rho 0.1 --steps 1 --warmup 0   # dry run

1. `train_net.main` on a tiny synthetic dataset with MODEL.DEVICE cuda and SOLVER.AMP.ENABLED (float16 with
   Detectron2's AMPTrainer and GradScaler): trains, checkpoints, evaluates with COCOEvaluator; then
   `DefaultPredictor` on CUDA with the trained weights.
2. Full-size training steps (R-50, the COCO configs, 2 images of 800x1066 per step, float16 autocast with a
   GradScaler): seconds per step and peak memory for the dense baseline and each rho, finite losses and
   gradients.
Writes a markdown report; exits non-zero if a check fails.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR"))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import DefaultPredictor, default_argument_parser  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import train_net  # noqa: E402
from sparse_detr import add_sparse_detr_config  # noqa: E402
from synthetic import register_synthetic, tiny_opts  # noqa: E402

COCO_CONFIG = os.path.join(ROOT, "configs", "COCO-Detection", "sparse_detr_R_50_rho_0.1.yaml")


def check_train_net_amp(report, device: str, iters: int):
    """train_net.main with AMP on `device`, then DefaultPredictor with the trained weights."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "data"), os.path.join(tmp, "out")
        register_synthetic("gpu_synthetic", data, num_images=16)
        opts = tiny_opts("gpu_synthetic", "gpu_synthetic", out, iters,
                         ["MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", "True", "SOLVER.CHECKPOINT_PERIOD", "1000"])
        args = default_argument_parser().parse_args(
            ["--config-file", os.path.join(ROOT, "configs", "Base-SparseDETR.yaml"), *opts])
        start = time.perf_counter()
        train_net.main(args)
        seconds = time.perf_counter() - start
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = [json.loads(line) for line in f]
        bbox = {k[len("bbox/"):]: v for k, v in metrics[-1].items() if k.startswith("bbox/")}
        assert bbox, f"no evaluation in {out}/metrics.json"
        assert np.isfinite(bbox["AP"]) and np.isfinite(bbox["AP50"]), bbox
        assert os.path.exists(os.path.join(out, "model_final.pth"))
        cfg = train_net.setup(args)
        cfg.defrost()
        cfg.MODEL.WEIGHTS = os.path.join(out, "model_final.pth")
        predictor = DefaultPredictor(cfg)
        image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
        instances = predictor(image)["instances"]
        assert instances.pred_boxes.tensor.device.type == device and len(instances) > 0
        report.append(f"- train_net.py, tiny model, MODEL.DEVICE {device} + SOLVER.AMP.ENABLED: {iters} iterations, "
                      f"checkpoint and COCOEvaluator in {seconds:.1f} s (AP {bbox['AP']:.1f}, AP50 "
                      f"{bbox['AP50']:.1f} on 16 synthetic images); DefaultPredictor on {device}: "
                      f"{len(instances)} detections")


def _training_batch(images: int, height: int, width: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(images):
        n = 12
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
        wh = 16 + torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.2, height * 0.2])
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 80, (n,), generator=generator)
        image = torch.randint(0, 255, (3, height, width), dtype=torch.uint8, generator=generator)
        batch.append({"image": image, "instances": instances, "height": height, "width": width})
    return batch


def _synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_training_steps(report, device: str, rhos, steps: int, warmup: int):
    """Seconds per full-size training step (forward, backward, optimizer) under autocast (float16 with a
    GradScaler on CUDA, bfloat16 on CPU)."""
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    report += ["", f"## Full-size training steps on {device} (R-50, 2 images of 800x1066 per step, {dtype} "
               f"autocast, AdamW, clipping 0.1; median of {steps} after {warmup} warm-up)", "",
               "| rho | s / step | images / s | peak memory (GiB) | loss |", "| --- | --- | --- | --- | --- |"]
    for rho in rhos:
        cfg = get_cfg()
        add_sparse_detr_config(cfg)
        cfg.merge_from_file(COCO_CONFIG)
        cfg.merge_from_list(["MODEL.DEVICE", device, "MODEL.SPARSE_DETR.RHO", str(rho)])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        scaler = torch.amp.GradScaler(device, enabled=device == "cuda")
        batch = _training_batch(2, 800, 1066, seed=0)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        with EventStorage(0):  # the model logs its token statistics there
            for step in range(warmup + steps):
                _synchronize(device)
                start = time.perf_counter()
                with torch.autocast(device, dtype=dtype):
                    losses = model(batch)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                scaler.step(optimizer)
                scaler.update()
                _synchronize(device)
                if step >= warmup:
                    times.append(time.perf_counter() - start)
        assert torch.isfinite(loss), f"rho {rho}: loss {loss}"
        assert torch.isfinite(norm) or scaler.get_scale() < 65536.0, f"rho {rho}: gradient norm {norm}"
        median = float(np.median(times))
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
        name = "0.0 (dense Top-k & BBR)" if rho == 0 else f"{rho}"
        report.append(f"| {name} | {median:.3f} | {2 / median:.1f} | {peak:.1f} | {loss.item():.2f} |")
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="model_checks.md")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--train-iters", type=int, default=30)
    parser.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU visible")
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    report = [f"# Model checks on {name} (torch {torch.__version__})", ""]
    failed = False
    for check in (lambda: check_train_net_amp(report, args.device, args.train_iters),
                  lambda: time_training_steps(report, args.device, args.rho, args.steps, args.warmup)):
        try:
            check()
        except Exception as error:  # report every check, then fail
            failed = True
            report.append(f"- FAILED: {type(error).__name__}: {error}")
            traceback.print_exc()
    with open(args.output, "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n".join(report))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

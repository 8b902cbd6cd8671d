#!/usr/bin/env python
"""Dynamic sparsification: evaluate one trained Sparse DETR at several inference keep ratios (no retraining).

    python projects/SparseDETR/sweep_rho.py --config-file configs/DeepForest/sparse_detr_R_50_rho_0.1_cpu.yaml \
        --rhos 0.05 0.1 0.2 0.3 0.5 --output-dir output/sweep_rho MODEL.WEIGHTS output/.../model_final.pth

For every rho the model built from the config and MODEL.WEIGHTS runs the first test dataset
(cfg.DATASETS.TEST[0], the trainer's test loader) at inference rho = that value (what
MODEL.SPARSE_DETR.TEST_RHO sets; 0 runs the dense encoder) and is evaluated with COCOEvaluator and
DAMCorrelationEvaluator (the share of the decoder cross-attention mass on the selected tokens).
Latency: median wall time per image of the model's inference forward (data loading and evaluation
excluded), after --warmup images, on MODEL.DEVICE with --threads threads on CPU.

Writes sweep_rho.md (table: rho, AP, AP50, DAM correlation, latency), sweep_rho.json and sweep_rho.png
(AP and AP50, and latency, against rho) to --output-dir, and prints the table.
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Dict, List, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from torch import nn

import sparse_detr.data  # noqa: F401  (registers the project's datasets)
from sparse_detr import add_sparse_detr_config
from sparse_detr.engine import Trainer
from sparse_detr.evaluation import DAMCorrelationEvaluator

__all__ = ["TimedModel", "sweep", "markdown_table", "plot_sweep", "main"]

CORR_ALL = "corr_mask_attn_map_dec_all"


class TimedModel(nn.Module):
    """Wraps a model; records the wall time per image of every forward (synchronising CUDA)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.seconds_per_image: List[float] = []

    def forward(self, batched_inputs):
        cuda = self.model.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = self.model(batched_inputs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds_per_image.append((time.perf_counter() - start) / len(batched_inputs))
        return outputs


def sweep(cfg, model: nn.Module, rhos: Sequence[float], warmup: int = 1, log=print) -> List[Dict]:
    """Evaluate `model` (weights loaded) on cfg.DATASETS.TEST[0] at each inference rho.

    Returns one row per rho: "rho", "AP", "AP50" (COCO bbox, percent), "corr" (the evaluator's
    {name: fraction}; empty at rho 0), "latency_ms" (median per image after `warmup` images), "images".
    The model is left at its configured inference rho.
    """
    dataset = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, dataset)
    configured = model.test_rho
    rows = []
    try:
        for rho in rhos:
            model.test_rho = rho
            timed = TimedModel(model)
            evaluator = DatasetEvaluators([COCOEvaluator(dataset, output_dir=None), DAMCorrelationEvaluator()])
            results = inference_on_dataset(timed, loader, evaluator)
            times = timed.seconds_per_image[warmup:] or timed.seconds_per_image
            bbox = results.get("bbox", {})
            rows.append({"rho": rho, "AP": bbox.get("AP"), "AP50": bbox.get("AP50"),
                         "corr": results.get(DAMCorrelationEvaluator.KEY, {}),
                         "latency_ms": 1e3 * statistics.median(times), "images": len(timed.seconds_per_image)})
            log(f"[sweep_rho] rho {rho:g}: AP {_fmt(rows[-1]['AP'])}  AP50 {_fmt(rows[-1]['AP50'])}  "
                f"corr {_fmt(rows[-1]['corr'].get(CORR_ALL), 3)}  {rows[-1]['latency_ms']:.0f} ms/image")
    finally:
        model.test_rho = configured
    return rows


def _fmt(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown_table(rows: List[Dict]) -> str:
    """rho | AP | AP50 | DAM correlation (overall, per level) | latency (ms / image)."""
    levels = sorted({k for r in rows for k in r["corr"] if k != CORR_ALL})
    head = ["inference rho", "AP", "AP50", "DAM corr"] + [f"corr L{k.rsplit('_', 1)[1]}" for k in levels]
    head += ["latency (ms / image)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ["0 (dense)" if r["rho"] == 0 else f"{r['rho']:g}", _fmt(r["AP"]), _fmt(r["AP50"])]
        cells += [_fmt(r["corr"].get(k), 3) for k in [CORR_ALL] + levels]
        cells.append(f"{r['latency_ms']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: List[Dict], path: str, title: str = "") -> None:
    """PNG: AP and AP50 (left) and latency per image (right) against the inference rho."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rhos = [r["rho"] for r in rows]
    nan = float("nan")
    fig, (ax_ap, ax_lat) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("AP", "o-"), ("AP50", "s--")):
        ax_ap.plot(rhos, [nan if r[key] is None else r[key] for r in rows], style, label=key)
    ax_ap.set_ylabel("COCO bbox AP (%)")
    ax_ap.legend()
    ax_lat.plot(rhos, [r["latency_ms"] for r in rows], "o-", color="tab:red")
    ax_lat.set_ylabel("latency (ms / image)")
    for ax in (ax_ap, ax_lat):
        ax.set_xlabel("inference rho (0 = dense encoder)")
        ax.set_xticks(rhos)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup_cfg(config_file: str, opts: Sequence[str]):
    """Config file + overrides, with the DAM correlation reported at inference."""
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.SPARSE_DETR.TEST_DAM_CORRELATION = True
    cfg.freeze()
    return cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5],
                   help="inference keep ratios in [0, 1] (0: dense encoder)")
    p.add_argument("--output-dir", default="output/sweep_rho")
    p.add_argument("--warmup", type=int, default=1, help="images left out of the latency median")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (MODEL.WEIGHTS)")
    args = p.parse_args(argv)
    bad = [r for r in args.rhos if not 0 <= r <= 1]
    if bad:
        p.error(f"--rhos must be in [0, 1]; got {bad}")
    return args


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logger(name="detectron2", abbrev_name="d2")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    cfg = setup_cfg(args.config_file, args.opts)
    if cfg.MODEL.SPARSE_DETR.RHO == 0 and any(r > 0 for r in args.rhos):
        raise SystemExit("the model has no scoring network (MODEL.SPARSE_DETR.RHO 0): only --rhos 0 is possible")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    rows = sweep(cfg, model, args.rhos, args.warmup)
    os.makedirs(args.output_dir, exist_ok=True)
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None else str(argv)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    device = cfg.MODEL.DEVICE + (f", {torch.get_num_threads()} threads, load average {load}"
                                 if cfg.MODEL.DEVICE == "cpu" else "")
    notes = [f"`{command}`", "",
             f"{os.path.basename(args.config_file)}, weights {cfg.MODEL.WEIGHTS}, trained at rho "
             f"{cfg.MODEL.SPARSE_DETR.RHO:g} (SELECTION {cfg.MODEL.SPARSE_DETR.SELECTION}); "
             f"{cfg.DATASETS.TEST[0]}, {rows[0]['images']} images; latency: median per image after "
             f"{args.warmup} warm-up, {device}."]
    report = "\n".join(notes) + "\n\n" + markdown_table(rows) + "\n"
    with open(os.path.join(args.output_dir, "sweep_rho.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "sweep_rho.json"), "w") as f:
        json.dump({"command": command, "device": device, "rows": rows}, f, indent=1)
    plot_sweep(rows, os.path.join(args.output_dir, "sweep_rho.png"),
               f"{os.path.basename(args.config_file)} ({cfg.MODEL.SPARSE_DETR.SELECTION}, trained at rho "
               f"{cfg.MODEL.SPARSE_DETR.RHO:g}), {cfg.DATASETS.TEST[0]}, {cfg.MODEL.DEVICE}")
    print("\n" + report)
    return rows


if __name__ == "__main__":
    main()

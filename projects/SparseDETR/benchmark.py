#!/usr/bin/env python
"""Sparse DETR against its dense baseline: parameters, GFLOPs, per-stage split, latency and peak memory vs rho.

    python projects/SparseDETR/benchmark.py --config-file configs/COCO-Detection/sparse_detr_R_50_rho_0.1.yaml
    python projects/SparseDETR/benchmark.py --config-file ... --rho 0.0 0.1 --skip-flops --profile
    python projects/SparseDETR/benchmark.py --config-file ... --device cuda --batch-size 1 4
    python projects/SparseDETR/benchmark.py --config-file ... --skip-latency --as-official

Every rho is the config with MODEL.SPARSE_DETR.RHO = rho (TEST_RHO = RHO); rho 0 is the dense baseline
(dense encoder, no scoring network, no encoder auxiliary loss: the paper's "Top-k & BBR" row when the
config is two-stage with box refinement). Models have random weights. For each rho:

* parameters: all, and the paper's count (trainable ones, as the official code counts, without the
  encoder auxiliary heads, which only training uses);
* GFLOPs with fvcore on one random 3 x 850 x 1040 image, the official method: model in eval mode,
  the attention op through its `grid_sample` reference path (SPARSE_DETR_MSDA=reference), one
  multiply-add = one FLOP, conv / linear / matmul / norm / upsample / grid_sampler (4 per output) counted,
  elementwise ops not; plus the per-stage split (backbone, input_proj, scoring, encoder, decoder, heads);
* latency: median of --iters forwards (after --warmup) of --batch-size random uint8 images of --image
  size through the model's normal inference forward, under torch.inference_mode(), the models timed
  in turn (round-robin) so that a changing machine load weighs on all alike; CPU with --threads
  threads (the process CPU time per forward too), CUDA with torch.cuda.synchronize() around every
  forward; the backbone's frozen batch norms folded into its convolutions (--no-fold-batchnorm keeps
  them) and, on CPU, float32 linears through oneDNN (MODEL.SPARSE_DETR.CPU_ONEDNN_LINEAR, default on;
  pass `MODEL.SPARSE_DETR.CPU_ONEDNN_LINEAR False` to time PyTorch's MKL path) and the backbone's stages
  on oneDNN tensors (MODEL.SPARSE_DETR.CPU_ONEDNN_STAGES, default on; `False` times the plain tensors);
* peak memory during the warm-up forwards over the process with the models loaded: peak RSS (VmHWM,
  reset through /proc/self/clear_refs) on CPU, torch.cuda.max_memory_allocated on CUDA.

Writes benchmark.md (table), benchmark.json (rows), benchmark.png (GFLOPs and latency vs rho, paper AP
annotated) and, with --profile, profile_rho<rho>.txt (torch.profiler) to --output-dir.
"""
import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

import sparse_detr
from sparse_detr import add_sparse_detr_config
from sparse_detr.engine import cpu_has_native_bfloat16
from sparse_detr.layers.fold_batchnorm import fold_frozen_batchnorm

__all__ = ["config_for_rho", "paper_row", "count_parameters", "count_flops", "random_batch", "measure_latency",
           "autocast_dtype", "cache_freed_memory", "profile_forward", "run_benchmark", "markdown_table",
           "plot_results", "main"]

FLOPS_IMAGE = (850, 1040)  # the official benchmark image ("found heuristically" to approximate COCO val)
STAGES = ("backbone", "input_proj", "scoring", "encoder", "decoder", "heads")

# README of the official code (Table 1 of the paper): AP on COCO val2017, #params (M), GFLOPs at 850x1040,
# FPS at batch 4 on a V100. Keys: (backbone, two-stage with box refinement, rho); rho 0 is the dense model.
PAPER = {
    ("R-50", False, 0.0): {"ap": 43.9, "params": 39.8, "gflops": 172.9, "b4fps": 19.1},
    ("R-50", True, 0.0): {"ap": 46.0, "params": 40.8, "gflops": 177.3, "b4fps": 18.2},
    ("R-50", True, 0.1): {"ap": 45.3, "params": 40.9, "gflops": 105.4, "b4fps": 26.5},
    ("R-50", True, 0.2): {"ap": 45.6, "params": 40.9, "gflops": 112.9, "b4fps": 24.8},
    ("R-50", True, 0.3): {"ap": 46.0, "params": 40.9, "gflops": 120.5, "b4fps": 23.2},
    ("R-50", True, 0.4): {"ap": 46.2, "params": 40.9, "gflops": 128.0, "b4fps": 21.8},
    ("R-50", True, 0.5): {"ap": 46.3, "params": 40.9, "gflops": 135.6, "b4fps": 20.5},
    ("Swin-T", False, 0.0): {"ap": 45.7, "params": 40.3, "gflops": 180.4, "b4fps": 15.9},
    ("Swin-T", True, 0.0): {"ap": 48.0, "params": 41.3, "gflops": 184.8, "b4fps": 15.4},
    ("Swin-T", True, 0.1): {"ap": 48.2, "params": 41.4, "gflops": 113.4, "b4fps": 21.2},
    ("Swin-T", True, 0.2): {"ap": 48.8, "params": 41.4, "gflops": 121.0, "b4fps": 20.0},
    ("Swin-T", True, 0.3): {"ap": 49.1, "params": 41.4, "gflops": 128.5, "b4fps": 18.9},
    ("Swin-T", True, 0.4): {"ap": 49.2, "params": 41.4, "gflops": 136.1, "b4fps": 18.0},
    ("Swin-T", True, 0.5): {"ap": 49.3, "params": 41.4, "gflops": 143.7, "b4fps": 17.2},
}


# ---------------------------------------------------------------------------------------------- configs
def config_for_rho(cfg, rho: float, as_official: bool = False):
    """A frozen copy of `cfg` for keep ratio `rho` (TEST_RHO = RHO, random weights, no checkpoint).

    rho 0 also turns the encoder auxiliary loss off (the dense baseline has none). `as_official` gives
    the model the official code runs: 91 classes and encoder auxiliary heads executed at inference.
    """
    cfg = cfg.clone()
    cfg.defrost()
    sd = cfg.MODEL.SPARSE_DETR
    sd.RHO = float(rho)
    sd.TEST_RHO = -1.0
    if rho == 0:
        sd.USE_ENC_AUX_LOSS = False
    if as_official:
        sd.NUM_CLASSES = 91
        sd.ENC_AUX_HEADS_AT_INFERENCE = True
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def paper_row(cfg, rho: float) -> Optional[Dict[str, float]]:
    """The paper's row for this backbone, query scheme and rho, or None."""
    if cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone" and cfg.MODEL.RESNETS.DEPTH == 50:
        backbone = "R-50"
    elif (cfg.MODEL.BACKBONE.NAME == "build_sparse_detr_swin_backbone" and cfg.MODEL.SWIN.EMBED_DIM == 96
          and list(cfg.MODEL.SWIN.DEPTHS) == [2, 2, 6, 2]):
        backbone = "Swin-T"
    else:
        return None
    sd = cfg.MODEL.SPARSE_DETR
    two_stage_bbr = sd.TWO_STAGE and sd.WITH_BOX_REFINE
    return PAPER.get((backbone, two_stage_bbr, round(float(rho), 2)))


# ---------------------------------------------------------------------------------------------- parameters
def count_parameters(model: nn.Module) -> Dict[str, int]:
    """"params_all": every parameter; "params_paper": trainable ones without the encoder auxiliary heads
    (the official README's #Params: the official code counts requires_grad parameters, frozen stem and
    res2 excluded, and the README leaves out the training-only encoder auxiliary heads)."""
    aux = {id(p) for heads in model.encoder_aux_heads() for head in heads for p in head.parameters()}
    params = list(model.parameters())
    return {"params_all": sum(p.numel() for p in params),
            "params_paper": sum(p.numel() for p in params if p.requires_grad and id(p) not in aux)}


# ---------------------------------------------------------------------------------------------- FLOPs
def _sdpa_flop(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention (the decoder self-attention on torch 2): q k^T and attn v as
    fvcore counts the official code's two bmm calls. q (B, H, L, E), k (B, H, S, E), v (B, H, S, Ev)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _flop_handles() -> Dict:
    """fvcore's default handles minus aten::batch_norm, plus scaled_dot_product_attention.

    Only frozen batch norms exist in these models; the official FrozenBatchNorm2d is an elementwise
    x * scale + bias, which fvcore does not count, while Detectron2's calls F.batch_norm without grad.
    """
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS

    handles = {k: v for k, v in _DEFAULT_SUPPORTED_OPS.items() if k != "aten::batch_norm"}
    handles["aten::scaled_dot_product_attention"] = _sdpa_flop
    return handles


@contextlib.contextmanager
def _reference_attention() -> Iterator[None]:
    """Force the attention op's grid_sample reference path (read at call time) inside the block."""
    old = os.environ.get("SPARSE_DETR_MSDA")
    os.environ["SPARSE_DETR_MSDA"] = "reference"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SPARSE_DETR_MSDA"]
        else:
            os.environ["SPARSE_DETR_MSDA"] = old


def _tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor in nested dicts / lists / tuples."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class _InferenceGraph(nn.Module):
    """`SparseDETR.forward` in inference on one uint8 (3, H, W) image, as a traceable module: the same
    preprocessing and `run` (encoder auxiliary heads only if the model runs them at inference), returning
    every output tensor, so tracing keeps every head the model computes (the official count does the
    same). Detection post-processing (sigmoid, top-k, gather: no counted FLOPs) is left out. With
    `official`, every decoder layer's class and box heads run, as in the official inference.

    The model's own forward cannot be traced: under tracing ImageList.from_tensors gives image sizes as
    tensors, which `pre_transformer`'s `torch.as_tensor(images.image_sizes)` rejects.
    """

    def __init__(self, model: nn.Module, official: bool = False):
        super().__init__()
        self.model = model
        self.official = official

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        m = self.model
        images = m.preprocess_image([{"image": image}])
        images = ImageList(images.tensor, [(int(h), int(w)) for h, w in images.image_sizes])
        out = m.run(images, m.current_rho(), with_enc_aux=m.enc_aux_heads_at_inference, raw=self.official)
        return tuple(_tensors(out))


def count_flops(model: nn.Module, image_size: Tuple[int, int] = FLOPS_IMAGE, official: bool = False
                ) -> Dict[str, float]:
    """FLOPs of one inference forward on a random image of `image_size` (h, w), official method.

    Returns "flops" (total) and "flops_<stage>" for STAGES, split by fvcore's module scopes (a module's
    FLOPs include the modules it calls): backbone; input_proj; scoring = the scoring network and, with
    rho > 0, its pass of the shared enc_output(+_norm) projection over all tokens; encoder (with the
    encoder auxiliary heads when they run); decoder (with the box-refinement heads it calls); heads = the
    rest: two-stage proposal head over all tokens, query embedding, the class/box heads of the last
    decoder layer (of every layer with `official`).
    """
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *image_size), dtype=torch.uint8, generator=g).to(model.device)
    analysis = FlopCountAnalysis(_InferenceGraph(model, official), (image,))
    analysis.clear_op_handles().set_op_handle(**_flop_handles())
    analysis.ancestor_mode("caller")
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with _reference_attention(), torch.no_grad():
        by_module = analysis.by_module()
    flops = {"flops": analysis.total()}

    def scope(name):
        return by_module.get("model." + name, 0)

    transformer = model.transformer
    rho = model.current_rho()
    projection = scope("transformer.enc_output") + scope("transformer.enc_output_norm")
    passes = int(rho > 0) + int(transformer.two_stage)  # identical (B, N, C) passes: scoring, proposals
    flops["flops_backbone"] = scope("backbone")
    flops["flops_input_proj"] = sum(scope(f"input_proj.{i}") for i in range(len(model.input_proj)))
    flops["flops_scoring"] = scope("transformer.enc_mask_predictor") + (projection / passes if rho > 0 else 0)
    flops["flops_encoder"] = scope("transformer.encoder")
    flops["flops_decoder"] = scope("transformer.decoder")
    flops["flops_heads"] = flops["flops"] - sum(flops[f"flops_{s}"] for s in STAGES[:-1])
    return flops


# ---------------------------------------------------------------------------------------------- latency
def random_batch(batch_size: int, image_size: Tuple[int, int], seed: int = 0) -> List[Dict]:
    """Detectron2 inputs: `batch_size` random uint8 RGB (3, h, w) images with their height/width."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    return [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), "height": h, "width": w}
            for _ in range(batch_size)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter of `device`; returns the current usage in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS is the live memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    return _rss_kib("VmRSS") * 1024


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _rss_kib("VmHWM") * 1024


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The reduced precision of `--amp`: bfloat16 on CPU (native on AVX512-BF16/AMX CPUs), float16 on CUDA."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def measure_latency(models: Sequence[nn.Module], inputs: List[Dict], warmup: int = 1, iters: int = 5,
                    amp: bool = False) -> List[Dict[str, float]]:
    """Time inference forwards of `inputs` through each of `models`, interleaved: after `warmup`
    forwards of each model, `iters` rounds that run every model once, so that a machine load that
    changes during the run weighs on all models alike. With `amp`, forwards run under autocast to
    `autocast_dtype(device)`.

    Returns per model: "latency_s" (median wall time), "min_s", "times_s" (all), "fps" (images per
    second at the median), "cpu_s" (median CPU time of the process per forward, all threads, kernel
    time included: on a shared machine the wall time also counts waiting for a core, CPU time does
    not) and "peak_mem_mib": peak memory during the model's warm-up above the usage before it.
    """
    if warmup < 1:
        raise ValueError("warmup must be >= 1 (peak memory is measured on the warm-up forwards)")
    device = models[0].device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    stats = [{"times_s": [], "cpu_times_s": []} for _ in models]
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype(device), enabled=amp):
        for st, model in zip(stats, models):
            base = _reset_peak(device)
            for _ in range(warmup):
                model(inputs)
            sync()
            st["peak_mem_mib"] = (_peak(device) - base) / 2 ** 20
        for _ in range(iters):
            for st, model in zip(stats, models):
                sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                model(inputs)
                sync()
                st["times_s"].append(time.perf_counter() - start)
                st["cpu_times_s"].append(time.process_time() - cpu_start)
    for st in stats:
        st.update(latency_s=statistics.median(st["times_s"]), min_s=min(st["times_s"]),
                  cpu_s=statistics.median(st["cpu_times_s"]))
        st["fps"] = len(inputs) / st["latency_s"]
    return stats


def cache_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (no mmap for large blocks, no trimming), so that
    a forward reuses the pages of the previous one instead of faulting tens of MB of fresh, zeroed
    pages back in (same effect as GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<big>).
    Returns False where glibc's mallopt is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


# ---------------------------------------------------------------------------------------------- profiling
# Pipeline steps of SparseDETR (methods) and sub-steps (modules) labelled in profiles.
_PROFILED_METHODS = ("preprocess_image", "pre_transformer", "forward_encoder", "pre_decoder", "forward_decoder",
                     "forward_heads", "postprocess")
_PROFILED_MODULES = {"backbone": "backbone", "scoring network": "transformer.enc_mask_predictor",
                     "encoder layers": "transformer.encoder", "decoder layers": "transformer.decoder"}


@contextlib.contextmanager
def _labelled_stages(model: nn.Module) -> Iterator[None]:
    """Wrap the model's pipeline methods and main modules in profiler ranges named "stage: <name>"."""
    def wrap(name, fn):
        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(f"stage: {name}"):
                return fn(*args, **kwargs)
        return wrapped

    for name in _PROFILED_METHODS:
        setattr(model, name, wrap(name, getattr(model, name)))
    modules = dict(model.named_modules())
    hooks = []
    for label, name in _PROFILED_MODULES.items():
        if modules.get(name) is None:
            continue
        ranges = []

        def pre(module, args, label=label, ranges=ranges):
            ranges.append(torch.profiler.record_function(f"stage: {label}"))
            ranges[-1].__enter__()

        def post(module, args, output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        hooks += [modules[name].register_forward_pre_hook(pre), modules[name].register_forward_hook(post)]
    try:
        yield
    finally:
        for name in _PROFILED_METHODS:
            delattr(model, name)
        for h in hooks:
            h.remove()


def profile_forward(model: nn.Module, inputs: List[Dict], top: int = 20, amp: bool = False
                    ) -> Tuple[str, List[Dict]]:
    """Profile one inference forward (after one warm-up) with torch.profiler (under autocast with `amp`).

    Returns a text report (stage times, then the `top` operators by self time: CPU time on CPU, GPU
    time on CUDA) and the rows of both ({"kind", "name", "total_ms" or "self_ms", "percent"}).
    """
    cuda = model.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), torch.autocast(model.device.type, dtype=autocast_dtype(model.device), enabled=amp):
        model(inputs)
        with _labelled_stages(model), torch.profiler.profile(activities=activities) as prof:
            model(inputs)
            if cuda:
                torch.cuda.synchronize(model.device)
    clock = "device" if cuda else "cpu"
    events = prof.key_averages()
    stage_events = [e for e in events if e.key.startswith("stage: ")]
    op_events = [e for e in events if not e.key.startswith("stage: ")]
    total = {e.key[7:]: getattr(e, f"{clock}_time_total") for e in stage_events}
    total_us = sum(t for name, t in total.items() if name in _PROFILED_METHODS)  # top-level steps
    self_us = sum(getattr(e, f"self_{clock}_time_total") for e in op_events) or 1
    rows = [{"kind": "stage", "name": name, "total_ms": t / 1e3, "percent": 100 * t / max(total_us, 1)}
            for name, t in total.items()]
    rows += [{"kind": "op", "name": e.key, "self_ms": getattr(e, f"self_{clock}_time_total") / 1e3,
              "percent": 100 * getattr(e, f"self_{clock}_time_total") / self_us, "calls": e.count}
             for e in sorted(op_events, key=lambda e: -getattr(e, f"self_{clock}_time_total"))[:top]]
    lines = [f"forward (sum of pipeline steps, {clock} time): {total_us / 1e3:.1f} ms", "",
             "stage                       ms      %"]
    lines += [f"{r['name']:<24}{r['total_ms']:>9.1f}{r['percent']:>7.1f}" for r in rows if r["kind"] == "stage"]
    lines += ["", f"top {top} operators by self {clock} time",
              "operator                                       calls   self ms      %"]
    lines += [f"{r['name'][:46]:<46}{r['calls']:>6}{r['self_ms']:>10.1f}{r['percent']:>7.1f}"
              for r in rows if r["kind"] == "op"]
    lines += ["", events.table(sort_by=f"self_{clock}_time_total", row_limit=top)]
    return "\n".join(lines), rows


# ---------------------------------------------------------------------------------------------- driver
def _build(cfg, channels_last: bool) -> nn.Module:
    model = build_model(cfg).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run_benchmark(cfg, rhos: Sequence[float], batch_sizes: Sequence[int] = (1,), image_size=(800, 1216),
                  flops_image_size=FLOPS_IMAGE, warmup: int = 1, iters: int = 5, flops: bool = True,
                  latency: bool = True, as_official: bool = False, channels_last: bool = False,
                  amp: bool = False, fold_batchnorm: bool = True, profile_dir: Optional[str] = None,
                  log=print) -> List[Dict]:
    """One row per rho (see the module docstring); the device is cfg.MODEL.DEVICE. All models are
    built first and timed interleaved (see `measure_latency`). With `fold_batchnorm`, the backbone's
    frozen batch norms are folded into its convolutions after the FLOP count (which counts the
    architecture as built). With `profile_dir`, one profiled forward per rho at the first batch size
    is written to profile_rho<rho>.txt there."""
    rows, models = [], []
    for rho in rhos:
        rcfg = config_for_rho(cfg, rho, as_official)
        torch.manual_seed(0)
        model = _build(rcfg, channels_last)
        row = {"rho": float(rho), **count_parameters(model), "paper": paper_row(rcfg, rho)}
        if flops:
            start = time.perf_counter()
            row.update(count_flops(model, flops_image_size, official=as_official))
            log(f"rho={rho}: {row['flops'] / 1e9:.2f} GFLOPs ({time.perf_counter() - start:.0f} s to count)")
        if fold_batchnorm:
            fold_frozen_batchnorm(model)
        rows.append(row)
        models.append(model)
    for b in batch_sizes if latency else ():
        for row, r in zip(rows, measure_latency(models, random_batch(b, image_size), warmup, iters, amp)):
            row.setdefault("latency", {})[b] = r
            log(f"rho={row['rho']} batch {b}: median {r['latency_s'] * 1e3:.0f} ms "
                f"({', '.join(f'{t * 1e3:.0f}' for t in r['times_s'])}), CPU time {r['cpu_s']:.2f} s, "
                f"peak +{r['peak_mem_mib']:.0f} MiB")
    if profile_dir is not None:
        for row, model in zip(rows, models):
            text, row["profile"] = profile_forward(model, random_batch(batch_sizes[0], image_size), amp=amp)
            with open(os.path.join(profile_dir, f"profile_rho{row['rho']}.txt"), "w") as f:
                f.write(text + "\n")
    del models
    gc.collect()
    return rows


def _fmt(x, digits=1, scale=1.0):
    return "—" if x is None else f"{x / scale:.{digits}f}"


def markdown_table(rows: List[Dict], cpu: bool = True) -> str:
    """The results as a markdown table (GFLOPs per stage; median and best latency, FPS at the median,
    [CPU time], memory per batch size; paper row); `cpu` adds the CPU-time columns."""
    batch_sizes = sorted({b for r in rows for b in r.get("latency", {})})
    has_flops = any("flops" in r for r in rows)
    head = ["rho", "params (M)", "params, paper count (M)"]
    if has_flops:
        head += ["GFLOPs"] + [f"{s}" for s in STAGES]
    for b in batch_sizes:
        head += [f"latency b{b} (ms)", f"best b{b} (ms)", f"FPS b{b}"] + ([f"CPU time b{b} (s)"] if cpu else [])
        head += [f"peak mem b{b} (MiB)"]
    head += ["paper GFLOPs", "paper params (M)", "paper AP", "paper B4FPS (V100)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        paper = r.get("paper") or {}
        cells = ["0 (dense)" if r["rho"] == 0 else f"{r['rho']:g}", _fmt(r["params_all"], 2, 1e6),
                 _fmt(r["params_paper"], 2, 1e6)]
        if has_flops:
            cells += [_fmt(r.get("flops"), 2, 1e9)] + [_fmt(r.get(f"flops_{s}"), 2, 1e9) for s in STAGES]
        for b in batch_sizes:
            lat = r.get("latency", {}).get(b)
            cells += [_fmt(lat and lat["latency_s"], 0, 1e-3), _fmt(lat and lat["min_s"], 0, 1e-3),
                      _fmt(lat and lat["fps"], 2)]
            cells += [_fmt(lat and lat["cpu_s"], 2)] if cpu else []
            cells += [_fmt(lat and lat["peak_mem_mib"], 0)]
        cells += [_fmt(paper.get("gflops")), _fmt(paper.get("params")), _fmt(paper.get("ap")),
                  _fmt(paper.get("b4fps"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(rows: List[Dict], path: str, title: str = "") -> None:
    """PNG against rho: GFLOPs (ours and the paper's) and seconds per forward at the first batch size
    (wall-clock median, and CPU time where measured). Sparse rows are joined by lines; the dense
    baseline (rho 0) is a star with a dotted level line. Points carry the paper's AP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []  # (y label, [(series label, style, {rho: value})])
    if any("flops" in r for r in rows):
        ours = {r["rho"]: r["flops"] / 1e9 for r in rows if "flops" in r}
        paper = {r["rho"]: r["paper"]["gflops"] for r in rows if r.get("paper")}
        panels.append(("GFLOPs", [("this implementation", "o-", ours), ("paper", "s--", paper)]))
    batch_sizes = sorted({b for r in rows for b in r.get("latency", {})})
    if batch_sizes:
        b = batch_sizes[0]
        timed = [r for r in rows if b in r.get("latency", {})]
        series = [("latency (median)", "o-", {r["rho"]: r["latency"][b]["latency_s"] for r in timed})]
        if all("cpu_s" in r["latency"][b] for r in timed):
            series.append(("CPU time, all threads", "^:", {r["rho"]: r["latency"][b]["cpu_s"] for r in timed}))
        panels.append((f"seconds per forward, batch {b}", series))
    ap = {r["rho"]: r["paper"]["ap"] for r in rows if r.get("paper")}
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), 4.5), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for i, (label, style, values) in enumerate(series):
            color = f"C{i}" if label != "paper" else "gray"
            sparse = sorted(rho for rho in values if rho > 0)
            ax.plot(sparse, [values[rho] for rho in sparse], style, color=color, label=label)
            if 0 in values:
                ax.plot([0], [values[0]], "*", color=color, markersize=12)
                ax.axhline(values[0], color=color, linestyle=":", linewidth=0.8)
            if i == 0:
                for rho, y in values.items():
                    if rho in ap:
                        ax.annotate(f"AP {ap[rho]:.1f}", (rho, y), textcoords="offset points", xytext=(0, 8),
                                    ha="center", fontsize=8)
        ax.set_xlabel("rho (star: dense baseline, rho = 0)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({r["rho"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cpu_name() -> str:
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/cpuinfo") as f:
            return re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    return platform.processor() or platform.machine()


def _environment(device: str) -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    where = (torch.cuda.get_device_name(0) if device == "cuda"
             else f"{_cpu_name()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores")
    return (f"torch {torch.__version__}, sparse_detr {sparse_detr.__version__}, {where}; "
            f"attention: {_attention_backend(device)}; load average (1/5/15 min) {load}")


def _attention_backend(device: str) -> str:
    from sparse_detr.layers.ms_deform_attn import backend_for_device

    return backend_for_device(device)


def _size(text: str) -> Tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="Sparse DETR config; each rho overrides its RHO")
    p.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                   help="keep ratios (0 = dense baseline)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="images per forward, one latency column each (default: 1 on CPU, 1 4 on CUDA)")
    p.add_argument("--image", type=_size, default=(800, 1216), help="HxW of the latency images")
    p.add_argument("--flops-image", type=_size, default=FLOPS_IMAGE, help="HxW of the FLOP-count image")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per model (at least 1)")
    p.add_argument("--iters", type=int, default=5, help="timed forwards (median reported; at least 5)")
    p.add_argument("--channels-last", action="store_true", help="convert the model to channels_last")
    p.add_argument("--amp", action="store_true",
                   help="time the forwards under autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--no-fold-batchnorm", action="store_true",
                   help="keep the backbone's frozen batch norms as separate layers (default: folded into the convolutions)")
    p.add_argument("--cache-freed-memory", action="store_true",
                   help="keep freed memory in the process (glibc mallopt) instead of faulting it back in")
    p.add_argument("--as-official", action="store_true",
                   help="the model the official code runs: 91 classes, encoder aux heads at inference")
    p.add_argument("--skip-flops", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler report per rho")
    p.add_argument("--output-dir", default="output/benchmark")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    if args.iters < 5:
        p.error("--iters must be at least 5 (the median of at least 5 timed forwards)")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (peak memory is measured on the warm-up forwards)")
    if args.batch_size is None:
        args.batch_size = [1, 4] if args.device == "cuda" else [1]
    return args


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cache_freed_memory and not cache_freed_memory():
        raise SystemExit("--cache-freed-memory needs glibc")
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = args.device
    os.makedirs(args.output_dir, exist_ok=True)
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None else str(argv)
    env_before = _environment(args.device)
    print(env_before, flush=True)
    slow_amp = args.amp and args.device == "cpu" and not cpu_has_native_bfloat16()
    if slow_amp:
        print("WARNING: --amp on a CPU without bfloat16 instructions (AVX512-BF16 or AMX): the bfloat16 "
              "forwards run reference or converting code, several times slower than float32", file=sys.stderr, flush=True)
    rows = run_benchmark(cfg, args.rho, args.batch_size, args.image, args.flops_image, args.warmup, args.iters,
                         flops=not args.skip_flops, latency=not args.skip_latency, as_official=args.as_official,
                         channels_last=args.channels_last, amp=args.amp,
                         fold_batchnorm=not args.no_fold_batchnorm, profile_dir=args.output_dir if args.profile else None,
                         log=lambda s: print(s, flush=True))
    table = markdown_table(rows, cpu=args.device == "cpu")
    notes = [f"`{command}`", "",
             f"{os.path.basename(args.config_file)}{' (as the official code runs it)' if args.as_official else ''}"
             f"; GFLOPs: fvcore, one {args.flops_image[0]}x{args.flops_image[1]} image; latency: median of "
             f"{args.iters} after {args.warmup} warm-up, {args.image[0]}x{args.image[1]} images, "
             f"{'channels_last, ' if args.channels_last else ''}"
             f"{'' if args.no_fold_batchnorm else 'batch norms folded, '}"
             f"{'oneDNN linears, ' if cfg.MODEL.SPARSE_DETR.CPU_ONEDNN_LINEAR and args.device == 'cpu' else ''}"
             f"{'oneDNN backbone stages, ' if cfg.MODEL.SPARSE_DETR.CPU_ONEDNN_STAGES and args.device == 'cpu' else ''}"
             f"{f'autocast {autocast_dtype(torch.device(args.device))}, ' if args.amp else ''}"
             f"{'no bfloat16 instructions on this CPU, ' if slow_amp else ''}"
             f"{'freed memory cached (mallopt), ' if args.cache_freed_memory else ''}{args.device}; "
             "models timed in turn; CPU time: process CPU time per forward (all threads); peak memory: "
             "during the warm-up, above the loaded models.",
             f"Before: {env_before}", f"After: {_environment(args.device)}"]
    report = "\n".join(notes) + "\n\n" + table + "\n"
    with open(os.path.join(args.output_dir, "benchmark.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
        json.dump({"command": command, "environment": [env_before, _environment(args.device)], "rows": rows}, f,
                  indent=1)
    plot_results(rows, os.path.join(args.output_dir, "benchmark.png"),
                 f"{os.path.basename(args.config_file)}, {args.device}")
    print("\n" + report)
    return rows


if __name__ == "__main__":
    main()

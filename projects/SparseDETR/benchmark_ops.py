#!/usr/bin/env python
"""Multi-scale deformable attention op: this project's kernel against the `grid_sample` reference and the
PyPI package `torch-ms-deform-attn` 0.1.1, at the paper's size. One run prints one table.

    python projects/SparseDETR/benchmark_ops.py --threads 2
    python projects/SparseDETR/benchmark_ops.py --install-peer --threads 2       # first builds the peer
    python projects/SparseDETR/benchmark_ops.py --device cuda --output results.md

Size: batch 1, an 800 x 1216 image at strides 8/16/32/64 = levels 100x152, 50x76, 25x38, 13x19 (20,197
tokens); 8 heads x 32 channels, 4 points per level; queries = all tokens (the dense encoder) and a random
10% of them (Sparse DETR's rho = 0.1). Each query samples around its own token centre, as an encoder layer
does: the official initial offsets of MSDeformAttn (1 to 4 pixels along each head's direction, every level)
plus N(0, 1) pixel noise; attention weights are a softmax over levels x points of N(0, 1) logits.

Timing: float32; every implementation runs --warmup times, then --repeats rounds that run each
implementation once in turn (so that a change in machine load hits all alike); the table gives the median.
"forward" runs under torch.no_grad(); "fwd+bwd" is the forward with value, locations and weights requiring
grad, then backward of a fixed random output gradient. CPU with --threads threads; CUDA synchronised
around every call. Before timing, each implementation's output is checked against the reference.

The peer is imported from --peer-path (default .cache/peer, git-ignored); --install-peer builds it there
with this interpreter's pip (`pip install --no-build-isolation --no-deps --target ...`, about 75 s on 2
cores). It is never a dependency of this project. When it is missing or fails to build, its rows say so.
"""
import argparse
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from sparse_detr import _ext  # noqa: E402
from sparse_detr.layers import MSDeformAttn  # noqa: E402
from sparse_detr.layers.ms_deform_attn import backend_for_device, ms_deform_attn, ms_deform_attn_reference  # noqa: E402

PEER = "torch-ms-deform-attn==0.1.1"
SHAPES = [(100, 152), (50, 76), (25, 38), (13, 19)]
HEADS, CHANNELS, POINTS = 8, 32, 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported; at least 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--query-fractions", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--peer-path", default=os.path.join(ROOT, ".cache", "peer"))
    parser.add_argument("--install-peer", action="store_true", help=f"pip-install {PEER} into --peer-path if missing")
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    return args


def load_peer(path, install):
    """Returns (module, note): the peer's functional module, or None and why not."""
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        return importlib.import_module("torch_ms_deform_attn"), f"{PEER} from {os.path.relpath(path, ROOT)}"
    except ImportError as e:
        if not install:
            return None, f"{PEER} not installed ({e}); rerun with --install-peer"
    start = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--target", path, PEER]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"{PEER} failed to build: {proc.stderr.strip().splitlines()[-1:]}"
    importlib.invalidate_caches()
    try:
        module = importlib.import_module("torch_ms_deform_attn")
    except ImportError as e:
        return None, f"{PEER} built but does not import: {e}"
    return module, f"{PEER} built into {os.path.relpath(path, ROOT)} in {time.time() - start:.0f} s"


def peer_runs_on(peer, device):
    """None when the peer runs on `device` (a tiny call), else why not (e.g. built without CUDA kernels)."""
    value, shapes, starts, loc, weights = make_inputs(0.001, device)
    try:
        peer.ms_deform_attn(value, shapes, starts, loc, weights)
    except Exception as e:  # noqa: BLE001  (any failure means: leave it out, say why)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def make_inputs(fraction, device, seed=0):
    """value, spatial_shapes, level_start_index, locations, weights for a `fraction` of the tokens as queries."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(SHAPES)
    centres = []
    for h, w in SHAPES:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    centres = torch.cat(centres)
    Lq = max(1, round(fraction * S))
    if Lq < S:
        centres = centres[torch.randperm(S, generator=g)[:Lq].sort().values]
    pattern = MSDeformAttn(HEADS * CHANNELS, L, HEADS, POINTS).sampling_offsets.bias.detach().view(HEADS, L, POINTS, 2)
    offsets = pattern + torch.randn(1, Lq, HEADS, L, POINTS, 2, generator=g)
    size_xy = shapes.flip(-1).float()[:, None, :]  # (L, 1, 2) as (W, H)
    locations = centres[None, :, None, None, None, :] + offsets / size_xy
    weights = torch.randn(1, Lq, HEADS, L * POINTS, generator=g).softmax(-1).view(1, Lq, HEADS, L, POINTS)
    value = torch.randn(1, S, HEADS, CHANNELS, generator=g)
    return [t.to(device) for t in (value, shapes, starts, locations, weights)]


def implementations(peer):
    impls = {
        "this kernel": ms_deform_attn,
        "grid_sample reference": ms_deform_attn_reference,
    }
    if peer is not None:
        impls["torch-ms-deform-attn 0.1.1"] = peer.ms_deform_attn
    return impls


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def benchmark(impls, inputs, args):
    """{(name, mode): median ms} and {name: max |out - reference|}."""
    value, shapes, starts, loc, weights = inputs
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    grad = torch.randn(value.shape[0], loc.shape[1], HEADS * CHANNELS, device=args.device)

    def forward(fn):
        with torch.no_grad():
            fn(value, shapes, starts, loc, weights)

    def forward_backward(fn):
        for t in leaves:
            t.grad = None
        fn(leaves[0], shapes, starts, leaves[1], leaves[2]).backward(grad)

    with torch.no_grad():
        ref = ms_deform_attn_reference(value, shapes, starts, loc, weights)
        errors = {name: (fn(value, shapes, starts, loc, weights) - ref).abs().max().item() for name, fn in impls.items()}
    runs = {(name, mode): (fn, step) for name, fn in impls.items()
            for mode, step in (("forward", forward), ("fwd+bwd", forward_backward))}
    times = {key: [] for key in runs}
    for _ in range(args.warmup):
        for fn, step in runs.values():
            step(fn)
    for _ in range(args.repeats):
        for key, (fn, step) in runs.items():
            times[key].append(timed(lambda: step(fn), args.device))
    return {key: statistics.median(ts) for key, ts in times.items()}, errors


def environment(args, peer_note):
    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        where = (f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
                 f"{torch.get_num_threads()} threads; load average {load} (1/5/15 min) at the end")
    return [
        f"device: {where}; torch {torch.__version__}; CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"this kernel: {backend_for_device(args.device)} (sparse_detr._C, CUDA kernels: {_ext.has_cuda_kernels()}); "
        f"peer: {peer_note}",
        f"float32, batch 1, levels {', '.join(f'{h}x{w}' for h, w in SHAPES)} = {sum(h * w for h, w in SHAPES)} "
        f"tokens, {HEADS} heads x {CHANNELS} channels, {POINTS} points; median of {args.repeats} after "
        f"{args.warmup} warm-up",
        "command: python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:]),
    ]


def table(results, peer_name):
    lines = ["| queries | implementation | forward (ms) | fwd+bwd (ms) | forward vs peer | fwd+bwd vs peer "
             "| fwd+bwd vs reference | max abs error |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for Lq, (times, errors) in results.items():
        names = list(dict.fromkeys(name for name, _ in times))
        for name in names:
            fwd, both = times[(name, "forward")], times[(name, "fwd+bwd")]
            peer_fwd, peer_both = times.get((peer_name, "forward")), times.get((peer_name, "fwd+bwd"))
            ref_both = times[("grid_sample reference", "fwd+bwd")]
            vs_peer = [f"{p / t:.2f}x" if p else "n/a" for p, t in ((peer_fwd, fwd), (peer_both, both))]
            lines.append(f"| {Lq:,} | {name} | {fwd:.1f} | {both:.1f} | {vs_peer[0]} | {vs_peer[1]} "
                         f"| {ref_both / both:.2f}x | {errors[name]:.1e} |")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU")
    peer, peer_note = load_peer(args.peer_path, args.install_peer)
    if peer is not None and (failure := peer_runs_on(peer, args.device)):
        peer, peer_note = None, f"{peer_note}, but it fails on {args.device}: {failure}"
    impls = implementations(peer)
    peer_name = "torch-ms-deform-attn 0.1.1"
    results = {}
    for fraction in args.query_fractions:
        inputs = make_inputs(fraction, args.device)
        results[inputs[3].shape[1]] = benchmark(impls, inputs, args)
    lines = environment(args, peer_note) + [""] + table(results, peer_name)
    if peer is None:
        lines.append(f"\n{peer_name}: not measured ({peer_note})")
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

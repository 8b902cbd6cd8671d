#!/usr/bin/env python
"""Float32 linear layers on CPU: PyTorch's own path (MKL sgemm) against oneDNN's linear (`OneDNNLinear`,
MODEL.SPARSE_DETR.CPU_ONEDNN_LINEAR), at the shapes Sparse DETR runs for an 800 x 1216 image. One table.

    python projects/SparseDETR/benchmark_linear.py --threads 2

Shapes (rows x in -> out): all 20,197 tokens through a 256 -> 256 projection (value projections of every
encoder and decoder layer, the scoring network, the two-stage head) and 256 -> 91 (class head); the 10 %
selected tokens through the encoder FFN (256 -> 1024 -> 256); 300 queries through 256 -> 256. Timing: both
paths under torch.inference_mode(), --warmup calls each, then --repeats rounds that run each path once in
turn; median reported. Each output is checked against the other first.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sparse_detr.layers.onednn_linear import OneDNNLinear, onednn_linear_available  # noqa: E402

TOKENS, SELECTED, QUERIES = 20197, 2020, 300
SHAPES = [(TOKENS, 256, 256), (TOKENS, 256, 91), (SELECTED, 256, 1024), (SELECTED, 1024, 256), (QUERIES, 256, 256)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (median; at least 5)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    if not onednn_linear_available():
        raise SystemExit("this PyTorch build has no oneDNN linear op")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, median of {args.repeats}\n")
    print("| rows x in -> out | MKL (nn.Linear) ms | oneDNN (OneDNNLinear) ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows, fan_in, fan_out in SHAPES:
            layer = OneDNNLinear(fan_in, fan_out)
            x = torch.randn(rows, fan_in)
            paths = [lambda: F.linear(x, layer.weight, layer.bias), lambda: layer(x)]
            diff = (paths[0]() - paths[1]()).abs().max().item()
            times = [[], []]
            for _ in range(args.warmup):
                for path in paths:
                    path()
            for _ in range(args.repeats):
                for t, path in zip(times, paths):
                    start = time.perf_counter()
                    path()
                    t.append(time.perf_counter() - start)
            mkl, onednn = (statistics.median(t) * 1e3 for t in times)
            print(f"| {rows} x {fan_in} -> {fan_out} | {mkl:.2f} | {onednn:.2f} | {mkl / onednn:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Training-step time of a config, against variants of it measured in the same process. One table.

    python projects/SparseDETR/benchmark_train_step.py \
        --config-file configs/DeepForest/sparse_detr_R_50_rho_0.1_cpu.yaml --memory-format \
        --variant "res5 detached" MODEL.BACKBONE.DETACHED_STAGES "['res5']"

Every row is a Trainer built from the config (the baseline) or from the config plus a variant's overrides,
each seeded alike. All rows run the trainer's real step (`run_step`: autocast as the trainer decides,
gradient clipping, optimizer) on the same --batches batches from the config's training loader; after
one warm-up pass per row, --rounds rounds run each row's pass in turn, so that a machine whose speed
drifts (a shared CPU) slows every row alike; every other round runs the rows in reverse order, so that
a row's place in the round cannot favour it. `--memory-format` adds the baseline with its backbone input
forced to channels_last (the model's choice on CPU is channels_last only outside float32 training, see
`SparseDETR.pre_transformer`).
"""
import argparse
import itertools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from sparse_detr import add_sparse_detr_config  # noqa: E402
import sparse_detr.data  # noqa: E402,F401  (registers the project's datasets)
from sparse_detr.engine.trainer import Trainer  # noqa: E402


def build_trainer(config_file: str, opts):
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["SOLVER.TRAIN_TIME_BUDGET", 0, "TEST.EVAL_PERIOD", 0,
                         "OUTPUT_DIR", os.path.join("output", "benchmark_train_step")] + list(opts))
    cfg.freeze()
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def force_channels_last(trainer) -> None:
    backbone = trainer._trainer.model.backbone
    backbone.register_forward_pre_hook(lambda module, args: (args[0].contiguous(memory_format=torch.channels_last),))


def round_order(rows: list, round_index: int) -> list:
    """The rows in the order round `round_index` runs them: as given, reversed in every odd round."""
    return rows if round_index % 2 == 0 else rows[::-1]


def main(argv=None) -> dict:
    """Prints the table; returns {row name: [seconds per step of each round]}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY VALUE"),
                        help="a row: its name, then config overrides (repeatable)")
    parser.add_argument("--memory-format", action="store_true",
                        help="add the baseline with a channels_last backbone input")
    parser.add_argument("--batches", type=int, default=8, help="training batches per pass")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per row (at least 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="overrides for every row")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    for variant in args.variant:
        if len(variant) % 2 != 1:
            parser.error(f"--variant {' '.join(variant)}: expected NAME followed by KEY VALUE pairs")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [("baseline", build_trainer(args.config_file, args.opts))]
    if args.memory_format:
        trainer = build_trainer(args.config_file, args.opts)
        force_channels_last(trainer)
        rows.append(("baseline, channels_last backbone input", trainer))
    for name, *overrides in args.variant:
        rows.append((name, build_trainer(args.config_file, list(args.opts) + overrides)))
    loader = iter(rows[0][1]._trainer.data_loader)
    batches = [next(loader) for _ in range(args.batches)]

    def one_pass(trainer) -> float:
        runner = trainer._trainer
        runner._data_loader_iter_obj = itertools.cycle(batches)
        start = time.perf_counter()
        for _ in batches:
            runner.run_step()
        return (time.perf_counter() - start) / len(batches)

    times = {name: [] for name, _ in rows}
    with EventStorage(0):
        for _, trainer in rows:
            one_pass(trainer)  # warm-up: oneDNN primitives for every image size of the batches
        for round_index in range(args.rounds):
            for name, trainer in round_order(rows, round_index):
                times[name].append(one_pass(trainer))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.config_file}, "
          f"{args.batches} batches x {args.rounds} rounds\n")
    print("| row | s per step (mean) | per round | relative to baseline |")
    print("|---|---|---|---|")
    base = statistics.mean(times["baseline"])
    for name, _ in rows:
        mean = statistics.mean(times[name])
        print(f"| {name} | {mean:.3f} | {' / '.join(f'{t:.3f}' for t in times[name])} | {mean / base:.2f}x |")
    return times


if __name__ == "__main__":
    main()

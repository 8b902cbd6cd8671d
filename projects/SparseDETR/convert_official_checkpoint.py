#!/usr/bin/env python
"""Convert an official Sparse DETR checkpoint (kakaobrain/sparse-detr) for this project.

    python projects/SparseDETR/convert_official_checkpoint.py --source sparse_detr_r50_10.pth \
        --output sparse_detr_r50_10_d2.pth
    python projects/SparseDETR/train_net.py --config-file configs/COCO-Detection/sparse_detr_R_50_rho_0.1.yaml \
        --eval-only MODEL.WEIGHTS sparse_detr_r50_10_d2.pth

By default the 91 official class logits (COCO category ids) become Detectron2's 80 contiguous COCO
classes; `--keep-official-classes` keeps all 91 (MODEL.SPARSE_DETR.NUM_CLASSES 91, labels = COCO ids).
The output is checked against the model built from the checkpoint's `args` and written atomically;
the script prints a summary and the matching config overrides. The logic lives in
`sparse_detr.checkpoint.official`.
"""
import argparse
import sys

from sparse_detr.checkpoint.official import OfficialCheckpointError, convert_official_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="official checkpoint (.pth with 'model' and 'args')")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (for MODEL.WEIGHTS)")
    parser.add_argument("--keep-official-classes", action="store_true",
                        help="keep the 91 official logits instead of mapping them to the 80 COCO classes")
    parser.add_argument("--trust-source", action="store_true",
                        help="allow arbitrary pickled objects in --source (runs code from the file; "
                             "only for files from a trusted source)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = convert_official_checkpoint(args.source, args.output, args.keep_official_classes,
                                              trust_source=args.trust_source)
    except (OfficialCheckpointError, FileNotFoundError) as e:
        print(f"error: {e}\nnothing was written to {args.output}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

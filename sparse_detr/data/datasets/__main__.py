"""`python -m sparse_detr.data.datasets [--root DIR] [--force]`: prepare the DeepForest dataset."""
import argparse
import os

from .deepforest import prepare_deepforest


def main(argv=None):
    default_root = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "deepforest")
    parser = argparse.ArgumentParser(description="Prepare the DeepForest tree-crown dataset (COCO json).")
    parser.add_argument("--root", default=default_root, help=f"output folder (default {default_root})")
    parser.add_argument("--force", action="store_true", help="rewrite even if already prepared")
    args = parser.parse_args(argv)
    for split, stats in prepare_deepforest(args.root, force=args.force).items():
        print(f"deepforest_trees_{split}: {stats['images']} images, {stats['boxes']} boxes in {args.root}")


if __name__ == "__main__":
    main()

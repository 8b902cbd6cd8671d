#!/usr/bin/env python
"""Sparse DETR demo: detections on images, folders or a video, drawn with Detectron2's Visualizer;
`--show-tokens` also draws the encoder tokens the scoring network kept (a heatmap per level).

    python projects/SparseDETR/demo.py --config-file CONFIG --input img.jpg folder/ "glob/*.png" \
        --output out/ [--show-tokens] [--tta] [--confidence-threshold 0.5] --opts MODEL.WEIGHTS model.pth
    python projects/SparseDETR/demo.py --config-file CONFIG --video-input clip.mp4 --output out/ --show-tokens

Outputs: `<output>/<name>.jpg` (detections) and, with --show-tokens, `<name>_tokens.jpg` (detections
plus one panel per level). A video gives `<output>/<name>.mp4`, with --show-tokens the frame and the
kept tokens of all levels side by side. `--tta` draws the detections of the test-time-augmented model
(TEST.AUG.*: MIN_SIZES, MAX_SIZE, FLIP, ROTATE_90), the one the TTA evaluation scores.
"""
import argparse
import glob
import os
import sys

import cv2
import numpy as np
import tqdm
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger

import sparse_detr  # noqa: F401  (registers the SparseDETR meta-architecture)
import sparse_detr.data  # noqa: F401  (registers the project's datasets, for their class names)
from sparse_detr import add_sparse_detr_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import (  # noqa: E402
    TokenSelectionPredictor,
    draw_detections,
    draw_token_heatmaps,
    draw_token_overlay,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser():
    parser = argparse.ArgumentParser(description="Sparse DETR demo")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", default=[], help="images, folders of images or glob patterns")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--show-tokens", action="store_true",
                        help="also draw the encoder tokens selected by the scoring network (rho > 0)")
    parser.add_argument("--tta", action="store_true",
                        help="detections with test-time augmentation (the views of TEST.AUG.*, fused)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def setup_cfg(args):
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def test_metadata(cfg):
    """Metadata of the first test dataset, with its class names: a `register_coco_instances` dataset
    gets `thing_classes` only when loaded, so it is loaded if it has none yet."""
    if not len(cfg.DATASETS.TEST):
        return MetadataCatalog.get("__unused")
    name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(name)
    if not hasattr(metadata, "thing_classes") and name in DatasetCatalog.list():
        DatasetCatalog.get(name)
    return metadata


def expand_inputs(inputs):
    """Files, every image of a folder (sorted) and glob matches, in the given order."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise FileNotFoundError(f"--input {item!r} matches no file")
            paths += matches
    return paths


def run_images(predictor, metadata, paths, args):
    for path in tqdm.tqdm(paths, desc="images"):
        image_bgr = read_image(path, format="BGR")
        predictions, tokens = predictor(image_bgr)
        image_rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        detections = draw_detections(image_rgb, predictions, metadata, args.confidence_threshold)
        name = os.path.splitext(os.path.basename(path))[0]
        cv2.imwrite(os.path.join(args.output, name + ".jpg"), detections[:, :, ::-1])
        if args.show_tokens:
            panel = draw_token_heatmaps(image_rgb, tokens, detections)
            cv2.imwrite(os.path.join(args.output, name + "_tokens.jpg"), panel[:, :, ::-1])


def run_video(predictor, metadata, path, args):
    video = cv2.VideoCapture(path)
    width, height = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    out_path = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".mp4")
    out_width = 2 * width if args.show_tokens else width
    writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (out_width, height))
    try:
        with tqdm.tqdm(total=frames or None, desc="frames") as bar:
            while True:
                ok, frame_bgr = video.read()
                if not ok:
                    break
                predictions, tokens = predictor(frame_bgr)
                frame_rgb = np.ascontiguousarray(frame_bgr[:, :, ::-1])
                picture = draw_detections(frame_rgb, predictions, metadata, args.confidence_threshold)
                if args.show_tokens:
                    picture = np.concatenate([picture, draw_token_overlay(frame_rgb, tokens)], axis=1)
                writer.write(np.ascontiguousarray(picture[:, :, ::-1]))
                bar.update()
    finally:
        video.release()
        writer.release()


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="sparse_detr")
    if not args.input and not args.video_input:
        raise SystemExit("give --input and/or --video-input")
    cfg = setup_cfg(args)
    if args.show_tokens and cfg.MODEL.SPARSE_DETR.RHO <= 0:
        raise SystemExit("--show-tokens needs a Sparse DETR model (MODEL.SPARSE_DETR.RHO > 0): "
                         "a dense model keeps every token")
    if args.show_tokens and cfg.MODEL.SPARSE_DETR.TEST_RHO == 0:
        raise SystemExit("--show-tokens needs MODEL.SPARSE_DETR.TEST_RHO != 0")
    predictor = TokenSelectionPredictor(cfg, tta=args.tta)
    metadata = test_metadata(cfg)
    os.makedirs(args.output, exist_ok=True)
    if args.input:
        run_images(predictor, metadata, expand_inputs(args.input), args)
    if args.video_input:
        run_video(predictor, metadata, args.video_input, args)


if __name__ == "__main__":
    main()

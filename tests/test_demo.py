"""projects/SparseDETR/demo.py: pictures from images (a folder, grayscale included) and a video,
with the token-selection heatmaps of --show-tokens."""
import os
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from synthetic import TINY_OPTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR"))
import demo  # noqa: E402

BASE = os.path.join(ROOT, "configs", "Base-SparseDETR.yaml")
OPTS = TINY_OPTS + ["MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "96", "DATASETS.TEST", "()"]


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / "colour.jpg")
    Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8), "L").save(folder / "gray.png")
    (folder / "notes.txt").write_text("not an image")
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (96, 64))
    for _ in range(3):
        writer.write(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    writer.release()
    return str(folder), video


def test_demo_writes_detection_and_token_pictures(inputs, tmp_path):
    folder, video = inputs
    out = str(tmp_path / "out")
    demo.main(["--config-file", BASE, "--input", folder, "--video-input", video, "--output", out,
               "--show-tokens", "--confidence-threshold", "0.0", "--opts", *OPTS])
    assert sorted(os.listdir(out)) == ["clip.mp4", "colour.jpg", "colour_tokens.jpg", "gray.jpg", "gray_tokens.jpg"]
    assert cv2.imread(os.path.join(out, "colour.jpg")).shape == (90, 120, 3)
    # Detections + 4 levels, 3 panels per row: 2 rows x 3 columns of the image size.
    assert cv2.imread(os.path.join(out, "gray_tokens.jpg")).shape == (140, 210, 3)
    capture = cv2.VideoCapture(os.path.join(out, "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == 2 * 96  # frame | kept tokens
    capture.release()


def test_token_maps_follow_the_selection(inputs):
    folder, _ = inputs
    cfg = demo.setup_cfg(demo.get_parser().parse_args(["--config-file", BASE, "--output", "-", "--opts", *OPTS]))
    predictor = demo.TokenSelectionPredictor(cfg)
    predictions, levels = predictor(cv2.imread(os.path.join(folder, "colour.jpg")))
    assert predictions["instances"].image_size == (90, 120)
    kept = sum(int(level["selected"].sum()) for level in levels)
    valid = sum(level["score"].size for level in levels)
    assert kept == int(valid * cfg.MODEL.SPARSE_DETR.RHO) + 1  # official count over the unpadded tokens
    assert [level["stride"] for level in levels] == [8, 16, 32, 64]
    # The kept tokens are the best-scoring ones.
    scores = np.concatenate([level["score"].ravel() for level in levels])
    selected = np.concatenate([level["selected"].ravel() for level in levels])
    assert scores[selected].min() >= scores[~selected].max()


def test_show_tokens_needs_a_sparse_model(inputs, tmp_path):
    folder, _ = inputs
    with pytest.raises(SystemExit, match="RHO > 0"):
        demo.main(["--config-file", BASE, "--input", folder, "--output", str(tmp_path), "--show-tokens",
                   "--opts", *OPTS, "MODEL.SPARSE_DETR.RHO", "0.0"])


def test_tta_detections_with_the_plain_token_maps(inputs, tmp_path):
    folder, _ = inputs
    tta_opts = ["TEST.AUG.MIN_SIZES", "(80, 96)", "TEST.AUG.FLIP", "True", "TEST.AUG.ROTATE_90", "True"]
    cfg = demo.setup_cfg(demo.get_parser().parse_args(["--config-file", BASE, "--output", "-", "--opts", *OPTS,
                                                       *tta_opts]))
    image = cv2.imread(os.path.join(folder, "colour.jpg"))
    torch.manual_seed(0)  # the same random weights for both
    plain, plain_levels = demo.TokenSelectionPredictor(cfg)(image)
    torch.manual_seed(0)
    fused, levels = demo.TokenSelectionPredictor(cfg, tta=True)(image)
    assert fused["instances"].image_size == (90, 120)
    assert not torch.equal(fused["instances"].pred_boxes.tensor, plain["instances"].pred_boxes.tensor)
    for level, plain_level in zip(levels, plain_levels):
        assert np.array_equal(level["selected"], plain_level["selected"])
    dense_cfg = demo.setup_cfg(demo.get_parser().parse_args(["--config-file", BASE, "--output", "-", "--opts", *OPTS,
                                                             *tta_opts, "MODEL.SPARSE_DETR.RHO", "0.0"]))
    dense, no_tokens = demo.TokenSelectionPredictor(dense_cfg, tta=True)(image)
    assert no_tokens is None and dense["instances"].image_size == (90, 120)
    out = str(tmp_path / "out")
    demo.main(["--config-file", BASE, "--input", folder, "--output", out, "--tta", "--opts", *OPTS, *tta_opts])
    assert sorted(os.listdir(out)) == ["colour.jpg", "gray.jpg"]

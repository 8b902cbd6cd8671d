"""Predictions and the scoring network's token selection for the demo (projects/SparseDETR/demo.py).

`TokenSelectionPredictor` is Detectron2's DefaultPredictor that also returns which encoder tokens
the scoring network kept; `draw_token_heatmaps` paints them over the image, one panel per level.
"""
import math
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.engine import DefaultPredictor
from detectron2.structures import ImageList
from detectron2.utils.visualizer import ColorMode, Visualizer
from matplotlib import colormaps

from sparse_detr.layers.fold_batchnorm import fold_frozen_batchnorm
from sparse_detr.modeling.test_time_augmentation import SparseDETRWithTTA

__all__ = ["TokenSelectionPredictor", "token_maps", "draw_detections", "draw_token_heatmaps", "draw_token_overlay"]


def token_maps(out: Dict, images: ImageList, index: int = 0) -> List[Dict[str, np.ndarray]]:
    """Per feature level of image `index`: "score" (h_l, w_l) scoring-network logits and "selected"
    (h_l, w_l) bool (the first `sparse_token_nums` of `backbone_topk_proposals`), cropped to the
    cells that cover the image (padding removed); "stride" (nominal, in input pixels).

    Args:
        out: `SparseDETR.run` output with rho > 0. images: the model's padded input batch.
    """
    scores = out["backbone_mask_prediction"][index].float().cpu()
    selected = torch.zeros_like(scores, dtype=torch.bool)
    selected[out["backbone_topk_proposals"][index, : int(out["sparse_token_nums"][index])].cpu()] = True
    pad = out["mask_flatten"][index].cpu()
    levels, start = [], 0
    for h, w in out["spatial_shapes_list"]:
        valid = ~pad[start:start + h * w].view(h, w)
        rows, cols = int(valid[:, 0].sum()), int(valid[0].sum())
        crop = (slice(0, rows), slice(0, cols))
        levels.append({
            "score": scores[start:start + h * w].view(h, w)[crop].numpy(),
            "selected": selected[start:start + h * w].view(h, w)[crop].numpy(),
            "stride": 2 ** round(math.log2(images.tensor.shape[-1] / w)),
        })
        start += h * w
    return levels


class TokenSelectionPredictor(DefaultPredictor):
    """DefaultPredictor whose call returns `(predictions, token_maps or None)` for one BGR image;
    None for dense models (rho = 0 at inference: no scoring network, every token is kept). The model is
    for inference only, so the backbone's frozen batch norms are folded into its convolutions.
    With `tta`, the predictions are those of `SparseDETRWithTTA` (the views of TEST.AUG.*, fused, as in
    the test-time-augmented evaluation); the token maps stay those of the plain view."""

    def __init__(self, cfg, tta: bool = False):
        super().__init__(cfg)
        fold_frozen_batchnorm(self.model)
        self.tta_model = SparseDETRWithTTA(cfg, self.model) if tta else None

    def __call__(self, original_image: np.ndarray) -> Tuple[Dict, Optional[List[Dict[str, np.ndarray]]]]:
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            inputs = [{"image": torch.as_tensor(image.astype("float32").transpose(2, 0, 1)),
                       "height": height, "width": width}]
            model, rho = self.model, self.model.current_rho()
            predictions, tokens = None, None
            if self.tta_model is None or rho > 0:  # the plain view: its detections and/or its token maps
                images = model.preprocess_image(inputs)
                out = model.run(images, rho, with_enc_aux=False)
                predictions = model.postprocess(out, images, inputs)[0]
                tokens = token_maps(out, images) if rho > 0 else None
            if self.tta_model is not None:
                predictions = self.tta_model(inputs)[0]
            return predictions, tokens


def draw_detections(image_rgb: np.ndarray, predictions: Dict, metadata, threshold: float) -> np.ndarray:
    """Detections scoring at least `threshold`, drawn by Detectron2's Visualizer (RGB uint8)."""
    instances = predictions["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()


def _title(panel: np.ndarray, text: str) -> np.ndarray:
    scale = max(0.4, panel.shape[1] / 900)
    cv2.putText(panel, text, (6, int(24 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(panel, text, (6, int(24 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return panel


def _level_heat(image_rgb: np.ndarray, level: Dict[str, np.ndarray], lo: float, hi: float) -> Tuple[np.ndarray, np.ndarray]:
    """(color (H, W, 3) float of the normalised score, selected (H, W) bool) upsampled to the image."""
    H, W = image_rgb.shape[:2]
    score = cv2.resize(((level["score"] - lo) / max(hi - lo, 1e-6)).astype(np.float32), (W, H),
                       interpolation=cv2.INTER_NEAREST)
    selected = cv2.resize(level["selected"].astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST) > 0
    return colormaps["turbo"](np.clip(score, 0, 1))[..., :3] * 255, selected


def draw_token_heatmaps(image_rgb: np.ndarray, levels: List[Dict[str, np.ndarray]],
                        detections: Optional[np.ndarray] = None, columns: int = 3) -> np.ndarray:
    """One panel per level: kept tokens coloured by their score (turbo colormap, shared scale over
    the levels), the other tokens dimmed; `detections` (an RGB picture of the same size) first."""
    valid_scores = np.concatenate([lvl["score"].ravel() for lvl in levels])
    lo, hi = float(valid_scores.min()), float(valid_scores.max())
    kept, total = sum(int(lvl["selected"].sum()) for lvl in levels), valid_scores.size
    panels = [] if detections is None else [_title(detections.copy(), f"detections ({kept}/{total} tokens kept)")]
    for i, level in enumerate(levels):
        color, selected = _level_heat(image_rgb, level, lo, hi)
        panel = np.where(selected[..., None], 0.35 * image_rgb + 0.65 * color, 0.3 * image_rgb).astype(np.uint8)
        n = int(level["selected"].sum())
        panels.append(_title(panel, f"level {i} (stride {level['stride']}): {n}/{level['score'].size} kept"))
    while len(panels) % columns:
        panels.append(np.zeros_like(panels[0]))
    rows = [np.concatenate(panels[r:r + columns], axis=1) for r in range(0, len(panels), columns)]
    return np.concatenate(rows, axis=0)


def draw_token_overlay(image_rgb: np.ndarray, levels: List[Dict[str, np.ndarray]]) -> np.ndarray:
    """All levels in one picture: a pixel is lit by the finest level whose kept token covers it."""
    valid_scores = np.concatenate([lvl["score"].ravel() for lvl in levels])
    lo, hi = float(valid_scores.min()), float(valid_scores.max())
    picture = 0.3 * image_rgb.astype(np.float32)
    for level in reversed(levels):  # coarse first, fine levels drawn on top
        color, selected = _level_heat(image_rgb, level, lo, hi)
        picture[selected] = 0.35 * image_rgb[selected] + 0.65 * color[selected]
    return picture.astype(np.uint8)

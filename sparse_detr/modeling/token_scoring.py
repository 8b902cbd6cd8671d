"""Token scoring for the sparse encoder: which backbone tokens are worth refining.

A token scorer maps the backbone tokens to one logit each; the encoder keeps the top-rho tokens of
every image (`transformer.select_tokens`, shared by all scorers). Scorers are chosen by
`MODEL.SPARSE_DETR.SELECTION` from `TOKEN_SCORERS`:

* "dam": the paper's criterion, trained to predict the top tokens of the decoder cross-attention map;
* "objectness": the paper's objectness-score baseline, trained to predict which tokens lie on an object
  (a ground-truth box); same network, so the comparison isolates the criterion.

Interface of a scorer (an `nn.Module` registered with `register_token_scorer(name)`; subclassing
`TokenScorer` and implementing `scoring_target` gives all of it):
    __init__(cfg-built kwargs), from_config(cfg)
    forward(tokens (B, N, C)) -> logits (B, N)
    compute_target(outputs: dict, targets: list[dict] or None) -> dict with "scoring_target" (B, N) float
        in {0, 1} (absent when it needs `targets` and they are None), "metrics" (name -> 0-d tensor,
        logged in training) and other tensors (e.g. "dam"); `outputs` is the model's raw output dict.
    loss(outputs: dict) -> {"loss_mask_prediction": scalar}, using outputs["backbone_mask_prediction"]
        and outputs["scoring_target"].
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from .dam import check_dam_convention, dam_coverage, decoder_attention_map, topk_token_target
from .utils import encoder_anchors

__all__ = ["TOKEN_SCORERS", "register_token_scorer", "get_token_scorer_class", "build_token_scorer", "TokenScorer",
           "DAMTokenScorer", "ObjectnessTokenScorer", "box_token_target"]

TOKEN_SCORERS: Dict[str, type] = {}


def register_token_scorer(name: str):
    """Class decorator: make a scorer selectable as `MODEL.SPARSE_DETR.SELECTION: <name>`."""
    def register(cls):
        if name in TOKEN_SCORERS:
            raise KeyError(f"token scorer {name!r} is already registered")
        TOKEN_SCORERS[name] = cls
        return cls
    return register


def get_token_scorer_class(name: str) -> type:
    """The scorer registered as `name`; ValueError naming the key and the registered names otherwise."""
    if name not in TOKEN_SCORERS:
        raise ValueError(f"MODEL.SPARSE_DETR.SELECTION={name!r} is not available; registered token scorers: "
                         f"{sorted(TOKEN_SCORERS)} (add one with sparse_detr.modeling.register_token_scorer)")
    return TOKEN_SCORERS[name]


def build_token_scorer(cfg) -> nn.Module:
    return get_token_scorer_class(cfg.MODEL.SPARSE_DETR.SELECTION)(cfg)


class TokenScorer(nn.Module):
    """Base class of the scorers: the official scoring network ("MaskPredictor"), the DAM coverage
    diagnostics, and the loss. Subclasses define the training target (`scoring_target`).

    logits = layer2(cat(z_local, mean_over_tokens(z_global))) with (z_local, z_global) = split(layer1(x)).
    The global mean runs over all N tokens of the image, padding included (official behaviour, so the
    scores of an image depend on how much it is padded).
    Loss: mean binary cross-entropy with logits over all tokens of the batch (padding included, as
    officially), named "loss_mask_prediction" whatever the criterion (weight MASK_PREDICTION_COEF).
    """

    @configurable
    def __init__(self, d_model: int = 256, hidden_dim: int = 256, dam_convention: str = "official"):
        super().__init__()
        check_dam_convention(dam_convention)
        self.hidden_dim = hidden_dim
        self.dam_convention = dam_convention
        self.layer1 = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, hidden_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.GELU(),
            nn.Linear(hidden_dim // 2, hidden_dim // 4), nn.GELU(),
            nn.Linear(hidden_dim // 4, 1))

    @classmethod
    def from_config(cls, cfg):
        sd = cfg.MODEL.SPARSE_DETR
        return {"d_model": sd.HIDDEN_DIM, "hidden_dim": sd.HIDDEN_DIM, "dam_convention": sd.DAM_CONVENTION}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N) logits."""
        z_local, z_global = self.layer1(tokens).split(self.hidden_dim // 2, dim=-1)
        z_global = z_global.mean(dim=1, keepdim=True).expand_as(z_global)
        return self.layer2(torch.cat([z_local, z_global], -1)).squeeze(-1)

    @torch.no_grad()
    def decoder_attention_map(self, outputs: Dict) -> torch.Tensor:
        """(B, N) DAM of the raw output dict (needs "sampling_locations_dec", "attn_weights_dec", geometry)."""
        return decoder_attention_map(outputs["sampling_locations_dec"], outputs["attn_weights_dec"],
                                     outputs["spatial_shapes_list"], outputs["level_start_index"],
                                     self.dam_convention)

    @torch.no_grad()
    def dam_correlation(self, outputs: Dict) -> Dict[str, torch.Tensor]:
        """Per image (B,), the share of its DAM mass on its own `sparse_token_nums[i]` selected tokens,
        overall and per level (names as `dam_coverage`); what the evaluator averages."""
        return dam_coverage(self.decoder_attention_map(outputs), outputs["backbone_topk_proposals"],
                            outputs["level_start_index"], counts=outputs["sparse_token_nums"], reduce=False)

    def scoring_target(self, outputs: Dict, dam: torch.Tensor, targets: Optional[List[Dict]]
                       ) -> Optional[torch.Tensor]:
        """(B, N) binary training target, or None when it needs `targets` and they are None."""
        raise NotImplementedError

    @torch.no_grad()
    def compute_target(self, outputs: Dict, targets: Optional[List[Dict]] = None) -> Dict[str, torch.Tensor]:
        """Returns "dam" (B, N), the official `corr_*` coverage "metrics" of the selected tokens
        ("backbone_topk_proposals") and, when available, "scoring_target" (B, N)."""
        dam = self.decoder_attention_map(outputs)
        out = {"dam": dam, "metrics": dam_coverage(dam, outputs["backbone_topk_proposals"],
                                                   outputs["level_start_index"])}
        target = self.scoring_target(outputs, dam, targets)
        if target is not None:
            out["scoring_target"] = target
        return out

    def loss(self, outputs: Dict) -> Dict[str, torch.Tensor]:
        pred = outputs["backbone_mask_prediction"]
        return {"loss_mask_prediction": F.binary_cross_entropy_with_logits(pred, outputs["scoring_target"].to(pred))}


@register_token_scorer("dam")
class DAMTokenScorer(TokenScorer):
    """The paper's scorer. Target: the top-`sparse_token_nums[i]` tokens of the decoder cross-attention
    map of image i (see `dam.py`), padding excluded; needs no ground truth."""

    def scoring_target(self, outputs, dam, targets):
        return topk_token_target(dam, outputs["mask_flatten"], outputs["sparse_token_nums"])


@register_token_scorer("objectness")
class ObjectnessTokenScorer(TokenScorer):
    """The paper's objectness-score baseline: the same network trained on the detection targets
    (`box_token_target`: tokens on a ground-truth box are positives, on every level)."""

    def scoring_target(self, outputs, dam, targets):
        if targets is None:
            return None
        return box_token_target(outputs["mask_flatten"], outputs["spatial_shapes_list"],
                                [t["boxes"] for t in targets])


@torch.no_grad()
def box_token_target(mask_flatten: torch.Tensor, shapes, boxes: List[torch.Tensor]) -> torch.Tensor:
    """Objectness target of every token: 1 if the token lies on a ground-truth box of its image.

    A token is positive when its cell centre (relative to the valid part of its level, as its anchor)
    falls inside a box, or when its cell contains a box's centre (so every box has a positive token on
    every level, however small). Tokens whose anchor is invalid (padding, the official border rule) are
    negatives: the scorer sees zeros there.

    Args:
        mask_flatten: (B, N) bool, True on padding. shapes: (H_l, W_l) per level.
        boxes: per image (n_i, 4) cxcywh normalised to the image's own size.
    Returns:
        (B, N) float {0, 1}.
    """
    anchors, valid = encoder_anchors(mask_flatten, shapes)
    centres = anchors[..., :2].sigmoid()  # (B, N, 2) cell centres in (0, 1) of the valid region
    target = torch.zeros(mask_flatten.shape, dtype=torch.float32, device=mask_flatten.device)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for i, b in enumerate(boxes):
        if len(b) == 0:
            continue
        x0y0, x1y1 = b[:, None, :2] - b[:, None, 2:] / 2, b[:, None, :2] + b[:, None, 2:] / 2  # (n, 1, 2)
        target[i] = ((centres[i] >= x0y0) & (centres[i] <= x1y1)).all(-1).any(0).float()
        for lvl, (h, w) in enumerate(shapes):  # the cell holding each box centre
            level_mask = mask_flatten[i, starts[lvl]:starts[lvl + 1]].view(h, w)
            valid_wh = torch.stack([(~level_mask[0]).sum(), (~level_mask[:, 0]).sum()])
            cell = (b[:, :2] * valid_wh).long().clamp(min=0).minimum(valid_wh - 1)  # (n, 2) col, row
            target[i, starts[lvl] + cell[:, 1] * w + cell[:, 0]] = 1.0
    return target * valid

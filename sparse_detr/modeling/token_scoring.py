"""Token scoring for the sparse encoder: which backbone tokens are worth refining.

A token scorer maps the backbone tokens to one logit each; the encoder keeps the top-rho tokens of
every image. Scorers are chosen by `MODEL.SPARSE_DETR.SELECTION` from `TOKEN_SCORERS`; each defines
how its training target is made (`compute_target`) and is trained with `loss`.

Interface of a scorer (an `nn.Module` registered with `register_token_scorer(name)`):
    __init__(cfg-built kwargs), from_config(cfg)
    forward(tokens (B, N, C)) -> logits (B, N)
    compute_target(outputs: dict, targets: list[dict]) -> dict with "scoring_target" (B, N) float in
        {0, 1}, optionally "metrics" (name -> 0-d tensor, logged in training) and other tensors (e.g.
        "dam"); `outputs` is the model's raw output dict.
    loss(outputs: dict) -> {"loss_mask_prediction": scalar}, using outputs["backbone_mask_prediction"]
        and outputs["scoring_target"].
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from .dam import check_dam_convention, dam_coverage, decoder_attention_map, topk_token_target

__all__ = ["TOKEN_SCORERS", "register_token_scorer", "get_token_scorer_class", "build_token_scorer", "TokenScorer",
           "DAMTokenScorer"]

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
    """Base class of the scorers (interface in the module docstring); provides the common loss, the mean
    binary cross-entropy with logits over all tokens of the batch (padding included, as officially)."""

    def compute_target(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, outputs: Dict) -> Dict[str, torch.Tensor]:
        pred = outputs["backbone_mask_prediction"]
        return {"loss_mask_prediction": F.binary_cross_entropy_with_logits(pred, outputs["scoring_target"].to(pred))}


@register_token_scorer("dam")
class DAMTokenScorer(TokenScorer):
    """The official scoring network ("MaskPredictor"), trained to predict the DAM's top tokens.

    logits = layer2(cat(z_local, mean_over_tokens(z_global))) with (z_local, z_global) = split(layer1(x)).
    The global mean runs over all N tokens of the image, padding included (official behaviour, so the
    scores of an image depend on how much it is padded). Target: the top-`sparse_token_nums[i]` tokens
    of the decoder cross-attention map of image i (see `dam.py`), padding excluded.
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
    def compute_target(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """Returns "dam" (B, N), "scoring_target" (B, N) and the official `corr_*` coverage "metrics";
        needs the decoder's "sampling_locations_dec", "attn_weights_dec", the token geometry,
        "sparse_token_nums" and "backbone_topk_proposals"."""
        dam = decoder_attention_map(outputs["sampling_locations_dec"], outputs["attn_weights_dec"],
                                    outputs["spatial_shapes_list"], outputs["level_start_index"],
                                    self.dam_convention)
        target = topk_token_target(dam, outputs["mask_flatten"], outputs["sparse_token_nums"])
        metrics = dam_coverage(dam, outputs["backbone_topk_proposals"], outputs["level_start_index"])
        return {"dam": dam, "scoring_target": target, "metrics": metrics}

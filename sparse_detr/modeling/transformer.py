"""The Sparse DETR transformer: token flattening, scoring and selection, sparse encoder, two-stage queries,
decoder. Parameter names follow the official `transformer.*` ones; the detection heads are owned by the
meta-architecture and passed in (so each head tensor is registered once)."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import nn

from ..layers.ms_deform_attn_module import MSDeformAttn
from ..layers.position_encoding import box_sine_embedding
from .decoder import Decoder
from .encoder import SparseEncoder
from .token_scoring import build_token_scorer
from .utils import encoder_anchors, encoder_reference_points, inverse_sigmoid, valid_ratio

__all__ = ["SparseDeformableTransformer", "select_tokens"]

HeadPair = Tuple[nn.Module, nn.Module]  # (class head, bbox head)


def select_tokens(scores: torch.Tensor, mask_flatten: torch.Tensor, rho: float
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-rho tokens of every image by `scores`, in one top-k over all levels.

    Args:
        scores: (B, N). mask_flatten: (B, N) bool, True on padding. rho: keep ratio in (0, 1].
    Returns:
        topk_inds (B, K) sorted by descending score, K = max(counts); counts (B,) int32: tokens of
        image i, int(valid_i * rho) + 1 (computed in float32 as officially), at most valid_i. An image's
        first counts[i] indices never point at padding.
    """
    valid = (~mask_flatten).sum(1)
    counts = torch.minimum((valid * rho).int() + 1, valid.int())
    topk_inds = scores.masked_fill(mask_flatten, float("-inf")).topk(int(counts.max()), dim=1).indices
    return topk_inds, counts


class SparseDeformableTransformer(nn.Module):
    """Holds level_embed, enc_output(+_norm), enc_mask_predictor (the token scorer), encoder, decoder and
    pos_trans(+_norm) (two-stage) or reference_points (learned queries). Every step is a method taking
    and returning dicts (documented on each): `flatten` -> `forward_encoder` -> `pre_decoder` ->
    `forward_decoder`."""

    @configurable
    def __init__(self, *, encoder: SparseEncoder, decoder: Decoder, scorer: Optional[nn.Module], d_model: int,
                 num_feature_levels: int, two_stage: bool, eff_query_init: bool, eff_specific_head: bool,
                 num_queries: int):
        """
        Args:
            scorer: token scorer (see token_scoring.py), or None for a dense-only model (rho = 0).
            two_stage: decoder queries from the top `num_queries` encoder tokens; else learned queries.
            eff_query_init: (two-stage) the decoder content queries are the selected encoder tokens.
            eff_specific_head: (two-stage) rank tokens by their best class logit; else by logit 0.
        """
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.eff_query_init = eff_query_init
        self.eff_specific_head = eff_specific_head
        self.num_queries = num_queries
        self.encoder = encoder
        self.decoder = decoder
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage or scorer is not None:  # shared by the scoring network and the two-stage head
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        if two_stage:
            out_dim = d_model if eff_query_init else 2 * d_model
            self.pos_trans = nn.Linear(2 * d_model, out_dim)
            self.pos_trans_norm = nn.LayerNorm(out_dim)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.enc_mask_predictor = scorer
        self._reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        sd = cfg.MODEL.SPARSE_DETR
        return {"encoder": SparseEncoder(cfg), "decoder": Decoder(cfg),
                "scorer": build_token_scorer(cfg) if sd.RHO > 0 else None,
                "d_model": sd.HIDDEN_DIM, "num_feature_levels": sd.NUM_FEATURE_LEVELS,
                "two_stage": sd.TWO_STAGE, "eff_query_init": sd.EFF_QUERY_INIT,
                "eff_specific_head": sd.EFF_SPECIFIC_HEAD, "num_queries": sd.NUM_QUERIES}

    def _reset_parameters(self):
        """Official initialisation: xavier on every matrix, then the attention layers' own init."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    # ------------------------------------------------------------------------------------------ steps
    def flatten(self, srcs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                pos_embeds: Sequence[torch.Tensor]) -> Dict:
        """Flatten the levels into one token sequence (the token part of `pre_transformer`).

        Args:
            srcs: per level (B, C, H_l, W_l) projected features. masks: per level (B, H_l, W_l) bool,
                True on padding. pos_embeds: per level (B, C, H_l, W_l) sine embeddings.
        Returns:
            "src" (B, N, C); "pos" (B, N, C) position + level embedding; "mask_flatten" (B, N);
            "spatial_shapes" (L, 2) int64 (H, W) and "spatial_shapes_list" (the same as Python ints);
            "level_start_index" (L,); "valid_ratios" (B, L, 2) (w, h); "anchors" (B, N, 4)
            inverse-sigmoid anchor boxes, +inf where invalid; "anchor_valid" (B, N) bool.
        """
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                         for lvl, p in enumerate(pos_embeds)], 1)
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        anchors, anchor_valid = encoder_anchors(mask_flatten, shapes)
        return {"src": src, "pos": pos, "mask_flatten": mask_flatten, "spatial_shapes": spatial_shapes,
                "spatial_shapes_list": shapes, "level_start_index": level_start_index,
                "valid_ratios": torch.stack([valid_ratio(m) for m in masks], 1),
                "anchors": anchors, "anchor_valid": anchor_valid}

    def project_tokens(self, tokens: torch.Tensor, anchor_valid: torch.Tensor) -> torch.Tensor:
        """enc_output_norm(enc_output(tokens)), tokens with invalid anchors zeroed first (official)."""
        return self.enc_output_norm(self.enc_output(tokens.masked_fill(~anchor_valid[..., None], 0.0)))

    def forward_encoder(self, x: Dict, rho: float, aux_heads: Sequence[HeadPair] = (),
                        return_sampling: bool = False) -> Dict:
        """Scoring network, top-rho token selection and the (sparse) encoder.

        Args:
            x: output of `flatten`. rho: keep ratio; 0 runs the dense encoder without scoring.
            aux_heads: encoder auxiliary (class, bbox) heads for layers 0, 1, ...; () skips them.
        Returns:
            "memory" (B, N, C) and "aux_outputs_enc" (see SparseEncoder); with rho > 0 also
            "backbone_mask_prediction" (B, N) scoring logits, padding set to the batch minimum (official),
            "backbone_topk_proposals" (B, K) selected tokens sorted by score, "sparse_token_nums" (B,)
            int32 per-image counts; with return_sampling the encoder sampling locations and weights.
        """
        out = {}
        topk_inds = counts = None
        if rho > 0:
            if self.enc_mask_predictor is None:
                raise ValueError("rho > 0 needs the token scorer, which is built only when MODEL.SPARSE_DETR.RHO > 0")
            scores = self.enc_mask_predictor(self.project_tokens(x["src"] + x["pos"], x["anchor_valid"]))
            topk_inds, counts = select_tokens(scores, x["mask_flatten"], rho)
            out["backbone_mask_prediction"] = scores.masked_fill(x["mask_flatten"], scores.min())
            out["backbone_topk_proposals"] = topk_inds
            out["sparse_token_nums"] = counts
        reference_points = encoder_reference_points(x["spatial_shapes_list"], x["valid_ratios"])
        out.update(self.encoder(x["src"], x["pos"], reference_points, x["spatial_shapes"],
                                x["level_start_index"], x["mask_flatten"], topk_inds=topk_inds, counts=counts,
                                aux_heads=aux_heads, anchors=x["anchors"], return_sampling=return_sampling))
        return out

    def pre_decoder(self, x: Dict, memory: torch.Tensor, proposal_heads: Optional[HeadPair] = None,
                    query_embed: Optional[torch.Tensor] = None, extra_queries: int = 0) -> Dict:
        """Decoder queries: two-stage (top `num_queries` encoder tokens) or learned.

        Args:
            x: output of `flatten`. memory: (B, N, C) encoder output.
            proposal_heads: (two-stage) the (class, bbox) head scoring every token.
            query_embed: (learned queries) (Q, 2C) embedding: query position, content.
            extra_queries: (two-stage) take the top `num_queries + extra_queries` tokens, in score order
                (the first `num_queries` are the ones taken without extras).
        Returns:
            "tgt", "query_pos" (B, Q, C); "reference_points" (B, Q, 4) detached boxes (two-stage) or
            (B, Q, 2) points; two-stage also "enc_outputs" {"pred_logits" (B, N, classes), "pred_boxes"
            (B, N, 4)} over all tokens and "topk_proposals" (B, Q) the chosen token indices.
        """
        if not self.two_stage:
            query_pos, tgt = query_embed.split(self.d_model, dim=1)
            B = memory.shape[0]
            query_pos, tgt = query_pos[None].expand(B, -1, -1), tgt[None].expand(B, -1, -1)
            return {"tgt": tgt, "query_pos": query_pos, "reference_points": self.reference_points(query_pos).sigmoid()}
        class_head, bbox_head = proposal_heads
        output_memory = self.project_tokens(memory, x["anchor_valid"])
        logits = class_head(output_memory)
        coords_unact = bbox_head(output_memory) + x["anchors"]
        fg_score = logits.max(-1).values if self.eff_specific_head else logits[..., 0]
        topk = fg_score.topk(min(self.num_queries + extra_queries, fg_score.shape[1]), dim=1).indices
        topk_coords_unact = coords_unact.gather(1, topk[..., None].expand(-1, -1, 4)).detach()
        pos_trans_out = self.box_query_embedding(topk_coords_unact)
        if self.eff_query_init:
            query_pos = pos_trans_out
            tgt = memory.gather(1, topk[..., None].expand(-1, -1, memory.shape[-1]))
        else:
            query_pos, tgt = pos_trans_out.split(self.d_model, dim=-1)
        return {"tgt": tgt, "query_pos": query_pos, "reference_points": topk_coords_unact.sigmoid(),
                "enc_outputs": {"pred_logits": logits, "pred_boxes": coords_unact.sigmoid()},
                "topk_proposals": topk}

    def box_query_embedding(self, coords_unact: torch.Tensor) -> torch.Tensor:
        """(two-stage) pos_trans_norm(pos_trans(sine embedding)) of (B, Q, 4) inverse-sigmoid boxes: (B, Q, C)
        query positions with eff_query_init, else (B, Q, 2C) positions and contents."""
        return self.pos_trans_norm(self.pos_trans(box_sine_embedding(coords_unact, self.d_model // 2)))

    def denoising_queries(self, contents: torch.Tensor, boxes: torch.Tensor) -> Dict:
        """(two-stage) Decoder queries at given boxes (denoising.py): contents (B, Q, C), boxes (B, Q, 4)
        cxcywh in [0, 1]; returns "tgt", "query_pos" (B, Q, C), "reference_points" (B, Q, 4)."""
        query_pos = self.box_query_embedding(inverse_sigmoid(boxes))[..., :self.d_model]
        return {"tgt": contents, "query_pos": query_pos, "reference_points": boxes}

    def forward_decoder(self, x: Dict, memory: torch.Tensor, queries: Dict,
                        bbox_heads: Optional[List[nn.Module]] = None,
                        self_attn_mask: Optional[torch.Tensor] = None) -> Dict:
        """Run the decoder on `queries` (output of `pre_decoder`); see `Decoder.forward` for the output."""
        return self.decoder(queries["tgt"], queries["query_pos"], queries["reference_points"], memory,
                            x["spatial_shapes"], x["level_start_index"], x["valid_ratios"], x["mask_flatten"],
                            bbox_heads=bbox_heads, self_attn_mask=self_attn_mask)

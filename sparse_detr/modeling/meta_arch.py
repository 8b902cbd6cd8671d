"""`SparseDETR`: the Detectron2 meta-architecture of Sparse DETR (and of Deformable DETR with RHO 0)."""
import copy
import math
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import (BACKBONE_REGISTRY, META_ARCH_REGISTRY, Backbone, build_backbone,
                                  detector_postprocess)
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn
from torchvision.ops import box_convert

from ..layers.onednn_linear import use_onednn_linears
from ..layers.onednn_stages import use_onednn_stages
from ..layers.position_encoding import PositionEmbeddingSine
from .backbone import detach_stages
from .criterion import DENOISING_SUFFIX, ONE_TO_MANY_SUFFIX, SetCriterion, build_weight_dict
from .denoising import denoising_indices, denoising_self_attn_mask, noised_ground_truth
from .dam import check_dam_convention
from .matcher import HungarianMatcher
from .one_to_many import group_self_attn_mask, repeat_targets, split_query_groups
from .token_scoring import get_token_scorer_class
from .transformer import SparseDeformableTransformer
from .utils import MLP, GroupNorm, box_from_delta, level_masks, to_float32

__all__ = ["SparseDETR", "validate_sparse_detr_config", "check_ground_truth"]


def validate_sparse_detr_config(cfg) -> None:
    """Raise ValueError naming the offending MODEL.SPARSE_DETR key for inconsistent settings."""
    sd = cfg.MODEL.SPARSE_DETR
    key = "MODEL.SPARSE_DETR."
    for name in ("RHO", "TEST_RHO"):
        value = getattr(sd, name)
        if value > 1 or (value < 0 and name == "RHO"):
            allowed = "[0, 1]" if name == "RHO" else "[0, 1] (or negative: same as RHO)"
            raise ValueError(f"{key}{name}={value} is outside {allowed}")
    if sd.TEST_RHO > 0 and sd.RHO == 0:
        raise ValueError(f"{key}TEST_RHO={sd.TEST_RHO} > 0 needs the scoring network, which is built only when "
                         f"{key}RHO > 0 (RHO=0 is the dense encoder)")
    if cfg.MODEL.BACKBONE.NAME not in BACKBONE_REGISTRY:
        raise ValueError(f"MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r} is not a registered backbone; registered: "
                         f"{sorted(name for name, _ in BACKBONE_REGISTRY)} (import the module that registers it)")
    get_token_scorer_class(sd.SELECTION)
    check_dam_convention(sd.DAM_CONVENTION)
    if sd.HIDDEN_DIM % sd.NHEADS != 0:
        raise ValueError(f"{key}HIDDEN_DIM={sd.HIDDEN_DIM} must be divisible by {key}NHEADS={sd.NHEADS}")
    if sd.HIDDEN_DIM % 32 != 0:
        raise ValueError(f"{key}HIDDEN_DIM={sd.HIDDEN_DIM} must be a multiple of 32 (GroupNorm(32) input projections)")
    if sd.NUM_FEATURE_LEVELS < len(sd.IN_FEATURES):
        raise ValueError(f"{key}NUM_FEATURE_LEVELS={sd.NUM_FEATURE_LEVELS} must be >= len({key}IN_FEATURES)="
                         f"{len(sd.IN_FEATURES)}; extra levels come from stride-2 convolutions on the last one")
    if not sd.TWO_STAGE:
        for name in ("EFF_QUERY_INIT", "EFF_SPECIFIC_HEAD"):
            if getattr(sd, name):
                raise ValueError(f"{key}{name}=True applies to two-stage queries only: set {key}TWO_STAGE=True "
                                 f"or {key}{name}=False")
    for name in ("ENC_LAYERS", "DEC_LAYERS", "NUM_QUERIES", "ONE_TO_MANY_REPEATS", "ENC_AUX_REPEATS"):
        if getattr(sd, name) < 1:
            raise ValueError(f"{key}{name}={getattr(sd, name)} must be >= 1")
    if sd.ONE_TO_MANY_QUERIES < 0:
        raise ValueError(f"{key}ONE_TO_MANY_QUERIES={sd.ONE_TO_MANY_QUERIES} must be >= 0 (0: off)")
    if sd.ONE_TO_MANY_QUERIES > 0 and not sd.TWO_STAGE:
        raise ValueError(f"{key}ONE_TO_MANY_QUERIES={sd.ONE_TO_MANY_QUERIES} needs two-stage queries: set "
                         f"{key}TWO_STAGE=True or {key}ONE_TO_MANY_QUERIES=0")
    if sd.DN_GROUPS < 0:
        raise ValueError(f"{key}DN_GROUPS={sd.DN_GROUPS} must be >= 0 (0: off)")
    if sd.DN_GROUPS > 0:
        if not sd.TWO_STAGE:
            raise ValueError(f"{key}DN_GROUPS={sd.DN_GROUPS} needs two-stage queries (box references): set "
                             f"{key}TWO_STAGE=True or {key}DN_GROUPS=0")
        if sd.ONE_TO_MANY_QUERIES > 0:
            raise ValueError(f"{key}DN_GROUPS={sd.DN_GROUPS} and {key}ONE_TO_MANY_QUERIES="
                             f"{sd.ONE_TO_MANY_QUERIES} cannot be combined: set one of them to 0")
        if sd.DN_BOX_NOISE_SCALE < 0:
            raise ValueError(f"{key}DN_BOX_NOISE_SCALE={sd.DN_BOX_NOISE_SCALE} must be >= 0")
        if not 0 <= sd.DN_LABEL_NOISE_RATIO <= 1:
            raise ValueError(f"{key}DN_LABEL_NOISE_RATIO={sd.DN_LABEL_NOISE_RATIO} is outside [0, 1]")
    if sd.LOOK_FORWARD_TWICE and not sd.WITH_BOX_REFINE:
        raise ValueError(f"{key}LOOK_FORWARD_TWICE=True acts on refined boxes: set {key}WITH_BOX_REFINE=True "
                         f"or {key}LOOK_FORWARD_TWICE=False")
    if sd.ONE_TO_MANY_QUERIES > 0 and sd.ONE_TO_MANY_LOSS_WEIGHT <= 0:
        raise ValueError(f"{key}ONE_TO_MANY_LOSS_WEIGHT={sd.ONE_TO_MANY_LOSS_WEIGHT} must be > 0 when "
                         f"{key}ONE_TO_MANY_QUERIES > 0")


def check_ground_truth(instances: Instances, num_classes: int) -> None:
    """Raise ValueError for ground truth the losses would silently get wrong or fail on cryptically: a class
    outside [0, num_classes) or a box that is not finite XYXY with x1 <= x2 and y1 <= y2."""
    classes, boxes = instances.gt_classes, instances.gt_boxes.tensor
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if len(bad):
        raise ValueError(f"ground-truth class {int(bad[0])} is outside [0, {num_classes}): "
                         f"MODEL.SPARSE_DETR.NUM_CLASSES={num_classes} must be the dataset's number of classes "
                         f"(len(thing_classes), contiguous ids as Detectron2's dataset loaders map them)")
    bad = ~torch.isfinite(boxes).all(1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        raise ValueError(f"ground-truth box {boxes[bad][0].tolist()} is not a finite XYXY box with x1 <= x2, y1 <= y2")


@META_ARCH_REGISTRY.register()
class SparseDETR(nn.Module):
    """Sparse DETR (Roh et al., ICLR 2022) on a Detectron2 backbone.

    Pipeline (each step a method with a documented dict interface):
    `preprocess_image` -> `pre_transformer` (backbone, input projections, masks, positions, flatten)
    -> `forward_encoder` (scoring network, top-rho selection, sparse encoder, encoder aux heads)
    -> `pre_decoder` (two-stage queries) -> `forward_decoder` -> `forward_heads`.
    `forward_raw(batched_inputs)` returns the official output dict (see `forward_raw`); `forward` returns
    weighted losses in training and `[{"instances": Instances}]` in inference.

    Heads (official names and order): `class_embed.i` / `bbox_embed.i` for the decoder layers
    i < DEC_LAYERS, then the two-stage proposal head (i = DEC_LAYERS), then the encoder auxiliary heads;
    a single shared head (index 0) unless box refinement or the encoder auxiliary loss is on.
    """

    @configurable
    def __init__(self, *, backbone: Backbone, in_features: Sequence[str], transformer: SparseDeformableTransformer,
                 criterion: SetCriterion, weight_dict: Dict[str, float], num_classes: int, num_queries: int,
                 num_feature_levels: int, rho: float, test_rho: float, aux_loss: bool, with_box_refine: bool,
                 use_enc_aux_loss: bool, enc_aux_heads_at_inference: bool, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], detections_per_image: int = 100, test_dam_correlation: bool = False,
                 cpu_onednn_linear: bool = True, cpu_onednn_stages: bool = True, one_to_many_queries: int = 0,
                 one_to_many_repeats: int = 6,
                 dn_groups: int = 0, dn_box_noise_scale: float = 0.4, dn_label_noise_ratio: float = 0.2):
        """
        Args:
            backbone: gives `in_features` (strides increasing). transformer: see SparseDeformableTransformer.
            criterion: Hungarian set criterion; weight_dict: weight of every loss name.
            rho, test_rho: keep ratios in training and at inference (0: dense encoder).
            aux_loss: decoder auxiliary outputs and losses. with_box_refine: iterative box refinement
                (and one head per prediction). use_enc_aux_loss: encoder auxiliary heads after every
                encoder layer but the last. enc_aux_heads_at_inference: run them in inference too.
            pixel_mean, pixel_std: of the input images, in their units (cfg.MODEL.PIXEL_MEAN/STD).
            test_dam_correlation: in inference with rho > 0, add "dam_correlation" (name -> float, see
                `TokenScorer.dam_correlation`) to every image's output dict.
            cpu_onednn_linear: make every `nn.Linear` (backbone included) a `OneDNNLinear`, faster in
                CPU float32 inference and identical elsewhere.
            cpu_onednn_stages: run the backbone's ResNet stages on oneDNN tensors in CPU float32 wherever
                no gradient flows through them (frozen stages in training, all in inference; see
                sparse_detr/layers/onednn_stages.py); the same outputs to float rounding.
            one_to_many_queries, one_to_many_repeats: (two-stage, training only) extra queries matched to
                the ground truth repeated `one_to_many_repeats` times (see one_to_many.py); their losses
                need `weight_dict` entries with ONE_TO_MANY_SUFFIX (build_weight_dict's one_to_many_weight).
            dn_groups, dn_box_noise_scale, dn_label_noise_ratio: (two-stage, training only) denoising query
                groups (see denoising.py); their losses need `weight_dict` entries with DENOISING_SUFFIX.
        """
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.transformer = transformer
        self.criterion = criterion
        self.weight_dict = dict(weight_dict)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.rho = rho
        self.test_rho = test_rho
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.use_enc_aux_loss = use_enc_aux_loss
        self.enc_aux_heads_at_inference = enc_aux_heads_at_inference
        self.detections_per_image = detections_per_image
        self.test_dam_correlation = test_dam_correlation
        self.one_to_many_queries = one_to_many_queries
        self.one_to_many_repeats = one_to_many_repeats
        self.dn_groups = dn_groups
        self.dn_box_noise_scale = dn_box_noise_scale
        self.dn_label_noise_ratio = dn_label_noise_ratio
        # Stored for images scaled by 1/255 (divided in float64: exactly torchvision's Normalize constants).
        for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64).div(255).float().view(-1, 1, 1), False)

        d_model = transformer.d_model
        shapes = backbone.output_shape()
        self.input_proj = nn.ModuleList()
        in_channels = [shapes[f].channels for f in self.in_features]
        for lvl in range(num_feature_levels):
            if lvl < len(in_channels):
                conv = nn.Conv2d(in_channels[lvl], d_model, kernel_size=1)
            else:  # extra level: stride-2 conv on the raw last backbone map, then on the previous level
                c_in = in_channels[-1] if lvl == len(in_channels) else d_model
                conv = nn.Conv2d(c_in, d_model, kernel_size=3, stride=2, padding=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.constant_(conv.bias, 0)
            self.input_proj.append(nn.Sequential(conv, GroupNorm(32, d_model)))
        self.position_embedding = PositionEmbeddingSine(num_pos_feats=d_model // 2)

        self.num_dec_layers = transformer.decoder.num_layers
        self.num_enc_aux = transformer.encoder.num_layers - 1 if use_enc_aux_loss else 0
        two_stage = transformer.two_stage
        num_pred = self.num_dec_layers + int(two_stage) + self.num_enc_aux
        class_head = nn.Linear(d_model, num_classes)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
        bbox_head = MLP(d_model, d_model, 4, 3)
        nn.init.constant_(bbox_head.layers[-1].weight, 0)
        nn.init.constant_(bbox_head.layers[-1].bias, 0)
        copies = num_pred if (with_box_refine or use_enc_aux_loss) else 1  # official: clones or one shared
        self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(copies))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_head) for _ in range(copies))
        if not two_stage:  # official: head 0 starts with small boxes; two-stage keeps 0 everywhere
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)
        if dn_groups > 0:  # content of the denoising queries: one embedding per class
            self.dn_label_embed = nn.Embedding(num_classes, d_model)
        if cpu_onednn_linear:
            use_onednn_linears(self)
        if cpu_onednn_stages:
            use_onednn_stages(self.backbone)

    @classmethod
    def from_config(cls, cfg):
        validate_sparse_detr_config(cfg)
        sd = cfg.MODEL.SPARSE_DETR
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        detach_stages(backbone, cfg.MODEL.BACKBONE.DETACHED_STAGES)
        missing = [f for f in sd.IN_FEATURES if f not in backbone.output_shape()]
        if missing:
            raise ValueError(f"MODEL.SPARSE_DETR.IN_FEATURES {missing} are not outputs of the backbone "
                             f"({sorted(backbone.output_shape())})")
        matcher = HungarianMatcher(cost_class=sd.SET_COST_CLASS, cost_bbox=sd.SET_COST_BBOX,
                                   cost_giou=sd.SET_COST_GIOU, focal_alpha=sd.FOCAL_ALPHA)
        criterion = SetCriterion(sd.NUM_CLASSES, matcher, focal_alpha=sd.FOCAL_ALPHA,
                                 enc_class_specific=sd.EFF_SPECIFIC_HEAD, class_loss=sd.CLASS_LOSS,
                                 enc_aux_repeats=sd.ENC_AUX_REPEATS)
        weight_dict = build_weight_dict(
            sd.CLS_LOSS_COEF, sd.BBOX_LOSS_COEF, sd.GIOU_LOSS_COEF, sd.MASK_PREDICTION_COEF,
            dec_layers=sd.DEC_LAYERS if sd.AUX_LOSS else 1, two_stage=sd.TWO_STAGE,
            enc_aux_layers=sd.ENC_LAYERS - 1 if sd.USE_ENC_AUX_LOSS else 0,
            one_to_many_weight=sd.ONE_TO_MANY_LOSS_WEIGHT if sd.ONE_TO_MANY_QUERIES > 0 else 0.0,
            denoising=sd.DN_GROUPS > 0)
        return {
            "backbone": backbone, "in_features": sd.IN_FEATURES, "transformer": SparseDeformableTransformer(cfg),
            "criterion": criterion, "weight_dict": weight_dict, "num_classes": sd.NUM_CLASSES,
            "num_queries": sd.NUM_QUERIES, "num_feature_levels": sd.NUM_FEATURE_LEVELS, "rho": sd.RHO,
            "test_rho": sd.TEST_RHO if sd.TEST_RHO >= 0 else sd.RHO, "aux_loss": sd.AUX_LOSS,
            "with_box_refine": sd.WITH_BOX_REFINE, "use_enc_aux_loss": sd.USE_ENC_AUX_LOSS,
            "enc_aux_heads_at_inference": sd.ENC_AUX_HEADS_AT_INFERENCE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE, "test_dam_correlation": sd.TEST_DAM_CORRELATION,
            "cpu_onednn_linear": sd.CPU_ONEDNN_LINEAR, "cpu_onednn_stages": sd.CPU_ONEDNN_STAGES,
            "one_to_many_queries": sd.ONE_TO_MANY_QUERIES,
            "one_to_many_repeats": sd.ONE_TO_MANY_REPEATS, "dn_groups": sd.DN_GROUPS,
            "dn_box_noise_scale": sd.DN_BOX_NOISE_SCALE, "dn_label_noise_ratio": sd.DN_LABEL_NOISE_RATIO,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------------------------------ heads
    def _heads(self, index: int):
        """(class head, bbox head) number `index` in the official order (index 0 when shared)."""
        i = index if len(self.class_embed) > 1 else 0
        return self.class_embed[i], self.bbox_embed[i]

    def decoder_heads(self):
        return [self._heads(i) for i in range(self.num_dec_layers)]

    def proposal_heads(self):
        return self._heads(self.num_dec_layers)

    def encoder_aux_heads(self):
        first = self.num_dec_layers + int(self.transformer.two_stage)
        return [self._heads(first + i) for i in range(self.num_enc_aux)]

    # ------------------------------------------------------------------------------------------ steps
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad (bottom/right, zeros after normalisation) to the largest image.

        (x - PIXEL_MEAN) / PIXEL_STD is evaluated as (x / 255 - pixel_mean) / pixel_std with the buffers
        holding PIXEL_MEAN / 255 and PIXEL_STD / 255: the float32 rounding of torchvision's ToTensor +
        Normalize that the official model sees (bit-identical inputs for 0..255 images).
        """
        images = [(x["image"].to(self.device).float() / 255 - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images)

    def pre_transformer(self, images: ImageList) -> Dict:
        """Backbone, input projections, padding masks from `images.image_sizes`, sine positions, flatten.

        Returns:
            the dict of `SparseDeformableTransformer.flatten` ("src", "pos", "mask_flatten",
            "spatial_shapes", "spatial_shapes_list", "level_start_index", "valid_ratios", "anchors",
            "anchor_valid").
        """
        x = images.tensor
        # oneDNN runs channels_last convolutions faster on CPU: -25 % backbone time in inference; in bfloat16
        # training -20 % for its forward + backward (the stem's max pool alone: 17 -> 1 ms on 2 x 64 x 208 x
        # 208). Not in float32 training, where its backward is slower: main-job steps 1.62 s channels_last
        # against 1.52 s NCHW on a 2-core AVX2 CPU (`benchmark_train_step.py --memory-format`).
        if x.device.type == "cpu" and (not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
            x = x.contiguous(memory_format=torch.channels_last)
        sizes = torch.as_tensor(images.image_sizes, device=x.device)  # (B, 2) (h, w)
        image_mask = ((torch.arange(x.shape[-2], device=x.device)[None, :, None] >= sizes[:, 0, None, None])
                      | (torch.arange(x.shape[-1], device=x.device)[None, None, :] >= sizes[:, 1, None, None]))
        features = self.backbone(x)
        feats = [features[f] for f in self.in_features]
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for proj in list(self.input_proj)[len(feats):]:
            srcs.append(proj(feats[-1] if len(srcs) == len(feats) else srcs[-1]))
        masks = level_masks(image_mask, [s.shape[-2:] for s in srcs])
        pos = [self.position_embedding(m).to(s.dtype) for m, s in zip(masks, srcs)]
        return self.transformer.flatten(srcs, masks, pos)

    def forward_encoder(self, x: Dict, rho: float, with_aux: bool, return_sampling: bool = False) -> Dict:
        """See `SparseDeformableTransformer.forward_encoder`; `with_aux` runs the encoder aux heads."""
        aux_heads = self.encoder_aux_heads() if with_aux else ()
        return self.transformer.forward_encoder(x, rho, aux_heads, return_sampling)

    def pre_decoder(self, x: Dict, memory: torch.Tensor, extra_queries: int = 0) -> Dict:
        """See `SparseDeformableTransformer.pre_decoder` (`extra_queries`: two-stage only)."""
        if self.transformer.two_stage:
            return self.transformer.pre_decoder(x, memory, proposal_heads=self.proposal_heads(),
                                                extra_queries=extra_queries)
        return self.transformer.pre_decoder(x, memory, query_embed=self.query_embed.weight)

    def forward_decoder(self, x: Dict, memory: torch.Tensor, queries: Dict,
                        self_attn_mask: Optional[torch.Tensor] = None) -> Dict:
        """See `Decoder.forward`; refines boxes with the decoder bbox heads when WITH_BOX_REFINE."""
        bbox_heads = [b for _, b in self.decoder_heads()] if self.with_box_refine else None
        return self.transformer.forward_decoder(x, memory, queries, bbox_heads, self_attn_mask)

    def forward_heads(self, dec: Dict, all_layers: bool) -> Dict:
        """Per decoder layer: class logits and boxes relative to the layer's reference.

        Args:
            all_layers: heads on every layer's output (AUX_LOSS on), else only on the last one.
        Returns:
            "pred_logits" (B, Q, classes), "pred_boxes" (B, Q, 4) cxcywh normalised to each image's
            own size, of the last layer; with `all_layers` "aux_outputs": the same for the other layers.
        """
        layers = range(self.num_dec_layers) if all_layers else [self.num_dec_layers - 1]
        preds = []
        for lvl in layers:
            class_head, bbox_head = self._heads(lvl)
            hs = dec["hs"][lvl]
            boxes = box_from_delta(bbox_head(hs), dec["references"][lvl])
            preds.append({"pred_logits": class_head(hs), "pred_boxes": boxes})
        out = dict(preds[-1])
        if all_layers:
            out["aux_outputs"] = preds[:-1]
        return out

    def run(self, images: ImageList, rho: float, with_enc_aux: bool, raw: bool = False,
            targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict:
        """The whole network on preprocessed images; returns the raw output dict (see `forward_raw`).
        In eval mode without `raw`, the decoder's auxiliary outputs are not computed. In training, the
        predictions of the extra query groups are under "one_to_many_outputs" (one-to-many queries) or
        "denoising_outputs" (denoising queries, built from `targets`; with "denoising_group_size"), each
        with "pred_logits", "pred_boxes", "aux_outputs"; every other key is about the one-to-one queries."""
        x = self.pre_transformer(images)
        enc = self.forward_encoder(x, rho, with_enc_aux, return_sampling=raw)
        extra = self.one_to_many_queries if self.training else 0
        queries = self.pre_decoder(x, enc["memory"], extra)
        num_total = queries["tgt"].shape[1]
        num_one_to_one = min(self.num_queries, num_total)
        device = images.tensor.device
        mask = group_self_attn_mask(num_one_to_one, num_total, device) if extra else None
        dn_group_size = 0
        if self.training and self.dn_groups > 0 and targets is not None:
            labels, boxes, dn_group_size = noised_ground_truth(targets, self.dn_groups, self.dn_box_noise_scale,
                                                               self.dn_label_noise_ratio, self.num_classes)
            dn = self.transformer.denoising_queries(self.dn_label_embed(labels).to(queries["tgt"].dtype), boxes)
            queries = {**queries, **{k: torch.cat([queries[k], dn[k].to(queries[k].dtype)], 1) for k in dn}}
            mask = denoising_self_attn_mask(num_total, self.dn_groups, dn_group_size, device)
        dec = self.forward_decoder(x, enc["memory"], queries, mask)
        dec_extra = None
        if queries["tgt"].shape[1] > num_one_to_one:
            dec, dec_extra = split_query_groups(dec, num_one_to_one)
        # inference needs only the last layer's heads (the loss and the official output dict need all)
        out = self.forward_heads(dec, all_layers=self.aux_loss and (self.training or raw))
        if dec_extra is not None:
            name = "denoising_outputs" if dn_group_size else "one_to_many_outputs"
            out[name] = self.forward_heads(dec_extra, all_layers=self.aux_loss)
            if dn_group_size:
                out["denoising_group_size"] = dn_group_size
        for key in ("backbone_mask_prediction", "backbone_topk_proposals", "sparse_token_nums",
                    "sampling_locations_enc", "attn_weights_enc"):
            if key in enc:
                out[key] = enc[key]
        if with_enc_aux and self.num_enc_aux:
            out["aux_outputs_enc"] = enc["aux_outputs_enc"]
        if "enc_outputs" in queries:
            out["enc_outputs"] = queries["enc_outputs"]
        for key in ("spatial_shapes", "spatial_shapes_list", "level_start_index", "mask_flatten", "valid_ratios"):
            out[key] = x[key]
        out["sampling_locations_dec"] = dec["sampling_locations_dec"]
        out["attn_weights_dec"] = dec["attn_weights_dec"]
        if raw:
            out["memory"] = enc["memory"]
        return out

    def forward_raw(self, batched_inputs: List[Dict], rho: Optional[float] = None) -> Dict:
        """The official output dict for `batched_inputs`, with every head (encoder aux heads included).

        Keys (official names): "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) cxcywh normalised to each
        image's own size; "aux_outputs" (decoder layers 0 .. L-2, if AUX_LOSS); "enc_outputs" (two-stage,
        all N tokens); "aux_outputs_enc" (encoder aux heads, K selected tokens); "backbone_mask_prediction"
        (B, N); "backbone_topk_proposals" (B, K); "sparse_token_nums" (B,); "sampling_locations_dec"
        (B, Ld, Q, M, L, P, 2); "attn_weights_dec"; "spatial_shapes"; "level_start_index"; "mask_flatten";
        extras: "spatial_shapes_list", "valid_ratios", "memory" (B, N, C), "sampling_locations_enc",
        "attn_weights_enc" (B, Le, K or N, ...), and with rho > 0 the scorer's "dam" (B, N), "metrics"
        (official `corr_*`) and "scoring_target" (B, N) (for SELECTION "objectness" only when the inputs
        have "instances"). Keys that need inputs' "instances" are absent.
        rho defaults to RHO in training mode and TEST_RHO in eval mode.
        """
        rho = self.current_rho() if rho is None else rho
        images = self.preprocess_image(batched_inputs)
        out = self.run(images, rho, with_enc_aux=True, raw=True)
        if rho > 0:
            targets = self.prepare_targets(batched_inputs, images) if "instances" in batched_inputs[0] else None
            out.update(self.transformer.enc_mask_predictor.compute_target(out, targets))
        return out

    def current_rho(self) -> float:
        return self.rho if self.training else self.test_rho

    # ------------------------------------------------------------------------------------------ train / test
    def forward(self, batched_inputs: List[Dict]):
        """Detectron2 interface: weighted losses in training, `[{"instances": Instances}]` in inference."""
        images = self.preprocess_image(batched_inputs)
        rho = self.current_rho()
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            out = self.run(images, rho, with_enc_aux=True, targets=targets)
            # Under autocast (SOLVER.AMP.ENABLED) the matching and the losses still run in float32.
            with torch.autocast(images.tensor.device.type, enabled=False):
                losses = self.losses(to_float32(out), targets)
            return {k: v * self.weight_dict[k] for k, v in losses.items()}
        out = self.run(images, rho, with_enc_aux=self.enc_aux_heads_at_inference)
        results = self.postprocess(out, images, batched_inputs)
        if self.test_dam_correlation and rho > 0:
            corr = self.transformer.enc_mask_predictor.dam_correlation(out)
            for i, result in enumerate(results):
                result["dam_correlation"] = {name: float(v[i]) for name, v in corr.items()}
        return results

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict[str, torch.Tensor]]:
        """Ground truth of each image: "labels" (n,) and "boxes" (n, 4) cxcywh normalised to its size."""
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            if "instances" not in x:
                raise ValueError("training needs every input's ground truth as 'instances' (gt_boxes, gt_classes; "
                                 "empty for an image without objects): give each dataset dict an 'annotations' list")
            check_ground_truth(x["instances"], self.num_classes)
            inst = x["instances"].to(self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(inst.gt_boxes.tensor / scale, "xyxy", "cxcywh")
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    def losses(self, out: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """Unweighted losses: the criterion's (every prediction set) and the scoring loss (rho > 0); in
        training the scorer's diagnostics (official `corr_*`) go to the event storage."""
        losses = self.criterion(out, targets)
        if "one_to_many_outputs" in out:
            many = self.criterion(out["one_to_many_outputs"], repeat_targets(targets, self.one_to_many_repeats))
            losses.update({k + ONE_TO_MANY_SUFFIX: v for k, v in many.items()})
        if "denoising_outputs" in out:
            indices = denoising_indices(targets, self.dn_groups, out["denoising_group_size"])
            dn = self.criterion(out["denoising_outputs"], repeat_targets(targets, self.dn_groups), indices)
            losses.update({k + DENOISING_SUFFIX: v for k, v in dn.items()})
        if "backbone_mask_prediction" in out:
            scorer = self.transformer.enc_mask_predictor
            out = {**out, **scorer.compute_target(out, targets)}
            losses.update(scorer.loss(out))
            if self.training:
                storage = get_event_storage()
                for name, value in out.get("metrics", {}).items():
                    storage.put_scalar(name, float(value))
        return losses

    def postprocess(self, out: Dict, images: ImageList, batched_inputs: List[Dict]) -> List[Dict]:
        """Top `detections_per_image` (query, class) pairs by sigmoid score, boxes rescaled to the
        requested output size ("height"/"width" of each input, default its input size)."""
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        B, Q, C = logits.shape
        scores, index = logits.sigmoid().view(B, -1).topk(min(self.detections_per_image, Q * C), dim=1)
        labels = index % C
        boxes = box_convert(boxes.gather(1, (index // C)[..., None].expand(-1, -1, 4)), "cxcywh", "xyxy")
        results = []
        for i, (h, w) in enumerate(images.image_sizes):
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(boxes[i] * torch.as_tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device))
            inst.scores = scores[i]
            inst.pred_classes = labels[i]
            x = batched_inputs[i]
            results.append({"instances": detector_postprocess(inst, x.get("height", h), x.get("width", w))})
        return results

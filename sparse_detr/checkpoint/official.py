"""Official Sparse DETR checkpoints (kakaobrain/sparse-detr `main.py`) -> this project's checkpoints.

An official checkpoint is `{"model": state_dict, "args": argparse.Namespace, ...}`. Conversion:

* backbone `backbone.0.body.*`: torchvision ResNet names -> Detectron2 ResNet names (`resnet_names`),
  Swin-T names kept; output prefix `backbone.`;
* heads: the official model stores each detection head under up to three names
  (`class_embed.i`, `transformer.decoder.class_embed.i`, `transformer.encoder.class_embed.j`; the
  same for `bbox_embed`). The aliases are checked to be identical and dropped; a shared head (no box
  refinement, no encoder aux loss) is kept once, as index 0;
* classes: the 91 official logits (COCO category ids, several unused) -> Detectron2's 80 contiguous
  COCO classes (rows of the official ids of `COCO_CATEGORIES`' things), or all kept;
* every other name is already the project's (the model mirrors the official `transformer.*`,
  `input_proj.*` and `query_embed` names);
* float tensors are stored as float32.

The result is checked against a model built from the matching config (no missing, unexpected or
mis-shaped key) before it is written, atomically.
"""
import argparse
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch

from .resnet_names import convert_torchvision_resnet_state_dict

__all__ = [
    "OfficialCheckpointError", "OfficialArchitecture", "load_official_checkpoint", "coco_official_class_ids",
    "official_architecture", "config_overrides", "build_official_cfg", "convert_official_state_dict",
    "verify_state_dict", "convert_official_checkpoint", "ConversionSummary", "format_overrides",
]

OFFICIAL_BACKBONE_PREFIX = "backbone.0.body."
_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.+)$")
_HEAD_ALIAS = re.compile(r"^transformer\.(decoder|encoder)\.(class_embed|bbox_embed)\.(\d+)\.(.+)$")
_CLASS_PARAM = re.compile(r"^class_embed\.\d+\.(weight|bias)$")

# `main.py` defaults of the architecture arguments (used where a checkpoint's args lack a flag).
OFFICIAL_DEFAULTS: Dict[str, Any] = {
    "backbone": "resnet50", "dilation": False, "num_feature_levels": 4, "enc_layers": 6, "dec_layers": 6,
    "dim_feedforward": 1024, "hidden_dim": 256, "dropout": 0.1, "nheads": 8, "num_queries": 300,
    "dec_n_points": 4, "enc_n_points": 4, "with_box_refine": False, "two_stage": False,
    "eff_query_init": False, "eff_specific_head": False, "use_enc_aux_loss": False, "rho": 0.0,
    "aux_loss": True, "set_cost_class": 2.0, "set_cost_bbox": 5.0, "set_cost_giou": 2.0,
    "cls_loss_coef": 2.0, "bbox_loss_coef": 5.0, "giou_loss_coef": 2.0, "mask_prediction_coef": 1.0,
    "focal_alpha": 0.25, "backbone_from_scratch": False, "finetune_early_layers": False,
}
_RESNET_DEPTHS = {"resnet50": 50, "resnet101": 101}
TORCHVISION_PIXEL_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_PIXEL_STD = [58.395, 57.12, 57.375]


class OfficialCheckpointError(ValueError):
    """The input is not a usable official Sparse DETR checkpoint (the message says why)."""


def coco_official_class_ids() -> List[int]:
    """Official (COCO category id) logit index of each of Detectron2's 80 contiguous COCO classes."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


def load_official_checkpoint(path: str, trust_source: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Read an official checkpoint without executing arbitrary pickled code.

    Only tensors, containers, primitives and `argparse.Namespace` (the official `args`) are allowed
    unless `trust_source` (full unpickling: only for files from a trusted source).
    Returns:
        (model state dict, args as a dict; {} when the file has no args).
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_source)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        blocked = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), None)
        if blocked is None:
            raise OfficialCheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
        raise OfficialCheckpointError(
            f"{path}: refused to unpickle an object that is not a tensor, a container or argparse.Namespace "
            f"({blocked}). Official checkpoints hold only those; if you trust this file, pass "
            f"--trust-source (arbitrary code in the file would run).") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise OfficialCheckpointError(
            f"{path}: not an official Sparse DETR checkpoint: expected a dict with a 'model' state dict "
            f"(and 'args'), found {keys}")
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return dict(checkpoint["model"]), args


@dataclass
class OfficialArchitecture:
    """The official model's hyper-parameters: `args` completed by `main.py` defaults, checked against
    the weights."""

    args: Dict[str, Any]
    num_classes: int

    def __getattr__(self, name):
        try:
            return self.__dict__["args"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def num_heads(self) -> int:
        """Number of official (class_embed, bbox_embed) indices."""
        return self.dec_layers + int(self.two_stage) + (self.enc_layers - 1 if self.use_enc_aux_loss else 0)

    @property
    def shared_heads(self) -> bool:
        return not (self.with_box_refine or self.use_enc_aux_loss)


def _count_layers(state_dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def official_architecture(state_dict: Dict[str, torch.Tensor], args: Dict[str, Any]) -> OfficialArchitecture:
    """Complete `args` with the official defaults and check that the weights have that structure.

    Raises OfficialCheckpointError for weights that are not an official (Sparse / Deformable) DETR
    model, an already converted checkpoint, or args that contradict the weights.
    """
    if any(k.startswith(("backbone.res2.", "backbone.stem.")) for k in state_dict):
        raise OfficialCheckpointError("this checkpoint already has Detectron2 names (backbone.res2...): it was "
                                      "converted already; load it with MODEL.WEIGHTS directly")
    required = ["transformer.level_embed", "class_embed.0.weight", "transformer.encoder.layers.0.norm1.weight",
                "transformer.decoder.layers.0.norm1.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing or not any(k.startswith(OFFICIAL_BACKBONE_PREFIX) for k in state_dict):
        sample = sorted(state_dict)[:5]
        raise OfficialCheckpointError(
            f"not an official Sparse DETR checkpoint: missing {missing or [OFFICIAL_BACKBONE_PREFIX + '*']} "
            f"(its first keys: {sample})")
    given = {k: v for k, v in args.items() if k in OFFICIAL_DEFAULTS}
    arch = OfficialArchitecture({**OFFICIAL_DEFAULTS, **given},
                                num_classes=int(state_dict["class_embed.0.weight"].shape[0]))

    found = {
        "enc_layers": _count_layers(state_dict, "transformer.encoder.layers."),
        "dec_layers": _count_layers(state_dict, "transformer.decoder.layers."),
        "hidden_dim": int(state_dict["transformer.level_embed"].shape[1]),
        "num_feature_levels": int(state_dict["transformer.level_embed"].shape[0]),
        "dim_feedforward": int(state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0]),
        "two_stage": "transformer.enc_output.weight" in state_dict and "transformer.pos_trans.weight" in state_dict,
        "use_enc_aux_loss": any(k.startswith("transformer.encoder.class_embed.") for k in state_dict),
    }
    if found["two_stage"]:
        found["eff_query_init"] = state_dict["transformer.pos_trans.weight"].shape[0] == found["hidden_dim"]
    else:
        found["num_queries"] = int(state_dict["query_embed.weight"].shape[0]) if "query_embed.weight" in state_dict \
            else arch.num_queries
    has_scorer = any(k.startswith("transformer.enc_mask_predictor.") for k in state_dict)
    wrong = {k: (arch.args[k], v) for k, v in found.items() if arch.args[k] != v}
    if has_scorer != (arch.rho > 0):
        wrong["rho"] = (arch.rho, "> 0 (scoring network present)" if has_scorer else "0 (no scoring network)")
    if wrong:
        details = "; ".join(f"{k}: args say {a!r}, weights say {w!r}" for k, (a, w) in wrong.items())
        raise OfficialCheckpointError(f"the checkpoint's args contradict its weights ({details})")
    heads = {int(m.group(2)) for m in map(_HEAD.match, state_dict) if m}
    if heads != set(range(arch.num_heads)):
        raise OfficialCheckpointError(
            f"expected detection heads class_embed/bbox_embed 0..{arch.num_heads - 1} (dec_layers "
            f"{arch.dec_layers}, two_stage {arch.two_stage}, use_enc_aux_loss {arch.use_enc_aux_loss}), "
            f"found indices {sorted(heads)}")
    backbone = arch.backbone
    if backbone not in _RESNET_DEPTHS and backbone != "swin-t":
        raise OfficialCheckpointError(f"backbone {backbone!r} is not supported (resnet50, resnet101, swin-t)")
    if arch.with_box_refine != arch.two_stage:
        raise OfficialCheckpointError(
            f"with_box_refine={arch.with_box_refine} with two_stage={arch.two_stage} is not supported: the official "
            f"code refines decoder boxes iff two_stage (deformable_detr.py:128-133), this model iff "
            f"WITH_BOX_REFINE (upstream Deformable DETR), so the converted model would predict other boxes; "
            f"the official configs set both flags or neither")
    if arch.dilation:
        raise OfficialCheckpointError(
            "--dilation (DC5) checkpoints are not supported: torchvision's dilated layer4 keeps dilation 1 in its "
            "first block, Detectron2's RES5_DILATION dilates every res5 block, so the outputs would differ")
    return arch


def format_overrides(overrides: List[Any]) -> str:
    """`config_overrides` as shell words for a Detectron2 command line (lists double-quoted)."""
    return " ".join(f'{key} "{value}"' if isinstance(value, list) else f"{key} {value}"
                    for key, value in zip(overrides[::2], overrides[1::2]))


def config_overrides(arch: OfficialArchitecture, num_classes: int) -> List[Any]:
    """Flat [key, value, ...] list (for `cfg.merge_from_list`) that builds the official model from
    Detectron2's defaults + `add_sparse_detr_config`."""
    resnet = arch.backbone in _RESNET_DEPTHS
    in_features = (["res3", "res4", "res5"] if resnet else ["p1", "p2", "p3"])
    in_features = in_features if arch.num_feature_levels > 1 else in_features[-1:]
    sd = "MODEL.SPARSE_DETR."
    overrides = {
        "MODEL.META_ARCHITECTURE": "SparseDETR",
        "MODEL.PIXEL_MEAN": TORCHVISION_PIXEL_MEAN, "MODEL.PIXEL_STD": TORCHVISION_PIXEL_STD,
        "INPUT.FORMAT": "RGB",
        "MODEL.BACKBONE.NAME": "build_resnet_backbone" if resnet else "build_sparse_detr_swin_backbone",
        "MODEL.BACKBONE.FREEZE_AT": 0 if (arch.backbone_from_scratch or arch.finetune_early_layers) else 2,
    }
    if resnet:
        overrides.update({"MODEL.RESNETS.DEPTH": _RESNET_DEPTHS[arch.backbone], "MODEL.RESNETS.STRIDE_IN_1X1": False,
                          "MODEL.RESNETS.NORM": "FrozenBN", "MODEL.RESNETS.OUT_FEATURES": list(in_features)})
    else:
        overrides["MODEL.SWIN.OUT_FEATURES"] = list(in_features)
    overrides.update({sd + key: value for key, value in [
        ("NUM_CLASSES", num_classes), ("RHO", float(arch.rho)), ("IN_FEATURES", in_features),
        ("NUM_FEATURE_LEVELS", arch.num_feature_levels), ("ENC_LAYERS", arch.enc_layers),
        ("DEC_LAYERS", arch.dec_layers), ("HIDDEN_DIM", arch.hidden_dim), ("NHEADS", arch.nheads),
        ("DIM_FEEDFORWARD", arch.dim_feedforward), ("DROPOUT", float(arch.dropout)),
        ("NUM_QUERIES", arch.num_queries), ("ENC_N_POINTS", arch.enc_n_points), ("DEC_N_POINTS", arch.dec_n_points),
        ("TWO_STAGE", arch.two_stage), ("WITH_BOX_REFINE", arch.with_box_refine),
        ("EFF_QUERY_INIT", arch.eff_query_init), ("EFF_SPECIFIC_HEAD", arch.eff_specific_head),
        ("USE_ENC_AUX_LOSS", arch.use_enc_aux_loss), ("AUX_LOSS", arch.aux_loss),
        ("CLS_LOSS_COEF", float(arch.cls_loss_coef)), ("BBOX_LOSS_COEF", float(arch.bbox_loss_coef)),
        ("GIOU_LOSS_COEF", float(arch.giou_loss_coef)), ("MASK_PREDICTION_COEF", float(arch.mask_prediction_coef)),
        ("FOCAL_ALPHA", float(arch.focal_alpha)), ("SET_COST_CLASS", float(arch.set_cost_class)),
        ("SET_COST_BBOX", float(arch.set_cost_bbox)), ("SET_COST_GIOU", float(arch.set_cost_giou)),
    ]})
    return [x for kv in overrides.items() for x in kv]


def build_official_cfg(arch: OfficialArchitecture, num_classes: int, device: str = "cpu"):
    """Detectron2 config of the official model: defaults + Sparse DETR keys + `config_overrides`."""
    from detectron2.config import get_cfg

    from ..config import add_sparse_detr_config

    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_list(config_overrides(arch, num_classes) + ["MODEL.DEVICE", device])
    return cfg


def _resolve_heads(state_dict: Dict[str, torch.Tensor], arch: OfficialArchitecture,
                   log: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """Drop the aliases of the heads (after checking they are identical); keep a shared head once."""
    first_enc_aux = arch.dec_layers + int(arch.two_stage)
    kept = {}
    for name, tensor in state_dict.items():
        alias = _HEAD_ALIAS.match(name)
        head = _HEAD.match(name)
        if alias:
            part, kind, index, leaf = alias.groups()
            canonical = f"{kind}.{int(index) + (first_enc_aux if part == 'encoder' else 0)}.{leaf}"
        elif head and arch.shared_heads and int(head.group(2)) > 0:
            canonical = f"{head.group(1)}.0.{head.group(3)}"
        else:
            kept[name] = tensor
            continue
        if canonical not in state_dict:
            raise OfficialCheckpointError(f"{name} is a copy of {canonical}, which the checkpoint lacks")
        if not torch.equal(state_dict[canonical], tensor):
            raise OfficialCheckpointError(
                f"{name} should be the same tensor as {canonical} (the official model shares that head) but "
                f"differs: the checkpoint was edited inconsistently")
        log["aliases dropped"] = log.get("aliases dropped", 0) + 1
    return kept


def _select_classes(state_dict: Dict[str, torch.Tensor], arch: OfficialArchitecture,
                    log: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """Keep the official logit rows of Detectron2's 80 COCO classes in every class head."""
    if arch.num_classes != 91:
        raise OfficialCheckpointError(
            f"the checkpoint has {arch.num_classes} class logits, not COCO's 91: there is no COCO class mapping; "
            f"convert with --keep-official-classes")
    rows = torch.as_tensor(coco_official_class_ids())
    binary_head = f"class_embed.{arch.dec_layers}." if arch.two_stage and not arch.eff_specific_head else None
    out = {}
    for name, tensor in state_dict.items():
        if _CLASS_PARAM.match(name):
            # The binary proposal head only uses logit 0 (fg score); keep its first 80 rows.
            index = torch.arange(len(rows)) if binary_head and name.startswith(binary_head) else rows
            tensor = tensor.index_select(0, index)
            log["class heads remapped"] = log.get("class heads remapped", 0) + 1
        out[name] = tensor
    return out


def convert_official_state_dict(state_dict: Dict[str, torch.Tensor], arch: OfficialArchitecture,
                                keep_official_classes: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Official state dict -> this project's (see the module docstring).

    Returns:
        (converted state dict, counts of what was done, for the summary).
    """
    log: Dict[str, int] = {"official keys": len(state_dict)}
    state_dict = _resolve_heads(state_dict, arch, log)
    backbone = {k: v for k, v in state_dict.items() if k.startswith(OFFICIAL_BACKBONE_PREFIX)}
    if arch.backbone in _RESNET_DEPTHS:
        try:
            renamed = convert_torchvision_resnet_state_dict(backbone, strip_prefix=OFFICIAL_BACKBONE_PREFIX,
                                                            add_prefix="backbone.")
        except ValueError as e:
            raise OfficialCheckpointError(f"unexpected backbone parameter: {e}") from None
    else:
        renamed = {"backbone." + k[len(OFFICIAL_BACKBONE_PREFIX):]: v for k, v in backbone.items()}
    log["backbone keys renamed"] = len(renamed)
    converted = {**renamed, **{k: v for k, v in state_dict.items() if k not in backbone}}
    if not keep_official_classes:
        converted = _select_classes(converted, arch, log)
    converted = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    log["output keys"] = len(converted)
    return converted, log


def verify_state_dict(converted: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    """Raise OfficialCheckpointError unless `converted` has exactly the keys and shapes of `expected`."""
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(converted[k].shape)}, model {tuple(expected[k].shape)}"
              for k in sorted(set(converted) & set(expected)) if converted[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        def show(items):
            return f"{len(items)} {items[:6]}{' ...' if len(items) > 6 else ''}"
        raise OfficialCheckpointError(
            "the converted weights do not fit the model built from the checkpoint's args: "
            f"missing {show(missing)}; unexpected {show(unexpected)}; shape mismatches {show(shapes)}")


def _save_atomically(obj, path: str) -> None:
    """torch.save to a temporary file next to `path`, then rename: no partial output on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".convert-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _plain(value):
    """`value` with only types that `torch.load(weights_only=True)` accepts (others as strings)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


@dataclass
class ConversionSummary:
    """What `convert_official_checkpoint` did; `str()` is the printed report."""

    source: str
    output: str
    arch: OfficialArchitecture
    num_classes: int
    counts: Dict[str, int]
    overrides: List[Any] = field(default_factory=list)
    verified: bool = True

    def __str__(self):
        a = self.arch
        classes = ("91 official logits (COCO category ids) kept" if self.num_classes == a.num_classes
                   else f"{a.num_classes} official logits -> {self.num_classes} Detectron2 COCO classes")
        lines = [
            f"Converted {self.source} -> {self.output}",
            f"  model: {a.backbone}, rho {a.rho}, {a.enc_layers} encoder + {a.dec_layers} decoder layers, "
            f"two_stage {a.two_stage}, with_box_refine {a.with_box_refine}, eff_query_init {a.eff_query_init}, "
            f"eff_specific_head {a.eff_specific_head}, use_enc_aux_loss {a.use_enc_aux_loss}",
            f"  classes: {classes}",
            "  " + ", ".join(f"{k}: {v}" for k, v in self.counts.items()),
            "  checked against the model built from these overrides: no missing, unexpected or mis-shaped key"
            if self.verified else "  NOT checked against a model (verify=False)",
            "Config overrides matching the checkpoint (complete on top of any base config), e.g.:",
            f"  python projects/SparseDETR/train_net.py --config-file configs/Base-SparseDETR.yaml --eval-only "
            f"{format_overrides(self.overrides)} MODEL.WEIGHTS {self.output}",
        ]
        return "\n".join(lines)


def convert_official_checkpoint(source: str, output: str, keep_official_classes: bool = False,
                                trust_source: bool = False, verify: bool = True) -> ConversionSummary:
    """Read `source`, convert it, check it against the model built from its args, write `output`.

    Nothing is written when any step fails (OfficialCheckpointError says why).
    """
    state_dict, args = load_official_checkpoint(source, trust_source=trust_source)
    if list(state_dict) and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    arch = official_architecture(state_dict, args)
    converted, counts = convert_official_state_dict(state_dict, arch, keep_official_classes)
    num_classes = arch.num_classes if keep_official_classes else len(coco_official_class_ids())
    overrides = config_overrides(arch, num_classes)
    if verify:
        from detectron2.modeling import build_model

        from .. import modeling  # noqa: F401  (registers SparseDETR)

        expected = build_model(build_official_cfg(arch, num_classes)).state_dict()
        expected = {k: v for k, v in expected.items() if k not in ("pixel_mean", "pixel_std")}
        verify_state_dict(converted, expected)
    _save_atomically({
        "model": converted,
        "__author__": "kakaobrain/sparse-detr, converted by sparse_detr.checkpoint",
        "official_args": _plain(args),
        "num_classes": num_classes,
        "official_class_ids": list(range(num_classes)) if keep_official_classes else coco_official_class_ids(),
        "config_overrides": _plain(overrides),
    }, output)
    return ConversionSummary(source, output, arch, num_classes, counts, overrides, verify)

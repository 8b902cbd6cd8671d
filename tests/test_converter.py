"""Checkpoint conversion: torchvision ResNet names, and the official Sparse DETR converter on synthetic
official checkpoints of every supported layout (round trip, 91 -> 80 classes, loading, errors)."""
import argparse
import datetime
import importlib.util
import os
import shlex

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone

from sparse_detr import add_sparse_detr_config
from sparse_detr.checkpoint.official import (
    OFFICIAL_DEFAULTS,
    OfficialArchitecture,
    OfficialCheckpointError,
    build_official_cfg,
    coco_official_class_ids,
    config_overrides,
    convert_official_checkpoint,
    format_overrides,
)
from sparse_detr.checkpoint.resnet_names import (
    convert_torchvision_resnet_state_dict,
    torchvision_to_detectron2_resnet_name,
)


def _load_cli():
    path = os.path.join(os.path.dirname(__file__), "..", "projects", "SparseDETR", "convert_official_checkpoint.py")
    spec = importlib.util.spec_from_file_location("convert_official_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


# ---------------------------------------------------------------------------------------- ResNet names
@pytest.mark.parametrize("tv, d2", [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.running_mean", "stem.conv1.norm.running_mean"),
    ("layer1.0.conv3.weight", "res2.0.conv3.weight"),
    ("layer2.3.bn2.bias", "res3.3.conv2.norm.bias"),
    ("layer3.0.downsample.0.weight", "res4.0.shortcut.weight"),
    ("layer4.0.downsample.1.running_var", "res5.0.shortcut.norm.running_var"),
])
def test_resnet_name_mapping(tv, d2):
    assert torchvision_to_detectron2_resnet_name(tv) == d2


@pytest.mark.parametrize("name", ["fc.weight", "layer5.0.conv1.weight", "layer1.0.relu.weight", "transformer.x"])
def test_resnet_name_mapping_rejects_other_names(name):
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        torchvision_to_detectron2_resnet_name(name)


def test_torchvision_resnet_loads_strictly_into_detectron2_resnet_and_computes_the_same():
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()
    for m in tv.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file("configs/Base-SparseDETR.yaml")
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    state = {"module.pre." + k: v for k, v in tv.state_dict().items()}
    converted = convert_torchvision_resnet_state_dict(state, strip_prefix="module.pre.", add_prefix="")
    assert not any("fc." in k or "num_batches_tracked" in k for k in converted)
    d2.load_state_dict(converted, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(tv.children())[:-2])
        assert torch.allclose(d2(x)["res5"], trunk(x), atol=1e-4)


# ------------------------------------------------------------------------------- synthetic official checkpoints
SMALL = dict(enc_layers=2, dec_layers=3, hidden_dim=64, nheads=2, dim_feedforward=96, num_queries=20,
             enc_n_points=2, dec_n_points=2, dropout=0.0)
LAYOUTS = {  # the official configs/*.sh flag sets
    "sparse": dict(with_box_refine=True, two_stage=True, eff_query_init=True, eff_specific_head=True,
                   use_enc_aux_loss=True, rho=0.2),
    "efficient_detr": dict(with_box_refine=True, two_stage=True, eff_query_init=True, eff_specific_head=True),
    "deformable_detr": dict(),
    "two_stage_binary_head": dict(with_box_refine=True, two_stage=True),
    "sparse_swin_t": dict(backbone="swin-t", with_box_refine=True, two_stage=True, eff_query_init=True,
                          eff_specific_head=True, use_enc_aux_loss=True, rho=0.1),
}
_TV_NAMES = {torchvision_to_detectron2_resnet_name(k): k for k in torchvision.models.resnet50().state_dict()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def _official_state_dict(ours, arch):
    """Our state dict written the way the official model stores it: torchvision backbone names (Swin
    names are the same in both), every head under all its official names, a shared head repeated at
    every index."""
    official = {}
    for name, tensor in ours.items():
        if name.startswith("backbone."):
            local = name[len("backbone."):]
            official["backbone.0.body." + (local if arch.backbone == "swin-t" else _TV_NAMES[local])] = tensor
        else:
            official[name] = tensor
    for kind in ("class_embed", "bbox_embed"):
        head = {k: v for k, v in ours.items() if k.startswith(kind + ".")}
        for i in range(arch.num_heads):
            for k, v in head.items():
                index, leaf = k.split(".", 2)[1:]
                if arch.shared_heads or int(index) == i:
                    official[f"{kind}.{i}.{leaf}"] = v
                    if arch.two_stage:
                        official[f"transformer.decoder.{kind}.{i}.{leaf}"] = v
                    first_aux = arch.dec_layers + int(arch.two_stage)
                    if arch.use_enc_aux_loss and i >= first_aux:
                        official[f"transformer.encoder.{kind}.{i - first_aux}.{leaf}"] = v
    return official


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tmp_path_factory):
    """(name, args, our model's state dict, path of the official-format checkpoint)."""
    torch.manual_seed(0)
    args = {**OFFICIAL_DEFAULTS, **SMALL, **LAYOUTS[request.param], "lr": 2e-4, "device": "cuda"}
    arch = OfficialArchitecture(args, num_classes=91)
    ours = build_model(build_official_cfg(arch, 91)).state_dict()
    ours = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in ours.items()
            if k not in ("pixel_mean", "pixel_std")}  # no all-zero heads hiding a wrong mapping
    path = str(tmp_path_factory.mktemp(request.param) / "official.pth")
    torch.save({"model": _official_state_dict(ours, arch), "args": argparse.Namespace(**args), "epoch": 49,
                "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]}}, path)
    return request.param, args, ours, path


def test_round_trip_keeping_official_classes(layout, tmp_path):
    name, args, ours, path = layout
    out = str(tmp_path / "converted.pth")
    summary = convert_official_checkpoint(path, out, keep_official_classes=True)
    converted = torch.load(out, map_location="cpu", weights_only=True)  # plain data only
    assert converted["num_classes"] == 91 and converted["official_args"]["rho"] == args["rho"]
    assert converted["model"].keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(converted["model"][k], v), k
    assert summary.counts["output keys"] == len(ours)


def test_80_class_conversion_selects_the_official_rows(layout, tmp_path):
    name, args, ours, path = layout
    out = str(tmp_path / "converted80.pth")
    convert_official_checkpoint(path, out)
    model = torch.load(out, map_location="cpu", weights_only=True)["model"]
    ids = torch.as_tensor(coco_official_class_ids())
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90 and 12 not in ids.tolist()
    binary = f"class_embed.{args['dec_layers']}." if args["two_stage"] and not args["eff_specific_head"] else None
    for k, v in ours.items():
        if k.startswith("class_embed."):
            rows = torch.arange(80) if binary and k.startswith(binary) else ids  # logit 0 = fg score
            assert torch.equal(model[k], v[rows]), k
        else:
            assert torch.equal(model[k], v), k


def test_cli_output_loads_with_detection_checkpointer(layout, tmp_path, capsys, caplog):
    name, args, ours, path = layout
    out = str(tmp_path / "cli.pth")
    assert cli.main(["--source", path, "--output", out]) == 0
    printed = capsys.readouterr().out
    assert "no missing, unexpected or mis-shaped key" in printed
    assert f"MODEL.SPARSE_DETR.RHO {float(args['rho'])}" in printed
    # The printed overrides rebuild the same config.
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_list(shlex.split(printed.split("--eval-only ", 1)[1]) + ["MODEL.DEVICE", "cpu"])
    arch = OfficialArchitecture({**OFFICIAL_DEFAULTS, **args}, num_classes=91)
    expected = build_official_cfg(arch, 80)
    expected.MODEL.WEIGHTS = out
    assert cfg == expected
    model = build_model(cfg)
    with caplog.at_level("WARNING"):
        DetectionCheckpointer(model).load(out)
    assert not [r for r in caplog.records if "not found" in r.getMessage() or "unexpected" in r.getMessage()]
    assert torch.equal(model.state_dict()["transformer.level_embed"], ours["transformer.level_embed"])


# ---------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def sparse_checkpoint(tmp_path_factory):
    args = {**OFFICIAL_DEFAULTS, **SMALL, **LAYOUTS["sparse"]}
    arch = OfficialArchitecture(args, num_classes=91)
    torch.manual_seed(0)
    ours = {k: v.half() if v.is_floating_point() else v  # half: less I/O, the converter casts to float32
            for k, v in build_model(build_official_cfg(arch, 91)).state_dict().items()
            if k not in ("pixel_mean", "pixel_std")}
    return _official_state_dict(ours, arch), args


def _expect_failure(tmp_path, checkpoint, match, **kwargs):
    """Conversion of `checkpoint` fails with `match`, leaves a pre-existing output intact and no temp file."""
    source, out = tmp_path / "source.pth", tmp_path / "out.pth"
    torch.save(checkpoint, source) if not isinstance(checkpoint, bytes) else source.write_bytes(checkpoint)
    out.write_text("previous output")
    with pytest.raises(OfficialCheckpointError, match=match):
        convert_official_checkpoint(str(source), str(out), **kwargs)
    assert out.read_text() == "previous output"
    assert sorted(os.listdir(tmp_path)) == ["out.pth", "source.pth"]


def test_error_not_sparse_detr(tmp_path):
    resnet = torchvision.models.resnet18().state_dict()
    _expect_failure(tmp_path, {"model": resnet}, "not an official Sparse DETR checkpoint: missing")
    _expect_failure(tmp_path, resnet, "expected a dict with a 'model' state dict")
    _expect_failure(tmp_path, b"not a checkpoint", "not a readable PyTorch checkpoint")


def test_error_already_converted(tmp_path, sparse_checkpoint):
    state, args = sparse_checkpoint
    done = tmp_path / "done.pth"
    torch.save({"model": state, "args": argparse.Namespace(**args)}, done)
    convert_official_checkpoint(str(done), str(tmp_path / "d2.pth"))
    d2 = torch.load(tmp_path / "d2.pth", weights_only=True)
    os.remove(done), os.remove(tmp_path / "d2.pth")
    _expect_failure(tmp_path, d2, "converted already")


def test_error_missing_key(tmp_path, sparse_checkpoint):
    state, args = sparse_checkpoint
    state = {k: v for k, v in state.items() if k != "transformer.decoder.layers.1.norm3.bias"}
    _expect_failure(tmp_path, {"model": state, "args": argparse.Namespace(**args)},
                    r"missing 1 \['transformer.decoder.layers.1.norm3.bias'\]")


def test_error_unknown_key(tmp_path, sparse_checkpoint):
    state, args = sparse_checkpoint
    state = {**state, "transformer.extra_head.weight": torch.zeros(3)}
    _expect_failure(tmp_path, {"model": state, "args": argparse.Namespace(**args)},
                    r"unexpected 1 \['transformer.extra_head.weight'\]")


def test_error_shape_mismatch(tmp_path, sparse_checkpoint):
    state, args = sparse_checkpoint
    state = {**state, "transformer.pos_trans_norm.weight": torch.ones(63)}
    _expect_failure(tmp_path, {"model": state, "args": argparse.Namespace(**args)},
                    r"shape mismatches 1 \['transformer.pos_trans_norm.weight: checkpoint \(63,\), model \(64,\)'\]")


def test_error_args_contradict_weights(tmp_path, sparse_checkpoint):
    state, args = sparse_checkpoint
    _expect_failure(tmp_path, {"model": state, "args": argparse.Namespace(**{**args, "dec_layers": 6})},
                    "dec_layers: args say 6, weights say 3")
    _expect_failure(tmp_path, {"model": state, "args": argparse.Namespace(**{**args, "rho": 0.0})},
                    "rho: args say 0.0")


def test_error_inconsistent_head_alias(tmp_path, sparse_checkpoint):
    state, args = sparse_checkpoint
    name = "transformer.encoder.class_embed.0.bias"  # = class_embed.4 (3 decoder heads, 1 two-stage)
    state = {**state, name: state[name] + 1}
    _expect_failure(tmp_path, {"model": state, "args": argparse.Namespace(**args)},
                    f"{name} should be the same tensor as class_embed.4.bias")


def test_error_80_classes_need_91_logits(tmp_path):
    args = {**OFFICIAL_DEFAULTS, **SMALL, **LAYOUTS["efficient_detr"]}
    arch = OfficialArchitecture(args, num_classes=20)
    ours = {k: v for k, v in build_model(build_official_cfg(arch, 20)).state_dict().items()
            if k not in ("pixel_mean", "pixel_std")}
    checkpoint = {"model": _official_state_dict(ours, arch), "args": argparse.Namespace(**args)}
    _expect_failure(tmp_path, checkpoint, "20 class logits, not COCO's 91.*--keep-official-classes")
    torch.save(checkpoint, tmp_path / "c20.pth")
    convert_official_checkpoint(str(tmp_path / "c20.pth"), str(tmp_path / "ok.pth"), keep_official_classes=True)


def test_untrusted_pickle_is_refused_unless_trusted(tmp_path, sparse_checkpoint):
    state, args = sparse_checkpoint
    checkpoint = {"model": state, "args": argparse.Namespace(**args), "saved": datetime.date(2021, 11, 1)}
    _expect_failure(tmp_path, checkpoint, r"refused to unpickle.*datetime.*--trust-source")
    torch.save(checkpoint, tmp_path / "trusted.pth")
    convert_official_checkpoint(str(tmp_path / "trusted.pth"), str(tmp_path / "ok.pth"), trust_source=True)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert cli.main(["--source", str(tmp_path / "absent.pth"), "--output", str(tmp_path / "o.pth")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nothing was written" in err and not (tmp_path / "o.pth").exists()


def test_unsupported_official_settings_are_named():
    args = {**OFFICIAL_DEFAULTS, **SMALL, **LAYOUTS["efficient_detr"]}
    arch = OfficialArchitecture(args, num_classes=91)
    state = _official_state_dict({k: v for k, v in build_model(build_official_cfg(arch, 91)).state_dict().items()
                                  if k not in ("pixel_mean", "pixel_std")}, arch)
    from sparse_detr.checkpoint.official import official_architecture
    with pytest.raises(OfficialCheckpointError, match="DC5"):
        official_architecture(state, {**args, "dilation": True})
    with pytest.raises(OfficialCheckpointError, match="'swin-b' is not supported"):
        official_architecture(state, {**args, "backbone": "swin-b"})
    with pytest.raises(OfficialCheckpointError, match="refines decoder boxes iff two_stage"):
        official_architecture(state, {**args, "with_box_refine": False})


def test_config_overrides_are_typed_for_yacs():
    arch = OfficialArchitecture({**OFFICIAL_DEFAULTS, "rho": 0.3, "cls_loss_coef": 2}, num_classes=91)
    overrides = config_overrides(arch, 80)
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_list(shlex.split(format_overrides(overrides)))  # as typed on a command line
    assert cfg.MODEL.SPARSE_DETR.RHO == 0.3 and cfg.MODEL.SPARSE_DETR.CLS_LOSS_COEF == 2.0
    assert cfg.MODEL.SPARSE_DETR.IN_FEATURES == ["res3", "res4", "res5"] and cfg.MODEL.SPARSE_DETR.NUM_CLASSES == 80

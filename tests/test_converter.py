"""Checkpoint conversion: torchvision ResNet names and the official Sparse DETR converter."""
import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_resnet_backbone

from sparse_detr import add_sparse_detr_config
from sparse_detr.checkpoint.resnet_names import (
    convert_torchvision_resnet_state_dict,
    torchvision_to_detectron2_resnet_name,
)


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

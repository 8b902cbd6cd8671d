"""MODEL.BACKBONE.ADAPT_BN_IMAGES: frozen batch-norm statistics re-estimated on the training images."""
import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.structures import ImageList
from torch import nn
from torch.nn import functional as F

from sparse_detr.engine import Trainer
from sparse_detr.engine.adapt_batchnorm import adapt_frozen_batchnorm
from synthetic import register_synthetic, tiny_opts
from utils import tiny_cfg


class _TwoConvDetector(nn.Module):
    """The two things adapt_frozen_batchnorm uses: `preprocess_image` and a `backbone` with frozen norms."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(Conv2d(3, 4, 3, norm=FrozenBatchNorm2d(4)), nn.ReLU(),
                                      Conv2d(4, 4, 3, norm=FrozenBatchNorm2d(4)))
        self.device = torch.device("cpu")

    def preprocess_image(self, batched_inputs):
        return ImageList.from_tensors([x["image"] / 255 - 0.5 for x in batched_inputs])


def test_statistics_become_the_averages_over_the_images():
    model = _TwoConvDetector()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 10 + i, 12, generator=g) * 255 * (1 + i) for i in range(5)]  # different sizes
    batches = [[{"image": images[0]}, {"image": images[1]}], [{"image": images[2]}, {"image": images[3]}],
               [{"image": images[4]}]]
    assert adapt_frozen_batchnorm(model, batches, num_images=4) == 2

    first = model.backbone[0]
    # the statistics of the first norm's input over every pixel of the first 4 images (the 5th is unused)
    raw = torch.cat([F.conv2d(x[None] / 255 - 0.5, first.weight, first.bias).flatten(2) for x in images[:4]], 2)
    torch.testing.assert_close(first.norm.running_mean, raw.mean((0, 2)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.norm.running_var, raw[0].var(1), rtol=1e-2, atol=0)
    second = model.backbone[2].norm
    assert not torch.allclose(second.running_mean, torch.zeros(4))  # every frozen norm is updated
    assert isinstance(second, FrozenBatchNorm2d)
    for k, v in model.state_dict().items():  # weights untouched
        if "running" not in k:
            torch.testing.assert_close(v, weights[k])


def test_a_backbone_without_frozen_norms_is_left_alone():
    model = _TwoConvDetector()
    model.backbone = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert adapt_frozen_batchnorm(model, [[{"image": torch.zeros(3, 8, 8)}]], num_images=1) == 0


def _stem_stats(trainer):
    return trainer.model.backbone.stem.conv1.norm.running_mean.clone()


def test_trainer_adapts_on_a_fresh_start_only(tmp_path):
    data = str(tmp_path / "data")
    register_synthetic("adapt_bn_train", data)
    cfg = tiny_cfg()
    cfg.merge_from_list(tiny_opts("adapt_bn_train", "adapt_bn_train", str(tmp_path / "out"), 2,
                                  ["MODEL.BACKBONE.ADAPT_BN_IMAGES", "3", "SOLVER.CHECKPOINT_PERIOD", "1"]))
    trainer = Trainer(cfg)
    before = _stem_stats(trainer)
    torch.testing.assert_close(before, torch.zeros_like(before))  # a fresh FrozenBatchNorm2d
    trainer.resume_or_load(resume=False)
    adapted = _stem_stats(trainer)
    assert not torch.allclose(adapted, before)
    trainer.train()
    assert (tmp_path / "out" / "model_final.pth").exists()

    resumed = Trainer(cfg.clone())
    resumed.resume_or_load(resume=True)  # from model_final: the saved statistics, not new ones
    assert resumed.start_iter > 0
    torch.testing.assert_close(_stem_stats(resumed), adapted)

    cfg.MODEL.BACKBONE.ADAPT_BN_IMAGES = -1
    with pytest.raises(ValueError, match="MODEL.BACKBONE.ADAPT_BN_IMAGES=-1 must be >= 0"):
        Trainer(cfg).resume_or_load(resume=False)

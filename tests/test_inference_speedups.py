"""CPU speed-ups: oneDNN linears (sparse_detr.layers.onednn_linear) and frozen batch norms folded into
convolutions (sparse_detr.layers.fold_batchnorm) in inference, backbone stages on oneDNN tensors where no
gradient flows through them (sparse_detr.layers.onednn_stages), all leaving the outputs unchanged; the
backbone input's memory format (`SparseDETR.pre_transformer`)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from sparse_detr.layers.fold_batchnorm import fold_frozen_batchnorm
from sparse_detr.layers.onednn_linear import OneDNNLinear, onednn_linear_available, use_onednn_linears
from sparse_detr.layers.onednn_stages import OneDNNConv2d, use_onednn_stages
from utils import make_inputs, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="PyTorch built without oneDNN's linear")


def _ops(fn):
    """Names of the operators `fn()` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@needs_onednn
@pytest.mark.parametrize("shape,bias", [((37, 24), True), ((2, 5, 24), False), ((1, 3, 4, 24), True)])
def test_onednn_linear_matches_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    assert use_onednn_linears(layer) == 1 and isinstance(layer, OneDNNLinear)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = layer(x)
        assert "mkldnn::_linear_pointwise" in _ops(lambda: layer(x))
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_linear_falls_back_where_it_must():
    """Autograd on, autocast, float64 and tracing all take nn.Linear's own path."""
    layer = nn.Linear(8, 4)
    use_onednn_linears(layer)
    x = torch.randn(3, 8)
    layer(x).sum().backward()  # autograd: gradients reach the weight
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: layer.double()(x.double()))
        traced = torch.jit.trace(layer.float(), x)
    assert "aten::linear" in str(traced.graph) and "mkldnn" not in str(traced.graph)


@needs_onednn
def test_model_uses_onednn_linears_with_unchanged_outputs():
    """CPU_ONEDNN_LINEAR converts every linear layer, keeps the state dict, and the inference outputs."""
    cfgs = [tiny_cfg(CPU_ONEDNN_LINEAR=flag) for flag in (True, False)]
    torch.manual_seed(0)
    fast = build_model(cfgs[0]).eval()
    plain = build_model(cfgs[1]).eval()
    with torch.no_grad():  # non-zero box heads, so that the boxes depend on every layer
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert plain.load_state_dict(fast.state_dict()).missing_keys == []
    fast_modules = dict(fast.named_modules())
    linears = [name for name, m in plain.named_modules() if type(m) is nn.Linear]
    assert linears and all(type(fast_modules[name]) is OneDNNLinear for name in linears)
    assert not any(type(m) is OneDNNLinear for m in plain.modules())
    inputs = make_inputs(((64, 96), (80, 64)))
    with torch.inference_mode():
        got, want = fast.forward_raw(inputs), plain.forward_raw(inputs)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


def _randomize_frozen_batchnorms(model: nn.Module) -> None:
    """Non-trivial statistics, as in a pretrained backbone."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)


def test_fold_frozen_batchnorm_keeps_backbone_outputs():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _randomize_frozen_batchnorms(model)
    norms = sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    images = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        want = model.backbone(images)
        assert fold_frozen_batchnorm(model) == norms > 0
        got = model.backbone(images)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_backbone_input_is_channels_last_except_in_float32_training():
    """channels_last in inference and under bfloat16 autocast (faster there); NCHW in float32 training,
    where channels_last convolutions have the slower backward."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    seen = []
    model.backbone.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    inputs = make_inputs(sizes=((64, 96), (80, 64)))
    model.train()
    with EventStorage(0):
        sum(model(inputs).values()).backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(inputs)
    model.eval()
    with torch.no_grad():
        model(inputs)
    assert seen == [False, True, True]


def _onednn_and_plain_models():
    """The tiny model with CPU_ONEDNN_STAGES on and off, same weights (stem and res2 frozen: FREEZE_AT 2)."""
    torch.manual_seed(0)
    fast = build_model(tiny_cfg(CPU_ONEDNN_STAGES=True))
    _randomize_frozen_batchnorms(fast)
    plain = build_model(tiny_cfg(CPU_ONEDNN_STAGES=False))
    assert plain.load_state_dict(fast.state_dict()).missing_keys == []
    return fast, plain


def _runs_onednn_convolutions(fn) -> bool:
    """Whether `fn()` moves activations to oneDNN tensors (the ordinary CPU convolution is oneDNN's too,
    `aten::mkldnn_convolution`, but on plain tensors)."""
    return "aten::to_mkldnn" in _ops(fn)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_onednn_stages_keep_inference_outputs_and_state_dict():
    fast, plain = _onednn_and_plain_models()
    convs = [name for name, m in plain.backbone.named_modules() if type(m).__name__ == "Conv2d"]
    fast_modules = dict(fast.backbone.named_modules())
    assert convs and all(type(fast_modules[name]) is OneDNNConv2d for name in convs)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    hooks = len(fast.backbone.stem._forward_pre_hooks)
    assert use_onednn_stages(fast.backbone) == ["stem", "res2", "res3", "res4", "res5"]
    assert len(fast.backbone.stem._forward_pre_hooks) == hooks  # set up once
    fast.eval(), plain.eval()
    images = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = fast.backbone(images), plain.backbone(images)
        assert _runs_onednn_convolutions(lambda: fast.backbone(images))
        assert not _runs_onednn_convolutions(lambda: plain.backbone(images))
        for name in want:
            assert got[name].layout == torch.strided and not got[name].is_mkldnn
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)
        inputs = make_inputs(((64, 96), (80, 64)))
        got, want = fast.forward_raw(inputs), plain.forward_raw(inputs)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_onednn_stages_in_training_only_where_no_gradient_flows():
    """In training the frozen stem and res2 take the oneDNN path, the trained res3..res5 the ordinary
    one; losses and gradients are those of the plain model."""
    fast, plain = _onednn_and_plain_models()
    stages_on_onednn = []
    for name, stage in fast.backbone.named_children():
        stage.register_forward_hook(lambda m, args, out, name=name: stages_on_onednn.append(name)
                                    if args[0].is_mkldnn else None)
    inputs = make_inputs(((64, 96), (80, 64)))
    with EventStorage(0):
        losses = [sum(model(inputs).values()) for model in (fast, plain)]
    assert stages_on_onednn == ["stem", "res2"]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)
    for loss in losses:
        loss.backward()
    grads = dict(plain.named_parameters())
    trained = [(name, p) for name, p in fast.named_parameters() if p.requires_grad]
    assert any(name.startswith("backbone.res3") for name, _ in trained)
    for name, p in trained:
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_onednn_stages_fall_back_where_they_must():
    """A gradient through the stage, bfloat16 autocast, float64 and tracing take the ordinary path."""
    fast, _ = _onednn_and_plain_models()
    stem = fast.backbone.stem
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert not _runs_onednn_convolutions(lambda: stem(x).sum().backward())
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert _runs_onednn_convolutions(lambda: stem(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert stem(x).dtype == torch.bfloat16
        assert not _runs_onednn_convolutions(lambda: copy.deepcopy(stem).double()(x.double()))
        traced = torch.jit.trace(stem, x.detach())
    assert "mkldnn" not in str(traced.graph)
    # a stage whose frozen norms became BatchNorm2d again (as adapt_frozen_batchnorm's copy) normalises
    # with the batch's statistics in training mode: the ordinary path
    estimator = FrozenBatchNorm2d.convert_frozenbatchnorm2d_to_batchnorm2d(copy.deepcopy(stem)).train()
    with torch.no_grad():
        assert not _runs_onednn_convolutions(lambda: estimator(x))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_onednn_stages_follow_weight_changes_and_copy():
    """The folded weights are rebuilt after a checkpoint load or a frozen batch norm's update (no stale
    cache), and a model that has run can be deep-copied (the oneDNN cache is not copied)."""
    fast, plain = _onednn_and_plain_models()
    fast.eval(), plain.eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fast.backbone(images)
        _randomize_frozen_batchnorms(plain)
        for p in plain.backbone.parameters():
            p.mul_(1.1)
        fast.load_state_dict(plain.state_dict())
        torch.testing.assert_close(fast.backbone(images)["res5"], plain.backbone(images)["res5"],
                                   rtol=1e-4, atol=1e-4)
        twin = copy.deepcopy(fast)
        torch.testing.assert_close(twin.backbone(images)["res5"], plain.backbone(images)["res5"],
                                   rtol=1e-4, atol=1e-4)

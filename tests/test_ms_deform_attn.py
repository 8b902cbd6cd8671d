"""Multi-scale deformable attention: compiled kernels against the grid_sample reference, autograd, autocast,
fake kernels, dispatch, and the MSDeformAttn module. CUDA twins run where a GPU and CUDA kernels are present."""
import math
import os
import subprocess
import sys

import pytest
import torch

from sparse_detr import _ext
from sparse_detr.layers import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference
from sparse_detr.layers.ms_deform_attn import backend_for_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not _ext.has_extension(), reason=f"sparse_detr._C not built: {_ext.EXTENSION_ERROR}")
HAS_CUDA = torch.cuda.is_available() and _ext.has_cuda_kernels()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no GPU / CUDA kernels"))]

forward_op = torch.ops.sparse_detr.ms_deform_attn_forward if _ext.has_extension() else None
backward_op = torch.ops.sparse_detr.ms_deform_attn_backward if _ext.has_extension() else None


def make_inputs(N=2, M=3, D=4, shapes=((6, 5), (3, 2), (1, 1)), Lq=7, P=2, dtype=torch.float64, device="cpu",
                seed=0, spread=0.2):
    """Random inputs; locations in [-spread, 1 + spread] so some samples fall outside the maps."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    locations = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype) * (1 + 2 * spread) - spread
    weights = torch.rand(N, Lq, M, L, P, generator=g, dtype=dtype)
    return [t.to(device) for t in (value, spatial_shapes, level_start_index, locations, weights)]


def grads(fn, value, spatial_shapes, level_start_index, locations, weights, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves], grad_out


def assert_matches_reference(inputs, atol, rtol=0.0):
    out, (gv, gl, ga), g = grads(ms_deform_attn, *inputs)
    ref, (rv, rl, ra), _ = grads(ms_deform_attn_reference, *inputs, grad_out=g)
    for name, a, b in (("output", out, ref), ("grad value", gv, rv), ("grad locations", gl, rl),
                       ("grad weights", ga, ra)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    value, shapes, starts, loc, w = make_inputs(N=1, M=2, D=3, shapes=((4, 3), (2, 2), (1, 1)), Lq=3, device=device)
    inputs = [t.requires_grad_() for t in (value, loc, w)]
    assert torch.autograd.gradcheck(lambda v, l, a: forward_op(v, shapes, starts, l, a), inputs)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("D", [1, 7, 32, 33])
def test_matches_reference(device, N, D):
    inputs = make_inputs(N=N, D=D, Lq=11, device=device, seed=D + N)
    assert backend_for_device(device) == "compiled kernel"
    assert_matches_reference(inputs, atol=1e-10)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_random_geometry(device, seed):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    shapes = tuple((draw(1, 9), draw(1, 9)) for _ in range(draw(1, 4)))
    inputs = make_inputs(N=draw(1, 3), M=draw(1, 4), D=draw(1, 40), shapes=shapes, Lq=draw(1, 30), P=draw(1, 4),
                         device=device, seed=seed)
    assert_matches_reference(inputs, atol=1e-10)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_float32_many_queries(device):
    """Enough queries for every thread to take work (the CPU backward then sums per-thread grad_value copies)."""
    inputs = make_inputs(N=2, M=8, D=32, shapes=((16, 20), (8, 10), (4, 5), (2, 3)), Lq=300, P=4,
                         dtype=torch.float32, device=device, spread=0.05)
    assert_matches_reference(inputs, atol=2e-4, rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("threads,heads", [(2, 1), (4, 3), (3, 8)])
def test_cpu_work_split(threads, heads):
    """Backward work split over head groups and query blocks, with per-worker grad_value copies when there are
    more threads than head groups (2 threads x 1 head, 4 threads x 3 heads)."""
    inputs = make_inputs(N=2, M=heads, D=8, Lq=100)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_reference(inputs, atol=1e-10)
    finally:
        torch.set_num_threads(previous)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_samples_exactly_on_borders_and_outside(device):
    """Pixel coordinates -1, -0.5, 0, W-1, W-0.5, W and beyond (exact in binary, as in grid_sample)."""
    value, shapes, starts, _, _ = make_inputs(N=1, M=1, D=5, shapes=((4, 8), (2, 2), (1, 1)), device=device)
    loc = []
    for h, w in shapes.tolist():  # per level: a grid of pixel coordinates around and on its borders
        xs = torch.tensor([-2.0, -1.0, -0.75, -0.5, 0.0, 0.5, w - 1.0, w - 0.5, w - 0.25, w, w + 1.0])
        ys = torch.tensor([-2.0, -1.0, -0.5, 0.0, h - 1.0, h - 0.5, h, h + 1.0])
        px, py = torch.meshgrid(xs, ys, indexing="ij")
        # normalised location whose pixel coordinate `loc * size - 0.5` is exactly (px, py)
        loc.append(torch.stack([(px.flatten() + 0.5) / w, (py.flatten() + 0.5) / h], -1))
    Lq = loc[0].shape[0]
    loc = torch.stack(loc, 1).view(1, Lq, 1, 3, 1, 2).double()
    weights = torch.rand(1, Lq, 1, 3, 1, dtype=torch.float64)
    assert_matches_reference([value, shapes, starts, loc.to(device), weights.to(device)], atol=1e-12)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    value, shapes, starts, loc, w = make_inputs(D=6, device=device)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)  # (N, S, M, D) view with D stride != 1
    loc_nc = torch.stack([loc, loc], dim=-1)[..., 0]                # every other element
    w_nc = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or w_nc.is_contiguous())
    torch.testing.assert_close(loc_nc, loc)
    assert_matches_reference([value_nc, shapes, starts, loc_nc, w_nc], atol=1e-10)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_no_queries(device):
    value, shapes, starts, loc, w = make_inputs(Lq=0, device=device)
    out, (gv, gl, ga), _ = grads(ms_deform_attn, value, shapes, starts, loc, w)
    assert out.shape == (2, 0, 3 * 4) and gl.shape == loc.shape and ga.shape == w.shape
    assert gv.shape == value.shape and not gv.any()


@needs_ext
def test_level_start_index_is_honoured():
    """Levels stored with gaps in S: the kernel reads where level_start_index says."""
    value, shapes, starts, loc, w = make_inputs()
    gap = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    sizes = shapes.prod(1).tolist()
    parts = value.split(sizes, dim=1)
    spaced = torch.cat([gap, parts[0], gap, parts[1], parts[2], gap], dim=1)
    spaced_starts = torch.tensor([5, 5 + sizes[0] + 5, 5 + sizes[0] + 5 + sizes[1]])
    torch.testing.assert_close(forward_op(spaced, shapes, spaced_starts, loc, w),
                               ms_deform_attn_reference(value, shapes, starts, loc, w))
    with pytest.raises(RuntimeError, match="does not fit"):
        forward_op(value, shapes, starts + 1, loc, w)


@needs_ext
def test_rejects_mismatched_inputs():
    value, shapes, starts, loc, w = make_inputs()
    with pytest.raises(RuntimeError, match="share one dtype"):
        forward_op(value, shapes, starts, loc.float(), w)
    with pytest.raises(RuntimeError, match="attention_weights must be"):
        forward_op(value, shapes, starts, loc, w[:, :, :, :2])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_half_types_computed_in_float32(device):
    value, shapes, starts, loc, w = make_inputs(dtype=torch.float32, device=device)
    ref = ms_deform_attn_reference(value, shapes, starts, loc, w)
    dtypes = [torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    for dtype in dtypes:
        out = forward_op(value.to(dtype), shapes, starts, loc.to(dtype), w.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bfloat16(device):
    """Under autocast the op runs in float32 (inputs cast up) and returns value's dtype; gradients flow back."""
    value, shapes, starts, loc, w = make_inputs(dtype=torch.float32, device=device)
    proj = torch.nn.Linear(4, 4).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        v = proj(value)
        assert v.dtype == torch.bfloat16
        out = ms_deform_attn(v, shapes, starts, loc, w)
    assert out.dtype == torch.bfloat16
    ref = ms_deform_attn_reference(proj(value), shapes, starts, loc, w)
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    out.float().sum().backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fake_kernels_and_autograd_registration(device):
    value, shapes, starts, loc, w = make_inputs(N=1, D=3, Lq=4, device=device)
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), w.requires_grad_())
    torch.library.opcheck(forward_op, args)
    grad = torch.randn(1, 4, 9, dtype=value.dtype, device=device)
    torch.library.opcheck(backward_op, (grad, value.detach(), shapes, starts, loc.detach(), w.detach()))


@needs_ext
def test_export_and_compile():
    value, shapes, starts, loc, w = make_inputs(dtype=torch.float32)

    class Attn(torch.nn.Module):
        def forward(self, value, loc, w):
            return ms_deform_attn(value, shapes, starts, loc, w)

    exported = torch.export.export(Attn(), (value, loc, w))
    assert forward_op.default in [n.target for n in exported.graph.nodes]
    torch.testing.assert_close(exported.module()(value, loc, w), Attn()(value, loc, w))
    compiled = torch.compile(Attn(), backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (value, loc, w)]
    compiled(*leaves).sum().backward()
    _, expected, _ = grads(ms_deform_attn, value, shapes, starts, loc, w, grad_out=torch.ones(2, 7, 12))
    for got, want in zip([t.grad for t in leaves], expected):
        torch.testing.assert_close(got, want)


def test_reference_forced_by_environment(monkeypatch):
    inputs = make_inputs()
    monkeypatch.setenv("SPARSE_DETR_MSDA", "reference")
    assert backend_for_device("cpu") == "reference (grid_sample)"
    assert torch.equal(ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs))


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_reference_path_with_extension_hidden():
    code = (
        "import sys; sys.modules['sparse_detr._C'] = None\n"  # makes `from . import _C` raise ImportError
        "import torch\n"
        "from sparse_detr import _ext\n"
        "from sparse_detr.layers import MSDeformAttn\n"
        "from sparse_detr.layers.ms_deform_attn import backend_for_device\n"
        "assert not _ext.has_extension() and backend_for_device('cpu').startswith('reference')\n"
        "m = MSDeformAttn(32, 2, 4, 2)\n"
        "shapes = torch.tensor([[4, 4], [2, 2]]); starts = torch.tensor([0, 16])\n"
        "out = m(torch.randn(2, 5, 32), torch.rand(2, 5, 2, 2), torch.randn(2, 20, 32), shapes, starts)\n"
        "out.sum().backward(); print('ok', tuple(out.shape))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "ok (2, 5, 32)" in result.stdout


@needs_ext
def test_baseline_instruction_set_variant():
    """The CPU kernels are compiled for x86-64 baseline and AVX2; force the baseline and compare."""
    code = (
        "import torch, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_ms_deform_attn import make_inputs, assert_matches_reference\n"
        "torch.set_num_threads(2)\n"
        "assert_matches_reference(make_inputs(D=33, Lq=40), atol=1e-10)\n"
        "assert_matches_reference(make_inputs(D=32, Lq=40, dtype=torch.float32), atol=1e-4, rtol=1e-4)\n"
        "print('ok')\n"
    )
    result = _run_python(code, ATEN_CPU_CAPABILITY="default")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ------------------------------------------------------------------------------------------ the module


def test_module_official_initialisation_and_parameter_names():
    m = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    names = {n for n, _ in m.named_parameters()}
    assert names == {f"{layer}.{p}" for layer in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
                     for p in ("weight", "bias")}
    assert not m.sampling_offsets.weight.any() and not m.attention_weights.weight.any()
    bias = m.sampling_offsets.bias.view(8, 4, 4, 2)
    # head h points along (cos, sin)(2 pi h / 8) scaled to max-norm 1, times (point index + 1), for every level
    for h in range(8):
        direction = torch.tensor([math.cos(2 * math.pi * h / 8), math.sin(2 * math.pi * h / 8)])
        direction = direction / direction.abs().max()
        for p in range(4):
            torch.testing.assert_close(bias[h, :, p], direction.expand(4, 2) * (p + 1))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_reference_points_and_sampling(ref_dim):
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    query, memory = torch.randn(2, 5, 16), torch.randn(2, 60, 16)
    ref = torch.rand(2, 5, 2, ref_dim)
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[1, 40:] = True
    out, loc, weights = m(query, ref, memory, shapes, starts, mask, return_sampling=True)
    assert out.shape == (2, 5, 16) and loc.shape == (2, 5, 2, 2, 3, 2) and weights.shape == (2, 5, 2, 2, 3)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 5, 2))
    offsets = m.sampling_offsets(query).view(2, 5, 2, 2, 3, 2)
    if ref_dim == 2:
        expected = ref[:, :, None, :, None, :] + offsets / torch.tensor([[8.0, 6.0], [4.0, 3.0]])[:, None, :]
    else:
        expected = ref[:, :, None, :, None, :2] + offsets / 3 * ref[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(loc, expected)
    # same module through the reference path
    value = m.value_proj(memory).masked_fill(mask[..., None], 0).view(2, 60, 2, 8)
    expected_out = m.output_proj(ms_deform_attn_reference(value, shapes, starts, loc, weights))
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)

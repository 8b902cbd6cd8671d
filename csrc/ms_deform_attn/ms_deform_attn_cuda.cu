// CUDA kernels of multi-scale deformable attention: float32, float64, and float16/bfloat16 natively (read and
// written in their dtype, computed in float32; grad_value accumulated in a float32 buffer).
//
// Forward: one thread per output element (n, q, m, d); the threads of a warp read D contiguous channels of a
// corner. Backward: one warp per (n, q, m), lanes over channels; grad_value by atomicAdd, grad of locations
// and attention weights by warp reductions (no atomics).
//
// Levels: when spatial_shapes / level_start_index are CPU tensors they are checked against S on the host; when
// they are CUDA tensors nothing is read back (no host sync) and a level that does not fit in S is skipped.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ms_deform_attn.h"

namespace sparse_detr::msda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

struct Sizes {
  int64_t Lq, S, M, D, L, P;
};

// Reads a level's (H, W, start); false when the level does not fit in S rows.
__device__ __forceinline__ bool read_level(const int64_t* shapes, const int64_t* starts, int64_t l, int64_t S,
                                           int64_t& H, int64_t& W, int64_t& start) {
  H = shapes[2 * l];
  W = shapes[2 * l + 1];
  start = starts[l];
  return H >= 0 && W >= 0 && start >= 0 && start + H * W <= S;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t total,
                               Sizes s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = s.M * s.D;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = t % s.D;
    const int64_t qm = t / s.D;  // (n * Lq + q) * M + m
    const int64_t m = qm % s.M;
    const int64_t n = qm / (s.M * s.Lq);
    const scalar_t* loc_qm = loc + qm * s.L * s.P * 2;
    const scalar_t* attn_qm = attn + qm * s.L * s.P;
    acc_t acc = 0;
    for (int64_t l = 0; l < s.L; ++l) {
      int64_t H, W, start;
      if (!read_level(shapes, starts, l, s.S, H, W, start)) continue;
      const scalar_t* v = value + (n * s.S + start) * row + m * s.D + d;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t i = l * s.P + p;
        Bilinear<acc_t> b;
        if (!bilinear_setup(static_cast<acc_t>(loc_qm[2 * i]), static_cast<acc_t>(loc_qm[2 * i + 1]), H, W, b)) {
          continue;
        }
        const acc_t w = static_cast<acc_t>(attn_qm[i]);
        const acc_t hx = 1 - b.fx, hy = 1 - b.fy;
        const int64_t c00 = (b.y0 * W + b.x0) * row, c01 = c00 + row, c10 = c00 + W * row, c11 = c10 + row;
        acc_t sample = 0;
        if (b.y0_in && b.x0_in) sample += hy * hx * static_cast<acc_t>(v[c00]);
        if (b.y0_in && b.x1_in) sample += hy * b.fx * static_cast<acc_t>(v[c01]);
        if (b.y1_in && b.x0_in) sample += b.fy * hx * static_cast<acc_t>(v[c10]);
        if (b.y1_in && b.x1_in) sample += b.fy * b.fx * static_cast<acc_t>(v[c11]);
        acc += w * sample;
      }
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

// grad_value is (N, S, M, D) in acc_t (float32 for half types).
template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                                at::opmath_type<scalar_t>* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn, int64_t total_warps, Sizes s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = s.M * s.D;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = int64_t(gridDim.x) * blockDim.x / kWarp;
  // qm is uniform across the warp, so every branch on it (and on the sample geometry) is too.
  for (int64_t qm = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; qm < total_warps;
       qm += warps_per_grid) {
    const int64_t m = qm % s.M;
    const int64_t n = qm / (s.M * s.Lq);
    const scalar_t* g = grad_out + qm * s.D;
    const scalar_t* loc_qm = loc + qm * s.L * s.P * 2;
    const scalar_t* attn_qm = attn + qm * s.L * s.P;
    scalar_t* grad_loc_qm = grad_loc + qm * s.L * s.P * 2;
    scalar_t* grad_attn_qm = grad_attn + qm * s.L * s.P;
    for (int64_t l = 0; l < s.L; ++l) {
      int64_t H, W, start;
      const bool level_ok = read_level(shapes, starts, l, s.S, H, W, start);
      const int64_t offset = (n * s.S + start) * row + m * s.D;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t i = l * s.P + p;
        Bilinear<acc_t> b;
        if (!level_ok ||
            !bilinear_setup(static_cast<acc_t>(loc_qm[2 * i]), static_cast<acc_t>(loc_qm[2 * i + 1]), H, W, b)) {
          if (lane == 0) {
            grad_loc_qm[2 * i] = grad_loc_qm[2 * i + 1] = grad_attn_qm[i] = static_cast<scalar_t>(0);
          }
          continue;
        }
        const acc_t w = static_cast<acc_t>(attn_qm[i]);
        const acc_t hx = 1 - b.fx, hy = 1 - b.fy;
        const acc_t w00 = hy * hx, w01 = hy * b.fx, w10 = b.fy * hx, w11 = b.fy * b.fx;
        const bool in00 = b.y0_in && b.x0_in, in01 = b.y0_in && b.x1_in;
        const bool in10 = b.y1_in && b.x0_in, in11 = b.y1_in && b.x1_in;
        const int64_t c00 = offset + (b.y0 * W + b.x0) * row, c01 = c00 + row, c10 = c00 + W * row, c11 = c10 + row;
        acc_t grad_a = 0, grad_x = 0, grad_y = 0;  // this lane's share of the channel sums
        for (int64_t d = lane; d < s.D; d += kWarp) {
          const acc_t gd = static_cast<acc_t>(g[d]);
          const acc_t v00 = in00 ? static_cast<acc_t>(value[c00 + d]) : acc_t(0);
          const acc_t v01 = in01 ? static_cast<acc_t>(value[c01 + d]) : acc_t(0);
          const acc_t v10 = in10 ? static_cast<acc_t>(value[c10 + d]) : acc_t(0);
          const acc_t v11 = in11 ? static_cast<acc_t>(value[c11 + d]) : acc_t(0);
          grad_a += gd * (w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11);
          grad_x += gd * (hy * (v01 - v00) + b.fy * (v11 - v10));
          grad_y += gd * (hx * (v10 - v00) + b.fx * (v11 - v01));
          const acc_t wg = w * gd;
          if (in00) atomicAdd(grad_value + c00 + d, w00 * wg);
          if (in01) atomicAdd(grad_value + c01 + d, w01 * wg);
          if (in10) atomicAdd(grad_value + c10 + d, w10 * wg);
          if (in11) atomicAdd(grad_value + c11 + d, w11 * wg);
        }
        grad_a = warp_sum(grad_a);
        grad_x = warp_sum(grad_x);
        grad_y = warp_sum(grad_y);
        if (lane == 0) {
          grad_attn_qm[i] = static_cast<scalar_t>(grad_a);
          grad_loc_qm[2 * i] = static_cast<scalar_t>(w * static_cast<acc_t>(W) * grad_x);
          grad_loc_qm[2 * i + 1] = static_cast<scalar_t>(w * static_cast<acc_t>(H) * grad_y);
        }
      }
    }
  }
}

int64_t num_blocks(int64_t threads_needed) {
  return std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, kMaxBlocks);
}

// spatial_shapes and level_start_index as contiguous int64 tensors on value's device (checked when on the CPU).
std::pair<at::Tensor, at::Tensor> level_tensors(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                                const at::Tensor& value) {
  auto shapes = spatial_shapes.to(at::kLong).contiguous();
  auto starts = level_start_index.to(at::kLong).contiguous();
  if (shapes.is_cpu() && starts.is_cpu()) check_levels(shapes, starts, value.size(1));
  return {shapes.to(value.device()), starts.to(value.device())};
}

Sizes sizes_of(const Dims& d) { return Sizes{d.Lq, d.S, d.M, d.D, d.L, d.P}; }

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Dims dims = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA): value must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor shapes, starts;
  std::tie(shapes, starts) = level_tensors(spatial_shapes, level_start_index, value);
  const auto v = value.contiguous(), loc = sampling_locations.contiguous(), attn = attention_weights.contiguous();
  auto out = at::empty({dims.N, dims.Lq, dims.M * dims.D}, value.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
        attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total, sizes_of(dims));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output, const at::Tensor& value,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights) {
  const Dims dims = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda() && grad_output.device() == value.device(),
              "ms_deform_attn_backward (CUDA): grad_output and value must be CUDA tensors on one device");
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == dims.N && grad_output.size(1) == dims.Lq &&
                  grad_output.size(2) == dims.M * dims.D,
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D), got " +
                  shape_str(grad_output.sizes()));
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor shapes, starts;
  std::tie(shapes, starts) = level_tensors(spatial_shapes, level_start_index, value);
  const auto g = grad_output.to(value.scalar_type()).contiguous();
  const auto v = value.contiguous(), loc = sampling_locations.contiguous(), attn = attention_weights.contiguous();
  auto grad_value = at::zeros(v.sizes(), v.options().dtype(at::toOpMathType(v.scalar_type())));
  auto grad_loc = at::empty_like(loc);
  auto grad_attn = at::empty_like(attn);
  const int64_t total_warps = dims.N * dims.Lq * dims.M;
  if (total_warps > 0 && dims.L * dims.P > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      backward_kernel<scalar_t><<<num_blocks(total_warps * kWarp), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), grad_value.data_ptr<at::opmath_type<scalar_t>>(),
          grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), total_warps, sizes_of(dims));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_detr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &forward_cuda);
  m.impl("ms_deform_attn_backward", &backward_cuda);
}

}  // namespace sparse_detr::msda

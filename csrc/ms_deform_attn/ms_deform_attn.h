// Multi-scale deformable attention: input checks and bilinear geometry shared by the CPU and CUDA kernels.
// The schemas are in csrc/vision.cpp; each kernel file registers its own implementations.
//
//   value               (N, S, M, D)         S = sum over levels of H_l * W_l
//   spatial_shapes      (L, 2) int64          (H_l, W_l)
//   level_start_index   (L,)  int64           offset of level l in S
//   sampling_locations  (N, Lq, M, L, P, 2)   normalised (x, y)
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
// A sample at normalised (x, y) reads the level at pixel (x * W - 0.5, y * H - 0.5), bilinearly, with
// zeros outside the map: `grid_sample(..., align_corners=False, padding_mode="zeros")`.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include <torch/types.h>

#ifdef __CUDACC__
#define SD_INLINE __host__ __device__ __forceinline__
#else
#define SD_INLINE inline
#endif

namespace sparse_detr::msda {

// The four bilinear corners of one sample: top-left pixel (x0, y0), fractions (fx, fy), which of the
// rows y0, y0+1 and columns x0, x0+1 lie inside the map.
template <typename T>
SD_INLINE T floor_of(T v) {
#ifdef __CUDA_ARCH__
  return ::floor(v);
#else
  return std::floor(v);
#endif
}

template <typename T>
struct Bilinear {
  int64_t x0, y0;
  T fx, fy;
  bool x0_in, x1_in, y0_in, y1_in;
};

// Fills `b` and returns true when at least one corner is inside the map. The lower bound is
// inclusive (x == -1 still has corner x0 + 1 == 0 inside, with weight 0), so gradients at the
// border match grid_sample's; NaN coordinates are rejected.
template <typename T>
SD_INLINE bool bilinear_setup(T loc_x, T loc_y, int64_t H, int64_t W, Bilinear<T>& b) {
  const T x = loc_x * static_cast<T>(W) - T(0.5);
  const T y = loc_y * static_cast<T>(H) - T(0.5);
  if (!(x >= T(-1) && y >= T(-1) && x < static_cast<T>(W) && y < static_cast<T>(H))) {
    return false;
  }
  const T xf = floor_of(x), yf = floor_of(y);
  b.x0 = static_cast<int64_t>(xf);
  b.y0 = static_cast<int64_t>(yf);
  b.fx = x - xf;
  b.fy = y - yf;
  b.x0_in = b.x0 >= 0;
  b.x1_in = b.x0 + 1 < W;
  b.y0_in = b.y0 >= 0;
  b.y1_in = b.y0 + 1 < H;
  return true;
}


// "[2, 7, 3]": error messages are assembled with std::to_string and passed to TORCH_CHECK as one string.
// Streaming int64_t or IntArrayRef through TORCH_CHECK's own formatter killed the process (SIGSEGV) instead
// of raising on an H200 machine's torch 2.11.0+cu130 (extension built there by /opt/gcc g++ on 2026-11-28 and
// by g++ 13.3 on 2026-12-04); std::to_string sidesteps the formatter, the message reads the same.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

// Checks ranks, sizes, dtypes and devices (not the contents of spatial_shapes: see check_levels).
inline Dims check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                         const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got " + shape_str(value.sizes()));
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got " +
                  shape_str(sampling_locations.sizes()));
  const Dims d{value.size(0), value.size(1), value.size(2), value.size(3),
               sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == d.N && sampling_locations.size(2) == d.M,
              "ms_deform_attn: sampling_locations " + shape_str(sampling_locations.sizes()) + " do not match value " +
                  shape_str(value.sizes()));
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be " + shape_str(sampling_locations.sizes().slice(0, 5)) +
                  ", got " + shape_str(attention_weights.sizes()));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == d.L && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with L = " + std::to_string(d.L) + ", got " +
                  shape_str(spatial_shapes.sizes()));
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == d.L,
              "ms_deform_attn: level_start_index must be (L,) with L = " + std::to_string(d.L) + ", got " +
                  shape_str(level_start_index.sizes()));
  TORCH_CHECK(!at::isFloatingType(spatial_shapes.scalar_type()) && !at::isFloatingType(level_start_index.scalar_type()),
              "ms_deform_attn: spatial_shapes and level_start_index must be integer tensors");
  TORCH_CHECK(at::isFloatingType(value.scalar_type()), std::string("ms_deform_attn: value must be floating point, got ") +
                  c10::toString(value.scalar_type()));
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              std::string("ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, got ") +
                  c10::toString(value.scalar_type()) + ", " + c10::toString(sampling_locations.scalar_type()) + ", " +
                  c10::toString(attention_weights.scalar_type()));
  TORCH_CHECK(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be on one device");
  return d;
}

// Checks that every level lies inside value's S rows (spatial_shapes, level_start_index: int64 CPU).
inline void check_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t S) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
    TORCH_CHECK(H >= 0 && W >= 0 && start >= 0 && start + H * W <= S,
                "ms_deform_attn: level " + std::to_string(l) + " (H=" + std::to_string(H) + ", W=" + std::to_string(W) +
                    ", start=" + std::to_string(start) + ") does not fit in value's S = " + std::to_string(S) +
                    " rows");
  }
}

}  // namespace sparse_detr::msda

// CPU kernels of multi-scale deformable attention (float32, float64; float16/bfloat16 computed in float32).
//
// The op is bound by scattered reads: with value laid out (N, S, M, D), one bilinear corner is D contiguous
// values, and the loops over D are vectorised. Work is handed out dynamically in blocks of queries.
// Forward: parallel over queries (each block does all heads). Backward: parallel over queries and over groups
// of heads. grad_value is the only output that two queries can share: workers of different head groups write
// disjoint heads of it; workers of the same group split the queries and each accumulates into its own copy
// ("replica": replica 0 is grad_value itself, the others are summed into it at the end). With 2 threads and
// 8 heads that is two groups of 4 heads and no copy; with more threads than heads, copies appear (at most
// kReplicaBudgetBytes of them).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>
#include <vector>

#include "ms_deform_attn.h"

namespace sparse_detr::msda {
namespace {

constexpr int64_t kQueryBlock = 16;                         // (n, q) pairs per work item
constexpr int64_t kPrefetchAhead = 1;                       // (query, head) pairs between prefetch and use (2: slower)
constexpr int64_t kReplicaBudgetBytes = int64_t(1) << 30;  // private grad_value copies in the backward

#if defined(__GNUC__) || defined(__clang__)
#define SD_ALWAYS_INLINE inline __attribute__((always_inline))
#define SD_PREFETCH(address, for_write) __builtin_prefetch((address), (for_write))
#else
#define SD_ALWAYS_INLINE inline
#define SD_PREFETCH(address, for_write)
#endif

// y += s * x over D channels.
template <int kD, typename T>
SD_ALWAYS_INLINE void axpy(int64_t D, T s, const T* __restrict__ x, T* __restrict__ y) {
  const int64_t n = kD > 0 ? kD : D;
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += s * x[d];
}

// Returns <g, v> and does gv += s * g, over D channels.
template <int kD, typename T>
SD_ALWAYS_INLINE T dot_and_scatter(int64_t D, const T* __restrict__ g, const T* __restrict__ v, T* __restrict__ gv,
                                   T s) {
  const int64_t n = kD > 0 ? kD : D;
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < n; ++d) {
    dot += g[d] * v[d];
    gv[d] += s * g[d];
  }
  return dot;
}

struct Levels {
  const int64_t* shapes;  // (L, 2) as (H, W)
  const int64_t* starts;  // (L,)
};

template <typename T>
struct ForwardArgs {
  Dims dims;
  Levels lv;
  const T *value, *loc, *attn;
  T* out;
};

// Backward work split: worker w does heads [g * heads_per_group, (g + 1) * heads_per_group) with g = w % groups,
// and accumulates grad_value into replica w / groups.
struct BackwardSplit {
  int64_t groups, heads_per_group, replicas;
  int64_t workers() const { return groups * replicas; }
};

template <typename T>
struct BackwardArgs {
  Dims dims;
  Levels lv;
  BackwardSplit split;
  const T *grad_out, *value, *loc, *attn;
  T* const* grad_values;  // one zero-initialised (N, S, M, D) accumulator per replica; [0] is the output
  T *grad_loc, *grad_attn;
};

// Prefetches the value rows (and, in the backward, the grad_value rows) that one (query, head) will read, so that
// those reads overlap the arithmetic of the (query, head) before it. value_nm / grad_value_nm point at image n,
// head m; loc_qm at the (query, head)'s (L, P, 2) locations.
template <typename T>
SD_ALWAYS_INLINE void prefetch_corners(const Dims& dims, Levels lv, int64_t D, const T* loc_qm, const T* value_nm,
                                       const T* grad_value_nm) {
  const int64_t row = dims.M * D;
  for (int64_t l = 0; l < dims.L; ++l) {
    const int64_t H = lv.shapes[2 * l], W = lv.shapes[2 * l + 1];
    for (int64_t p = 0; p < dims.P; ++p) {
      const int64_t i = l * dims.P + p;
      Bilinear<T> b;
      if (!bilinear_setup(loc_qm[2 * i], loc_qm[2 * i + 1], H, W, b)) continue;
      const int64_t x0 = std::max<int64_t>(b.x0, 0), x1 = std::min<int64_t>(b.x0 + 1, W - 1);
      const int64_t y0 = std::max<int64_t>(b.y0, 0), y1 = std::min<int64_t>(b.y0 + 1, H - 1);
      for (const int64_t pixel : {y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1}) {
        const int64_t offset = (lv.starts[l] + pixel) * row;
        for (int64_t byte = 0; byte < D * int64_t(sizeof(T)); byte += 64) {
          SD_PREFETCH(reinterpret_cast<const char*>(value_nm + offset) + byte, 0);
          if (grad_value_nm) SD_PREFETCH(reinterpret_cast<const char*>(grad_value_nm + offset) + byte, 1);
        }
      }
    }
  }
}

// Forward over the (n, q) pairs [begin, end):
// out[n, q, m, :] = sum over (l, p) of attention * bilinear(value[n, level l, m, :], location).
template <typename T, int kD>
struct ForwardBlock {
  using Args = ForwardArgs<T>;
  SD_ALWAYS_INLINE static void run(const Args& a, int64_t /*worker*/, int64_t begin, int64_t end) {
    const int64_t D = kD > 0 ? kD : a.dims.D;
    const int64_t M = a.dims.M, L = a.dims.L, P = a.dims.P, Lq = a.dims.Lq;
    const int64_t row = M * D;  // distance between two pixels of value
    for (int64_t nq = begin; nq < end; ++nq) {
      const T* value_n = a.value + (nq / Lq) * a.dims.S * row;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t qm = nq * M + m;
        if (const int64_t next = qm + kPrefetchAhead; next < end * M) {  // a later (query, head) of this block
          prefetch_corners<T>(a.dims, a.lv, D, a.loc + next * L * P * 2,
                              a.value + (next / M / Lq) * a.dims.S * row + (next % M) * D, nullptr);
        }
        const T* loc_qm = a.loc + qm * L * P * 2;
        const T* attn_qm = a.attn + qm * L * P;
        T local[kD > 0 ? kD : 1];
        T* acc = kD > 0 ? local : a.out + qm * D;
        for (int64_t d = 0; d < D; ++d) acc[d] = T(0);
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = a.lv.shapes[2 * l], W = a.lv.shapes[2 * l + 1];
          const T* value_l = value_n + a.lv.starts[l] * row + m * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = l * P + p;
            Bilinear<T> b;
            if (!bilinear_setup(loc_qm[2 * i], loc_qm[2 * i + 1], H, W, b)) continue;
            const T w = attn_qm[i];
            const T hx = 1 - b.fx, hy = 1 - b.fy;
            const int64_t top = b.y0 * W + b.x0, bottom = top + W;
            if (b.y0_in && b.x0_in) axpy<kD>(D, w * hy * hx, value_l + top * row, acc);
            if (b.y0_in && b.x1_in) axpy<kD>(D, w * hy * b.fx, value_l + (top + 1) * row, acc);
            if (b.y1_in && b.x0_in) axpy<kD>(D, w * b.fy * hx, value_l + bottom * row, acc);
            if (b.y1_in && b.x1_in) axpy<kD>(D, w * b.fy * b.fx, value_l + (bottom + 1) * row, acc);
          }
        }
        if constexpr (kD > 0) {
          for (int64_t d = 0; d < kD; ++d) a.out[qm * D + d] = local[d];
        }
      }
    }
  }
};

// Backward over the (n, q) pairs [begin, end) and this worker's heads. grad_loc and grad_attn are per sample
// (race-free); grad_value goes to this worker's replica.
template <typename T, int kD>
struct BackwardBlock {
  using Args = BackwardArgs<T>;
  SD_ALWAYS_INLINE static void run(const Args& a, int64_t worker, int64_t begin, int64_t end) {
    const int64_t D = kD > 0 ? kD : a.dims.D;
    const int64_t M = a.dims.M, L = a.dims.L, P = a.dims.P, Lq = a.dims.Lq;
    const int64_t row = M * D;
    const int64_t group = worker % a.split.groups, replica = worker / a.split.groups;
    const int64_t m_begin = group * a.split.heads_per_group;
    const int64_t m_end = std::min(M, m_begin + a.split.heads_per_group);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n_offset = (nq / Lq) * a.dims.S * row;
      const T* value_n = a.value + n_offset;
      T* grad_value_n = a.grad_values[replica] + n_offset;
      for (int64_t m = m_begin; m < m_end; ++m) {
        const int64_t qm = nq * M + m;
        const int64_t next = (nq - begin) * (m_end - m_begin) + (m - m_begin) + kPrefetchAhead;
        const int64_t nq_next = begin + next / (m_end - m_begin), m_next = m_begin + next % (m_end - m_begin);
        if (nq_next < end) {  // a later (query, head) of this block and worker
          const int64_t n_next_offset = (nq_next / Lq) * a.dims.S * row + m_next * D;
          prefetch_corners<T>(a.dims, a.lv, D, a.loc + (nq_next * M + m_next) * L * P * 2, a.value + n_next_offset,
                              a.grad_values[replica] + n_next_offset);
        }
        const T* g = a.grad_out + qm * D;
        const T* loc_qm = a.loc + qm * L * P * 2;
        const T* attn_qm = a.attn + qm * L * P;
        T* grad_loc_qm = a.grad_loc + qm * L * P * 2;
        T* grad_attn_qm = a.grad_attn + qm * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = a.lv.shapes[2 * l], W = a.lv.shapes[2 * l + 1];
          const int64_t offset = a.lv.starts[l] * row + m * D;
          const T* v = value_n + offset;
          T* gv = grad_value_n + offset;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = l * P + p;
            Bilinear<T> b;
            if (!bilinear_setup(loc_qm[2 * i], loc_qm[2 * i + 1], H, W, b)) {
              grad_loc_qm[2 * i] = grad_loc_qm[2 * i + 1] = grad_attn_qm[i] = T(0);
              continue;
            }
            const T w = attn_qm[i];
            const T hx = 1 - b.fx, hy = 1 - b.fy;
            const int64_t c00 = (b.y0 * W + b.x0) * row, c01 = c00 + row, c10 = c00 + W * row, c11 = c10 + row;
            T d00 = 0, d01 = 0, d10 = 0, d11 = 0;  // <grad_out, corner value>
            if (b.y0_in && b.x0_in) d00 = dot_and_scatter<kD>(D, g, v + c00, gv + c00, w * hy * hx);
            if (b.y0_in && b.x1_in) d01 = dot_and_scatter<kD>(D, g, v + c01, gv + c01, w * hy * b.fx);
            if (b.y1_in && b.x0_in) d10 = dot_and_scatter<kD>(D, g, v + c10, gv + c10, w * b.fy * hx);
            if (b.y1_in && b.x1_in) d11 = dot_and_scatter<kD>(D, g, v + c11, gv + c11, w * b.fy * b.fx);
            grad_attn_qm[i] = hy * (hx * d00 + b.fx * d01) + b.fy * (hx * d10 + b.fx * d11);
            grad_loc_qm[2 * i] = w * static_cast<T>(W) * (hy * (d01 - d00) + b.fy * (d11 - d10));
            grad_loc_qm[2 * i + 1] = w * static_cast<T>(H) * (hx * (d10 - d00) + b.fx * (d11 - d01));
          }
        }
      }
    }
  }
};

// Each block function is compiled twice, for the x86-64 baseline and for AVX2 + FMA, and picked at run time from
// ATen's CPU capability (ATEN_CPU_CAPABILITY=default forces the baseline). AVX-512 code measured slower than AVX2
// here (AMD EPYC, 2 threads), so AVX-512 machines run the AVX2 variant.
template <class Block>
using BlockFn = void (*)(const typename Block::Args&, int64_t, int64_t, int64_t);

template <class Block>
void run_baseline(const typename Block::Args& a, int64_t w, int64_t begin, int64_t end) {
  Block::run(a, w, begin, end);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <class Block>
__attribute__((target("avx2,fma"))) void run_avx2(const typename Block::Args& a, int64_t w, int64_t begin,
                                                    int64_t end) {
  Block::run(a, w, begin, end);
}
#endif

template <class Block>
BlockFn<Block> select_variant() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const std::string capability = at::get_cpu_capability();
  if (capability == "AVX2" || capability == "AVX512") return &run_avx2<Block>;
#endif
  return &run_baseline<Block>;
}

// Runs `Block` over the (n, q) pairs [0, total) with `workers` workers (at most one per thread; a worker id is
// never used by two threads at once). Worker w takes blocks of kQueryBlock pairs from counter w % groups, so
// the workers of one group share out all the queries dynamically.
template <class Block>
void run_parallel(const typename Block::Args& args, int64_t total, int64_t workers, int64_t groups) {
  const BlockFn<Block> fn = select_variant<Block>();
  std::vector<std::atomic<int64_t>> next(groups);
  for (auto& counter : next) counter = 0;
  at::parallel_for(0, workers, 1, [&](int64_t w_begin, int64_t w_end) {
    for (int64_t w = w_begin; w < w_end; ++w) {
      std::atomic<int64_t>& counter = next[w % groups];
      for (int64_t b = counter.fetch_add(kQueryBlock); b < total; b = counter.fetch_add(kQueryBlock)) {
        fn(args, w, b, std::min(b + kQueryBlock, total));
      }
    }
  });
}

int64_t query_blocks(const Dims& d) { return (d.N * d.Lq + kQueryBlock - 1) / kQueryBlock; }

// Heads are split into at most one group per thread; threads beyond the number of groups add replicas.
BackwardSplit backward_split(const Dims& d, int64_t value_bytes) {
  const auto divup = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t heads = std::max<int64_t>(1, d.M);
  const int64_t heads_per_group = divup(heads, std::min(heads, threads));
  const int64_t groups = divup(heads, heads_per_group);
  const int64_t replicas = std::min({threads / groups, std::max<int64_t>(1, query_blocks(d)),
                                     1 + kReplicaBudgetBytes / std::max<int64_t>(1, value_bytes)});
  return {groups, heads_per_group, std::max<int64_t>(1, replicas)};
}

// Calls f(std::integral_constant<int, kD>) with kD = D for the common head widths, else kD = 0 (runtime D).
template <typename F>
void dispatch_channels(int64_t D, const F& f) {
  switch (D) {
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    default:
      return f(std::integral_constant<int, 0>{});
  }
}

bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// spatial_shapes and level_start_index as contiguous int64 CPU tensors, checked against S.
std::pair<at::Tensor, at::Tensor> level_tensors(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                                int64_t S) {
  TORCH_CHECK(spatial_shapes.is_cpu() && level_start_index.is_cpu(),
              "ms_deform_attn (CPU): spatial_shapes and level_start_index must be CPU tensors");
  auto shapes = spatial_shapes.to(at::kLong).contiguous();
  auto starts = level_start_index.to(at::kLong).contiguous();
  check_levels(shapes, starts, S);
  return {shapes, starts};
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Dims dims = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  if (is_reduced_float(value)) {
    return forward_cpu(value.to(at::kFloat), spatial_shapes, level_start_index, sampling_locations.to(at::kFloat),
                       attention_weights.to(at::kFloat))
        .to(value.scalar_type());
  }
  const auto [shapes, starts] = level_tensors(spatial_shapes, level_start_index, dims.S);
  const auto v = value.contiguous(), loc = sampling_locations.contiguous(), attn = attention_weights.contiguous();
  auto out = at::empty({dims.N, dims.Lq, dims.M * dims.D}, value.options());
  const Levels lv{shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>()};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), query_blocks(dims)));
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const ForwardArgs<scalar_t> args{dims, lv, v.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(),
                                     attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>()};
    dispatch_channels(dims.D, [&](auto kD) {
      run_parallel<ForwardBlock<scalar_t, decltype(kD)::value>>(args, dims.N * dims.Lq, workers, 1);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output, const at::Tensor& value,
                                                            const at::Tensor& spatial_shapes,
                                                            const at::Tensor& level_start_index,
                                                            const at::Tensor& sampling_locations,
                                                            const at::Tensor& attention_weights) {
  const Dims dims = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == dims.N && grad_output.size(1) == dims.Lq &&
                  grad_output.size(2) == dims.M * dims.D,
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D), got " +
                  shape_str(grad_output.sizes()));
  if (is_reduced_float(value)) {
    auto [gv, gl, ga] = backward_cpu(grad_output.to(at::kFloat), value.to(at::kFloat), spatial_shapes,
                                     level_start_index, sampling_locations.to(at::kFloat),
                                     attention_weights.to(at::kFloat));
    return {gv.to(value.scalar_type()), gl.to(value.scalar_type()), ga.to(value.scalar_type())};
  }
  const auto [shapes, starts] = level_tensors(spatial_shapes, level_start_index, dims.S);
  const auto g = grad_output.to(value.scalar_type()).contiguous();
  const auto v = value.contiguous(), loc = sampling_locations.contiguous(), attn = attention_weights.contiguous();
  auto grad_value = at::zeros_like(v);
  auto grad_loc = at::empty_like(loc);
  auto grad_attn = at::empty_like(attn);
  const Levels lv{shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>()};
  const BackwardSplit split = backward_split(dims, std::max<int64_t>(1, v.numel() * v.element_size()));
  auto replicas = at::zeros({split.replicas - 1, v.numel()}, v.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    std::vector<scalar_t*> grad_values{grad_value.data_ptr<scalar_t>()};
    for (int64_t r = 1; r < split.replicas; ++r) grad_values.push_back(replicas[r - 1].data_ptr<scalar_t>());
    const BackwardArgs<scalar_t> args{dims,
                                      lv,
                                      split,
                                      g.data_ptr<scalar_t>(),
                                      v.data_ptr<scalar_t>(),
                                      loc.data_ptr<scalar_t>(),
                                      attn.data_ptr<scalar_t>(),
                                      grad_values.data(),
                                      grad_loc.data_ptr<scalar_t>(),
                                      grad_attn.data_ptr<scalar_t>()};
    dispatch_channels(dims.D, [&](auto kD) {
      run_parallel<BackwardBlock<scalar_t, decltype(kD)::value>>(args, dims.N * dims.Lq, split.workers(),
                                                                 split.groups);
    });
  });
  if (split.replicas > 1) grad_value.add_(replicas.sum(0).view_as(grad_value));
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &forward_cpu);
  m.impl("ms_deform_attn_backward", &backward_cpu);
}

}  // namespace sparse_detr::msda

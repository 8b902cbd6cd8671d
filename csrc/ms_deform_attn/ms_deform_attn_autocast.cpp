// Autocast rule of multi-scale deformable attention (CPU and CUDA): the op runs in float32 (float16/bfloat16
// inputs are cast up, float64 is left alone) and returns its output in value's dtype. Casting before the op keeps
// the gradients flowing back to the low-precision inputs.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace sparse_detr::msda {
namespace {

at::Tensor call_forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sparse_detr::ms_deform_attn_forward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&)>();
  return op.call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
at::Tensor forward_autocast(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const auto to_float = [](const at::Tensor& t) { return at::autocast::cached_cast(at::kFloat, t, kDevice); };
  return call_forward(to_float(value), spatial_shapes, level_start_index, to_float(sampling_locations),
                      to_float(attention_weights))
      .to(value.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_detr, AutocastCPU, m) {
  m.impl("ms_deform_attn_forward", &forward_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(sparse_detr, AutocastCUDA, m) {
  m.impl("ms_deform_attn_forward", &forward_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

}  // namespace sparse_detr::msda

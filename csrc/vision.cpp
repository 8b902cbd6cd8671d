// Registers the sparse_detr operator library: torch.ops.sparse_detr.*
// Kernels live in csrc/<op>/; this file only defines schemas and build information.
#include <torch/extension.h>
#include <torch/library.h>
#ifdef WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#endif

namespace sparse_detr {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDA_VERSION;
#else
  return -1;
#endif
}

}  // namespace sparse_detr

TORCH_LIBRARY_FRAGMENT(sparse_detr, m) {
  m.def("has_cuda() -> bool", &sparse_detr::has_cuda);
  m.def("cuda_version() -> int", &sparse_detr::cuda_version);
  // Multi-scale deformable attention (csrc/ms_deform_attn/): kernels for CPU and CUDA, an autocast rule;
  // autograd and fake (meta) kernels are registered from Python in sparse_detr/layers/ms_deform_attn.py.
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor grad_value, Tensor grad_sampling_locations, "
      "Tensor grad_attention_weights)");
}

// A Python module object so that `import sparse_detr._C` loads the library (and its registrations).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", &sparse_detr::has_cuda);
  m.def("cuda_version", &sparse_detr::cuda_version);
}

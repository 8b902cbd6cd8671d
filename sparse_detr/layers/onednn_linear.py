"""Linear layers that run through oneDNN in CPU inference.

PyTorch computes a float32 `nn.Linear` on CPU with MKL's sgemm. On the AMD EPYC (AVX-512) machines of
this project, oneDNN (the library behind PyTorch's CPU convolutions) is about 2x faster for Sparse DETR's
shapes, 2 threads: all-token projection 20197x256 -> 256 13.5 -> 6.3 ms, FFN 2020x256 -> 1024 5.0 -> 2.4 ms,
300x256 -> 256 0.19 -> 0.11 ms (`python projects/SparseDETR/benchmark_linear.py`). PyTorch routes
only bfloat16/float16 linears to oneDNN on x86, so this module calls oneDNN's linear op itself.

`OneDNNLinear` is an `nn.Linear` (same parameters, same state dict) that takes the oneDNN path only
where it is valid: CPU float32 input and weight, autograd off (inference), no autocast (autocast already
sends linears to oneDNN), not tracing (so that fvcore and TorchScript see an ordinary `aten::linear`).
Everywhere else it is `nn.Linear`. `use_onednn_linears(model)` converts a model's linears in place.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OneDNNLinear", "onednn_linear_available", "use_onednn_linears"]


def onednn_linear_available() -> bool:
    """True where this PyTorch build has oneDNN and its (private) linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose CPU float32 inference runs through oneDNN (see the module docstring).
    Input (..., in_features) -> (..., out_features), like nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
                or torch.jit.is_tracing() or torch.jit.is_scripting()):
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none",
                                                 [None], "")
        return out.view(*x.shape[:-1], self.out_features)


def use_onednn_linears(model: nn.Module) -> int:
    """Turn every plain `nn.Linear` of `model` into a `OneDNNLinear` in place (parameters untouched).
    Returns how many were converted; 0 where oneDNN's linear is unavailable."""
    if not onednn_linear_available():
        return 0
    converted = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            # Changing the class keeps the module object, its parameters, hooks and state-dict names.
            module.__class__ = OneDNNLinear
            converted += 1
    return converted

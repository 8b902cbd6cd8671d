from .fold_batchnorm import fold_frozen_batchnorm
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from .ms_deform_attn_module import MSDeformAttn
from .onednn_linear import OneDNNLinear, onednn_linear_available, use_onednn_linears
from .onednn_stages import OneDNNConv2d, use_onednn_stages

from .ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from .ms_deform_attn_module import MSDeformAttn

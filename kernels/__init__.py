"""Triton kernels (installed as nest_ssl.kernels). Importing this package never fails when Triton is missing."""

try:  # rel_pos_attention (ATTN)
    from .rel_pos_attention import rel_pos_attention
except ImportError:  # no Triton: the encoder falls back to the torch path
    rel_pos_attention = None

try:  # conv_module (CONV)
    from .conv_module import conv_glu_dw_bn_silu
except ImportError:  # no Triton: the encoder falls back to the torch path
    conv_glu_dw_bn_silu = None

"""The macaron `ConformerLayer`: FF/2 -> self-attention -> conv module -> FF/2 -> LayerNorm."""
from __future__ import annotations

from torch import nn

from .attention import MultiHeadAttention, RelPositionMultiHeadAttention
from .conv_module import ConformerConvolution
from .feed_forward import ConformerFeedForward

__all__ = ["ConformerFeedForward", "ConformerLayer"]  # ConformerFeedForward stays importable from here


class ConformerLayer(nn.Module):
    """Constructor order is NeMo's (it fixes the init RNG order and the state_dict key order)."""

    def __init__(self, d_model: int, d_ff: int, self_attention_model: str, n_heads: int, conv_kernel_size: int,
                 conv_norm_type: str, conv_context_size, dropout: float, dropout_att: float, use_bias: bool,
                 pos_bias_u=None, pos_bias_v=None):
        super().__init__()
        self.fc_factor = 0.5
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = ConformerFeedForward(d_model, d_ff, dropout, use_bias)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConformerConvolution(d_model, conv_kernel_size, conv_norm_type, conv_context_size, use_bias)
        self.norm_self_att = nn.LayerNorm(d_model)
        if self_attention_model == "rel_pos":
            self.self_attn = RelPositionMultiHeadAttention(n_heads, d_model, dropout_att, use_bias, pos_bias_u,
                                                           pos_bias_v)
        else:
            self.self_attn = MultiHeadAttention(n_heads, d_model, dropout_att, use_bias)
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = ConformerFeedForward(d_model, d_ff, dropout, use_bias)
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, x, att_mask, pos_emb, pad_mask, lengths=None, att_context_size=(-1, -1)):
        """x (B, T, d); att_mask (B, T, T) and pad_mask (B, T) True = masked."""
        r = x + self.fc_factor * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        r = r + self.dropout(self.self_attn(self.norm_self_att(r), att_mask, pos_emb, lengths, att_context_size))
        r = r + self.dropout(self.conv(self.norm_conv(r), pad_mask))
        r = r + self.fc_factor * self.dropout(self.feed_forward2(self.norm_feed_forward2(r)))
        return self.norm_out(r)

"""Transformer-XL relative-position multi-head attention, NeMo's `RelPositionMultiHeadAttention`.

`rel_pos_attention_torch` is the readable reference (and the CPU path) that the Triton kernel is tested against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_select import KernelCall, import_kernel

INF_VAL = 10000.0  # NeMo replaces masked scores by -INF_VAL (not -inf)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T-1) -> same shape with out[i, j] = x[i, (T-1) - i + j] for j < T (NeMo's pad-and-view trick)."""
    b, h, t, n = x.shape
    return F.pad(x, (1, 0)).view(b, h, -1, t)[:, :, 1:].view(b, h, t, n)


def rel_pos_attention_torch(q, k, v, p, pos_bias_u, pos_bias_v, att_mask, dropout_p=0.0, training=False,
                            dropout_mask=None):
    """q, k, v (B, H, T, d_k) (q without biases); p (1|B, H, 2T-1, d_k); pos_bias_u/v (H, d_k);
    att_mask (B, T, T) bool, True = masked. `dropout_mask` (B, H, T, T) of {0, 1/(1-p)} replaces nn.Dropout.
    -> context (B, H, T, d_k)."""
    q_u = q + pos_bias_u[None, :, None, :]
    q_v = q + pos_bias_v[None, :, None, :]
    matrix_ac = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, T, T)
    matrix_bd = rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))[..., : matrix_ac.size(-1)]  # (B, H, T, T)
    scores = (matrix_ac + matrix_bd) / math.sqrt(q.size(-1))
    mask = att_mask.unsqueeze(1)  # (B, 1, T, T)
    attn = torch.softmax(scores.masked_fill(mask, -INF_VAL), dim=-1).masked_fill(mask, 0.0)
    if dropout_mask is not None:
        attn = attn * dropout_mask
    elif dropout_p > 0.0 and training:
        attn = F.dropout(attn, dropout_p, training=True)
    return torch.matmul(attn, v)


class RelPositionMultiHeadAttention(nn.Module):
    """Registration order = NeMo's key order: pos_bias_u/v (own params) before the linears."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, use_bias: bool = True,
                 pos_bias_u: nn.Parameter | None = None, pos_bias_v: nn.Parameter | None = None,
                 attention_impl: str = "torch"):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        if pos_bias_u is None:  # untie_biases: one zero-initialised pair per layer
            self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
            self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))
        else:
            self.pos_bias_u, self.pos_bias_v = pos_bias_u, pos_bias_v
        self.linear_q = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_v = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_out = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.dropout = nn.Dropout(dropout_rate)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.attention_impl = attention_impl  # "torch" | "triton" ("auto" is resolved by the encoder)

    @property
    def attention_impl(self) -> str:
        return self._impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        # Set at construction or by the encoder when its device is known, never in forward (torch.compile would
        # trace it). "triton" raises ImportError with the cause when the kernel does not import.
        if value not in ("torch", "triton"):
            raise ValueError(f"attention_impl={value!r}; allowed: 'torch', 'triton'")
        self._impl = value
        self._kernel = KernelCall("attention", import_kernel("attention")) if value == "triton" else None

    def forward(self, x, att_mask, pos_emb, lengths=None, att_context_size=(-1, -1)):
        """x (B, T, d), att_mask (B, T, T) bool, pos_emb (1, 2T-1, d) -> (B, T, d)."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k).transpose(1, 2)  # (B, H, T, d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)  # (1, H, 2T-1, d_k)
        if self._kernel is not None:
            if lengths is None:  # the kernel builds its mask from lengths; att_mask alone cannot be honoured
                raise ValueError("attention_impl='triton' needs `lengths` (the encoder passes them)")
            ctx = self._kernel(q, k, v, p, self.pos_bias_u, self.pos_bias_v, lengths, tuple(att_context_size),
                         dropout_p=self.dropout.p, training=self.training)
        else:
            ctx = rel_pos_attention_torch(q, k, v, p, self.pos_bias_u, self.pos_bias_v, att_mask, self.dropout.p,
                                          self.training)
        return self.linear_out(ctx.transpose(1, 2).reshape(b, t, -1))  # (B, T, d)


class MultiHeadAttention(nn.Module):
    """Plain scaled dot-product attention with NeMo's masking (abs_pos encoders)."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, use_bias: bool = True):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_v = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_out = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x, att_mask, pos_emb=None, lengths=None, att_context_size=(-1, -1)):
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, self.h, self.d_k).transpose(1, 2)
                   for lin in (self.linear_q, self.linear_k, self.linear_v))  # (B, H, T, d_k)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k)
        mask = att_mask.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(mask, -INF_VAL), dim=-1).masked_fill(mask, 0.0)
        ctx = torch.matmul(self.dropout(attn), v)
        return self.linear_out(ctx.transpose(1, 2).reshape(b, t, -1))

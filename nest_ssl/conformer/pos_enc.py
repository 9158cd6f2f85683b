"""Positional encodings: relative (Transformer-XL, for rel_pos) and absolute (for abs_pos)."""
from __future__ import annotations

import math

import torch
from torch import nn


def _sinusoids(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(positions.size(0), d_model)
    pe[:, 0::2] = torch.sin(positions[:, None] * div)
    pe[:, 1::2] = torch.cos(positions[:, None] * div)
    return pe.unsqueeze(0)  # (1, N, d)


class RelPositionalEncoding(nn.Module):
    """x -> (dropout(x * xscale), pos_emb (1, 2T-1, d)) for positions T-1 ... -(T-1). `pe` is not persistent."""

    def __init__(self, d_model: int, dropout_rate: float, max_len: int, xscale: float | None, dropout_rate_emb: float):
        super().__init__()
        self.d_model, self.xscale, self.max_len = d_model, xscale, max_len
        self.dropout = nn.Dropout(dropout_rate)
        self.dropout_emb = nn.Dropout(dropout_rate_emb) if dropout_rate_emb > 0 else None
        self.register_buffer("pe", torch.zeros(1, 0, d_model), persistent=False)
        self.extend_pe(max_len)

    def extend_pe(self, length: int) -> None:
        if self.pe.size(1) >= 2 * length - 1:
            return
        positions = torch.arange(length - 1, -length, -1, dtype=torch.float32)  # descending, as NeMo
        self.pe = _sinusoids(positions, self.d_model).to(self.pe.device)

    def forward(self, x: torch.Tensor):
        if self.xscale:
            x = x * self.xscale
        t, center = x.size(1), self.pe.size(1) // 2 + 1
        pos_emb = self.pe[:, center - t: center + t - 1].to(x.dtype)  # (1, 2T-1, d)
        if self.dropout_emb is not None:
            pos_emb = self.dropout_emb(pos_emb)
        return self.dropout(x), pos_emb


class PositionalEncoding(RelPositionalEncoding):
    """Absolute sinusoids added to x (abs_pos)."""

    def extend_pe(self, length: int) -> None:
        if self.pe.size(1) >= length:
            return
        self.pe = _sinusoids(torch.arange(length, dtype=torch.float32), self.d_model).to(self.pe.device)

    def forward(self, x: torch.Tensor):
        if self.xscale:
            x = x * self.xscale
        pos_emb = self.pe[:, : x.size(1)].to(x.dtype)
        if self.dropout_emb is not None:
            pos_emb = self.dropout_emb(pos_emb)
        return self.dropout(x + pos_emb), pos_emb

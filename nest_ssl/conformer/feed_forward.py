"""NeMo's `ConformerFeedForward`: linear1 -> SiLU -> dropout -> linear2, used twice per layer (macaron)."""
from __future__ import annotations

import torch
from torch import nn


class ConformerFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, use_bias: bool = True):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model)."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

"""`GumbelVectorQuantizer` as NeMo's ContrastiveLoss builds it.

One codebook `vars` (1, V, vq_dim/G) shared by all G groups (combine_groups). Train mode picks each group's code with
a straight-through hard Gumbel-softmax; eval mode takes the argmax. `target_ids` always come from the noise-free
argmax, even in training (NeMo's behaviour, kept for parity).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GumbelVectorQuantizer(nn.Module):
    def __init__(self, dim: int, num_vars: int, temp: tuple[float, float, float], groups: int, vq_dim: int):
        super().__init__()
        if vq_dim % groups:
            raise ValueError(f"vq_dim={vq_dim} must be divisible by groups={groups}")
        self.groups, self.num_vars = groups, num_vars
        self.vars = nn.Parameter(torch.empty(1, num_vars, vq_dim // groups))  # combine_groups: one shared codebook
        self.weight_proj = nn.Linear(dim, groups * num_vars)
        # Init order and distributions as NeMo (so a seeded init matches it): vars U[0,1), weight_proj N(0,1), bias 0.
        nn.init.uniform_(self.vars)
        nn.init.normal_(self.weight_proj.weight, mean=0, std=1)
        nn.init.zeros_(self.weight_proj.bias)
        self.max_temp, self.min_temp, self.temp_decay = temp
        self.curr_temp = self.max_temp

    def set_num_updates(self, num_updates: int) -> None:
        self.curr_temp = max(self.max_temp * self.temp_decay**num_updates, self.min_temp)

    def forward(self, x: torch.Tensor, gumbel_noise: torch.Tensor | None = None):
        """x (B, T', dim) -> (quantized (B, T', vq_dim), prob_ppl, target_ids (B, T') int64).

        `gumbel_noise` (B*T'*G, V) replaces the train-mode draw (parity tests inject NeMo's noise).
        """
        B, T, _ = x.shape
        G, V = self.groups, self.num_vars
        logits = self.weight_proj(x.reshape(B * T, -1)).view(B * T * G, V)  # row n*G + g = group g of step n
        idx = logits.argmax(dim=-1)
        avg_probs = torch.softmax(logits.view(B * T, G, V).float(), dim=-1).mean(dim=0)  # (G, V) over ALL steps
        perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-7), dim=-1)).sum()
        prob_ppl = (G * V - perplexity) / (G * V)
        if self.training:
            y = self._gumbel_hard(logits.float(), gumbel_noise).type_as(logits)
        else:
            y = F.one_hot(idx, V).to(logits.dtype)
        q = (y.view(B * T, G, V, 1) * self.vars.unsqueeze(1)).sum(dim=2)  # (B*T', G, vq_dim/G): shared codebook
        q = q.view(B, T, -1)
        ids = idx.view(B * T, G)
        powers = V ** torch.arange(G - 1, -1, -1, device=x.device)
        target_ids = (ids * powers).sum(dim=-1).view(B, T)
        return q, prob_ppl, target_ids

    def _gumbel_hard(self, logits: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is None:  # the same draw as F.gumbel_softmax: -log(Exp(1))
            noise = -torch.empty_like(logits).exponential_().log()
        y_soft = torch.softmax((logits + noise) / self.curr_temp, dim=-1)
        y_hard = F.one_hot(y_soft.argmax(dim=-1), logits.shape[-1]).to(y_soft.dtype)
        return y_hard - y_soft.detach() + y_soft  # straight-through: value is exactly one-hot

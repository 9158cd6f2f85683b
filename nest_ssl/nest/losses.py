"""Masked-token-prediction losses `MLMLoss` / `MultiMLMLoss`.

A token is a target when the mean of its `combine_time_steps` mask frames is > mask_threshold (7/8 counts at 0.8,
6/8 does not). The NLL is averaged over all selected tokens of the batch, then over codebooks. NeMo returns NaN when
no token is selected; we return 0 (finite, back-propagates zeros). `last_num_selected` (a 0-dim tensor on the
outputs' device: no host sync in the step) holds the count so training can report it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MLMLossConfig:
    combine_time_steps: int = 1
    mask_threshold: float = 0.8


@dataclass
class MultiMLMLossConfig:
    combine_time_steps: int = 1
    mask_threshold: float = 0.8
    num_decoders: int = 1
    squeeze_single: bool = False


def frame_stats(log_probs: torch.Tensor, tokens: torch.Tensor) -> dict:
    """log_probs (B, T, C, H), tokens (B, T, H) -> per-frame (B, T, H), no graph: argmax prediction, entropy of the
    predicted distribution, NLL of the target. What MultiMLMLoss.observers receive (the health metrics)."""
    with torch.no_grad():
        lp = log_probs.detach().float()
        return {"pred": lp.argmax(dim=2), "pred_entropy": -(lp.exp() * lp).sum(2),
                "nll": -lp.gather(2, tokens.long().unsqueeze(2)).squeeze(2)}


def token_mask(masks: torch.Tensor, combine_time_steps: int, mask_threshold: float) -> torch.Tensor:
    """(B, F, T) frame masks -> (B, T // combine) bool: tokens whose mean mask is > mask_threshold."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, F, T); got shape {tuple(masks.shape)}")
    B, Fd, T = masks.shape
    c = combine_time_steps
    if T % c != 0:
        raise ValueError(f"mask frames T={T} not divisible by combine_time_steps={c}")
    m = masks.transpose(1, 2).reshape(B, T // c, c * Fd)  # (B, T', c*F), time-major as NeMo
    return m.mean(-1) > mask_threshold


class MLMLoss(nn.Module):
    config_class = MLMLossConfig

    def __init__(self, cfg: MLMLossConfig):
        super().__init__()
        self.cfg = cfg
        self.last_num_selected = 0

    def forward(self, masks, decoder_outputs, targets, decoder_lengths=None) -> torch.Tensor:
        """masks (B, F, T); decoder_outputs (B, T', C) log-probs; targets (B, T'') int; decoder_lengths unused."""
        sel = token_mask(masks, self.cfg.combine_time_steps, self.cfg.mask_threshold)  # (B, T')
        if decoder_outputs.dim() != 3 or decoder_outputs.shape[:2] != sel.shape:
            raise ValueError(f"decoder_outputs shape {tuple(decoder_outputs.shape)} does not match the token mask "
                             f"{tuple(sel.shape)} from masks {tuple(masks.shape)} / combine_time_steps="
                             f"{self.cfg.combine_time_steps}")
        if targets.shape[0] != sel.shape[0] or targets.shape[1] > sel.shape[1]:
            raise ValueError(f"targets shape {tuple(targets.shape)} does not fit the token mask {tuple(sel.shape)}")
        if targets.shape[1] < sel.shape[1]:  # NeMo right-pads targets with 0 to the mask length
            targets = F.pad(targets, (0, sel.shape[1] - targets.shape[1]))
        # F.nll_loss(outputs[sel], targets[sel]) with the mean taken by hand: boolean indexing and a count check
        # would each wait for the GPU. With no selected token this is 0 (gradient 0), where NeMo gives NaN.
        n = sel.sum()
        self.last_num_selected = n  # 0-dim device tensor; the trainer reads it once per optimizer step
        nll = -decoder_outputs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (B, T')
        return torch.where(sel, nll, 0.0).sum() / n.clamp_min(1)


class MultiMLMLoss(nn.Module):
    """Mean over the H codebooks of MLMLoss(masks, log_probs[..., h], targets[..., h])."""

    config_class = MultiMLMLossConfig

    def __init__(self, cfg: MultiMLMLossConfig):
        super().__init__()
        self.cfg = cfg
        self.mlm_loss = MLMLoss(MLMLossConfig(cfg.combine_time_steps, cfg.mask_threshold))
        self.last_num_selected = 0
        # callables(loss, masks, frames, tokens, lengths) given frame_stats of every forward, from the full
        # log-probs here or chunk by chunk in masked_logits.py (trainer.health): unlike a hook on this module,
        # they leave the model free to take the chunked head
        self.observers: list = []

    def forward(self, masks, decoder_outputs, targets, decoder_lengths=None) -> torch.Tensor:
        H = self.cfg.num_decoders
        if H == 1 and self.cfg.squeeze_single:
            decoder_outputs, targets = decoder_outputs.unsqueeze(-1), targets.unsqueeze(-1)
        if decoder_outputs.dim() != 4 or decoder_outputs.shape[-1] != H:
            raise ValueError(f"decoder_outputs shape {tuple(decoder_outputs.shape)}: expected (B, T', C, H={H}) "
                             f"(num_decoders={H}, squeeze_single={self.cfg.squeeze_single})")
        if targets.dim() != 3 or targets.shape[-1] != H:
            raise ValueError(f"targets shape {tuple(targets.shape)}: expected (B, T', H={H}); num_books of the "
                             f"quantizer must equal num_decoders={H}")
        loss = sum(self.mlm_loss(masks, decoder_outputs[..., h], targets[..., h]) for h in range(H)) / H
        self.last_num_selected = self.mlm_loss.last_num_selected
        for observe in self.observers:
            observe(self, masks, frame_stats(decoder_outputs[:, :targets.shape[1]], targets), targets, decoder_lengths)
        return loss

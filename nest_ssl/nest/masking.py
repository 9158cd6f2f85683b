"""`RandomBlockMasking`: replace random time blocks of (B, F, T) features by a fixed embedding.

Same distribution as NeMo 2.6.2, vectorised over the batch with no host syncs, drawn from a `torch.Generator`
(NeMo's RNG stream is not reproduced: parity tests inject masks through `apply_masks`).

* allow_overlap=True (NEST): NeMo draws n ~ Binomial(l - block, p) and n distinct starts uniformly from
  [0, l - block). That is exactly i.i.d. Bernoulli(p) per start position, which is what we draw; each start s
  masks [s, s + block) (< l by construction).
* allow_overlap=False: n = ceil(l * p / block) blocks of size bs = block (or l // (n + 1) if they do not fit), one
  offset o ~ U[0, block), n distinct slots k from [0, l // bs - 1), masking [k * bs + o, k * bs + o + bs), clipped
  to l (NeMo can write past l into padding; we never mask padding).
* Short utterances (block >= max_mask_ratio * l): mask [0, min(8, l)), no draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SHORT_BLOCK = 8  # NeMo's fixed block at the start of short utterances


@dataclass
class RandomBlockMaskingConfig:
    feat_in: int = 80
    mask_prob: float = 0.5
    block_size: int = 48
    mask_value: float | None = None
    freeze: bool = True
    allow_overlap: bool = False
    max_mask_ratio: float = 0.8


def _rand(shape, generator, device):
    dev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=dev).to(device)


def _dilate(starts: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """(B, T) bool start indicators -> (B, T) bool: t is covered by a start in (t - width_b, t]."""
    B, T = starts.shape
    c = torch.nn.functional.pad(starts.long().cumsum(1), (1, 0))  # (B, T+1), c[:, t] = #starts before t
    t = torch.arange(T, device=starts.device).expand(B, T)
    lo = (t + 1 - width.view(B, 1)).clamp_min(0)
    return (c[:, 1:] - c.gather(1, lo)) > 0


class RandomBlockMasking(nn.Module):
    config_class = RandomBlockMaskingConfig

    def __init__(self, cfg: RandomBlockMaskingConfig):
        super().__init__()
        if not 0.0 <= cfg.mask_prob <= 1.0:
            raise ValueError(f"mask_prob={cfg.mask_prob}; must be in [0, 1]")
        if cfg.block_size < 1:
            raise ValueError(f"block_size={cfg.block_size}; must be >= 1")
        self.cfg = cfg
        if cfg.mask_value is None:
            self.mask_embedding = nn.Parameter(torch.empty(cfg.feat_in))
            nn.init.normal_(self.mask_embedding, mean=0.0, std=0.1)  # a random but fixed vector when frozen
        else:
            self.mask_embedding = nn.Parameter(torch.full((cfg.feat_in,), float(cfg.mask_value)), requires_grad=False)
        if cfg.freeze:
            self.mask_embedding.requires_grad_(False)

    def sample_masks(self, lengths: torch.Tensor, T: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) valid lengths -> (B, T) bool time mask (True = masked); never True at t >= length."""
        cfg, dev = self.cfg, lengths.device
        B = lengths.shape[0]
        lengths = lengths.long()
        t = torch.arange(T, device=dev).expand(B, T)
        short = cfg.block_size >= lengths * cfg.max_mask_ratio  # (B,)
        if cfg.allow_overlap:
            count = (lengths - cfg.block_size).clamp_min(0)
            starts = (_rand((B, T), generator, dev) < cfg.mask_prob) & (t < count[:, None])
            width = torch.full((B,), cfg.block_size, device=dev)
        else:
            starts, width = self._disjoint_starts(lengths, T, generator)
        masks = _dilate(starts, width)
        masks = torch.where(short[:, None], t < SHORT_BLOCK, masks)
        return masks & (t < lengths[:, None])

    def _disjoint_starts(self, lengths, T, generator):
        cfg, dev, B = self.cfg, lengths.device, lengths.shape[0]
        num = torch.ceil(lengths.double() * cfg.mask_prob / cfg.block_size).long()  # (B,)
        offset = (_rand((B,), generator, dev) * cfg.block_size).long().clamp_max(cfg.block_size - 1)
        fits = (num + 1) * cfg.block_size <= lengths
        bs = torch.where(fits, torch.full_like(lengths, cfg.block_size), lengths // (num + 1)).clamp_min(1)
        slots = (lengths // bs - 1).clamp_min(0)  # NeMo: randperm(l // bs - 1)[:num]
        # num distinct slots uniformly from [0, slots): the num smallest of i.i.d. uniform keys
        keys = _rand((B, T), generator, dev)
        k = torch.arange(T, device=dev).expand(B, T)
        keys = keys.masked_fill(k >= slots[:, None], 2.0)
        rank = keys.argsort(dim=1).argsort(dim=1)
        chosen = (rank < num[:, None]) & (k < slots[:, None])  # (B, T) over slot index k
        pos = (k * bs[:, None] + offset[:, None]).clamp_max(T)  # start frame of slot k
        starts = torch.zeros(B, T + 1, dtype=torch.bool, device=dev)
        starts.scatter_(1, torch.where(chosen, pos, torch.full_like(pos, T)), chosen)
        return starts[:, :T], bs

    def apply_masks(self, input_feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Masked frames (masks == 1) take exactly mask_embedding; masks is (B, F, T) or (B, T)."""
        if masks.dim() == 3:
            if masks.shape != input_feats.shape:
                raise ValueError(f"masks shape {tuple(masks.shape)} != input_feats shape {tuple(input_feats.shape)}")
            sel = masks[:, :1, :] > 0.5  # (B, 1, T): the mask is constant along F
        elif masks.dim() == 2 and masks.shape == (input_feats.shape[0], input_feats.shape[2]):
            sel = masks[:, None, :].bool()
        else:
            raise ValueError(f"masks shape {tuple(masks.shape)}; expected {tuple(input_feats.shape)} or "
                             f"{(input_feats.shape[0], input_feats.shape[2])}")
        emb = self.mask_embedding.to(input_feats.dtype).view(1, -1, 1)  # (1, F, 1)
        return torch.where(sel, emb, input_feats)

    def forward(self, input_feats: torch.Tensor, input_lengths: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if input_feats.dim() != 3 or input_lengths.shape != (input_feats.shape[0],):
            raise ValueError(f"input_feats {tuple(input_feats.shape)} must be (B, F, T) with input_lengths (B,); "
                             f"got input_lengths {tuple(input_lengths.shape)}")
        time_mask = self.sample_masks(input_lengths.to(input_feats.device), input_feats.shape[2], generator)
        masks = time_mask[:, None, :].expand_as(input_feats).to(input_feats.dtype)  # (B, F, T)
        return self.apply_masks(input_feats, masks), masks.contiguous()

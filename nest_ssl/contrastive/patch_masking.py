"""`MaskedPatchAugmentation`: zero whole time patches plus frequency bands.

M patches of `patch_size` frames per utterance (the same M for every utterance, which the contrastive loss's
per-utterance reshape needs), chosen with Python's `random.sample` among the whole patches inside each valid length;
then `freq_masks` mel bands of width < `freq_width` over all frames (SpecAugment's vectorised draw, torch RNG).
Masked values are 0.0, the per-feature mean after normalisation. Unlike NeMo this never writes into its input.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class MaskedPatchAugmentationConfig:
    patch_size: int = 48
    mask_patches: float = 10.0
    freq_masks: int = 0
    freq_width: int = 0


class MaskedPatchAugmentation(nn.Module):
    config_class = MaskedPatchAugmentationConfig

    def __init__(self, cfg: MaskedPatchAugmentationConfig):
        super().__init__()
        if cfg.mask_patches < 0:
            raise ValueError(f"mask_patches={cfg.mask_patches} must be >= 0 (a count >= 1 or a fraction < 1)")
        if cfg.patch_size < 1:
            raise ValueError(f"patch_size={cfg.patch_size} must be >= 1")
        self.cfg = cfg

    def num_patches(self, min_len: int) -> int:
        P, mp = self.cfg.patch_size, self.cfg.mask_patches
        if mp >= 1:
            m = int(mp)
        else:
            f = int(np.float32(min_len) * np.float32(mp))  # NeMo's float32 product, truncated
            m = math.ceil(f / P)
        return min_len // P if min_len < P * m else m

    def draw(self, length: torch.Tensor, n_mels: int, rng: random.Random | None = None,
             generator: torch.Generator | None = None):
        """-> (patch_indices list per utterance, freq_width (B, F), freq_start (B, F)); NeMo's RNG order."""
        rng = rng or random
        lens = [int(x) for x in length.tolist()]
        m = self.num_patches(min(lens))
        patches = [rng.sample(range(n // self.cfg.patch_size), m) for n in lens]
        B, F = len(lens), self.cfg.freq_masks
        device = generator.device if generator is not None else None  # draw where the generator lives
        width = (torch.rand(B, F, generator=generator, device=device) * self.cfg.freq_width).long()
        start = (torch.rand(B, F, generator=generator, device=device) * (n_mels - width)).long()
        return patches, width.cpu(), start.cpu()

    def masks(self, shape, patches, width, start, device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> time_mask (B, T) bool, freq_mask (B, F) bool."""
        B, D, T = shape
        P = self.cfg.patch_size
        time_mask = torch.zeros(B, T, dtype=torch.bool)
        for b, idx in enumerate(patches):
            for j in idx:
                time_mask[b, j * P:(j + 1) * P] = True
        d = torch.arange(D)
        freq_mask = ((d >= start[..., None]) & (d < (start + width)[..., None])).any(dim=1)  # (B, D)
        return time_mask.to(device), freq_mask.to(device)

    def forward(self, input_spec: torch.Tensor, length: torch.Tensor, rng: random.Random | None = None,
                generator: torch.Generator | None = None, time_mask=None, freq_mask=None) -> torch.Tensor:
        """input_spec (B, D, T) -> masked copy. `time_mask` / `freq_mask` inject NeMo's masks instead of drawing."""
        if time_mask is None:
            patches, width, start = self.draw(length, input_spec.shape[1], rng, generator)
            time_mask, freq_mask = self.masks(input_spec.shape, patches, width, start, input_spec.device)
        zero = time_mask[:, None, :] | freq_mask[:, :, None]  # (B, D, T)
        return input_spec.masked_fill(zero, 0.0)

"""`SpectrogramAugmentation` (NeMo 2.6.2 semantics): SpecCutout rectangles, then SpecAugment time and freq masks.

Vectorised SpecAugment (NeMo's default, `use_vectorized_spec_augment: true`), per utterance b and mask m, drawn with
`torch.rand` (optionally from a `torch.Generator` on the input's device), time masks first, then frequency masks:
  width = floor(U * W)                          W = time_width (int frames), or min(time_width * len_b, T) (float)
  start = floor(U * (len_b - width))            time axis; for frequency: floor(U * (F - width)), W = freq_width
Masked cells take `mask_value`. The legacy loop (`use_vectorized_spec_augment: false`) draws inclusive
`randint`s from Python's `random` instead, as does SpecCutout (`rect_masks` rectangles over the whole padded T).
With no masks configured the module is the identity and has no parameters (NEST builds it "to avoid init error").
Unlike NeMo's SpecCutout this never writes into its input.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SpectrogramAugmentationConfig:
    """NeMo's constructor keys and defaults."""
    freq_masks: int = 0
    time_masks: int = 0
    freq_width: int = 10
    time_width: int | float = 10  # int: max frames; float in [0, 1]: max fraction of each utterance's length
    rect_masks: int = 0
    rect_time: int = 5
    rect_freq: int = 20
    rng: random.Random | None = None  # Python RNG of SpecCutout and the legacy path (not settable from YAML)
    mask_value: float = 0.0
    use_vectorized_spec_augment: bool = True
    use_numba_spec_augment: bool = False  # NeMo's CUDA numba kernel; ignored (run_config.IGNORED_KEYS)


def _range_mask(start: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """(B, M) starts and widths -> (B, size) bool, True inside any [start, start + width)."""
    idx = torch.arange(size, device=start.device)
    return ((idx >= start[..., None]) & (idx < (start + width)[..., None])).any(dim=1)  # (B, M, size) -> (B, size)


class SpectrogramAugmentation(nn.Module):
    config_class = SpectrogramAugmentationConfig

    def __init__(self, cfg: SpectrogramAugmentationConfig):
        super().__init__()
        for name in ("freq_masks", "time_masks", "freq_width", "rect_masks", "rect_time", "rect_freq"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"spec_augment.{name}={v!r} must be an int >= 0")
        tw = cfg.time_width
        if isinstance(tw, bool) or not isinstance(tw, (int, float)) or tw < 0 or (isinstance(tw, float) and tw > 1):
            raise ValueError(f"spec_augment.time_width={tw!r} must be an int >= 0 (frames) or a float in [0, 1] "
                             "(fraction of each utterance's length)")
        if isinstance(cfg.mask_value, str) or isinstance(cfg.mask_value, bool):
            raise ValueError(f"spec_augment.mask_value={cfg.mask_value!r} must be a number")
        self.cfg = cfg
        self.adaptive_time_width = isinstance(tw, float)
        self._rng = cfg.rng if cfg.rng is not None else random.Random()

    @torch.no_grad()
    def forward(self, input_spec: torch.Tensor, length: torch.Tensor, generator: torch.Generator | None = None,
                rng: random.Random | None = None) -> torch.Tensor:
        """input_spec (B, F, T), length (B,) valid frames -> augmented copy (B, F, T); the input is left untouched.

        `generator` feeds the vectorised masks (torch RNG), `rng` the cutout and legacy masks (else the config's).
        """
        cfg = self.cfg
        if cfg.freq_masks + cfg.time_masks + cfg.rect_masks == 0:
            return input_spec
        if input_spec.dim() != 3 or tuple(length.shape) != (input_spec.shape[0],):
            raise ValueError(f"input_spec must be (B, F, T) with length (B,), got {tuple(input_spec.shape)} and "
                             f"{tuple(length.shape)}")
        if cfg.freq_width > input_spec.shape[1] and cfg.freq_masks > 0:
            raise ValueError(f"spec_augment.freq_width={cfg.freq_width} exceeds the {input_spec.shape[1]} features")
        rng = rng if rng is not None else self._rng
        x = self._cutout(input_spec, rng) if cfg.rect_masks > 0 else input_spec
        if cfg.use_vectorized_spec_augment:
            return self._vectorized(x, length, generator)
        return self._legacy(x, length, rng)

    def _cutout(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        cfg, (B, F, T) = self.cfg, x.shape
        mask = torch.zeros(B, F, T, dtype=torch.bool)
        for b in range(B):  # Python RNG, NeMo's draw order: freq start, time start, freq width, time width
            for _ in range(cfg.rect_masks):
                f0, t0 = rng.randint(0, F - cfg.rect_freq), rng.randint(0, T - cfg.rect_time)
                mask[b, f0:f0 + rng.randint(0, cfg.rect_freq), t0:t0 + rng.randint(0, cfg.rect_time)] = True
        return x.masked_fill(mask.to(x.device), 0.0)

    def _vectorized(self, x: torch.Tensor, length: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        cfg, (B, F, T) = self.cfg, x.shape

        def draw(n):
            return torch.rand((B, n), generator=generator, device=x.device, dtype=torch.float32)

        if cfg.time_masks > 0:
            width = cfg.time_width
            if self.adaptive_time_width:
                width = torch.clamp(width * length.to(x.device), max=T).unsqueeze(1)  # (B, 1) float
            w = (draw(cfg.time_masks) * width).long()
            start = (draw(cfg.time_masks) * (length.to(x.device)[:, None] - w)).long()
            x = x.masked_fill(_range_mask(start, w, T)[:, None, :], cfg.mask_value)
        if cfg.freq_masks > 0:
            w = (draw(cfg.freq_masks) * cfg.freq_width).long()
            start = (draw(cfg.freq_masks) * (F - w)).long()
            x = x.masked_fill(_range_mask(start, w, F)[:, :, None], cfg.mask_value)
        return x

    def _legacy(self, x: torch.Tensor, length: torch.Tensor, rng: random.Random) -> torch.Tensor:
        cfg, (B, F, T) = self.cfg, x.shape
        mask = torch.zeros(B, F, T, dtype=torch.bool)
        for b, n in enumerate(length.tolist()):  # NeMo's order: all freq masks, then all time masks, per utterance
            for _ in range(cfg.freq_masks):
                f0 = rng.randint(0, F - cfg.freq_width)
                mask[b, f0:f0 + rng.randint(0, cfg.freq_width), :] = True
            tw = max(1, int(n * cfg.time_width)) if self.adaptive_time_width else cfg.time_width
            for _ in range(cfg.time_masks):
                t0 = rng.randint(0, max(1, n - tw))
                mask[b, :, t0:t0 + rng.randint(0, tw)] = True
        return x.masked_fill(mask.to(x.device), cfg.mask_value)

"""`AudioNoiseItem` / `AudioNoiseBatch`: one sample and one padded batch of clean audio + noise.

Same field names and defaults (all None) as NeMo's `ssl_dataset.py`, so the augmentor and model step read them
the same way. Signals are float32 (B, Lmax) zero-padded; lengths are int64 (B,).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AudioNoiseItem:
    sample_id: str | None = None
    audio: torch.Tensor | None = None  # (L,) float32
    audio_len: torch.Tensor | int | None = None
    noise: torch.Tensor | None = None  # (Ln,) float32
    noise_len: torch.Tensor | int | None = None
    noisy_audio: torch.Tensor | None = None
    noisy_audio_len: torch.Tensor | int | None = None


@dataclass
class AudioNoiseBatch:
    sample_id: list[Any] | None = None
    audio: torch.Tensor | None = None  # (B, Lmax) float32
    audio_len: torch.Tensor | None = None  # (B,) int64
    noise: torch.Tensor | None = None  # (B, Lmax) float32
    noise_len: torch.Tensor | None = None  # (B,) int64
    noisy_audio: torch.Tensor | None = None  # (B, Lmax) float32
    noisy_audio_len: torch.Tensor | None = None  # (B,) int64

    def _map(self, fn) -> AudioNoiseBatch:
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> AudioNoiseBatch:
        """A new batch with every tensor moved to `device` (sample_id is kept as is)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> AudioNoiseBatch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return 0 if self.audio is None else int(self.audio.shape[0])


def synthetic_batch(batch: int, seconds: float, device, seed: int = 0, sample_rate: int = 16000) -> AudioNoiseBatch:
    """Noise-like audio and noise of one length, the mixing pre-applied as the collate does (benchmarks, fit_scan)."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sample_rate)
    audio = 0.1 * torch.randn(batch, n, generator=g)
    noise = 0.05 * torch.randn(batch, n, generator=g)
    lengths = torch.full((batch,), n, dtype=torch.long)
    return AudioNoiseBatch(audio=audio, audio_len=lengths, noise=noise, noise_len=lengths.clone(),
                           noisy_audio=audio + noise, noisy_audio_len=lengths.clone()).to(device)

"""`AudioNoiseDataset` (map-style) and the AudioNoise collate function.

Items are decoded lazily; a bad item (missing/corrupt/empty/NaN file) comes back as a `BadItem` instead of
raising, so one file cannot kill a DataLoader worker; the collate drops it and reports it to the loader, which
counts and limits them. With `skip_bad=False` the error is raised at once (DataLoader re-raises it in the main
process; no hang).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from nest_ssl.data.audio import AudioLoader, BadSample, pad_to_min_len, sample_noise
from nest_ssl.data.batch import AudioNoiseBatch, AudioNoiseItem
from nest_ssl.data.manifest import ManifestEntry


@dataclass
class BadItem:
    path: str
    reason: str


class AudioNoiseDataset(torch.utils.data.Dataset):
    def __init__(self, entries: list[ManifestEntry], noise_entries: list[ManifestEntry], sample_rate: int,
                 min_audio_len_secs: float = 1.0, pad_audio_mode: str = "repeat", channel_selector=None,
                 seed: int = 0, skip_bad: bool = True, duration_tolerance: float | None = None):
        self.entries, self.noise_entries = entries, noise_entries
        self.loader = AudioLoader(sample_rate, channel_selector, duration_tolerance)
        self.min_len = int(min_audio_len_secs * sample_rate)
        self.pad_audio_mode, self.seed, self.skip_bad, self.epoch = pad_audio_mode, seed, skip_bad, 0

    def __len__(self) -> int:
        return len(self.entries)

    def durations(self) -> list[float | None]:
        return [e.duration for e in self.entries]

    def noise_rng(self, index: int) -> np.random.Generator:
        # Seeded per (seed, epoch, item): the noise is the same whatever the worker count or order.
        return np.random.default_rng([self.seed, self.epoch, index])

    def make_item(self, index: int, audio: torch.Tensor) -> AudioNoiseItem:
        audio = pad_to_min_len(audio, self.min_len, self.pad_audio_mode)
        noise, noise_len = sample_noise(self.noise_entries, self.loader, audio.shape[0], self.noise_rng(index))
        return AudioNoiseItem(sample_id=str(index), audio=audio, audio_len=audio.shape[0], noise=noise,
                              noise_len=noise_len)

    def __getitem__(self, index: int):
        e = self.entries[index]
        try:
            audio = self.loader.load(e.audio_filepath, e.offset, e.duration, whole_file=not e.offset_given)
            return self.make_item(index, audio)
        except BadSample as err:
            if not self.skip_bad:
                raise ValueError(f"bad sample {err.path}: {err.reason} (skip_bad_samples=false)") from None
            return BadItem(err.path, err.reason)


class AudioNoiseCollate:
    """list of items -> (AudioNoiseBatch | None, [BadItem]). Zero-pads to the longest audio; noise is padded or
    cut to that length. The batch augmentor runs here (CPU, NeMo's place) with a random.Random seeded from
    (seed, epoch, first sample id), unless `augment_on_device`, which leaves noisy_audio to the model step."""

    def __init__(self, augmentor=None, augment_on_device: bool = False, seed: int = 0, return_sample_id=True):
        self.augmentor, self.augment_on_device, self.seed, self.epoch = augmentor, augment_on_device, seed, 0
        self.return_sample_id = return_sample_id

    def __call__(self, items):
        bad = [x for x in items if isinstance(x, BadItem)]
        good = [x for x in items if not isinstance(x, BadItem)]
        if not good:
            return None, bad
        lens = torch.tensor([int(x.audio_len) for x in good], dtype=torch.long)
        lmax = int(lens.max())
        audio = torch.zeros(len(good), lmax)
        noise = torch.zeros(len(good), lmax)
        for i, x in enumerate(good):
            audio[i, : x.audio.shape[0]] = x.audio
            n = min(x.noise.shape[0], lmax)
            noise[i, :n] = x.noise[:n]
        noise_len = torch.tensor([min(int(x.noise_len), lmax) for x in good], dtype=torch.long)
        ids = [x.sample_id for x in good]
        batch = AudioNoiseBatch(sample_id=ids if self.return_sample_id else None, audio=audio, audio_len=lens,
                                noise=noise, noise_len=noise_len)
        if self.augment_on_device:
            return batch, bad
        if self.augmentor is not None:
            rng = random.Random(f"{self.seed}-{self.epoch}-{ids[0]}")
            return self.augmentor(batch, rng), bad
        batch.noisy_audio, batch.noisy_audio_len = audio + noise, lens.clone()
        return batch, bad

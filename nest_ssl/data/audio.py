"""Audio decoding (soundfile), resampling, down-mixing, min-length padding and noise sampling.

`BadSample` is raised for anything wrong with one item; the dataset turns it into a skipped, counted item.
Resampling uses torchaudio's sinc resampler (NeMo uses librosa's default, so resampled audio is close, not
bit-identical; 16 kHz data, the normal case, is untouched).
"""
from __future__ import annotations

import io
import logging
import os

import numpy as np
import soundfile as sf
import torch
import torchaudio

log = logging.getLogger(__name__)


class BadSample(Exception):
    """One unusable item: .path and .reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class AudioLoader:
    """Decode to a float32 mono tensor at `sample_rate`. Logs the first resample / down-mix once per process."""

    def __init__(self, sample_rate: int, channel_selector=None):
        self.sample_rate = int(sample_rate)
        self.channel_selector = channel_selector
        self._warned: set[str] = set()

    def _once(self, key: str, msg: str, *args):
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def load(self, path: str, offset: float = 0.0, duration: float | None = None, data: bytes | None = None,
             name: str | None = None) -> torch.Tensor:
        name = name or path
        if data is None and not os.path.isfile(path):
            raise BadSample(name, "missing file")
        try:
            with sf.SoundFile(io.BytesIO(data) if data is not None else path) as f:
                sr = f.samplerate
                start = int(offset * sr) if offset else 0
                if start:
                    f.seek(start)
                frames = int(duration * sr) if duration else -1
                x = f.read(frames=frames, dtype="float32", always_2d=True)  # (L, C)
        except (RuntimeError, OSError, sf.LibsndfileError, ValueError) as e:
            raise BadSample(name, f"unreadable audio ({type(e).__name__}: {str(e)[:120]})") from None
        if x.shape[0] == 0:
            raise BadSample(name, "zero-length audio")
        if not np.isfinite(x).all():
            raise BadSample(name, "NaN or Inf samples")
        x = self._select_channels(x, name)
        wav = torch.from_numpy(np.ascontiguousarray(x))
        if sr != self.sample_rate:
            self._once("resample", "resampling %s from %d Hz to %d Hz (further resampling is not logged)",
                       name, sr, self.sample_rate)
            wav = torchaudio.functional.resample(wav, sr, self.sample_rate)
        return wav

    def _select_channels(self, x: np.ndarray, name: str) -> np.ndarray:
        if x.shape[1] == 1:
            return x[:, 0]
        sel = self.channel_selector
        if sel is None or sel == "average":
            self._once("downmix", "down-mixing %d-channel audio %s to mono (further down-mixes are not logged)",
                       x.shape[1], name)
            return x.mean(axis=1)
        if isinstance(sel, int):
            return x[:, sel]
        return x[:, list(sel)].mean(axis=1)


def pad_to_min_len(x: torch.Tensor, min_len: int, mode: str) -> torch.Tensor:
    """Audio shorter than min_len samples -> exactly min_len by repetition ('repeat') or zeros ('zero')."""
    n = x.shape[0]
    if n >= min_len:
        return x
    if mode == "repeat":
        return x.repeat(min_len // n + 1)[:min_len]
    return torch.nn.functional.pad(x, (0, min_len - n))


def sample_noise(noise_entries, loader: AudioLoader, num_samples: int, rng: np.random.Generator,
                 max_tries: int = 20) -> tuple[torch.Tensor, int]:
    """A noise clip for an utterance of num_samples samples -> (noise (num_samples,), noise_len).

    NeMo's crop/loop rule: a longer noise file is cropped at a random offset to the utterance duration, retried
    while the crop is silent (we test energy, NeMo the plain sum, which rejects half of all windows); a shorter
    one is read whole and zero-padded with noise_len = its length. No noise manifest -> zeros, noise_len = ℓ.
    """
    sr = loader.sample_rate
    for _ in range(max_tries if noise_entries else 0):
        e = noise_entries[int(rng.integers(len(noise_entries)))]
        audio_dur = num_samples / sr
        try:
            if e.duration is not None and e.duration > audio_dur:
                for _ in range(100):
                    off = e.offset + float(rng.uniform(0, e.duration - audio_dur))
                    noise = loader.load(e.audio_filepath, off, audio_dur)
                    if float(noise.square().sum()) > 0:
                        break
            else:
                noise = loader.load(e.audio_filepath, e.offset, e.duration)
        except BadSample as err:
            log.warning("noise: %s", err)
            continue
        if float(noise.square().sum()) == 0:
            db = float(rng.uniform(-90, -46))
            noise = noise + torch.from_numpy(rng.standard_normal(noise.shape[0]).astype(np.float32)) * 10 ** (db / 20)
        n = min(noise.shape[0], num_samples)
        out = torch.zeros(num_samples)
        out[:n] = noise[:n]
        return out, n
    return torch.zeros(num_samples), num_samples

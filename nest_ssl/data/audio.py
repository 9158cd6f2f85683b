"""Audio decoding (soundfile), resampling, down-mixing, min-length padding and noise sampling.

`BadSample` is raised for anything wrong with one item; the dataset turns it into a skipped, counted item.
Resampling uses torchaudio's sinc resampler (NeMo uses librosa's default, so resampled audio is close, not
bit-identical; 16 kHz data, the normal case, is untouched).
"""
from __future__ import annotations

import io
import logging
import os
import stat
from multiprocessing.sharedctypes import RawArray

import numpy as np
import soundfile as sf
import torch
import torchaudio

log = logging.getLogger(__name__)

# "Logged already" flags for the resample and down-mix notes, in shared memory: every AudioLoader of the run (train,
# validation, noise) and every DataLoader worker of every epoch (workers restart each epoch with a fresh copy of the
# dataset) sees the same flags, so each note is printed once per run. A benign race may print it twice.
_ONCE_KEYS = ("resample", "downmix")
_LOGGED = RawArray("b", len(_ONCE_KEYS))


class BadSample(Exception):
    """One unusable item: .path, .reason (for a person) and .kind (one of BAD_KINDS, for counting)."""

    def __init__(self, path: str, reason: str, kind: str = "unreadable"):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.kind = path, reason, kind


# Every way an item's audio can be unusable; check_data.py and the training loader classify alike.
BAD_KINDS = ("no_such_file", "is_directory", "empty", "unreadable", "nonfinite", "offset_past_end",
             "duration_mismatch", "unmeasurable_duration")
# Formats whose header frame count is exact; others (mp3, ogg, ...) are decoded to be measured.
_EXACT_HEADER_FORMATS = ("WAV", "WAVEX", "FLAC", "AIFF", "W64", "RF64", "CAF", "AU")


def check_file(path: str) -> None:
    """BadSample unless `path` is a non-empty file: "no such file", a directory, 0 bytes. One stat call: this runs
    for every item of every epoch, on file systems where a stat is a network round trip."""
    try:
        st = os.stat(path)
    except OSError:  # as os.path.exists: missing, or a path this process may not look into
        raise BadSample(path, "no such file", "no_such_file") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadSample(path, "is a directory, not an audio file", "is_directory")
    if st.st_size == 0:
        raise BadSample(path, "empty file (0 bytes)", "empty")


def _open_error(name: str, e: Exception, buf: io.BytesIO | None = None) -> BadSample:
    # soundfile names an in-memory file by its repr, an address that differs at each read: the same bad tar member
    # would give a new reason every epoch and be counted again, not once
    msg = str(e) if buf is None else str(e).replace(repr(buf), "the tar member")
    return BadSample(name, f"unreadable or unknown audio format ({type(e).__name__}: {msg[:120]})", "unreadable")


def file_info(path: str):
    """soundfile's header info (samplerate, frames, channels, format), BadSample when the file is unusable."""
    check_file(path)
    try:
        return sf.info(path)
    except (RuntimeError, OSError, sf.LibsndfileError, ValueError) as e:
        raise _open_error(path, e) from None


def measure_duration(entry) -> float:
    """Seconds after the entry's offset of a manifest entry's file without a duration: the header's frame count
    for formats that store it exactly, otherwise a full decode (block by block, little memory)."""
    path, offset = entry.audio_filepath, entry.offset
    check_file(path)
    try:
        with sf.SoundFile(path) as f:
            frames, sr = f.frames, f.samplerate
            if f.format not in _EXACT_HEADER_FORMATS or frames <= 0:
                frames = sum(b.shape[0] for b in f.blocks(blocksize=1 << 16, dtype="float32"))
    except (RuntimeError, OSError, sf.LibsndfileError, ValueError) as e:
        raise _open_error(path, e) from None
    if frames == 0:
        raise BadSample(path, "no audio samples (0 frames)", "empty")
    seconds = frames / sr - (offset or 0.0)
    if seconds <= 0:
        raise BadSample(path, f"offset {offset} s is past the end of the {frames / sr:.3f} s file", "offset_past_end")
    return seconds


def check_span(name: str, file_seconds: float, offset: float, duration: float | None, whole_file: bool,
               tolerance: float | None) -> None:
    """Raise BadSample when the manifest's offset / duration disagree with the file by more than `tolerance` s: the
    span runs past the end, or (an entry without `offset` describes the whole file) the file is longer."""
    if offset and offset >= file_seconds:
        raise BadSample(name, f"offset {offset} s is past the end of the {file_seconds:.3f} s file", "offset_past_end")
    if duration is None or tolerance is None:
        return
    available = file_seconds - (offset or 0.0)
    if duration - available > tolerance:
        raise BadSample(name, f"manifest duration {duration} s from offset {offset or 0.0} s, but the file has "
                              f"{available:.3f} s there (short by {duration - available:.3f} s)", "duration_mismatch")
    if whole_file and available - duration > tolerance:
        raise BadSample(name, f"manifest duration {duration} s, but the file is {available:.3f} s (longer by "
                              f"{available - duration:.3f} s; give 'offset' for a segment)", "duration_mismatch")


class AudioLoader:
    """Decode to a float32 mono tensor at `sample_rate`. Logs the first resample / down-mix once per run.

    `duration_tolerance` (seconds, None: off): a manifest offset/duration disagreeing with the file by more is a
    BadSample ("duration_mismatch" / "offset_past_end"), see `check_span`."""

    def __init__(self, sample_rate: int, channel_selector=None, duration_tolerance: float | None = None):
        self.sample_rate = int(sample_rate)
        self.channel_selector = channel_selector
        self.duration_tolerance = duration_tolerance
        self._logged = _LOGGED  # an attribute, so that spawned workers receive the parent's shared flags

    def _once(self, key: str, msg: str, *args):
        i = _ONCE_KEYS.index(key)
        if not self._logged[i]:
            self._logged[i] = 1
            log.warning(msg, *args)

    def load(self, path: str, offset: float = 0.0, duration: float | None = None, data: bytes | None = None,
             name: str | None = None, whole_file: bool = False) -> torch.Tensor:
        name, buf = name or path, io.BytesIO(data) if data is not None else None
        if data is None:
            check_file(path)
        try:
            with sf.SoundFile(buf if buf is not None else path) as f:
                sr = f.samplerate
                if f.frames > 0:  # 0: a header without a frame count (streamed); nothing to compare with
                    check_span(name, f.frames / sr, offset, duration, whole_file, self.duration_tolerance)
                start = int(offset * sr) if offset else 0
                if start:
                    f.seek(start)
                frames = int(duration * sr) if duration else -1
                x = f.read(frames=frames, dtype="float32", always_2d=True)  # (L, C)
        except (RuntimeError, OSError, sf.LibsndfileError, ValueError) as e:
            raise _open_error(name, e, buf) from None
        if x.shape[0] == 0:
            raise BadSample(name, "no audio samples (0 frames)", "empty")
        if not np.isfinite(x).all():
            raise BadSample(name, "NaN or Inf samples", "nonfinite")
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

"""Audio front-end: NeMo 2.6.2's `AudioToMelSpectrogramPreprocessor` and its `FilterbankFeatures`.

waveform (B, L) float + lengths (B,) samples -> log-mel features (B, F, T) float32 + frame lengths (B,) int64:
dither (train only) -> pre-emphasis, zeroed past each length -> STFT (center=True, zero padding) -> magnitude, then
power -> slaney mel -> log(x + guard) -> normalisation over valid frames -> frames >= length := pad_value -> time padded
to a multiple of `pad_to`. Valid frames: floor(L / hop) (NeMo >= 2.5; the STFT itself makes one more).

Deviations from NeMo, all on paths where NeMo crashes or mutates its input:
* dither adds noise to a new tensor (NeMo adds it in place to the caller's audio) and can draw from a generator;
* `window: none` uses a rectangular window (NeMo registers no window and fails in forward);
* `pad_to: max` pads to floor(max_duration * sr / hop) frames (NeMo raises a TypeError while building);
* per_feature with one valid frame never raises (NeMo raises when CUDA is merely available, NaN -> 0 otherwise).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nest_ssl.checks import check_lengths

STD_EPS = 1e-5  # NeMo's CONSTANT: added to the std (not the variance) and used as the sqrt guard with use_grads
WINDOWS = {"hann": torch.hann_window, "hamming": torch.hamming_window, "blackman": torch.blackman_window,
           "bartlett": torch.bartlett_window, "none": None}
NORMALIZE = ("per_feature", "all_features", "none", "NA")  # NeMo treats any other string as "no normalisation"


@dataclass
class AudioToMelSpectrogramPreprocessorConfig:
    """NeMo's constructor keys with NeMo's defaults (the NEST YAML overrides several), plus two extras of ours."""
    sample_rate: int = 16000
    window_size: float | None = 0.02  # seconds; exclusive with n_window_size
    window_stride: float | None = 0.01  # seconds; exclusive with n_window_stride
    n_window_size: int | None = None
    n_window_stride: int | None = None
    window: str | None = "hann"
    normalize: str | None = "per_feature"
    n_fft: int | None = None  # None: next power of two >= window length
    preemph: float | None = 0.97
    features: int = 64
    lowfreq: float = 0
    highfreq: float | None = None  # None: sample_rate / 2
    log: bool = True
    log_zero_guard_type: str = "add"
    log_zero_guard_value: float | str = 2 ** -24  # a number, or "tiny" / "eps" of float32
    dither: float = 1e-5
    pad_to: int | str = 16  # 0: no padding; "max": pad to the frames of max_duration
    frame_splicing: int = 1
    exact_pad: bool = False
    pad_value: float = 0.0
    mag_power: float = 2.0
    rng: random.Random | None = None  # narrowband augmentation's RNG (not settable from YAML)
    nb_augmentation_prob: float = 0.0
    nb_max_freq: int = 4000
    mel_norm: str | None = "slaney"
    use_torchaudio: bool = False  # deprecated in NeMo; True (torchaudio's FilterbankFeaturesTA) is not supported
    stft_exact_pad: bool = False  # deprecated in NeMo, ignored (run_config.IGNORED_KEYS)
    stft_conv: bool = False  # deprecated in NeMo, ignored (run_config.IGNORED_KEYS)
    # extras of ours: FilterbankFeatures arguments NeMo's preprocessor does not expose (NeMo defaults)
    max_duration: float = 16.7  # seconds; only used by pad_to="max"
    use_grads: bool = False  # False: forward runs under no_grad, as NeMo


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa htk=False): linear below 1 kHz, logarithmic above, float64."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-300) / min_log_hz) / logstep, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                   norm: str | None = "slaney") -> np.ndarray:
    """(n_mels, n_fft//2+1) float32, equal to librosa.filters.mel(htk=False) as NeMo builds it.

    Triangles are computed in float64 and stored into float32 first; the slaney area factor 2/(f[i+2]-f[i]) is then
    applied in float64 to those float32 values. Doing it in one float64 pass differs in the last bit.
    """
    fft_f = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_f)  # (n_mels + 2, n_fft//2+1)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    if norm == "slaney":
        enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
        weights = (weights * enorm[:, None]).astype(np.float32)
    return weights


def _validate(cfg: AudioToMelSpectrogramPreprocessorConfig, hop: int) -> None:
    if cfg.window not in WINDOWS and cfg.window is not None:
        raise ValueError(f"preprocessor.window={cfg.window!r}; allowed: {sorted(WINDOWS)} or null")
    if cfg.normalize not in NORMALIZE and cfg.normalize not in (None, ""):
        raise ValueError(f"preprocessor.normalize={cfg.normalize!r}; allowed: {list(NORMALIZE)} or null")
    if cfg.log_zero_guard_type not in ("add", "clamp"):
        raise ValueError(f"preprocessor.log_zero_guard_type={cfg.log_zero_guard_type!r}; allowed: 'add', 'clamp'")
    if isinstance(cfg.log_zero_guard_value, str) and cfg.log_zero_guard_value not in ("tiny", "eps"):
        raise ValueError(f"preprocessor.log_zero_guard_value={cfg.log_zero_guard_value!r}; allowed: a number, "
                         "'tiny', 'eps'")
    if cfg.mel_norm not in ("slaney", None):
        raise ValueError(f"preprocessor.mel_norm={cfg.mel_norm!r}; allowed: 'slaney' or null")
    if not (cfg.pad_to == "max" or (isinstance(cfg.pad_to, int) and cfg.pad_to >= 0)):
        raise ValueError(f"preprocessor.pad_to={cfg.pad_to!r}; allowed: an int >= 0 or 'max'")
    if not isinstance(cfg.frame_splicing, int) or cfg.frame_splicing < 1:
        raise ValueError(f"preprocessor.frame_splicing={cfg.frame_splicing!r} must be an int >= 1")
    if cfg.exact_pad and hop % 2 == 1:
        raise ValueError(f"preprocessor.exact_pad=True needs an even hop, got n_window_stride={hop}")
    if cfg.use_torchaudio:
        raise ValueError("preprocessor.use_torchaudio=True (FilterbankFeaturesTA) is not supported; set it false")
    if not 0.0 <= cfg.nb_augmentation_prob <= 1.0:
        raise ValueError(f"preprocessor.nb_augmentation_prob={cfg.nb_augmentation_prob} must be in [0, 1]")


def _window_lengths(cfg: AudioToMelSpectrogramPreprocessorConfig) -> tuple[int, int]:
    """(win_length, hop) in samples from window_size/stride (seconds) or n_window_size/stride, as NeMo."""
    if cfg.window_size and cfg.n_window_size:
        raise ValueError(f"preprocessor: give window_size={cfg.window_size} or n_window_size={cfg.n_window_size}, "
                         "not both (set the other to null)")
    if cfg.window_stride and cfg.n_window_stride:
        raise ValueError(f"preprocessor: give window_stride={cfg.window_stride} or "
                         f"n_window_stride={cfg.n_window_stride}, not both (set the other to null)")
    win = int(cfg.window_size * cfg.sample_rate) if cfg.window_size else cfg.n_window_size
    hop = int(cfg.window_stride * cfg.sample_rate) if cfg.window_stride else cfg.n_window_stride
    for name, v in (("window length", win), ("window stride", hop)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"preprocessor {name} = {v!r} samples; it must be a positive int")
    return win, hop


class FilterbankFeatures(nn.Module):
    """The featurizer; buffers `window` (win,) and `fb` (1, F, n_fft//2+1) carry NeMo's state_dict names."""

    def __init__(self, cfg: AudioToMelSpectrogramPreprocessorConfig):
        super().__init__()
        win, hop = _window_lengths(cfg)
        _validate(cfg, hop)
        self.cfg = cfg
        self.win_length, self.hop_length = win, hop
        self.n_fft = cfg.n_fft or 2 ** math.ceil(math.log2(win))
        if self.n_fft < win:
            raise ValueError(f"preprocessor.n_fft={self.n_fft} must be >= the window length {win}")
        self.stft_pad_amount = (self.n_fft - hop) // 2 if cfg.exact_pad else None
        window_fn = WINDOWS.get(cfg.window)
        self.register_buffer("window", window_fn(win, periodic=False) if window_fn else None)
        highfreq = cfg.highfreq or cfg.sample_rate / 2
        fb = mel_filterbank(cfg.sample_rate, self.n_fft, cfg.features, cfg.lowfreq, highfreq, cfg.mel_norm)
        self.register_buffer("fb", torch.from_numpy(fb).unsqueeze(0))  # (1, F, K)
        # On the host even when the module is built under torch.device("meta") (model summaries).
        self.max_length = int(self.get_seq_len(torch.tensor(int(cfg.max_duration * cfg.sample_rate), device="cpu")))
        self.nb_prob = cfg.nb_augmentation_prob if cfg.nb_max_freq < cfg.sample_rate / 2 else 0.0
        self.nb_max_fft_bin = int((cfg.nb_max_freq / cfg.sample_rate) * self.n_fft)
        self._rng = cfg.rng if cfg.rng is not None else random.Random()

    def get_seq_len(self, length: torch.Tensor) -> torch.Tensor:
        """Valid frames: floor((L + 2*pad - n_fft) / hop); 0 where L == 0 (and never negative)."""
        pad = 2 * self.stft_pad_amount if self.stft_pad_amount is not None else 2 * (self.n_fft // 2)
        n = torch.div(length + pad - self.n_fft, self.hop_length, rounding_mode="floor").to(torch.long)
        return torch.where(length == 0, 0, n).clamp_min(0)

    def _guard(self, x: torch.Tensor) -> float:
        g = self.cfg.log_zero_guard_value
        if isinstance(g, str):
            return torch.finfo(x.dtype).tiny if g == "tiny" else torch.finfo(x.dtype).eps
        return g

    def _power_spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L') float32 -> |STFT|^mag_power (B, K, T); sqrt then pow as NeMo (not bit-equal to re²+im²)."""
        window = self.window if self.window is not None else torch.ones(self.win_length)
        spec = torch.stft(x, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          center=not self.cfg.exact_pad, window=window.to(dtype=torch.float32, device=x.device),
                          return_complex=True, pad_mode="constant")
        guard = STD_EPS if self.cfg.use_grads else 0.0
        ri = torch.view_as_real(spec)  # (B, K, T, 2)
        # re*re + im*im equals NeMo's pow(2).sum(-1) bit for bit (one addition) but avoids a slow size-2 reduction
        mag = torch.sqrt(ri[..., 0].square() + ri[..., 1].square() + guard)  # (B, K, T)
        if self.training and self.nb_prob > 0.0:
            # narrowband: NeMo draws one python-random number per utterance, in batch order
            hit = [self._rng.random() < self.nb_prob for _ in range(mag.shape[0])]
            drop = torch.tensor(hit, device=mag.device)[:, None, None] & (
                torch.arange(mag.shape[1], device=mag.device) >= self.nb_max_fft_bin)[None, :, None]
            mag = mag.masked_fill(drop, 0.0)
        return mag.pow(self.cfg.mag_power) if self.cfg.mag_power != 1.0 else mag

    def forward(self, x: torch.Tensor, length: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L) float32, length (B,) int64 samples -> (features (B, F*frame_splicing, T), frames (B,) int64)."""
        cfg = self.cfg
        n = self.get_seq_len(length)
        if self.stft_pad_amount is not None:
            x = nn.functional.pad(x, (self.stft_pad_amount, self.stft_pad_amount))
        if self.training and cfg.dither > 0:
            # a new tensor: NeMo's in-place `x += ...` would write into the caller's audio
            x = x + cfg.dither * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if cfg.preemph is not None:
            # NeMo masks with the sample length on the (exact_pad-shifted) signal; kept for parity
            valid = torch.arange(x.shape[1], device=x.device)[None, :] < length[:, None]
            x = torch.cat((x[:, :1], x[:, 1:] - cfg.preemph * x[:, :-1]), dim=1).masked_fill(~valid, 0.0)
        x = self._power_spectrum(x)
        x = torch.matmul(self.fb.to(x.dtype), x)  # (1, F, K) @ (B, K, T) -> (B, F, T)
        if cfg.log:
            g = self._guard(x)
            x = torch.log(x + g) if cfg.log_zero_guard_type == "add" else torch.log(torch.clamp(x, min=g))
        if cfg.frame_splicing > 1:
            # NeMo's splice_frames concatenates x[..., :k] with x[..., k:], i.e. x itself: F copies of the features
            x = x.repeat(1, cfg.frame_splicing, 1)  # (B, F*splice, T)
        pad_mask = torch.arange(x.shape[-1], device=x.device)[None, :] >= n[:, None]  # (B, T)
        x = normalize_batch(x, n, pad_mask, cfg.normalize)
        x = x.masked_fill(pad_mask[:, None, :], cfg.pad_value)
        return self._pad_time(x, n), n

    def _pad_time(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        pad_to, T = self.cfg.pad_to, x.shape[-1]
        if pad_to == "max":
            if T > self.max_length and bool((n > self.max_length).any()):
                raise ValueError(f"pad_to='max': {int(n.max())} valid frames exceed max_duration="
                                 f"{self.cfg.max_duration} s ({self.max_length} frames)")
            return nn.functional.pad(x, (0, self.max_length - T), value=self.cfg.pad_value)
        if pad_to > 0 and T % pad_to:
            x = nn.functional.pad(x, (0, pad_to - T % pad_to), value=self.cfg.pad_value)
        return x


def normalize_batch(x: torch.Tensor, n: torch.Tensor, pad_mask: torch.Tensor, mode: str | None) -> torch.Tensor:
    """NeMo's normalize_batch over valid frames t < n: unbiased std, NaN (n == 1) -> 0, std + 1e-5."""
    if mode == "per_feature":
        valid = ~pad_mask[:, None, :]  # (B, 1, T)
        count = valid.sum(dim=2)  # (B, 1) int64
        mean = torch.where(valid, x, 0.0).sum(dim=2) / count  # (B, F)
        centered = torch.where(valid, x - mean[:, :, None], 0.0)
        std = torch.sqrt(centered.pow(2).sum(dim=2) / (count - 1.0))
        std = std.masked_fill(std.isnan(), 0.0) + STD_EPS
        return (x - mean[:, :, None]) / std[:, :, None]
    if mode == "all_features":
        valid = ~pad_mask[:, None, :]
        count = valid.sum(dim=(1, 2)) * x.shape[1]  # (B,) valid elements
        mean = torch.where(valid, x, 0.0).sum(dim=(1, 2)) / count
        centered = torch.where(valid, x - mean[:, None, None], 0.0)
        std = torch.sqrt(centered.pow(2).sum(dim=(1, 2)) / (count - 1.0)) + STD_EPS
        return (x - mean[:, None, None]) / std[:, None, None]
    return x


def _check_inputs(input_signal: torch.Tensor, length: torch.Tensor) -> None:
    if not isinstance(input_signal, torch.Tensor) or input_signal.dim() != 2:
        shape = tuple(input_signal.shape) if isinstance(input_signal, torch.Tensor) else type(input_signal).__name__
        raise ValueError(f"input_signal must be a (B, L) tensor, got {shape}")
    if not input_signal.is_floating_point():
        raise ValueError(f"input_signal must be a float tensor, got dtype {input_signal.dtype}")
    B, L = input_signal.shape
    if B == 0:
        raise ValueError(f"input_signal is an empty batch, shape {(B, L)}")
    if not isinstance(length, torch.Tensor) or tuple(length.shape) != (B,):
        shape = tuple(length.shape) if isinstance(length, torch.Tensor) else type(length).__name__
        raise ValueError(f"length must be a ({B},) tensor matching input_signal {(B, L)}, got {shape}")
    if length.is_floating_point() or length.is_complex() or length.dtype == torch.bool:
        raise ValueError(f"length must be an integer tensor (samples), got dtype {length.dtype}")
    check_lengths(length, L, detail=f" (input_signal has {L} samples)")


class AudioToMelSpectrogramPreprocessor(nn.Module):
    """NeMo's preprocessor: input checks, float32 in, features out in the module's dtype (float32 unless cast)."""
    config_class = AudioToMelSpectrogramPreprocessorConfig

    def __init__(self, cfg: AudioToMelSpectrogramPreprocessorConfig):
        super().__init__()
        self.cfg = cfg
        self.featurizer = FilterbankFeatures(cfg)
        self.sample_rate = cfg.sample_rate
        self.win_length, self.hop_length = self.featurizer.win_length, self.featurizer.hop_length
        # not persistent, as in NeMo: .half() on the module makes the output half; the math stays float32
        self.register_buffer("dtype_sentinel_tensor", torch.tensor((), dtype=torch.float32), persistent=False)

    def forward(self, input_signal: torch.Tensor, length: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_signal (B, L) float, length (B,) int samples -> (features (B, F, T), feature lengths (B,) int64)."""
        _check_inputs(input_signal, length)
        with torch.set_grad_enabled(self.cfg.use_grads and torch.is_grad_enabled()), \
                torch.autocast(input_signal.device.type, enabled=False):
            # float32 throughout: NeMo found low-precision front-ends cost WER; .to() is a no-op for float32
            length = length.to(device=input_signal.device, dtype=torch.long)
            feats, n = self.featurizer(input_signal.to(torch.float32), length, generator=generator)
        return feats.to(self.dtype_sentinel_tensor.dtype), n

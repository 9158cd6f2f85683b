"""AudioToMelSpectrogramPreprocessor against NeMo 2.6.2's outputs (nest_tiny parity set) and torch references."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import PARITY
from nest_ssl.preprocessor import (
    AudioToMelSpectrogramPreprocessor,
    AudioToMelSpectrogramPreprocessorConfig,
    mel_filterbank,
)

SET = PARITY / "nest_tiny"
NEST = dict(sample_rate=16000, normalize="per_feature", window_size=0.025, window_stride=0.01, window="hann",
            features=80, n_fft=512, log=True, frame_splicing=1, dither=1e-5, pad_to=16, pad_value=0.0)


def make(**over) -> AudioToMelSpectrogramPreprocessor:
    return AudioToMelSpectrogramPreprocessor(AudioToMelSpectrogramPreprocessorConfig(**{**NEST, **over})).eval()


@pytest.fixture(scope="module")
def nemo():
    sd = np.load(SET / "state_dict.npz")
    pre = np.load(SET / "preprocessor.npz")
    cfg = json.loads((SET / "config.json").read_text())
    return sd, pre, cfg


def rel_err(got, ref):
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.numerics
def test_buffers_equal_nemo_state_dict(nemo):
    sd, _, _ = nemo
    m = make()
    np.testing.assert_array_equal(m.featurizer.window.numpy(), sd["preprocessor.featurizer.window"])
    np.testing.assert_allclose(m.featurizer.fb.numpy(), sd["preprocessor.featurizer.fb"], rtol=0, atol=1e-7)


def test_state_dict_keys_shapes_dtypes_and_strict_load(nemo):
    sd, _, _ = nemo
    m = make()
    got = {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}
    assert got == {"featurizer.window": ((400,), torch.float32), "featurizer.fb": ((1, 80, 257), torch.float32)}
    assert list(m.parameters()) == []
    nemo_keys = {k[len("preprocessor."):]: torch.from_numpy(v) for k, v in sd.items() if k.startswith("preprocessor.")}
    m.load_state_dict(nemo_keys, strict=True)


@pytest.mark.numerics
def test_features_match_nemo(nemo):
    sd, pre, cfg = nemo
    section = {k: v for k, v in cfg["model"]["preprocessor"].items() if k != "_target_"}
    m = AudioToMelSpectrogramPreprocessor(AudioToMelSpectrogramPreprocessorConfig(**section)).eval()
    feats, lens = m(torch.from_numpy(pre["wave"]), torch.from_numpy(pre["wave_lengths"]))
    assert feats.dtype == torch.float32 and lens.dtype == torch.int64
    np.testing.assert_array_equal(lens.numpy(), pre["feature_lengths"])
    assert feats.shape == pre["features"].shape
    assert rel_err(feats.numpy(), pre["features"]) <= 1e-4


@pytest.mark.numerics
def test_mel_filterbank_matches_torchaudio_slaney():
    ta = pytest.importorskip("torchaudio")
    ref = ta.functional.melscale_fbanks(257, 0.0, 8000.0, 80, 16000, norm="slaney", mel_scale="slaney").T
    np.testing.assert_allclose(mel_filterbank(16000, 512, 80, 0.0, 8000.0), ref.numpy(), rtol=0, atol=1e-6)


def test_appended_zeros_leave_valid_frames_unchanged(nemo):
    _, pre, _ = nemo
    wave, lens = torch.from_numpy(pre["wave"]), torch.from_numpy(pre["wave_lengths"])
    m = make()
    a, na = m(wave, lens)
    b, nb = m(torch.nn.functional.pad(wave, (0, 16000)), lens)
    assert torch.equal(na, nb) and b.shape[-1] > a.shape[-1]
    for i, n in enumerate(na.tolist()):  # spec section 9: 5e-4 through the preprocessor
        torch.testing.assert_close(b[i, :, :n], a[i, :, :n], rtol=0, atol=5e-4)
        assert torch.all(b[i, :, n:] == 0)


def test_dither_is_out_of_place_reproducible_and_train_only():
    wave = torch.randn(2, 4000) * 0.1
    lens = torch.tensor([4000, 3000])
    keep = wave.clone()
    m = make().train()
    a, _ = m(wave, lens, generator=torch.Generator().manual_seed(0))
    b, _ = m(wave, lens, generator=torch.Generator().manual_seed(0))
    c, _ = m(wave, lens, generator=torch.Generator().manual_seed(1))
    assert torch.equal(wave, keep)
    assert torch.equal(a, b) and not torch.equal(a, c)
    e1, _ = m.eval()(wave, lens)
    assert not torch.equal(a, e1)
    e2, _ = m(wave, lens)
    assert torch.equal(e1, e2)


def _reference_per_feature(x, n):
    """torch.mean / torch.std on each utterance's valid slice (an independent formulation of NeMo's rule)."""
    out = torch.zeros_like(x)
    for i, k in enumerate(n.tolist()):
        v = x[i, :, :k]
        std = v.std(dim=1, keepdim=True).nan_to_num(0.0) + 1e-5
        out[i, :, :k] = (v - v.mean(dim=1, keepdim=True)) / std
    return out


def _reference_all_features(x, n):
    out = torch.zeros_like(x)
    for i, k in enumerate(n.tolist()):
        v = x[i, :, :k]
        out[i, :, :k] = (v - v.mean()) / (v.std() + 1e-5)
    return out


@pytest.mark.parametrize("mode,ref", [("per_feature", _reference_per_feature),
                                      ("all_features", _reference_all_features),
                                      ("none", None), ("NA", None), (None, None)])
def test_normalize_modes_match_reference(mode, ref):
    wave, lens = torch.randn(3, 5000), torch.tensor([5000, 2500, 900])
    raw, n = make(normalize=None, pad_to=0)(wave, lens)
    got, n2 = make(normalize=mode, pad_to=0)(wave, lens)
    assert torch.equal(n, n2)
    want = raw if ref is None else ref(raw, n)
    for i, k in enumerate(n.tolist()):
        torch.testing.assert_close(got[i, :, :k], want[i, :, :k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["per_feature", "all_features"])
def test_single_valid_frame_gives_finite_output(mode):
    feats, n = make(normalize=mode)(torch.randn(2, 2000), torch.tensor([200, 2000]))
    assert n.tolist() == [1, 12]
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("window", ["hann", "hamming", "blackman", "bartlett", "none"])
def test_window_types_run(window):
    m = make(window=window)
    assert (m.featurizer.window is None) == (window == "none")
    feats, n = m(torch.randn(2, 3200), torch.tensor([3200, 1600]))
    assert feats.shape == (2, 80, 32) and n.tolist() == [20, 10] and torch.isfinite(feats).all()


@pytest.mark.parametrize("pad_to,frames", [(0, 21), (16, 32), (5, 25), ("max", 1670)])
def test_pad_to(pad_to, frames):
    feats, n = make(pad_to=pad_to, pad_value=-3.0)(torch.randn(2, 3200), torch.tensor([3200, 1600]))
    assert feats.shape[-1] == frames
    assert torch.all(feats[1, :, 10:] == -3.0) and torch.all(feats[0, :, 20:] == -3.0)


def test_exact_pad_lengths():
    m = make(exact_pad=True)
    feats, n = m(torch.randn(2, 3200), torch.tensor([3200, 1600]))
    pad = (512 - 160) // 2
    assert n.tolist() == [(3200 + 2 * pad - 512) // 160, (1600 + 2 * pad - 512) // 160]
    assert feats.shape[-1] == 32


def test_frame_splicing_and_clamp_guard():
    feats, _ = make(frame_splicing=3, normalize=None, pad_to=0)(torch.randn(1, 1600), torch.tensor([1600]))
    assert feats.shape == (1, 240, 11)
    torch.testing.assert_close(feats[:, :80, :10], feats[:, 160:, :10])
    clamp, _ = make(log_zero_guard_type="clamp", log_zero_guard_value="tiny", normalize=None)(
        torch.zeros(1, 1600), torch.tensor([1600]))
    assert torch.allclose(clamp[0, :, :10], torch.tensor(math.log(torch.finfo(torch.float32).tiny)))


def test_narrowband_augmentation_zeroes_high_bins():
    import random
    m = make(normalize=None, nb_augmentation_prob=1.0, rng=random.Random(0)).train()
    feats, n = m(torch.randn(1, 3200), torch.tensor([3200]), generator=torch.Generator().manual_seed(0))
    high = m.featurizer.fb[0, :, :128].sum(1) == 0  # mel rows living entirely above 4 kHz (bin 128)
    assert high.any()
    assert torch.allclose(feats[0, high, :20], torch.tensor(math.log(2 ** -24)))


def test_float32_under_autocast_and_float64_input():
    wave, lens = torch.randn(2, 3200), torch.tensor([3200, 2000])
    m = make()
    ref, _ = m(wave, lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = m(wave, lens)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    got64, _ = m(wave.double(), lens)
    assert got64.dtype == torch.float32 and torch.equal(got64, ref)


@pytest.mark.parametrize("signal,length,match", [
    (torch.randn(3200), torch.tensor([3200]), "input_signal"),
    (torch.randn(1, 1, 3200), torch.tensor([3200]), "input_signal"),
    (torch.zeros(1, 3200, dtype=torch.int16), torch.tensor([3200]), "input_signal.*dtype"),
    (torch.randn(0, 3200), torch.zeros(0, dtype=torch.long), "empty batch"),
    (torch.randn(2, 3200), torch.tensor([3200]), "length"),
    (torch.randn(2, 3200), torch.tensor([3200.0, 10.0]), "length.*dtype"),
    (torch.randn(2, 3200), torch.tensor([3201, 10]), "length=\\[3201, 10\\]"),
    (torch.randn(2, 3200), torch.tensor([-1, 10]), "length=\\[-1, 10\\]"),
])
def test_bad_input_raises(signal, length, match):
    with pytest.raises(ValueError, match=match):
        make()(signal, length)


@pytest.mark.parametrize("over,match", [
    (dict(window="kaiser"), "window='kaiser'"),
    (dict(normalize="per_utterance"), "normalize='per_utterance'"),
    (dict(n_window_size=400), "window_size"),
    (dict(pad_to=-1), "pad_to=-1"),
    (dict(log_zero_guard_type="max"), "log_zero_guard_type"),
    (dict(mel_norm="htk"), "mel_norm"),
    (dict(use_torchaudio=True), "use_torchaudio"),
    (dict(frame_splicing=0), "frame_splicing"),
    (dict(exact_pad=True, window_stride=None, n_window_stride=161), "exact_pad"),
])
def test_bad_config_raises(over, match):
    with pytest.raises(ValueError, match=match):
        make(**over)


@pytest.mark.gpu
def test_cuda_matches_cpu(nemo):
    _, pre, _ = nemo
    wave, lens = torch.from_numpy(pre["wave"]), torch.from_numpy(pre["wave_lengths"])
    m = make()
    ref, n = m(wave, lens)
    got, ng = m.cuda()(wave.cuda(), lens.cuda())
    assert torch.equal(ng.cpu(), n)
    assert rel_err(got.cpu().numpy(), pre["features"]) <= 1e-4
    assert rel_err(got.cpu().numpy(), ref.numpy()) <= 1e-4

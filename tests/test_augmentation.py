"""MultiSpeakerNoiseAugmentation against NeMo 2.6.2's recorded trials (nest_tiny/augmentation.*)."""
import json
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import PARITY
from nest_ssl.data.augmentation import MultiSpeakerNoiseAugmentation, MultiSpeakerNoiseAugmentationConfig

SET = PARITY / "nest_tiny"
META = json.loads((SET / "augmentation.json").read_text())
ARR = np.load(SET / "augmentation.npz")
TRIALS = {t["tag"]: t for t in META["trials"]}


@dataclass
class Batch:  # the AudioNoiseBatch fields the augmentor uses
    audio: torch.Tensor
    audio_len: torch.Tensor
    noise: torch.Tensor
    noise_len: torch.Tensor
    noisy_audio: torch.Tensor | None = None
    noisy_audio_len: torch.Tensor | None = None
    sample_id: list | None = None


def _aug(trial, **extra):
    cfg = {k: v for k, v in META["configs"][trial["config"]].items() if k != "_target_"}
    return MultiSpeakerNoiseAugmentation(MultiSpeakerNoiseAugmentationConfig(**cfg, **extra))


def _batch():
    t = lambda k: torch.from_numpy(ARR[k].copy())  # noqa: E731
    return Batch(t("audio"), t("audio_lengths"), t("noise"), t("noise_lengths"))


class RecordingRandom(random.Random):
    """random.Random that logs the public calls the augmentor makes (NeMo's log format)."""

    def __init__(self, seed):
        super().__init__(seed)
        self.calls = []

    def getrandbits(self, k):  # overriding random() alone would switch CPython's randint to another algorithm
        return super().getrandbits(k)

    def random(self):
        v = super().random()
        if getattr(self, "_depth", 0) == 0:
            self.calls.append(["random", [], v])
        return v

    def _wrap(self, name, args, fn):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            v = fn()
        finally:
            self._depth -= 1
        self.calls.append([name, args, v])
        return v

    def uniform(self, a, b):
        return self._wrap("uniform", [a, b], lambda: super(RecordingRandom, self).uniform(a, b))

    def randint(self, a, b):
        return self._wrap("randint", [a, b], lambda: super(RecordingRandom, self).randint(a, b))

    def choices(self, population, k=1):
        def draw():
            return super(RecordingRandom, self).choices(population, k=k)
        out = self._wrap("choices", [len(population), k], draw)
        self.calls[-1][2] = [[x, n] for x, n in Counter(out).items()]
        return out

    def sample(self, pop, k):
        return self._wrap("sample", [list(pop), k], lambda: super(RecordingRandom, self).sample(pop, k))


@pytest.mark.parametrize("tag", sorted(TRIALS))
def test_seeded_output_equals_nemo(tag):
    trial = TRIALS[tag]
    before = _batch()
    out = _aug(trial)(before, random.Random(trial["seed"]))
    np.testing.assert_array_equal(out.noise.numpy(), ARR[f"{tag}.noise_out"])
    np.testing.assert_array_equal(out.noise_len.numpy(), ARR[f"{tag}.noise_lengths_out"])
    np.testing.assert_array_equal(out.noisy_audio_len.numpy(), ARR[f"{tag}.noisy_audio_lengths"])
    np.testing.assert_array_equal(out.noisy_audio.numpy(), ARR["audio"] + ARR[f"{tag}.noise_out"])
    np.testing.assert_array_equal(before.noise.numpy(), ARR["noise"])  # input not mutated


@pytest.mark.parametrize("tag", sorted(TRIALS))
def test_rng_call_order_and_decisions_equal_nemo(tag):
    trial, rng = TRIALS[tag], RecordingRandom(TRIALS[tag]["seed"])
    aug, lens = _aug(trial), ARR["audio_lengths"].tolist()
    decisions = [aug.decide(i, lens, rng) for i in range(len(lens))]
    assert rng.calls == [[n, a, v] for n, a, v in trial["rng_calls"]]
    for got, want in zip(decisions, trial["decisions"]):
        assert {k: got[k] for k in want if k != "mix_scale"} == {k: v for k, v in want.items() if k != "mix_scale"}


@pytest.mark.parametrize("tag", sorted(TRIALS))
def test_recorded_decisions_reproduce_output(tag):
    trial, b = TRIALS[tag], _batch()
    noise, *_ = _aug(trial).augment(b.audio, b.audio_len, b.noise, b.noise_len, trial["decisions"])
    np.testing.assert_array_equal(noise.numpy(), ARR[f"{tag}.noise_out"])


def test_clean_skip_leaves_skipped_utterances_clean():
    trial = TRIALS["nest_0"]  # utterances 0 and 1 are skipped
    out = _aug(trial, clean_skip=True)(_batch(), random.Random(trial["seed"]))
    assert torch.all(out.noise[:2] == 0)
    np.testing.assert_array_equal(out.noisy_audio[:2].numpy(), ARR["audio"][:2])
    np.testing.assert_array_equal(out.noisy_audio_len.numpy(), ARR["audio_lengths"])
    np.testing.assert_array_equal(out.noise[2:].numpy(), ARR["nest_0.noise_out"][2:])


def test_shape_mismatch_and_bad_config_raise():
    b = _batch()
    b.noise = b.noise[:, :100]
    with pytest.raises(ValueError, match="noise shape"):
        _aug(TRIALS["nest_0"])(b, random.Random(0))
    with pytest.raises(ValueError, match="prob=1.5"):
        MultiSpeakerNoiseAugmentation(MultiSpeakerNoiseAugmentationConfig(prob=1.5))


def test_torch_variant_distributions():
    from nest_ssl.data.augmentation import TorchMultiSpeakerNoiseAugmentation

    cfg = MultiSpeakerNoiseAugmentationConfig(prob=0.6, noise_ratio=0.5, min_mix_rate=0.3, max_mix_rate=0.6,
                                              max_num_segments=3, max_num_speakers=3)
    aug = TorchMultiSpeakerNoiseAugmentation(cfg)
    g = torch.Generator().manual_seed(0)
    B, L = 64, 1000
    audio, noise = torch.randn(B, L, generator=g) + 0.1, torch.randn(B, L, generator=g) + 0.1  # no exact zeros
    lens, nlens = torch.randint(400, L + 1, (B,), generator=g), torch.randint(50, L + 1, (B,), generator=g)
    t = torch.arange(L)
    audio, noise = audio * (t < lens[:, None]), noise * (t < nlens[:, None])
    out, out_len = aug.augment_torch(audio, lens, noise, nlens, torch.Generator().manual_seed(1))
    applied = ~torch.all(out == noise, dim=1)
    assert abs(applied.float().mean().item() - 0.6) < 0.2
    for b in torch.nonzero(applied).flatten().tolist():
        n = int(lens[b])
        assert out_len[b] == n and torch.all(out[b, n:] == 0)
        frac = (out[b, :n] != 0).float().mean().item()
        assert 0.3 - 2 / n <= frac <= 0.6 + 2 / n
        snr = 10 * torch.log10(audio[b, :n].square().mean() / out[b, :n].square().mean()).item()
        assert -5.001 <= snr <= 20.001
    assert torch.equal(out_len[~applied], nlens[~applied])
    again, _ = aug.augment_torch(audio, lens, noise, nlens, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


@pytest.mark.parametrize("n,k", [(1, 1), (1, 64000), (2, 7), (3, 1000), (5, 12345), (7, 3)])
@pytest.mark.parametrize("seed", [0, 1234])
def test_fast_segment_lengths_equal_python_choices(n, k, seed):
    from nest_ssl.data.augmentation import _segment_lengths
    fast, slow = random.Random(seed), random.Random(seed)
    fast.random(), slow.random()  # not at the start of the stream
    want = list(Counter(slow.choices(range(n), k=k)).values())
    assert _segment_lengths(fast, n, k) == want
    assert fast.getstate() == slow.getstate()  # every later draw (starts, ratios, speakers) stays NeMo's
    assert fast.random() == slow.random()

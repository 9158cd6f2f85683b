"""Collate + batch augmentor (CPU path) against NeMo 2.6.2's recorded augmentation on a 4-utterance batch."""
import json
import random

import numpy as np
import pytest
import torch

from conftest import PARITY
from nest_ssl.data.augmentation import MultiSpeakerNoiseAugmentation, MultiSpeakerNoiseAugmentationConfig
from nest_ssl.data.batch import AudioNoiseItem
from nest_ssl.data.dataset import AudioNoiseCollate

ARR = np.load(PARITY / "nest_tiny" / "augmentation.npz")
META = json.loads((PARITY / "nest_tiny" / "augmentation.json").read_text())
TRIALS = {t["tag"]: t for t in META["trials"]}


def items():
    """The batch as the dataset hands it over: unpadded audio and noise clips (noise_len may be < audio_len)."""
    out = []
    for i, (la, ln) in enumerate(zip(ARR["audio_lengths"], ARR["noise_lengths"])):
        out.append(AudioNoiseItem(sample_id=str(i), audio=torch.from_numpy(ARR["audio"][i, :la]), audio_len=int(la),
                                  noise=torch.from_numpy(ARR["noise"][i, :ln]), noise_len=int(ln)))
    return out


def test_collate_pads_like_nemo():
    batch, bad = AudioNoiseCollate()(items())
    assert bad == [] and batch.audio.dtype == torch.float32 and batch.audio_len.dtype == torch.int64
    np.testing.assert_array_equal(batch.audio.numpy(), ARR["audio"])
    np.testing.assert_array_equal(batch.noise.numpy(), ARR["noise"])
    np.testing.assert_array_equal(batch.noise_len.numpy(), ARR["noise_lengths"])
    np.testing.assert_array_equal(batch.noisy_audio_len.numpy(), ARR["audio_lengths"])  # no augmentor: audio_len


@pytest.mark.parametrize("tag", sorted(TRIALS))
def test_collate_with_augmentor_equals_nemo(tag):
    trial = TRIALS[tag]
    cfg = {k: v for k, v in META["configs"][trial["config"]].items() if k != "_target_"}
    aug = MultiSpeakerNoiseAugmentation(MultiSpeakerNoiseAugmentationConfig(**cfg))
    collate = AudioNoiseCollate(lambda b, _rng: aug(b, random.Random(trial["seed"])))  # NeMo's seeded global RNG
    batch, _ = collate(items())
    np.testing.assert_array_equal(batch.noise.numpy(), ARR[f"{tag}.noise_out"])
    np.testing.assert_array_equal(batch.noise_len.numpy(), ARR[f"{tag}.noise_lengths_out"])
    np.testing.assert_array_equal(batch.noisy_audio_len.numpy(), ARR[f"{tag}.noisy_audio_lengths"])
    np.testing.assert_array_equal(batch.noisy_audio.numpy(), ARR["audio"] + ARR[f"{tag}.noise_out"])

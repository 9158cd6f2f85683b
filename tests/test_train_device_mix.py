"""`augment_on_device`: the collate hands over clean audio + noise and the train/validation step mixes them."""
from pathlib import Path

import numpy as np
import torch

from nest_ssl.data.batch import AudioNoiseBatch
from nest_ssl.data.loader import mix_on_device
from nest_ssl.run_config import load_config
from nest_ssl.train import train
from tests.train_support import make_data

ROOT = Path(__file__).resolve().parents[1]


def test_plain_mix_is_audio_plus_noise_with_the_audio_length():
    lens = torch.tensor([4, 3])
    batch = AudioNoiseBatch(audio=torch.ones(2, 4), audio_len=lens, noise=torch.full((2, 4), 0.5),
                            noise_len=torch.tensor([2, 3]))
    out = mix_on_device(batch, generator=None)
    assert torch.equal(out.noisy_audio, torch.full((2, 4), 1.5)) and torch.equal(out.noisy_audio_len, lens)


def test_training_with_on_device_noise_mixing_runs(tmp_path):
    data = make_data(tmp_path / "data")
    plain, _ = load_config(ROOT / "configs" / "nest_tiny_cpu.yaml", [
        f"model.train_ds.manifest_filepath={data['train']}", f"model.train_ds.noise_manifest={data['noise']}",
        f"model.validation_ds.manifest_filepath={data['val']}", f"model.validation_ds.noise_manifest={data['noise']}",
        "++model.train_ds.augment_on_device=true", "++model.validation_ds.augment_on_device=true",
        f"exp_manager.exp_dir={tmp_path / 'exp'}", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "model.train_ds.batch_size=2", "model.validation_ds.batch_size=2"])
    out = train(plain)
    assert len(out["losses"]) == 2 and all(np.isfinite(out["losses"])) and np.isfinite(out["val_loss"])

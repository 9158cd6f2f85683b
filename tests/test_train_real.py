"""The real tiny NEST model (configs/nest_tiny_cpu.yaml) through train(): smoke run + bit-exact resume.

Dropout, dither, masking and noise augmentation all draw random numbers here, so this checks that every RNG
the real model uses is derived from (seed, step, rank) or restored from the checkpoint."""

from pathlib import Path

import pytest
import torch

from nest_ssl import checkpoint as ckpt
from nest_ssl.config import load_config
from nest_ssl.train import train
from tests.train_support import make_data

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data: dict, exp_dir, max_steps=4) -> dict:
    plain, _ = load_config(ROOT / "configs" / "nest_tiny_cpu.yaml", [
        f"model.train_ds.manifest_filepath={data['train']}", f"model.train_ds.noise_manifest={data['noise']}",
        f"model.validation_ds.manifest_filepath={data['val']}", f"model.validation_ds.noise_manifest={data['noise']}",
        f"exp_manager.exp_dir={exp_dir}", f"trainer.max_steps={max_steps}", "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1", "model.train_ds.batch_size=2", "model.validation_ds.batch_size=2"])
    return plain


@pytest.mark.slow
def test_real_model_resume_is_bit_exact(tmp_path):
    data = make_data(tmp_path / "demo")
    full = train(tiny_config(data, tmp_path / "a"))
    first = train(tiny_config(data, tmp_path / "b"), stop_after_steps=3)  # last checkpoint at step 2
    rest = train(tiny_config(data, tmp_path / "b"))
    assert len(full["losses"]) == 4 and len(rest["losses"]) == 2
    assert first["losses"][:2] + rest["losses"] == full["losses"]
    assert full["val_loss"] == rest["val_loss"]
    run = tmp_path / "a" / "SSL-NEST-tiny-cpu"
    assert (run / "checkpoints" / "SSL-NEST-tiny-cpu.nemo").is_file() and list(run.glob("version_0/events.*"))
    a = ckpt.load(next((run / "checkpoints").glob("*-last.ckpt")))
    b = ckpt.load(next((tmp_path / "b" / "SSL-NEST-tiny-cpu" / "checkpoints").glob("*-last.ckpt")))
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())

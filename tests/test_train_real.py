"""The real tiny NEST model (configs/nest_tiny_cpu.yaml) through train(): smoke run + bit-exact resume.

Dropout, dither, masking and noise augmentation all draw random numbers here, so this checks that every RNG
the real model uses is derived from (seed, step, rank) or restored from the checkpoint."""

import contextlib
from pathlib import Path
from unittest import mock

import pytest
import torch

from nest_ssl import checkpoint as ckpt
from nest_ssl.nest.model import EncDecDenoiseMaskedTokenPredModel
from nest_ssl.run_config import load_config
from nest_ssl.train import train
from tests.train_support import Crash, make_data

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def crash_in_step(n: int):
    """The real model's training_step raises Crash on its n-th call (a kill -9 in that step: nothing is saved)."""
    real, calls = EncDecDenoiseMaskedTokenPredModel.training_step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Crash(f"simulated kill in training_step call {n}")
        return real(self, *args, **kwargs)

    with mock.patch.object(EncDecDenoiseMaskedTokenPredModel, "training_step", step):
        yield


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
    with crash_in_step(4), pytest.raises(Crash):  # dies after step 3, the last checkpoint is step 2's
        train(tiny_config(data, tmp_path / "b"))
    rest = train(tiny_config(data, tmp_path / "b"))
    assert len(full["losses"]) == 4 and rest["losses"] == full["losses"][2:]
    assert full["val_loss"] == rest["val_loss"]
    run = tmp_path / "a" / "SSL-NEST-tiny-cpu"
    assert (run / "checkpoints" / "SSL-NEST-tiny-cpu.nemo").is_file() and list(run.glob("version_0/events.*"))
    a = ckpt.load(next((run / "checkpoints").glob("*-last.ckpt")))
    b = ckpt.load(next((tmp_path / "b" / "SSL-NEST-tiny-cpu" / "checkpoints").glob("*-last.ckpt")))
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


@pytest.mark.slow
def test_trainer_compile_trains_like_eager(tmp_path):
    data = make_data(tmp_path / "demo")
    eager = train(tiny_config(data, tmp_path / "a", max_steps=2))
    cfg = tiny_config(data, tmp_path / "b", max_steps=2)
    cfg["trainer"].update(compile=True, compile_backend="aot_eager")
    compiled = train(cfg)
    assert len(compiled["losses"]) == 2
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=1e-4, atol=0)
    a = ckpt.load(next((tmp_path / "a" / "SSL-NEST-tiny-cpu" / "checkpoints").glob("*-last.ckpt")))
    b = ckpt.load(next((tmp_path / "b" / "SSL-NEST-tiny-cpu" / "checkpoints").glob("*-last.ckpt")))
    assert list(a["state_dict"]) == list(b["state_dict"])  # compiling never renames a key


def test_trainer_compile_without_encoder_is_a_config_error():
    from nest_ssl.train import compile_encoder
    with pytest.raises(ValueError, match="trainer.compile=true: Linear has no Conformer encoder"):
        compile_encoder(torch.nn.Linear(2, 2), "aot_eager")


def test_fit_scan_leaves_the_run_unchanged_and_names_the_setting_on_oom(tmp_path, monkeypatch):
    data = make_data(tmp_path / "demo")
    plain = train(tiny_config(data, tmp_path / "a", max_steps=2))
    cfg = tiny_config(data, tmp_path / "b", max_steps=2)
    cfg["trainer"]["fit_scan"] = True
    scanned = train(cfg)
    assert scanned["losses"] == plain["losses"]  # BatchNorm statistics restored, gradients cleared
    a = ckpt.load(next((tmp_path / "a" / "SSL-NEST-tiny-cpu" / "checkpoints").glob("*-last.ckpt")))
    b = ckpt.load(next((tmp_path / "b" / "SSL-NEST-tiny-cpu" / "checkpoints").glob("*-last.ckpt")))
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())

    from nest_ssl.nest import model as models

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(models.EncDecDenoiseMaskedTokenPredModel, "training_step", oom)
    cfg = tiny_config(data, tmp_path / "c", max_steps=2)
    cfg["trainer"]["fit_scan"] = True
    with pytest.raises(MemoryError, match=r"largest batch \(2 x .* lower model.train_ds.batch_size"):
        train(cfg)


def test_largest_batch_from_batch_size_or_duration_budget():
    from types import SimpleNamespace

    from nest_ssl.fit_scan import largest_batch
    loader = SimpleNamespace(dataset=SimpleNamespace(durations=lambda: [3.0, None, 12.5, 7.0]))
    assert largest_batch(loader, SimpleNamespace(batch_size=8, batch_duration=None, max_duration=20.0)) == (8, 12.5)
    assert largest_batch(loader, SimpleNamespace(batch_size=1, batch_duration=100.0, max_duration=None)) == (8, 12.5)
    empty = SimpleNamespace(dataset=SimpleNamespace(durations=lambda: [None]))
    with pytest.raises(ValueError, match="max_duration"):
        largest_batch(empty, SimpleNamespace(batch_size=8, batch_duration=None, max_duration=None))


@pytest.mark.slow
def test_training_continues_from_a_nemo_written_ckpt(tmp_path):
    """NeMo's own 3-step .ckpt -> our checkpoint (AdamW state, step, scheduler) -> train() resumes at step 3."""
    from nest_ssl import export, nemo_io

    nemo_ckpt = ROOT / "tests" / "fixtures" / "nemo_files" / "nest_tiny_train-last.ckpt"
    resume = export.to_training_checkpoint(nemo_ckpt, tmp_path / "from_nemo-last.ckpt")
    nemo_cfg = nemo_io.read_ptl_checkpoint(nemo_ckpt)["hyper_parameters"]["cfg"]
    cfg = tiny_config(make_data(tmp_path / "demo"), tmp_path / "run", max_steps=5)
    cfg["model"].update({k: v for k, v in nemo_cfg.items() if k not in ("train_ds", "validation_ds")})
    cfg["exp_manager"]["resume_from_checkpoint"] = str(resume)
    out = train(cfg)
    assert len(out["losses"]) == 2 and all(torch.isfinite(torch.tensor(out["losses"])))  # steps 3 and 4
    last = ckpt.load(next((tmp_path / "run" / "SSL-NEST-tiny-cpu" / "checkpoints").glob("*-last.ckpt")))
    assert last["global_step"] == 5 and last["scheduler"]["last_epoch"] == 5
    start = ckpt.load(resume)
    moved = [k for k, v in start["state_dict"].items() if not torch.equal(v, last["state_dict"][k])]
    assert "encoder.layers.0.feed_forward1.linear1.weight" in moved and "quantizer.codebooks" not in moved

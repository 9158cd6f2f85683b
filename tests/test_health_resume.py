"""A resumed run logs the same health metrics as an uninterrupted one: context_gain's running code-prior histogram
(HealthMonitor.prior_hist, all-reduced, saved once) and the last told context state travel in the checkpoint, the
single-file one (ddp) and the sharded one (fsdp, one process: still a .dcp directory). A checkpoint without them
resumes with an empty histogram and says so in one line.

Fails when the histogram is not saved or not restored: after the resume the prior is the new window's targets only,
so health/context_gain and val_health/context_gain at steps 3-4 differ from the uninterrupted run's, and with
context_warmup_steps 0 the context line (`predicting the code prior only` / `context learned`) is told again."""
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nest_ssl import checkpoint as ckpt
from nest_ssl.run_config import load_config
from nest_ssl.train import train
from tests.train_support import make_data

ROOT = Path(__file__).resolve().parents[1]
TAGS = ("health/context_gain", "health/context_gain_0", "health/masked_loss_1", "val_health/context_gain")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("demo"))


def config(data: dict, exp_dir, max_steps: int, strategy: str) -> dict:
    plain, _ = load_config(ROOT / "configs" / "nest_tiny_cpu.yaml", [
        f"model.train_ds.manifest_filepath={data['train']}", f"model.train_ds.noise_manifest={data['noise']}",
        f"model.validation_ds.manifest_filepath={data['val']}", f"model.validation_ds.noise_manifest={data['noise']}",
        f"exp_manager.exp_dir={exp_dir}", f"trainer.max_steps={max_steps}", "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1", "model.train_ds.batch_size=2", "model.validation_ds.batch_size=2",
        f"trainer.strategy={strategy}", "+trainer.health.context_warmup_steps=0",
        "exp_manager.checkpoint_callback_params.save_top_k=0",
        "exp_manager.checkpoint_callback_params.always_save_nemo=false"])
    return plain


def logged(run_dir: Path, version: int, steps: range) -> dict:
    events = EventAccumulator(str(run_dir / f"version_{version}")).Reload()
    return {tag: [e.value for e in events.Scalars(tag) if e.step in steps] for tag in TAGS}


def context_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "context_gain=" in line and int(line.split()[1][:-1]) > 2]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_resumed_run_logs_the_same_context_gain_as_an_uninterrupted_one(data, tmp_path, capsys, strategy):
    whole = Path(train(config(data, tmp_path / "whole", 4, strategy))["log_dir"])
    whole_lines = context_lines(capsys.readouterr().out)
    train(config(data, tmp_path / "split", 2, strategy))
    capsys.readouterr()
    split = Path(train(config(data, tmp_path / "split", 4, strategy))["log_dir"])
    split_lines = context_lines(capsys.readouterr().out)
    expected, got = logged(whole, 0, range(3, 5)), logged(split, 1, range(3, 5))  # the resumed run: version_1
    assert all(len(v) == (1 if k.startswith("val") else 2) for k, v in expected.items()), expected
    assert got == expected  # the same float64 sums in the same order: equal, not close
    assert split_lines == whole_lines


def test_a_checkpoint_without_health_state_resumes_with_an_empty_prior_and_one_line(data, tmp_path, capsys):
    cfg = config(data, tmp_path / "old", 2, "ddp")
    train(cfg)
    (last,) = (tmp_path / "old" / "SSL-NEST-tiny-cpu" / "checkpoints").glob("*-last.ckpt")
    saved = ckpt.load(last)
    assert saved["health"]["prior_hist"]["train"].shape == (2, 64)  # 2 codebooks of 64 codes
    del saved["health"]  # as written before the health state was saved
    torch.save(saved, last)
    capsys.readouterr()
    train(config(data, tmp_path / "old", 3, "ddp"))
    out = capsys.readouterr().out
    assert out.count("has no health state") == 1, out

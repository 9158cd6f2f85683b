"""Epochs that cannot make progress and validation under DDP: every validation item counts exactly once across
ranks, an empty validation set or an epoch without a training batch stops at start-up with the numbers."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp

from nest_ssl import checkpoint as ckpt
from nest_ssl.config import from_dict
from nest_ssl.data import build_dataloader
from nest_ssl.data.config import DatasetConfig
from nest_ssl.train import REQUEUE_EXIT_CODE
from tests.train_support import ddp_worker, free_port, make_data, run_config, train_tiny

SR = 16000


def write_corpus(root: Path, n: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / f"u{i}.wav"
        sf.write(str(path), np.random.default_rng(i).uniform(-0.5, 0.5, SR + 160 * i).astype(np.float32), SR)
        rows.append(json.dumps({"audio_filepath": str(path), "duration": (SR + 160 * i) / SR}))
    (root / "m.json").write_text("\n".join(rows) + "\n")
    return str(root / "m.json")


def ds(manifest: str, **kw) -> DatasetConfig:
    return from_dict(DatasetConfig, {"manifest_filepath": manifest, "num_workers": 0, **kw}, "model.train_ds")


def items_seen(loader) -> list[float]:
    return [round(float(n) / SR, 4) for b in loader for n in b.audio_len]


@pytest.mark.parametrize("n,batch,world", [(5, 2, 2), (2, 4, 2), (7, 3, 3), (5, 2, 1)])
def test_validation_items_count_exactly_once_across_ranks(tmp_path, n, batch, world):
    m = write_corpus(tmp_path, n)
    seen = [d for r in range(world)
            for d in items_seen(build_dataloader(ds(m, batch_size=batch), rank=r, world_size=world, is_train=False))]
    assert sorted(seen) == [round((SR + 160 * i) / SR, 4) for i in range(n)]


def test_training_batches_stay_equal_per_rank(tmp_path):
    m = write_corpus(tmp_path, 5)
    lens = [len(build_dataloader(ds(m, batch_size=2), rank=r, world_size=2, is_train=True)) for r in range(2)]
    assert lens == [1, 1]  # 3 global batches (the last one wrapped around), cut to 2: no DDP rank waits alone


@pytest.mark.parametrize("n,batch,drop_last,world,numbers", [
    (3, 4, True, 1, "3 items with batch_size=4, drop_last=True give 0 batch(es)"),
    (4, 4, False, 2, "on each rank: 4 items with batch_size=4, drop_last=False give 1 batch(es), cut to a multiple "
                     "of the world size 2"),
])
def test_zero_training_batches_per_epoch_is_a_startup_error(tmp_path, n, batch, drop_last, world, numbers):
    m = write_corpus(tmp_path, n)
    with pytest.raises(ValueError, match="model.train_ds: 0 training batches per epoch") as err:
        build_dataloader(ds(m, batch_size=batch, drop_last=drop_last), rank=0, world_size=world, is_train=True)
    assert numbers in str(err.value)


def test_empty_validation_set_is_a_startup_error(tmp_path):
    m = write_corpus(tmp_path, 3)
    with pytest.raises(ValueError, match="model.validation_ds: 0 validation batches per epoch: 3 items"):
        build_dataloader(ds(m, batch_size=4, drop_last=True), is_train=False)


def test_train_with_zero_batches_per_epoch_stops_before_any_work(tmp_path):
    data = make_data(tmp_path / "demo")
    cfg = run_config(data, tmp_path / "exp", batch_size=32)  # 16 files
    cfg["model"]["train_ds"]["drop_last"] = True
    with pytest.raises(ValueError, match="0 training batches per epoch: .* items with batch_size=32"):
        train_tiny(cfg)
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_ddp_validation_with_fewer_batches_than_ranks_equals_single_process(tmp_path):
    """One validation batch, two ranks: rank 1 has nothing to validate; the all-reduced loss is rank 0's batch."""
    data = make_data(tmp_path / "demo")
    cfgs = {}
    for run, batch in (("ddp", 2), ("one", 4)):
        cfgs[run] = run_config(data, tmp_path / run, batch_size=batch, shuffle=False, max_steps=2, val_every=2)
        cfgs[run]["model"]["validation_ds"]["batch_size"] = 4  # the 4 validation files: one batch
    mp.spawn(ddp_worker, args=(2, free_port(), cfgs["ddp"], str(tmp_path)), nprocs=2, join=True)
    single = train_tiny(cfgs["one"])
    state = ckpt.load(next(Path(tmp_path, "ddp", "tiny", "checkpoints").glob("*-last.ckpt")))
    assert state["train_state"]["topk"][0][0] == pytest.approx(single["val_loss"], rel=1e-5) and single["val_loss"] > 0
    assert torch.isfinite(torch.tensor(single["val_loss"]))


def test_a_signal_during_skipped_steps_is_answered(tmp_path):
    """Every optimizer step is non-finite (skipped): the preemption signal must still end the run."""
    data = make_data(tmp_path / "demo")
    cfg = run_config(data, tmp_path / "exp", max_steps=100, val_every=100, max_nonfinite_steps=1000, max_epochs=3)
    res = train_tiny(cfg, nan_after=0, signal_at=2)
    assert res["exit_code"] == REQUEUE_EXIT_CODE and res["step"] == 0 and res["skipped_steps"] == 2


@pytest.mark.parametrize("devices,world,noted", [(1, 2, False), (-1, 2, False), (8, 2, True), (2, 2, False)])
def test_devices_note_only_when_an_explicit_multi_device_request_is_not_met(devices, world, noted):
    from nest_ssl.distributed import devices_note
    from nest_ssl.run_config import TrainerConfig

    assert (devices_note(TrainerConfig(devices=devices), world) is not None) == noted

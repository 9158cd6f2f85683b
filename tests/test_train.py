"""CPU tests of the training loop with a tiny stand-in model (tests/train_support.py): exact resume,
accumulation, preemption, config errors, non-finite steps, checkpoint fallback."""

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from nest_ssl import checkpoint as ckpt
from nest_ssl.config import ConfigError
from nest_ssl.train import REQUEUE_EXIT_CODE, NonFiniteError
from tests.train_support import Crash, make_data, run_config, train_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("demo"))


def last_ckpt(exp_dir) -> Path:
    (path,) = Path(exp_dir, "tiny", "checkpoints").glob("*-last.ckpt")
    return path


def test_resume_after_kill_is_bit_exact(data, tmp_path):
    model = dict(dropout=0.2, use_generator=True)  # dropout + generator draws: every RNG must be restored
    full = train_tiny(run_config(data, tmp_path / "a"), **model)
    with pytest.raises(Crash):  # dies in step 6 (after the step-4 validation checkpoint)
        train_tiny(run_config(data, tmp_path / "b"), crash_at=6, **model)
    assert ckpt.load(last_ckpt(tmp_path / "b"))["global_step"] == 4
    rest = train_tiny(run_config(data, tmp_path / "b"), **model)
    assert len(full["losses"]) == 6 and rest["losses"] == full["losses"][4:]  # bit for bit
    a, b = ckpt.load(last_ckpt(tmp_path / "a")), ckpt.load(last_ckpt(tmp_path / "b"))
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    scores = [[{**s, "topk": [score for score, _ in s["topk"]]}] for s in (a["train_state"], b["train_state"])]
    assert scores[0] == scores[1]  # the whole TrainState; top-k files by score (the run directories differ)


def test_resume_across_epochs(data, tmp_path):
    """16 files / batch 4 = 4 batches per epoch: the kill comes in the first step of epoch 2, after the
    checkpoint at the end of epoch 1, and the resume starts epoch 2 from its first batch."""
    model = dict(dropout=0.1)
    full = train_tiny(run_config(data, tmp_path / "a", max_steps=10, val_every=3), **model)
    with pytest.raises(Crash):
        train_tiny(run_config(data, tmp_path / "b", max_steps=10, val_every=3), crash_at=9, **model)
    saved = ckpt.load(last_ckpt(tmp_path / "b"))
    assert saved["global_step"] == 8 and saved["epoch"] == 1 and saved["loader"]["start"] == 4
    rest = train_tiny(run_config(data, tmp_path / "b", max_steps=10, val_every=3), **model)
    assert len(full["losses"]) == 10 and rest["losses"] == full["losses"][8:]


def test_grad_accumulation_equals_big_batch(data, tmp_path):
    small = train_tiny(run_config(data, tmp_path / "a", batch_size=4, accum=2, shuffle=False, max_steps=2, val_every=4))
    big = train_tiny(run_config(data, tmp_path / "b", batch_size=8, shuffle=False, max_steps=2, val_every=2))
    torch.testing.assert_close(torch.tensor(small["losses"]), torch.tensor(big["losses"]), rtol=1e-5, atol=1e-6)
    a, b = ckpt.load(last_ckpt(tmp_path / "a")), ckpt.load(last_ckpt(tmp_path / "b"))
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=1e-5, atol=1e-6)


def test_preemption_signal_checkpoints_and_returns_requeue_code(data, tmp_path):
    res = train_tiny(run_config(data, tmp_path, val_every=100), signal_at=3)
    assert res["exit_code"] == REQUEUE_EXIT_CODE and res["step"] == 3
    state = torch.load(last_ckpt(tmp_path), weights_only=True)
    assert state["global_step"] == 3 and state["loader"]["start"] == 3
    assert signal.getsignal(signal.SIGUSR1) is not None  # handler restored


def test_config_error_stops_before_any_work(data, tmp_path):
    cfg = run_config(data, tmp_path)
    cfg["trainer"]["max_stepz"] = 3
    with pytest.raises(ConfigError, match="max_stepz"):
        train_tiny(cfg)
    cfg = run_config(data, tmp_path)
    cfg["trainer"]["precision"] = "fp8"
    with pytest.raises(ValueError, match="precision"):
        train_tiny(cfg)
    assert not any(tmp_path.iterdir())


def test_nonfinite_steps_are_skipped_then_stop(data, tmp_path):
    cfg = run_config(data, tmp_path, max_nonfinite_steps=3, val_every=100)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        train_tiny(cfg, nan_after=2)
    saved = torch.load(tmp_path / "tiny" / "nonfinite_batch_rank0.pt", weights_only=True)
    assert saved["audio"].ndim == 2


def test_truncated_latest_checkpoint_falls_back(data, tmp_path):
    cfg = run_config(data, tmp_path, max_steps=4, val_every=2)
    cfg["exp_manager"]["checkpoint_callback_params"]["mode"] = "max"  # keep the step-2 top-k file around
    cfg["exp_manager"]["checkpoint_callback_params"]["save_top_k"] = 2
    train_tiny(cfg)
    last = last_ckpt(tmp_path)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    os.utime(last)  # newest file, but broken
    with pytest.warns(UserWarning, match="unreadable"):
        path, state = ckpt.load_latest(last.parent)
    assert path != last and state["global_step"] in (2, 4)


def test_tensorboard_and_checkpoint_layout(data, tmp_path):
    res = train_tiny(run_config(data, tmp_path, max_steps=2, val_every=2))
    run = tmp_path / "tiny"
    assert (run / "config.yaml").is_file() and list((run / "version_0").glob("events.out.tfevents.*"))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    stem = f"tiny--val_loss={res['val_loss']:.3f}-step=2"
    assert names == [f"{stem}-last.ckpt", f"{stem}.ckpt"]
    assert math.isfinite(res["val_loss"])


def test_preempt_file_requests_checkpoint_and_is_removed(data, tmp_path, monkeypatch):
    flag, marker = tmp_path / "preempt", tmp_path / "requeue"
    flag.touch()
    monkeypatch.setenv("NEST_PREEMPT_FILE", str(flag))
    monkeypatch.setenv("NEST_REQUEUE_MARKER", str(marker))  # what the sbatch files read after torchrun returns
    res = train_tiny(run_config(data, tmp_path / "exp", val_every=100))
    assert res["exit_code"] == REQUEUE_EXIT_CODE and res["step"] == 1 and not flag.exists()
    assert ckpt.load(last_ckpt(tmp_path / "exp"))["global_step"] == 1
    assert marker.read_text() == "checkpoint at step 1\n"


def test_a_run_that_ends_without_preemption_leaves_no_requeue_marker(data, tmp_path, monkeypatch):
    marker = tmp_path / "requeue"
    monkeypatch.setenv("NEST_REQUEUE_MARKER", str(marker))
    assert train_tiny(run_config(data, tmp_path / "exp", max_steps=1, val_every=100))["exit_code"] == 0
    assert not marker.exists()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16"])
def test_mixed_precision_runs_and_checkpoints_scaler(data, tmp_path, precision):
    res = train_tiny(run_config(data, tmp_path, max_steps=2, val_every=2, precision=precision))
    assert len(res["losses"]) == 2 and all(math.isfinite(v) for v in res["losses"])
    state = ckpt.load(last_ckpt(tmp_path))
    assert (state["scaler"] is not None) == (precision == "16-mixed")


def test_float_val_check_interval_and_max_epochs(data, tmp_path):
    """4 batches per epoch, val every half epoch, 2 epochs -> validations at steps 2, 4, 6, 8."""
    cfg = run_config(data, tmp_path, max_steps=-1, val_every=0.5, max_epochs=2)
    cfg["exp_manager"]["checkpoint_callback_params"]["save_top_k"] = -1
    res = train_tiny(cfg)
    assert res["step"] == 8 and res["epoch"] == 2
    steps = sorted(int(p.stem.split("step=")[1]) for p in (tmp_path / "tiny" / "checkpoints").glob("*[0-9].ckpt"))
    assert steps == [2, 4, 6, 8]


def _with_bad_files(data, root) -> dict:
    """The demo train manifest plus a missing and a corrupt file (both 1 s)."""
    import json
    root.mkdir(parents=True, exist_ok=True)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00not audio at all" * 10)
    rows = Path(data["train"]).read_text().splitlines()
    rows += [json.dumps({"audio_filepath": str(root / name), "duration": 1.0}) for name in ("gone.wav", "corrupt.wav")]
    (root / "train.json").write_text("\n".join(rows) + "\n")
    return {**data, "train": str(root / "train.json")}


def _bad_run(data, exp_dir, limit=None) -> dict:
    cfg = run_config(data, exp_dir, max_steps=4, val_every=100, accum=2)
    cfg["seed"] = 5  # with this seed the second bad file comes in the 2nd micro-batch of step 1
    if limit is not None:
        cfg["model"]["train_ds"]["max_bad_samples"] = limit
    return cfg


def test_bad_sample_limit_checkpoints_then_resume_matches_uninterrupted_run(data, tmp_path):
    bad_data = _with_bad_files(data, tmp_path / "data")
    model = dict(dropout=0.2, use_generator=True)
    cfg = _bad_run(bad_data, tmp_path / "a")
    full = train_tiny(cfg, **model)  # default limit (100): both files skipped and counted
    assert len(full["losses"]) == 4

    with pytest.raises(RuntimeError, match="exceed max_bad_samples=1") as info:
        train_tiny(_bad_run(bad_data, tmp_path / "b", limit=1), **model)
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert "saved to" in note and "max_bad_samples" in note
    state = ckpt.load(last_ckpt(tmp_path / "b"))
    done = state["global_step"]
    assert done == 1 and state["loader"]["start"] == 2  # the half-done step 1 (batches 2, 3) is read again
    assert {p.split("/")[-1] for p, _ in state["loader"]["bad_samples"]} == {"gone.wav", "corrupt.wav"}

    rest = train_tiny(_bad_run(bad_data, tmp_path / "b"), **model)  # limit back to 100: it goes on
    assert rest["losses"] == full["losses"][done:]  # bit for bit, even after a half-accumulated step


def test_validation_data_error_checkpoints_the_steps_done(data, tmp_path):
    bad_val = _with_bad_files({**data, "train": data["val"]}, tmp_path / "data")["train"]  # val + 2 bad files
    lines = [x for x in Path(bad_val).read_text().splitlines() if "gone.wav" not in x]  # missing: found at start-up
    Path(bad_val).write_text("\n".join(lines) + "\n")
    cfg = run_config({**data, "val": bad_val}, tmp_path / "a", max_steps=6, val_every=2)
    cfg["model"]["validation_ds"]["skip_bad_samples"] = False
    with pytest.raises(ValueError, match="corrupt.wav.*skip_bad_samples=false") as info:
        train_tiny(cfg)
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert "saved to" in note and "max_bad_samples" not in note  # raising the limit would not help here
    assert ckpt.load(last_ckpt(tmp_path / "a"))["global_step"] == 2  # the first validation came after step 2


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clip_gradients_returns_the_norm_before_clipping(algorithm):
    from nest_ssl.config import from_dict
    from nest_ssl.run_config import TrainerConfig
    from nest_ssl.train import clip_gradients

    model = torch.nn.Linear(3, 2)
    grads = [torch.tensor([[3.0, -0.2, 0.1], [0.0, 4.0, -5.0]]), torch.tensor([0.3, -2.0])]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    tc = from_dict(TrainerConfig, {"gradient_clip_val": 0.5, "gradient_clip_algorithm": algorithm}, "trainer")
    norm = clip_gradients(model, tc)
    full = torch.cat([g.flatten() for g in grads]).norm()
    assert norm == pytest.approx(float(full))
    for p, g in zip(model.parameters(), grads):
        want = g.clamp(-0.5, 0.5) if algorithm == "value" else g * (0.5 / (float(full) + 1e-6))
        torch.testing.assert_close(p.grad, want)


def test_train_loss_leaves_out_batches_without_a_masked_token(data, tmp_path):
    """A batch with no masked token has loss 0: the logged train_loss is the mean over the batches that had one,
    and no_token_batches counts the others (4 steps per log window; calls 2 and 3 have no token)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    res = train_tiny(run_config(data, tmp_path, max_steps=4, val_every=4, log_every_n_steps=4), no_token_at=(2, 3))
    events = EventAccumulator(str(tmp_path / "tiny" / "version_0")).Reload()
    assert res["losses"][1] == res["losses"][2] == 0.0 and min(res["losses"][0], res["losses"][3]) > 0
    (loss,) = events.Scalars("train_loss")
    assert loss.value == pytest.approx((res["losses"][0] + res["losses"][3]) / 2, rel=1e-6)
    assert [e.value for e in events.Scalars("no_token_batches")] == [2]


def test_val_check_interval_longer_than_an_epoch_counts_steps_across_epochs(data, tmp_path):
    """4 batches per epoch, val_check_interval 6: validations at steps 6 and 12 (NeMo refuses; ours: across
    epochs), never at the epoch ends 4 and 8."""
    cfg = run_config(data, tmp_path, max_steps=12, val_every=6)
    cfg["exp_manager"]["checkpoint_callback_params"]["save_top_k"] = -1
    res = train_tiny(cfg)
    assert res["step"] == 12
    steps = sorted(int(p.stem.split("step=")[1]) for p in (tmp_path / "tiny" / "checkpoints").glob("*[0-9].ckpt"))
    assert steps == [6, 12]


def test_val_check_interval_across_epochs_refuses_a_meaningless_epoch_setting(data, tmp_path):
    with pytest.raises(ValueError, match=r"val_check_interval=6 is more than the 4 batches.*check_val_every_n_epoch=2"):
        train_tiny(run_config(data, tmp_path, max_steps=12, val_every=6, check_val_every_n_epoch=2))
    with pytest.raises(ValueError, match=r"val_check_interval=0.5 is a fraction of an epoch"):
        train_tiny(run_config(data, tmp_path, val_every=0.5, check_val_every_n_epoch=None))

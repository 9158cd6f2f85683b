"""Checkpoint files: RNG round trip, weights_only loading, atomic writes, truncated-file fallback, names."""

import random

import numpy as np
import pytest
import torch

from nest_ssl import checkpoint as ckpt
from nest_ssl import dcp_checkpoint
from nest_ssl.config import from_dict
from nest_ssl.exp_manager import CheckpointWriter, ExpManagerConfig, TopK, format_name, log_dir


def test_rng_state_round_trips_through_weights_only_file(tmp_path):
    ckpt.atomic_save({"rng": ckpt.rng_state()}, tmp_path / "a.ckpt")
    before = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    ckpt.set_rng_state(ckpt.load(tmp_path / "a.ckpt")["rng"])  # weights_only=True inside
    after = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_atomic_save_leaves_no_temp_file(tmp_path):
    ckpt.atomic_save({"x": torch.ones(2)}, tmp_path / "sub" / "c.ckpt")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.ckpt"]


def test_truncated_newest_falls_back_with_warning(tmp_path):
    ckpt.atomic_save({"global_step": 2}, tmp_path / "run--val_loss=1.000-step=2.ckpt")
    ckpt.atomic_save({"global_step": 4}, tmp_path / "run--val_loss=2.000-step=4-last.ckpt")
    last = tmp_path / "run--val_loss=2.000-step=4-last.ckpt"
    last.write_bytes(last.read_bytes()[:40])
    with pytest.warns(UserWarning, match="unreadable"):
        path, state = ckpt.load_latest(tmp_path)
    assert state["global_step"] == 2 and path.name.endswith("step=2.ckpt")


def test_unfinished_marker_and_empty_dir(tmp_path):
    assert ckpt.load_latest(tmp_path / "missing") == (None, None)
    ckpt.atomic_save({"global_step": 1}, tmp_path / "a-last.ckpt")
    (tmp_path / "a-last.ckpt-unfinished").touch()
    assert ckpt.load_latest(tmp_path) == (None, None)


def test_nemo_filename_pattern():
    name = format_name("SSL-NEST--{val_loss:.3f}-{step}", "SSL-NEST", {"val_loss": 4.4312, "step": 3})
    assert name == "SSL-NEST--val_loss=4.431-step=3"  # Lightning's ModelCheckpoint name, as NeMo writes it
    with pytest.raises(ValueError, match="wer"):
        format_name("x--{wer:.2f}", "x", {"val_loss": 1.0})


def test_top_k_keeps_best():
    k = TopK(2, "min")
    best, dropped = k.add([], 3.0, "a")
    best, dropped2 = k.add(best, 1.0, "b")
    assert dropped == dropped2 == [] and k.better(best, 2.0) and not k.better(best, 4.0)
    best, dropped = k.add(best, 2.0, "c")
    assert dropped == ["a"] and [p for _, p in best] == ["b", "c"]
    assert not TopK(0, "min").better([], 1.0) and TopK(2, "max").add(best, 5.0, "d")[0][0] == [5.0, "d"]


def test_log_dir_layout(tmp_path):
    cfg = ExpManagerConfig(exp_dir=str(tmp_path), name="run", resume_if_exists=True)
    assert log_dir(cfg, "x") == tmp_path / "run"  # no version dir with resume_if_exists (NeMo)
    cfg = ExpManagerConfig(exp_dir=str(tmp_path), resume_if_exists=False, version="v1")
    assert log_dir(cfg, "x") == tmp_path / "x" / "v1"
    with pytest.raises(ValueError, match=r"exp_manager\.checkpoint_callback_params\.mode='best'"):
        from_dict(ExpManagerConfig, {"checkpoint_callback_params": {"mode": "best"}}, "exp_manager")


def _writer(tmp_path, save_top_k=2, mode="min"):
    model = torch.nn.Linear(2, 2)
    cfg = from_dict(ExpManagerConfig, {"checkpoint_callback_params": {"save_top_k": save_top_k, "mode": mode}})
    return CheckpointWriter(cfg, "run", tmp_path, {"model": {}}, True, model=model,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None, scaler=None)


def test_writer_keeps_one_last_file_and_the_top_k(tmp_path):
    writer, state = _writer(tmp_path), ckpt.TrainState()
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)]:
        state.step, state.last_val = step, val
        writer.save(state, {"epoch": 0, "start": step})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["run--val_loss=1.000-step=2.ckpt", "run--val_loss=2.000-step=3.ckpt",
                     "run--val_loss=5.000-step=4-last.ckpt"]
    assert [score for score, _ in state.topk] == [1.0, 2.0] and writer.saved_step == 4
    saved = ckpt.load(tmp_path / names[-1])
    assert saved["train_state"]["topk"] == state.topk and saved["loader"] == {"epoch": 0, "start": 4}


def test_tidy_keeps_sharded_top_k_directories(tmp_path):
    writer = _writer(tmp_path)
    kept = tmp_path / "run--val_loss=1.000-step=2.dcp"
    kept.mkdir()
    (kept / ".metadata").write_bytes(b"x"), (kept / dcp_checkpoint.TRAIN_STATE).write_bytes(b"x")
    (tmp_path / "run--val_loss=2.000-step=3.dcp").mkdir()  # a save killed before its commit: not complete
    state = ckpt.TrainState(topk=[[1.0, kept.name], [2.0, "run--val_loss=2.000-step=3.dcp"], [3.0, "gone.ckpt"]])
    writer.tidy(state)
    assert state.topk == [[1.0, kept.name]]


def test_writer_alone_rank_save_leaves_the_top_k_alone(tmp_path):
    writer, state = _writer(tmp_path), ckpt.TrainState(step=7, micro=1, last_val=0.5)
    path = writer.save(state, {"epoch": 1, "start": 2}, sync=False)
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.name.endswith("step=7-last.ckpt")
    assert state.topk == [] and ckpt.load(path)["train_state"]["micro"] == 0  # the loader position was rewound


def test_restore_returns_the_train_state_and_reads_older_files(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = ckpt.TrainState(step=5, epoch=1, last_val=0.25, bad_streak=2, skipped_steps=3, topk=[[0.25, "a.ckpt"]])
    saved = ckpt.state(model=model, optimizer=opt, scheduler=None, scaler=None, train_state=state, loader_state={},
                       config={})
    assert ckpt.restore(saved, model=model, optimizer=opt, scheduler=None, scaler=None) == state
    older = {k: v for k, v in saved.items() if k != "train_state"} | {"topk": {"best": [[0.25, "a.ckpt"]]}}
    assert ckpt.restore(older, model=model, optimizer=opt, scheduler=None, scaler=None) == \
        ckpt.TrainState(step=5, epoch=1, topk=[[0.25, "a.ckpt"]])

"""No collective waits forever: trainer.collective_timeout ends a run whose other rank is stuck, with an error naming
the rank and the phase, a non-zero exit and the last checkpoint intact, also when a preemption signal arrives while
the rank is blocked (2 gloo processes, tiny stand-in model, CPU)."""

import os
import signal
import time
from pathlib import Path

import pytest

from nest_ssl import checkpoint as ckpt
from tests.train_support import failing_worker, free_port, join_ranks, make_data, run_config, spawn_ranks

TIMEOUT = 5.0  # trainer.collective_timeout: long enough for two ranks started together to stay within it under load


def last_step(exp: Path) -> int:
    return ckpt.load(next(Path(exp, "tiny", "checkpoints").glob("*-last.ckpt")))["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize("stall,phase", [(("train", 3), "train step"), (("val", 2), "validation")])
def test_a_stuck_rank_ends_the_run_with_the_rank_and_phase(tmp_path, stall, phase):
    """Rank 1 is stuck longer than the timeout in step 3 or in the second validation (step 4); rank 0 waits in that
    phase's collective and stops after TIMEOUT, rank 1 then finds its peer gone. The step-2 checkpoint stays."""
    data = make_data(tmp_path / "demo")
    cfg = run_config(data, tmp_path / "exp", batch_size=2, shuffle=False, max_steps=4, val_every=2,
                     collective_timeout=TIMEOUT)
    kw = {1: {"stall_at": (*stall, TIMEOUT + 3)}}
    t0 = time.monotonic()
    codes = join_ranks(spawn_ranks(failing_worker, 2, (free_port(), cfg, str(tmp_path), kw)), limit=90)
    assert codes[0] != 0 and codes[1] != 0
    err0 = (tmp_path / "error_rank0.txt").read_text()
    assert err0.startswith(f"CollectiveError: rank 0: a collective in the {phase} failed or waited longer than "
                           f"trainer.collective_timeout={TIMEOUT:g} s"), err0
    assert "CollectiveError: rank 1:" in (tmp_path / "error_rank1.txt").read_text()
    assert time.monotonic() - t0 < 60
    assert last_step(tmp_path / "exp") == 2


@pytest.mark.slow
def test_a_slow_checkpoint_write_ends_the_waiting_rank_in_the_checkpoint_phase(tmp_path):
    """Rank 0's write of the step-4 checkpoint takes longer than the timeout; rank 1 waits at the save's barrier and
    stops naming the checkpoint phase. Rank 0's file is written whole (temp file + rename) before it finds its peer
    gone, so the newest checkpoint on disk is complete and readable."""
    data = make_data(tmp_path / "demo")
    cfg = run_config(data, tmp_path / "exp", batch_size=2, shuffle=False, max_steps=4, val_every=2,
                     collective_timeout=TIMEOUT)
    kw = {0: {"stall_save": (4, TIMEOUT + 3)}}
    codes = join_ranks(spawn_ranks(failing_worker, 2, (free_port(), cfg, str(tmp_path), kw)), limit=90)
    assert codes[0] != 0 and codes[1] != 0
    err1 = (tmp_path / "error_rank1.txt").read_text()
    assert err1.startswith("CollectiveError: rank 1: a collective in the checkpoint failed or waited longer than "
                           f"trainer.collective_timeout={TIMEOUT:g} s"), err1
    assert "CollectiveError: rank 0:" in (tmp_path / "error_rank0.txt").read_text()
    assert last_step(tmp_path / "exp") == 4


@pytest.mark.slow
def test_a_preemption_signal_while_blocked_still_ends_the_run_within_the_timeout(tmp_path):
    """SIGTERM to rank 0 while it waits in step 3's all-reduce for the stuck rank 1: the signal cannot interrupt
    the wait, but the timeout ends it; the error says no checkpoint was written for the signal."""
    data = make_data(tmp_path / "demo")
    cfg = run_config(data, tmp_path / "exp", batch_size=2, shuffle=False, max_steps=4, val_every=2,
                     collective_timeout=TIMEOUT)
    marker = tmp_path / "stalled"
    kw = {1: {"stall_at": ("train", 3, TIMEOUT + 3, str(marker))}}
    procs = spawn_ranks(failing_worker, 2, (free_port(), cfg, str(tmp_path), kw))
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and all(p.is_alive() for p in procs):
        time.sleep(0.05)
    assert marker.exists(), "rank 1 never reached its stall"
    time.sleep(1.0)  # rank 0 is in step 3's all-reduce by now
    os.kill(procs[0].pid, signal.SIGTERM)
    t_signal = time.monotonic()
    procs[0].join(TIMEOUT + 10)
    assert not procs[0].is_alive() and time.monotonic() - t_signal < TIMEOUT + 10
    codes = join_ranks(procs, limit=30)
    assert codes[0] != 0 and codes[1] != 0
    err0 = (tmp_path / "error_rank0.txt").read_text()
    assert "rank 0: a collective in the train step" in err0 and "a preemption signal came" in err0, err0
    assert last_step(tmp_path / "exp") == 2

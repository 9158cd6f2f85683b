"""A full disk under trainer.strategy=fsdp ends like the single-file path: every rank stops (none waits for a rank
whose write failed), exits 74 with one line `error: no space left on device writing PATH ...`, the partial
`.dcp.tmp` is removed and the previous complete `.dcp` checkpoint is intact and resumable. 2 gloo ranks through
scripts/pretrain.py's own error handling, exp_dir on a real small tmpfs (conftest.small_disk, as in
tests/test_disk_full.py; needs root, skipped otherwise). The stand-in model carries ~1 MB of frozen weights, so one
sharded checkpoint (top-k plus -last, ~2 MB) fits in 2.5 MB and the next one does not.

Fails when a DCP write's ENOSPC escapes as torch's CheckpointException (a traceback, exit 1), when a rank that
wrote its shard waits for one that failed (the run is killed after LIMIT seconds), when the `.dcp.tmp` is left
behind, or when the step-2 checkpoint does not resume."""

import contextlib
import os
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from nest_ssl import dcp_checkpoint, nemo_io
from nest_ssl.checkpoint import DISK_FULL_EXIT_CODE
from tests.train_support import TinyModel, free_port, join_ranks, make_data, pretrain_tiny, run_config, spawn_ranks

NEMO_FREE = 4_900_000  # the step-4 top-k .dcp fits, its .nemo does not (sizes in the test's docstring)
BALLAST = 250_000  # frozen float32 weights: ~1 MB per checkpoint (replicated: written once, by one rank)
LIMIT = 90  # seconds for a 2-rank run; collective_timeout 30 s makes a waiting rank fail well before


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("demo"))


def _tiny_nemo(model, model_cfg: dict, path):
    """exp_manager's save_nemo for the stand-in model (which has no NeMo target): the same nemo_io writer."""
    return nemo_io.write_nemo(path, {"target": "tiny"}, model.state_dict())


def _rank(rank: int, world: int, port: int, cfg: str, out: str, nemo: bool) -> None:
    """scripts/pretrain.py's main on this rank; its exit code is the process's, stdout/stderr go to out/. With nemo
    the always_save_nemo path reads the `.dcp` back into a fresh stand-in model and writes it with nemo_io."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with open(f"{out}/out{rank}.txt", "w") as so, open(f"{out}/err{rank}.txt", "w") as se, \
            contextlib.redirect_stdout(so), contextlib.redirect_stderr(se), contextlib.ExitStack() as stack:
        if nemo:
            from nest_ssl import exp_manager, nemo_compat

            stack.enter_context(mock.patch.object(nemo_compat, "build_model",
                                                  lambda model_cfg: TinyModel(ballast=BALLAST)))
            stack.enter_context(mock.patch.object(exp_manager, "save_nemo", _tiny_nemo))
        try:
            code = pretrain_tiny(["--config", cfg], ballast=BALLAST)
        except BaseException:  # an error pretrain.py does not turn into one line: its traceback, exit 1
            traceback.print_exc()
            code = 1
    sys.exit(code)


def run_two_ranks(data, exp: Path, tmp: Path, max_steps: int, async_save: bool = False,
                  nemo: bool = False) -> tuple[list, list, list]:
    """(exit codes, stdout texts, stderr texts) of a 2-rank fsdp run (async_save: only -last checkpoints, written in
    the background; nemo: always_save_nemo, rank 0 writes the best checkpoint's `.nemo`)."""
    cfg = run_config(data, exp, max_steps=max_steps, val_every=2, batch_size=2, strategy="fsdp",
                     collective_timeout=30.0)
    if async_save:
        cfg["exp_manager"]["checkpoint_callback_params"].update(async_save=True, monitor=None)
    cfg["exp_manager"]["checkpoint_callback_params"]["always_save_nemo"] = nemo
    tmp.mkdir(exist_ok=True)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    codes = join_ranks(spawn_ranks(_rank, 2, (free_port(), str(tmp / "cfg.yaml"), str(tmp), nemo)), LIMIT)
    return codes, *([(tmp / f"{kind}{r}.txt").read_text() for r in range(2)] for kind in ("out", "err"))


@pytest.mark.slow
@pytest.mark.parametrize("free, async_save", [(100_000, False), (100_000, True), (2_500_000, False)],
                         ids=["100K", "100K-async", "2.5M"])
def test_a_full_disk_under_fsdp_exits_74_on_every_rank_and_keeps_the_last_checkpoint(data, small_disk, tmp_path,
                                                                                       free, async_save):
    """100K: the first checkpoint does not fit (async: the -last one only, written in the background, the failure
    raised on every rank when it is waited for); 2.5M: the step-2 one fits, step 4's does not."""
    exp = small_disk(free)
    codes, _, errs = run_two_ranks(data, exp, tmp_path / "first", max_steps=4, async_save=async_save)
    assert codes == [DISK_FULL_EXIT_CODE] * 2, "\n".join(e[-3000:] for e in errs)
    for err in errs:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert "Traceback" not in err and len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"error: no space left on device writing {exp}"), lines[0]
    assert not [p for p in exp.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written
    ckpt_dir = exp / "tiny" / "checkpoints"
    kept = dcp_checkpoint.latest(ckpt_dir)
    if free < 2**20:  # not even the first checkpoint fits
        assert kept is None
        return
    assert kept is not None and dcp_checkpoint.read_train_state(kept)["global_step"] == 2
    subprocess.run(["mount", "-o", "remount,size=64m", str(exp)], check=True)  # space freed: resume
    codes, outs, errs = run_two_ranks(data, exp, tmp_path / "resume", max_steps=4)
    assert codes == [0, 0], errs
    assert "resumed at step 2" in outs[0] and "done: 4 steps (2 in this run" in outs[0], outs[0][-2000:]


@pytest.mark.slow
def test_a_full_disk_for_the_nemo_under_fsdp_exits_74_on_every_rank(data, small_disk, tmp_path):
    """always_save_nemo: rank 0 alone writes the best checkpoint's `.nemo` right after its `.dcp`. Measured: a
    `.dcp` is ~1.13 MB, the `.nemo` ~1.01 MB; step 2 writes top-k `.dcp` + `.nemo` + -last `.dcp` (3.3 MB), step 4
    (a better val_loss) its top-k `.dcp` (4.4 MB in all), then the `.nemo` temp file does not fit in 4.9 MB.

    Before the fix rank 0's ENOSPC left through pretrain.py's generic OSError line (`error: [Errno 28] No space
    left on device`, exit 1, not 74) and rank 1, already in the -last save's collective, failed there with a
    collective error (exit 1): no shared check covered the `.nemo`.

    Now that write takes part in the sharded save's shared check: exit 74 and one line on every rank, no `.tmp`
    left, the step-2 -last `.dcp` complete and the step-2 `.nemo` whole."""
    exp = small_disk(NEMO_FREE)
    codes, _, errs = run_two_ranks(data, exp, tmp_path / "first", max_steps=4, nemo=True)
    assert codes == [DISK_FULL_EXIT_CODE] * 2, "\n".join(e[-3000:] for e in errs)
    ckpt_dir = exp / "tiny" / "checkpoints"
    for err in errs:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert "Traceback" not in err and len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"error: no space left on device writing {ckpt_dir / 'tiny.nemo'}"), lines[0]
    assert not [p for p in exp.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written
    last = [p for p in ckpt_dir.glob("*-last.dcp") if dcp_checkpoint.is_complete(p)]
    assert len(last) == 1 and dcp_checkpoint.read_train_state(last[0])["global_step"] == 2, last
    step2 = dcp_checkpoint.read_weights(ckpt_dir / last[0].name.replace("-last", ""))[1]
    nemo = nemo_io.read_nemo(ckpt_dir / "tiny.nemo")[1]  # the step-2 one, whole
    assert nemo.keys() == step2.keys() and all(torch.equal(nemo[k], step2[k]) for k in nemo)

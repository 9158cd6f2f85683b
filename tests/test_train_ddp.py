"""A 2-process gloo DDP run equals the 1-process run on the union batch (tiny stand-in model, CPU)."""

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nest_ssl import checkpoint as ckpt
from nest_ssl.train import REQUEUE_EXIT_CODE
from tests.train_support import ddp_worker, free_port, make_data, run_config, train_tiny


@pytest.mark.slow
@pytest.mark.parametrize("batch,accum", [(2, 1), (1, 2)])  # accum 2: no_sync on the first micro-batch
def test_two_process_ddp_equals_single_process_union_batch(tmp_path, batch, accum):
    data = make_data(tmp_path / "demo")
    ddp_cfg = run_config(data, tmp_path / "ddp", batch_size=batch, accum=accum, shuffle=False, max_steps=3,
                         val_every=3 * accum)
    mp.spawn(ddp_worker, args=(2, free_port(), ddp_cfg, str(tmp_path)), nprocs=2, join=True)
    single = train_tiny(run_config(data, tmp_path / "one", batch_size=4, shuffle=False, max_steps=3, val_every=3))
    per_rank = [torch.load(tmp_path / f"losses_rank{r}.pt") for r in range(2)]
    ddp_mean = (torch.tensor(per_rank[0], dtype=torch.float64) + torch.tensor(per_rank[1], dtype=torch.float64)) / 2
    assert len(per_rank[0]) == len(single["losses"]) == 3
    torch.testing.assert_close(ddp_mean, torch.tensor(single["losses"], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    a = ckpt.load(next(Path(tmp_path, "ddp", "tiny", "checkpoints").glob("*-last.ckpt")))
    b = ckpt.load(next(Path(tmp_path, "one", "tiny", "checkpoints").glob("*-last.ckpt")))
    assert a["global_step"] == b["global_step"] == 3
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    # validation loss is all-reduced: the DDP run's val over both ranks' halves equals the single run's
    assert a["train_state"]["topk"][0][0] == pytest.approx(b["train_state"]["topk"][0][0], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("event", ["nan", "preempt"])
def test_an_event_on_one_rank_reaches_every_rank(tmp_path, event):
    """step_stats' one all-reduce: a non-finite loss or a preemption signal on rank 1 only acts on both ranks."""
    data = make_data(tmp_path / "demo")
    cfg = run_config(data, tmp_path / "ddp", batch_size=2, shuffle=False, max_steps=4, val_every=100)
    kw = {"nan": {"nan_at": (2,)}, "preempt": {"signal_at": 2}}[event]
    mp.spawn(ddp_worker, args=(2, free_port(), cfg, str(tmp_path), {1: kw}), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result_rank{r}.pt") for r in range(2)]
    assert results[0] == results[1]  # same decision on both ranks
    if event == "nan":  # the 2nd step is skipped everywhere; the run still makes its 4 steps
        assert results[0] == {"exit_code": 0, "step": 4, "skipped_steps": 1}
    else:  # both ranks checkpoint after step 2 and ask to be requeued
        assert results[0] == {"exit_code": REQUEUE_EXIT_CODE, "step": 2, "skipped_steps": 0}
        state = ckpt.load(next(Path(tmp_path, "ddp", "tiny", "checkpoints").glob("*-last.ckpt")))
        assert state["global_step"] == 2

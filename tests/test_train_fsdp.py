"""train() with trainer.strategy=fsdp on 2 gloo processes: the same losses and weights as ddp, sharded
checkpoints written in the background, and a resumed fsdp run that continues bit for bit."""
import math
import time

import pytest
import torch
import torch.multiprocessing as mp

from nest_ssl import checkpoint as ckpt
from nest_ssl import dcp_checkpoint
from tests.train_support import free_port, make_data, run_config, sequential_worker


@pytest.mark.slow
def test_fsdp_train_equals_ddp_and_resumes_bit_exact(tmp_path):
    data = make_data(tmp_path / "demo")
    kw = dict(batch_size=2, shuffle=False, val_every=2, gradient_clip_val=1.0)
    ddp = run_config(data, tmp_path / "ddp", max_steps=4, **kw)
    fsdp = run_config(data, tmp_path / "fsdp", max_steps=4, strategy="fsdp", **kw)
    fsdp["exp_manager"]["checkpoint_callback_params"]["async_save"] = True
    first = run_config(data, tmp_path / "resumed", max_steps=2, strategy="fsdp", **kw)
    resumed = run_config(data, tmp_path / "resumed", max_steps=4, strategy="fsdp", **kw)
    cfgs = [ddp, fsdp, first, resumed]
    mp.spawn(sequential_worker, args=(2, [free_port() for _ in cfgs], cfgs, str(tmp_path)), nprocs=2, join=True)

    def losses(run):
        return [torch.tensor(torch.load(tmp_path / f"run{run}_losses_rank{r}.pt")) for r in range(2)]

    for d, f in zip(losses(0), losses(1)):
        assert len(f) == 4
        torch.testing.assert_close(f, d, rtol=1e-5, atol=1e-6)
    for f, a, b in zip(losses(1), losses(2), losses(3)):  # 2 steps, then 2 more after the resume
        assert torch.equal(torch.cat([a, b]), f)

    d_state = ckpt.load(next((tmp_path / "ddp" / "tiny" / "checkpoints").glob("*-last.ckpt")))["state_dict"]
    fsdp_dir = tmp_path / "fsdp" / "tiny" / "checkpoints"
    last = dcp_checkpoint.latest(fsdp_dir)
    assert last.name.endswith("step=4-last.dcp") and not list(fsdp_dir.glob("*.tmp"))
    assert len(list(fsdp_dir.glob("*-last.dcp"))) == 1  # the step-2 one was deleted once step 4's was committed
    _, f_state = dcp_checkpoint.read_weights(last)
    r_state = dcp_checkpoint.read_weights(dcp_checkpoint.latest(tmp_path / "resumed" / "tiny" / "checkpoints"))[1]
    for k, v in d_state.items():
        torch.testing.assert_close(f_state[k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(r_state[k], f_state[k]), k


@pytest.mark.slow
def test_fsdp_validation_with_unequal_batches_per_rank_does_not_hang(tmp_path):
    """3 validation items on 2 ranks (batch 1): rank 0 runs 2 batches, rank 1 one. FSDP's per-forward collectives
    (here the BatchNorm statistics broadcast) must not hang (they did before validation ran the ranks in lockstep)."""
    data = make_data(tmp_path / "demo")
    lines = open(data["val"]).read().splitlines()[:3]
    data["val"] = str(tmp_path / "val3.json")
    open(data["val"], "w").write("\n".join(lines) + "\n")
    cfgs = [run_config(data, tmp_path / "fsdp", strategy="fsdp", batch_size=2, shuffle=False, max_steps=2,
                       val_every=2)]
    cfgs[0]["model"]["validation_ds"]["batch_size"] = 1
    ctx = mp.spawn(sequential_worker, args=(2, [free_port() for _ in cfgs], cfgs, str(tmp_path), {"batch_norm": True}),
                   nprocs=2, join=False)
    deadline = time.monotonic() + 600  # a hang (mismatched collectives) fails the test instead of blocking CI
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("fsdp validation with unequal batch counts per rank hung")
    vals = [torch.load(tmp_path / f"run0_val_rank{r}.pt") for r in range(2)]
    assert vals[0] == vals[1] and math.isfinite(vals[0])  # the all-reduced mean over the 3 items, on both ranks


def test_async_save_needs_fsdp(tmp_path):
    from tests.train_support import train_tiny

    cfg = run_config({"train": "x", "val": "x", "noise": "x"}, tmp_path)
    cfg["exp_manager"]["checkpoint_callback_params"]["async_save"] = True
    with pytest.raises(ValueError, match="async_save=true .* needs trainer.strategy=fsdp"):
        train_tiny(cfg)


def test_activation_checkpointing_needs_a_conformer_encoder(tmp_path):
    from tests.train_support import train_tiny

    data = make_data(tmp_path / "demo")
    cfg = run_config(data, tmp_path / "x", activation_checkpointing="full")
    with pytest.raises(ValueError, match="activation_checkpointing='full': TinyModel has no Conformer encoder"):
        train_tiny(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("batch_norm", [True, False], ids=["batch_norm", "layer_norm"])
def test_fsdp_trains_in_every_precision(tmp_path, batch_norm):
    """train() under fsdp on 2 gloo ranks in each precision fsdp accepts (16-mixed is refused: test below), with
    BatchNorm and LayerNorm (issue 30: bf16-mixed stopped in batch_norm with bf16 weights, fp32 statistics)."""
    data = make_data(tmp_path / "demo")
    precisions = ["bf16-mixed", "32"]
    cfgs = [run_config(data, tmp_path / p, strategy="fsdp", precision=p, batch_size=2, max_steps=2, val_every=2)
            for p in precisions]
    ctx = mp.spawn(sequential_worker, args=(2, [free_port() for _ in cfgs], cfgs, str(tmp_path),
                                            {"batch_norm": batch_norm}), nprocs=2, join=False)
    deadline = time.monotonic() + 300  # a hang fails the test instead of blocking CI
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"fsdp batch_norm={batch_norm} hung")
    for i, precision in enumerate(precisions):
        losses = torch.load(tmp_path / f"run{i}_losses_rank0.pt")
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (precision, losses)


def test_fsdp_refuses_16_mixed_at_config_time():
    from nest_ssl.run_config import build_run_config

    cfg = run_config({"train": "x", "val": "x", "noise": "x"}, "x", strategy="fsdp", precision="16-mixed")
    with pytest.raises(ValueError, match="trainer.precision='16-mixed' with trainer.strategy=fsdp; allowed: 32"):
        build_run_config(cfg)

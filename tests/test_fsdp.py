"""trainer.strategy: 2-process gloo FSDP2 training equals 1-process training on the union batch and 2-process DDP
(nest_tiny model, 3 AdamW steps with clipping); strategy spellings; precision policy."""
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from nest_ssl import fsdp
from tests.fsdp_support import single_run, strategy_worker
from tests.train_support import free_port


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    variants = [("fsdp", "layer_norm", 1, "none"), ("fsdp", "layer_norm", 2, "none"), ("fsdp", "batch_norm", 1, "none"),
                ("ddp", "batch_norm", 1, "none"), ("fsdp", "batch_norm", 1, "full")]
    mp.spawn(strategy_worker, args=(2, free_port(), str(out), variants), nprocs=2, join=True)

    def load(strategy, norm, accum, ckpt_mode="none"):
        runs = [np.load(out / f"{strategy}-{norm}-{accum}-{ckpt_mode}-rank{r}.npz") for r in range(2)]
        losses = (runs[0]["losses"] + runs[1]["losses"]) / 2
        weights = {k[2:]: runs[0][k] for k in runs[0].files if k.startswith("w/")}  # rank 0's full weights
        return losses, weights

    load.rank_stats = lambda strategy, rank: {  # a rank's own BatchNorm running statistics
        k[2:]: v for k, v in np.load(out / f"{strategy}-batch_norm-1-none-rank{rank}.npz").items() if k[:2] == "b/"}

    return load


# Gradients that are zero in exact arithmetic (a key bias shifts a softmax row; a conv bias before BatchNorm):
# AdamW turns their fp32 rounding noise into steps of up to lr, in any order of summation.
STRUCTURALLY_ZERO = ("self_attn.linear_k.bias", "conv.depthwise_conv.bias")
LR, STEPS = 1e-3, 3


def _assert_weights_close(got: dict, ref: dict):
    assert got.keys() == ref.keys()
    for k in ref:
        atol = 2e-6
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=atol, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])  # 2: the first micro-batch keeps gradients local and parameters gathered
def test_fsdp_equals_single_process_on_the_union_batch(two_process_runs, accum):
    losses, weights = two_process_runs("fsdp", "layer_norm", accum)
    ref_losses, ref_weights = single_run("layer_norm", accum=accum)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0] or not np.allclose(losses, losses[0])  # the weights did move
    _assert_weights_close(weights, ref_weights)


@pytest.mark.slow
def test_fsdp_equals_ddp_with_batchnorm(two_process_runs):
    """Local batch statistics, rank 0's running statistics (DDP's broadcast_buffers): same losses and weights."""
    f_losses, f_weights = two_process_runs("fsdp", "batch_norm", 1)
    d_losses, d_weights = two_process_runs("ddp", "batch_norm", 1)
    np.testing.assert_allclose(f_losses, d_losses, rtol=1e-5)
    _assert_weights_close(f_weights, d_weights)
    assert any("running_mean" in k for k in f_weights)
    # rank 1's statistics: rank 0's from before the last step, then updated with rank 1's own last batch
    f1, d1 = two_process_runs.rank_stats("fsdp", 1), two_process_runs.rank_stats("ddp", 1)
    f0 = two_process_runs.rank_stats("fsdp", 0)
    assert f1 and any(not np.allclose(f1[k], f0[k]) for k in f1)  # the ranks' last batches differ
    _assert_weights_close(f1, d1)


@pytest.mark.slow
def test_fsdp_with_activation_checkpointing_equals_without(two_process_runs):
    """The recompute inside a sharded layer gathers its parameters again; results are bit-identical."""
    a_losses, a_weights = two_process_runs("fsdp", "batch_norm", 1, "full")
    b_losses, b_weights = two_process_runs("fsdp", "batch_norm", 1, "none")
    np.testing.assert_array_equal(a_losses, b_losses)
    for k in b_weights:
        np.testing.assert_array_equal(a_weights[k], b_weights[k], err_msg=k)


@pytest.mark.parametrize("value,name,unused", [(None, "ddp", False), ("auto", "ddp", False), ("ddp", "ddp", False),
                                               ("ddp_find_unused_parameters_true", "ddp", True),
                                               ("ddp_find_unused_parameters_false", "ddp", False),
                                               ("fsdp", "fsdp", False)])
def test_strategy_spellings(value, name, unused):
    assert fsdp.parse_strategy(value) == fsdp.Strategy(name, unused)


@pytest.mark.parametrize("value", ["deepspeed", "fsdp2", "ddp_spawn", {"_target_": "x"}])
def test_unknown_strategy_names_the_allowed_ones(value):
    with pytest.raises(ValueError, match="allowed: .*'fsdp'"):
        fsdp.parse_strategy(value)


def test_precision_policy():
    assert fsdp.mixed_precision("bf16-mixed").param_dtype is torch.bfloat16
    assert fsdp.mixed_precision("bf16-mixed").reduce_dtype is torch.float32
    assert fsdp.mixed_precision(32).param_dtype is None
    with pytest.raises(ValueError, match="16-mixed"):
        fsdp.mixed_precision("16-mixed")

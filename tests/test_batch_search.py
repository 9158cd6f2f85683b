"""scripts/batch_search.py: the search on a fake `fits`, bins from each source and their one-line errors, the CPU
path end to end, a step that runs out of memory, and the memory model against a measured CPU step."""
import runpy
from pathlib import Path

import pytest
import torch
import yaml

from nest_ssl import batch_search as bs
from nest_ssl.estimate import saved_activation_bytes

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "nest_tiny_cpu.yaml")


def run_cli(argv, capsys) -> tuple[int, str, str]:
    main = runpy.run_path(str(ROOT / "scripts" / "batch_search.py"))["main"]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def pasted(out: str) -> dict:
    """The last two lines, read as the YAML they are meant to be pasted into."""
    return yaml.safe_load("\n".join(out.strip().splitlines()[-2:]))


# ---- the search ----------------------------------------------------------------------------------------------------
def test_search_finds_the_largest_fitting_batch_of_each_bucket():
    calls = []

    def fits(batch, seconds):  # 100 audio-seconds fit
        calls.append(batch)
        return batch * seconds <= 100

    assert bs.search(fits, [2.5, 5.0, 10.0, 20.0, 30.0], 4096, 1.0) == [40, 20, 10, 5, 3]
    # doubling then bisection: bucket 0 (answer 40) takes 1, 2, ..., 64 then 6 halvings; none tries past 4096
    assert calls[:8] == [1, 2, 4, 8, 16, 32, 64, 48] and max(calls) == 64 and len(calls) < 60


def test_search_never_lets_a_longer_bucket_take_a_larger_batch():
    capacity = {1.0: 10, 2.0: 50, 4.0: 3}  # a non-monotone fits: the bound keeps the sizes from increasing
    seen = []

    def fits(batch, seconds):
        seen.append((batch, seconds))
        return batch <= capacity[seconds]

    assert bs.search(fits, [1.0, 2.0, 4.0], 4096, 1.0) == [10, 10, 3]
    assert max(b for b, s in seen if s == 2.0) == 10  # bucket 1 was never tried above bucket 0's size


@pytest.mark.parametrize("upper", [1, 7, 64])
def test_search_stops_at_max_batch(upper):
    assert bs.search(lambda b, s: True, [1.0, 2.0], upper, 1.0) == [upper, upper]


def test_a_bucket_where_one_utterance_does_not_fit_is_named_with_its_duration_and_the_budget():
    with pytest.raises(ValueError, match=r"bucket 2 \(utterances up to 20 s\): not even a batch of 1 fits in the "
                                         r"7\.50 GiB budget"):
        bs.search(lambda b, s: b * s <= 12, [2.5, 10.0, 20.0], 4096, 7.5)


# ---- bins ----------------------------------------------------------------------------------------------------------
def test_num_buckets_gives_equal_width_bins_ending_at_max_duration(capsys):
    rc, out, err = run_cli([TINY, "--device", "cpu", "--memory", "0.5", "--num-buckets", "4"], capsys)
    assert rc == 0, err
    got = pasted(out)
    assert got["bucket_duration_bins"] == [1.375, 2.25, 3.125, 4.0]  # linspace(0.5, 4.0, 5)[1:]
    sizes = got["bucket_batch_size"]
    assert len(sizes) == 4 and all(isinstance(b, int) and b >= 1 for b in sizes) and sizes == sorted(sizes)[::-1]
    assert "estimated from the memory model (estimate.py), not measured" in out
    assert "budget 0.45 GiB per GPU (--memory 0.5 GiB less --margin 10%)" in out


def test_bins_come_from_the_flag_before_the_config_key_and_sizes_fit_the_budget(capsys):
    key = "++model.train_ds.bucket_duration_bins=[1.0, 3.0]"
    rc, out, err = run_cli([TINY, key, "--device", "cpu", "--memory", "0.2"], capsys)
    assert rc == 0, err
    assert pasted(out)["bucket_duration_bins"] == [1.0, 3.0]
    sizes = pasted(out)["bucket_batch_size"]
    plain, run, _ = bs.load_config(TINY, [])
    est = bs.EstimatedMemory(plain["model"], "32", "adamw", 1)
    budget = 0.2 * 0.9 * bs.GiB
    assert all(est(b, s) <= budget < est(b + 1, s) for b, s in zip(sizes, [1.0, 3.0]))  # each is the largest
    rc, out, err = run_cli([TINY, key, "--device", "cpu", "--memory", "0.2", "--bins", "2"], capsys)
    assert rc == 0, err
    assert pasted(out)["bucket_duration_bins"] == [2.0]


@pytest.mark.parametrize("argv,needle", [
    (["--bins", "2,1"], "--bins=[2.0, 1.0]: not strictly ascending (2 then 1)"),
    (["--bins", "1,1"], "--bins=[1.0, 1.0]: not strictly ascending"),
    (["--bins", "1,-2"], "--bins=[1.0, -2.0]: -2 is not a positive number of seconds"),
    (["--bins", "0"], "0 is not a positive number of seconds"),
    (["--bins", ""], "--bins=[]: give a non-empty list"),
    (["--bins", "1,x"], "--bins='1,x': give comma-separated seconds"),
    (["++model.train_ds.bucket_duration_bins=[5, 2]"], "model.train_ds.bucket_duration_bins=[5.0, 2.0]: not strictly"),
    (["++model.train_ds.bucket_duration_bins=[]"], "model.train_ds.bucket_duration_bins=[]: give a non-empty"),
    (["--num-buckets", "0"], "--num-buckets=0; must be >= 1"),
    (["model.train_ds.max_duration=null"], "model.train_ds.max_duration is not set"),
])
def test_bad_bins_are_one_line_naming_the_flag_or_key(argv, needle, capsys):
    rc, out, err = run_cli([TINY, "--device", "cpu", "--memory", "1", *argv], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_the_cpu_path_needs_a_memory_budget(capsys):
    rc, out, err = run_cli([TINY, "--device", "cpu"], capsys)
    assert rc == 1 and "--memory GiB is required with --device cpu" in err


# ---- the memory of one step ----------------------------------------------------------------------------------------
def test_activations_are_affine_in_the_batch():
    """EstimatedMemory counts two meta forwards per duration and extrapolates; the direct count agrees exactly."""
    plain, _, _ = bs.load_config(TINY, [])
    est = bs.EstimatedMemory(plain["model"], "32", "adamw", 1)
    for batch in (3, 7):
        assert est.activations(batch, 2.3) == saved_activation_bytes(est.model, batch, 2.3)


class _OutOfMemory(torch.nn.Module):
    def __init__(self, error):
        super().__init__()
        self.w, self.error = torch.nn.Parameter(torch.ones(3)), error

    def training_step(self, batch, generator=None, global_step=None):
        (self.w * 2).sum().backward()  # a gradient exists when the step fails
        raise self.error


def test_a_step_that_runs_out_of_memory_does_not_fit_and_leaves_no_gradient():
    model = _OutOfMemory(torch.OutOfMemoryError("CUDA out of memory"))
    assert bs.MeasuredMemory(model, torch.device("cpu"), None, 16000)(2, 1.0) is None
    assert model.w.grad is None
    model.error = RuntimeError("a bug, not a memory limit")  # only the out-of-memory type means "does not fit"
    with pytest.raises(RuntimeError, match="a bug"):
        bs.MeasuredMemory(model, torch.device("cpu"), None, 16000)(2, 1.0)


def test_the_memory_model_is_within_the_measured_cpu_step():
    """One fp32 step of the tiny config, 4 x 4 s, in a fresh process. Measured counts every storage the step
    allocates, a superset of what the model counts (weights, gradients, saved activations; the optimizer state is
    the same accounting on both sides), so measured / model >= 1 unless the model counts bytes that never exist.
    Upper bound 1.35: at this width the model leaves out 17-26% (the synthetic audio, the preprocessor's and the
    quantizer's temporaries, backward's transient gradients; README's table, 5 points), plus headroom. At NEST-L
    widths the gap is 4-9%. Breaks it: activations under-counted by 13% or more, e.g. `hop = 0.02` in
    estimate.saved_activation_bytes (ratio 1.81), or over-counted by 29% (ratio < 1).
    The process's peak RSS (glibc's mmap threshold pinned) must agree with the tensor count within 20%: the tracker
    sees the step's allocations (measured: within 5% at 5 points)."""
    row, = bs.validate(TINY, [], [(4, 4.0)])
    ratio = row["tensor_peak"] / row["model"]
    assert 1.0 <= ratio <= 1.35, row
    assert row["rss_peak"] is not None and 0.8 <= row["rss_peak"] / row["tensor_peak"] <= 1.2, row


def test_the_printed_lines_configure_a_lhotse_run(capsys):
    """What batch_search prints, pasted as NeMo's Lhotse keys, is a valid use_lhotse config (fails if the lines'
    format or the keys' names drift from what DatasetConfig reads)."""
    rc, out, err = run_cli([TINY, "--device", "cpu", "--memory", "0.5", "--num-buckets", "3"], capsys)
    assert rc == 0, err
    got = pasted(out)
    keys = [f"model.train_ds.{k}={v}" for k, v in got.items()]
    _, run, found = bs.load_config(TINY, ["model.train_ds.use_lhotse=true", "model.train_ds.shar_path=shar",
                                          "model.train_ds.manifest_filepath=null",
                                          "model.train_ds.use_bucketing=true", *keys])
    ds = run.model.train_ds.validate()
    assert ds.bucket_duration_bins == got["bucket_duration_bins"] and ds.bucket_batch_size == got["bucket_batch_size"]
    assert found == got

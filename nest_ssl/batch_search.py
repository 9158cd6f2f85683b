"""Per-bucket batch sizes for NeMo's Lhotse bucketing keys (`model.train_ds.bucket_duration_bins`,
`bucket_batch_size`): our counterpart of NeMo's OOMptimizer, run by scripts/batch_search.py.

A bin is a bucket's upper edge in seconds: a cut of duration d goes to the first bucket whose bin >= d, and cuts
longer than the last bin are dropped, so bucket i's batch must hold utterances of exactly bins[i] seconds.

- `search(fits, bins)` is the whole search, a pure function of `fits(batch, seconds) -> bool` (assumed monotone: a
  batch that fits still fits with fewer utterances): per bucket, shortest first, double from 1 until a batch does not
  fit, then bisect; each bucket's answer bounds the next, so the sizes never increase.
- `MeasuredMemory`: one real training step (forward + loss + backward under the trainer.precision autocast, on
  synthetic audio), its peak from `torch.cuda.max_memory_allocated` (on CPU: memory.PeakMemory); running out of
  memory means "does not fit".
- `EstimatedMemory`: nest_ssl/estimate.py's memory model (weights, gradients, optimizer state, autocast copies, DDP
  buckets, activations saved for backward counted on the meta device); nothing runs.
scripts/benchmark_batch_search.py checks the second against the first measured on CPU (`measure_point`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nest_ssl.config import apply_overrides, load_yaml, resolve
from nest_ssl.estimate import HALF, persistent_bytes, saved_activation_bytes
from nest_ssl.memory import PeakMemory, tensor_bytes
from nest_ssl.run_config import build_run_config, schema_keys

GiB = 2.0**30
BUCKET_KEYS = ("bucket_duration_bins", "bucket_batch_size")  # NeMo's Lhotse keys under model.train_ds
ROOT = Path(__file__).resolve().parent.parent


# ---- config and bins -----------------------------------------------------------------------------------------------
def load_config(path, overrides=()) -> tuple[dict, object, dict]:
    """(plain, RunConfig, the bucket keys model.train_ds sets)."""
    plain = resolve(apply_overrides(load_yaml(path), overrides, schema_keys))
    run = build_run_config(plain)
    ds = run.model.train_ds
    found = {k: getattr(ds, k) for k in BUCKET_KEYS if ds is not None and getattr(ds, k) is not None}
    return plain, run, found


def check_bins(bins, name: str) -> list[float]:
    """`bins` as floats, or ValueError naming `name`: a non-empty, strictly ascending list of positive seconds."""
    if not isinstance(bins, (list, tuple)) or not bins:
        raise ValueError(f"{name}={bins!r}: give a non-empty list of bucket upper edges in seconds, e.g. 2.5,5,10,20")
    if any(isinstance(b, (list, tuple)) for b in bins):
        raise ValueError(f"{name}={bins!r}: 2D bins (duration, tokens) are for text models; NEST buckets by duration")
    try:
        out = [float(b) for b in bins]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={bins!r}: every bin must be a number of seconds") from None
    for b in out:
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"{name}={bins!r}: {b:g} is not a positive number of seconds")
    for a, b in zip(out, out[1:]):
        if b <= a:
            raise ValueError(f"{name}={bins!r}: not strictly ascending ({a:g} then {b:g}); each bin is the upper edge "
                             "of the next bucket")
    return out


def parse_bins(text: str) -> list[float]:
    """`--bins 2.5,5,10,20` (brackets allowed: `[2.5, 5]`)."""
    body = text.strip().strip("[]").strip()
    if not body:
        return check_bins([], "--bins")
    try:
        return check_bins([float(t) for t in body.split(",")], "--bins")
    except ValueError as e:
        if str(e).startswith("--bins"):
            raise
        raise ValueError(f"--bins={text!r}: give comma-separated seconds, e.g. 2.5,5,10,20") from None


def linspace_bins(min_duration, max_duration, num_buckets: int) -> list[float]:
    """NeMo's provisional bins when none are given: numpy.linspace(max(min_duration, 0), max_duration,
    num_buckets + 1)[1:], equal widths, the last bin max_duration itself so the longest utterance has a bucket."""
    if max_duration is None:
        raise ValueError("model.train_ds.max_duration is not set: give --bins or model.train_ds.bucket_duration_bins")
    if num_buckets < 1:
        raise ValueError(f"--num-buckets={num_buckets}; must be >= 1")
    lo = max(float(min_duration or 0.0), 0.0)
    if not float(max_duration) > lo:
        raise ValueError(f"model.train_ds.max_duration={max_duration} must exceed min_duration={min_duration}")
    edges = np.linspace(lo, float(max_duration), num_buckets + 1)[1:]
    return check_bins([round(float(b), 3) for b in edges[:-1]] + [float(max_duration)], "--num-buckets")


def choose_bins(flag: str | None, found: dict, ds, num_buckets: int | None) -> tuple[list[float], str]:
    """(bins, where they came from): --bins, else model.train_ds.bucket_duration_bins, else --num-buckets (default
    model.train_ds.num_buckets) equal-width bins over [min_duration, max_duration]."""
    if flag is not None:
        return parse_bins(flag), "--bins"
    if found.get("bucket_duration_bins") is not None:
        return check_bins(found["bucket_duration_bins"], "model.train_ds.bucket_duration_bins"), \
            "model.train_ds.bucket_duration_bins"
    if ds is None:
        raise ValueError("model.train_ds is required for its max_duration (or give --bins)")
    n = int(num_buckets if num_buckets is not None else ds.num_buckets)
    return linspace_bins(ds.min_duration, ds.max_duration, n), \
        f"{n} equal-width bins over model.train_ds.min_duration {ds.min_duration} .. max_duration {ds.max_duration}"


# ---- the search ----------------------------------------------------------------------------------------------------
def largest_batch(fits: Callable[[int, float], bool], seconds: float, upper: int) -> int:
    """Largest batch in [1, upper] that fits at `seconds` (0 if 1 does not): double from 1, then bisect."""
    if not fits(1, seconds):
        return 0
    good, bad = 1, None
    while bad is None:
        nxt = min(2 * good, upper)
        if nxt == good:
            return good
        good, bad = (nxt, None) if fits(nxt, seconds) else (good, nxt)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid, seconds) else (good, mid)
    return good


def search(fits: Callable[[int, float], bool], bins: list[float], max_batch: int, budget_gib: float) -> list[int]:
    """One batch size per bucket, non-increasing: each bucket is searched with the previous bucket's size as its upper
    bound. ValueError naming the bucket when even one utterance of its length does not fit."""
    sizes, upper = [], max_batch
    for i, seconds in enumerate(bins):
        b = largest_batch(fits, seconds, upper)
        if b == 0:
            raise ValueError(f"bucket {i} (utterances up to {seconds:g} s): not even a batch of 1 fits in the "
                             f"{budget_gib:.2f} GiB budget; drop the bucket (lower the last bin or "
                             "model.train_ds.max_duration), raise --memory, or set trainer.activation_checkpointing")
        sizes.append(b)
        upper = b
    return sizes


# ---- memory of one training step -----------------------------------------------------------------------------------
class EstimatedMemory:
    """bytes(batch, seconds) per GPU from estimate.py's memory model. Saved activations are affine in the batch (the
    batch-independent part: positional encodings), so each duration costs two meta forwards, at batch 1 and 2."""

    def __init__(self, model_cfg: dict, precision, optimizer: str, gpus: int):
        from nest_ssl.nemo_compat import build_model

        model = build_model(model_cfg, device="meta")
        self.persistent = persistent_bytes(model, str(precision), optimizer, gpus)
        self.dtype = HALF.get(str(precision), torch.float32)
        self.model = model.to(self.dtype)
        self._lines: dict[float, tuple[int, int]] = {}

    def activations(self, batch: int, seconds: float) -> int:
        if seconds not in self._lines:
            one, two = (saved_activation_bytes(self.model, b, seconds, self.dtype) for b in (1, 2))
            self._lines[seconds] = (one, two - one)
        one, per_utterance = self._lines[seconds]
        return one + (batch - 1) * per_utterance

    def __call__(self, batch: int, seconds: float) -> int:
        return sum(self.persistent.values()) + self.activations(batch, seconds)


class MeasuredMemory:
    """bytes(batch, seconds) of one real training step, or None when it runs out of memory. On CUDA the peak of
    torch.cuda.max_memory_allocated; on CPU (the validation) the parameters and buffers plus the peak of the tensors
    the step allocates (memory.PeakMemory). `extra`: bytes training holds that one step does not allocate (the
    optimizer state, made at the first optimizer.step; DDP's gradient buckets)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, amp_dtype, sample_rate: int, extra: int = 0):
        self.model, self.device, self.amp_dtype, self.sample_rate, self.extra = model, device, amp_dtype, \
            sample_rate, extra

    def _step(self, batch: int, seconds: float) -> int:
        from nest_ssl.data.batch import synthetic_batch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        with PeakMemory() if not cuda else contextlib.nullcontext() as tracked:  # a dispatch mode is slow: CPU only
            data = synthetic_batch(batch, seconds, self.device, sample_rate=self.sample_rate)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss = self.model.training_step(data, generator=torch.Generator(self.device).manual_seed(0),
                                                global_step=0)["loss"]
            loss.float().backward()
        if cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return tensor_bytes([*self.model.parameters(), *self.model.buffers()]) + tracked.peak

    def __call__(self, batch: int, seconds: float) -> int | None:
        try:
            peak = self._step(batch, seconds)
        except torch.OutOfMemoryError:
            peak = None  # the step's tensors went with its frame; the cache is emptied below
        self.model.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return None if peak is None else peak + self.extra


def training_model(plain: dict, run, device: torch.device) -> torch.nn.Module:
    """The model as nest_ssl/train.py builds it for a step: train mode, trainer.activation_checkpointing applied."""
    from nest_ssl.nemo_compat import build_model
    from nest_ssl.train import checkpoint_layers

    model = build_model(plain["model"]).to(device).train()
    if run.trainer.activation_checkpointing != "none":
        checkpoint_layers(model, run.trainer.activation_checkpointing)
    return model


# ---- the validation: model vs a measured CPU step, in a fresh process ---------------------------------------------
def measure_point(config: str, overrides: list, batch: int, seconds: float) -> dict:
    """Measured bytes of one fp32 CPU step on `batch` x `seconds` (call in a fresh process), after a 1 x 0.5 s
    warm-up that loads the kernels: the tensor peak (as MeasuredMemory counts it, optimizer state excluded), and the
    parameters and buffers plus the growth of the process's peak RSS over its resident set before the step. The
    peak (VmHWM) is reset to the current RSS just before the step (Linux: `5` to /proc/self/clear_refs), so an
    earlier high-water mark (imports, the warm-up) cannot hide the step's."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plain, run, _ = load_config(config, [*overrides, "trainer.precision=32"])
    model = training_model(plain, run, torch.device("cpu"))
    measure = MeasuredMemory(model, torch.device("cpu"), None, run.model.sample_rate)
    measure(1, 0.5)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    resident = _status_bytes("VmRSS")
    tensor_peak = measure(batch, seconds)
    persistent = tensor_bytes([*model.parameters(), *model.buffers()])
    return {"batch": batch, "seconds": seconds, "tensor_peak": tensor_peak,
            "rss_peak": persistent + _status_bytes("VmHWM") - resident}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError(f"/proc/self/status has no {key}")


def measure_in_subprocess(config: str, overrides: list, batch: int, seconds: float, glibc_default: bool = False,
                          timeout: float = 600) -> dict:
    """measure_point in a fresh Python process (its own peak RSS). glibc's malloc keeps freed heap memory for reuse
    (its mmap threshold grows with the largest freed block), which makes peak RSS up to 2x the live bytes; unless
    `glibc_default`, MALLOC_MMAP_THRESHOLD_ pins the threshold so that large blocks go back to the system when freed
    and peak RSS follows the live bytes, an independent check on the tensor count."""
    code = ("import json, sys; from nest_ssl.batch_search import measure_point; "
            "print(json.dumps(measure_point(*json.loads(sys.argv[1]))))")
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, "-c", code, json.dumps([str(config), list(overrides), batch, seconds])],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"measure_point({batch}, {seconds}) failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def validate(config: str, overrides: list, points: list[tuple[int, float]], glibc_default: bool = False) -> list:
    """Per (batch, seconds): the memory model's bytes for an fp32 one-GPU step and the measured ones (each point in a
    fresh process; the optimizer state, which one step does not allocate, added to both from the accounting)."""
    plain, run, _ = load_config(config, [*overrides, "trainer.precision=32"])
    est = EstimatedMemory(plain["model"], "32", run.model.optim.name, 1)
    p = est.persistent
    rows = []
    for batch, seconds in points:
        m = measure_in_subprocess(config, overrides, batch, seconds)
        row = {"batch": batch, "seconds": seconds, "model": est(batch, seconds),
               "activations": est.activations(batch, seconds), "tensor_peak": m["tensor_peak"] + p["optimizer"],
               "rss_peak": _plus(m["rss_peak"], p["optimizer"])}
        if glibc_default:
            row["rss_peak_glibc"] = _plus(measure_in_subprocess(config, overrides, batch, seconds, True)["rss_peak"],
                                          p["optimizer"])
        # measured beyond weights, gradients and optimizer state, against the saved activations the model counts
        row["activation_ratio"] = (row["tensor_peak"] - p["weights"] - p["gradients"] - p["optimizer"]) / \
            row["activations"]
        rows.append(row)
    return rows


def _plus(a: int | None, b: int) -> int | None:
    return None if a is None else a + b


# ---- output --------------------------------------------------------------------------------------------------------
def yaml_float(x: float) -> str:
    """A float YAML reads back as a float (PyYAML takes `1e-05` for a string: it needs a dot)."""
    s = repr(float(x))
    return s if "e" not in s else f"{x:.12f}".rstrip("0")


def yaml_lines(bins: list[float], sizes: list[int]) -> str:
    return (f"bucket_duration_bins: [{', '.join(yaml_float(b) for b in bins)}]\n"
            f"bucket_batch_size: [{', '.join(str(int(b)) for b in sizes)}]")


def format_table(bins: list[float], sizes: list[int], gib: list[float], measured: bool, max_batch: int) -> str:
    head = "measured GiB" if measured else "estimated GiB"
    lines = [f"{'bucket':>6}  {'max duration (s)':>16}  {'batch':>6}  {head:>13}"]
    for i, (s, b, g) in enumerate(zip(bins, sizes, gib)):
        cap = "  (--max-batch)" if b == max_batch else ""
        lines.append(f"{i:>6}  {s:>16g}  {b:>6}  {g:>13.2f}{cap}")
    return "\n".join(lines)

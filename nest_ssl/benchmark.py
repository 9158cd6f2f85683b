"""End-to-end training-step benchmark: eager (NeMo math) vs Triton kernels in one run.

Synthetic in-memory batches of one utterance duration (the data pipeline alone is measured by
scripts/benchmark_data.py), or with `real=True` the config's own `model.train_ds` loader (workers, augmentor,
`augment_on_device`), which also gives the fraction of the step spent waiting for data. One row per mode with step
time, audio-seconds per second, MFU (FLOP convention in nest_ssl/flops.py), peak memory.
"""
from __future__ import annotations

import csv
import datetime
import itertools
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch

from nest_ssl.data.batch import synthetic_batch
from nest_ssl.data.loader import build_loader
from nest_ssl.flops import mfu, nest_train_flops_per_audio_second
from nest_ssl.nemo_compat import build_model
from nest_ssl.optim import build_optimizer
from nest_ssl.run_config import load_config

COLUMNS = ["config", "mode", "utt_seconds", "batch", "dtype", "step_ms", "audio_s_per_s", "mfu", "peak_mem_gb",
           "data_wait", "gpu_name", "torch", "triton", "git_sha", "timestamp"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


MODES = ("eager", "triton", "eager+compile", "triton+compile")


def build(config: str, overrides, mode: str, device):
    """mode: eager (NeMo math) | triton (our kernels), optionally +compile (trainer.compile: compiled layers)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    impl = "triton" if mode.startswith("triton") else "torch"
    plain, run = load_config(config, [*overrides, f"++model.encoder.attention_impl={impl}",
                                      f"++model.encoder.conv_impl={impl}"])
    model = build_model(plain["model"]).to(device).train()
    if mode.endswith("+compile"):
        model.encoder.compile_layers()
    return plain, run, model, build_optimizer(model, run.model.optim)


def real_batches(plain: dict, run, device):
    """Endless (batch, seconds of audio) from the config's train_ds loader, mixed on the device when asked."""
    loader, mix = build_loader(run.model.train_ds, seed=run.seed)
    gen, sr = torch.Generator(device).manual_seed(0), run.model.sample_rate
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for batch in loader:
            seconds = float(batch.audio_len.sum()) / sr  # CPU tensor: no device sync
            batch = batch.to(device, non_blocking=True)
            yield (mix(batch, gen) if mix is not None else batch), seconds


def run_mode(config, overrides, mode, batch, seconds, dtype, steps, warmup, device, real=False) -> dict:
    plain, run, model, opt = build(config, overrides, mode, device)
    amp = DTYPES[dtype]
    if real:
        source = real_batches(plain, run, device)
    else:
        source = itertools.repeat((synthetic_batch(batch, seconds, device), batch * seconds))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, waits, audio, utts = [], [], [], []
    gen = torch.Generator(device).manual_seed(0)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        data, audio_s = next(source)
        t_data = time.perf_counter() - t0
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model.training_step(data, generator=gen, global_step=i)["loss"]
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            waits.append(t_data)
            audio.append(audio_s)
            utts.append(data.audio.shape[0])
    if mode.startswith("triton") and 0 in model.encoder.kernel_calls().values():  # the row must be what it says
        raise RuntimeError(f"mode {mode}: a Triton kernel never ran ({model.encoder.kernel_calls()})")
    step_s = statistics.median(times)
    audio_s = sum(audio) / sum(times)
    if real:  # the rows describe what the loader delivered: mean batch and mean utterance length
        batch, seconds = round(sum(utts) / len(utts), 2), round(sum(audio) / sum(utts), 2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = nest_train_flops_per_audio_second(trainable, plain["model"]["encoder"], seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: process peak RSS
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_flops = peak_bf16_flops(gpu)
    name = Path(config).stem + ("" if not overrides else "+" + ",".join(overrides)) + (" [real data]" if real else "")
    return {"config": name, "mode": mode,
            "utt_seconds": seconds, "batch": batch, "dtype": dtype, "step_ms": round(step_s * 1e3, 2),
            "audio_s_per_s": round(audio_s, 1), "mfu": round(mfu(audio_s, flops, peak_flops), 4),
            "peak_mem_gb": round(peak, 3), "data_wait": round(sum(waits) / sum(times), 4), "gpu_name": gpu,
            "torch": torch.__version__, "triton": _triton_version(), "git_sha": _git_sha(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def peak_bf16_flops(gpu_name: str) -> float:
    """Dense bf16 peak (the MFU denominator): H100 SXM and H200 989 TFLOP/s, H100 PCIe 756; others unknown (nan)."""
    if "H100" in gpu_name and "PCIe" in gpu_name:
        return 756e12
    return 989e12 if ("H100" in gpu_name or "H200" in gpu_name) else float("nan")


def append_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)

"""`trainer.fit_scan` (ours): find out at start-up, not hours in, whether the largest batch fits.

The largest batch the loader can produce is its longest utterance times the most utterances a batch can hold with it
(`batch_size`, or what `batch_duration` allows: the sampler bounds the padded size). One forward + backward of a
synthetic batch of that shape runs before the first step; if it runs out of memory the error names the settings to
lower. The scan leaves no trace: BatchNorm statistics are restored and gradients cleared, so the run's numbers are
those of a run without it (tested).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nest_ssl.data.batch import synthetic_batch


def largest_batch(loader, ds_cfg) -> tuple[int, float]:
    """(utterances, seconds each) of the worst-case padded batch of this loader (a Lhotse plan knows its batches:
    the one with the most padded audio)."""
    if hasattr(getattr(loader, "sampler", None), "largest_batch"):
        return loader.sampler.largest_batch()
    dataset = getattr(loader.dataset, "base", loader.dataset)
    known = [d for d in dataset.durations() if d is not None]
    longest = max(known) if known else ds_cfg.max_duration
    if longest is None:
        raise ValueError("trainer.fit_scan needs durations in the manifest or model.train_ds.max_duration")
    if ds_cfg.batch_duration is not None:
        return max(1, math.floor(ds_cfg.batch_duration / longest)), float(longest)
    return int(ds_cfg.batch_size), float(longest)


def fit_scan(model: nn.Module, shape: tuple[int, float], sample_rate: int, amp_dtype, device: torch.device) -> str:
    """Forward + backward of the worst-case batch; a one-line report, or MemoryError naming what to lower."""
    n, seconds = shape
    names = {k for k, _ in model.named_buffers()}
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k in names}  # persistent buffers only
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        batch = synthetic_batch(n, seconds, device, sample_rate=sample_rate)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model.training_step(batch, generator=torch.Generator(device).manual_seed(0), global_step=0)["loss"]
        loss.float().backward()
    except torch.OutOfMemoryError:
        raise MemoryError(f"trainer.fit_scan: the largest batch ({n} x {seconds:.2f} s: the longest utterance with "
                          "model.train_ds.batch_size / batch_duration) does not fit on "
                          f"{device}: lower model.train_ds.batch_size or batch_duration (raise "
                          "trainer.accumulate_grad_batches to keep the effective batch) or model.train_ds.max_duration"
                          ) from None
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(buffers, strict=False)  # BatchNorm running statistics as they were
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type != "cuda":
        return f"fit_scan: the largest batch ({n} x {seconds:.2f} s) ran forward + backward"
    peak, total = torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.get_device_properties(device).total_memory
    return (f"fit_scan: the largest batch ({n} x {seconds:.2f} s) fits: peak {peak:.1f} GiB of "
            f"{total / 2**30:.1f} GiB (DDP buckets and optimizer state come on top)")

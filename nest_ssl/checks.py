"""Length checks that never stall an accelerator.

A wrong length silently corrupts features, so every module that takes one checks it. On the CPU that is a plain
test. On a GPU, reading the answer would be a host sync once per call (twice per NEST step through the
preprocessor alone); there the check is queued on the device with `torch._assert_async` instead: a bad length stops
the run, with this message, at the next synchronisation. The trainer's batches come from the CPU collate, whose
lengths are right by construction.
"""
from __future__ import annotations

import torch

HOST_CHECKED = ("cpu",)  # device types whose lengths are checked on the host (tests empty it to see the GPU path)


def check_lengths(length: torch.Tensor, upper: int, name: str = "length", detail: str = "") -> None:
    """Raise ValueError (CPU) or assert on the device (accelerator) unless 0 <= length <= upper."""
    ok = ((length >= 0) & (length <= upper)).all()
    if length.device.type not in HOST_CHECKED:
        torch._assert_async(ok, f"{name} must lie in [0, {upper}]{detail}")
    elif not bool(ok):
        raise ValueError(f"{name}={length.tolist()} must lie in [0, {upper}]{detail}")

"""Peak memory of tensors on any device, CPU included, by tracking the storages that ops allocate.

`torch.cuda.max_memory_allocated` exists only on CUDA; the memory model (README, "Memory") is measured on CPU
with gloo processes, so this counts bytes itself: a dispatch mode sees every op's outputs, records each new
storage's size, and a weakref finalizer takes it off when the storage is freed. Views share their base's storage
and are counted once. What existed before the mode started (parameters, optimizer state) is not counted; callers
add those from their own sizes (`tensor_bytes`). Allocator rounding and caching are not modelled.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (an iterable of tensors; None entries are skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)  # a DTensor shard counts its local part
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


class PeakMemory(TorchDispatchMode):
    """`with PeakMemory() as m: ...` -> m.peak: the most bytes alive at once among storages made inside."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            key = id(s)
            if key in self._seen or s.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._freed, key, s.nbytes())
        return out

"""Activation checkpointing of Conformer layers (`trainer.activation_checkpointing: none | full | every_<k>`).

A checkpointed layer keeps only its inputs in forward and runs again in backward to rebuild what its backward needs.
That second run must be the same computation as the first:

* dropout: `torch.utils.checkpoint` restores the CPU generator and the generator of the inputs' device before the
  rerun, so torch's dropout draws the same mask, and the Triton attention kernel, whose Philox seed is drawn from the
  CPU generator when the layer runs, gets the same seed and so the same mask;
* BatchNorm (torch path and Triton conv kernel alike) updates its running statistics in training forward; the rerun
  would update them a second time, so the rerun restores them afterwards (`_keep_batchnorm_stats`). SyncBatchNorm
  reruns its all-reduce on every rank, which stays in step because every rank checkpoints the same layers.

`full` checkpoints every layer; `every_<k>` layers 0, k, 2k, ... (a trade between memory and recompute).
Layers compiled by `trainer.compile` stay compiled: the checkpoint wraps the compiled call from outside.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

MODES = "none | full | every_<k> (k >= 1)"


def parse_mode(mode: str) -> int:
    """'none' -> 0, 'full' -> 1, 'every_<k>' -> k: checkpoint the layers whose index is a multiple of k."""
    if mode == "none":
        return 0
    if mode == "full":
        return 1
    m = re.fullmatch(r"every_(\d+)", str(mode))
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ValueError(f"trainer.activation_checkpointing={mode!r}; allowed: {MODES}")


@contextlib.contextmanager
def _keep_batchnorm_stats(module: nn.Module):
    """Restore every BatchNorm buffer (running mean/var, batch count) of `module` on exit."""
    bufs = [b for m in module.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
    saved = [b.clone() for b in bufs]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(bufs, saved):
                b.copy_(s)


def checkpointed_call(layer: nn.Module, *args):
    """layer(*args) with its activations recomputed in backward (same dropout masks, BN stats updated once)."""
    return checkpoint(layer, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _keep_batchnorm_stats(layer)))

"""What `scripts/pretrain.py` sets up differently on a machine without a GPU, each choice said in one start-up line.

- Intra-op threads: torch's default is every core, which on a busy machine makes its threads spin waiting for each
  other (50 steps of the tiny config: 24 s with 2 threads on a loaded 2-core machine, 3 s with 1). The count is
  chosen on purpose instead: OMP_NUM_THREADS when it is set, otherwise the CPUs this process may run on divided by
  the processes torchrun started on this machine (LOCAL_WORLD_SIZE).
- Data loaders: `pin_memory` has nothing to pin for, and more workers than CPUs only make torch warn and the
  processes compete; a GPU recipe such as NEST-L's YAML (8 workers, pin_memory) is adjusted and the change said.
"""
from __future__ import annotations

import os

import torch

SECTIONS = ("train_ds", "validation_ds")


def is_cpu_run(plain: dict) -> bool:
    accelerator = (plain.get("trainer") or {}).get("accelerator", "auto")
    return accelerator == "cpu" or not torch.cuda.is_available()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def pick_threads() -> str:
    """Set torch's intra-op thread count for a CPU run; returns the start-up line saying what and how to change it."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env:  # torch read it at start-up
        return f"CPU run: {torch.get_num_threads()} intra-op thread(s), from OMP_NUM_THREADS={env}"
    cpus, procs = usable_cpus(), local_processes()
    threads = max(1, cpus // procs)
    torch.set_num_threads(threads)
    return (f"CPU run: {threads} intra-op thread(s) = {cpus} usable CPU(s) / {procs} process(es) on this machine; "
            "set OMP_NUM_THREADS to change it (1 is fastest when other jobs share the cores)")


def adjust_loaders(plain: dict) -> str | None:
    """Turn off `pin_memory` and cap `num_workers` at the CPUs per local process in the data sections of a resolved
    config (in place, so the run directory's config.yaml says what ran). Returns the line naming each change, or None
    when nothing changed."""
    cap = max(0, usable_cpus() // local_processes())
    changes = []
    for name in SECTIONS:
        ds = (plain.get("model") or {}).get(name)
        if not isinstance(ds, dict):
            continue
        if ds.get("pin_memory"):
            ds["pin_memory"] = False
            changes.append(f"model.{name}.pin_memory true -> false (no GPU to pin for)")
        workers = ds.get("num_workers")
        if isinstance(workers, int) and workers > cap:
            ds["num_workers"] = cap
            changes.append(f"model.{name}.num_workers {workers} -> {cap} (the usable CPUs per process)")
    return "CPU run: " + "; ".join(changes) if changes else None

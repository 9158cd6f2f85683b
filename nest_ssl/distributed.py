"""Distributed helpers for the training loop: torchrun env, process group, no_sync, reductions, SyncBatchNorm,
preemption signals, collective timeouts.

Works unchanged as a plain single process (world_size 1, no process group) and under torchrun
(RANK / LOCAL_RANK / WORLD_SIZE set): NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(accelerator: str, local_rank: int) -> torch.device:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator!r} but no CUDA device is available")
    if accelerator != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(accelerator: str = "auto", collective_timeout: float = 300.0) -> DistInfo:
    """Read the torchrun environment and start the process group when WORLD_SIZE > 1. A collective that waits
    longer than `collective_timeout` seconds (trainer.collective_timeout) raises instead of waiting forever."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(accelerator, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            # NCCL's timeout only acts through its watchdog, which (torchrun's default) aborts the process without a
            # word on where it was; blocking wait makes the timed-out wait raise in this thread instead, so the run
            # ends with the rank and phase (Phases). Its cost: the CPU waits for each collective it waits on,
            # which the step's one host sync (train.step_stats) does anyway. An explicit setting is respected.
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=collective_timeout),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world, device)


class CollectiveError(RuntimeError):
    """A collective failed on this rank (timed out under trainer.collective_timeout, or a peer died)."""


class Phases:
    """Where the run is (start-up, train step, validation, checkpoint, ...), for the error of a failed collective.

    `with phases("validation"):` names a phase; an exception leaves the name set, so the handler around the run
    (collective_error) still sees where it was raised."""

    def __init__(self, timeout: float = 300.0):
        self.now, self.timeout = "start-up", timeout  # timeout: trainer.collective_timeout, for the message

    @contextlib.contextmanager
    def __call__(self, name: str):
        before, self.now = self.now, name
        yield
        self.now = before  # not reached on an exception: on purpose


def failed_collective(err: BaseException) -> bool:
    """Gloo raises a bare RuntimeError from its sources (".../gloo/...: Timed out waiting ..."), NCCL (blocking
    wait) a DistBackendError."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "/gloo/" in str(err))


def collective_error(err: BaseException, phases: Phases) -> Optional[CollectiveError]:
    """A CollectiveError naming the rank, the phase and trainer.collective_timeout when `err` is a failed collective,
    else None."""
    if isinstance(err, CollectiveError) or not failed_collective(err):
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    first = " ".join(str(err).split())[:200]
    return CollectiveError(f"rank {rank}: a collective in the {phases.now} failed or waited longer than "
                           f"trainer.collective_timeout={phases.timeout:g} s ({first}); another rank is stuck or "
                           "died (its own log says why); the checkpoints written before are intact: resume from them")


def teardown() -> None:
    """Called by every rank on the same decision (the step's all-reduced flags), never after an error. Every
    multi-process worker in the package and the tests leaves this way."""
    if dist.is_initialized():
        # All ranks leave together: a rank that destroys the group while another still writes its checkpoint or
        # finishes a collective was seen to deadlock gloo's teardown under load.
        dist.barrier()
        # Gloo's group destructor (run by destroy_process_group, or later by a DDP reducer that still holds the
        # group) joins its worker threads while holding the GIL. A worker that has just finished a collective may
        # still be dropping the last reference to that collective's tensors, which needs the GIL: a deadlock
        # (seen with gdb: main thread in ~ProcessGroupGloo -> thread::join, pt_gloo_runloop in take_gil from
        # TensorImpl::decref_pyobject), or at interpreter exit an abort ("terminate called without an active
        # exception"). Sleeping releases the GIL so such a worker finishes first. It narrows the window; torch
        # offers no way to wait for the workers to go idle.
        time.sleep(0.1)
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, sync_batchnorm: bool,
               find_unused_parameters: bool = False) -> nn.Module:
    """DDP when world_size > 1 (find_unused_parameters=False as NeMo unless the strategy says
    ddp_find_unused_parameters_true); SyncBatchNorm first if asked."""
    if info.world_size == 1:
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # state_dict keys unchanged
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks of a few scalars (one collective)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks, in place, on the device (no host sync): "any rank" for 0/1 flags."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def devices_note(tc, world_size: int) -> Optional[str]:
    """A note when trainer.devices asks for a specific number of devices (more than one) that the launcher did not
    start. `devices: 1` (the CPU and single-GPU configs) under torchrun is the usual way to scale a config: silent."""
    if isinstance(tc.devices, int) and tc.devices > 1 and tc.devices * tc.num_nodes != world_size:
        return (f"note: trainer.devices={tc.devices} x num_nodes={tc.num_nodes} != world size {world_size}; the "
                "process count comes from torchrun (--nproc_per_node, --nnodes)")
    return None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value on every rank (e.g. a datetime-based run directory name)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Preemption:
    """SIGUSR1 / SIGTERM / the first SIGINT (Ctrl-C) -> flag, checked at the end of each optimizer step.

    The first Ctrl-C is a preemption that exits with INTERRUPT_EXIT_CODE (130) instead of 75; it also puts SIGINT
    back to the operating system's default, so a second Ctrl-C ends the process at once, even inside a collective or
    a kernel. A SIGINT that the process inherited as ignored (nohup, a background job) stays ignored.

    Under torchrun a SLURM signal should not reach the launcher (it would kill or SIGTERM-and-SIGKILL its
    workers), so the sbatch files trap it in the batch shell and touch the file named by $NEST_PREEMPT_FILE,
    which every step also checks. A signal may instead reach only the workers (scancel --signal=TERM), and torchrun
    turns their exit code 75 into 1, so after the preemption checkpoint rank 0 writes $NEST_REQUEUE_MARKER: the
    sbatch files requeue the job iff it exists (scripts/slurm/common.sh)."""

    def __init__(self):
        self.flag, self.interrupted = False, False
        self.file = os.environ.get("NEST_PREEMPT_FILE")
        self.marker = os.environ.get("NEST_REQUEUE_MARKER")
        self.previous = {}
        try:
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Python's KeyboardInterrupt
                self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
            pass

    def _handler(self, signum, frame):
        self.flag = True

    def _interrupt(self, signum, frame):
        self.flag = self.interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C: the kernel ends the process at once
        if int(os.environ.get("RANK", 0)) == 0:
            print("Ctrl-C: stopping with a checkpoint after this step (Ctrl-C again aborts at once)",
                  file=sys.stderr, flush=True)

    def requested(self) -> bool:
        if self.file and os.path.exists(self.file):
            self.flag = True
        return self.flag

    def leave_marker(self, step: int) -> None:
        """Tell the batch script this run stopped for a preemption with its checkpoint written (rank 0 only)."""
        if self.marker:
            Path(self.marker).write_text(f"checkpoint at step {step}\n")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

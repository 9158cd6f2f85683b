"""Sharded checkpoints for `trainer.strategy: fsdp` with `torch.distributed.checkpoint` (DCP).

Every rank writes its own shards in parallel; nothing is gathered on one rank. One checkpoint is a directory:

    <stem>.dcp/.metadata, __<rank>_0.distcp   model + optimizer shards (DCP)
    <stem>.dcp/train_state.pt                 world size, step, epoch, scheduler, config, health prior (rank 0)
    <stem>.dcp/rank<r>.pt                     what differs per rank: RNG states, data-loader position

Atomic like the single-file checkpoints: everything is written to `<stem>.dcp.tmp/` and renamed to `<stem>.dcp/`
by rank 0 once every rank has finished, so a writer killed at any point leaves at most a `.tmp` directory, which
discovery ignores and the next save removes. `async_save` (exp_manager.checkpoint_callback_params.async_save)
copies the state to host memory, returns, and writes in a background thread on a separate gloo group; the rename
happens when the write is done (`AsyncSave.wait`, called before the next save and at the end of training).

A full disk (ENOSPC / EDQUOT) ends a save like the single-file path's: every rank reaches one gather after its writes
(whether its own succeeded or not, so none waits for a rank that failed), rank 0 removes the `.tmp` directory, and
every rank raises the same `checkpoint.DiskFullError` (scripts/pretrain.py: exit 74, one line); the previous
checkpoints are untouched. Other write errors propagate as before.

Resume needs the world size the checkpoint was written with: DCP could reshard the weights and the optimizer, but
the data-loader positions and RNG streams are per rank and have no meaning for another rank count. A different
world size is refused with the way out: `to_single_file` (scripts/export.py --to-ckpt) gives a one-file checkpoint
for export, `.nemo` or `init_from_*`.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from nest_ssl import checkpoint as ckpt
from nest_ssl.distributed import barrier
from nest_ssl.fsdp import broadcast_batchnorm_stats

FORMAT_VERSION = 1
SUFFIX = ".dcp"
TRAIN_STATE = "train_state.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_complete(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix == SUFFIX and (p / ".metadata").is_file() and (p / TRAIN_STATE).is_file()


def _commit(tmp: Path, final: Path) -> None:
    """Rank 0: make the finished temp directory the checkpoint (a rename: all of it appears at once)."""
    if _rank() != 0:
        return
    if final.exists():  # the same name saved again (e.g. a re-run step): swap via a second temp name
        old = final.with_name(final.name + ".old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _disk_full_cause(err: BaseException) -> Optional[OSError]:
    """The ENOSPC / EDQUOT OSError behind `err` (itself or in its chain), else None: torch.save inside DCP turns a
    failed write into "unexpected pos" RuntimeError, with the OSError only as its context."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class _Writer(FileSystemWriter):
    """DCP's file writer, except that a full disk raises a DiskFullError on the rank it happened on. The failure DCP
    hands to every rank is pickled, which drops the OSError behind torch.save's RuntimeError: name it first."""

    def _raise_disk_full(self, err: BaseException):
        cause = _disk_full_cause(err)
        full = None if cause is None else ckpt.disk_full(cause, Path(self.path),
                                                         f" (rank {_rank()}; {_free(Path(self.path))})")
        if full is None:
            raise err
        raise full from err

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)  # one writer thread (the default): errors surface here
        except BaseException as e:  # noqa: B036  (re-raised unchanged unless it is a full disk)
            self._raise_disk_full(e)

    def finish(self, metadata, results) -> None:
        try:
            super().finish(metadata, results)  # the coordinator's .metadata
        except BaseException as e:  # noqa: B036
            self._raise_disk_full(e)


def _free(path: Path) -> str:
    return f"{shutil.disk_usage(path if path.exists() else path.parent).free / 2**20:.1f} MB free"


def _disk_full_of(err: CheckpointException) -> Optional[ckpt.DiskFullError]:
    """The DiskFullError of a failed DCP collective when every failing rank ran out of space, else None."""
    failures = [exc for exc, _ in err.failures.values()]
    if failures and all(isinstance(e, ckpt.DiskFullError) for e in failures):
        return failures[0]
    return None


def _settle(error: Optional[ckpt.DiskFullError], tmp: Path) -> None:
    """Every rank calls this after its part of a write, failed or not: one gather says whether any rank ran out of
    space. Then rank 0 removes the partial `tmp` and every rank raises (its own error, or the first failing
    rank's), so all of them stop here and none waits in a later collective for a rank that has left."""
    mine = None if error is None else (error.errno, error.strerror)
    errors = [mine] * _world()
    if dist.is_initialized():
        dist.all_gather_object(errors, mine)
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return
    if _rank() == 0 and tmp.is_dir():  # a checkpoint's .tmp directory
        shutil.rmtree(tmp, ignore_errors=True)
    elif _rank() == 0:  # the temp file of a write rank 0 made alone (save_on_rank0)
        tmp.unlink(missing_ok=True)
    raise error if error is not None else ckpt.DiskFullError(*first)


def _dcp_disk_full(write) -> Optional[ckpt.DiskFullError]:
    """Run a DCP write (a collective: it raises on every rank or on none); a full disk is returned, not raised."""
    try:
        write()
    except CheckpointException as e:
        full = _disk_full_of(e)
        if full is None:
            raise
        return full
    return None


class AsyncSave:
    """A checkpoint being written in the background; `wait()` finishes it (rank 0 renames it into place). A full
    disk raises DiskFullError on every rank from `wait()` (the `.tmp` removed)."""

    def __init__(self, future, tmp: Path, final: Path, error: Optional[ckpt.DiskFullError] = None):
        self.future, self.tmp, self.final, self.error = future, tmp, final, error

    def wait(self) -> Path:
        # on rank 0 (the coordinator) the result comes once every rank's shards are written
        _settle(_dcp_disk_full(self.future.result) or self.error, self.tmp)
        _commit(self.tmp, self.final)
        return self.final


_async_group = None


def _checkpoint_group():
    """A gloo group of its own for background writes, so they never interleave with training collectives."""
    global _async_group
    if _async_group is None and dist.is_initialized():
        _async_group = dist.new_group(backend="gloo")
    return _async_group


def close() -> None:
    """Destroy the background-write group (before the process group is torn down, so no destructor of a gloo
    group runs later, at interpreter exit)."""
    global _async_group
    if _async_group is not None and dist.is_initialized():
        dist.destroy_process_group(_async_group)
    _async_group = None


def save(path: str | os.PathLike, model, optimizer, train_state: dict, rank_state: dict,
         async_save: bool = False) -> Path | AsyncSave:
    """Write a checkpoint directory `path` (ending in .dcp) from every rank (a collective).

    model/optimizer: FSDP-sharded or plain; `train_state` (the same on every rank) is written by rank 0,
    `rank_state` by each rank. With async_save the caller continues training and must `wait()` the result."""
    final = Path(path)
    if final.suffix != SUFFIX:
        raise ValueError(f"DCP checkpoint path {final} must end in {SUFFIX}")
    tmp = final.with_name(final.name + ".tmp")
    error = None
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
        error = _own_write(lambda: tmp.mkdir(parents=True), tmp)
    _settle(error, tmp)  # the barrier before anyone writes into tmp
    # Replicated tensors are written once, by whichever rank DCP picks: make BatchNorm statistics rank 0's on every
    # rank first (what DDP and fsdp.shard use), so the file never holds another rank's.
    broadcast_batchnorm_stats(model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    error = _own_write(lambda: ckpt.atomic_save(rank_state, tmp / f"rank{_rank()}.pt"), tmp)
    if _rank() == 0 and error is None:
        error = _own_write(lambda: ckpt.atomic_save({"format_version": FORMAT_VERSION, "world_size": _world(),
                                                     **train_state}, tmp / TRAIN_STATE), tmp)
    state = {"model": model_sd, "optim": optim_sd}
    if async_save:  # DCP's collectives run on every rank even after a failed write above: settled in wait()
        future = dcp.async_save(state, storage_writer=_Writer(tmp), process_group=_checkpoint_group())
        return AsyncSave(future, tmp, final, error)
    full = _dcp_disk_full(lambda: dcp.save(state, storage_writer=_Writer(tmp)))
    _settle(error or full, tmp)  # every rank's shards and rank file are on disk, or every rank raises
    _commit(tmp, final)
    barrier()
    return final


def save_on_rank0(write, path: Path, tmp: Path) -> None:
    """A write rank 0 makes alone inside a sharded save (the best checkpoint's `.nemo`), settled like the shards:
    every rank calls this, and a full disk on rank 0 raises the same DiskFullError on every rank (its partial `tmp`
    removed) rather than rank 0 leaving while the others wait in the next collective."""
    _settle(_own_write(write, path) if _rank() == 0 else None, tmp)


def _own_write(write, path: Path) -> Optional[ckpt.DiskFullError]:
    """A write of this rank alone; a full disk is returned (settled with the other ranks), any other error raised."""
    try:
        write()
    except OSError as e:
        full = e if isinstance(e, ckpt.DiskFullError) else ckpt.disk_full(e, path)
        if full is None:
            raise
        return full
    return None


def read_train_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete DCP checkpoint (no .metadata / {TRAIN_STATE})")
    return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)


def load(path: str | os.PathLike, model, optimizer) -> tuple[dict, dict]:
    """Load shards into the (sharded) model and optimizer in place -> (train_state, this rank's rank_state)."""
    path = Path(path)
    train_state = read_train_state(path)
    if train_state["world_size"] != _world():
        raise ValueError(
            f"{path} was written by {train_state['world_size']} processes; this run has {_world()}. Resuming needs "
            f"the same number (data-loader positions and RNG streams are per rank). To continue with another "
            f"size, convert it (scripts/export.py {path} --format ckpt --out model.ckpt) and start a new run with "
            f"init_from_ckpt.")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_state = torch.load(path / f"rank{_rank()}.pt", map_location="cpu", weights_only=True)
    return train_state, rank_state


def latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest global_step (a '-last' one on a tie); .tmp ones are ignored."""
    d = Path(ckpt_dir)
    found = [p for p in d.glob(f"*{SUFFIX}") if is_complete(p)] if d.is_dir() else []
    if not found:
        return None
    return max(found, key=lambda p: (read_train_state(p).get("global_step", -1), p.stem.endswith("-last")))


def _optimizer_by_index(optim: dict) -> dict:
    """DCP's optimizer state (keyed by parameter name) -> torch's `optimizer.state_dict()` form (keyed by the
    parameter's position across param_groups, which is how the optimizer numbers them)."""
    index, groups = {}, []
    for group in optim["param_groups"]:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: s for name, s in optim["state"].items()}, "param_groups": groups}


def _flat_state(path: Path, scratch: Path) -> dict:
    """{"model": state_dict, "optim": ...} of a whole DCP checkpoint, read in one process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = scratch / "dcp-flat.pt"
    dcp_to_torch_save(path, flat)
    try:
        return torch.load(flat, map_location="cpu", weights_only=True)
    finally:
        flat.unlink(missing_ok=True)


def read_weights(path: str | os.PathLike) -> tuple[dict | None, dict]:
    """(run config, full model state_dict) of a DCP checkpoint directory: what export and .nemo need."""
    import tempfile

    path = Path(path)
    config = read_train_state(path).get("config")
    with tempfile.TemporaryDirectory() as scratch:
        return config, _flat_state(path, Path(scratch))["model"]


def to_single_file(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """One process, no process group: the whole checkpoint as one nest_ssl checkpoint file (weights, optimizer in
    `optimizer.state_dict()` form, scheduler, step, config), for export, `.nemo` and `init_from_ckpt`. Per-rank RNG
    and data positions are left out: the file starts runs, it does not resume a sharded one."""
    path, out = Path(path), Path(out)
    train_state = read_train_state(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = _flat_state(path, out.parent)
    single = {k: v for k, v in train_state.items() if k not in ("format_version", "world_size")}
    single.update(format_version=ckpt.FORMAT_VERSION, state_dict=state["model"],
                  optimizer=_optimizer_by_index(state["optim"]), converted_from=str(path),
                  written_by_world_size=train_state["world_size"])
    ckpt.atomic_save(single, out)
    return out


def restore(path: str | os.PathLike, *, model, optimizer, scheduler):
    """A training run's resume: shards into model/optimizer, the scheduler, this rank's RNG states ->
    (the loop's TrainState, this rank's data-loader state, the health monitor's state: None in older checkpoints)."""
    train_state, rank_state = load(path, model, optimizer)
    if scheduler is not None and train_state.get("scheduler") is not None:
        scheduler.load_state_dict(train_state["scheduler"])
    ckpt.set_rng_state(rank_state["rng"])
    return ckpt.TrainState(**train_state["train_state"]), rank_state["loader"], train_state.get("health")

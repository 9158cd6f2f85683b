"""Self-describing training checkpoints: atomic writes, automatic discovery, exact resume.

A checkpoint is one `torch.save`d dict of tensors and plain Python types only (it loads with
`weights_only=True`): model, optimizer, scheduler, grad scaler, the loop's `TrainState`, data-loader position, every
RNG state (as uint8 tensors / plain tuples) and the resolved run config. Writes go to `<file>.<pid>.tmp` and are
renamed into place, so a kill -9 leaves either the old file or the new one, never half of one. A file that is
still truncated (a copied or damaged one) is skipped in favour of the previous checkpoint, with a warning.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

FORMAT_VERSION = 1
DISK_FULL_EXIT_CODE = 74  # EX_IOERR: a checkpoint could not be written for lack of space (scripts/pretrain.py)


class DiskFullError(OSError):
    """No space left for a checkpoint: the partial file is removed, the previous checkpoints are untouched."""


@dataclass
class TrainState:
    """The training loop's counters: saved in every checkpoint, restored on resume."""

    step: int = 0                   # optimizer steps done
    epoch: int = 0
    micro: int = 0                  # micro-batches of the current accumulation window already run
    last_val: float = math.nan      # the latest validation loss
    last_probe: dict = field(default_factory=dict)  # the latest probe scores (probe_cer, ...), when trainer.probe runs
    bad_streak: int = 0             # consecutive skipped (non-finite) optimizer steps
    skipped_steps: int = 0          # skipped optimizer steps in all
    topk: list = field(default_factory=list)  # [[val_loss, path], ...] of the top-k checkpoint files, best first


def rng_state() -> dict:
    """Every RNG the run touches, as tensors / plain types (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nested dict/list: about the size of the checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 // 10 else f"{n / 2**10:.1f} KB"


class _WriteErrors:
    """The file torch.save writes through, keeping the first OSError a write raised (its errno: ENOSPC...)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_reporting_write_errors(obj, f) -> None:
    """torch.save(obj, f), except that a failed write raises its own OSError: torch's zip writer swallows it and
    raises "[enforce fail at inline_container.cc] unexpected pos" (a file object or a path alike)."""
    out = _WriteErrors(f)
    try:
        torch.save(obj, out)
    except RuntimeError:
        if out.error is None:
            raise
        raise out.error from None


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to `<path>.<pid>.tmp`, fsync, rename. On any failure the temp file is removed; a full disk
    (or quota) becomes a DiskFullError naming the file and the space it needs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two ranks may save the same file
    try:
        with open(tmp, "wb") as f:
            _save_reporting_write_errors(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full(e, path, f" (needs ~{_size(tensor_bytes(obj))}, {_size(shutil.disk_usage(path.parent).free)}"
                                  " free)") if isinstance(e, OSError) else None
        if full is None:
            raise
        raise full from e


def disk_full(err: OSError, path: Path, detail: str = "") -> Optional[DiskFullError]:
    """The DiskFullError for an ENOSPC / EDQUOT error while writing `path` (None for any other error)."""
    if isinstance(err, DiskFullError) or err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return DiskFullError(err.errno, f"no space left on device writing {path}{detail}; free some space and resume: "
                                    "the previous checkpoints are intact")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`path` gets `text` whole or not at all (temp file + rename; a full disk is a DiskFullError)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        full = disk_full(e, path)
        if full is None:
            raise
        raise full from e


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_named(path: str | os.PathLike, key: str) -> dict:
    """load() of a file a config key names: a missing or unreadable file is a ValueError naming the key and why."""
    if not Path(path).is_file():
        raise ValueError(f"{key}={str(path)!r}: no such file")
    try:
        return load(path)
    except Exception as e:  # truncated zip, bad pickle, ...: re-raised with the key, never swallowed
        raise ValueError(f"{key}={str(path)!r} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from e


def candidates(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Resumable checkpoints, newest first: the '-last' one, then the top-k ones (full states too), by mtime."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    files = [p for p in d.glob("*.ckpt") if not Path(str(p) + "-unfinished").exists()]
    return sorted(files, key=lambda p: (p.name.endswith("-last.ckpt"), p.stat().st_mtime_ns), reverse=True)


def load_latest(ckpt_dir: str | os.PathLike,
                unreadable: Optional[list] = None) -> tuple[Optional[Path], Optional[dict]]:
    """The newest checkpoint that loads; a damaged one is skipped with a warning (falls back to the previous) and,
    when `unreadable` is a list, appended to it as (path, reason)."""
    for path in candidates(ckpt_dir):
        try:
            return path, load(path)
        except Exception as e:  # truncated zip, bad pickle, ...: any unreadable file
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            if unreadable is not None:
                unreadable.append((path, reason))
            warnings.warn(f"checkpoint {path} is unreadable ({reason}); trying the previous one", stacklevel=2)
    return None, None


def state(*, model, optimizer, scheduler, scaler, train_state: TrainState, loader_state: dict, config: dict,
          health: Optional[dict] = None) -> dict:
    """The checkpoint dict; `global_step` and `epoch` also sit at the top level, where Lightning puts them. `health`:
    HealthMonitor.state_dict() (the running code prior behind context_gain)."""
    return {
        "format_version": FORMAT_VERSION,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "global_step": int(train_state.step),
        "epoch": int(train_state.epoch),
        "train_state": dataclasses.asdict(train_state),
        "loader": loader_state,
        "rng": rng_state(),
        "config": config,
        "health": health,
    }


def restore(ckpt: dict, *, model, optimizer, scheduler, scaler) -> TrainState:
    """Load every part into the given objects and set the RNG states; returns the loop's TrainState."""
    model.load_state_dict(ckpt["state_dict"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    if "train_state" in ckpt:
        return TrainState(**ckpt["train_state"])
    # files written before TrainState existed: the counters they held
    return TrainState(step=ckpt["global_step"], epoch=ckpt["epoch"], topk=ckpt.get("topk", {}).get("best", []))

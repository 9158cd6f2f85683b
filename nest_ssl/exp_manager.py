"""NeMo's `exp_manager` section: run directory layout, top-k checkpoint naming, `.nemo` export,
and the checkpoint writer.

Layout (as NeMo):  <exp_dir or ./nemo_experiments>/<name>[/<version>]/
    checkpoints/<name>--val_loss=4.431-step=3.ckpt      top-k by monitor/mode (save_top_k)
    checkpoints/<name>--val_loss=4.431-step=3-last.ckpt latest (the one resume picks)
    checkpoints/<name>.nemo                             best model (always_save_nemo), via nest_ssl.nemo_io
    version_0/events.out.tfevents.*                     TensorBoard (NeMo's TensorBoardLogger layout)
    config.yaml                                         resolved run config
With resume_if_exists there is no version dir (NeMo's behaviour); without it version = a datetime string.
NeMo keys accepted for schema compatibility that have no effect here are listed in run_config.IGNORED_KEYS.

The writer only ever deletes files in its own checkpoint directory whose names it writes (the pattern above, their
`.<pid>.tmp` temp files, `<name>.nemo.tmp`); top-k entries are file names relative to that directory, so a copied
run directory never reaches back into the original.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from nest_ssl import checkpoint as ckpt
from nest_ssl import dcp_checkpoint, distributed
from nest_ssl.export import save_nemo


@dataclass
class CheckpointCallbackParams:
    """`exp_manager.checkpoint_callback_params` (NeMo's CallbackParams keys and defaults)."""

    filepath: Optional[str] = None  # deprecated in NeMo
    dirpath: Optional[str] = None
    filename: Optional[str] = None
    monitor: Optional[Literal["val_loss", "probe_cer", "probe_wer", "probe_acc"]] = "val_loss"  # None: only -last
    # (probe_* are ours: trainer.probe's scores; probe_acc wants mode: max)
    verbose: Optional[bool] = True
    save_last: Optional[bool] = True
    save_top_k: Optional[int] = 3
    save_weights_only: Optional[bool] = False
    mode: Literal["min", "max"] = "min"
    auto_insert_metric_name: bool = True
    every_n_epochs: Optional[int] = 1
    every_n_train_steps: Optional[int] = None
    train_time_interval: Optional[Any] = None
    prefix: Optional[str] = None
    postfix: str = ".nemo"
    save_best_model: bool = False
    always_save_nemo: bool = False
    save_nemo_on_train_end: Optional[bool] = True
    model_parallel_size: Optional[int] = None
    save_on_train_epoch_end: Optional[bool] = False
    async_save: Optional[bool] = False  # sharded (fsdp) checkpoints only: written in the background
    save_last_n_optim_states: Optional[int] = -1


@dataclass
class ExpManagerConfig:
    """`exp_manager` (NeMo's ExpManagerConfig keys used by NEST plus the common ones)."""

    explicit_log_dir: Optional[str] = None
    exp_dir: Optional[str] = None
    name: Optional[str] = None
    version: Optional[str] = None
    use_datetime_version: bool = True
    resume_if_exists: bool = False
    resume_past_end: bool = False
    resume_ignore_no_checkpoint: bool = False
    resume_from_checkpoint: Optional[str] = None
    # ours: when every checkpoint in the run directory is unreadable, start from step 0 (they and the .nemo are moved
    # to checkpoints/unreadable-<datetime>/, nothing is overwritten) instead of stopping with an error
    resume_ignore_unreadable_checkpoints: bool = False
    create_tensorboard_logger: bool = True
    summary_writer_kwargs: Optional[dict] = None
    create_wandb_logger: bool = False
    wandb_logger_kwargs: Optional[dict] = None
    create_mlflow_logger: bool = False
    mlflow_logger_kwargs: Optional[dict] = None
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = field(default_factory=CheckpointCallbackParams)
    files_to_copy: Optional[list] = None
    log_step_timing: bool = True
    log_local_rank_0_only: bool = False
    log_global_rank_0_only: bool = False
    disable_validation_on_resume: bool = True
    max_time_per_run: Optional[str] = None


def log_dir(cfg: ExpManagerConfig, run_name: str) -> Path:
    """NeMo's log_dir: explicit_log_dir, else exp_dir/name[/version]."""
    if cfg.explicit_log_dir:
        return Path(cfg.explicit_log_dir)
    root = Path(cfg.exp_dir or "nemo_experiments") / (cfg.name or run_name)
    if cfg.resume_if_exists:
        return root if cfg.version is None else root / cfg.version
    version = cfg.version or (time.strftime("%Y-%m-%d_%H-%M-%S") if cfg.use_datetime_version else None)
    return root / version if version else root


def check_writable(cfg: ExpManagerConfig, run_name: str) -> None:
    """ValueError naming the key when the run directory or the checkpoint directory cannot be created or written
    (a read-only file system, no permission): at start-up, before any work, not as a traceback at the first save.
    os.access asks the kernel, which refuses a read-only mount even to root."""
    dirs = [("exp_manager.explicit_log_dir", cfg.explicit_log_dir)] if cfg.explicit_log_dir else \
        [("exp_manager.exp_dir" if cfg.exp_dir else "exp_manager.exp_dir (unset: ./nemo_experiments)",
          Path(cfg.exp_dir or "nemo_experiments") / (cfg.name or run_name))]
    if cfg.checkpoint_callback_params.dirpath:
        dirs.append(("exp_manager.checkpoint_callback_params.dirpath", cfg.checkpoint_callback_params.dirpath))
    for key, wanted in dirs:
        path = Path(wanted).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ValueError(f"{key}: cannot create the directory {path}: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            why = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "no write permission"
            raise ValueError(f"{key}: cannot write the run directory {path}: {existing} is not writable ({why}); "
                             "point the key at a writable directory")


def checkpoint_dir(cfg: ExpManagerConfig, logdir: Path) -> Path:
    return Path(cfg.checkpoint_callback_params.dirpath or logdir / "checkpoints")


PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w/]*)(:[^}]*)?\}")


def format_name(pattern: Optional[str], name: str, metrics: dict) -> str:
    """Lightning's ModelCheckpoint filename: '{val_loss:.3f}' -> 'val_loss=4.431' (auto_insert_metric_name)."""
    pattern = pattern or default_pattern(name)

    def sub(m: re.Match) -> str:
        key, spec = m.group(1), m.group(2) or ""
        if key not in metrics:
            raise ValueError(f"checkpoint filename pattern {pattern!r} names {key!r}; available: {sorted(metrics)}")
        return f"{key}=" + format(metrics[key], spec[1:] if spec else "")
    return PLACEHOLDER.sub(sub, pattern)


def default_pattern(name: str) -> str:
    return name + "--{" + "val_loss:.3f}-{step}"


def checkpoint_name_re(pattern: Optional[str], name: str) -> re.Pattern:
    """The checkpoint file names format_name can produce for this pattern (top-k and -last), e.g.
    `tiny--val_loss=3.372-step=375(-last).ckpt`; group 1 is the stem without `-last`."""
    pattern, body, end = pattern or default_pattern(name), "", 0
    for m in PLACEHOLDER.finditer(pattern):
        body += re.escape(pattern[end:m.start()]) + re.escape(m.group(1)) + "=[^/]*?"
        end = m.end()
    return re.compile(f"^({body}{re.escape(pattern[end:])})(-last)?\\.ckpt$")


@dataclass
class TopK:
    """The save_top_k policy: which val_loss scores earn a file, and which files drop out."""

    k: int       # 0: none, -1: every one
    mode: str    # "min" | "max"

    def better(self, best: list, score: float) -> bool:
        if self.k == 0:
            return False
        if self.k < 0 or len(best) < self.k:
            return True
        worst = best[-1][0]
        return score < worst if self.mode == "min" else score > worst

    def add(self, best: list, score: float, path: str) -> tuple[list, list[str]]:
        """(the new best list, best first; the paths that dropped out of it)."""
        best = sorted([*best, [float(score), str(path)]], key=lambda t: t[0], reverse=self.mode == "max")
        if self.k < 0:
            return best, []
        return best[:self.k], [p for _, p in best[self.k:]]


class CheckpointWriter:
    """exp_manager's checkpoint policy: after each validation (and at the end of the run) the `-last` checkpoint
    replaces the previous one, a top-k file is written when the monitored score (val_loss, or a trainer.probe score
    right after the probe ran) earns one (files falling out of the top k are deleted), and with always_save_nemo the
    best model also goes to `<prefix or name>.nemo`.

    Rank 0 writes and every rank waits at a barrier; `sync=False` is for a rank that failed alone: it writes the
    `-last` file itself (model and optimizer are replicated) without the barrier and without touching the top k.

    `sharded=True` (trainer.strategy: fsdp): every rank writes its shards of the same checkpoints as `.dcp`
    directories (dcp_checkpoint.py), the `-last` one in the background with `async_save`; a rank that failed alone
    cannot write a sharded checkpoint, so then the last complete one stays the resume point."""

    def __init__(self, cfg: ExpManagerConfig, name: str, ckpt_dir: Path, config: dict, is_main: bool, *, model,
                 optimizer, scheduler, scaler, sharded: bool = False, health=None):
        ccp = cfg.checkpoint_callback_params
        self.enabled, self.ccp, self.name, self.dir, self.config = cfg.create_checkpoint_callback, ccp, name, \
            ckpt_dir, config
        self.is_main, self.topk = is_main, TopK(ccp.save_top_k if ccp.monitor else 0, ccp.mode)
        self.parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        self.saved_step = -1  # the step of the latest save: the end of the run does not write it twice
        self.last: Optional[Path] = None  # the latest -last file this process wrote
        self.ours = checkpoint_name_re(ccp.filename, name)
        self.nemo_name = f"{ccp.prefix or name}.nemo"
        self.sharded, self.pending = sharded, None  # pending: (AsyncSave, names to delete once it is committed)
        self.health = health  # a HealthMonitor: its running code prior goes into every checkpoint

    def _is_ours(self, name: str) -> bool:
        return bool(self.ours.match(name))

    def _remove(self, name: str) -> None:
        """Delete one of our checkpoint files, by name, in this run's checkpoint directory only."""
        name = Path(name).name  # top-k entries of older checkpoints were absolute paths: never follow them out
        if self._is_ours(name):
            (self.dir / name).unlink(missing_ok=True)

    def tidy(self, state: ckpt.TrainState) -> list[str]:
        """At start-up (rank 0): remove temp files a killed save left behind (only names this writer writes) and
        re-derive the top k from the files on disk: entries whose file is gone are dropped, top-k files the list
        does not hold (a save killed before it deleted them) are removed. Returns what was removed."""
        if not self.dir.is_dir():
            return []
        tmp = re.compile(f"^(?:{self.ours.pattern[1:-1]}\\.\\d+|{re.escape(self.nemo_name)}(?:\\.\\d+)?)\\.tmp$")
        # a sharded run's entries are .dcp directories: every rank must keep the same list (each decides alone
        # whether a save is a top-k one, and that save is a collective)
        state.topk = [[score, Path(p).name] for score, p in state.topk
                      if (self.dir / Path(p).name).is_file() or dcp_checkpoint.is_complete(self.dir / Path(p).name)]
        keep = {name for _, name in state.topk}
        removed = []
        for path in sorted(self.dir.iterdir()):
            m = self.ours.match(path.name)
            stale = bool(tmp.match(path.name)) or (m is not None and m.group(2) is None and path.name not in keep)
            if stale and path.is_file():
                path.unlink()
                removed.append(path.name)
        return removed

    def set_aside(self, unreadable: list) -> Path:
        """Move the unreadable checkpoints and the .nemo to checkpoints/unreadable-<datetime>/: a fresh start then
        overwrites none of them."""
        aside = self.dir / time.strftime("unreadable-%Y-%m-%d_%H-%M-%S")
        if self.is_main:
            aside.mkdir()
            for path in [p for p, _ in unreadable] + [self.dir / self.nemo_name]:
                if Path(path).exists():
                    Path(path).rename(aside / Path(path).name)
        distributed.barrier()
        return aside

    def save(self, state: ckpt.TrainState, loader_state: dict, sync: bool = True, rank: bool = True) -> Optional[Path]:
        """Write the checkpoints for `state`; returns the -last path (None on ranks that do not write). rank=False:
        the monitored score is not new (e.g. a probe score at a validation step), so no top-k file."""
        self.saved_step, last = state.step, None
        if self.sharded:
            if self.enabled and sync:
                last = self.last = self._write_sharded(state, loader_state, rank)
            return last
        if self.enabled and (self.is_main or not sync):
            last = self.last = self._write(state, loader_state, sync and rank)
        if sync:
            distributed.barrier()
        return last

    def finish(self, close: bool = False) -> None:
        """Commit a background write (before the next one and, with close=True, at the end of the run)."""
        if self.pending is not None:
            pending, stale = self.pending
            self.pending = None
            pending.wait()
            self._remove_dirs(stale)
        if close and self.sharded:
            distributed.barrier()  # every rank's background write is done before its group goes
            dcp_checkpoint.close()

    def _remove_dirs(self, names) -> None:
        """Delete sharded checkpoint directories of this run by name (rank 0)."""
        if self.is_main:
            for name in names:
                name = Path(name).name
                if name.endswith(dcp_checkpoint.SUFFIX) and self._is_ours(name[:-len(dcp_checkpoint.SUFFIX)] + ".ckpt"):
                    shutil.rmtree(self.dir / name, ignore_errors=True)

    def _health_state(self) -> Optional[dict]:
        return None if self.health is None else self.health.state_dict()

    @property
    def monitors_probe(self) -> bool:
        return str(self.ccp.monitor).startswith("probe_")

    def _stem_and_topk(self, state: ckpt.TrainState, rank: bool, suffix: str) -> tuple[str, Path, bool, list]:
        scores = {"probe_cer": math.nan, "probe_wer": math.nan, "probe_acc": math.nan, **state.last_probe,
                  "val_loss": state.last_val}
        stem = format_name(self.ccp.filename, self.name, {**scores, "step": state.step, "epoch": state.epoch})
        top_path, dropped, score = self.dir / f"{stem}{suffix}", [], scores.get(self.ccp.monitor, math.nan)
        is_top = rank and math.isfinite(score) and self.topk.better(state.topk, score)
        if is_top:  # names relative to the checkpoint directory
            state.topk, dropped = self.topk.add(state.topk, score, top_path.name)
        return stem, top_path, is_top, dropped

    def _write(self, state: ckpt.TrainState, loader_state: dict, rank: bool) -> Path:
        stem, top_path, is_top, dropped = self._stem_and_topk(state, rank, ".ckpt")
        saved = ckpt.state(**self.parts, train_state=dataclasses.replace(state, micro=0), loader_state=loader_state,
                           config=self.config, health=self._health_state())
        if is_top:
            ckpt.atomic_save(saved, top_path)
            if self.ccp.always_save_nemo and Path(state.topk[0][1]).name == top_path.name:
                self._save_nemo()
        last = self.dir / f"{stem}-last.ckpt"
        ckpt.atomic_save(saved, last)
        for old in dropped + [p.name for p in self.dir.glob("*-last.ckpt") if p != last]:
            self._remove(old)
        return last

    def _save_nemo(self) -> None:
        path = self.dir / self.nemo_name
        try:
            save_nemo(self.parts["model"], self.config["model"], path)
        except OSError as e:
            Path(f"{path}.tmp").unlink(missing_ok=True)  # nemo_io's temp file
            full = ckpt.disk_full(e, path)
            if full is None:
                raise
            raise full from e

    def _write_sharded(self, state: ckpt.TrainState, loader_state: dict, rank: bool) -> Path:
        self.finish()
        stem, top_path, is_top, dropped = self._stem_and_topk(state, rank, dcp_checkpoint.SUFFIX)
        model, optimizer, scheduler = self.parts["model"], self.parts["optimizer"], self.parts["scheduler"]
        shared = {"train_state": dataclasses.asdict(dataclasses.replace(state, micro=0)), "global_step": state.step,
                  "epoch": state.epoch, "config": self.config,
                  "scheduler": None if scheduler is None else scheduler.state_dict(), "health": self._health_state()}
        per_rank = {"rng": ckpt.rng_state(), "loader": loader_state}
        if is_top:
            dcp_checkpoint.save(top_path, model, optimizer, shared, per_rank)
            if self.ccp.always_save_nemo and Path(state.topk[0][1]).name == top_path.name:
                nemo = self.dir / self.nemo_name  # rank 0 writes it; a full disk there stops every rank
                dcp_checkpoint.save_on_rank0(lambda: _save_nemo_from_dcp(top_path, self.config, nemo), nemo,
                                             nemo.with_name(nemo.name + ".tmp"))
        last = self.dir / f"{stem}-last{dcp_checkpoint.SUFFIX}"
        stale = dropped + [p.name for p in self.dir.glob(f"*-last{dcp_checkpoint.SUFFIX}") if p != last]
        written = dcp_checkpoint.save(last, model, optimizer, shared, per_rank, async_save=bool(self.ccp.async_save))
        self.pending = (written, stale) if isinstance(written, dcp_checkpoint.AsyncSave) else None
        if self.pending is None:
            self._remove_dirs(stale)
        return last


def _save_nemo_from_dcp(path: Path, config: dict, out: Path) -> None:
    """The .nemo of a sharded checkpoint: its full weights read back in this process into a fresh model."""
    from nest_ssl.nemo_compat import build_model

    _, weights = dcp_checkpoint.read_weights(path)
    model = build_model(config["model"])
    model.load_state_dict(weights, strict=True)
    save_nemo(model, config["model"], out)

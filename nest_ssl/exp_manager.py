"""NeMo's `exp_manager` section: run directory layout, top-k checkpoint naming, `.nemo` export (spec §7.3).

Layout (as NeMo):  <exp_dir or ./nemo_experiments>/<name>[/<version>]/
    checkpoints/<name>--val_loss=4.431-step=3.ckpt      top-k by monitor/mode (save_top_k)
    checkpoints/<name>--val_loss=4.431-step=3-last.ckpt latest (the one resume picks)
    checkpoints/<name>.nemo                             best model (always_save_nemo), via nest_ssl.nemo_io
    version_0/events.out.tfevents.*                     TensorBoard (NeMo's TensorBoardLogger layout)
    config.yaml                                         resolved run config
With resume_if_exists there is no version dir (NeMo's behaviour); without it version = a datetime string.
W&B keys are accepted for schema compatibility and ignored with a warning.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class CheckpointCallbackParams:
    """`exp_manager.checkpoint_callback_params` (NeMo's CallbackParams keys and defaults)."""

    filepath: Optional[str] = None  # deprecated in NeMo
    dirpath: Optional[str] = None
    filename: Optional[str] = None
    monitor: Optional[str] = "val_loss"
    verbose: Optional[bool] = True
    save_last: Optional[bool] = True
    save_top_k: Optional[int] = 3
    save_weights_only: Optional[bool] = False
    mode: Optional[str] = "min"
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
    async_save: Optional[bool] = False
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
    create_tensorboard_logger: bool = True
    summary_writer_kwargs: Optional[dict] = None
    create_wandb_logger: bool = False         # accepted, ignored (warning)
    wandb_logger_kwargs: Optional[dict] = None
    create_mlflow_logger: bool = False        # accepted, ignored (warning)
    mlflow_logger_kwargs: Optional[dict] = None
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = field(default_factory=CheckpointCallbackParams)
    files_to_copy: Optional[list] = None
    log_step_timing: bool = True
    log_local_rank_0_only: bool = False
    log_global_rank_0_only: bool = False
    disable_validation_on_resume: bool = True
    max_time_per_run: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.checkpoint_callback_params, dict):
            from nest_ssl.config import from_dict
            self.checkpoint_callback_params = from_dict(
                CheckpointCallbackParams, self.checkpoint_callback_params, "exp_manager.checkpoint_callback_params")
        elif self.checkpoint_callback_params is None:
            self.checkpoint_callback_params = CheckpointCallbackParams()
        if self.checkpoint_callback_params.mode not in ("min", "max"):
            raise ValueError(f"exp_manager.checkpoint_callback_params.mode="
                             f"{self.checkpoint_callback_params.mode!r}; allowed: 'min', 'max'")
        if self.create_wandb_logger or self.create_mlflow_logger:
            warnings.warn("exp_manager: W&B / MLflow loggers are not supported; only TensorBoard is written",
                          stacklevel=2)


def log_dir(cfg: ExpManagerConfig, run_name: str) -> Path:
    """NeMo's log_dir: explicit_log_dir, else exp_dir/name[/version]."""
    if cfg.explicit_log_dir:
        return Path(cfg.explicit_log_dir)
    root = Path(cfg.exp_dir or "nemo_experiments") / (cfg.name or run_name)
    if cfg.resume_if_exists:
        return root if cfg.version is None else root / cfg.version
    version = cfg.version or (time.strftime("%Y-%m-%d_%H-%M-%S") if cfg.use_datetime_version else None)
    return root / version if version else root


def checkpoint_dir(cfg: ExpManagerConfig, logdir: Path) -> Path:
    return Path(cfg.checkpoint_callback_params.dirpath or logdir / "checkpoints")


def format_name(pattern: Optional[str], name: str, metrics: dict) -> str:
    """Lightning's ModelCheckpoint filename: '{val_loss:.3f}' -> 'val_loss=4.431' (auto_insert_metric_name)."""
    if not pattern:
        pattern = name + "--{" + "val_loss:.3f}-{step}"

    def sub(m: re.Match) -> str:
        key, spec = m.group(1), m.group(2) or ""
        if key not in metrics:
            raise ValueError(f"checkpoint filename pattern {pattern!r} names {key!r}; available: {sorted(metrics)}")
        return f"{key}=" + format(metrics[key], spec[1:] if spec else "")
    return re.sub(r"\{([A-Za-z_][\w/]*)(:[^}]*)?\}", sub, pattern)


class TopK:
    """Tracks the save_top_k best checkpoints by `monitor`; returns the files to delete after each save."""

    def __init__(self, k: int, mode: str):
        self.k, self.mode, self.best = k, mode, []  # best: [(score, path)]

    def better(self, score: float) -> bool:
        if self.k == 0:
            return False
        if self.k < 0 or len(self.best) < self.k:
            return True
        worst = self.best[-1][0]
        return score < worst if self.mode == "min" else score > worst

    def add(self, score: float, path: str) -> list[str]:
        self.best.append((float(score), str(path)))
        self.best.sort(key=lambda t: t[0], reverse=self.mode == "max")
        drop = self.best[self.k:] if self.k >= 0 else []
        self.best = self.best[:self.k] if self.k >= 0 else self.best
        return [p for _, p in drop]

    def state_dict(self) -> dict:
        return {"best": [[s, p] for s, p in self.best]}

    def load_state_dict(self, state: dict) -> None:
        self.best = [(float(s), str(p)) for s, p in state.get("best", [])]

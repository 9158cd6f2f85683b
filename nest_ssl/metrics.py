"""Run logging: TensorBoard scalars and a progress line, through one object.

Rank 0 gets a `Logger`; other ranks a `NullLogger` with the same methods, so the loop has no rank branches.
Tag names follow NeMo where NeMo has one (`train_loss`, `learning_rate`, `val_loss`, `global_step`); ours are
`grad_norm`, `audio_seconds_per_second`, `tokens_masked`, `gpu_memory` (GiB, peak) and `skipped_samples`, the
`health/*` and `val_health/*` metrics of nest_ssl/health.py, and trainer.probe's `probe_cer`, `probe_wer`,
`probe_acc`, `probe_train_loss` and `probe/layer_weight_<i>`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional


class NullLogger:
    def scalars(self, step: int, values: dict) -> None:
        pass

    def progress(self, step: int, max_steps: int, values: dict) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass


class Logger(NullLogger):
    def __init__(self, tb_dir: Optional[Path], progress: bool = True, stream=None):
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tb_dir))
        self.show_progress, self.stream = progress, stream or sys.stdout
        self.t0, self.step0 = time.time(), None

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag, float(v), step)
        self.writer.flush()

    def progress(self, step: int, max_steps: int, values: dict) -> None:
        if not self.show_progress:
            return
        if self.step0 is None:
            self.step0, self.t0 = step, time.time()
        parts = [f"step {step}" + (f"/{max_steps}" if max_steps > 0 else "")]
        parts += [f"{k} {v:.4g}" for k, v in values.items() if v is not None]
        done = step - self.step0
        if max_steps > 0 and done > 0:
            eta = (time.time() - self.t0) / done * (max_steps - step)
            parts.append(f"eta {int(eta // 3600):d}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def info(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def make_logger(is_main: bool, tb_dir: Optional[Path], progress: bool) -> NullLogger:
    return Logger(tb_dir, progress) if is_main else NullLogger()

"""Optimizers and LR schedules from NeMo's `model.optim` section.

Parameter groups follow NeMo's default exactly: one group holding *every* parameter, frozen ones included
(they never get a gradient, so AdamW skips them) and no weight-decay exclusion. `weight_decay_exclusions: true`
is our documented extra: norms, biases, `pos_bias_u/v` and BatchNorm affine params go to a second group with
weight_decay 0 (the usual transformer recipe; off by default to stay number-for-number with NeMo).

Scheduler step semantics match Lightning's `interval: step`: the scheduler is built with last_epoch=0 and
stepped after every optimizer step, so optimizer step k (0-based) uses lr(max(1, k)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

import torch
from torch import nn

Optimizer = Literal["adamw", "adam", "sgd"]
Schedule = Literal["NoamAnnealing", "CosineAnnealing", "WarmupAnnealing", "InverseSquareRootAnnealing", "constant"]
OPTIMIZERS, SCHEDULERS = get_args(Optimizer), get_args(Schedule)


@dataclass
class SchedConfig:
    """`model.optim.sched`. `max_steps` is injected from trainer.max_steps when left None (as NeMo does)."""

    name: Schedule = "NoamAnnealing"
    d_model: Optional[int] = None
    warmup_steps: Optional[int] = None
    warmup_ratio: Optional[float] = None
    min_lr: float = 0.0
    max_steps: Optional[int] = None
    # NeMo keys whose other values would change the schedule and are not implemented: only their defaults load
    hold_steps: Literal[None] = None   # NeMo's hold variants
    hold_ratio: Literal[None] = None
    last_epoch: Literal[-1] = -1
    interval: Literal["step"] = "step"
    frequency: Literal[1] = 1
    reduce_on_plateau: Literal[False] = False
    monitor: str = "loss"    # ReduceLROnPlateau's metric: without it, no effect (run_config.IGNORED_KEYS)


@dataclass
class OptimConfig:
    """`model.optim`: NeMo optimizer name + its torch kwargs, and `sched`."""

    name: Optimizer = "adamw"
    lr: float = 5.0
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    eps: float = 1e-8
    amsgrad: bool = False
    momentum: float = 0.0     # sgd only
    nesterov: bool = False    # sgd only
    dampening: float = 0.0    # sgd only
    foreach: Optional[bool] = None
    fused: Optional[bool] = None
    sched: Optional[SchedConfig] = None
    weight_decay_exclusions: bool = False  # ours: see module docstring


def _no_decay(module: nn.Module, name: str, p: nn.Parameter) -> bool:
    return name.endswith("bias") or "pos_bias" in name or p.ndim <= 1 or isinstance(
        module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    if not cfg.weight_decay_exclusions:
        return [{"params": list(model.parameters())}]  # NeMo: all params, frozen included, all decayed
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (no_decay if _no_decay(module, name, p) else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    name = cfg.name.lower()
    extra = {"foreach": cfg.foreach} if cfg.foreach is not None else {}
    if cfg.fused is not None:
        extra["fused"] = cfg.fused
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                   amsgrad=cfg.amsgrad, **extra)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, **extra)
    raise ValueError(f"model.optim.name={cfg.name!r} is not supported; allowed: {OPTIMIZERS}")


# ------------------------------------------------------------------------------------------------ lr formulas
def _warmup(sched: SchedConfig, max_steps: Optional[int]) -> int:
    if sched.warmup_steps is not None and sched.warmup_ratio is not None:
        raise ValueError("model.optim.sched: set only one of warmup_steps and warmup_ratio")
    if sched.warmup_ratio is not None:
        if max_steps is None:
            raise ValueError("model.optim.sched.warmup_ratio needs max_steps (trainer.max_steps)")
        return int(sched.warmup_ratio * max_steps)
    return int(sched.warmup_steps or 0)


def noam_lr(base_lr: float, step: int, d_model: int, warmup: int, min_lr: float) -> float:
    """NeMo NoamAnnealing: base·d^-1/2·min(s^-1/2, s·w^-3/2), s = max(1, step); min_lr floor only after warmup."""
    s = max(1, step)
    mult = s ** -0.5 if warmup <= 0 else min(s ** -0.5, s * warmup ** -1.5)
    lr = base_lr * d_model ** -0.5 * mult
    return max(lr, min_lr) if s > warmup else lr


def lr_at(sched: SchedConfig, base_lr: float, step: int, max_steps: Optional[int]) -> float:
    """The lr optimizer step `step` (0-based) uses."""
    warmup, name, min_lr = _warmup(sched, max_steps), sched.name, sched.min_lr
    if name == "NoamAnnealing":
        if sched.d_model is None:
            raise ValueError("model.optim.sched.d_model is required for NoamAnnealing")
        return noam_lr(base_lr, step, sched.d_model, warmup, min_lr)
    # NeMo's WarmupPolicy family: linear warmup (step + 1) / (warmup + 1) up to and including step == warmup,
    # min_lr after max_steps, the decay formula in between.
    if warmup > 0 and step <= warmup:
        return base_lr * (step + 1) / (warmup + 1)
    if name == "constant":
        return base_lr
    if name == "InverseSquareRootAnnealing":
        if max_steps is not None and step > max_steps:
            return min_lr
        return base_lr / ((step + 1) / (warmup + 1)) ** 0.5
    if max_steps is None:
        raise ValueError(f"model.optim.sched.name={name!r} needs max_steps (trainer.max_steps > 0)")
    if step > max_steps:
        return min_lr
    frac = (step - warmup) / (max_steps - warmup)
    if name == "CosineAnnealing":
        return (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac)) + min_lr
    if name == "WarmupAnnealing":
        return min_lr + (1.0 - frac) * (base_lr - min_lr)
    raise ValueError(f"model.optim.sched.name={name!r} is not supported; allowed: {SCHEDULERS}")


class Scheduler(torch.optim.lr_scheduler.LRScheduler):
    """One LRScheduler for all NeMo schedules; lr computed in closed form from last_epoch (resume-safe)."""

    def __init__(self, optimizer: torch.optim.Optimizer, sched: SchedConfig, max_steps: Optional[int]):
        if sched.name not in SCHEDULERS:
            raise ValueError(f"model.optim.sched.name={sched.name!r} is not supported; allowed: {SCHEDULERS}")
        self.sched, self.max_steps = sched, max_steps
        _warmup(sched, max_steps)  # validate early
        for g in optimizer.param_groups:
            lr = g.get("initial_lr", g["lr"])
            if lr < sched.min_lr:
                raise ValueError(f"model.optim.lr={lr} is below model.optim.sched.min_lr={sched.min_lr}")
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr_at(self.sched, base, self.last_epoch, self.max_steps) for base in self.base_lrs]

    def state_dict(self) -> dict:
        # plain types only so checkpoints load with weights_only=True
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "sched")}


def build_scheduler(optimizer, cfg: OptimConfig, trainer_max_steps: Optional[int]):
    """None when `sched` is absent (constant lr, as NeMo)."""
    if cfg.sched is None:
        return None
    max_steps = cfg.sched.max_steps
    if max_steps is None and trainer_max_steps is not None and trainer_max_steps > 0:
        max_steps = trainer_max_steps  # NeMo injects trainer.max_steps
    return Scheduler(optimizer, cfg.sched, max_steps)

"""Optimizers, parameter groups and LR schedules (NoamAnnealing against NeMo's fixture)."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import PARITY
from nest_ssl.config import from_dict
from nest_ssl.optim import OptimConfig, SchedConfig, build_optimizer, build_scheduler, lr_at, param_groups

NOAM = json.loads((PARITY / "nest_tiny" / "noam.json").read_text())


def lrs_by_stepping(cfg: OptimConfig, steps, max_steps):
    """Drive the real scheduler like the loop does (one scheduler.step() per optimizer step)."""
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.zeros(2)
    opt = build_optimizer(nn.ParameterList([p]), cfg)
    sched = build_scheduler(opt, cfg, max_steps)
    got = {}
    for k in range(max(steps) + 1):
        got[k] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return [got[s] for s in steps]


@pytest.mark.parametrize("key", ["config", "warmup10_d64"])
def test_noam_matches_nemo_fixture(key):
    case = NOAM[key]
    sched = {k: case["sched"][k] for k in ("name", "d_model", "warmup_steps", "warmup_ratio", "min_lr")}
    cfg = from_dict(OptimConfig, {"name": "adamw", "lr": case["optimizer_defaults"]["lr"], "sched": sched})
    steps = [s for s in case["steps"] if s <= 30000]  # stepping 500k times is slow; the closed form covers the rest
    got = lrs_by_stepping(cfg, steps, case["sched"]["max_steps"])
    ref = dict(zip(case["steps"], case["lr"]))
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor([ref[s] for s in steps], dtype=torch.float64), rtol=1e-12, atol=0)
    closed = [lr_at(cfg.sched, cfg.lr, s, case["sched"]["max_steps"]) for s in case["steps"]]
    torch.testing.assert_close(torch.tensor(closed, dtype=torch.float64),
                               torch.tensor(case["lr"], dtype=torch.float64), rtol=1e-12, atol=0)


def test_param_groups_are_nemo_default():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model[0].weight.requires_grad_(False)  # frozen params are still in the (single) group
    groups = param_groups(model, OptimConfig())
    assert len(groups) == 1 and len(groups[0]["params"]) == 4
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    assert opt.param_groups[0]["weight_decay"] == 0.1 and isinstance(opt, torch.optim.AdamW)


def test_weight_decay_exclusions_option():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    decay, no_decay = param_groups(model, OptimConfig(weight_decay_exclusions=True))
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 5 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_other_optimizers(name, cls):
    assert isinstance(build_optimizer(nn.Linear(2, 2), OptimConfig(name=name)), cls)


def test_bad_names_and_min_lr_raise():
    with pytest.raises(ValueError, match="allowed"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(name="lamb"))
    opt = build_optimizer(nn.Linear(2, 2), OptimConfig(lr=1e-7))
    with pytest.raises(ValueError, match="min_lr"):
        build_scheduler(opt, OptimConfig(lr=1e-7, sched=SchedConfig(d_model=4, warmup_steps=2, min_lr=1e-6)), 10)
    with pytest.raises(ValueError, match="allowed"):
        build_scheduler(opt, OptimConfig(sched=SchedConfig(name="Poly")), 10)


def test_min_lr_only_after_warmup():
    s = SchedConfig(d_model=64, warmup_steps=100, min_lr=1.0)
    assert lr_at(s, 5.0, 50, None) < 1.0 and lr_at(s, 5.0, 101, None) == 1.0


def test_warmup_ratio_uses_injected_max_steps():
    by_ratio = SchedConfig(d_model=64, warmup_ratio=0.1)
    by_steps = SchedConfig(d_model=64, warmup_steps=100)
    assert [lr_at(by_ratio, 5.0, s, 1000) for s in (1, 50, 100, 500)] == \
        [lr_at(by_steps, 5.0, s, 1000) for s in (1, 50, 100, 500)]
    with pytest.raises(ValueError, match="max_steps"):
        lr_at(by_ratio, 5.0, 10, None)


@pytest.mark.parametrize("name", ["CosineAnnealing", "WarmupAnnealing"])
def test_annealing_ends_at_min_lr(name):
    s = SchedConfig(name=name, warmup_steps=10, min_lr=0.01)
    assert lr_at(s, 1.0, 9, 100) == pytest.approx(10 / 11)  # NeMo's linear warmup (step + 1) / (warmup + 1)
    assert lr_at(s, 1.0, 10, 100) == pytest.approx(1.0) and lr_at(s, 1.0, 100, 100) == pytest.approx(0.01)
    assert lr_at(s, 1.0, 101, 100) == 0.01
    lrs = [lr_at(s, 1.0, k, 100) for k in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_inverse_sqrt_and_constant():
    s = SchedConfig(name="InverseSquareRootAnnealing", warmup_steps=0)
    assert lr_at(s, 1.0, 99, None) == pytest.approx(1 / math.sqrt(100)) and lr_at(s, 1.0, 0, None) == 1.0
    assert lr_at(SchedConfig(name="constant"), 0.3, 1000, None) == 0.3

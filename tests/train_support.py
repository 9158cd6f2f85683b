"""Shared helpers for tests/test_train*.py: a tiny stand-in model, demo data and a run config.

The stand-in has the model interface the loop uses (training_step / validation_step(batch, generator)) and a
loss that is a per-utterance mean, independent of padding, so accumulation and DDP equalities are exact maths.
`train_tiny(cfg, **kw)` runs train() with it in place of the config's model (train.build_model patched).
"""

from __future__ import annotations

import copy
import os
import socket
import time
from unittest import mock

import torch
from torch import nn


def free_port() -> int:
    """A port for a 2-process gloo rendezvous (MASTER_PORT), picked by the OS instead of a fixed number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def spawn_ranks(worker, world: int, args: tuple) -> list:
    """`world` spawned processes running worker(rank, world, *args)."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, *args)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def join_ranks(procs: list, limit: float) -> list:
    """Exit codes; a process still running after `limit` seconds is killed and the test fails (never a hang)."""
    deadline = time.monotonic() + limit
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"processes {hung} still running after {limit} s"
    return [p.exitcode for p in procs]



class Crash(RuntimeError):
    """Raised by TinyModel(crash_at=n): the run dies mid-step like a kill -9 (nothing more is saved)."""


class TinyEncoder(nn.Module):
    """One 'layer' with the encoder interface health.HealthMonitor hooks: (B, d, T'), lengths."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d)])

    def forward(self, h):  # h (B, d)
        x = self.layers[0](h[:, None, :])  # (B, 1, d)
        return x.transpose(1, 2), torch.ones(h.shape[0], dtype=torch.long, device=h.device)  # (B, d, 1), (B,)


class TinyModel(nn.Module):
    def __init__(self, dropout: float = 0.0, use_generator: bool = False, nan_after: int | None = None,
                 signal_at: int | None = None, sleep: float = 0.0, nan_at: tuple = (), crash_at: int | None = None,
                 batch_norm: bool = False, stall_at: tuple | None = None, encoder: bool = False,
                 ballast: int = 0, no_token_at: tuple = ()):
        super().__init__()
        self.proj, self.out = nn.Linear(4, 16), nn.Linear(16, 1)
        self.norm = nn.BatchNorm1d(16) if batch_norm else nn.LayerNorm(16)  # BatchNorm: FSDP broadcasts its stats
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)  # like the quantizer's codebooks
        self.drop, self.use_generator = nn.Dropout(dropout), use_generator
        self.nan_after, self.signal_at, self.calls, self.sleep = nan_after, signal_at, 0, sleep
        self.nan_at = tuple(nan_at)  # training_step call numbers (1-based) whose loss is NaN
        self.crash_at = crash_at  # training_step call number (1-based) that raises Crash
        self.stall_at, self.val_calls = stall_at, 0  # ("train" | "val", call number, seconds): a stuck rank
        if ballast:  # frozen weights that make a checkpoint about 4 * ballast bytes (the disk-full tests)
            self.ballast = nn.Parameter(torch.zeros(ballast), requires_grad=False)
        if encoder:  # gives HealthMonitor its hooks (health sums, an all-reduce per collect)
            self.encoder = TinyEncoder()
        self.no_token_at = tuple(no_token_at)  # call numbers with no masked token: loss 0, as MLMLoss gives

    def _loss(self, batch, generator):
        audio, lens = batch.noisy_audio if batch.noisy_audio is not None else batch.audio, batch.audio_len
        valid = (torch.arange(audio.shape[1])[None, :] < lens[:, None]).float()  # (B, L)
        n = lens.float()
        a = audio * valid
        feats = torch.stack([a.sum(1) / n, (a * a).sum(1) / n, a.abs().sum(1) / n, n / 16000.0], dim=1)  # (B, 4)
        if self.use_generator:
            feats = feats * (1 + 0.1 * torch.rand(feats.shape, generator=generator))
        h = self.proj(feats)  # (B, 16)
        if hasattr(self, "encoder"):
            h = self.encoder(h)[0][:, :, 0]  # (B, 16)
        pred = self.out(self.drop(torch.tanh(self.norm(h)))).squeeze(1)  # (B,)
        target = 10 * (batch.audio * batch.audio).sum(1) / n
        return ((pred - target) ** 2).mean()

    def training_step(self, batch, generator=None, global_step=None):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Crash(f"simulated kill in training_step call {self.calls}")
        self._stall("train", self.calls)
        if self.sleep:
            import time
            time.sleep(self.sleep)  # subprocess tests need time to deliver a signal mid-run
        if self.signal_at is not None and self.calls == self.signal_at:
            import signal
            os.kill(os.getpid(), signal.SIGUSR1)
        loss = self._loss(batch, generator)
        if (self.nan_after is not None and self.calls > self.nan_after) or self.calls in self.nan_at:
            loss = loss * float("nan")
        no_token = self.calls in self.no_token_at
        return {"loss": loss * (0.0 if no_token else 1.0), "masked_tokens": 0, "no_token": torch.tensor(int(no_token))}

    def _stall(self, phase: str, call: int):
        """stall_at = (phase, call, seconds[, marker file written when the stall starts])."""
        if self.stall_at is not None and tuple(self.stall_at[:2]) == (phase, call):
            import time
            if len(self.stall_at) > 3:
                open(self.stall_at[3], "w").close()
            time.sleep(self.stall_at[2])

    def validation_step(self, batch, generator=None):
        self.val_calls += 1
        self._stall("val", self.val_calls)
        with torch.no_grad():
            loss = self._loss(batch, generator)
        return {"loss": loss, "val_loss": loss}


def train_tiny(cfg: dict, **kw) -> dict:
    """train(cfg) with TinyModel(**kw) (built after torch.manual_seed(0)) in place of the config's model."""
    from nest_ssl import train as train_module

    def build(model_cfg):
        torch.manual_seed(0)
        return TinyModel(**kw)

    with mock.patch.object(train_module, "build_model", build):
        return train_module.train(cfg)


def run_config(data: dict, exp_dir, *, batch_size=4, shuffle=True, max_steps=6, val_every=2, accum=1,
               optim="adamw", **trainer) -> dict:
    ds = {"sample_rate": 16000, "batch_size": batch_size, "num_workers": 0, "min_duration": 0.5,
          "max_duration": 4.0, "batch_augmentor": None}
    cfg = {
        "name": "tiny", "seed": 3,
        "model": {
            "sample_rate": 16000,
            "train_ds": {**ds, "manifest_filepath": data["train"], "noise_manifest": data["noise"],
                         "shuffle": shuffle},
            "validation_ds": {**ds, "manifest_filepath": data["val"], "shuffle": False},
            "optim": {"name": optim, "lr": 0.5 if optim != "sgd" else 0.05, "weight_decay": 1e-3,
                      "sched": {"name": "NoamAnnealing", "d_model": 16, "warmup_steps": 3, "min_lr": 1e-6}},
        },
        "trainer": {"max_steps": max_steps, "val_check_interval": val_every, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0, "accelerator": "cpu",
                    "accumulate_grad_batches": accum, **trainer},
        "exp_manager": {"exp_dir": str(exp_dir), "name": "tiny", "resume_if_exists": True,
                        "resume_ignore_no_checkpoint": True,
                        "checkpoint_callback_params": {"monitor": "val_loss", "mode": "min", "save_top_k": 1,
                                                       "always_save_nemo": False,
                                                       "filename": "tiny--{val_loss:.3f}-{step}"}},
    }
    if optim == "sgd":
        cfg["model"]["optim"].pop("betas", None)
    return copy.deepcopy(cfg)


def make_data(root) -> dict:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(root), "--num-files", "16", "--num-val", "4", "--num-noise", "2", "--seed", "1"])
    return {k: str(root / f"{k}_manifest.json") for k in ("train", "val", "noise")}


def ddp_worker(rank: int, world: int, port: int, cfg: dict, out: str, kw_by_rank: dict | None = None):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    res = train_tiny(cfg, **(kw_by_rank or {}).get(rank, {}))
    torch.save(res["losses"], f"{out}/losses_rank{rank}.pt")
    torch.save({k: res[k] for k in ("exit_code", "step", "skipped_steps")}, f"{out}/result_rank{rank}.pt")


def pretrain_tiny(argv: list, **kw) -> int:
    """scripts/pretrain.py's main(argv) (its exit codes and one-line errors) with TinyModel(**kw) as the model."""
    import importlib.util
    from pathlib import Path

    from nest_ssl import train as train_module

    spec = importlib.util.spec_from_file_location("pretrain", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    with mock.patch.object(train_module, "build_model", lambda model_cfg: TinyModel(**kw)):
        return pretrain.main(argv)


if __name__ == "__main__":  # subprocess drivers: python tests/train_support.py CFG.json SLEEP_SECONDS
    import json  # or: python tests/train_support.py --pretrain BALLAST PRETRAIN_ARGS...
    import sys

    torch.set_num_threads(1)
    if sys.argv[1] == "--pretrain":
        sys.exit(pretrain_tiny(sys.argv[3:], ballast=int(sys.argv[2])))
    result = train_tiny(json.loads(open(sys.argv[1]).read()), sleep=float(sys.argv[2]))
    sys.exit(result["exit_code"])


def failing_worker(rank: int, world: int, port: int, cfg: dict, out: str, kw_by_rank: dict | None = None):
    """ddp_worker for a run expected to fail: the error (type and message) goes to out/error_rank<r>.txt and is
    re-raised, so the process exits non-zero as scripts/pretrain.py would."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    kw = dict((kw_by_rank or {}).get(rank, {}))
    stall_save = kw.pop("stall_save", None)  # (step, seconds): this rank's checkpoint write of that step is slow
    if stall_save is not None:
        from nest_ssl import checkpoint as ckpt
        real_save = ckpt.atomic_save

        def slow_save(obj, path):
            if obj.get("global_step") == stall_save[0]:
                time.sleep(stall_save[1])
            real_save(obj, path)
        ckpt.atomic_save = slow_save
    try:
        train_tiny(cfg, **kw)
    except BaseException as e:
        with open(f"{out}/error_rank{rank}.txt", "w") as f:
            f.write(f"{type(e).__name__}: {e} {' '.join(getattr(e, '__notes__', []))}")
        raise


def sequential_worker(rank: int, world: int, ports: list, cfgs: list, out: str, model_kw: dict | None = None):
    """Several train() runs one after another in the same processes (one process group each, own port)."""
    for i, (port, cfg) in enumerate(zip(ports, cfgs)):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        res = train_tiny(cfg, **(model_kw or {}))
        torch.save(res["losses"], f"{out}/run{i}_losses_rank{rank}.pt")
        torch.save(res["val_loss"], f"{out}/run{i}_val_rank{rank}.pt")


def validation_worker(rank: int, world: int, port: int, shapes: list, out: str):
    """train.validate (and the health all-reduce after it) for each (key, DatasetConfig kwargs) in `shapes`, under
    ddp and fsdp: (val_loss, val health metrics) of each on this rank go to out/val_rank<r>.pt. A rank that reaches
    a collective the others skip fails after 20 s instead of hanging."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from nest_ssl import distributed as dist_utils
    from nest_ssl import train as train_module
    from nest_ssl.data.config import DatasetConfig
    from nest_ssl.data.loader import build_loader
    from nest_ssl.health import HealthMonitor
    from nest_ssl.run_config import TrainerConfig

    info = dist_utils.setup("cpu", collective_timeout=20.0)
    results = {}
    for strategy in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = TinyModel(encoder=True)
        health = HealthMonitor(model)
        step_model = train_module.wrap(model, info, TrainerConfig(strategy=strategy, accelerator="cpu"))
        for key, kw in shapes:
            loader, mix = build_loader(DatasetConfig(**kw), rank=rank, world_size=world, seed=0, is_train=False)
            loss = train_module.validate(step_model, loader, info, 0, None, device_mix=mix, health=health)
            results[(strategy, *key)] = (loss, health.collect("val"))
        health.remove()
    torch.save(results, f"{out}/val_rank{rank}.pt")
    dist_utils.teardown()

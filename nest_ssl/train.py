"""The training loop: `train(plain_cfg)` reads top to bottom.

Helpers live in distributed.py (torchrun/DDP, preemption signals), fsdp.py and dcp_checkpoint.py (trainer.strategy:
fsdp and its sharded checkpoints), checkpoint.py (TrainState, atomic save, resume),
metrics.py (TensorBoard, progress line), exp_manager.py (run dirs, the checkpoint writer: -last, top-k, .nemo),
data/loader.py (loaders, on-device mixing) and optim.py (NeMo optimizers and schedules).

Reproducibility: every random draw of an optimizer step comes from seeds derived from (seed, step, rank):
the global torch RNG (dropout) is reseeded at each step and masking/dither get their own torch.Generator, while
the data loader seeds shuffling, noise and augmentation from (seed, epoch, index). A resumed run therefore
replays the uninterrupted run bit for bit on CPU, whatever the iterator or worker restarts in between.

Preemption: SIGUSR1 / SIGTERM set a flag; at the end of the optimizer step every rank agrees (all-reduce),
rank 0 writes the `-last` checkpoint and the run returns REQUEUE_EXIT_CODE (75), which scripts/pretrain.py
exits with; rank 0 then writes $NEST_REQUEUE_MARKER, which scripts/slurm/*.sbatch turn into `scontrol requeue`
(torchrun reports a worker's 75 as 1). The first Ctrl-C (SIGINT) does the same and returns INTERRUPT_EXIT_CODE
(130); a second one ends the process at once.

Collectives: every process group has trainer.collective_timeout; a collective that fails or times out ends the run
with a CollectiveError naming the rank and the phase (distributed.Phases), without a checkpoint over the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from nest_ssl import checkpoint as ckpt
from nest_ssl import dcp_checkpoint, fsdp
from nest_ssl import distributed as dist_utils
from nest_ssl import exp_manager as em
from nest_ssl.config import to_yaml
from nest_ssl.data.batch import synthetic_batch
from nest_ssl.data.loader import TooManyBadSamples, build_loader
from nest_ssl.export import init_from_pretrained
from nest_ssl.fit_scan import fit_scan, largest_batch
from nest_ssl.health import HealthMonitor, grad_norms
from nest_ssl.metrics import make_logger
from nest_ssl.nemo_compat import build_model
from nest_ssl.optim import build_optimizer, build_scheduler
from nest_ssl.probe import run_probe
from nest_ssl.run_config import TrainerConfig, build_run_config

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: preempted, checkpoint written, requeue me (scripts/slurm/*.sbatch check it)
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C: stopped by the user, checkpoint written


class NonFiniteError(RuntimeError):
    pass


class TrainStep(nn.Module):
    """DDP must see the training step as forward() so its gradient hooks fire; FSDP gathers the parameters in
    forward hooks, so under fsdp the validation step goes through forward too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, generator, global_step: int, validation: bool = False):
        if validation:
            return self.model.validation_step(batch, generator=generator)
        return self.model.training_step(batch, generator=generator, global_step=global_step)


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1, np.uint64)[0] >> 1)


def precision_setup(precision, device: torch.device):
    """(autocast dtype or None, GradScaler or None) for trainer.precision."""
    p = str(precision)
    if p in ("16", "16-mixed"):
        return torch.float16, torch.amp.GradScaler(device.type)
    if p in ("bf16", "bf16-mixed"):
        return torch.bfloat16, None
    return None, None


def validate(step_model, loader, dist, seed: int, amp_dtype, limit: Optional[int] = None, device_mix=None,
             health: Optional[HealthMonitor] = None) -> float:
    """Mean validation loss over every rank's batches (NeMo's is rank-local; ours drives top-k on all ranks).
    `health`: its hooks skip the stand-in forwards of a rank that has run out of batches under FSDP."""
    model = dist_utils.unwrap(step_model).model
    sharded = isinstance(step_model, fsdp.FSDPModule)
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=dist.device), 0.0  # summed on the device: no sync
    loader.set_epoch(0)
    gen = torch.Generator(dist.device).manual_seed(step_seed(seed, 0, dist.rank, stream=2))
    with torch.no_grad(), torch.autocast(dist.device.type, dtype=amp_dtype or torch.float32,
                                         enabled=amp_dtype is not None):
        for batch in _lockstep(loader, limit, dist.device) if sharded else itertools.islice(loader, limit):
            if batch is None:  # this rank is done, another is not: a forward for FSDP's collectives, not counted
                with health.paused() if health is not None else contextlib.nullcontext():
                    step_model(synthetic_batch(1, 1.0, dist.device), gen, 0, validation=True)
                continue
            batch = batch.to(dist.device, non_blocking=True)
            batch = device_mix(batch, gen) if device_mix is not None else batch
            out = step_model(batch, gen, 0, validation=True) if sharded else model.validation_step(batch, generator=gen)
            total = total + out["loss"].double()
            count += 1
    model.train()
    total, count = dist_utils.all_reduce_sum([float(total), count], dist.device)
    return total / count if count else math.nan  # no batch at all is "no result", never a loss of 0


def _lockstep(loader, limit: Optional[int], device):
    """Ranks may hold different numbers of validation batches (every item counts once), but under FSDP each forward
    is a collective: go on while any rank has a batch (one flag all-reduce per batch) and yield None to a rank that
    has run out."""
    batches = itertools.islice(loader, limit)
    while True:
        batch = next(batches, None)
        more = torch.tensor([float(batch is not None)], device=device)
        if dist_utils.all_reduce_max_(more).item() == 0:
            return
        yield batch


def steps_between_validations(tc: TrainerConfig, batches_per_epoch: int) -> Optional[int]:
    """N when validation runs every N optimizer steps counted across epochs, None when it follows the epoch.
    Ours where NeMo (Lightning) refuses: an int trainer.val_check_interval larger than the batches of an epoch
    validates every val_check_interval optimizer steps across epoch boundaries, as Lightning's
    check_val_every_n_epoch: null does (which we accept too), instead of an error."""
    interval, every_epoch = tc.val_check_interval, tc.check_val_every_n_epoch
    if every_epoch is None or (isinstance(interval, int) and interval > batches_per_epoch):
        if every_epoch not in (None, 1):
            raise ValueError(f"trainer.val_check_interval={interval} is more than the {batches_per_epoch} batches "
                             f"of an epoch, so validation counts steps across epochs; trainer.check_val_every_n_"
                             f"epoch={every_epoch} would then mean nothing: set it to 1 or null, or the interval "
                             f"to at most {batches_per_epoch}")
        return int(interval)
    return None


def val_due(tc: TrainerConfig, batch_in_epoch: int, epoch: int, batches_per_epoch: int, step: int) -> bool:
    across = steps_between_validations(tc, batches_per_epoch)
    if across is not None:
        return step % across == 0
    if tc.check_val_every_n_epoch and (epoch + 1) % tc.check_val_every_n_epoch:
        return False
    if isinstance(tc.val_check_interval, float):
        every = max(1, int(batches_per_epoch * tc.val_check_interval))
    else:
        every = int(tc.val_check_interval)
    return batch_in_epoch % every == 0 or batch_in_epoch == batches_per_epoch


def checkpoint_layers(model: nn.Module, mode: str) -> None:
    encoder = getattr(model, "encoder", None)
    if not hasattr(encoder, "set_activation_checkpointing"):
        raise ValueError(f"trainer.activation_checkpointing={mode!r}: {type(model).__name__} has no Conformer encoder")
    encoder.set_activation_checkpointing(mode)


def wrap(model: nn.Module, dist, tc: TrainerConfig) -> nn.Module:
    """The training step as the module DDP or FSDP runs (trainer.strategy); FSDP shards each Conformer layer."""
    strategy = fsdp.parse_strategy(tc.strategy)
    if strategy.name == "fsdp" and dist.world_size > 1:
        layers = getattr(getattr(model, "encoder", None), "layers", ())
        return fsdp.shard(TrainStep(model), layers, tc.precision, tc.sync_batchnorm)
    if strategy.name == "fsdp":
        return TrainStep(model)  # one process: nothing to shard (checkpoints are still sharded-format)
    return dist_utils.wrap_model(TrainStep(model), dist, tc.sync_batchnorm, strategy.find_unused_parameters)


def check_sharded(tc: TrainerConfig, em_cfg) -> bool:
    """trainer.strategy=fsdp? Refuses the settings that need replicated parameters or a DDP run."""
    sharded = fsdp.parse_strategy(tc.strategy).name == "fsdp"
    if em_cfg.checkpoint_callback_params.async_save and not sharded:
        raise ValueError("exp_manager.checkpoint_callback_params.async_save=true writes sharded checkpoints in the "
                         f"background and needs trainer.strategy=fsdp (got {tc.strategy!r})")
    if sharded and tc.probe.enabled:
        raise ValueError("trainer.probe.enabled=true runs the probe on rank 0's full model; with trainer.strategy="
                         "fsdp the parameters are sharded: run scripts/probe.py on a checkpoint instead")
    return sharded


def sharded_resume_point(em_cfg, ckpt_dir: Path):
    """The .dcp directory an fsdp run resumes from, or None."""
    path = em_cfg.resume_from_checkpoint or (dcp_checkpoint.latest(ckpt_dir) if em_cfg.resume_if_exists else None)
    if path is not None and not dcp_checkpoint.is_complete(path):
        raise ValueError(f"exp_manager.resume_from_checkpoint={path}: trainer.strategy=fsdp resumes from a sharded "
                         ".dcp directory; start from a single file with init_from_ckpt instead")
    if path is None and em_cfg.resume_if_exists and not em_cfg.resume_ignore_no_checkpoint:
        raise FileNotFoundError(f"exp_manager.resume_if_exists: no checkpoint in {ckpt_dir} "
                                "(set resume_ignore_no_checkpoint: true to start from scratch)")
    return path


def compile_encoder(model: nn.Module, backend: str) -> None:
    encoder = getattr(model, "encoder", None)
    if not hasattr(encoder, "compile_layers"):
        raise ValueError(f"trainer.compile=true: {type(model).__name__} has no Conformer encoder to compile")
    encoder.compile_layers(backend)


@dataclass
class Limits:
    """trainer.max_steps / max_epochs with Lightning's meaning: max_epochs None is 1000 unless max_steps is set;
    -1 (either) is unlimited."""

    max_steps: float
    max_epochs: float

    @classmethod
    def of(cls, tc: TrainerConfig) -> Limits:
        max_steps = tc.max_steps if tc.max_steps > 0 else math.inf
        max_epochs = tc.max_epochs if tc.max_epochs is not None else (1000 if max_steps == math.inf else math.inf)
        return cls(max_steps, math.inf if max_epochs < 0 else max_epochs)

    def reached(self, state: ckpt.TrainState) -> bool:
        """The loop's exit predicate (besides preemption and errors)."""
        return state.step >= self.max_steps or state.epoch >= self.max_epochs

    def describe(self, state: ckpt.TrainState) -> str:
        if state.step >= self.max_steps:
            return f"already at max_steps {int(self.max_steps)}" + (
                f" (step {state.step})" if state.step != self.max_steps else "")
        return f"already at max_epochs {int(self.max_epochs)} (step {state.step})"


def epoch_batches(loader, state: ckpt.TrainState, limits: Limits, on_error):
    """The train batches, epoch after epoch (state.epoch counts them), while the limits allow another one. An
    exception while fetching a batch goes to on_error (which checkpoints) and is re-raised."""
    while not limits.reached(state):
        loader.set_epoch(state.epoch)
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                break
            except Exception as err:  # a bad file, a dead worker: checkpoint first, then re-raised unchanged
                on_error(err)
                raise
            yield batch
        state.epoch += 1


@dataclass
class LogWindow:
    """What the steps between two log steps add up: audio seconds, masked tokens, wall time, and on the device the
    summed loss of the micro-batches that had a masked token, their count and the count of those that had none (a
    no-token batch's loss is 0, not a loss: averaging it in would pull train_loss down)."""

    audio_sec: float
    tokens: float
    t0: float
    losses: torch.Tensor  # (3,) float64: [sum of losses with tokens, batches with tokens, batches without]

    @classmethod
    def start(cls, device: torch.device) -> LogWindow:
        return cls(0.0, 0.0, time.time(), torch.zeros(3, dtype=torch.float64, device=device))

    @staticmethod
    def batch_losses(out: dict) -> torch.Tensor:
        """One micro-batch's contribution to `losses` (device tensors: no sync); a model without `no_token`
        (the contrastive one) always has tokens."""
        no_token = torch.as_tensor(out.get("no_token", 0), dtype=torch.float64, device=out["loss"].device)
        return torch.stack([out["loss"].detach().double() * (1 - no_token), 1 - no_token, no_token])

    def metrics(self, lr: float, grad_norm: float, device: torch.device) -> dict:
        """The log step's scalars, all-reduced over ranks (the only all-reduce outside the step's own)."""
        tokens = dist_utils.all_reduce_mean([self.tokens], device)[0]
        audio, loss_sum, n, no_token = dist_utils.all_reduce_sum([self.audio_sec, *self.losses.tolist()], device)
        gpu_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return {"train_loss": loss_sum / n if n else math.nan, "no_token_batches": no_token, "learning_rate": lr,
                "grad_norm": grad_norm, "audio_seconds_per_second": audio / max(time.time() - self.t0, 1e-9),
                "tokens_masked": tokens, "gpu_memory": gpu_gib}


def fresh_start(writer: em.CheckpointWriter, unreadable: list, em_cfg: em.ExpManagerConfig) -> str:
    """Every checkpoint of the run directory failed to load: an error listing each, or with
    exp_manager.resume_ignore_unreadable_checkpoints a start from step 0 that moves them (and the .nemo) aside."""
    listing = "; ".join(f"{Path(p).name}: {why}" for p, why in unreadable)
    if not em_cfg.resume_ignore_unreadable_checkpoints:
        raise ValueError(f"exp_manager.resume_if_exists: none of the {len(unreadable)} checkpoints in {writer.dir} "
                         f"can be read ({listing}). Restore them, or set exp_manager.resume_ignore_unreadable_"
                         "checkpoints=true to start from step 0 (they and the .nemo are moved aside, not overwritten)")
    aside = writer.set_aside(unreadable)
    return f"starting from step 0: no checkpoint could be read; they and the .nemo were moved to {aside}"


def summary(state: ckpt.TrainState, history: list, seconds: float, writer: em.CheckpointWriter) -> str:
    """The run's last line: what was done and where it is."""
    t = int(seconds)
    parts = [f"done: {state.step} steps ({len(history)} in this run, {t // 3600}:{t % 3600 // 60:02d}:{t % 60:02d}), "
             f"epoch {state.epoch}"]
    if history:
        parts.append(f"train_loss {history[-1]:.4f}")
    if math.isfinite(state.last_val):
        parts.append(f"val_loss {state.last_val:.4f}")
    if state.topk:
        parts.append(f"best {state.topk[0][1]} ({writer.ccp.monitor} {state.topk[0][0]:.4f})")
    if writer.last is not None:
        parts.append(f"last {writer.last.name}")
    return "; ".join(parts) + (f" in {writer.dir}" if writer.last is not None or state.topk else "")


def save_offending_batch(batch, logdir: Path, rank: int) -> Path:
    path = logdir / f"nonfinite_batch_rank{rank}.pt"
    torch.save({f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}, path)
    return path


def train(plain: dict) -> dict:
    """Pretrain from a resolved plain run config (nest_ssl.run_config.load_config). Returns a summary with
    `exit_code` (0, REQUEUE_EXIT_CODE after preemption, INTERRUPT_EXIT_CODE after Ctrl-C) and the per-step train
    losses of this rank.
    The run itself is _train(); this wrapper owns the preemption signal handlers, restored however the run ends."""
    preempt = dist_utils.Preemption()  # first: a signal that comes while the model and data are built is not lost
    phases = dist_utils.Phases()
    try:
        return _train(plain, preempt, phases)
    except RuntimeError as err:  # a failed collective gets one error naming the rank and the phase
        failed = dist_utils.collective_error(err, phases)
        if failed is None:
            raise
        if preempt.flag:
            failed.add_note("(a preemption signal came while this rank was blocked: no checkpoint was written)")
        raise failed from err
    finally:
        preempt.restore()


def _train(plain: dict, preempt: dist_utils.Preemption, phases: dist_utils.Phases) -> dict:
    # ---- config: every section is validated before any work starts -----------------------------------
    run = build_run_config(plain)
    tc, em_cfg = run.trainer, run.exp_manager
    if run.model.optim is None:
        raise ValueError("model.optim is required (e.g. name: adamw, lr: 5.0, sched: {name: NoamAnnealing, ...})")
    if run.model.train_ds is None:
        raise ValueError("model.train_ds is required")
    check_probe_monitor(em_cfg.checkpoint_callback_params.monitor, tc)
    sharded = check_sharded(tc, em_cfg)
    name = em_cfg.name or run.name
    em.check_writable(em_cfg, run.name)  # a read-only exp_dir is a config error, not a traceback at the first save

    # ---- distributed, seeds, model, optimizer, data ---------------------------------------------------
    phases.timeout = tc.collective_timeout
    dist = dist_utils.setup(tc.accelerator, tc.collective_timeout)
    random.seed(run.seed), np.random.seed(run.seed), torch.manual_seed(run.seed)
    torch.backends.cudnn.benchmark = bool(tc.benchmark)
    model = build_model(plain["model"]).to(dist.device)
    health_monitor = HealthMonitor(model, tc.health)  # forward hooks: sums on the device, read on log steps only
    if tc.activation_checkpointing != "none":
        checkpoint_layers(model, tc.activation_checkpointing)
    if tc.compile:
        compile_encoder(model, tc.compile_backend)
    init_lines = init_from_pretrained(model, plain)  # NeMo's init_from_*: strict=False; a resume below overrides it
    amp_dtype, scaler = precision_setup(tc.precision, dist.device)
    train_loader, train_mix = build_loader(run.model.train_ds, rank=dist.rank, world_size=dist.world_size,
                                           seed=run.seed, is_train=True)
    val_loader, val_mix = None, None
    if run.model.validation_ds is not None:
        val_loader, val_mix = build_loader(run.model.validation_ds, rank=dist.rank, world_size=dist.world_size,
                                           seed=run.seed, is_train=False)
    if val_loader is not None and steps_between_validations(tc, len(train_loader)) is not None:
        init_lines.append(f"validation every {tc.val_check_interval} optimizer steps, counted across epochs "
                          f"(an epoch has {len(train_loader)} batches)")
    if tc.fit_scan:  # before DDP/FSDP: the scan must not all-reduce gradients
        shape = largest_batch(train_loader, run.model.train_ds)
        init_lines.append(fit_scan(model, shape, run.model.sample_rate, amp_dtype, dist.device))
    step_model = wrap(model, dist, tc)  # before the optimizer: FSDP replaces the parameters by sharded ones
    step_model.train()
    optimizer = build_optimizer(model, run.model.optim)
    scheduler = build_scheduler(optimizer, run.model.optim, tc.max_steps)
    logdir = Path(dist_utils.broadcast_object(str(em.log_dir(em_cfg, run.name))))  # same datetime version
    ckpt_dir = em.checkpoint_dir(em_cfg, logdir)
    writer = em.CheckpointWriter(em_cfg, name, ckpt_dir, plain, dist.is_main, model=model, optimizer=optimizer,
                                 scheduler=scheduler, scaler=scaler, sharded=sharded,
                                 health=health_monitor)

    # ---- resume ---------------------------------------------------------------------------------------
    saved, unreadable, init_lines = None, [], init_lines + [dist_utils.devices_note(tc, dist.world_size)]
    if sharded:
        saved = sharded_resume_point(em_cfg, ckpt_dir)
    elif em_cfg.resume_from_checkpoint:
        saved = ckpt.load_named(em_cfg.resume_from_checkpoint, "exp_manager.resume_from_checkpoint")
    elif em_cfg.resume_if_exists:
        _, saved = ckpt.load_latest(ckpt_dir, unreadable)
        if saved is None and unreadable:  # checkpoints exist, none loads: never silently start again
            init_lines.append(fresh_start(writer, unreadable, em_cfg))
        elif saved is None and not em_cfg.resume_ignore_no_checkpoint:
            raise FileNotFoundError(f"exp_manager.resume_if_exists: no checkpoint in {ckpt_dir} "
                                    "(set resume_ignore_no_checkpoint: true to start from scratch)")
    state, limits = ckpt.TrainState(), Limits.of(tc)
    if saved is not None:
        if sharded:
            state, loader_state, health_state = dcp_checkpoint.restore(saved, model=model, optimizer=optimizer,
                                                                       scheduler=scheduler)
        else:
            state = ckpt.restore(saved, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            loader_state, health_state = saved["loader"], saved.get("health")
        train_loader.load_state_dict(loader_state)
        if health_state is not None:  # context_gain's running code prior goes on as if never interrupted
            health_monitor.load_state_dict(health_state)
        elif health_monitor.handles:
            init_lines.append(f"the checkpoint has no health state (written by an older version): context_gain's "
                              f"code prior starts again from the targets after step {state.step}")
        if limits.reached(state):  # a finished run: say so and leave its directory as it is
            make_logger(dist.is_main, None, False).info(f"{name}: {limits.describe(state)} in {ckpt_dir}; nothing "
                                                        "to do (raise trainer.max_steps / max_epochs to go on)")
            dist_utils.teardown()
            return {"exit_code": 0, "losses": [], "step": state.step, "epoch": state.epoch, "log_dir": str(logdir),
                    "val_loss": state.last_val, "skipped_steps": state.skipped_steps, "probe": state.last_probe}
    if dist.is_main and (saved is not None or em_cfg.resume_if_exists):
        init_lines += [f"removed {n} (left by an interrupted save)" for n in writer.tidy(state)]

    # ---- logging --------------------------------------------------------------------------------------
    tb_dir = None
    if dist.is_main:
        ckpt.atomic_write_text(logdir / "config.yaml", to_yaml(plain))
        tb_dir = logdir / f"version_{len(list(logdir.glob('version_*')))}" if em_cfg.create_tensorboard_logger else None
    log = make_logger(dist.is_main, tb_dir, tc.enable_progress_bar)
    for line in filter(None, init_lines):
        log.info(line)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"{name}: {n_params:,} parameters, world size {dist.world_size}, precision {tc.precision}, "
             f"log dir {logdir}" + (f", resumed at step {state.step}" if saved is not None else ""))

    def on_data_error(err: Exception) -> None:
        """A train or validation batch could not be fetched or validated (bad-sample limit, skip_bad_samples=false,
        a dead worker): keep the run. The checkpoint holds the last optimizer step and a loader position just after
        it (the micro-batches of an unfinished accumulation are read again on resume)."""
        path = writer.save(state, {**train_loader.state_dict(), "start": train_loader.start - state.micro}, sync=False)
        if path is not None:  # raising max_bad_samples is advice only for the error it can fix
            limit = " or raise model.train_ds.max_bad_samples" if isinstance(err, TooManyBadSamples) else ""
            err.add_note(f"nest_ssl: training state at step {state.step} saved to {path}; fix the data (scripts/"
                         f"check_data.py lists every bad item){limit}, then resume")

    if val_loader is not None and tc.num_sanity_val_steps and saved is None:
        with phases("sanity validation"):
            validate(step_model, val_loader, dist, run.seed, amp_dtype, limit=tc.num_sanity_val_steps,
                     device_mix=val_mix, health=health_monitor)
            health_monitor.collect("val")  # the sanity batches are not part of the first validation's metrics

    @phases("validation")
    def run_validation() -> None:
        try:
            state.last_val = validate(step_model, val_loader, dist, run.seed, amp_dtype, device_mix=val_mix,
                                      health=health_monitor)
        except Exception as err:  # any error (bad data, a dead worker, a collective): re-raised after the checkpoint
            if not dist_utils.failed_collective(err):  # a data error: checkpoint (a collective failure: nothing)
                on_data_error(err)
            raise
        val_health = health_monitor.collect("val")
        log.scalars(state.step, {"val_loss": state.last_val, **{f"val_health/{k}": v for k, v in val_health.items()}})
        log.info(f"step {state.step}: val_loss {state.last_val:.4f}")
        for alarm in health_monitor.alarms(val_health, state.step, "val"):
            log.info(f"step {state.step}: health: {alarm}")

    def on_preemption() -> int:
        code, why = (INTERRUPT_EXIT_CODE, "Ctrl-C") if preempt.interrupted else (REQUEUE_EXIT_CODE,
                                                                                  "preemption signal")
        if writer.saved_step != state.step:
            with phases("checkpoint"):
                writer.save(state, train_loader.state_dict())
        where = f"checkpoint {writer.last}" if writer.last is not None else "no checkpoint (checkpointing is off)"
        log.info(f"step {state.step}: {why}; {where}; exiting with {code}")
        if dist.is_main and preempt.file:
            Path(preempt.file).unlink(missing_ok=True)  # the requeued job must not stop at once
        return code

    # ---- the loop -------------------------------------------------------------------------------------
    accum, sample_rate, t_start = tc.accumulate_grad_batches, run.model.sample_rate, time.time()
    history, exit_code, window = [], 0, LogWindow.start(dist.device)
    window_loss = tokens = torch.zeros((), device=dist.device)  # summed on the device: no sync per micro-batch
    step_losses = torch.zeros(3, dtype=torch.float64, device=dist.device)  # LogWindow.losses of this step
    optimizer.zero_grad(set_to_none=True)
    phases.now = "train step"
    for batch in epoch_batches(train_loader, state, limits, on_data_error):
        window.audio_sec += float(batch.audio_len.sum()) / sample_rate  # CPU tensor: no device sync
        batch, state.micro = batch.to(dist.device, non_blocking=True), state.micro + 1
        last_micro = state.micro == accum or train_loader.start == len(train_loader)
        torch.manual_seed(step_seed(run.seed, state.step, dist.rank, stream=10 + state.micro))  # dropout
        gen = torch.Generator(dist.device).manual_seed(step_seed(run.seed, state.step, dist.rank,
                                                                 stream=1000 + state.micro))
        batch = train_mix(batch, gen) if train_mix is not None else batch
        with fsdp.accumulation(step_model, last_micro):  # DDP's no_sync / FSDP's deferred reduce-scatter
            with torch.autocast(dist.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = step_model(batch, gen, state.step)
            loss = out["loss"].float() / accum
            (loss if scaler is None else scaler.scale(loss)).backward()
        window_loss, tokens = window_loss + loss.detach(), tokens + out.get("masked_tokens", 0)
        step_losses = step_losses + LogWindow.batch_losses(out)
        if not last_micro:
            continue

        # ---- optimizer step (skipped when the loss or the gradients are not finite) ----
        state.micro, lr = 0, optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.unscale_(optimizer)
        groups = grad_norms(model) if tc.health.enabled and (state.step + 1) % tc.log_every_n_steps == 0 else None
        if sharded and groups:
            groups = {g: fsdp.replicated(v) for g, v in groups.items()}  # norms over every rank's shards
        grad_norm = clip_gradients(model, tc)
        loss_val, grad_norm, tok, bad, preempted = step_stats(window_loss, grad_norm, tokens, scaler is None,
                                                               preempt.requested(), dist.device)
        window_loss = tokens = torch.zeros((), device=dist.device)
        window.tokens += tok
        step_losses, window.losses = torch.zeros_like(step_losses), window.losses + (0 if bad else step_losses)
        if bad:
            state.bad_streak, state.skipped_steps = state.bad_streak + 1, state.skipped_steps + 1
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            log.info(f"step {state.step}: non-finite loss {loss_val} / grad norm {grad_norm}; step skipped")
            if state.bad_streak >= tc.max_nonfinite_steps:
                path = save_offending_batch(batch, logdir, dist.rank)
                raise NonFiniteError(f"{state.bad_streak} optimizer steps in a row had a non-finite loss or "
                                     f"gradient (trainer.max_nonfinite_steps={tc.max_nonfinite_steps}); last batch "
                                     f"saved to {path}")
            if preempted:  # a skipped step still answers the signal
                exit_code = on_preemption()
                break
            continue
        state.bad_streak = 0
        if scaler is not None:
            scaler.step(optimizer), scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        state.step += 1
        history.append(loss_val)

        # ---- log, validate, checkpoint, preemption ----
        if state.step % tc.log_every_n_steps == 0:
            values = window.metrics(lr, grad_norm, dist.device)
            values["skipped_samples"], values["skipped_steps"] = len(train_loader.bad_samples), state.skipped_steps
            health = health_monitor.collect("train", groups)
            log.scalars(state.step, {**values, "global_step": state.step, "epoch": state.epoch,
                                     **{f"health/{k}": v for k, v in health.items()}})
            log.progress(state.step, tc.max_steps, {"loss": values["train_loss"], "lr": lr,
                                                    "audio_s/s": values["audio_seconds_per_second"],
                                                    "acc": health.get("masked_acc_0")})
            # the context state follows validation when there is one: a train window's gain is a few hundred
            # tokens and changes sign often in the demo's prior-only phase (20-26 lines per run)
            for alarm in health_monitor.alarms(health, state.step, context=val_loader is None):
                log.info(f"step {state.step}: health: {alarm}")
            window = LogWindow.start(dist.device)
        probed = tc.probe.enabled and state.step % tc.probe.every_n_steps == 0
        if probed:  # rank 0 probes the frozen encoder; every rank gets its scores (top-k must agree)
            state.last_probe = dist_utils.broadcast_object(probe_scores(model, tc) if dist.is_main else None)
            log.scalars(state.step, state.last_probe)
            log.info(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in state.last_probe.items()
                                                         if not k.startswith("probe/")))
        validated = val_loader is not None and val_due(tc, train_loader.start, state.epoch, len(train_loader),
                                                        state.step)
        if validated:
            run_validation()
        if validated or (probed and writer.monitors_probe):
            with phases("checkpoint"):
                writer.save(state, train_loader.state_dict(), rank=probed if writer.monitors_probe else validated)
        if preempted:
            exit_code = on_preemption()
        if exit_code or limits.reached(state):
            break
    phases.now = "checkpoint"  # the end
    if exit_code == 0 and writer.saved_step != state.step:  # validated first, so the final checkpoint's
        if val_loader is not None:                          # name carries its own val_loss, not an older one
            run_validation()
        writer.save(state, train_loader.state_dict(), rank=val_loader is not None and not writer.monitors_probe)
    writer.finish(close=True)  # a background (async_save) write is committed before the run returns
    if exit_code == REQUEUE_EXIT_CODE and dist.is_main:  # after the commit: the marker promises a checkpoint
        preempt.leave_marker(state.step)
    if exit_code == 0:
        log.info(summary(state, history, time.time() - t_start, writer))

    log.close()
    phases.now = "teardown"
    dist_utils.teardown()
    return {"exit_code": exit_code, "losses": history, "step": state.step, "epoch": state.epoch,
            "log_dir": str(logdir), "val_loss": state.last_val, "skipped_steps": state.skipped_steps,
            "probe": state.last_probe}


def check_probe_monitor(monitor, tc: TrainerConfig) -> None:
    """A checkpoint monitor on a probe score needs the probe running the task that produces it."""
    if not str(monitor).startswith("probe_"):
        return
    task = "classification" if monitor == "probe_acc" else "ctc"
    if not tc.probe.enabled or tc.probe.task != task:
        raise ValueError(f"exp_manager.checkpoint_callback_params.monitor={monitor!r} needs trainer.probe.enabled: "
                         f"true with trainer.probe.task: {task} (now enabled={tc.probe.enabled}, "
                         f"task={tc.probe.task!r})")


def probe_scores(model: nn.Module, tc: TrainerConfig) -> dict:
    """trainer.probe's scalars: the score(s), the head's final training loss, the layer weights."""
    result = run_probe(model, tc.probe)
    weights = {f"probe/layer_weight_{s}": w for s, w in zip(result["states"], result["layer_weights"])}
    return {k: v for k, v in result.items() if k.startswith("probe_")} | weights


def clip_gradients(model: nn.Module, tc: TrainerConfig) -> torch.Tensor:
    """Total gradient norm before clipping, as a device tensor (reading it is left to step_stats); clips by norm or
    value when gradient_clip_val > 0. Sharded gradients: the norm over every rank's shards."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    clip = tc.gradient_clip_val or 0.0
    if clip > 0 and tc.gradient_clip_algorithm == "value":
        norm = fsdp.clip_grad_norm(params, 0.0)
        torch.nn.utils.clip_grad_value_(params, clip)
        return norm
    return fsdp.clip_grad_norm(params, clip)


def step_stats(loss, grad_norm, tokens, check_grad: bool, preempt: bool, device) -> tuple[float, float, float, bool,
                                                                                        bool]:
    """The one host sync of an optimizer step: this rank's (loss, grad norm, masked tokens) and, over all ranks,
    (any non-finite loss [or grad norm], any preemption signal), from one all-reduce and one device-to-host copy.
    The grad norm is not checked under a GradScaler, which skips non-finite steps itself."""
    local = torch.stack([torch.as_tensor(v, device=device).float() for v in (loss, grad_norm, tokens)])
    nonfinite = (~torch.isfinite(local[:2] if check_grad else local[:1])).any().float()
    flags = dist_utils.all_reduce_max_(torch.stack([nonfinite, torch.full_like(nonfinite, float(preempt))]))
    loss_val, norm, tok, bad, pre = torch.cat([local, flags]).tolist()
    return loss_val, norm, tok, bad > 0, pre > 0

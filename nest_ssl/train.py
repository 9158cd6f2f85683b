"""The training loop: `train(plain_cfg)` reads top to bottom (spec §6, issue 6).

Helpers live in distributed.py (torchrun/DDP), checkpoint.py (atomic save, resume), metrics.py (TensorBoard,
progress line), exp_manager.py (run dirs, top-k names, .nemo) and optim.py (NeMo optimizers and schedules).

Reproducibility: every random draw of an optimizer step comes from seeds derived from (seed, step, rank):
the global torch RNG (dropout) is reseeded at each step and masking/dither get their own torch.Generator, while
the data loader seeds shuffling, noise and augmentation from (seed, epoch, index). A resumed run therefore
replays the uninterrupted run bit for bit on CPU, whatever the iterator or worker restarts in between.

Preemption: SIGUSR1 / SIGTERM set a flag; at the end of the optimizer step every rank agrees (all-reduce),
rank 0 writes the `-last` checkpoint and the run returns REQUEUE_EXIT_CODE (75), which scripts/pretrain.py
exits with and scripts/slurm/*.sbatch turn into `scontrol requeue`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from nest_ssl import checkpoint as ckpt
from nest_ssl import distributed as dist_utils
from nest_ssl import exp_manager as em
from nest_ssl.config import build_run_config, to_yaml
from nest_ssl.export import init_from_pretrained
from nest_ssl.fit_scan import fit_scan, largest_batch
from nest_ssl.metrics import make_logger
from nest_ssl.nemo_compat import build_model
from nest_ssl.optim import OptimConfig, build_optimizer, build_scheduler

PRECISIONS = ("32", "32-true", "16", "16-mixed", "bf16", "bf16-mixed")
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: preempted, checkpoint written, requeue me (scripts/slurm/*.sbatch check it)


@dataclass
class TrainerConfig:
    """NeMo/Lightning `trainer` keys with their Lightning meaning (+ a few accepted-and-ignored ones)."""

    devices: Any = -1                 # -1 / "auto": all visible GPUs (torchrun decides the process count)
    num_nodes: int = 1
    max_epochs: Optional[int] = None  # None: 1000 unless max_steps is set (Lightning); -1: unlimited
    max_steps: int = -1
    val_check_interval: Union[int, float] = 1.0   # int: every n train batches; float: fraction of an epoch
    check_val_every_n_epoch: Optional[int] = 1
    accelerator: str = "auto"         # auto | gpu | cuda | cpu
    strategy: Any = "ddp"             # accepted: ddp / auto (we always use DDP when world_size > 1)
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 0.0
    gradient_clip_algorithm: str = "norm"
    precision: Union[int, str] = 32
    log_every_n_steps: int = 50
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 2
    sync_batchnorm: bool = False
    enable_checkpointing: bool = False  # Lightning's own callback; exp_manager does checkpointing
    logger: Any = False                 # Lightning logger; exp_manager provides TensorBoard
    benchmark: Optional[bool] = False   # cudnn.benchmark
    deterministic: Any = False          # accepted, ignored (seeded runs are reproducible anyway)
    use_distributed_sampler: bool = True  # accepted, ignored (our data loaders always shard by rank)
    enable_model_summary: bool = True   # prints the parameter count
    # ---- ours ----
    max_nonfinite_steps: int = 10     # consecutive skipped (non-finite) steps before the run stops
    compile: bool = False             # torch.compile each encoder layer (ConformerEncoder.compile_layers)
    compile_backend: str = "inductor"  # torch.compile backend (tests use aot_eager: no C++ compiler needed)
    fit_scan: bool = False            # run the largest batch once at start-up (nest_ssl/fit_scan.py)

    def __post_init__(self):
        if str(self.precision) not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r}; allowed: {list(PRECISIONS)}")
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"trainer.accumulate_grad_batches={self.accumulate_grad_batches}; must be >= 1")
        if self.accelerator not in ("auto", "gpu", "cuda", "cpu"):
            raise ValueError(f"trainer.accelerator={self.accelerator!r}; allowed: auto, gpu, cuda, cpu")
        if isinstance(self.val_check_interval, float) and not 0.0 < self.val_check_interval <= 1.0:
            raise ValueError(f"trainer.val_check_interval={self.val_check_interval}; a float must be in (0, 1]")


class NonFiniteError(RuntimeError):
    pass


class TrainStep(nn.Module):
    """DDP must see the training step as forward() so its gradient hooks fire."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, generator, global_step: int):
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


def build_loader(plain_ds: dict, ds_cfg, dist, seed: int, is_train: bool):
    """-> (loader, device_mix): with `augment_on_device` the collate hands over clean audio + noise and
    `device_mix` mixes them on the accelerator (TorchMultiSpeakerNoiseAugmentation); otherwise device_mix is None."""
    from nest_ssl.data import build_dataloader
    from nest_ssl.data.augmentation import TorchMultiSpeakerNoiseAugmentation
    from nest_ssl.nemo_compat import instantiate, target_config

    aug = plain_ds.get("batch_augmentor")
    where = f"{'model.train_ds' if is_train else 'model.validation_ds'}.batch_augmentor"
    augmentor = instantiate(aug, where) if aug else None
    loader = build_dataloader(ds_cfg, rank=dist.rank, world_size=dist.world_size, seed=seed, augmentor=augmentor,
                              is_train=is_train)
    if not getattr(ds_cfg, "augment_on_device", False):
        return loader, None
    device_aug = TorchMultiSpeakerNoiseAugmentation(target_config(aug, where)) if aug else None
    return loader, functools.partial(mix_on_device, augmentor=device_aug)


def mix_on_device(batch, generator, augmentor=None):
    """The noise mixing the collate left to the accelerator: the batch augmentor, or plain audio + noise."""
    if augmentor is not None:
        return augmentor(batch, generator=generator)
    return dataclasses.replace(batch, noisy_audio=batch.audio + batch.noise, noisy_audio_len=batch.audio_len.clone())


def validate(step_model, loader, dist, seed: int, amp_dtype, limit: Optional[int] = None, device_mix=None) -> float:
    """Mean validation loss over every rank's batches (NeMo's is rank-local; ours drives top-k on all ranks)."""
    model = dist_utils.unwrap(step_model).model
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=dist.device), 0.0  # summed on the device: no sync
    loader.set_epoch(0)
    gen = torch.Generator(dist.device).manual_seed(step_seed(seed, 0, dist.rank, stream=2))
    with torch.no_grad(), torch.autocast(dist.device.type, dtype=amp_dtype or torch.float32,
                                         enabled=amp_dtype is not None):
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            batch = batch.to(dist.device, non_blocking=True)
            batch = device_mix(batch, gen) if device_mix is not None else batch
            total = total + model.validation_step(batch, generator=gen)["loss"].double()
            count += 1
    model.train()
    total, count = dist_utils.all_reduce_sum([float(total), count], dist.device)
    return total / max(count, 1.0)


def val_due(tc: TrainerConfig, batch_in_epoch: int, epoch: int, batches_per_epoch: int) -> bool:
    if tc.check_val_every_n_epoch and (epoch + 1) % tc.check_val_every_n_epoch:
        return False
    if isinstance(tc.val_check_interval, float):
        every = max(1, int(batches_per_epoch * tc.val_check_interval))
    else:
        every = int(tc.val_check_interval)
    return batch_in_epoch % every == 0 or batch_in_epoch == batches_per_epoch


class Preemption:
    """SIGUSR1 / SIGTERM -> flag, checked at the end of each optimizer step.

    Under torchrun a SLURM signal should not reach the launcher (it would kill or SIGTERM-and-SIGKILL its
    workers), so the sbatch files trap it in the batch shell and touch the file named by $NEST_PREEMPT_FILE,
    which every step also checks."""

    def __init__(self):
        self.flag = False
        self.file = os.environ.get("NEST_PREEMPT_FILE")
        self.previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
                pass

    def _handler(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        if self.file and os.path.exists(self.file):
            self.flag = True
        return self.flag

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def compile_encoder(model: nn.Module, backend: str) -> None:
    encoder = getattr(model, "encoder", None)
    if not hasattr(encoder, "compile_layers"):
        raise ValueError(f"trainer.compile=true: {type(model).__name__} has no Conformer encoder to compile")
    encoder.compile_layers(backend)


def fetch(loader, on_error):
    """The loader's batches; an exception while fetching one goes to on_error (which checkpoints) and is re-raised."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as err:
            on_error(err)
            raise
        yield batch


def save_offending_batch(batch, logdir: Path, rank: int) -> Path:
    path = logdir / f"nonfinite_batch_rank{rank}.pt"
    torch.save({f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}, path)
    return path


def train(plain: dict, *, model_factory=None, stop_after_steps: Optional[int] = None) -> dict:
    """Pretrain from a resolved plain run config (nest_ssl.config.load_config). Returns a summary with
    `exit_code` (0, or REQUEUE_EXIT_CODE after preemption) and the per-step train losses of this rank.
    `model_factory(model_cfg) -> nn.Module` and `stop_after_steps` (return without saving, like a kill)
    exist for tests."""
    # ---- config: every section is validated before any work starts -----------------------------------
    run = build_run_config(plain)
    tc = run.trainer if run.trainer is not None else TrainerConfig()
    em_cfg = run.exp_manager if run.exp_manager is not None else em.ExpManagerConfig()
    ccp = em_cfg.checkpoint_callback_params
    if not isinstance(run.model.optim, OptimConfig):
        raise ValueError("model.optim is required (e.g. name: adamw, lr: 5.0, sched: {name: NoamAnnealing, ...})")
    if run.model.train_ds is None:
        raise ValueError("model.train_ds is required")
    if ccp.monitor not in (None, "val_loss"):
        raise ValueError(f"exp_manager.checkpoint_callback_params.monitor={ccp.monitor!r}; allowed: 'val_loss', None")
    name = em_cfg.name or run.name

    # ---- distributed, seeds, model, optimizer, data ---------------------------------------------------
    dist = dist_utils.setup(tc.accelerator)
    random.seed(run.seed), np.random.seed(run.seed), torch.manual_seed(run.seed)
    torch.backends.cudnn.benchmark = bool(tc.benchmark)
    model = (model_factory or build_model)(plain["model"]).to(dist.device)
    if tc.compile:
        compile_encoder(model, tc.compile_backend)
    init_lines = init_from_pretrained(model, plain)  # NeMo's init_from_*: strict=False; a resume below overrides it
    optimizer = build_optimizer(model, run.model.optim)
    scheduler = build_scheduler(optimizer, run.model.optim, tc.max_steps)
    amp_dtype, scaler = precision_setup(tc.precision, dist.device)
    train_loader, train_mix = build_loader(plain["model"]["train_ds"], run.model.train_ds, dist, run.seed, True)
    val_loader, val_mix = None, None
    if run.model.validation_ds is not None:
        val_loader, val_mix = build_loader(plain["model"]["validation_ds"], run.model.validation_ds, dist, run.seed,
                                           False)
    logdir = Path(dist_utils.broadcast_object(str(em.log_dir(em_cfg, run.name))))  # same datetime version
    ckpt_dir = em.checkpoint_dir(em_cfg, logdir)

    # ---- resume ---------------------------------------------------------------------------------------
    step, epoch, topk, state = 0, 0, em.TopK(ccp.save_top_k if ccp.monitor else 0, ccp.mode), None
    if em_cfg.resume_from_checkpoint:
        state = ckpt.load(em_cfg.resume_from_checkpoint)
    elif em_cfg.resume_if_exists:
        _, state = ckpt.load_latest(ckpt_dir)
        if state is None and not em_cfg.resume_ignore_no_checkpoint:
            raise FileNotFoundError(f"exp_manager.resume_if_exists: no checkpoint in {ckpt_dir} "
                                    "(set resume_ignore_no_checkpoint: true to start from scratch)")
    if state is not None:
        ckpt.restore(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        step, epoch = state["global_step"], state["epoch"]
        train_loader.load_state_dict(state["loader"])
        topk.load_state_dict(state.get("topk", {}))
    if tc.fit_scan:  # before DDP: the scan must not all-reduce gradients
        shape = largest_batch(train_loader, run.model.train_ds)
        init_lines.append(fit_scan(model, shape, run.model.sample_rate, amp_dtype, dist.device))
    step_model = dist_utils.wrap_model(TrainStep(model), dist, tc.sync_batchnorm)
    step_model.train()

    # ---- logging, checkpoint writer, preemption -------------------------------------------------------
    tb_dir = None
    if dist.is_main:
        logdir.mkdir(parents=True, exist_ok=True)
        (logdir / "config.yaml").write_text(to_yaml(plain))
        tb_dir = logdir / f"version_{len(list(logdir.glob('version_*')))}" if em_cfg.create_tensorboard_logger else None
    log = make_logger(dist.is_main, tb_dir, tc.enable_progress_bar)
    for line in init_lines:
        log.info(line)
    n_params = sum(p.numel() for p in model.parameters())
    if isinstance(tc.devices, int) and tc.devices > 0 and tc.devices * tc.num_nodes != dist.world_size:
        log.info(f"note: trainer.devices={tc.devices} x num_nodes={tc.num_nodes} != world size {dist.world_size}; "
                 "the process count comes from torchrun (--nproc_per_node, --nnodes)")
    log.info(f"{name}: {n_params:,} parameters, world size {dist.world_size}, precision {tc.precision}, "
             f"log dir {logdir}" + (f", resumed at step {step}" if state is not None else ""))

    saved_step = [-1]

    def save(val_loss: float, sync: bool = True, loader_state: Optional[dict] = None) -> Optional[Path]:
        """Write the -last (and maybe a top-k) checkpoint; rank 0 writes, the others wait. sync=False: a rank
        that failed alone writes it itself (the model and optimizer are replicated) without the barrier."""
        saved_step[0], last = step, None
        if em_cfg.create_checkpoint_callback and (dist.is_main or not sync):
            stem = em.format_name(ccp.filename, name, {"val_loss": val_loss, "step": step, "epoch": epoch})
            top_path, dropped = ckpt_dir / f"{stem}.ckpt", []
            is_top = sync and math.isfinite(val_loss) and topk.better(val_loss)
            if is_top:
                dropped = topk.add(val_loss, top_path)
            st = ckpt.state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=step,
                            epoch=epoch, loader_state=loader_state or train_loader.state_dict(), config=plain,
                            extra={"topk": topk.state_dict()})
            if is_top:
                ckpt.atomic_save(st, top_path)
                if ccp.always_save_nemo and topk.best[0][1] == str(top_path):
                    from nest_ssl.export import save_nemo  # NeMo-loadable: NeMo targets, `target`, nemo_version
                    save_nemo(model, plain["model"], ckpt_dir / f"{ccp.prefix or name}.nemo")
            last = ckpt_dir / f"{stem}-last.ckpt"
            ckpt.atomic_save(st, last)
            for old in dropped + [p for p in ckpt_dir.glob("*-last.ckpt") if p != last]:
                Path(old).unlink(missing_ok=True)
        if sync:
            dist_utils.barrier()
        return last

    def on_data_error(err: Exception) -> None:
        """A train or validation batch could not be fetched or validated (bad-sample limit, skip_bad_samples=false,
        a dead worker): keep the run. The checkpoint holds the last optimizer step and a loader position just after
        it (the micro-batches of an unfinished accumulation are read again on resume)."""
        path = save(last_val, sync=False, loader_state={**train_loader.state_dict(),
                                                        "start": train_loader.start - micro})
        if path is not None:
            err.add_note(f"nest_ssl: training state at step {step} saved to {path}; fix the data (scripts/"
                         "check_data.py lists every bad item) or raise model.train_ds.max_bad_samples, then resume")

    preempt = Preemption()
    if val_loader is not None and tc.num_sanity_val_steps and state is None:
        validate(step_model, val_loader, dist, run.seed, amp_dtype, limit=tc.num_sanity_val_steps, device_mix=val_mix)

    # ---- the loop -------------------------------------------------------------------------------------
    max_steps = tc.max_steps if tc.max_steps > 0 else math.inf
    max_epochs = tc.max_epochs if tc.max_epochs is not None else (1000 if max_steps == math.inf else math.inf)
    max_epochs = math.inf if max_epochs < 0 else max_epochs
    accum, sample_rate = tc.accumulate_grad_batches, run.model.sample_rate
    history, bad_streak, skipped_steps, micro, last_val, exit_code = [], 0, 0, 0, math.nan, 0
    audio_sec, tokens_logged, t_log = 0.0, 0.0, time.time()
    window_loss = tokens = torch.zeros((), device=dist.device)  # summed on the device: no sync per micro-batch
    optimizer.zero_grad(set_to_none=True)
    while step < max_steps and epoch < max_epochs and exit_code == 0:
        train_loader.set_epoch(epoch)
        for batch in fetch(train_loader, on_data_error):
            audio_sec += float(batch.audio_len.sum()) / sample_rate  # CPU tensor: no device sync
            batch, micro = batch.to(dist.device, non_blocking=True), micro + 1
            last_micro = micro == accum or train_loader.start == len(train_loader)
            torch.manual_seed(step_seed(run.seed, step, dist.rank, stream=10 + micro))  # dropout
            gen = torch.Generator(dist.device).manual_seed(step_seed(run.seed, step, dist.rank, stream=1000 + micro))
            batch = train_mix(batch, gen) if train_mix is not None else batch
            with dist_utils.maybe_no_sync(step_model, last_micro):
                with torch.autocast(dist.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    out = step_model(batch, gen, step)
                loss = out["loss"].float() / accum
                (loss if scaler is None else scaler.scale(loss)).backward()
            window_loss, tokens = window_loss + loss.detach(), tokens + out.get("masked_tokens", 0)
            if not last_micro:
                continue

            # ---- optimizer step (skipped when the loss or the gradients are not finite) ----
            micro, lr = 0, optimizer.param_groups[0]["lr"]
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = clip_gradients(model, tc)
            loss_val, grad_norm, tok, bad, preempted = step_stats(window_loss, grad_norm, tokens, scaler is None,
                                                                   preempt.requested(), dist.device)
            window_loss = tokens = torch.zeros((), device=dist.device)
            tokens_logged += tok
            if bad:
                bad_streak, skipped_steps = bad_streak + 1, skipped_steps + 1
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                log.info(f"step {step}: non-finite loss {loss_val} / grad norm {grad_norm}; step skipped")
                if bad_streak >= tc.max_nonfinite_steps:
                    path = save_offending_batch(batch, logdir, dist.rank)
                    raise NonFiniteError(f"{bad_streak} optimizer steps in a row had a non-finite loss or gradient "
                                         f"(trainer.max_nonfinite_steps={tc.max_nonfinite_steps}); last batch "
                                         f"saved to {path}")
                continue
            bad_streak = 0
            if scaler is not None:
                scaler.step(optimizer), scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            step += 1
            history.append(loss_val)

            # ---- log, validate, checkpoint, preemption ----
            if step % tc.log_every_n_steps == 0:
                loss_mean, tok = dist_utils.all_reduce_mean([loss_val, tokens_logged], dist.device)
                audio_all = dist_utils.all_reduce_sum([audio_sec], dist.device)[0]
                rate = audio_all / max(time.time() - t_log, 1e-9)
                gpu_gib = torch.cuda.max_memory_allocated() / 2**30 if dist.device.type == "cuda" else None
                values = {"train_loss": loss_mean, "learning_rate": lr, "grad_norm": grad_norm,
                          "audio_seconds_per_second": rate, "tokens_masked": tok, "gpu_memory": gpu_gib,
                          "skipped_samples": len(train_loader.bad_samples), "skipped_steps": skipped_steps}
                log.scalars(step, {**values, "global_step": step, "epoch": epoch})
                log.progress(step, tc.max_steps, {"loss": loss_mean, "lr": lr, "audio_s/s": rate})
                audio_sec, tokens_logged, t_log = 0.0, 0.0, time.time()
            if val_loader is not None and val_due(tc, train_loader.start, epoch, len(train_loader)):
                try:
                    last_val = validate(step_model, val_loader, dist, run.seed, amp_dtype, device_mix=val_mix)
                except Exception as err:
                    on_data_error(err)
                    raise
                log.scalars(step, {"val_loss": last_val})
                log.info(f"step {step}: val_loss {last_val:.4f}")
                save(last_val)
            if preempted:
                log.info(f"step {step}: preemption signal; checkpointing and exiting with {REQUEUE_EXIT_CODE}")
                save(last_val)
                if dist.is_main and preempt.file:
                    Path(preempt.file).unlink(missing_ok=True)  # the requeued job must not stop at once
                exit_code = REQUEUE_EXIT_CODE
            if exit_code or step >= max_steps or (stop_after_steps is not None and step >= stop_after_steps):
                break
        else:
            epoch += 1
        if stop_after_steps is not None and step >= stop_after_steps:
            break  # tests: behave like a kill -9 here (nothing more is saved)
    killed = stop_after_steps is not None and step >= stop_after_steps
    if exit_code == 0 and not killed and saved_step[0] != step:
        save(last_val)  # end of training: the final -last checkpoint

    preempt.restore()
    log.close()
    dist_utils.teardown()
    return {"exit_code": exit_code, "losses": history, "step": step, "epoch": epoch, "log_dir": str(logdir),
            "val_loss": last_val, "skipped_steps": skipped_steps}


def clip_gradients(model: nn.Module, tc: TrainerConfig) -> torch.Tensor:
    """Total gradient norm before clipping, as a device tensor (reading it is left to step_stats); clips by norm or
    value when gradient_clip_val > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    clip = tc.gradient_clip_val or 0.0
    if clip > 0 and tc.gradient_clip_algorithm == "value":
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grad_value_(params, clip)
        return norm
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


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

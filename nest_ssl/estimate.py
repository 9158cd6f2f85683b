"""Numbers to know before launching a NEST run: parameters, FLOPs per audio-second, memory per GPU, wall-clock.

- Parameters: the model built on the `meta` device (no memory), total and trainable (the quantizer is frozen).
- FLOPs per audio-second: `flops.nest_train_flops_per_audio_second` (PaLM's 6N + attention convention) at the
  configured utterance length (`model.train_ds.max_duration` unless given).
- Memory per GPU: fp32 weights (4 B / parameter, frozen buffers included), fp32 gradients (4 B / trainable), the
  optimizer's state (AdamW: 8 B / trainable), under 16 / bf16 autocast its cache of half-precision weight copies
  (2 B / trainable), with several GPUs DDP's gradient buckets (4 B / trainable), and the activations autograd saves
  for the configured batch. Those are measured, not guessed: encoder + decoder + loss run forward on the meta device
  under `saved_tensors_hooks`, counting every saved storage once and leaving out the parameters. For 16 / bf16 the
  model and input are cast to that dtype, which under-counts what autocast keeps in fp32 (norms, softmax inputs), so
  that figure is a lower bound. Not counted: the CUDA context (~0.5 GiB), allocator fragmentation, the
  preprocessor and quantizer's no-grad temporaries, and the data loader's pinned buffers.
- Wall-clock: audio hours x FLOPs per audio-second / (GPUs x peak FLOP/s x MFU), per epoch; and for
  `trainer.max_steps` optimizer steps of full batches (batch x seconds x GPUs x accumulate_grad_batches).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nest_ssl.flops import nest_train_flops_per_audio_second

OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "novograd": 4, "sgd": 4, "adafactor": 4}
HALF = {"16": torch.float16, "16-mixed": torch.float16, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}


def _batch_shape(ds, seconds: float | None) -> tuple[float, int]:
    """(seconds, utterances) of the batch to estimate: at `seconds` (else max_duration, else 20 s), batch_size or
    what batch_duration allows; with per-bucket batch sizes (Lhotse), the last bucket's size at its bin."""
    if getattr(ds, "bucket_batch_size", None) and seconds is None:
        return float(ds.bucket_duration_bins[-1]), int(ds.bucket_batch_size[-1])
    seconds = float(seconds if seconds is not None else (ds.max_duration or 20.0))
    if getattr(ds, "bucket_batch_size", None):
        bucket = next((i for i, b in enumerate(ds.bucket_duration_bins) if seconds <= b), None)
        if bucket is None:
            raise ValueError(f"{seconds} s is longer than the last model.train_ds.bucket_duration_bins edge "
                             f"{ds.bucket_duration_bins[-1]}: such utterances are filtered out")
        return seconds, int(ds.bucket_batch_size[bucket])
    if getattr(ds, "batch_duration", None):
        return seconds, max(1, int(float(ds.batch_duration) // seconds))
    return seconds, int(ds.batch_size)


def parameter_counts(model: nn.Module) -> tuple[int, int, int]:
    """(all parameters, trainable parameters, buffer elements)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable, sum(b.numel() for b in model.buffers())


def saved_activation_bytes(model: nn.Module, batch: int, seconds: float, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "meta") -> int:
    """Bytes autograd keeps for backward in one training forward of (encoder, decoder, loss) on `batch` utterances
    of `seconds` each (no masking, which does not change the saved set). Each storage counts once; parameters are
    excluded (they live in the weights' budget)."""
    enc_cfg = model.encoder.cfg
    hop = 0.01  # NeMo's 10 ms feature stride (window_stride) in every NEST config
    frames = int(round(seconds / hop))
    frames += -frames % 16  # the preprocessor's pad_to: 16
    feats = torch.randn(batch, enc_cfg.feat_in, frames, device=device, dtype=dtype)  # (B, F, T)
    lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
    param_keys = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in param_keys:
            seen[key] = t.untyped_storage().nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            encoded, encoded_len = model.encoder(feats, lengths)  # (B, d, T')
            log_probs = model.decoder(encoded)  # (B, T', C, H), or (B, T', C) with squeeze_single
            shape = log_probs.shape[:2] + log_probs.shape[3:]  # tokens: (B, T', H) or (B, T')
            tokens = torch.zeros(shape, dtype=torch.long, device=device)
            masks = torch.ones_like(feats)  # every token selected: the loss's gather is saved over all of them
            model.loss(masks, log_probs, tokens, encoded_len)
    finally:
        model.train(was_training)
    return sum(seen.values())


def persistent_bytes(model: nn.Module, precision: str, optimizer: str, gpus: int) -> dict:
    """Bytes per GPU that do not depend on the batch, by category (module docstring): weights, gradients, optimizer
    state, autocast's half-precision weight copies, DDP's gradient buckets. Call before casting `model` to half."""
    total, trainable, buffers = parameter_counts(model)
    half = str(precision) in HALF
    return {"weights": 4 * total + 4 * buffers, "gradients": 4 * trainable,
            "optimizer": OPTIMIZER_STATE_BYTES.get(optimizer.lower(), 8) * trainable,
            "autocast_weight_cache": 2 * trainable if half else 0, "ddp_buckets": 4 * trainable if gpus > 1 else 0}


def config_gpus(trainer) -> tuple[int, str]:
    """(GPU count, where it came from) from `trainer.devices` x `num_nodes`; 1 when devices means "all visible"
    (-1 / auto: unknown before launch), said so."""
    devices = getattr(trainer, "devices", 1) if trainer is not None else 1
    nodes = int(getattr(trainer, "num_nodes", 1) or 1) if trainer is not None else 1
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices * nodes, f"trainer.devices={devices} x num_nodes={nodes}"
    return nodes, f"--gpus not given and trainer.devices={devices!r} (all visible) is unknown before launch: " \
                  f"assuming 1 per node x num_nodes={nodes}; pass --gpus"


def estimate(plain: dict, run, hours: float = 1000.0, gpus: Optional[int] = None, mfu: float = 0.4,
             peak_tflops: float = 989.0, seconds: Optional[float] = None, epochs: float = 1.0) -> dict:
    """All figures for a resolved config (nest_ssl.config.load_config); see the module docstring. `gpus` None: from
    the config's trainer.devices x num_nodes."""
    from nest_ssl.nemo_compat import build_model

    gpus, gpus_from = (gpus, "--gpus") if gpus is not None else config_gpus(run.trainer)

    for name, v in (("hours", hours), ("gpus", gpus), ("mfu", mfu), ("peak_tflops", peak_tflops), ("epochs", epochs)):
        if not v > 0:
            raise ValueError(f"{name}={v}; must be > 0")
    if mfu > 1:
        raise ValueError(f"mfu={mfu}; a fraction of the peak in (0, 1]")
    ds = run.model.train_ds
    seconds, batch = _batch_shape(ds, seconds)
    model = build_model(plain["model"], device="meta")
    total, trainable, buffers = parameter_counts(model)
    precision = str(run.trainer.precision if run.trainer is not None else 32)
    dtype = HALF.get(precision, torch.float32)
    optim = run.model.optim.name.lower()
    memory = persistent_bytes(model, precision, optim, gpus)
    memory["activations"] = saved_activation_bytes(model.to(dtype) if dtype != torch.float32 else model, batch,
                                                   seconds, dtype)
    flops = nest_train_flops_per_audio_second(trainable, plain["model"]["encoder"], seconds)
    per_second = gpus * peak_tflops * 1e12 * mfu / flops  # audio-seconds per second over all GPUs
    tc = run.trainer
    steps = tc.max_steps if tc is not None and tc.max_steps > 0 else 0
    step_audio = batch * seconds * gpus * (tc.accumulate_grad_batches if tc is not None else 1)  # worst case
    return {"params": total, "trainable": trainable, "buffers": buffers, "seconds": seconds, "batch": batch,
            "precision": precision, "optimizer": optim, "memory": memory, "memory_total": sum(memory.values()),
            "activation_bytes_per_audio_second": memory["activations"] / (batch * seconds),
            "flops_per_audio_second": flops, "hours": hours, "gpus": gpus, "gpus_from": gpus_from, "mfu": mfu,
            "peak_tflops": peak_tflops, "epochs": epochs,
            "wall_clock_s": epochs * hours * 3600 / per_second, "max_steps": steps, "step_audio_s": step_audio,
            "steps_wall_clock_s": steps * step_audio / per_second}


def format_report(e: dict, name: str = "") -> str:
    gib = 2.0**30
    lines = [f"{name}: {e['params']:,} parameters ({e['trainable']:,} trainable), {e['buffers']:,} buffer values",
             f"model FLOPs (fwd+bwd) per audio-second at {e['seconds']:g} s utterances: "
             f"{e['flops_per_audio_second'] / 1e9:.2f} GFLOP",
             f"memory per GPU, batch {e['batch']} x {e['seconds']:g} s, precision {e['precision']}, "
             f"{e['optimizer']}, {e['gpus']} GPU(s) ({e['gpus_from']}):"]
    unit, scale = ("GiB", gib) if e["memory_total"] >= gib / 10 else ("MiB", 2.0**20)  # a tiny model is not 0.00 GiB
    lines += [f"  {k:<22} {v / scale:8.2f} {unit}" for k, v in e["memory"].items() if v]
    lines.append(f"  {'total':<22} {e['memory_total'] / scale:8.2f} {unit}   (+ CUDA context, fragmentation; "
                 f"activations {e['activation_bytes_per_audio_second'] / 2**20:.1f} MiB per audio-second)")
    lines.append(f"wall-clock for {e['epochs']:g} epoch(s) of {e['hours']:g} h of audio on {e['gpus']} GPU(s) at "
                 f"{e['mfu']:.0%} MFU of {e['peak_tflops']:g} TFLOP/s: {human_duration(e['wall_clock_s'])} "
                 f"({e['hours'] * 3600 * e['epochs'] / e['wall_clock_s']:,.0f} audio-s/s in all)")
    if e["max_steps"]:
        lines.append(f"trainer.max_steps={e['max_steps']:,} with full batches ({e['step_audio_s']:,.0f} audio-s per "
                     f"step on {e['gpus']} GPUs, {e['max_steps'] * e['step_audio_s'] / 3600:,.0f} h of audio "
                     f"seen): {human_duration(e['steps_wall_clock_s'])}")
    return "\n".join(lines)



def human_duration(seconds: float) -> str:
    if seconds < 1:  # a tiny config's figures are fractions of a second: never "0 s"
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" + (f" ({seconds / 86400:.1f} days)" if seconds >= 86400 else "")

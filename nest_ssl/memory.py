"""Peak memory of tensors on any device, CPU included, by tracking the storages that ops allocate.

`torch.cuda.max_memory_allocated` exists only on CUDA; the memory model (README, "Memory") is measured on CPU
with gloo processes, so this counts bytes itself: a dispatch mode sees every op's outputs, records each new
storage's size, and a weakref finalizer takes it off when the storage is freed. Views share their base's storage
and are counted once. What existed before the mode started (parameters, optimizer state) is not counted; callers
add those from their own sizes (`tensor_bytes`). Allocator rounding and caching are not modelled.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (an iterable of tensors; None entries are skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)  # a DTensor shard counts its local part
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


class PeakMemory(TorchDispatchMode):
    """`with PeakMemory() as m: ...` -> m.peak: the most bytes alive at once among storages made inside."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            key = id(s)
            if key in self._seen or s.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._freed, key, s.nbytes())
        return out


# ---- per-rank memory of one training step: ddp vs fsdp, with and without activation checkpointing ----------------
REDUCED = ("model.encoder.n_layers=4", "model.encoder.d_model=256", "model.encoder.n_heads=4",
           "model.encoder.subsampling_conv_channels=256")  # NEST-L's YAML, narrower and shallower (CPU-sized)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward while the context is open, leaving out the
    parameters of `module` (as they are at that moment: FSDP swaps in the gathered ones while a layer runs)."""

    def __init__(self, module: torch.nn.Module | None = None):
        self.bytes, self._seen, self.module = 0, set(), module

    def _pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        params = () if self.module is None else {_local(p).untyped_storage().data_ptr()
                                                 for p in self.module.parameters()}
        if id(s) not in self._seen and s.data_ptr() not in params:
            self._seen.add(id(s))
            self.bytes += s.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def measure_step(model, step_model, batch, seconds_per_rank: float) -> dict:
    """One warm-up step, then one measured AdamW step -> bytes per rank by category (fp32 CPU tensors).
    fwd_bwd_peak: storages made during forward + backward (activations, gradients, FSDP's gathered layers);
    opt_peak: made during optimizer.step (foreach temporaries); total_peak adds what lives across steps."""
    params = [p for p in step_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    step_model(*batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    saved = SavedActivations(model)
    with PeakMemory() as fwd_bwd:
        with saved:
            loss = step_model(*batch)
        loss.backward()
    grads = tensor_bytes(_local(p.grad) for p in params)
    with PeakMemory() as opt_peak:
        opt.step()
    opt.zero_grad(set_to_none=True)
    row = {"params": tensor_bytes(_local(p) for p in params),
           "frozen_and_buffers": tensor_bytes([*(p for p in model.parameters() if not p.requires_grad),
                                               *model.buffers()]),
           "grads": grads,
           "optimizer": tensor_bytes(_local(v) for s in opt.state.values() for v in s.values()
                                     if isinstance(v, torch.Tensor)),
           "saved_activations_per_audio_s": saved.bytes / seconds_per_rank,
           "fwd_bwd_peak": fwd_bwd.peak, "opt_peak": opt_peak.peak}
    persistent = row["params"] + row["optimizer"] + row["frozen_and_buffers"]
    row["total_peak"] = persistent + max(row["fwd_bwd_peak"], grads + row["opt_peak"])
    return row


def measure_worker(rank: int, world: int, port: int, overrides: list, seconds: float, batch: int, variants: list,
                   out: str) -> None:
    """One process of a gloo group: each (strategy, activation_checkpointing) variant -> a JSON line in `out`."""
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist

    from nest_ssl import distributed, fsdp
    from nest_ssl.config import apply_overrides, load_yaml, resolve
    from nest_ssl.nemo_compat import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = Path(__file__).resolve().parent.parent / "configs" / "nest_fast-conformer_l.yaml"
    plain = resolve(apply_overrides(load_yaml(config), [*REDUCED, *overrides]))
    n = int(seconds * 16000)
    g = torch.Generator().manual_seed(rank)
    audio, lens = 0.1 * torch.randn(batch, n, generator=g), torch.full((batch,), n)
    for strategy, ckpt_mode in variants:
        torch.manual_seed(0)
        model = build_model(plain["model"]).train()
        model.encoder.set_activation_checkpointing(ckpt_mode)
        step_model = _LossStep(model)
        if strategy == "fsdp":
            fsdp.shard(step_model, model.encoder.layers)
        else:
            step_model = torch.nn.parallel.DistributedDataParallel(step_model)
        row = measure_step(model, step_model, (audio, lens), batch * seconds)
        row.update(strategy=strategy, activation_checkpointing=ckpt_mode, world_size=world, utt_seconds=seconds,
                   batch_per_rank=batch, d_model=plain["model"]["encoder"]["d_model"],
                   n_layers=plain["model"]["encoder"]["n_layers"])
        if rank == 0:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        dist.barrier()
        del step_model, model  # DDP's reducer and FSDP's state go before their process group
    distributed.teardown()


class _LossStep(torch.nn.Module):
    """The NEST training loss as the module's forward (what DDP and FSDP wrap)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, audio, lens):
        gen = torch.Generator().manual_seed(0)
        out = self.model(input_signal=audio, input_signal_length=lens, noisy_input_signal=audio,
                         noisy_input_signal_length=lens, apply_mask=True, generator=gen, decode=False)
        return self.model.compute_loss(*out, from_encoded=True)[0]


def head_peak_ratio(frames: int, d_model: int = 512, num_classes: int = 8192, chunk: int | None = None) -> dict:
    """Peak bytes of decoder head + MLM loss, forward and backward, from encoder frames: full log-probs
    (decoder.forward + MultiMLMLoss) vs the chunked loss (masked_logits.py). NEST-L: d_model 512, 8192 classes."""
    from nest_ssl.nest.decoder import MultiSoftmaxDecoder, MultiSoftmaxDecoderConfig
    from nest_ssl.nest.losses import MultiMLMLoss, MultiMLMLossConfig
    from nest_ssl.nest.masked_logits import DEFAULT_CHUNK, mlm_loss_from_encoded

    torch.manual_seed(0)
    dec = MultiSoftmaxDecoder(MultiSoftmaxDecoderConfig(feat_in=d_model, num_classes=num_classes))
    loss = MultiMLMLoss(MultiMLMLossConfig(combine_time_steps=8))
    enc = torch.randn(1, d_model, frames, requires_grad=True)
    masks = (torch.rand(1, 1, frames * 8) < 0.5).float().expand(1, 80, frames * 8)
    tokens = torch.randint(0, num_classes, (1, frames, 1))
    peaks = {}
    for name in ("full", "chunked"):
        with PeakMemory() as m:
            out = loss(masks, dec(enc), tokens) if name == "full" else \
                mlm_loss_from_encoded(dec, loss, masks, enc, tokens, chunk or DEFAULT_CHUNK)
            out.backward()
        peaks[name] = m.peak
        enc.grad, dec.decoder_layers[0].weight.grad = None, None
    return {"frames": frames, **peaks, "ratio": peaks["chunked"] / peaks["full"]}

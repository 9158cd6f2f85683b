"""Shared pieces of the multi-process FSDP / DCP tests: the nest_tiny model, a fixed batch, one optimizer step, and
workers that hand back plain arrays (npz files) to the test process."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nest_ssl import distributed

PARITY = Path(__file__).parent / "fixtures" / "parity"
CFG = json.loads((PARITY / "nest_tiny" / "config.json").read_text())["model"]


def model_config(norm: str = "batch_norm", dropout: float = 0.0) -> dict:
    cfg = copy.deepcopy(CFG)
    cfg["preprocessor"]["dither"] = 0.0  # dither draws from a per-process RNG: off, so ranks match the union run
    cfg["encoder"].update(conv_norm_type=norm, dropout=dropout, dropout_pre_encoder=dropout, dropout_att=dropout)
    return cfg


def build(norm: str = "batch_norm", dropout: float = 0.0):
    from nest_ssl.nest.model import EncDecDenoiseMaskedTokenPredModel

    torch.manual_seed(0)
    return EncDecDenoiseMaskedTokenPredModel(model_config(norm, dropout)).train()


def union_batch(step: int, B: int = 4, L: int = 12000):
    """Audio for B utterances and time masks in which utterance b and b + B/2 share a pattern, so each rank's half
    holds as many masked tokens as the other (then the mean of the ranks' losses is the union batch's loss)."""
    g = torch.Generator().manual_seed(100 + step)
    lens = torch.tensor([L, L - 2500, L - 800, L - 4000][:B])
    audio = torch.randn(B, L, generator=g) * (torch.arange(L) < lens[:, None])
    noise = torch.randn(B, L, generator=g) * 0.05
    T = (L // 160 + 1 + 15) // 16 * 16  # feature frames (pad_to 16)
    half = (torch.rand(B // 2, T, generator=g) < 0.5).repeat_interleave(16, 1)[:, :T]
    masks = torch.cat([half, half]).float()[:, None, :].expand(B, 80, T).contiguous()
    return audio, lens, audio + noise, masks


class Step(nn.Module):
    """The whole loss as one forward (FSDP and DDP see every parameter use inside the root forward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, audio, lens, noisy, masks):
        out = self.model(input_signal=audio, input_signal_length=lens, noisy_input_signal=noisy,
                         noisy_input_signal_length=lens, apply_mask=True, masks=masks, decode=False)
        return self.model.compute_loss(*out, from_encoded=True)[0]


def rank_slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def init_dist(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def train_steps(step_model, params, steps: int, rank: int = 0, world: int = 1, accum: int = 1,
                clip: float = 1.0, opt=None, start: int = 0) -> list[float]:
    """AdamW steps start..steps-1 on this rank's share of each union batch (accum micro-batches per step)."""
    from nest_ssl import fsdp

    if opt is None:
        opt = torch.optim.AdamW(params, lr=1e-3, eps=1e-4)  # eps: gradients at rounding-noise level step ~0, not ~lr
    losses = []
    for s in range(start, steps):
        audio, lens, noisy, masks = (rank_slice(t, rank, world) for t in union_batch(s))
        total = 0.0
        for m in range(accum):
            part = [t[m::accum] for t in (audio, lens, noisy, masks)]  # rank r, micro m: utterance 2r+m
            with fsdp.accumulation(step_model, m == accum - 1):
                loss = step_model(*part) / accum
                loss.backward()
            total += float(loss.detach())
        fsdp.clip_grad_norm(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def strategy_worker(rank: int, world: int, port: int, out: str, variants: list) -> None:
    """Each variant (strategy, norm, accum, activation checkpointing): train 3 steps; save this rank's losses and
    rank 0's full final weights."""

    from nest_ssl import fsdp

    init_dist(rank, world, port)
    for strategy, norm, accum, ckpt_mode in variants:
        model = build(norm)
        model.encoder.set_activation_checkpointing(ckpt_mode)
        step_model = Step(model)
        if strategy == "fsdp":
            fsdp.shard(step_model, model.encoder.layers)
        else:
            step_model = nn.parallel.DistributedDataParallel(step_model)
        params = [p for p in step_model.parameters() if p.requires_grad]
        losses = train_steps(step_model, params, 3, rank, world, accum)
        if strategy == "fsdp":
            state = fsdp.full_state_dict(step_model)
        else:
            state = step_model.module.state_dict()
        arrays = {f"w/{k}": v.detach().float().numpy() for k, v in state.items()}
        arrays |= {f"b/{k}": v.detach().numpy() for k, v in model.named_buffers() if "running_" in k}  # this rank's
        np.savez(f"{out}/{strategy}-{norm}-{accum}-{ckpt_mode}-rank{rank}.npz", losses=np.array(losses), **arrays)
        del step_model, model  # DDP's reducer and FSDP's state go before their process group
    distributed.teardown()


def single_run(norm: str, steps: int = 3, accum: int = 1) -> tuple[list[float], dict]:
    model = build(norm)
    step_model = Step(model)
    params = [p for p in step_model.parameters() if p.requires_grad]
    losses = train_steps(step_model, params, steps, accum=accum)
    return losses, {k: v.detach().float().numpy() for k, v in step_model.state_dict().items()}


def sharded(rank: int, dropout: float = 0.1):
    """A 2-rank FSDP nest_tiny model with its optimizer; per-rank dropout stream."""
    from nest_ssl import fsdp

    model = build("batch_norm", dropout)
    step_model = Step(model)
    fsdp.shard(step_model, model.encoder.layers)
    params = [p for p in step_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, eps=1e-4)
    torch.manual_seed(1000 + rank)
    return model, step_model, params, opt


def _full(step_model) -> dict:
    from nest_ssl import fsdp

    state = fsdp.full_state_dict(step_model)  # buffers come back as the live tensors: copy them
    return {f"w/{k}": v.float().numpy().copy() for k, v in state.items()}


def _dcp_run(rank: int, world: int, out: str, mode: str, steps: int = 4) -> None:
    import signal

    import torch.distributed as dist

    from nest_ssl import checkpoint as ckpt
    from nest_ssl import dcp_checkpoint

    model, step_model, params, opt = sharded(rank)
    run = Path(out) / ("ref" if mode == "reference" else "run")

    def save(step, async_save=False):
        return dcp_checkpoint.save(run / f"tiny-step={step}-last.dcp", model, opt,
                                   {"global_step": step, "epoch": 0, "config": {"model": model_config()}},
                                   {"rng": ckpt.rng_state()}, async_save=async_save)

    if mode == "resume":
        train_state, rank_state = dcp_checkpoint.load(dcp_checkpoint.latest(run), model, opt)
        ckpt.set_rng_state(rank_state["rng"])
        losses = train_steps(step_model, params, steps, rank, world, opt=opt, start=train_state["global_step"])
    else:
        losses = train_steps(step_model, params, 2, rank, world, opt=opt)
        snapshot = _full(step_model)
        pending = save(2, async_save=mode == "reference")
        losses += train_steps(step_model, params, 3, rank, world, opt=opt, start=2)  # (reference: while writing)
        if mode == "reference":
            pending.wait()
            dist.barrier()
            np.savez(f"{out}/snapshot2-rank{rank}.npz", **snapshot)
        else:  # every rank dies inside the next save, after writing its shards, before the commit
            dcp_checkpoint._commit = lambda tmp, final: os.kill(os.getpid(), signal.SIGKILL)
            save(3)
        losses += train_steps(step_model, params, steps, rank, world, opt=opt, start=3)
    np.savez(f"{out}/{mode}-rank{rank}.npz", losses=np.array(losses), **_full(step_model))


def dcp_worker(rank: int, world: int, port: int, out: str, modes: list) -> None:
    """crash: steps 0-1, save, step 2, kill -9 in the next save. reference: steps 0-3 with an async save after
    step 1 written while step 2 trains. resume (fresh model and optimizer): the latest checkpoint, then steps 2-3."""

    from nest_ssl import dcp_checkpoint

    init_dist(rank, world, port)
    for mode in modes:
        _dcp_run(rank, world, out, mode)
    dcp_checkpoint.close()
    distributed.teardown()

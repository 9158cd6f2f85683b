"""`trainer.strategy: fsdp`: PyTorch's FSDP2 (`fully_shard`) over the Conformer layers and the root module.

DDP keeps a full copy of the parameters, gradients and AdamW state on every rank (16 bytes per fp32 parameter);
FSDP keeps 1/world_size of each and all-gathers a layer's parameters just before the layer runs.

* Units: one FSDP unit per Conformer layer (gathered for its forward, freed after it, gathered again for its
  backward), and the root unit for everything else (subsampling, decoder head, shared biases).
* Frozen parameters (the quantizer's random projection and codebooks, the mask embedding) are not sharded: they are
  small, never step, and must keep their own dtype (the quantizer computes its targets in fp32/fp64).
* Mixed precision (`trainer.precision: bf16-mixed`): parameters are gathered in bf16 for compute, gradients are
  reduce-scattered in fp32 and the sharded master weights and AdamW state stay fp32. The training loop's autocast
  still runs around the step, so ops that autocast keeps in fp32 (log-softmax, the features) stay fp32.
  `16-mixed` (fp16 with a loss scaler) is refused: bf16 needs no scaler. BatchNorm layers are their own units
  with fp32 parameters (one more small all-gather per Conformer layer): as under DDP + autocast, they normalise
  the bf16 input with fp32 weight and statistics.
* BatchNorm statistics behave as under DDP: with `trainer.sync_batchnorm` the layers are converted to
  SyncBatchNorm first (batch statistics over all ranks; the Triton conv kernel syncs them itself); without it each
  rank normalises with its own batch and, as DDP's `broadcast_buffers` does, every forward starts from rank 0's
  running statistics, so checkpoints and validation see the same statistics as a DDP run.
* Gradient accumulation: on all but the last micro-batch gradients are neither reduce-scattered nor resharded
  (`accumulation`), so parameters are gathered once per micro-batch and gradients reduced once per step.
* Clipping: `clip_grad_norm` takes the norm over every rank's shards (one all-reduce) and returns a plain tensor.
The Triton kernels run unchanged: a layer's forward sees ordinary (unsharded) tensors.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _BatchNorm

DDP_SPELLINGS = ("auto", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true")
STRATEGIES = DDP_SPELLINGS + ("fsdp",)


@dataclass(frozen=True)
class Strategy:
    name: str  # "ddp" | "fsdp"
    find_unused_parameters: bool = False


def parse_strategy(value) -> Strategy:
    """NeMo/Lightning `trainer.strategy` -> Strategy. Lightning's DDP spellings (and `auto`, `null`) mean DDP."""
    if value is None or value in DDP_SPELLINGS:
        return Strategy("ddp", value == "ddp_find_unused_parameters_true")
    if value == "fsdp":
        return Strategy("fsdp")
    raise ValueError(f"trainer.strategy={value!r}; allowed: {list(STRATEGIES)}")


def mixed_precision(precision) -> MixedPrecisionPolicy:
    """trainer.precision -> FSDP2 policy: bf16 compute with fp32 reduction and master weights, or all fp32."""
    p = str(precision)
    if p in ("bf16", "bf16-mixed"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if p in ("32", "32-true"):
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    raise ValueError(f"trainer.precision={precision!r} with trainer.strategy=fsdp; allowed: 32, 32-true, "
                     "bf16, bf16-mixed (fp16 needs a loss scaler; bf16 does not)")


def broadcast_batchnorm_stats(module: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics on every rank (DDP's broadcast_buffers, for the buffers training
    changes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                by_dtype.setdefault(buf.dtype, []).append(buf)
    for bufs in by_dtype.values():  # one broadcast per dtype, not three per BatchNorm (as DDP coalesces them)
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(bufs, [f.view_as(b) for f, b in zip(flat.split([b.numel() for b in bufs]), bufs)])


def shard(root: nn.Module, layers, precision=32, sync_batchnorm: bool = False, mesh=None) -> nn.Module:
    """fully_shard each of `layers` and then `root` (in place; returns root). `root` is the module whose forward
    runs the whole step (the training loop's TrainStep), `layers` the Conformer layers inside it."""
    if mesh is None:
        device = next(root.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if sync_batchnorm:
        root = nn.SyncBatchNorm.convert_sync_batchnorm(root)  # state_dict keys unchanged
    policy = mixed_precision(precision)
    frozen = {p for p in root.parameters() if not p.requires_grad}
    for bn in (m for m in root.modules() if isinstance(m, _BatchNorm)):  # innermost units first
        # fp32 weights, as FSDP1's MixedPrecision keeps _BatchNorm and as DDP under autocast runs it: batch_norm
        # takes a bf16 input with fp32 weight and statistics, but not bf16 weights with fp32 running statistics
        fully_shard(bn, mesh=mesh, mp_policy=MixedPrecisionPolicy(cast_forward_inputs=False))
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=frozen & set(layer.parameters()) or None)
    fully_shard(root, mesh=mesh, mp_policy=policy, ignored_params=frozen or None)
    if not sync_batchnorm:  # SyncBatchNorm's statistics are already the same on every rank
        root.register_forward_pre_hook(lambda module, args: broadcast_batchnorm_stats(module))
    return root


def accumulation(model: nn.Module, last_micro_batch: bool):
    """Context around one micro-batch's forward/backward: unless it is the last micro-batch of the optimizer step,
    gradients stay local (FSDP: no reduce-scatter, parameters stay gathered; DDP: no_sync)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last_micro_batch)
        model.set_reshard_after_backward(last_micro_batch)
        return contextlib.nullcontext()
    if not last_micro_batch and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for plain or sharded (DTensor) gradients: the total norm over all ranks' shards as
    a plain tensor, gradients clipped in place when max_norm > 0."""
    norm = replicated(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def full_state_dict(model: nn.Module) -> dict:
    """The unsharded model state on rank 0's CPU ({} on the other ranks; a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a sharded result (e.g. a norm over DTensor gradients); plain tensors pass through."""
    return t.full_tensor() if isinstance(t, DTensor) else t

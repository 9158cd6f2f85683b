"""The kernel launches the shipped configs make, recorded without a GPU, for kernels/static_report.py (sm_90).

The host wrappers (`rel_pos_attention`, `conv_glu_dw_bn_silu`) run forward and backward on fake CUDA tensors
(torch's FakeTensorMode: shapes, dtypes and storage offsets, no memory); every kernel's `run` is replaced by a recorder
that keeps the exact positional and keyword arguments the wrapper passes, and for an autotuned kernel one launch per
config its pruner keeps (with that config's blocks, num_warps and num_stages, as `Autotuner.run` passes them). Nothing
about a launch is written by hand here: the report hands each recorded launch to Triton's own launch path
(`JITFunction.warmup`), which derives the signature and the specialisation (16-byte-aligned pointers, integers
divisible by 16 or equal to 1) from these arguments as a real launch does.

What the shipped configs launch (configs/*.yaml; the tiny CPU demo configs excluded): attention head dims 44 (NEST-S,
176/4), 64 (NEST-M/L and the contrastive configs) and 128 (NEST-XL/XXL); the conv module with (kernel size, bias)
(9, bias) for S/M/L, (9, no bias) XL, (5, no bias) XXL, (31, bias) contrastive_conformer_ssl, at C = 512 or 1024 (every
shipped width is a multiple of 16, so one compile serves them all); precisions 32 (fp32), bf16-mixed and 16-mixed
(bf16/fp16 activations, fp32 parameters), and bf16-mixed under FSDP (`bf16-fsdp`: parameters gathered in bf16, so
pos_bias_u/v and the conv weights arrive as bf16 pointers; the BatchNorm affine stays fp32, nest_ssl/fsdp.py shards
BatchNorm with fp32 parameters). T = 750 frames, and T = 752 (labels ending `T%16=0`): Triton specialises an integer
argument divisible by 16, so 1 length in 16 compiles other binaries. `trainer.sync_batchnorm` (DDP or FSDP, 2 ranks
or more) adds SyncBatchNorm's two finalize launches (labels with `sync`): this rank's statistics, then the gathered
ranks' (one row per rank, so a world size divisible by 16, `sync W%16=0`, compiles other binaries).
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field

import torch

LENGTHS = {"": 750, " T%16=0": 752}  # label suffix -> T
BATCH = 2
SEED = 12345  # any: the kernels do not specialise the seed (do_not_specialize)
# precision -> (activation dtype, parameter dtype)
PRECISIONS = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.float32),
              "fp16": (torch.float16, torch.float32), "bf16-fsdp": (torch.bfloat16, torch.bfloat16)}
ATTENTION = {"S": (44, 4), "M/L": (64, 8), "XL/XXL": (128, 8)}  # label -> (d_k, heads)
CONV = {"S/M/L": (9, True, 512), "XL": (9, False, 1024), "XXL": (5, False, 1024), "conformer_ssl": (31, True, 512)}
SYNC_WORLD = {" sync": 8, " sync W%16=0": 16}  # label infix -> ranks in the SyncBatchNorm group


@dataclass
class Launch:
    fn: object  # the JITFunction
    args: list
    kwargs: dict  # as the JITFunction gets them: an autotuned launch's with its config's (blocks, warps, stages)
    labels: list[str] = field(default_factory=list)  # which shipped shapes launch it
    launched: object = None  # what the host wrapper launched (the Autotuner for a tuned kernel, else fn)
    call_kwargs: dict = field(default_factory=dict)  # the keyword arguments the host wrapper passed

    @property
    def name(self) -> str:
        return self.fn.__name__


class Pointer:
    """A recorded tensor argument: its dtype and address, as a launch hands them to Triton's specialisation. Device
    allocations are 256-byte aligned, so a view's alignment is set by its storage offset."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._addr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._addr

    def zero_(self):
        """The autotuner's reset_to_zero hook (replaying a launch through it): no memory to zero."""
        return self


def _recorder(kernel, out: list, label: str):
    """A `run` that records the launch instead of running it (autotuned: one launch per config the pruner keeps)."""
    import triton

    def run(*args, grid=None, warmup=False, **kwargs):
        args = [Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        if isinstance(kernel, triton.runtime.Autotuner):
            kernel.nargs = dict(zip(kernel.arg_names, args))
            configs = kernel.prune_configs(kwargs) if len(kernel.configs) > 1 else kernel.configs
            out.extend(Launch(kernel.fn, args, {**kwargs, **c.all_kwargs()}, [label], kernel, kwargs) for c in configs)
        else:
            out.append(Launch(kernel, args, dict(kwargs), [label], kernel, kwargs))
    return run


@contextlib.contextmanager
def _recording(module, out: list, label: str):
    import triton
    kernels = [v for v in vars(module).values()
               if isinstance(v, (triton.runtime.JITFunction, triton.runtime.Autotuner))]
    for k in kernels:
        k.run = _recorder(k, out, label)
    try:
        yield
    finally:
        for k in kernels:
            del k.run


class _Ctx:
    """The autograd context a Function's forward fills and its backward reads."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


@contextlib.contextmanager
def _backward_at_once(function):
    """`function.apply` runs forward, then backward on a ones gradient, without autograd's engine (which wants a real
    CUDA device for fake CUDA tensors)."""
    def apply(*args):
        ctx = _Ctx()
        out = function.forward(ctx, *args)
        function.backward(ctx, torch.ones_like(out))
        return out
    function.apply = apply
    try:
        yield
    finally:
        del function.apply


def _fake(*shape, dtype):
    return torch.empty(*shape, device="cuda", dtype=dtype)


def attention_launches(act: torch.dtype, param: torch.dtype, d_k: int, heads: int, T: int, label: str) -> list[Launch]:
    """Training forward + backward (attention dropout 0.1, as every shipped config) and the eval forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    m = importlib.import_module("nest_ssl.kernels.rel_pos_attention")
    out: list[Launch] = []
    with FakeTensorMode(), _recording(m, out, label):
        # q, k, v (B, H, T, d_k) and p (1, H, 2T - 1, d_k) in the activation dtype; pos_bias_u/v parameters.
        q, k, v = (_fake(BATCH, heads, T, d_k, dtype=act) for _ in range(3))
        p = _fake(1, heads, 2 * T - 1, d_k, dtype=act)
        u, vb = (_fake(heads, d_k, dtype=param) for _ in range(2))
        lengths = torch.full((BATCH,), T, device="cuda", dtype=torch.int64)
        with _backward_at_once(m.RelPosAttentionFunction):
            m.rel_pos_attention(q, k, v, p, u, vb, lengths, dropout_p=0.1, training=True, seed=SEED)
        m.rel_pos_attention(q, k, v, p, u, vb, lengths, dropout_p=0.1, training=False)
    return out


@contextlib.contextmanager
def _sync_group(module, world: int):
    """SyncBatchNorm's collectives on `world` ranks without a process group: the gather returns `world` rows of
    statistics (their values do not matter here, their shape does), the all-reduce leaves its tensor as it is."""
    from unittest import mock
    with mock.patch.object(module, "_synced", lambda group: True), \
            mock.patch.object(torch.distributed, "get_world_size", lambda group=None: world), \
            mock.patch.object(torch.distributed, "all_gather", lambda out, t, group=None: None), \
            mock.patch.object(torch.distributed, "all_reduce", lambda t, group=None: None):
        yield


def conv_launches(act: torch.dtype, param: torch.dtype, kernel_size: int, bias: bool, channels: int, T: int,
                  label: str, world: int | None = None) -> list[Launch]:
    """Training forward + backward (BatchNorm statistics and running-stat update) and the BN-folded eval kernel. With
    `world`, SyncBatchNorm on that many ranks: only its two finalize launches (the others are the unsynced ones)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    m = importlib.import_module("nest_ssl.kernels.conv_module")
    out: list[Launch] = []
    pad = (kernel_size - 1) // 2
    synced = _sync_group(m, world) if world else contextlib.nullcontext()
    with FakeTensorMode(), _recording(m, out, label), synced:
        h = _fake(BATCH, T, 2 * channels, dtype=act)  # pointwise_conv1's output (B, T, 2C)
        w = _fake(channels, 1, kernel_size, dtype=param)
        b = _fake(channels, dtype=param) if bias else None
        bn = torch.nn.BatchNorm1d(channels, device="cuda")  # fp32 affine and statistics under every precision
        lengths = torch.full((BATCH,), T, device="cuda", dtype=torch.int64)
        with _backward_at_once(m._ConvModuleCore):
            m.conv_glu_dw_bn_silu(h, lengths, w, b, bn, (pad, pad), process_group=object() if world else None)
        if world:
            return [x for x in out if x.name == "_bn_finalize_fwd"]
        bn.eval()
        with torch.no_grad():
            m.conv_glu_dw_bn_silu(h, lengths, w, b, bn, (pad, pad))
    return out


def shipped_launches() -> list[tuple[str, Launch]]:
    """(precision, launch) for every launch of every shipped shape and precision, in a stable order."""
    out = []
    for suffix, T in LENGTHS.items():
        for prec, (act, param) in PRECISIONS.items():
            for label, (d_k, heads) in ATTENTION.items():
                out += [(prec, x) for x in attention_launches(act, param, d_k, heads, T, f"{prec} {label}{suffix}")]
            for label, (k, bias, channels) in CONV.items():
                out += [(prec, x) for x in conv_launches(act, param, k, bias, channels, T, f"{prec} {label}{suffix}")]
                for sync, world in SYNC_WORLD.items():
                    out += [(prec, x) for x in conv_launches(act, param, k, bias, channels, T,
                                                             f"{prec} {label}{sync}{suffix}", world)]
    return out

"""Attention memory without a GPU: peak bytes of live tensors, eager NeMo math vs the Triton kernel, forward + backward.

    python kernels/memory_report.py            # NEST-L heads (H 8, d_k 64), B 16, T 250 and 750, bf16

Every tensor an op creates is counted from its creation until it is freed (a `TorchDispatchMode` with a finalizer on
each new storage-owning tensor); the inputs and the upstream gradient exist before and are not counted. At the real
shape the tensors live on the `meta` device (no memory, exact sizes) and the Triton launches are replaced by no-ops:
this counts the kernel path's allocations (its O(T) buffers), not its arithmetic. Tests run the same tracker at a small
shape on CPU under TRITON_INTERPRET=1 with the kernels really running (tests/test_rel_pos_attention.py).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PeakLiveBytes(TorchDispatchMode):
    """Peak of the bytes held by tensors created inside the mode (views and outputs that share an input's storage
    are not new memory)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t._base is None and not func._schema.is_mutable \
                    and "view" not in func.__name__ and "alias" not in func.__name__:
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        n = t.untyped_storage().nbytes()
        self.live += n
        self.peak, self.largest = max(self.peak, self.live), max(self.largest, n)
        weakref.finalize(t, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n


def _inputs(B, H, T, d, dtype, device):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device).requires_grad_()  # noqa: E731
    # q, k, v (B, H, T, d_k); p (1, H, 2T-1, d_k); pos_bias_u/v (H, d_k) fp32 parameters as under autocast
    return [mk(B, H, T, d), mk(B, H, T, d), mk(B, H, T, d), mk(1, H, 2 * T - 1, d),
            mk(H, d).float().detach().requires_grad_(), mk(H, d).float().detach().requires_grad_()]


@contextlib.contextmanager
def _no_launches():
    """Skip the Triton launches (meta tensors have no data): the host code's allocations run as they are."""
    m = importlib.import_module("nest_ssl.kernels.rel_pos_attention")
    saved = m._launch, m._bwd_preprocess
    m._launch = lambda *a, **k: None
    m._bwd_preprocess = type("NoLaunch", (), {"__getitem__": lambda self, grid: (lambda *a, **k: None)})()
    try:
        yield
    finally:
        m._launch, m._bwd_preprocess = saved


def peak_fwd_bwd(path: str, B: int, H: int, T: int, d: int, dtype=torch.bfloat16, device="meta",
                 lengths=None) -> tuple[int, int]:
    """(peak live bytes, largest single tensor) of one forward + backward of `path` ("eager" | "triton")."""
    from nest_ssl.conformer.attention import rel_pos_attention_torch
    from nest_ssl.kernels.rel_pos_attention import rel_pos_attention

    x = _inputs(B, H, T, d, dtype, device)
    lengths = torch.full((B,), T, device=device) if lengths is None else lengths.to(device)
    mask = ~(torch.arange(T, device=device)[None] < lengths[:, None])  # (B, T) padded
    att_mask = mask[:, None, :] | mask[:, :, None]  # (B, T, T), built by the encoder once for all layers
    grad = torch.ones(B, H, T, d, dtype=dtype, device=device)
    launches = _no_launches() if device == "meta" else contextlib.nullcontext()
    with launches, PeakLiveBytes() as tracker:
        if path == "eager":
            out = rel_pos_attention_torch(*x, att_mask)
        else:
            out = rel_pos_attention(*x, lengths)
        grads = torch.autograd.grad(out, x, grad)
        del out, grads
    return tracker.peak, tracker.largest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="250,750")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    for T in (int(t) for t in args.T.split(",")):
        eager, _ = peak_fwd_bwd("eager", args.batch, 8, T, 64)
        kernel, largest = peak_fwd_bwd("triton", args.batch, 8, T, 64)
        print(f"T={T} B={args.batch} H=8 d_k=64 bf16 fwd+bwd: eager {eager / 2**20:.0f} MiB, triton "
              f"{kernel / 2**20:.0f} MiB (largest tensor {largest / 2**20:.0f} MiB), ratio {kernel / eager:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

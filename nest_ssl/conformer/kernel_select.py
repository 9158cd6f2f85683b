"""Which implementation (torch or our Triton kernels) the attention and conv modules run, decided once.

`attention_impl` / `conv_impl` take "torch", "triton" or "auto". The choice is made when the encoder is built and again
whenever its parameters move (`.to()`, `.cuda()`, `to_empty()`), never inside forward, so torch.compile never traces
it. An explicit "triton" raises with the import error's text when the kernels cannot be imported; "auto" picks Triton
on CUDA when they import and logs which path each module kind uses and why. Only `ImportError` is caught.
"""
from __future__ import annotations

import importlib

import torch

IMPLS = ("auto", "torch", "triton")
KERNELS = {"attention": ("nest_ssl.kernels.rel_pos_attention", "rel_pos_attention"),
           "conv": ("nest_ssl.kernels.conv_module", "conv_glu_dw_bn_silu")}


class KernelCall:
    """A Triton entry point that runs outside torch.compile (a graph break around it) and counts its calls, so the
    encoder and the tests can show that the kernel, not the torch path, ran."""

    def __init__(self, name: str, fn):
        self.name, self.fn, self.calls = name, fn, 0

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def import_kernel(kind: str):
    """The kernel function for `kind` ("attention" | "conv"); raises ImportError naming the cause."""
    module, name = KERNELS[kind]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ImportError(f"the Triton {kind} kernel ({module}) does not import: {type(e).__name__}: {e}") from e


def resolve(kind: str, requested: str, device: torch.device, supported: str | None = None) -> tuple[str, str]:
    """-> (impl, why). `supported` is None when the module's configuration fits the kernel, else the reason it does
    not (for "auto" this picks torch; an explicit "triton" was already refused at construction)."""
    if requested not in IMPLS:
        raise ValueError(f"{kind}_impl={requested!r}; allowed: {list(IMPLS)}")
    if requested == "torch":
        return "torch", "requested"
    if requested == "triton":
        import_kernel(kind)  # raises with the import error's text
        return "triton", "requested"
    if supported is not None:
        return "torch", f"auto: {supported}"
    if device.type != "cuda":
        return "torch", f"auto: parameters on {device.type} (the kernels need CUDA)"
    try:
        import_kernel(kind)
    except ImportError as e:
        return "torch", f"auto: {e}"
    return "triton", "auto: CUDA and the Triton kernel imports"


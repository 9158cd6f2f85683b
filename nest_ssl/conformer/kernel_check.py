"""The GPU check's first step: on a CUDA device `auto` picks the Triton kernels and they really run."""
from __future__ import annotations

import torch

from .encoder import ConformerEncoder, ConformerEncoderConfig


def check_kernels_used(device: torch.device, d_model: int = 512, n_heads: int = 8, frames: int = 2000) -> dict:
    """Build a 2-layer NEST-L-width encoder with `auto` kernels on `device`, run forward + backward under bf16
    autocast, and return what ran. Raises RuntimeError unless auto picked Triton for both kinds and both kernels
    really ran (the GPU check's first step: it must fail, never fall back)."""
    cfg = ConformerEncoderConfig(feat_in=80, n_layers=2, d_model=d_model, n_heads=n_heads, subsampling="dw_striding",
                                 subsampling_factor=8, subsampling_conv_channels=256, conv_kernel_size=9)
    enc = ConformerEncoder(cfg).to(device).train()
    x = torch.randn(2, 80, frames, device=device)
    lengths = torch.tensor([frames, frames * 3 // 4], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out, _ = enc(x, lengths)
    out.float().square().mean().backward()
    result = {"device": str(device), "impls": enc.kernel_impls, "calls": enc.kernel_calls()}
    if any(impl != "triton" for impl, _ in enc.kernel_impls.values()) or 0 in result["calls"].values():
        raise RuntimeError(f"the Triton kernels are not the ones used: {result}")
    return result

"""Conformer convolution module, NeMo's `ConformerConvolution`, kept in (B, T, C) layout.

pointwise_conv1 (GEMM) -> GLU -> pad mask -> depthwise conv -> norm -> SiLU -> pointwise_conv2 (GEMM). The part between
the two GEMMs is `glu_dwconv_norm_silu_torch`, the reference the Triton kernel matches. Parameters keep NeMo's Conv1d
shapes and names, so state_dicts are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .kernel_select import KernelCall, import_kernel


def glu_dwconv_norm_silu_torch(h: torch.Tensor, pad_mask: torch.Tensor, depthwise: nn.Conv1d, norm: nn.Module,
                               context: tuple[int, int]) -> torch.Tensor:
    """h (B, T, 2C) after pointwise_conv1; pad_mask (B, T) True = padded -> (B, T, C)."""
    x = F.glu(h, dim=-1).masked_fill(pad_mask.unsqueeze(-1), 0.0)  # (B, T, C)
    x = depthwise(F.pad(x.transpose(1, 2), context))  # (B, C, T)
    if isinstance(norm, nn.LayerNorm):
        x = norm(x.transpose(1, 2)).transpose(1, 2)
    else:  # BatchNorm1d / GroupNorm take (B, C, T); BN counts padded frames, as NeMo does
        x = norm(x)
    return F.silu(x).transpose(1, 2)  # (B, T, C)


def _sync_group(bn: nn.Module):
    """The process group whose BN statistics are shared (SyncBatchNorm under torch.distributed), else None."""
    if isinstance(bn, nn.SyncBatchNorm) and torch.distributed.is_available() and torch.distributed.is_initialized():
        return bn.process_group or torch.distributed.group.WORLD
    return None


def _conv_context(kernel_size: int, conv_context_size) -> tuple[int, int]:
    if conv_context_size is None:
        return ((kernel_size - 1) // 2, (kernel_size - 1) // 2)
    if conv_context_size == "causal":
        return (kernel_size - 1, 0)
    if isinstance(conv_context_size, (list, tuple)) and len(conv_context_size) == 2 \
            and conv_context_size[0] + conv_context_size[1] + 1 == kernel_size:
        return (int(conv_context_size[0]), int(conv_context_size[1]))
    raise ValueError(f"conv_context_size={conv_context_size!r}: allowed null, 'causal' or [l, r] with "
                     f"l + r + 1 == conv_kernel_size ({kernel_size})")


def _norm(conv_norm_type: str, d: int) -> nn.Module:
    if conv_norm_type == "batch_norm":
        return nn.BatchNorm1d(d)
    if conv_norm_type == "instance_norm":
        return nn.InstanceNorm1d(d)
    if conv_norm_type == "layer_norm":
        return nn.LayerNorm(d)
    for prefix in ("group_norm", "groupnorm"):  # NeMo's code wants group_normN; its YAML comment says groupnormN
        suffix = conv_norm_type[len(prefix):]
        if conv_norm_type.startswith(prefix) and suffix.isdigit() and d % int(suffix) == 0:
            return nn.GroupNorm(int(suffix), d)
    raise ValueError(f"conv_norm_type={conv_norm_type!r}; allowed: 'batch_norm', 'instance_norm', 'layer_norm', "
                     "'group_normN' (N divides d_model)")


class ConformerConvolution(nn.Module):
    def __init__(self, d_model: int, kernel_size: int, norm_type: str = "batch_norm", conv_context_size=None,
                 use_bias: bool = True, conv_impl: str = "torch"):
        super().__init__()
        self.context = _conv_context(kernel_size, conv_context_size)
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=use_bias)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, bias=use_bias)
        self.batch_norm = _norm(norm_type, d_model)  # NeMo names it batch_norm whatever the norm type
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=use_bias)
        self.conv_impl = conv_impl  # "torch" | "triton" ("auto" is resolved by the encoder)

    @property
    def conv_impl(self) -> str:
        return self._impl

    @conv_impl.setter
    def conv_impl(self, value: str) -> None:
        # Set at construction or by the encoder when its device is known, never in forward (see
        # RelPositionMultiHeadAttention.attention_impl).
        if value not in ("torch", "triton"):
            raise ValueError(f"conv_impl={value!r}; allowed: 'torch', 'triton'")
        if value == "triton" and not isinstance(self.batch_norm, _BatchNorm):
            raise ValueError(f"conv_impl='triton' supports conv_norm_type='batch_norm' only (got "
                             f"{type(self.batch_norm).__name__}); use conv_impl: torch or auto")
        self._impl = value
        self._kernel = KernelCall("conv", import_kernel("conv")) if value == "triton" else None

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), pad_mask (B, T) True = padded -> (B, T, C)."""
        h = F.linear(x, self.pointwise_conv1.weight.squeeze(-1), self.pointwise_conv1.bias)  # (B, T, 2C)
        # The eval-mode kernel folds BN and has no backward: gradients through eval-mode BN take the torch path
        # (the only case where conv_impl='triton' runs torch; KernelCall.calls shows how often the kernel ran).
        grads = torch.is_grad_enabled() and (h.requires_grad or self.depthwise_conv.weight.requires_grad)
        if self._kernel is not None and (self.batch_norm.training or not grads):
            y = self._kernel(h, (~pad_mask).sum(1), self.depthwise_conv.weight, self.depthwise_conv.bias,
                             self.batch_norm, self.context, _sync_group(self.batch_norm))
        else:
            y = glu_dwconv_norm_silu_torch(h, pad_mask, self.depthwise_conv, self.batch_norm, self.context)
        return F.linear(y, self.pointwise_conv2.weight.squeeze(-1), self.pointwise_conv2.bias)

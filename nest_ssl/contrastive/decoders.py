"""The contrastive model's decoders: `ConvASRDecoderReconstruction` and `ConvASRDecoder`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ConvASRDecoderReconstructionConfig:
    feat_in: int = 512
    feat_out: int = 128
    feat_hidden: int = 128
    stride_layers: int = 0
    non_stride_layers: int = 0
    kernel_size: int = 11
    init_mode: str = "xavier_uniform"
    activation: str = "relu"
    stride_transpose: bool = True
    apply_softmax: bool = False


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


class ConvASRDecoderReconstruction(nn.Module):
    """Per-frame MLP (plus optional stride/non-stride conv blocks) from encoder frames to `feat_out` targets."""

    config_class = ConvASRDecoderReconstructionConfig

    def __init__(self, cfg: ConvASRDecoderReconstructionConfig):
        super().__init__()
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"activation={cfg.activation!r}; allowed: {sorted(_ACTIVATIONS)}")
        if cfg.init_mode != "xavier_uniform":
            raise ValueError(f"init_mode={cfg.init_mode!r}; allowed: ['xavier_uniform']")
        self.apply_softmax = cfg.apply_softmax
        act, h, k = _ACTIVATIONS[cfg.activation](), cfg.feat_hidden, cfg.kernel_size  # one shared instance, as NeMo
        layers: list[nn.Module] = [nn.Conv1d(cfg.feat_in, h, 1)]
        for _ in range(cfg.stride_layers):
            if cfg.stride_transpose:
                dw = nn.ConvTranspose1d(h, h, k, stride=2, padding=(k - 3) // 2 + 1, output_padding=1, groups=h)
            else:
                dw = nn.Conv1d(h, h, k, stride=2, padding=(k - 1) // 2, groups=h)
            layers += [act, dw, nn.Conv1d(h, h, 1), nn.BatchNorm1d(h, eps=1e-3, momentum=0.1)]
        for _ in range(cfg.non_stride_layers):
            layers += [act, nn.Conv1d(h, h, k, padding=k // 2, groups=h), nn.Conv1d(h, h, 1),
                       nn.BatchNorm1d(h, eps=1e-3, momentum=0.1)]
        layers += [act, nn.Conv1d(h, cfg.feat_out, 1)]
        self.decoder_layers = nn.Sequential(*layers)
        for m in self.decoder_layers:  # xavier on weights only; biases keep the Conv default (NeMo's init)
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                nn.init.xavier_uniform_(m.weight, gain=1.0)

    def forward(self, encoder_output: torch.Tensor) -> torch.Tensor:
        out = self.decoder_layers(encoder_output).transpose(-2, -1)  # (B, D, T') -> (B, T', feat_out)
        return torch.log_softmax(out, dim=-1) if self.apply_softmax else out


@dataclass
class ConvASRDecoderConfig:
    feat_in: int = 512
    num_classes: int = 90000
    init_mode: str = "xavier_uniform"
    vocabulary: list | None = None
    add_blank: bool = True


class ConvASRDecoder(nn.Module):
    """Conv1d(k=1) to num_classes (+1 blank) and log_softmax: the MLM head of conformer_ssl."""

    config_class = ConvASRDecoderConfig

    def __init__(self, cfg: ConvASRDecoderConfig):
        super().__init__()
        if cfg.init_mode != "xavier_uniform":
            raise ValueError(f"init_mode={cfg.init_mode!r}; allowed: ['xavier_uniform']")
        n_out = cfg.num_classes + (1 if cfg.add_blank else 0)
        self.decoder_layers = nn.Sequential(nn.Conv1d(cfg.feat_in, n_out, kernel_size=1, bias=True))
        nn.init.xavier_uniform_(self.decoder_layers[0].weight, gain=1.0)

    def forward(self, encoder_output: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.decoder_layers(encoder_output).transpose(1, 2), dim=-1)  # (B, T', C+1)

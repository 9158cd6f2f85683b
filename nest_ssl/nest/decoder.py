"""`MultiSoftmaxDecoder`: a 1x1 conv from encoder frames to H codebooks x C classes, log-softmax."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MultiSoftmaxDecoderConfig:
    feat_in: int = 512
    num_classes: int = 8192
    num_decoders: int = 1
    init_mode: str = "xavier_uniform"
    use_bias: bool = False
    squeeze_single: bool = False


class MultiSoftmaxDecoder(nn.Module):
    """(B, D, T') encoder output -> log_probs (B, T', C, H) (or (B, T', C) when H == 1 and squeeze_single)."""

    config_class = MultiSoftmaxDecoderConfig

    def __init__(self, cfg: MultiSoftmaxDecoderConfig):
        super().__init__()
        if cfg.init_mode != "xavier_uniform":
            raise ValueError(f"init_mode={cfg.init_mode!r}; allowed: ['xavier_uniform']")
        self.cfg = cfg
        conv = nn.Conv1d(cfg.feat_in, cfg.num_classes * cfg.num_decoders, kernel_size=1, bias=cfg.use_bias)
        self.decoder_layers = nn.Sequential(conv)
        nn.init.xavier_uniform_(conv.weight, gain=1.0)  # weight only: the bias keeps PyTorch's default, as NeMo

    def logits(self, encoder_output: torch.Tensor) -> torch.Tensor:
        B, _, T = encoder_output.shape
        out = self.decoder_layers(encoder_output).transpose(1, 2)  # (B, T', C*H)
        return out.reshape(B, T, self.cfg.num_classes, self.cfg.num_decoders)  # channel c*H + h -> (c, h)

    def forward(self, encoder_output: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(self.logits(encoder_output), dim=2)  # (B, T', C, H)
        if self.cfg.num_decoders == 1 and self.cfg.squeeze_single:
            return log_probs.squeeze(-1)
        return log_probs

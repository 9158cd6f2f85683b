"""Conv subsampling of the FastConformer front: `dw_striding` and `striding`, factors 2/4/8.

NeMo >= 2.5 masks the time axis before every layer (ReLUs included) and after the last one, so padded frames never
leak into valid ones. `out` is registered before `conv`, as in NeMo's state_dict.
"""
from __future__ import annotations

import torch
from torch import nn

SUBSAMPLING = ("dw_striding", "striding")


def _time_mask(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    t = torch.arange(x.shape[2], device=x.device)
    return x * (t[None, :] < lengths[:, None]).to(x.dtype)[:, None, :, None]  # (B, 1, T, 1) over (B, C, T, F)


class MaskedConvSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """x (B, 1, T, F) -> (B, C, T', F'), lengths updated after every strided conv."""
        for layer in self:
            x = layer(_time_mask(x, lengths))
            if isinstance(layer, nn.Conv2d) and layer.stride != (1, 1):
                k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
                lengths = torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1
        return _time_mask(x, lengths), lengths


class ConvSubsampling(nn.Module):
    def __init__(self, subsampling: str, factor: int, feat_in: int, d_model: int, conv_channels: int):
        super().__init__()
        if subsampling not in SUBSAMPLING:
            raise ValueError(f"subsampling={subsampling!r}; allowed: {list(SUBSAMPLING)}")
        if factor not in (2, 4, 8):
            raise ValueError(f"subsampling_factor={factor}; allowed: [2, 4, 8]")
        self.factor = factor
        stages = factor.bit_length() - 1
        freq = feat_in
        for _ in range(stages):
            freq = (freq + 2 - 3) // 2 + 1
        c = conv_channels
        if subsampling == "dw_striding":
            layers: list[nn.Module] = [nn.Conv2d(1, c, 3, 2, 1), nn.ReLU(True)]
            for _ in range(stages - 1):
                layers += [nn.Conv2d(c, c, 3, 2, 1, groups=c), nn.Conv2d(c, c, 1), nn.ReLU(True)]
        else:
            relu, layers, c_in = nn.ReLU(True), [], 1  # NeMo shares one ReLU instance in `striding`
            for _ in range(stages):
                layers += [nn.Conv2d(c_in, c, 3, 2, 1), relu]
                c_in = c
        # NeMo creates the convs first (init RNG order) but registers `out` first (state_dict order).
        self.out = nn.Linear(c * freq, d_model)
        self.conv = MaskedConvSequential(*layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """x (B, T, F) -> (B, T', d_model), lengths (B,) int64."""
        x, lengths = self.conv(x.unsqueeze(1), lengths)  # (B, C, T', F')
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lengths  # flat index c * F' + f, as NeMo

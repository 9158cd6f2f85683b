"""BEST-RQ random-projection quantizer: frozen projection + frozen float64 codebooks -> target tokens.

NeMo's l2 path materialises x - codebook as (B, T', H, code_dim, C) in float64 (about 6 GB for 8 x 60 s at
C=8192). We take the argmin of ||x||^2 - 2 x.c + ||c||^2 instead, one float64 matmul, and prove in
tests/test_quantizer.py that the tokens are identical (including the zero-vector ties of padded groups).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DIST_FNS = ("l2", "cosine")


@dataclass
class RandomProjectionVectorQuantizerConfig:
    feat_in: int = 80
    code_dim: int = 16
    num_classes: int = 8192
    num_books: int = 1
    dist_fn: str = "cosine"
    time_ahead: bool = False
    freeze: bool = True
    squeeze_single: bool = False
    combine_time_steps: int = 1


class RandomProjectionVectorQuantizer(nn.Module):
    """(B, F, T) features (or (B, T, F) with time_ahead) -> (xq (B, code_dim, T', H) float64, tokens (B, T', H))."""

    config_class = RandomProjectionVectorQuantizerConfig

    def __init__(self, cfg: RandomProjectionVectorQuantizerConfig):
        super().__init__()
        if cfg.dist_fn not in DIST_FNS:
            raise ValueError(f"dist_fn={cfg.dist_fn!r}; allowed: {list(DIST_FNS)}")
        if cfg.combine_time_steps < 1:
            raise ValueError(f"combine_time_steps={cfg.combine_time_steps}; must be >= 1")
        self.cfg = cfg
        self.proj = nn.Linear(cfg.feat_in * cfg.combine_time_steps, cfg.num_books * cfg.code_dim, bias=False)
        nn.init.xavier_normal_(self.proj.weight)
        # Same RNG consumption as NeMo (randn, then normal_ again in float64) so seeded inits match.
        codebooks = torch.randn(cfg.num_books, cfg.num_classes, cfg.code_dim).double()
        nn.init.normal_(codebooks, mean=0.0, std=1.0)
        self.codebooks = nn.Parameter(F.normalize(codebooks, dim=-1))  # (H, C, code_dim) float64, as NeMo stores it
        if cfg.freeze:
            for p in self.parameters():
                p.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        # Keep the codebooks float64 through model.half()/.bfloat16()/.float(): a cast would change the tokens.
        # Device moves still apply; the values come from the pre-cast tensor, so nothing is rounded.
        saved = self.codebooks.data
        super()._apply(fn, recurse)
        if self.codebooks.dtype != torch.float64:
            self.codebooks.data = saved.to(device=self.codebooks.device, dtype=torch.float64)
        return self

    def _frames(self, input_signal: torch.Tensor) -> torch.Tensor:
        x = input_signal if self.cfg.time_ahead else input_signal.transpose(1, 2)  # (B, T, F)
        B, T, Fd = x.shape
        if Fd != self.cfg.feat_in:
            raise ValueError(f"input feature dim {Fd} != quantizer feat_in={self.cfg.feat_in}")
        c = self.cfg.combine_time_steps
        if T % c != 0:
            raise ValueError(f"frames T={T} not divisible by combine_time_steps={c} (NeMo pads features to pad_to=16)")
        return x.contiguous().reshape(B, T // c, c * Fd)  # (B, T', c*F): time-major stacking, as NeMo

    def project(self, input_signal: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected vectors (B, T', H, code_dim) in float32 (zero for all-zero groups)."""
        x = self._frames(input_signal).float()
        B, Tq, _ = x.shape
        x = F.linear(x, self.proj.weight.float())
        return F.normalize(x.view(B, Tq, self.cfg.num_books, self.cfg.code_dim), dim=-1)  # (B, T', H, d)

    def tokens_from_projection(self, x: torch.Tensor) -> torch.Tensor:
        """argmin_c ||x - c|| (l2) or argmax_c cos(x, c) (cosine) per book, in float64, without (.., d, C)."""
        x = x.double()
        cb = self.codebooks.double()  # (H, C, d)
        dots = torch.einsum("bthd,hcd->bthc", x, cb)  # (B, T', H, C)
        if self.cfg.dist_fn == "cosine":
            # NeMo's cosine path crashes (float32 einsum with float64 codebooks); ours is the evident intent.
            norms = cb.norm(dim=-1).clamp_min(1e-12)  # (H, C)
            return (dots / norms).argmax(dim=-1)
        # ||x||^2 - 2 x.c + ||c||^2, argmin over c; ||x||^2 is constant per row so it is dropped.
        c2 = cb.square().sum(-1)  # (H, C)
        tokens = (c2 - 2.0 * dots).argmin(dim=-1)  # (B, T', H)
        # An all-zero group (padding) makes every distance ||c||: NeMo's argmin then picks the codeword with the
        # smallest rounded norm. Reproduce that choice exactly by taking the norms in NeMo's own layout.
        # (Applied unconditionally: testing zero.any() first would be a host sync; the norms are only (H, C).)
        zero = x.abs().amax(dim=-1) == 0  # (B, T', H)
        nemo_norms = (-cb.transpose(1, 2)).unsqueeze(0).unsqueeze(0).norm(dim=-2)  # (1, 1, H, C)
        return torch.where(zero, nemo_norms.argmin(dim=-1).expand_as(tokens), tokens)

    def forward(self, input_signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Targets in fp32 projection + fp64 distances, outside autocast, so bf16 training never changes a token.
        with torch.autocast(device_type=input_signal.device.type, enabled=False):
            x = self.project(input_signal)
            tokens = self.tokens_from_projection(x)
            xq = self._gather(tokens)
        if self.cfg.num_books == 1 and self.cfg.squeeze_single:
            return xq.squeeze(-1), tokens.squeeze(-1)
        return xq, tokens

    def _gather(self, tokens: torch.Tensor) -> torch.Tensor:
        # NeMo gathers codewords in (B, H, T', d) order and then views that buffer as (B, T', d, H): for H > 1 the
        # result is scrambled. xq never reaches the loss; we keep NeMo's layout for parity.
        B, Tq, H = tokens.shape
        d = self.cfg.code_dim
        flat = tokens + self.cfg.num_classes * torch.arange(H, device=tokens.device)  # (B, T', H)
        flat = flat.transpose(1, 2).reshape(-1)  # (B*H*T',)
        xq = F.embedding(flat, self.codebooks.reshape(-1, d)).view(B, Tq, d, H)
        return xq if self.cfg.time_ahead else xq.transpose(1, 2)  # (B, d, T', H)

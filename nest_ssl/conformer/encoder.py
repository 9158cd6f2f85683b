"""NeMo's `ConformerEncoder` (FastConformer with dw_striding), spec sections 3.1-3.6.

Boundary as NeMo: (audio_signal (B, feat_in, T), length (B,)) -> (encoded (B, d_model, T'), encoded_len (B,) int64).
Inside, activations are (B, T, d). Attribute names are NeMo's state_dict keys.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from nest_ssl.checks import check_lengths
from nest_ssl.config import ConfigError

from .checkpointing import checkpointed_call, parse_mode
from .kernel_select import IMPLS, resolve
from .layer import ConformerLayer
from .pos_enc import PositionalEncoding, RelPositionalEncoding
from .subsampling import ConvSubsampling

log = logging.getLogger(__name__)


@dataclass
class ConformerEncoderConfig:
    feat_in: int = 80
    n_layers: int = 17
    d_model: int = 512
    feat_out: int = -1
    causal_downsampling: bool = False
    subsampling: str = "striding"
    subsampling_factor: int = 4
    subsampling_conv_chunking_factor: int = 1
    subsampling_conv_channels: int = -1
    reduction: str | None = None
    reduction_position: int | None = None
    reduction_factor: int = 1
    ff_expansion_factor: int = 4
    self_attention_model: str = "rel_pos"
    n_heads: int = 4
    att_context_size: list = field(default_factory=lambda: [-1, -1])
    att_context_probs: list | None = None
    att_context_style: str = "regular"
    xscaling: bool = True
    untie_biases: bool = True
    pos_emb_max_len: int = 5000
    conv_kernel_size: int = 31
    conv_norm_type: str = "batch_norm"
    conv_context_size: object = None
    use_bias: bool = True
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.1
    dropout_att: float = 0.0
    stochastic_depth_drop_prob: float = 0.0
    stochastic_depth_mode: str = "linear"
    stochastic_depth_start_layer: int = 1
    global_tokens: int = 0
    global_tokens_spacing: int = 1
    global_attn_separate: bool = False
    use_pytorch_sdpa: bool = False  # accepted: our eager path is NeMo's manual math (1.7e-6 from SDPA's)
    use_pytorch_sdpa_backends: list | None = None
    sync_max_audio_length: bool = True
    attention_impl: str = "auto"  # ours: auto | torch | triton (auto = triton on CUDA when it imports)
    conv_impl: str = "auto"  # ours: auto | torch | triton

    def __post_init__(self):
        for key in ("feat_in", "n_layers", "d_model", "n_heads"):
            value = getattr(self, key)
            if isinstance(value, int) and value < 1:  # a `???` is reported when it is used
                raise ConfigError(f"model.encoder.{key}={value}; must be >= 1")


def compute_stochastic_depth_drop_probs(num_layers: int, p: float = 0.0, mode: str = "linear",
                                        start_layer: int = 1) -> list[float]:
    """NeMo's per-layer drop probabilities (and its error messages)."""
    if not 0 <= p < 1.0:
        raise ValueError("stochastic_depth_drop_prob has to be in [0, 1).")
    if not 1 <= start_layer <= num_layers:
        raise ValueError("stochastic_depth_start_layer has to be in [1, num layers].")
    probs = [0.0] * start_layer
    n = num_layers - start_layer
    if n > 0:
        if mode == "linear":
            probs += [i / n * p for i in range(1, n + 1)]
        elif mode == "uniform":
            probs += [p] * n
        else:
            raise ValueError(f'stochastic_depth_mode has to be one of ["linear", "uniform"]. Current value: {mode}')
    return probs


def _check(cfg: ConformerEncoderConfig) -> None:
    choices = {"self_attention_model": ("rel_pos", "abs_pos"), "att_context_style": ("regular",),
               "attention_impl": IMPLS, "conv_impl": IMPLS}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"model.encoder.{key}={getattr(cfg, key)!r}; allowed: {list(allowed)}")
    unsupported = {"causal_downsampling": False, "reduction": None, "global_tokens": 0, "att_context_probs": None}
    for key, default in unsupported.items():
        if getattr(cfg, key) != default:
            raise ValueError(f"model.encoder.{key}={getattr(cfg, key)!r} is not supported (only {default!r})")
    ctx = list(cfg.att_context_size)
    if len(ctx) != 2 or isinstance(ctx[0], list):
        raise ValueError(f"model.encoder.att_context_size={cfg.att_context_size!r}; expected [left, right]")
    if cfg.attention_impl == "triton" and cfg.self_attention_model != "rel_pos":
        raise ValueError(f"model.encoder.attention_impl='triton' supports self_attention_model='rel_pos' only "
                         f"(got {cfg.self_attention_model!r}); allowed: attention_impl torch or auto")
    if cfg.conv_impl == "triton" and cfg.conv_norm_type != "batch_norm":
        raise ValueError(f"model.encoder.conv_impl='triton' supports conv_norm_type='batch_norm' only "
                         f"(got {cfg.conv_norm_type!r}); allowed: conv_impl torch or auto")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"model.encoder.d_model={cfg.d_model} must be divisible by n_heads={cfg.n_heads}")


class ConformerEncoder(nn.Module):
    config_class = ConformerEncoderConfig

    def __init__(self, cfg: ConformerEncoderConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        d = cfg.d_model
        channels = d if cfg.subsampling_conv_channels == -1 else cfg.subsampling_conv_channels
        self.pre_encode = ConvSubsampling(cfg.subsampling, cfg.subsampling_factor, cfg.feat_in, d, channels)
        xscale = math.sqrt(d) if cfg.xscaling else None
        pos_cls = RelPositionalEncoding if cfg.self_attention_model == "rel_pos" else PositionalEncoding
        self.pos_enc = pos_cls(d, cfg.dropout_pre_encoder, cfg.pos_emb_max_len, xscale, cfg.dropout_emb)
        shared_u = shared_v = None
        if not cfg.untie_biases and cfg.self_attention_model == "rel_pos":  # one zero-init pair for all layers
            self.pos_bias_u = shared_u = nn.Parameter(torch.zeros(cfg.n_heads, d // cfg.n_heads))
            self.pos_bias_v = shared_v = nn.Parameter(torch.zeros(cfg.n_heads, d // cfg.n_heads))
        self.layers = nn.ModuleList(
            ConformerLayer(d, d * cfg.ff_expansion_factor, cfg.self_attention_model, cfg.n_heads,
                           cfg.conv_kernel_size, cfg.conv_norm_type, cfg.conv_context_size, cfg.dropout,
                           cfg.dropout_att, cfg.use_bias, shared_u, shared_v)
            for _ in range(cfg.n_layers))
        self.out_proj = nn.Linear(d, cfg.feat_out) if cfg.feat_out > 0 else None
        self.layer_drop_probs = compute_stochastic_depth_drop_probs(
            cfg.n_layers, cfg.stochastic_depth_drop_prob, cfg.stochastic_depth_mode, cfg.stochastic_depth_start_layer)
        self.kernel_impls: dict[str, tuple[str, str]] = {}  # kind -> (impl, why); see _select_kernels
        self._select_kernels()
        self.checkpoint_every = 0  # 0: none; k: layers 0, k, 2k, ... recompute their activations in backward

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / to_empty() all come through here: the device is known now, so choose the kernels again.
        out = super()._apply(fn, *args, **kwargs)
        self._select_kernels()
        return out

    def _select_kernels(self) -> None:
        """Resolve attention_impl / conv_impl for the parameters' device (never in forward) and set every layer."""
        device = next(self.parameters()).device
        cfg = self.cfg
        impls = {"attention": resolve("attention", cfg.attention_impl, device, None if cfg.self_attention_model ==
                                      "rel_pos" else f"self_attention_model={cfg.self_attention_model!r}"),
                 "conv": resolve("conv", cfg.conv_impl, device, None if cfg.conv_norm_type == "batch_norm" else
                                 f"conv_norm_type={cfg.conv_norm_type!r} (the kernel implements batch_norm)")}
        for layer in self.layers:
            if cfg.self_attention_model == "rel_pos":
                layer.self_attn.attention_impl = impls["attention"][0]
            layer.conv.conv_impl = impls["conv"][0]
        if impls != self.kernel_impls:
            log.info("encoder kernels on %s: %s", device.type,
                     ", ".join(f"{k}={impl} ({why})" for k, (impl, why) in impls.items()))
        self.kernel_impls = impls

    def kernel_calls(self) -> dict[str, int]:
        """How many times each Triton kernel ran in this encoder (0 for a kind on the torch path)."""
        calls = {"attention": 0, "conv": 0}
        for layer in self.layers:
            for kind, mod in (("attention", layer.self_attn), ("conv", layer.conv)):
                kernel = getattr(mod, "_kernel", None)
                calls[kind] += kernel.calls if kernel is not None else 0
        return calls

    def set_activation_checkpointing(self, mode: str) -> None:
        """`trainer.activation_checkpointing`: none | full | every_<k> (conformer/checkpointing.py)."""
        self.checkpoint_every = parse_mode(mode)

    def _check_input(self, audio_signal: torch.Tensor, length: torch.Tensor) -> None:
        if audio_signal.dim() != 3 or audio_signal.size(1) != self.cfg.feat_in:
            raise ValueError(f"audio_signal must be (B, feat_in={self.cfg.feat_in}, T); "
                             f"got {tuple(audio_signal.shape)}")
        if length.shape != (audio_signal.size(0),):
            raise ValueError(f"length must be ({audio_signal.size(0)},); got {tuple(length.shape)}")
        if audio_signal.size(2) < self.cfg.subsampling_factor:
            raise ValueError(f"audio_signal has T={audio_signal.size(2)} frames; subsampling_factor="
                             f"{self.cfg.subsampling_factor} needs at least that many")
        check_lengths(length, audio_signal.size(2), detail=" (T, the frames of audio_signal)")

    def compile_layers(self, backend: str = "inductor") -> None:
        """torch.compile every ConformerLayer in place (`trainer.compile`; state_dict keys unchanged). It fuses the
        elementwise work between the matmuls: LayerNorms, SiLU + dropout, residual scale-and-add, and on the torch
        path the attention scores and GLU/BN. The Triton kernels are compiler-disabled and run as they are.
        dynamic=True: utterance lengths change every batch, one graph serves them all."""
        for layer in self.layers:
            layer.compile(backend=backend, dynamic=True)

    def att_masks(self, length: torch.Tensor, t: int):
        """-> pad_mask (B, T'), att_mask (B, T', T'), both True = masked; limited context as NeMo's 'regular'."""
        valid = torch.arange(t, device=length.device)[None, :] < length[:, None]
        att = valid[:, :, None] & valid[:, None, :]
        left, right = self.cfg.att_context_size
        if left >= 0 or right >= 0:
            rel = torch.arange(t, device=length.device)[None, :] - torch.arange(t, device=length.device)[:, None]
            band = torch.ones_like(rel, dtype=torch.bool)
            if left >= 0:
                band &= rel >= -left
            if right >= 0:
                band &= rel <= right
            att = att & band
        return ~valid, ~att

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor):
        self._check_input(audio_signal, length)
        self.pos_enc.extend_pe(max(self.cfg.pos_emb_max_len, audio_signal.size(2)))  # pre-subsampling count, as NeMo
        x, length = self.pre_encode(audio_signal.transpose(1, 2), length.long())  # (B, T', d)
        x, pos_emb = self.pos_enc(x)
        pad_mask, att_mask = self.att_masks(length, x.size(1))
        for i, (layer, p_drop) in enumerate(zip(self.layers, self.layer_drop_probs)):
            args = (x, att_mask, pos_emb, pad_mask, length, tuple(self.cfg.att_context_size))
            k = self.checkpoint_every
            recompute = k > 0 and i % k == 0 and self.training and torch.is_grad_enabled()
            out = checkpointed_call(layer, *args) if recompute else layer(*args)
            if self.training and p_drop > 0:  # stochastic depth, NeMo's formula
                out = 0 * out + x if torch.rand(1) < p_drop else (out - x) / (1 - p_drop) + x
            x = out
        if self.out_proj is not None:
            x = self.out_proj(x)
        return x.transpose(1, 2), length  # (B, d, T')

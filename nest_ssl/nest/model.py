"""NEST models: `EncDecMaskedTokenPredModel` and `EncDecDenoiseMaskedTokenPredModel`.

    clean audio -> preprocessor -> quantizer -> tokens (targets, fp32/fp64, outside autocast)
    noisy audio -> preprocessor -> mask -> encoder -> decoder -> log_probs
    loss = MultiMLMLoss(masks, log_probs, tokens)

Built from the `model` section of a NeMo YAML. Attributes are registered in NeMo's order (preprocessor, encoder,
quantizer, mask_processor, decoder, loss), so the state_dict keys and their order equal NeMo's. Unlike NeMo there is
no throw-away encoder/decoder; `burn_rng=True` builds and drops them anyway so a `torch.manual_seed(s)` init equals
NeMo's bit for bit. `spec_augment` is accepted and unused (NeMo's NEST forward never applies it).

`mask_position: post_conv` implements NeMo's evident intent (NeMo 2.6.2's own path crashes on a shape mismatch):
tokens come from the pre-encoded clean frames with `combine_time_steps = 1`, masks are drawn on and applied to the
pre-encoded noisy frames (through a forward hook on `encoder.pre_encode`), and pre_encode keeps its gradient. The
module layout is NeMo's: `encoder.pre_encode` is a `ConvFeatureMaskingWrapper(pre_encode, masking)` also registered
as `pre_encoder`, so the state_dict holds `encoder.pre_encode.pre_encode.*`, `encoder.pre_encode.masking.mask_embedding`
and the aliases `mask_processor.mask_embedding`, `pre_encoder.pre_encode.*`, `pre_encoder.masking.mask_embedding`
(the same tensors), in NeMo's order, and a NeMo post_conv state_dict loads with strict=True.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from nest_ssl.nemo_compat import instantiate
from nest_ssl.nest.masked_logits import DEFAULT_CHUNK, mlm_loss_from_encoded, saves_memory

MASK_POSITIONS = ("pre_conv", "post_conv")


def build_section(model_cfg: dict, key: str) -> nn.Module:
    """One `model.<key>` section -> module, through nemo_compat's `_target_` table."""
    section = model_cfg.get(key)
    if not isinstance(section, dict):
        raise ValueError(f"model.{key} must be a mapping with _target_; got {section!r}")
    return instantiate(section, f"model.{key}")


def resolve_model_config(model_cfg: dict) -> dict:
    """A copy with post_conv's derived settings (idempotent: they are derived from the encoder, not divided twice)."""
    cfg = copy.deepcopy(model_cfg)
    pos = cfg.get("mask_position", "pre_conv")
    if pos not in MASK_POSITIONS:
        raise ValueError(f"model.mask_position={pos!r}; allowed: {list(MASK_POSITIONS)}")
    if pos == "post_conv":
        d_model, factor = cfg["encoder"]["d_model"], cfg["encoder"].get("subsampling_factor", 4)
        cfg["quantizer"].update(feat_in=d_model, combine_time_steps=1)
        cfg["masking"]["feat_in"] = d_model
        cfg["masking"]["block_size"] = max(1, cfg["masking"]["block_size"] // factor)
        cfg["loss"]["combine_time_steps"] = 1
    return cfg


class ConvFeatureMaskingWrapper(nn.Module):
    """NeMo's `ConvFeatureMaksingWrapper` layout for post_conv: the encoder's subsampling and the model's masking
    module as children (shared, not copied). Forward is the subsampling alone; the model masks its output through a
    forward hook, only in its own forward."""

    def __init__(self, pre_encode: nn.Module, masking: nn.Module):
        super().__init__()
        self.pre_encode, self.masking = pre_encode, masking

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pre_encode(x, lengths)  # (B, T, F) -> (B, T', d_model), lengths


class EncDecMaskedTokenPredModel(nn.Module):
    """BEST-RQ style masked token prediction on one input (the clean audio is quantized, masked and encoded)."""

    def __init__(self, model_cfg: dict, burn_rng: bool = False, device: str | torch.device | None = None):
        """device="meta" builds every learnable part without memory (summaries); the preprocessor, which has only
        small numpy-built buffers, is always built on the host."""
        super().__init__()
        cfg = resolve_model_config(model_cfg)
        self.mask_position = cfg.get("mask_position", "pre_conv")
        preprocessor = build_section(cfg, "preprocessor")
        with torch.device(device) if device is not None else contextlib.nullcontext():
            if burn_rng:  # NeMo's parent constructor builds (and later drops) an encoder and a decoder first
                build_section(cfg, "encoder"), build_section(cfg, "decoder")
            quantizer, mask_processor = build_section(cfg, "quantizer"), build_section(cfg, "masking")
            encoder, decoder = build_section(cfg, "encoder"), build_section(cfg, "decoder")
            loss = build_section(cfg, "loss")
        self.preprocessor, self.encoder, self.quantizer = preprocessor, encoder, quantizer  # NeMo's key order
        self.mask_processor, self.decoder, self.loss = mask_processor, decoder, loss
        if self.mask_position == "post_conv":  # registered last and swapped into the encoder's slot, as in NeMo
            self.pre_encoder = ConvFeatureMaskingWrapper(encoder.pre_encode, mask_processor)
            encoder.pre_encode = self.pre_encoder
        books, heads = quantizer.cfg.num_books, decoder.cfg.num_decoders
        if books != heads or loss.cfg.num_decoders != heads:
            raise ValueError(f"quantizer num_books={books}, decoder num_decoders={heads} and loss num_decoders="
                             f"{loss.cfg.num_decoders} must be equal")
        # training/validation steps take the loss from encoder frames in chunks (masked_logits.py) when B*T' is
        # more than one chunk: same loss, no full (B, T', C, H) log-probs. 0 = always decoder.forward, as NeMo.
        self.loss_logits_chunk = DEFAULT_CHUNK

    def _loss_only(self) -> bool:
        """The chunked head may serve when nothing hooks the loss module to read the full log-probs (the health
        metrics do not: they observe the chunks, MultiMLMLoss.observers)."""
        return self.loss_logits_chunk > 0 and not self.loss._forward_hooks and not self.loss._forward_pre_hooks

    @classmethod
    def from_config(cls, model_cfg: dict, burn_rng: bool = False, device: str | torch.device | None = None):
        return cls(model_cfg, burn_rng=burn_rng, device=device)

    # ---- pieces ---------------------------------------------------------------------------------------
    def _features(self, signal, length, processed, processed_length, name, generator):
        if (signal is None) == (processed is None):
            raise ValueError(f"give exactly one of {name}_signal and processed_{name}_signal")
        if processed is not None:
            return processed, processed_length
        with torch.autocast(device_type=signal.device.type, enabled=False):  # features in fp32
            return self.preprocessor(signal, length, generator=generator)

    def _tokens(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # targets: no graph, fp32 projection + fp64 distances inside the quantizer
            if self.mask_position == "post_conv":
                x, _ = self.encoder.pre_encode(feats.transpose(1, 2), lengths)  # (B, T', d_model)
                feats = x.transpose(1, 2)  # (B, d_model, T')
            _, tokens = self.quantizer(feats.float())
        return tokens

    def _mask(self, feats, lengths, apply_mask, masks, generator):
        if masks is not None:
            return self.mask_processor.apply_masks(feats, masks.to(feats.dtype)), masks.to(feats.dtype)
        if apply_mask:
            return self.mask_processor(feats, lengths, generator=generator)
        return feats, torch.zeros_like(feats)

    def _encode(self, feats, lengths, apply_mask, masks, generator):
        """(encoded (B, D, T'), encoded_len, masks): masks on the features (pre_conv) or pre-encoded frames."""
        if self.mask_position == "pre_conv":
            masked, masks = self._mask(feats, lengths, apply_mask, masks, generator)
            encoded, encoded_len = self.encoder(masked, lengths)
            return encoded, encoded_len, masks
        out = {}

        def hook(module, args, output):
            x, x_len = output  # (B, T', d_model)
            masked, out["masks"] = self._mask(x.transpose(1, 2), x_len, apply_mask, masks, generator)
            return masked.transpose(1, 2), x_len

        handle = self.encoder.pre_encode.register_forward_hook(hook)
        try:
            encoded, encoded_len = self.encoder(feats, lengths)
        finally:
            handle.remove()
        return encoded, encoded_len, out["masks"]

    def _check_masks(self, masks, feats):
        if masks is None or self.mask_position == "post_conv":
            return
        if masks.shape != feats.shape:
            raise ValueError(f"masks shape {tuple(masks.shape)} != masked input shape {tuple(feats.shape)}")

    # ---- forward / steps ------------------------------------------------------------------------------
    def forward(self, input_signal=None, input_signal_length=None, processed_signal=None,
                processed_signal_length=None, apply_mask=False, masks=None, generator=None, decode=True):
        """decode=False returns the encoder output (B, D, T') in place of the log-probs."""
        feats, lens = self._features(input_signal, input_signal_length, processed_signal, processed_signal_length,
                                     "input", generator)
        tokens = self._tokens(feats, lens)
        self._check_masks(masks, feats)
        encoded, encoded_len, masks = self._encode(feats, lens, apply_mask, masks, generator)
        return (self.decoder(encoded) if decode else encoded), encoded_len, masks, tokens

    def compute_loss(self, log_probs, encoded_len, masks, tokens, from_encoded=False) -> tuple[torch.Tensor, dict]:
        """from_encoded: `log_probs` is the encoder output; the head runs chunk-wise inside the loss where that
        saves memory (more frames than one chunk), else decoder.forward as NeMo."""
        if from_encoded and saves_memory(log_probs, self.loss_logits_chunk):
            loss = mlm_loss_from_encoded(self.decoder, self.loss, masks, log_probs, tokens, self.loss_logits_chunk,
                                         encoded_len)
        elif from_encoded:
            loss = self.loss(masks, self.decoder(log_probs), tokens, encoded_len)
        else:
            loss = self.loss(masks, log_probs, tokens, encoded_len)
        n = self.loss.last_num_selected
        return loss, {"masked_tokens": n, "no_token": (n == 0).long()}  # device tensors: no host sync

    def _step_inputs(self, batch) -> dict:
        return {"input_signal": batch.audio, "input_signal_length": batch.audio_len}

    def training_step(self, batch, generator: torch.Generator | None = None, global_step: int | None = None) -> dict:
        """`global_step` is accepted for the shared train loop; NEST has no step-dependent behaviour."""
        chunked = self._loss_only()
        out = self(**self._step_inputs(batch), apply_mask=True, generator=generator, decode=not chunked)
        loss, stats = self.compute_loss(*out, from_encoded=chunked)
        return {"loss": loss, **stats}

    def validation_step(self, batch, generator: torch.Generator | None = None) -> dict:
        with torch.no_grad():
            chunked = self._loss_only()
            out = self(**self._step_inputs(batch), apply_mask=True, generator=generator, decode=not chunked)
            loss, stats = self.compute_loss(*out, from_encoded=chunked)
        return {"loss": loss, "val_loss": loss, **stats}


class EncDecDenoiseMaskedTokenPredModel(EncDecMaskedTokenPredModel):
    """NEST: tokens from the CLEAN features; masking, encoder and decoder see the NOISY ones."""

    def forward(self, input_signal=None, input_signal_length=None, processed_signal=None,
                processed_signal_length=None, noise_signal=None, noise_signal_length=None,
                processed_noise_signal=None, processed_noise_signal_length=None, noisy_input_signal=None,
                noisy_input_signal_length=None, processed_noisy_input_signal=None,
                processed_noisy_input_signal_length=None, apply_mask=False, masks=None, generator=None,
                decode=True):
        # noise_signal / processed_noise_signal: accepted and unused, as in NeMo 2.6.2
        for a, b, name in ((input_signal, noisy_input_signal, "signal"),
                           (processed_signal, processed_noisy_input_signal, "processed signal")):
            if a is not None and b is not None and a.shape != b.shape:
                raise ValueError(f"clean {name} shape {tuple(a.shape)} != noisy {name} shape {tuple(b.shape)}")
        feats, lens = self._features(input_signal, input_signal_length, processed_signal, processed_signal_length,
                                     "input", generator)
        noisy, noisy_lens = self._features(noisy_input_signal, noisy_input_signal_length,
                                           processed_noisy_input_signal, processed_noisy_input_signal_length,
                                           "noisy_input", generator)
        tokens = self._tokens(feats, lens)
        self._check_masks(masks, noisy)
        encoded, encoded_len, masks = self._encode(noisy, noisy_lens, apply_mask, masks, generator)
        return (self.decoder(encoded) if decode else encoded), encoded_len, masks, tokens

    def _step_inputs(self, batch) -> dict:
        return {"input_signal": batch.audio, "input_signal_length": batch.audio_len,
                "noise_signal": batch.noise, "noise_signal_length": batch.noise_len,
                "noisy_input_signal": batch.noisy_audio, "noisy_input_signal_length": batch.noisy_audio_len}

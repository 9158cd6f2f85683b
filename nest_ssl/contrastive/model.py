"""`SpeechEncDecSelfSupervisedModel`: NeMo's contrastive SSL with loss_list heads.

Flow: preprocessor -> (unmasked copy = contrastive targets) -> MaskedPatchAugmentation -> spec_masks recovered from
the zeroed values as NeMo does (|x| < 1e-5, frames >= length cleared) -> encoder -> for each active `loss_list` entry
in YAML order: decoder, loss; total = sum(loss_alpha * loss). An MLM entry with `targets_from_loss` reads the
contrastive loss's `target_ids` (the quantizer's noise-free argmax ids).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from ..nemo_compat import instantiate


@dataclass
class LossEntry:
    """Per-entry settings of `model.loss_list.<name>` besides its decoder and loss sections."""
    loss_alpha: float = 1.0
    output_from_layer: str | None = None
    targets_from_loss: str | None = None
    start_step: int = 0
    transpose_encoded: bool = False
    is_active: bool = True


_ENTRY_KEYS = {"decoder", "loss"} | set(LossEntry.__dataclass_fields__)


class SpeechEncDecSelfSupervisedModel(nn.Module):
    def __init__(self, preprocessor, encoder, decoder_losses: dict, entries: dict, spec_augmentation):
        super().__init__()
        self.preprocessor = preprocessor
        self.encoder = encoder
        self.decoder_losses = nn.ModuleDict(decoder_losses)
        self.entries = entries  # name -> LossEntry, in YAML order
        self.spec_augmentation = spec_augmentation

    @classmethod
    def from_config(cls, model_cfg: dict) -> SpeechEncDecSelfSupervisedModel:
        if "loss_list" not in model_cfg:
            raise ValueError("model.loss_list is required (NeMo's legacy decoder/loss form is not supported)")
        for key in ("dropout_features", "dropout_features_q", "feature_penalty"):
            if model_cfg.get(key) is not None:
                raise ValueError(f"model.{key} is not supported; remove it")
        pre = instantiate(model_cfg["preprocessor"], "model.preprocessor")
        enc = instantiate(model_cfg["encoder"], "model.encoder")
        heads, entries = {}, {}
        for name, entry in model_cfg["loss_list"].items():
            path = f"model.loss_list.{name}"
            unknown = set(entry) - _ENTRY_KEYS
            if unknown:
                raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(_ENTRY_KEYS)}")
            settings = LossEntry(**{k: v for k, v in entry.items() if k not in ("decoder", "loss")})
            if not settings.is_active:
                continue
            dec = instantiate(entry["decoder"], f"{path}.decoder")  # decoder first, then loss: NeMo's init order
            heads[name] = nn.ModuleDict({"decoder": dec, "loss": instantiate(entry["loss"], f"{path}.loss")})
            entries[name] = settings
        names = list(entries)
        for i, (name, e) in enumerate(entries.items()):
            if e.targets_from_loss is not None and e.targets_from_loss not in names[:i]:
                raise ValueError(f"model.loss_list.{name}.targets_from_loss={e.targets_from_loss!r} must name an "
                                 f"active loss listed before it; active: {names}")
        aug = instantiate(model_cfg["spec_augment"], "model.spec_augment")
        return cls(pre, enc, heads, entries, aug)

    def forward(self, input_signal=None, input_signal_length=None, processed_signal=None,
                processed_signal_length=None, *, rng: random.Random | None = None,
                generator: torch.Generator | None = None, time_mask=None, freq_mask=None):
        """-> (spectrograms (B,D,T) unmasked targets, spec_masks (B,D,T), encoded (B,d,T'), encoded_len (B,))."""
        if (input_signal is None) == (processed_signal is None):
            raise ValueError("give exactly one of input_signal / processed_signal (with its length)")
        if input_signal is not None:
            feats, lens = self.preprocessor(input_signal, input_signal_length)
        else:
            feats, lens = processed_signal, processed_signal_length
        spectrograms = feats.detach().clone()
        feats = self.spec_augmentation(feats, lens, rng=rng, generator=generator, time_mask=time_mask,
                                       freq_mask=freq_mask)
        spec_masks = ((feats > -1e-5) & (feats < 1e-5)).float()  # NeMo recovers the mask from the values
        t = torch.arange(feats.shape[-1], device=feats.device)
        spec_masks = spec_masks * (t[None, :] < lens[:, None])[:, None, :]
        encoded, encoded_len = self.encoder(feats, lens)
        return spectrograms, spec_masks, encoded, encoded_len

    def decoder_loss_step(self, spectrograms, spec_masks, encoded, encoded_len, global_step: int | None = None,
                          inject: dict | None = None):
        """-> (total loss (1,), {name: unweighted loss}). `inject[name]` = kwargs for that loss (parity draws)."""
        inject = inject or {}
        total = torch.zeros(1, device=encoded.device)
        values, layer_outputs = {}, self._layer_outputs
        for name, e in self.entries.items():
            if global_step is not None and global_step < e.start_step:
                continue
            head = self.decoder_losses[name]
            x = encoded if e.output_from_layer is None else layer_outputs[e.output_from_layer]
            if e.transpose_encoded:
                x = x.transpose(-2, -1)
            out = head["decoder"](encoder_output=x)
            if getattr(head["loss"], "needs_labels", True) is False:
                value = head["loss"](spectrograms, spec_masks, out, encoded_len, **inject.get(name, {}))
            else:
                src = self.decoder_losses[e.targets_from_loss]["loss"] if e.targets_from_loss else None
                if src is None or src.target_ids is None:
                    raise ValueError(f"model.loss_list.{name}: needs targets_from_loss pointing at a loss that "
                                     "stores target_ids (a quantized ContrastiveLoss with store_ids)")
                value = head["loss"](spec_masks, out, src.target_ids, encoded_len)
            values[name] = value
            total = total + value * e.loss_alpha
        return total, values

    @property
    def _layer_outputs(self) -> dict:
        return getattr(self, "_captured", {})

    def _capture_hooks(self):
        """Forward hooks saving the (B, T', d) outputs of encoder sub-modules named by `output_from_layer`."""
        self._captured = {}
        hooks = []
        for e in self.entries.values():
            if e.output_from_layer is not None:
                mod = self.encoder.get_submodule(e.output_from_layer)
                name = e.output_from_layer
                hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: self._captured.__setitem__(n, o)))
        return hooks

    def set_num_updates(self, global_step: int) -> None:
        for head in self.decoder_losses.values():
            if hasattr(head["loss"], "set_num_updates"):
                head["loss"].set_num_updates(global_step)

    def step(self, audio, audio_len, global_step: int | None = None, rng=None, generator=None):
        """One training (global_step given) or validation forward: -> (total loss scalar, {name: value}).

        Patch positions use Python's `random` like NeMo; with a torch `generator` and no `rng`, that Random is seeded
        from the generator, so one seed makes the whole step reproducible (NeMo's global RNG is unseeded)."""
        if global_step is not None and self.training:
            self.set_num_updates(global_step)
        if rng is None and generator is not None:
            seed = torch.randint(2**62, (1,), generator=generator, device=generator.device)
            rng = random.Random(int(seed))
        hooks = self._capture_hooks()
        try:
            spec, masks, enc, enc_len = self(input_signal=audio, input_signal_length=audio_len, rng=rng,
                                             generator=generator)
        finally:
            for h in hooks:
                h.remove()
        total, values = self.decoder_loss_step(spec, masks, enc, enc_len, global_step)
        return total.squeeze(0), values

    def training_step(self, batch, generator=None, global_step: int = 0, rng=None) -> dict:
        """Logs NeMo's `train_<name>` (unweighted); the quantizer temperature follows `global_step`."""
        loss, values = self.step(batch.audio, batch.audio_len, global_step, rng, generator)
        return {"loss": loss, **{f"train_{k}": v.detach() for k, v in values.items()}}

    def validation_step(self, batch, generator=None, rng=None) -> dict:
        loss, values = self.step(batch.audio, batch.audio_len, None, rng, generator)
        return {"loss": loss.detach(), "val_loss": loss.detach(), **{f"val_{k}": v.detach() for k, v in values.items()}}

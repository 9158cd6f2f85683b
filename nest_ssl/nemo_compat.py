"""The one `_target_` allow-list: NeMo class paths (short and full module paths) and our own paths -> our classes.

Only modules named in this table are ever imported; a config string is a key into it, never a module name.
`instantiate(section, path)` builds the module, `target_config(section, path)` only validates its config.
`NEMO_TARGET` maps our classes back to NeMo's canonical path (for writing .nemo configs NeMo can load).
"""
from __future__ import annotations

import importlib
from typing import Any

from nest_ssl.config import ConfigError, from_dict

_ASR = "nemo.collections.asr"
_SSL = f"{_ASR}.modules.ssl_modules"

# ours (module, class) -> NeMo paths; the first NeMo path is the canonical one written to saved configs.
_CLASSES: dict[tuple[str, str], list[str]] = {
    ("nest_ssl.preprocessor", "AudioToMelSpectrogramPreprocessor"): [
        f"{_ASR}.modules.AudioToMelSpectrogramPreprocessor",
        f"{_ASR}.modules.audio_preprocessing.AudioToMelSpectrogramPreprocessor"],
    ("nest_ssl.spec_augment", "SpectrogramAugmentation"): [
        f"{_ASR}.modules.SpectrogramAugmentation", f"{_ASR}.modules.audio_preprocessing.SpectrogramAugmentation"],
    ("nest_ssl.conformer.encoder", "ConformerEncoder"): [
        f"{_ASR}.modules.ConformerEncoder", f"{_ASR}.modules.conformer_encoder.ConformerEncoder"],
    ("nest_ssl.nest.masking", "RandomBlockMasking"): [
        f"{_ASR}.modules.RandomBlockMasking", f"{_SSL}.RandomBlockMasking", f"{_SSL}.masking.RandomBlockMasking"],
    ("nest_ssl.nest.quantizer", "RandomProjectionVectorQuantizer"): [
        f"{_ASR}.modules.RandomProjectionVectorQuantizer", f"{_SSL}.RandomProjectionVectorQuantizer",
        f"{_SSL}.quantizers.RandomProjectionVectorQuantizer"],
    ("nest_ssl.nest.decoder", "MultiSoftmaxDecoder"): [
        f"{_ASR}.modules.MultiSoftmaxDecoder", f"{_SSL}.MultiSoftmaxDecoder",
        f"{_SSL}.multi_softmax_decoder.MultiSoftmaxDecoder"],
    ("nest_ssl.nest.losses", "MultiMLMLoss"): [
        f"{_ASR}.losses.MultiMLMLoss", f"{_ASR}.losses.ssl_losses.MultiMLMLoss",
        f"{_ASR}.losses.ssl_losses.mlm.MultiMLMLoss"],
    ("nest_ssl.nest.losses", "MLMLoss"): [
        f"{_ASR}.losses.MLMLoss", f"{_ASR}.losses.ssl_losses.MLMLoss", f"{_ASR}.losses.ssl_losses.mlm.MLMLoss"],
    ("nest_ssl.data.augmentation", "MultiSpeakerNoiseAugmentation"): [
        f"{_SSL}.MultiSpeakerNoiseAugmentation", f"{_SSL}.augmentation.MultiSpeakerNoiseAugmentation"],
    ("nest_ssl.contrastive.patch_masking", "MaskedPatchAugmentation"): [
        f"{_ASR}.modules.MaskedPatchAugmentation", f"{_ASR}.modules.audio_preprocessing.MaskedPatchAugmentation"],
    ("nest_ssl.contrastive.decoders", "ConvASRDecoderReconstruction"): [
        f"{_ASR}.modules.ConvASRDecoderReconstruction", f"{_ASR}.modules.conv_asr.ConvASRDecoderReconstruction"],
    ("nest_ssl.contrastive.decoders", "ConvASRDecoder"): [
        f"{_ASR}.modules.ConvASRDecoder", f"{_ASR}.modules.conv_asr.ConvASRDecoder"],
    ("nest_ssl.contrastive.loss", "ContrastiveLoss"): [
        f"{_ASR}.losses.ContrastiveLoss", f"{_ASR}.losses.ssl_losses.ContrastiveLoss",
        f"{_ASR}.losses.ssl_losses.contrastive.ContrastiveLoss"],
    ("nest_ssl.nest.model", "EncDecDenoiseMaskedTokenPredModel"): [
        f"{_ASR}.models.ssl_models.EncDecDenoiseMaskedTokenPredModel",
        f"{_ASR}.models.EncDecDenoiseMaskedTokenPredModel"],
    ("nest_ssl.nest.model", "EncDecMaskedTokenPredModel"): [
        f"{_ASR}.models.ssl_models.EncDecMaskedTokenPredModel", f"{_ASR}.models.EncDecMaskedTokenPredModel"],
    ("nest_ssl.contrastive.model", "SpeechEncDecSelfSupervisedModel"): [
        f"{_ASR}.models.ssl_models.SpeechEncDecSelfSupervisedModel", f"{_ASR}.models.SpeechEncDecSelfSupervisedModel"],
}

# Our modules' earlier paths: configs written with our own `_target_` strings before the NEST heads moved into
# nest_ssl/nest/ and the augmentation into nest_ssl/data/ keep loading.
_MOVED = {"nest_ssl.models": "nest_ssl.nest.model", "nest_ssl.quantizer": "nest_ssl.nest.quantizer",
          "nest_ssl.masking": "nest_ssl.nest.masking", "nest_ssl.decoder": "nest_ssl.nest.decoder",
          "nest_ssl.losses": "nest_ssl.nest.losses", "nest_ssl.augmentation": "nest_ssl.data.augmentation"}

# `_target_` string -> (our module, our class): every NeMo path plus our own "nest_ssl.module.Class" paths.
TARGETS: dict[str, tuple[str, str]] = {
    **{nemo: ours for ours, paths in _CLASSES.items() for nemo in paths},
    **{f"{mod}.{cls}": (mod, cls) for mod, cls in _CLASSES},
    **{f"{old}.{cls}": (mod, cls) for old, new in _MOVED.items() for mod, cls in _CLASSES if mod == new},
}
# (our module, our class) -> NeMo's canonical `_target_`.
NEMO_TARGET: dict[tuple[str, str], str] = {ours: paths[0] for ours, paths in _CLASSES.items()}


def target_class(section: dict, path: str) -> type:
    """Our class for `section["_target_"]`, imported from the table's module (never from the config string)."""
    if not isinstance(section, dict) or "_target_" not in section:
        raise ConfigError(f"{path}: expected a mapping with a _target_ key, got {section!r}")
    target = section["_target_"]
    if target not in TARGETS:
        raise ConfigError(f"{path}._target_={target!r} is not a known target; known: {sorted(TARGETS)}")
    module, name = TARGETS[target]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{path}._target_={target!r} maps to {module}.{name}, which is not available: {e}") from e


def target_config(section: dict, path: str) -> Any:
    """The validated config dataclass of a targeted section (None for classes built from a whole section)."""
    cls = target_class(section, path)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        return None
    return from_dict(config_class, {k: v for k, v in section.items() if k != "_target_"}, path)


def validate_targets(node: Any, path: str = "") -> None:
    """Check every `_target_` section in a plain config tree (known target, valid keys) without building it."""
    if isinstance(node, dict):
        if "_target_" in node:
            target_config(node, path)
        for key, value in node.items():
            validate_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            validate_targets(value, f"{path}.{i}")


def instantiate(section: dict, path: str) -> Any:
    """Build our module for a targeted section: `Cls(Cls.config_class(...))`, or `Cls.from_config(section)`."""
    cls = target_class(section, path)
    cfg = target_config(section, path)
    if cfg is not None:
        return cls(cfg)
    if hasattr(cls, "from_config"):
        return cls.from_config({k: v for k, v in section.items() if k != "_target_"})
    raise ConfigError(f"{path}: {cls.__name__} has neither config_class nor from_config")


def nemo_target(obj_or_cls: Any) -> str:
    """NeMo's canonical `_target_` for one of our classes (or instances)."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    for (module, name), target in NEMO_TARGET.items():
        if cls.__name__ == name and cls.__module__ == module:
            return target
    raise ConfigError(f"{cls.__module__}.{cls.__name__} has no NeMo target; known: {sorted(NEMO_TARGET)}")


DEFAULT_MODEL = ("nest_ssl.nest.model", "EncDecDenoiseMaskedTokenPredModel")


def model_class(model_section: dict, path: str = "model") -> type:
    """The model class named by `model.target` (NeMo writes it into saved configs); NEST's denoising model if absent.

    A section with `loss_list` and no `target` is NeMo's contrastive recipe (SpeechEncDecSelfSupervisedModel).
    """
    target = model_section.get("target")
    if target is None:
        if "loss_list" in model_section:
            return target_class({"_target_": "nest_ssl.contrastive.model.SpeechEncDecSelfSupervisedModel"}, path)
        return target_class({"_target_": ".".join(DEFAULT_MODEL)}, path)
    return target_class({"_target_": target}, f"{path}.target")


def build_model(model_cfg: dict, **kwargs):
    """Our model for a NeMo `model` section; the trainer-only `optim` section is left out. kwargs go to from_config."""
    return model_class(model_cfg).from_config({k: v for k, v in model_cfg.items() if k != "optim"}, **kwargs)

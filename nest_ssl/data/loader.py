"""The loader's front door: `build_dataloader` picks the source module for a dataset config (plain manifests,
tarred shards or Lhotse) and calls its `build`; `build_loader` (the trainer's entry point) adds the batch augmentor
built from its `_target_` and the on-device mixing step.

Each source (data/manifest_source.py, data/tarred_source.py, data/lhotse_source.py) reads its own files, plans
this rank's share and its batches, and returns a `DataLoaderWrapper` (data/wrapper.py): __iter__ (AudioNoiseBatch),
__len__ (batches per epoch on this rank: equal on every rank for training; for validation each rank's own count,
every item once over the ranks), set_epoch, state_dict/load_state_dict (resume with the next unseen batch) and
`bad_samples`, the (path, reason) list of skipped items, limited by `max_bad_samples`. Nothing here reaches into a
source, and no source imports this module.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from types import ModuleType

from nest_ssl.data import manifest_source, tarred_source
from nest_ssl.data.augmentation import TorchMultiSpeakerNoiseAugmentation
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.source import SourceContext
from nest_ssl.data.wrapper import DataLoaderWrapper, TooManyBadSamples  # noqa: F401
from nest_ssl.nemo_compat import instantiate, target_config


def source_module(c: DatasetConfig) -> ModuleType:
    """The module whose `build(c, ctx)` makes the loader for `c`."""
    if c.use_lhotse:  # lhotse is an optional extra: imported only when a config asks for it
        return importlib.import_module("nest_ssl.data.lhotse_source")
    return tarred_source if c.is_tarred else manifest_source


def build_dataloader(ds_cfg: DatasetConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0, augmentor=None,
                     is_train: bool = True) -> DataLoaderWrapper:
    where = "model.train_ds" if is_train else "model.validation_ds"
    c = ds_cfg.validate(where)
    return source_module(c).build(c, SourceContext(where, rank, world_size, seed, is_train, augmentor))


def build_loader(ds_cfg: DatasetConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0, is_train: bool = True):
    """-> (loader, device_mix): with `augment_on_device` the collate hands over clean audio + noise and
    `device_mix` mixes them on the accelerator (TorchMultiSpeakerNoiseAugmentation); otherwise device_mix is None."""
    aug = ds_cfg.batch_augmentor
    where = f"model.{'train_ds' if is_train else 'validation_ds'}.batch_augmentor"
    loader = build_dataloader(ds_cfg, rank=rank, world_size=world_size, seed=seed,
                              augmentor=instantiate(aug, where) if aug else None, is_train=is_train)
    if not ds_cfg.augment_on_device:
        return loader, None
    device_aug = TorchMultiSpeakerNoiseAugmentation(target_config(aug, where)) if aug else None
    return loader, functools.partial(mix_on_device, augmentor=device_aug)


def mix_on_device(batch, generator, augmentor=None):
    """The noise mixing the collate left to the accelerator: the batch augmentor, or plain audio + noise."""
    if augmentor is not None:
        return augmentor(batch, generator=generator)
    return dataclasses.replace(batch, noisy_audio=batch.audio + batch.noise, noisy_audio_len=batch.audio_len.clone())

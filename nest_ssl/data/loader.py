"""`build_loader` (the trainer's entry point: the batch augmentor built from its `_target_`, and the on-device
mixing step) over `build_dataloader`.

`build_dataloader` returns a `DataLoaderWrapper` with __iter__ (AudioNoiseBatch), __len__ (batches per epoch on this
rank: equal on every rank for training; for validation each rank's own count, every item once over the ranks),
set_epoch, state_dict/load_state_dict (resume with the next unseen batch) and `bad_samples`, the (path, reason) list
of skipped items, limited by `max_bad_samples`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

from nest_ssl.data.audio import measure_duration
from nest_ssl.data.augmentation import TorchMultiSpeakerNoiseAugmentation
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.dataset import AudioNoiseCollate, AudioNoiseDataset
from nest_ssl.data.manifest import ManifestReport, read_manifests, split_paths
from nest_ssl.data.sampler import BatchSampler
from nest_ssl.data.source import SourceContext
from nest_ssl.data.tarred import (
    TarredAudioNoiseDataset,
    expand_shards,
    items_per_shard,
    plan_tarred,
    plan_tarred_validation,
    shard_list,
    unmeasurable,
)
from nest_ssl.data.wrapper import DataLoaderWrapper, TooManyBadSamples, check_batches, with_report  # noqa: F401
from nest_ssl.nemo_compat import instantiate, target_config

log = logging.getLogger(__name__)


def build_dataloader(ds_cfg: DatasetConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0, augmentor=None,
                     is_train: bool = True) -> DataLoaderWrapper:
    where = "model.train_ds" if is_train else "model.validation_ds"
    c = ds_cfg.validate(where)
    if c.use_lhotse:
        from nest_ssl.data import lhotse_source

        return lhotse_source.build(c, SourceContext(where, rank, world_size, seed, is_train, augmentor))
    report = ManifestReport()  # bad lines of the noise and data manifests alike
    noise = _read_manifests(f"{where}.noise_manifest", c.noise_manifest, report=report,
                            skip_bad=c.skip_bad_samples, check_files=not c.skip_bad_samples) if c.noise_manifest else []
    # is_concat: one dataset per manifest; otherwise all manifests form one dataset (nested bucket lists flatten)
    groups = [[m] for m in split_paths(c.manifest_filepath)] if c.is_concat else [split_paths(c.manifest_filepath)]
    sharded = c.is_tarred and "_OP_" in str(c.manifest_filepath) and "_CL_" in str(c.manifest_filepath)
    if sharded:  # sharded manifests: expanded and split over ranks exactly like the tar shards they describe
        groups = [shard_list(c.manifest_filepath, rank, world_size, c.tarred_shard_strategy)]
    # skip_bad_samples=false promises that a bad item stops the run: a missing file is found here, at start-up
    parts = [_read_manifests(f"{where}.manifest_filepath", g, c.min_duration, c.max_duration, c.max_utts,
                             report=report, skip_bad=c.skip_bad_samples, measure=_measure(c),
                             check_files=not (c.skip_bad_samples or c.is_tarred)) for g in groups]
    entries = [e for p in parts for e in p]
    if not entries:
        raise ValueError(f"{where}.manifest_filepath={c.manifest_filepath!r}: no items left after the duration filter "
                         f"({len(report.filtered)} outside [{c.min_duration}, {c.max_duration}] s, "
                         f"{len(report.bad)} bad lines)")
    ds = AudioNoiseDataset(entries, noise, c.sample_rate, c.min_audio_len_secs, c.pad_audio_mode,
                           c.channel_selector, seed, c.skip_bad_samples, c.duration_tolerance)
    collate = AudioNoiseCollate(augmentor, c.augment_on_device, seed, c.return_sample_id)
    if c.is_tarred and not is_train:
        return with_report(_tarred_validation(c, ds, collate, entries, sharded, rank, world_size, seed), report)
    if c.is_tarred:
        shards = shard_list(c.tarred_audio_filepaths, rank, world_size, c.tarred_shard_strategy)
        tds = TarredAudioNoiseDataset(ds, shards, c.shuffle_n if c.shuffle else 0, seed + 7919 * rank)
        n = _tarred_batches(c, entries, sharded, rank, world_size)
        check_batches(n, n, len(entries), c, world_size, where)
        return with_report(DataLoaderWrapper(c, tds, collate, None, n), report)
    sampler = BatchSampler(ds.durations(), c.batch_size, shuffle=c.shuffle, drop_last=c.drop_last, rank=rank,
                           world_size=world_size, seed=seed, batch_duration=c.batch_duration,
                           num_buckets=c.num_buckets, bucket_buffer_size=c.bucket_buffer_size,
                           concat_sizes=[len(p) for p in parts] if c.is_concat else None,
                           concat_temperature=c.concat_sampling_temperature,
                           concat_probs=c.concat_sampling_probabilities if c.concat_sampling_technique == "random"
                           else None, even=is_train)
    n = len(sampler)  # each len() and global_batches() plans a whole epoch: plan the all-rank one only if needed
    total = n if is_train and n > 0 else len(sampler.global_batches())
    check_batches(n, total, len(entries), c, world_size, where)
    return with_report(DataLoaderWrapper(c, ds, collate, sampler, n), report)


def _read_manifests(key: str, *args, **kwargs):
    """read_manifests with the config key in the error (the message already names the file or file:line)."""
    try:
        return read_manifests(*args, **kwargs)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from e


def _tarred_validation(c: DatasetConfig, ds, collate, entries, sharded: bool, rank: int, world_size: int,
                       seed: int) -> DataLoaderWrapper:
    """A tarred validation loader that counts every item once over the ranks (tarred.plan_tarred_validation):
    scatter ranks read their shards once (ranks past the last shard read none), replicate ranks keep entry i when
    i % world_size == rank; an empty validation set over all ranks is a start-up error."""
    strategy = c.tarred_shard_strategy
    shards = shard_list(c.tarred_audio_filepaths, rank, world_size, strategy, allow_empty=True)
    keep = (rank, world_size) if strategy == "replicate" else None
    tds = TarredAudioNoiseDataset(ds, shards, c.shuffle_n if c.shuffle else 0, seed + 7919 * rank, keep=keep)
    counts = _shard_counts(c, entries, sharded)
    if strategy == "replicate" and not sharded and items_per_shard(entries, len(counts)) is not None:
        entry_shards = [e.shard_id for e in entries]
    else:  # sharded manifests (every rank reads all of them under replicate) are concatenated in shard order
        entry_shards = [s for s, k in enumerate(counts) for _ in range(k)]
    batches, line = plan_tarred_validation(counts, entry_shards, rank, world_size, strategy, c.batch_size,
                                           c.num_workers)
    log.info(line)
    check_batches(batches[rank], sum(batches), len(entries), c, world_size, "model.validation_ds")
    return DataLoaderWrapper(c, tds, collate, None, batches[rank], once=True)


def _tarred_batches(c: DatasetConfig, entries, sharded: bool, rank: int, world_size: int) -> int:
    """Training batches per epoch, equal on every rank: enough for the rank with the most items (see
    tarred.plan_tarred)."""
    n, line = plan_tarred(_shard_counts(c, entries, sharded), rank, world_size, c.tarred_shard_strategy,
                          c.batch_size, c.num_workers)
    log.info(line)
    return n


def _shard_counts(c: DatasetConfig, entries, sharded: bool) -> list[int]:
    """Items per shard, from the sharded manifests (each rank counts all of them, so all agree) or from the
    manifest's `shard_id`; without either they are estimated as equal per shard, with a warning."""
    num_shards = len(expand_shards(c.tarred_audio_filepaths))
    if sharded:
        manifests = expand_shards(c.manifest_filepath)
        if len(manifests) != num_shards:
            raise ValueError(f"{len(manifests)} sharded manifests ({c.manifest_filepath}) but {num_shards} shards "
                             f"({c.tarred_audio_filepaths}); they must pair one to one")
        counts = [len(read_manifests(m, c.min_duration, c.max_duration, report=ManifestReport(), skip_bad=True,
                                     measure=_measure(c))) for m in manifests]
    else:
        counts = items_per_shard(entries, num_shards)
    if counts is None:
        counts = [len(entries) // num_shards + (i < len(entries) % num_shards) for i in range(num_shards)]
        log.warning("tarred manifest %s has no shard_id: items per shard are estimated as equal; a rank whose "
                    "shards hold more items than estimated does not reach them all each epoch", c.manifest_filepath)
    return counts


def _measure(c: DatasetConfig):
    """How an entry without `duration` gets one before the duration filters (None: no filter needs it).

    A plain manifest's file is measured (header, or a decode when the header has no exact frame count); a tarred
    manifest names a shard member that cannot be opened before its shard is streamed, so it is a bad line."""
    if c.min_duration is None and c.max_duration is None and c.batch_duration is None:
        return None
    if c.is_tarred:
        return unmeasurable
    return measure_duration


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

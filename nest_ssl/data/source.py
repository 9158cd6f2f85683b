"""What every input kind (manifest, tarred, Lhotse) is built from: `SourceContext`, and the start-up reading that
the manifest-based sources share.

A source module has `build(cfg: DatasetConfig, ctx: SourceContext) -> DataLoaderWrapper`: it reads its own files,
plans this rank's share and its batches, and returns the loader (data/wrapper.py). data/loader.py only picks the
module from the config; nothing flows back from a source into the picker.

`read_manifest_data` is the start-up read of the manifest and tarred sources: the noise manifest, then the data
manifests, duration-filtered, their bad lines in one report (which the loader counts as bad samples), and the
AudioNoiseDataset + collate over what is left.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.dataset import AudioNoiseCollate, AudioNoiseDataset
from nest_ssl.data.manifest import ManifestEntry, ManifestReport, read_manifests


@dataclass(frozen=True)
class SourceContext:
    where: str  # "model.train_ds" / "model.validation_ds": the config key errors name
    rank: int
    world_size: int
    seed: int
    is_train: bool
    augmentor: Any = None  # the batch augmentor instance (None: plain audio + noise)


class ManifestData(NamedTuple):
    parts: list[list[ManifestEntry]]  # one list per manifest group (is_concat: one per manifest)
    dataset: AudioNoiseDataset  # over all parts, in order
    collate: AudioNoiseCollate
    report: ManifestReport  # bad lines of the noise and data manifests alike


def when_needed(c: DatasetConfig, measure: Callable[[ManifestEntry], float]):
    """`measure` when the duration filters or batch_duration need every entry's duration; otherwise None, and an
    entry without `duration` is kept unmeasured."""
    if c.min_duration is None and c.max_duration is None and c.batch_duration is None:
        return None
    return measure


def read_manifest_data(c: DatasetConfig, ctx: SourceContext, groups: list[list[str]], *,
                       measure: Callable[[ManifestEntry], float], check_files: bool) -> ManifestData:
    """The noise manifest, then each group of data manifests; `measure` gives an entry without `duration` one (see
    when_needed), `check_files` stats every data entry's audio. No entry left is a start-up error."""
    report = ManifestReport()
    noise = read_manifests_keyed(f"{ctx.where}.noise_manifest", c.noise_manifest, report=report,
                            skip_bad=c.skip_bad_samples, check_files=not c.skip_bad_samples) if c.noise_manifest else []
    parts = [read_manifests_keyed(f"{ctx.where}.manifest_filepath", g, c.min_duration, c.max_duration, c.max_utts,
                             report=report, skip_bad=c.skip_bad_samples, measure=when_needed(c, measure),
                             check_files=check_files) for g in groups]
    entries = [e for p in parts for e in p]
    if not entries:
        raise ValueError(f"{ctx.where}.manifest_filepath={c.manifest_filepath!r}: no items left after the duration "
                         f"filter ({len(report.filtered)} outside [{c.min_duration}, {c.max_duration}] s, "
                         f"{len(report.bad)} bad lines)")
    ds = AudioNoiseDataset(entries, noise, c.sample_rate, c.min_audio_len_secs, c.pad_audio_mode,
                           c.channel_selector, ctx.seed, c.skip_bad_samples, c.duration_tolerance)
    collate = AudioNoiseCollate(ctx.augmentor, c.augment_on_device, ctx.seed, c.return_sample_id)
    return ManifestData(parts, ds, collate, report)


def read_manifests_keyed(key: str, *args, **kwargs) -> list[ManifestEntry]:
    """read_manifests with the config key in the error (the message already names the file or file:line)."""
    try:
        return read_manifests(*args, **kwargs)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from e

"""`DatasetConfig`: the `model.train_ds` / `model.validation_ds` / `model.test_ds` sections.

Fields are NeMo's keys for these sections (same names and defaults as NeMo 2.6.2's AudioNoiseDataset /
TarredAudioNoiseDataset / concat / bucketing config), plus documented extras of ours at the bottom.
`nest_ssl.config.from_dict(DatasetConfig, d, path="model.train_ds")` builds it (variants are `Literal` types,
checked there); `validate()` checks the combinations. NeMo keys that have no effect here are listed in
run_config.IGNORED_KEYS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class DatasetConfig:
    # ---- NeMo keys (nest_fast-conformer.yaml train_ds / validation_ds) ----
    manifest_filepath: Any = "???"  # str (comma-separated allowed) | list[str] | list[list[str]] (buckets)
    noise_manifest: Any = None  # str | list[str] | None
    sample_rate: int = 16000
    batch_size: int = 8
    shuffle: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    use_start_end_token: bool = False
    trim_silence: bool = False
    max_duration: float | None = None
    min_duration: float | None = None
    drop_last: bool = False
    is_concat: bool = False
    concat_sampling_technique: Literal["temperature", "random"] = "temperature"  # random: by the probabilities
    concat_sampling_temperature: float = 1.0
    concat_sampling_probabilities: list[float] | None = None
    concat_shuffle: bool = True
    is_tarred: bool = False
    tarred_audio_filepaths: Any = None  # str | list[str] | list[list[str]]
    shuffle_n: int = 0
    tarred_shard_strategy: Literal["scatter", "replicate"] = "scatter"
    bucketing_strategy: Literal["fixed_order", "synced_randomized", "fully_randomized"] = "synced_randomized"
    bucketing_batch_size: Any = None  # int | list[int] | None
    bucketing_weights: list[int] | None = None
    batch_augmentor: dict | None = None  # {"_target_": ..., ...}; built by nest_ssl.nemo_compat.instantiate
    augmentor: dict | None = None  # NeMo's per-sample perturbation dict; only None is supported
    min_audio_len_secs: float = 1.0
    pad_audio_mode: Literal["repeat", "zero"] = "repeat"
    channel_selector: Any = None  # None (down-mix multi-channel), int, list[int] or "average"
    return_sample_id: bool = False
    max_utts: int = 0
    int_values: bool = False
    labels: list[str] | None = None  # AudioToCharDataset only
    parser: str | None = "en"
    normalize: bool = False
    use_lhotse: bool = False
    defer_setup: bool = False
    global_rank: int | None = None
    world_size: int | None = None
    # ---- ours ----
    batch_duration: float | None = None  # seconds of audio per batch; enables the duration-bucketing sampler
    num_buckets: int = 30  # duration buckets for batch_duration
    bucket_buffer_size: int = 10000  # items drawn into the bucketing buffer at a time
    max_bad_samples: int = 100  # skipped-bad-item limit per loader before an error naming the worst files
    skip_bad_samples: bool = True  # False: the first bad item raises
    duration_tolerance: float | None = 0.1  # s; a manifest duration/offset off by more than this is a bad item
    augment_on_device: bool = False  # collate returns clean+noise; the model step mixes on the GPU
    prefetch_factor: int | None = None
    persistent_workers: bool = False

    def validate(self, path: str = "model.train_ds") -> DatasetConfig:
        """Raise ValueError naming the key for values we cannot honour; returns self."""
        def bad(key, allowed=None):
            val = getattr(self, key)
            extra = f"; allowed: {allowed}" if allowed else ""
            raise ValueError(f"{path}.{key}={val!r} is invalid{extra}")

        if self.manifest_filepath == "???" and not self.is_tarred:
            raise ValueError(f"{path}.manifest_filepath is mandatory ('???') but was not set; set it in the YAML or "
                             f"on the command line ({path}.manifest_filepath=...)")
        if self.manifest_filepath in (None, "") and not self.is_tarred:
            bad("manifest_filepath")
        if self.use_lhotse:
            raise ValueError(f"{path}.use_lhotse=True is not supported by nest_ssl (use manifests or tarred shards)")
        if self.augmentor:
            raise ValueError(f"{path}.augmentor={self.augmentor!r}: per-sample perturbation is not supported; "
                             "use batch_augmentor")
        if self.trim_silence:
            raise ValueError(f"{path}.trim_silence=True is not supported (NEST uses false)")
        if self.bucketing_batch_size is not None:
            raise ValueError(f"{path}.bucketing_batch_size={self.bucketing_batch_size!r} is not supported (broken "
                             "for NEST in NeMo); use batch_duration/num_buckets")
        if self.is_tarred and self.is_concat:
            raise ValueError(f"{path}: is_tarred together with is_concat is not supported")
        if self.is_concat and self.concat_sampling_technique == "random" and not self.concat_sampling_probabilities:
            raise ValueError(f"{path}.concat_sampling_technique='random' needs concat_sampling_probabilities")
        if int(self.batch_size) < 1 and self.batch_duration is None:
            bad("batch_size")
        if self.batch_duration is not None and float(self.batch_duration) <= 0:
            bad("batch_duration")
        if self.num_buckets < 1:
            bad("num_buckets")
        if self.is_tarred and not self.tarred_audio_filepaths:
            bad("tarred_audio_filepaths")
        if self.max_bad_samples < 0:
            bad("max_bad_samples")
        if self.duration_tolerance is not None and float(self.duration_tolerance) < 0:
            bad("duration_tolerance")
        if self.batch_augmentor is not None and "_target_" not in self.batch_augmentor:
            bad("batch_augmentor")
        return self

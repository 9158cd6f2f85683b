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
    batch_size: int | None = 8  # None only with use_lhotse (no cut-count limit), NeMo's Lhotse default
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
    # ---- NeMo's Lhotse keys (use_lhotse: true; data/lhotse_source.py). batch_duration, num_buckets and
    # bucket_buffer_size below are shared with our native bucketing, with the same names and defaults as NeMo's ----
    input_cfg: Any = None  # list of {type: nemo|nemo_tarred|lhotse|lhotse_shar, ..., weight} or a YAML file of it
    cuts_path: Any = None  # a lhotse CutSet manifest (.jsonl / .jsonl.gz)
    shar_path: Any = None  # a Shar directory, a list of them, or a list of [directory, weight]
    quadratic_duration: float | None = None  # lhotse TimeConstraint: duration + duration^2 / quadratic_duration
    use_bucketing: bool = False  # DynamicBucketingSampler (else DynamicCutSampler)
    bucket_duration_bins: list[float] | None = None  # bucket upper edges (s), ascending
    bucket_batch_size: list[int] | None = None  # one batch size per bin (FixedBucketBatchSizeConstraint)
    num_cuts_for_bins_estimate: int = 10000
    shuffle_buffer_size: int | None = 10000
    seed: Any = None  # the noise/augmentation seed: an int; None (unset), "trng", "randomized": the run's seed
    shard_seed: Any = "trng"  # the sampler's and shard order's seed; "trng"/"randomized" -> the run's seed
    max_open_streams: int | None = None  # open tar files per DataLoader worker (None: no limit)
    concurrent_bucketing: bool = True  # accepted; plans are made from metadata, never in a background thread
    cuda_expandable_segments: bool = True  # NeMo's Lhotse loader sets the CUDA allocator's expandable_segments
    force_finite: bool = False  # accepted; an epoch is one pass, the next one reshuffles (README, Lhotse)
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

        if self.use_lhotse:
            return self._validate_lhotse(path)
        if self.manifest_filepath == "???" and not self.is_tarred:
            raise ValueError(f"{path}.manifest_filepath is mandatory ('???') but was not set; set it in the YAML or "
                             f"on the command line ({path}.manifest_filepath=...)")
        if self.manifest_filepath in (None, "") and not self.is_tarred:
            bad("manifest_filepath")
        lhotse_only = [k for k in LHOTSE_ONLY if getattr(self, k) != DatasetConfig.__dataclass_fields__[k].default]
        if lhotse_only:
            raise ValueError(f"{path}.{lhotse_only[0]}={getattr(self, lhotse_only[0])!r} is a Lhotse key: set "
                             f"{path}.use_lhotse=true to read this data through Lhotse")
        if self.batch_size is None and self.batch_duration is None:
            bad("batch_size")
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
        if self.batch_size is not None and int(self.batch_size) < 1 and self.batch_duration is None:
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

    def _validate_lhotse(self, path: str) -> DatasetConfig:
        def bad(key, why):
            raise ValueError(f"{path}.{key}={getattr(self, key)!r}: {why}")

        given = [k for k in ("input_cfg", "cuts_path", "shar_path") if getattr(self, k) not in (None, "", "???")]
        if self.manifest_filepath not in (None, "", "???"):
            given.insert(0, "manifest_filepath")
        if len(given) != 1:
            raise ValueError(f"{path}: use_lhotse needs exactly one of manifest_filepath (with tarred_audio_filepaths "
                             f"for tarred data), cuts_path, shar_path or input_cfg; got {given or 'none'}")
        if self.batch_size is None and self.batch_duration is None and self.bucket_batch_size is None:
            raise ValueError(f"{path}: use_lhotse needs batch_size, batch_duration or bucket_batch_size (with "
                             "bucket_duration_bins)")
        for key in ("batch_size", "num_buckets", "bucket_buffer_size", "num_cuts_for_bins_estimate",
                    "max_open_streams"):
            if getattr(self, key) is not None and int(getattr(self, key)) < 1:
                bad(key, "must be >= 1")
        for key in ("batch_duration", "quadratic_duration"):
            if getattr(self, key) is not None and float(getattr(self, key)) <= 0:
                bad(key, "must be > 0")
        bins = self.bucket_duration_bins
        if bins is not None and (not bins or list(bins) != sorted(bins) or float(bins[0]) <= 0
                                 or len(set(bins)) != len(bins)):
            bad("bucket_duration_bins", "must be a non-empty list of increasing durations > 0 (seconds)")
        if self.bucket_batch_size is not None:
            if bins is None:
                bad("bucket_batch_size", "needs bucket_duration_bins (one batch size per bin)")
            if len(self.bucket_batch_size) != len(bins) or min(self.bucket_batch_size) < 1:
                bad("bucket_batch_size", f"needs one batch size >= 1 per bin ({len(bins)} bucket_duration_bins)")
            if not self.use_bucketing:
                bad("bucket_batch_size", "needs use_bucketing: true")
        for key in ("seed", "shard_seed"):
            value = getattr(self, key)
            integer = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and not integer and value not in ("trng", "randomized"):
                bad(key, "must be an integer, 'trng' or 'randomized'")
        refused = {"is_concat": "combine sources with input_cfg and weights", "bucketing_batch_size": "use "
                   "bucket_duration_bins + bucket_batch_size", "augmentor": "use batch_augmentor",
                   "trim_silence": "NEST uses false"}
        for key, instead in refused.items():
            if getattr(self, key):
                bad(key, f"not supported with use_lhotse ({instead})")
        if self.tarred_audio_filepaths and "manifest_filepath" not in given:
            bad("tarred_audio_filepaths", "pairs with manifest_filepath (NeMo tarred data)")
        if self.max_bad_samples < 0:
            bad("max_bad_samples", "must be >= 0")
        if self.batch_augmentor is not None and "_target_" not in self.batch_augmentor:
            bad("batch_augmentor", "needs a _target_")
        return self


# Keys only the Lhotse path reads: set to anything but their default without use_lhotse, they are an error.
LHOTSE_ONLY = ("input_cfg", "cuts_path", "shar_path", "quadratic_duration", "use_bucketing", "bucket_duration_bins",
               "bucket_batch_size", "num_cuts_for_bins_estimate", "shuffle_buffer_size", "seed", "shard_seed",
               "max_open_streams", "concurrent_bucketing", "cuda_expandable_segments", "force_finite")

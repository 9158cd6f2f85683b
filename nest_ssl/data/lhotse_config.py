"""NeMo's Lhotse keys (`use_lhotse: true` sections): which we implement, which we accept only switched off.

NeMo 2.6.2's `LhotseDataLoadingConfig` (nemo/collections/common/data/lhotse/dataloader.py) has ~70 keys. The ones
nest_ssl implements are fields of `DatasetConfig` (data/config.py). Every other key is listed in `OFF_VALUES` with
the value that switches its feature off (text tokenization, speed perturbation, lhotse-side noise, RIR, ...). A
YAML may carry such a key at that value (NeMo writes many of them out); any other value is a start-up error naming
the key, never a silently ignored setting. Keys of neither kind are unknown keys (config.from_dict).
"""
from __future__ import annotations

import math
from typing import Any

from nest_ssl.config import ConfigError

INF = float("inf")

# key -> the NeMo default, which leaves the feature off (what nest_ssl does)
OFF_VALUES: dict[str, Any] = {
    # text, tokens and prompts: SSL pretraining reads no text
    "pretokenize": True, "prompt_format": None, "use_multimodal_sampling": False, "token_equivalent_duration": None,
    "batch_tokens": None, "quadratic_factor": None, "min_tps": -1, "max_tps": INF, "min_tokens": None,
    "max_tokens": None, "measure_total_length": True, "min_tpt": -1, "max_tpt": INF, "text_field": "text",
    "lang_field": "lang",
    # several sampler configs fused; input_cfg is the supported way to combine sources
    "multi_config": False, "sampler_fusion": "round_robin", "sampler_weights": None,
    # lhotse-side augmentation: NEST mixes noise_manifest through its batch_augmentor instead
    "noise_path": None, "noise_snr": [10.0, 20.0], "noise_mix_prob": 0.5, "perturb_speed": False,
    "concatenate_samples": False, "concatenate_gap_seconds": 0.1, "concatenate_duration_factor": 1.0,
    "concatenate_merge_supervisions": True, "db_norm": -25.0, "truncate_duration": None,
    "truncate_offset_type": "random", "cut_into_windows_duration": None, "cut_into_windows_hop": None,
    "keep_excessive_supervisions": True, "rir_enabled": False, "rir_path": None, "rir_prob": 0.5,
    "pad_min_duration": None, "pad_direction": "right", "random_padding": None,
    # 2D (audio x text) bucketing only
    "bucketing_2d_strict_mode": True,
    # dataset flavour: nest_ssl always plans batches in the main process and reads them in map-style workers
    "metadata_only": False, "force_map_dataset": False, "force_iterable_dataset": False,
    # a manifest row whose tar member is missing is a counted bad sample (max_bad_samples), never a skipped shard
    "skip_missing_manifest_entries": False, "tarred_random_access": False,
}

# NeMo keys of the native (non-Lhotse) loader that NeMo's Lhotse loader drops with a warning; NeMo's NEST YAML
# carries them. They are accepted at any value except where the value asks for something Lhotse would not do.
NATIVE_ONLY = ("is_tarred", "shuffle_n", "tarred_shard_strategy", "bucketing_strategy", "bucketing_weights",
               "concat_sampling_technique", "concat_sampling_temperature", "concat_sampling_probabilities",
               "concat_shuffle", "max_utts")


def _same(value: Any, off: Any) -> bool:
    if isinstance(off, float) and math.isinf(off):
        return isinstance(value, (int, float, str)) and str(value).lower() in ("inf", "infinity", "+inf")
    if isinstance(off, list):
        return isinstance(value, (list, tuple)) and [float(v) for v in value] == off
    return value == off


def strip_off_keys(section: dict, where: str) -> dict:
    """`section` without the OFF_VALUES keys it carries at their off value; ConfigError for one at another value.

    Only for `use_lhotse: true` sections; also makes an absent batch_size mean "no cut limit" as in NeMo (the
    native loader's default is 8)."""
    out = {}
    for key, value in section.items():
        if key in OFF_VALUES:
            if not _same(value, OFF_VALUES[key]):
                raise ConfigError(f"{where}.{key}={value!r}: this NeMo Lhotse option is not implemented by nest_ssl "
                                  f"(remove it or set it to {OFF_VALUES[key]!r}); README, 'Lhotse', lists the "
                                  f"implemented keys")
            continue
        out[key] = value
    out.setdefault("batch_size", None)
    return out

"""The plain-manifest source: JSON-lines manifests read at start-up into a map-style AudioNoiseDataset, split over
the ranks and batched by `BatchSampler` (fixed batch_size, or duration buckets with batch_duration).

With `is_concat` each manifest is its own dataset and batches are drawn from them by temperature or by
`concat_sampling_probabilities`; otherwise all manifests (nested bucket lists flattened) form one dataset.
Training gives every rank the same number of batches; validation splits each batch list over the ranks so that
every item is seen once.
"""
from __future__ import annotations

from nest_ssl.data.audio import measure_duration
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.manifest import split_paths
from nest_ssl.data.sampler import BatchSampler
from nest_ssl.data.source import SourceContext, read_manifest_data
from nest_ssl.data.wrapper import DataLoaderWrapper, check_batches, with_report


def build(c: DatasetConfig, ctx: SourceContext) -> DataLoaderWrapper:
    paths = split_paths(c.manifest_filepath)
    # skip_bad_samples=false promises that a bad item stops the run: a missing file is found here, at start-up
    data = read_manifest_data(c, ctx, [[m] for m in paths] if c.is_concat else [paths], measure=measure_duration,
                              check_files=not c.skip_bad_samples)
    sampler = BatchSampler(data.dataset.durations(), c.batch_size, shuffle=c.shuffle, drop_last=c.drop_last,
                           rank=ctx.rank, world_size=ctx.world_size, seed=ctx.seed, batch_duration=c.batch_duration,
                           num_buckets=c.num_buckets, bucket_buffer_size=c.bucket_buffer_size,
                           concat_sizes=[len(p) for p in data.parts] if c.is_concat else None,
                           concat_temperature=c.concat_sampling_temperature,
                           concat_probs=c.concat_sampling_probabilities if c.concat_sampling_technique == "random"
                           else None, even=ctx.is_train)
    n = len(sampler)  # each len() and global_batches() plans a whole epoch: plan the all-rank one only if needed
    total = n if ctx.is_train and n > 0 else len(sampler.global_batches())
    check_batches(n, total, len(data.dataset), c, ctx.world_size, ctx.where)
    return with_report(DataLoaderWrapper(c, data.dataset, data.collate, sampler, n), data.report)

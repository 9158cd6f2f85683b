"""The tarred source: a tarred manifest (or sharded manifests) read at start-up, the shards split over the ranks
(data/tarred.py), this rank's batches planned, and the shards streamed through TarredAudioNoiseDataset.

Training: every rank runs the same number of batches per epoch, that of the rank with the most items
(`plan_tarred`); a rank with fewer re-reads its stream from the start to fill up, so some of its items are seen
twice in that epoch, and none is skipped. Validation counts every item exactly once over the ranks
(`plan_tarred_validation`): each rank reads its stream once and runs its own number of batches (the loss is
all-reduced once, after the loop), a `scatter` rank past the last shard validates nothing, and `replicate` keeps
entry i on rank i mod W only. Items per shard come from sharded manifests, the manifest's `shard_id`, or, without
either, an equal-split estimate (with a warning). Sharded manifests (`_OP_0..N_CL_`) are split over the ranks
exactly like the shards they describe.
"""
from __future__ import annotations

import collections
import logging

from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.manifest import ManifestEntry, ManifestReport, read_manifests, split_paths
from nest_ssl.data.source import SourceContext, read_manifest_data, when_needed
from nest_ssl.data.tarred import TarredAudioNoiseDataset, expand_shards, rank_shard_indices, shard_list, unmeasurable
from nest_ssl.data.wrapper import DataLoaderWrapper, check_batches, with_report

log = logging.getLogger(__name__)


def build(c: DatasetConfig, ctx: SourceContext) -> DataLoaderWrapper:
    strategy, rank, world_size = c.tarred_shard_strategy, ctx.rank, ctx.world_size
    sharded = "_OP_" in str(c.manifest_filepath) and "_CL_" in str(c.manifest_filepath)
    if sharded:
        manifests = shard_list(c.manifest_filepath, rank, world_size, strategy)
    else:
        manifests = split_paths(c.manifest_filepath)
    # a member can be opened only once its shard streams: no file check, and no measuring (unmeasurable)
    data = read_manifest_data(c, ctx, [manifests], measure=unmeasurable, check_files=False)
    entries = data.dataset.entries
    shards = shard_list(c.tarred_audio_filepaths, rank, world_size, strategy, allow_empty=not ctx.is_train)
    keep = (rank, world_size) if strategy == "replicate" and not ctx.is_train else None
    tds = TarredAudioNoiseDataset(data.dataset, shards, c.shuffle_n if c.shuffle else 0, ctx.seed + 7919 * rank,
                                  keep=keep)
    counts = _shard_counts(c, entries, sharded)
    if ctx.is_train:
        mine, line = plan_tarred(counts, rank, world_size, strategy, c.batch_size, c.num_workers)
        total = mine
    else:
        batches, line = plan_tarred_validation(counts, _entry_shards(c, entries, counts, sharded), rank, world_size,
                                               strategy, c.batch_size, c.num_workers)
        mine, total = batches[rank], sum(batches)
    log.info(line)
    check_batches(mine, total, len(entries), c, world_size, ctx.where)
    return with_report(DataLoaderWrapper(c, tds, data.collate, None, mine, once=not ctx.is_train), data.report)


def _shard_counts(c: DatasetConfig, entries: list[ManifestEntry], sharded: bool) -> list[int]:
    """Items per shard, from the sharded manifests (each rank counts all of them, so all agree) or from the
    manifest's `shard_id`; without either they are estimated as equal per shard, with a warning."""
    num_shards = len(expand_shards(c.tarred_audio_filepaths))
    if sharded:
        manifests = expand_shards(c.manifest_filepath)
        if len(manifests) != num_shards:
            raise ValueError(f"{len(manifests)} sharded manifests ({c.manifest_filepath}) but {num_shards} shards "
                             f"({c.tarred_audio_filepaths}); they must pair one to one")
        counts = [len(read_manifests(m, c.min_duration, c.max_duration, report=ManifestReport(), skip_bad=True,
                                     measure=when_needed(c, unmeasurable))) for m in manifests]
    else:
        counts = items_per_shard(entries, num_shards)
    if counts is None:
        counts = [len(entries) // num_shards + (i < len(entries) % num_shards) for i in range(num_shards)]
        log.warning("tarred manifest %s has no shard_id: items per shard are estimated as equal; a rank whose "
                    "shards hold more items than estimated does not reach them all each epoch", c.manifest_filepath)
    return counts


def _entry_shards(c: DatasetConfig, entries: list[ManifestEntry], counts: list[int], sharded: bool) -> list[int]:
    """Each entry's shard, for replicated validation's i % world_size split: the manifest's `shard_id`; sharded
    manifests (every rank reads all of them under replicate) and manifests without shard_id are concatenated in
    shard order."""
    if c.tarred_shard_strategy == "replicate" and not sharded and items_per_shard(entries, len(counts)) is not None:
        return [e.shard_id for e in entries]
    return [s for s, k in enumerate(counts) for _ in range(k)]


def _rank_batches(items: list[int], batch_size: int, workers: int) -> int:
    """Batches one pass over a rank's shards yields: DataLoader worker w reads shards w, w+W, ... (fixed, see
    TarredAudioNoiseDataset.__iter__) and ends on its own partial batch."""
    nw = max(1, workers)
    return sum(-(-sum(items[w::nw]) // batch_size) for w in range(nw))


def plan_tarred(items_per_shard: list[int], rank: int, world_size: int, strategy: str, batch_size: int,
                workers: int) -> tuple[int, str]:
    """(batches per epoch on every rank, a log line saying what this rank reads and repeats)."""
    n = len(items_per_shard)
    blocks = [rank_shard_indices(n, r, world_size, strategy) for r in range(world_size)]
    per_rank = [[items_per_shard[i] for i in b] for b in blocks]
    batches = max(_rank_batches(x, batch_size, workers) for x in per_rank)
    mine = sum(per_rank[rank])
    line = (f"tarred: {n} shards, {strategy} over {world_size} rank(s); rank {rank} reads shards "
            f"{blocks[rank].start}..{blocks[rank].stop - 1} ({mine} items); {batches} batches of {batch_size} per "
            f"epoch on every rank; up to {max(0, batches * batch_size - mine)} of this rank's items repeat to fill")
    return batches, line


def plan_tarred_validation(items_per_shard: list[int], entry_shards: list[int], rank: int, world_size: int,
                           strategy: str, batch_size: int, workers: int) -> tuple[list[int], str]:
    """(validation batches of every rank, a log line) when each item is counted once over the ranks.

    `scatter`: rank r reads its shard block once (a rank past the last shard reads none). `replicate`: every rank
    streams every shard but keeps only entries i with i % world_size == rank (`entry_shards[i]` is entry i's shard),
    so each entry is validated on exactly one rank. Ranks may run different batch counts: validation all-reduces its
    (loss sum, batch count) once, after the loop."""
    n = len(items_per_shard)
    if strategy == "replicate":
        per_rank = [[0] * n for _ in range(world_size)]
        for i, s in enumerate(entry_shards):
            per_rank[i % world_size][s] += 1
    else:
        per_rank = [[items_per_shard[i] for i in rank_shard_indices(n, r, world_size, strategy, allow_empty=True)]
                    for r in range(world_size)]
    batches = [_rank_batches(x, batch_size, workers) for x in per_rank]
    line = (f"tarred validation: {n} shards, {strategy} over {world_size} rank(s); rank {rank} validates "
            f"{sum(per_rank[rank])} items in {batches[rank]} batches of up to {batch_size}, each item once over the "
            f"ranks (batches per rank: {batches})")
    return batches, line


def items_per_shard(entries: list[ManifestEntry], num_shards: int) -> list[int] | None:
    """Entries per shard from the manifest's `shard_id` (NeMo's and our writers set it); None when absent."""
    ids = [e.shard_id for e in entries]
    if not ids or any(i is None for i in ids):
        return None
    bad = sorted({i for i in ids if not 0 <= i < num_shards})
    if bad:
        raise ValueError(f"manifest shard_id values {bad[:5]} are outside the {num_shards} shards given in "
                         "tarred_audio_filepaths")
    counts = collections.Counter(ids)
    return [counts.get(i, 0) for i in range(num_shards)]

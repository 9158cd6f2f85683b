"""The Lhotse source (`use_lhotse: true`): NeMo's Lhotse keys, lhotse's own samplers, planned per epoch, resumable.

1. Read (data/lhotse_inputs.py): every cut's metadata, and where its audio lives.
2. Plan (`LhotsePlan`): each epoch, lhotse's sampler runs over metadata-only cuts, exactly as NeMo configures it
   (`use_bucketing`: DynamicBucketingSampler, else DynamicCutSampler; constraint: bucket_batch_size per bucket, else
   TimeConstraint(batch_size, batch_duration, quadratic_duration)), seeded by `shard_seed` and the epoch. Training:
   lhotse's own rank split (`world_size`, `rank`): every rank gets the same number of batches, each cut is in one of
   them (the last round's cuts are re-dealt so that every rank has a batch; lhotse repeats a cut only when that round
   has fewer cuts than ranks). Validation: one global plan, rank r takes batches r, r+W, ... (every item once).
   The plan is a pure function of (seed, epoch), so the checkpointed (epoch, next batch) resumes it exactly.
3. Load (`LhotseAudioNoiseDataset`): DataLoader workers read each planned cut: a file by path, a tar member by
   offset; noise and the batch augmentor as for the native loaders (AudioNoiseDataset, AudioNoiseCollate).

Differences from NeMo, all because NeMo's Lhotse path is not resumable: `shard_seed`/`seed` "trng"/"randomized"
use the run's seed (NeMo draws a fresh one per run); `concurrent_bucketing` has no background thread to run (plans
read metadata only, deterministically); an epoch is one pass over the data (NeMo repeats tarred/Shar inputs without
end), the next epoch reshuffles. Weighted sources (input_cfg, weighted shar_path) are drawn with their weights for
as many draws as there are cuts per epoch, each source walking its own permutation (as the native is_concat).
"""
from __future__ import annotations

import collections
import logging
import random

import numpy as np
import torch

from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.dataset import AudioNoiseCollate, AudioNoiseDataset, BadItem
from nest_ssl.data.lhotse_config import NATIVE_ONLY
from nest_ssl.data.lhotse_inputs import LhotseItems, Member, read_inputs
from nest_ssl.data.sampler import EpochPlan, concat_order
from nest_ssl.data.source import SourceContext, read_manifests_keyed
from nest_ssl.data.wrapper import DataLoaderWrapper, check_batches, with_report

log = logging.getLogger(__name__)


def resolve_seed(value, run_seed: int, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if value is None:
        return run_seed
    log.info("%s=%r: NeMo draws a new seed each run (not resumable); nest_ssl uses the run seed %d", key, value,
             run_seed)
    return run_seed


class _Metadata:
    """A lazy (re-iterable) stream of metadata-only MonoCuts, id = the entry index; lazy so that lhotse's samplers
    treat it as the streaming input they are built for."""

    def __init__(self, items: LhotseItems, order: list[int]):
        self.items, self.order = items, order

    def __iter__(self):
        from lhotse import MonoCut

        for i in self.order:
            e = self.items.entries[i]
            yield MonoCut(id=str(i), start=e.offset, duration=e.duration, channel=0)


class LhotsePlan(EpochPlan):
    """A batch sampler for DataLoader (lists of entry indices), planned a whole epoch at a time (sampler.EpochPlan,
    as the native BatchSampler)."""

    def __init__(self, cfg: DatasetConfig, items: LhotseItems, *, rank: int, world_size: int, seed: int,
                 even: bool):
        self.cfg, self.items, self.seed, self.even = cfg, items, seed, even
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start, self._cached, self.repeated = 0, 0, (None, None), 0
        self._global = (None, None)  # (epoch, all ranks' batches)
        self.bins = self._bins()

    def _bins(self) -> list[float] | None:
        """NeMo's bucket bins: given, else evenly spaced between min and max_duration when max_duration is finite,
        else estimated by lhotse from the first num_cuts_for_bins_estimate cuts (once, from epoch 0's order)."""
        c = self.cfg
        if not c.use_bucketing:
            return None
        if c.bucket_duration_bins is not None:
            return [float(b) for b in c.bucket_duration_bins]
        if c.max_duration is not None and c.max_duration < float("inf"):
            lo = c.min_duration if c.min_duration is not None and c.min_duration > 0 else 0.0
            return np.linspace(lo, c.max_duration, c.num_buckets + 1)[1:-1].tolist()
        from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets

        first = _Metadata(self.items, self._order(0)[: c.num_cuts_for_bins_estimate])
        if len(first.order) < c.num_buckets:  # lhotse's estimate would fail an assert
            raise ValueError(f"use_bucketing: {c.num_buckets} num_buckets cannot be estimated from {len(first.order)} "
                             "cut(s); set bucket_duration_bins, a finite max_duration, or fewer num_buckets")
        return list(estimate_duration_buckets(first, num_buckets=c.num_buckets, constraint=self._constraint()))

    def _constraint(self):
        from lhotse.dataset.sampling.base import TimeConstraint
        from lhotse.dataset.sampling.dynamic_bucketing import FixedBucketBatchSizeConstraint

        c = self.cfg
        if c.bucket_batch_size is not None:
            return FixedBucketBatchSizeConstraint(max_seq_len_buckets=[float(b) for b in c.bucket_duration_bins],
                                                  batch_sizes=[int(b) for b in c.bucket_batch_size])
        return TimeConstraint(max_cuts=c.batch_size, max_duration=c.batch_duration,
                              quadratic_duration=c.quadratic_duration)

    def _order(self, epoch: int) -> list[int]:
        """The cut order the sampler reads: weighted sources drawn by weight; otherwise the inputs' own order, with
        the shard order shuffled per epoch when `shuffle`, and always for one Shar directory (as NeMo)."""
        items, n = self.items, len(self.items.entries)
        if items.weights is not None and len(items.weights) > 1:
            by_source = collections.defaultdict(list)
            for i, s in enumerate(items.sources):
                by_source[s].append(i)
            sources = [s for s in range(len(items.weights)) if by_source[s]]  # a source filtered empty drops out
            flat = [i for s in sources for i in by_source[s]]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            draws = concat_order([len(by_source[s]) for s in sources], 1.0, [items.weights[s] for s in sources], g)
            return [flat[j] for j in draws]
        if not self.cfg.shuffle and not items.shar_shards_shuffled:
            return list(range(n))
        shard_of = collections.defaultdict(list)
        for i, s in enumerate(items.shards):
            shard_of[s].append(i)
        shards = list(shard_of)
        # NeMo's shard order: random.Random(shard_seed + epoch).shuffle (lhotse's LazySharIterator with
        # stateful_shuffle, NeMo's LazyNeMoTarredIterator._get_seed), epoch = the passes made so far
        random.Random(self.seed + epoch).shuffle(shards)
        return [i for s in shards for i in shard_of[s]]

    def _sampler(self, epoch: int, rank: int, world_size: int):
        from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler

        c = self.cfg
        cuts = _cutset(_Metadata(self.items, self._order(epoch)))
        common = dict(constraint=self._constraint(), shuffle=c.shuffle, drop_last=c.drop_last, seed=self.seed,
                      rank=rank, world_size=world_size)
        if c.use_bucketing:
            # NeMo passes shuffle_buffer_size, which lhotse adds to buffer_size
            s = DynamicBucketingSampler(cuts, duration_bins=self.bins, concurrent=False,
                                        buffer_size=c.bucket_buffer_size + (c.shuffle_buffer_size or 0), **common)
        else:
            s = DynamicCutSampler(cuts, shuffle_buffer_size=c.shuffle_buffer_size or 20000, **common)
        s.set_epoch(epoch)
        return s

    def global_batches(self) -> list[list[int]]:
        """All ranks' batches of this epoch, in one plan (validation's split, and the start-up counts); planned once
        per epoch."""
        if self._global[0] != self.epoch:
            self._global = (self.epoch, [[int(c.id) for c in b] for b in self._sampler(self.epoch, 0, 1)])  # no copies
        return self._global[1]

    def _rank_batches(self) -> list[list[int]]:
        """This rank's training batches: lhotse's split. When the last round has fewer cuts than ranks, lhotse
        repeats some (ids `<id>_dup<k>`) so that every rank still gets a batch: counted in `repeated`."""
        batches, self.repeated = [], 0
        for b in self._sampler(self.epoch, self.rank, self.world_size):
            batches.append([_entry(c.id) for c in b])
            self.repeated += sum("_dup" in c.id for c in b)
        if self.repeated:
            log.info("epoch %d: %d cut(s) repeated on rank %d so that every rank has a last batch (the last round "
                     "had fewer cuts than ranks)", self.epoch, self.repeated, self.rank)
        return batches

    def epoch_batches(self) -> list[list[int]]:
        if self._cached[0] != self.epoch:
            if self.even:
                batches = self._rank_batches()
            else:
                batches = self.global_batches()[self.rank:: self.world_size]
            self._cached = (self.epoch, batches)
        return self._cached[1]

    def largest_batch(self) -> tuple[int, float]:
        """(utterances, longest seconds) of this epoch's batch with the most padded audio (trainer.fit_scan)."""
        durations = [[self.items.entries[i].duration for i in b] for b in self.epoch_batches()]
        worst = max(durations, key=lambda d: len(d) * max(d))
        return len(worst), float(max(worst))



def _entry(cut_id: str) -> int:
    """The entry index of a planned cut. A last round with fewer cuts than ranks is dealt one per rank by copying
    cuts, which lhotse renames `<id>_dup<k>` (lhotse.dataset.sampling.base.mark_as_duplicate)."""
    return int(cut_id.split("_dup", 1)[0])


def _cutset(stream):
    from lhotse import CutSet

    return CutSet(stream)


class LhotseAudioNoiseDataset(AudioNoiseDataset):
    """AudioNoiseDataset whose items may be tar members, read by offset (at most `max_open_streams` tar files open
    per worker; the least recently used one is closed first)."""

    def __init__(self, items: LhotseItems, noise, c: DatasetConfig, seed: int):
        super().__init__(items.entries, noise, c.sample_rate, c.min_audio_len_secs, c.pad_audio_mode,
                         c.channel_selector, seed, c.skip_bad_samples, c.duration_tolerance)
        self.members, self.max_open = items.members, c.max_open_streams
        self._open: collections.OrderedDict = collections.OrderedDict()

    def __getstate__(self):  # open files stay in the process that opened them
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def _read(self, m: Member) -> bytes:
        f = self._open.pop(m.tar, None) or open(m.tar, "rb")
        self._open[m.tar] = f
        if self.max_open is not None and len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        f.seek(m.offset)
        data = f.read(m.size)
        if len(data) != m.size:
            raise OSError(f"{m.tar} is shorter than its index says ({m.name})")
        return data

    def __getitem__(self, index: int):
        m = self.members[index]
        if m is None:
            return super().__getitem__(index)
        e = self.entries[index]
        try:
            data = self._read(m)
        except OSError as err:
            if not self.skip_bad:
                raise ValueError(f"bad sample {e.audio_filepath}: {err} (skip_bad_samples=false)") from None
            return BadItem(e.audio_filepath, f"unreadable tar member: {err}")
        from nest_ssl.data.audio import BadSample

        try:
            audio = self.loader.load(e.audio_filepath, e.offset, e.duration, data=data, whole_file=not e.offset_given)
            return self.make_item(index, audio)
        except BadSample as err:
            if not self.skip_bad:
                raise ValueError(f"bad sample {err.path}: {err.reason} (skip_bad_samples=false)") from None
            return BadItem(err.path, err.reason)


def build(c: DatasetConfig, ctx: SourceContext) -> DataLoaderWrapper:
    _note_native_keys(c, ctx.where)
    _expandable_segments(c)
    items = read_inputs(c, ctx.where)
    report = items.report
    if report.bad and not c.skip_bad_samples:
        f = report.bad[0]
        raise ValueError(f"{f.where}: {f.reason} (skip_bad_samples=false)")
    if not items.entries:
        raise ValueError(f"{ctx.where}: no cuts left ({len(report.filtered)} outside [{c.min_duration}, "
                         f"{c.max_duration}] s, {len(report.bad)} bad)")
    noise = []
    if c.noise_manifest:
        noise = read_manifests_keyed(f"{ctx.where}.noise_manifest", c.noise_manifest, report=report,
                                     skip_bad=c.skip_bad_samples, check_files=not c.skip_bad_samples)
    data_seed = resolve_seed(c.seed, ctx.seed, f"{ctx.where}.seed")
    plan = LhotsePlan(c, items, rank=ctx.rank, world_size=ctx.world_size,
                      seed=resolve_seed(c.shard_seed, ctx.seed, f"{ctx.where}.shard_seed"), even=ctx.is_train)
    ds = LhotseAudioNoiseDataset(items, noise, c, data_seed)
    collate = AudioNoiseCollate(ctx.augmentor, c.augment_on_device, data_seed, c.return_sample_id)
    n = len(plan)
    total = n if ctx.is_train and n > 0 else len(plan.global_batches())
    check_batches(n, total, len(items.entries), c, ctx.world_size, ctx.where)
    log.info("%s (lhotse): %d batches per epoch on rank %d (%s)", ctx.where, n, ctx.rank,
             "DynamicBucketingSampler" if c.use_bucketing else "DynamicCutSampler")
    return with_report(DataLoaderWrapper(c, ds, collate, plan, n), report)


def _note_native_keys(c: DatasetConfig, where: str) -> None:
    """NeMo's Lhotse loader drops the native loader's keys with a warning; so does this one (NeMo's NEST YAML
    carries them)."""
    defaults = DatasetConfig()
    set_keys = [k for k in NATIVE_ONLY if getattr(c, k) != getattr(defaults, k)]
    if set_keys:
        log.warning("%s: %s apply to the native loaders, not to use_lhotse (NeMo ignores them too)", where,
                    ", ".join(f"{k}={getattr(c, k)!r}" for k in set_keys))


def _expandable_segments(c: DatasetConfig) -> None:
    """NeMo's Lhotse loader turns on the CUDA allocator's expandable segments (batch shapes vary by bucket)."""
    if c.cuda_expandable_segments and torch.cuda.is_available():
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")

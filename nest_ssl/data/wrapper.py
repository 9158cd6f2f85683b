"""`DataLoaderWrapper`: what every data source (manifest, tarred, Lhotse) hands the trainer.

__iter__ (AudioNoiseBatch), __len__ (batches of the current epoch on this rank: equal on every rank for training; for
validation each rank's own count, every item once over the ranks), set_epoch, state_dict/load_state_dict (resume
with the next unseen batch) and `bad_samples`, the (path, reason) list of skipped items, limited by
`max_bad_samples`. A source with a batch sampler (an object with set_epoch, `start`, __iter__ and __len__) resumes
by index; an iterable source replays its stream up to the resume point.
"""
from __future__ import annotations

import collections
import logging

import torch

from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.dataset import AudioNoiseCollate, BadItem
from nest_ssl.data.manifest import ManifestReport

log = logging.getLogger(__name__)


class TooManyBadSamples(RuntimeError):
    """More bad items were skipped than `max_bad_samples` allows (the one data error that raising it can fix)."""


class DataLoaderWrapper:
    def __init__(self, cfg: DatasetConfig, dataset, collate: AudioNoiseCollate, sampler,
                 num_batches: int, once: bool = False):
        """`once` (tarred validation): the stream is read exactly once, neither re-read nor cut at num_batches."""
        self.cfg, self.dataset, self.collate, self.sampler = cfg, dataset, collate, sampler
        self.num_batches, self.epoch, self.start, self.once = num_batches, 0, 0, once
        self._len = (0, num_batches)  # (epoch, its batch count): the caller planned epoch 0
        self.bad_samples: list[tuple[str, str]] = []  # distinct (path, reason), first-seen order
        self.bad_counts: collections.Counter = collections.Counter()  # path -> times skipped (all epochs)

    def __len__(self) -> int:
        """Batches in the current epoch on this rank. A batch sampler plans each epoch anew (dynamic and bucketed
        batches can number differently from epoch to epoch, equally on every rank); the count is cached per epoch."""
        if self.sampler is None:
            return self.num_batches
        if self._len[0] != self.epoch:
            self.sampler.set_epoch(self.epoch)
            self._len = (self.epoch, len(self.sampler))
        return self._len[1]

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0
        for obj in (self.dataset, self.collate, getattr(self.dataset, "base", None)):
            if obj is not None:
                obj.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _torch_loader(self):
        c = self.cfg
        kw = dict(num_workers=c.num_workers, collate_fn=self.collate, pin_memory=c.pin_memory)
        if c.num_workers > 0:
            kw.update(prefetch_factor=c.prefetch_factor or 2, persistent_workers=False)
        if self.sampler is not None:
            self.sampler.start = self.start
            return torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, **kw)
        return torch.utils.data.DataLoader(self.dataset, batch_size=c.batch_size, **kw)

    def _record_bad(self, bad):
        for b in bad:
            if (b.path, b.reason) not in self.bad_samples:  # a bad file is counted once, not once per epoch
                self.bad_samples.append((b.path, b.reason))
                log.warning("skipping bad sample %s: %s", b.path, b.reason)
            self.bad_counts[b.path] += 1
        if len(self.bad_samples) > self.cfg.max_bad_samples:
            worst = self.bad_counts.most_common(10)
            raise TooManyBadSamples(f"{len(self.bad_samples)} bad samples exceed max_bad_samples="
                               f"{self.cfg.max_bad_samples}; worst files: {worst}")

    def __iter__(self):
        self.set_epoch(self.epoch)
        skip = self.start if self.sampler is None else 0  # the iterable path replays up to the resume point
        passes = 0
        num_batches = len(self)
        while self.start < num_batches or (self.once and passes == 0):
            passes, got = passes + 1, 0
            for batch, bad in self._torch_loader():
                self._record_bad(bad)
                if batch is None:
                    continue
                got += 1
                if skip:
                    skip -= 1
                    continue
                self.start += 1
                yield batch
                if self.start >= num_batches and not self.once:
                    break
            if self.once or self.sampler is not None or got == 0 or passes > 100:
                break  # a tarred stream shorter than num_batches is read again (equal batches on every rank)
        self.epoch, self.start = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "bad_samples": list(self.bad_samples)}

    def load_state_dict(self, sd: dict):
        self.epoch, self.start = int(sd["epoch"]), int(sd["start"])
        self.bad_samples = [tuple(x) for x in sd.get("bad_samples", [])]
        self.bad_counts = collections.Counter(p for p, _ in self.bad_samples)


def check_batches(per_rank: int, total: int, items: int, c: DatasetConfig, world_size: int, where: str) -> None:
    """An epoch without a training batch would loop forever, and an empty validation set would report a loss of
    nothing: both stop here, at start-up, with the numbers that led to them."""
    training = where == "model.train_ds"
    if (per_rank if training else total) > 0:
        return
    size = f"batch_duration={c.batch_duration}" if c.batch_duration is not None else f"batch_size={c.batch_size}"
    cut = f", cut to a multiple of the world size {world_size}" if training and world_size > 1 else ""
    raise ValueError(f"{where}: 0 {'training' if training else 'validation'} batches per epoch"
                     f"{' on each rank' if training and world_size > 1 else ''}: {items} items with {size}, "
                     f"drop_last={c.drop_last} give {total} batch(es){cut}; lower {size.split('=')[0]}, set "
                     f"drop_last: false, or add data{' or use fewer ranks' if world_size > 1 else ''}")


def with_report(loader: DataLoaderWrapper, report: ManifestReport) -> DataLoaderWrapper:
    """Bad manifest lines count as bad samples (skip_bad_samples / max_bad_samples), as bad audio does."""
    loader.manifest_report = report
    if report.bad:
        loader._record_bad([BadItem(f.path or f.where, f"{f.where}: {f.reason}") for f in report.bad])
    return loader

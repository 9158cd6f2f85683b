"""Batch samplers for map-style datasets: fixed batch size or a duration budget, rank-sharded, resumable.

An epoch's batch list is a pure function of (seed, epoch), computed identically on every rank, and rank r takes
batches r, r+W, ... For training (`even=True`) the last batch is filled by wrapping around (unless drop_last) and
the global list is cut to a multiple of world_size, so every rank makes the same number of steps (no DDP hang).
For validation (`even=False`) every item is in exactly one batch on exactly one rank: the last batch may be short
and a rank may get one batch fewer (validation has no collective per batch). `state_dict()` stores (epoch, batches
already yielded); a resumed sampler continues with the next unseen batch.
"""
from __future__ import annotations

import torch


def concat_order(sizes: list[int], temperature: float, probs, g: torch.Generator) -> list[int]:
    """Global indices of concatenated datasets drawn by temperature sampling: p_i ∝ len_i^(1/T) (or `probs`),
    sum(sizes) draws; each dataset is walked in its own permutation, cycling when exhausted."""
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    p = torch.tensor(probs, dtype=torch.float64) if probs else sizes_t ** (1.0 / temperature)
    choice = torch.multinomial(p / p.sum(), int(sizes_t.sum()), replacement=True, generator=g).tolist()
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    perms = [torch.randperm(s, generator=g).tolist() for s in sizes]
    pos = [0] * len(sizes)
    out = []
    for d in choice:
        out.append(starts[d] + perms[d][pos[d] % sizes[d]])
        pos[d] += 1
    return out


class EpochPlan:
    """A batch sampler whose epoch is planned whole: `epoch_batches()` (this rank's batches, a pure function of
    (seed, epoch)); `start` is the resume position within it. Subclasses set epoch, start and seed."""

    def epoch_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __len__(self) -> int:
        return len(self.epoch_batches())

    def __iter__(self):
        yield from self.epoch_batches()[self.start:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, sd: dict):
        self.epoch, self.start = int(sd["epoch"]), int(sd["start"])


class BatchSampler(EpochPlan):
    def __init__(self, durations: list[float | None], batch_size: int, *, shuffle: bool, drop_last: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, batch_duration: float | None = None,
                 num_buckets: int = 30, bucket_buffer_size: int = 10000, concat_sizes: list[int] | None = None,
                 concat_temperature: float = 1.0, concat_probs=None, even: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_duration is not None and any(d is None for d in durations):
            raise ValueError("batch_duration needs a 'duration' for every manifest entry")
        self.durations, self.batch_size, self.shuffle, self.drop_last = durations, batch_size, shuffle, drop_last
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_duration, self.num_buckets, self.buffer = batch_duration, num_buckets, bucket_buffer_size
        self.concat_sizes, self.concat_temperature, self.concat_probs = concat_sizes, concat_temperature, concat_probs
        self.even, self.epoch, self.start = even, 0, 0

    def _order(self, g) -> list[int]:
        n = len(self.durations)
        if self.concat_sizes and len(self.concat_sizes) > 1:
            return concat_order(self.concat_sizes, self.concat_temperature, self.concat_probs, g)
        return torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))

    def _fixed(self, order: list[int]) -> list[list[int]]:
        bs = self.batch_size
        if not self.drop_last and len(order) % bs:
            if not self.even:  # a short last batch: each item once
                return [order[i: i + bs] for i in range(0, len(order), bs)]
            # wrap around, like DistributedSampler's padding (several times over when len(order) < bs)
            order = (order * (bs // len(order) + 2))[: -(-len(order) // bs) * bs]
        return [order[i: i + bs] for i in range(0, len(order) - bs + 1, bs)]

    def _bucketed(self, order: list[int], g) -> list[list[int]]:
        """Within each buffer, sort by duration, split into num_buckets, and fill batches while
        len(batch) * longest <= batch_duration (the padded size bounds memory)."""
        batches = []
        for s in range(0, len(order), self.buffer):
            chunk = sorted(order[s: s + self.buffer], key=lambda i: self.durations[i])
            per = -(-len(chunk) // self.num_buckets)
            for b in range(0, len(chunk), per):
                cur = []
                for i in chunk[b: b + per]:
                    if cur and (len(cur) + 1) * self.durations[i] > self.batch_duration:
                        batches.append(cur)
                        cur = []
                    cur.append(i)
                if cur:
                    batches.append(cur)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def global_batches(self) -> list[list[int]]:
        """Every rank's batches of the current epoch, before the cut to a multiple of world_size."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self._order(g)
        return self._bucketed(order, g) if self.batch_duration else self._fixed(order)

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch (all of them, ignoring the resume position)."""
        batches = self.global_batches()
        usable = len(batches) // self.world_size * self.world_size if self.even else len(batches)
        return batches[self.rank: usable: self.world_size]

"""Tarred datasets (shards `audio_{0..N-1}.tar` + `tarred_audio_manifest.json`), read as NeMo's loaders read them:
the shard format, its split over ranks, streaming and writing (the tarred source, data/tarred_source.py, plans
batches from them).

Shards are expanded from NeMo's brace syntax and split per rank: `replicate` gives every rank all shards;
`scatter` gives rank r a contiguous block, the first N mod W ranks one shard more (NeMo leaves those N mod W
shards unread; we never drop one). Scatter over more ranks than shards is an error naming both counts and the
fixes, except for validation, where a rank past the last shard reads none. Within a rank, shards are split per
DataLoader worker and streamed with `tarfile` (a `pipe:cmd` source is read from the command's stdout). Manifest
entries match tar members by file stem; several entries per stem (offsets) are served in turn; `keep` serves only
entry i with i mod W == rank (replicated validation). Unlike NeMo, which only shuffles shard order, `shuffle_n` is
a sample-level buffer that mixes samples across shard boundaries.
"""
from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import tarfile

import torch

from nest_ssl.data.audio import BadSample
from nest_ssl.data.dataset import AudioNoiseDataset, BadItem
from nest_ssl.data.manifest import ManifestEntry, expand_braces, read_manifests, split_paths

log = logging.getLogger(__name__)


def expand_shards(paths) -> list[str]:
    """A brace pattern, a comma-separated string or a list of them -> the list of shard paths, in order."""
    if isinstance(paths, str):
        return [s for p in split_paths(paths) for s in expand_braces(p)]
    return [s for p in paths for s in expand_braces(p)]


def scatter_blocks(num_shards: int, world_size: int) -> list[range]:
    """Contiguous shard index blocks per rank; the first num_shards % world_size ranks get one shard more."""
    per, extra = divmod(num_shards, world_size)
    starts = [r * per + min(r, extra) for r in range(world_size + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(world_size)]


def rank_shard_indices(num_shards: int, rank: int, world_size: int, strategy: str,
                       allow_empty: bool = False) -> range:
    """Shard indices rank `rank` reads; `allow_empty` (validation) lets scatter leave ranks past the last shard
    without one instead of refusing."""
    if strategy == "replicate":
        return range(num_shards)
    if strategy != "scatter":
        raise ValueError(f"tarred_shard_strategy={strategy!r}; allowed: ('scatter', 'replicate')")
    if world_size > num_shards and not allow_empty:
        raise ValueError(f"tarred_shard_strategy=scatter: {num_shards} shards over world_size={world_size} leave "
                         f"ranks {num_shards}..{world_size - 1} with no shard to read; use tarred_shard_strategy: "
                         f"replicate, or write at least {world_size} shards")
    return scatter_blocks(num_shards, world_size)[rank]


def shard_list(paths, rank: int, world_size: int, strategy: str, allow_empty: bool = False) -> list[str]:
    """The shards (or sharded manifests) rank `rank` reads."""
    shards = expand_shards(paths)
    return [shards[i] for i in rank_shard_indices(len(shards), rank, world_size, strategy, allow_empty)]


def unmeasurable(e: ManifestEntry) -> float:
    """`measure` for tarred manifests: a member cannot be opened before its shard streams, so an entry the duration
    filters need a duration for, and that has none, is a bad line."""
    raise BadSample(e.audio_filepath, "no 'duration' in the tarred manifest; the duration filters / batch_duration "
                                      "need it", "unmeasurable_duration")


def _open_tar(src: str):
    if src.startswith("pipe:"):
        proc = subprocess.Popen(src[5:], shell=True, stdout=subprocess.PIPE)
        return tarfile.open(fileobj=proc.stdout, mode="r|*"), proc
    return tarfile.open(src, mode="r|*"), None


def stem(path: str) -> str:
    """What a manifest entry and a tar member are matched by: the file name without folder and extension."""
    return os.path.splitext(os.path.basename(path))[0]


class ShardError(Exception):
    """A shard that cannot be read to its end: `kind` as check_data reports it, `reason` for the bad-sample log."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def shard_members(shard: str, wanted):
    """(stem, bytes, "shard:member") of each file member whose stem is in `wanted`, streaming the shard (a path or
    a `pipe:` command) once; ShardError when it is missing, truncated or corrupt, or its command fails."""
    if not shard.startswith("pipe:") and not os.path.isfile(shard):
        raise ShardError("no_such_file", "missing shard")
    try:
        tar, proc = _open_tar(shard)
        with tar:
            for m in tar:
                if m.isfile() and stem(m.name) in wanted:
                    yield stem(m.name), tar.extractfile(m).read(), f"{shard}:{m.name}"
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError("unreadable", f"truncated or corrupt shard ({type(e).__name__}: {str(e)[:100]})") from None
    if proc is not None and proc.wait() != 0:
        raise ShardError("unreadable", f"pipe command exited with {proc.returncode}")


class TarredAudioNoiseDataset(torch.utils.data.IterableDataset):
    """Yields AudioNoiseItem / BadItem. `base` (an AudioNoiseDataset over the filtered manifest) supplies entries,
    decoding, padding and noise."""

    def __init__(self, base: AudioNoiseDataset, shards: list[str], shuffle_n: int = 0, seed: int = 0,
                 keep: tuple[int, int] | None = None):
        """`keep=(rank, world_size)`: serve only entries i with i % world_size == rank (replicated validation)."""
        self.base, self.shards, self.shuffle_n, self.seed, self.epoch = base, shards, shuffle_n, seed, 0
        self.by_stem: dict[str, list[int]] = {}
        for i, e in enumerate(base.entries):
            if keep is not None and i % keep[1] != keep[0]:
                continue
            self.by_stem.setdefault(stem(e.audio_filepath), []).append(i)

    def __len__(self) -> int:
        return len(self.base)

    def _samples(self, shard: str):
        try:
            for s, data, name in shard_members(shard, self.by_stem):
                for i in self.by_stem[s]:
                    yield self._item(i, data, name)
        except ShardError as e:
            yield BadItem(shard, e.reason)

    def _item(self, i: int, data: bytes, name: str):
        e = self.base.entries[i]
        try:
            audio = self.base.loader.load(name, e.offset, e.duration, data=data, whole_file=not e.offset_given)
            return self.base.make_item(e.line, audio)
        except BadSample as err:
            if not self.base.skip_bad:
                raise ValueError(f"bad sample {err.path}: {err.reason} (skip_bad_samples=false)") from None
            return BadItem(err.path, err.reason)

    def __iter__(self):
        rng = random.Random(f"{self.seed}-{self.epoch}")
        shards = list(self.shards)
        info = torch.utils.data.get_worker_info()
        if info is not None:  # split before shuffling: a worker's item count is the same every epoch (plan_tarred)
            shards = shards[info.id:: info.num_workers]
            rng = random.Random(f"{self.seed}-{self.epoch}-{info.id}")
        if self.shuffle_n:
            rng.shuffle(shards)
        buf = []
        for shard in shards:
            for x in self._samples(shard):
                if not self.shuffle_n:
                    yield x
                    continue
                buf.append(x)
                if len(buf) >= self.shuffle_n:
                    j = rng.randrange(len(buf))
                    buf[j], buf[-1] = buf[-1], buf[j]
                    yield buf.pop()
        rng.shuffle(buf)
        yield from buf


def write_tarred_dataset(manifest: str, out: str, num_shards: int, shuffle: bool = False, seed: int = 0,
                         min_duration=None, max_duration=None) -> list[str]:
    """manifest -> out/audio_{0..num_shards-1}.tar + out/tarred_audio_manifest.json; returns the tar paths.

    Our layout, read by our loader and NeMo's tarred datasets alike (members are matched to manifest rows by file
    stem, rows carry `shard_id`). It differs from NeMo's `convert_to_tarred_audio_dataset.py`: entries are dealt
    round-robin (NeMo: contiguous blocks), members are named by the file's basename (NeMo: a squashed path),
    every entry is kept (NeMo drops the len % num_shards remainder), and no `metadata.yaml` or
    `sharded_manifests/` is written. Two different files with one stem are refused: a reader could not tell them
    apart.
    """
    entries = read_manifests(manifest, min_duration, max_duration)
    if shuffle:
        random.Random(seed).shuffle(entries)
    if num_shards < 1 or num_shards > len(entries):
        raise ValueError(f"num_shards={num_shards} must be in [1, {len(entries)}]")
    owner: dict[str, str] = {}
    for e in entries:
        s = stem(e.audio_filepath)
        if owner.setdefault(s, e.audio_filepath) != e.audio_filepath:
            raise ValueError(f"{e.where}: {e.audio_filepath} and {owner[s]} share the stem {s!r}; tarred "
                             "members are matched by stem, so rename one")
    os.makedirs(out, exist_ok=True)
    tars = []
    with open(os.path.join(out, "tarred_audio_manifest.json"), "w", encoding="utf-8") as mf:
        for s in range(num_shards):
            path = os.path.join(out, f"audio_{s}.tar")
            tars.append(path)
            seen = set()
            with tarfile.open(path, "w") as tar:
                for e in entries[s::num_shards]:
                    name = os.path.basename(e.audio_filepath)
                    if name not in seen:  # several offsets of one file share one member
                        seen.add(name)
                        tar.add(e.audio_filepath, arcname=name)
                    row = {"audio_filepath": name, "duration": e.duration, "offset": e.offset, "text": e.text,
                           "shard_id": s, **({"label": e.label} if e.label is not None else {})}
                    mf.write(json.dumps(row) + "\n")
    return tars

"""Tarred datasets as NeMo writes them (spec 5.2): shards `audio_{0..N-1}.tar` + `tarred_audio_manifest.json`.

Shards are expanded from NeMo's brace syntax, split per rank (`scatter`: contiguous equal slices, the N mod W
leftover shards unused as in NeMo; `replicate`: all shards), split per DataLoader worker, and streamed with
`tarfile` (a `pipe:cmd` source is read from the command's stdout). Manifest entries match tar members by file
stem; several entries per stem (offsets) are served in turn. Unlike NeMo, which only shuffles shard order,
`shuffle_n` is a sample-level buffer that mixes samples across shard boundaries.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import tarfile

import torch

from nest_ssl.data.audio import BadSample
from nest_ssl.data.dataset import AudioNoiseDataset, BadItem
from nest_ssl.data.manifest import expand_braces, read_manifests, split_paths


def shard_list(paths, rank: int, world_size: int, strategy: str) -> list[str]:
    if isinstance(paths, str):
        shards = [s for p in split_paths(paths) for s in expand_braces(p)]
    else:
        shards = [s for p in paths for s in expand_braces(p)]
    if strategy == "replicate":
        return shards
    if strategy != "scatter":
        raise ValueError(f"tarred_shard_strategy={strategy!r}; allowed: ('scatter', 'replicate')")
    per = len(shards) // world_size
    if per == 0:
        raise ValueError(f"{len(shards)} shards cannot be scattered over world_size={world_size}; use 'replicate'")
    return shards[rank * per: (rank + 1) * per]


def _open_tar(src: str):
    if src.startswith("pipe:"):
        proc = subprocess.Popen(src[5:], shell=True, stdout=subprocess.PIPE)
        return tarfile.open(fileobj=proc.stdout, mode="r|*"), proc
    return tarfile.open(src, mode="r|*"), None


class TarredAudioNoiseDataset(torch.utils.data.IterableDataset):
    """Yields AudioNoiseItem / BadItem. `base` (an AudioNoiseDataset over the filtered manifest) supplies entries,
    decoding, padding and noise."""

    def __init__(self, base: AudioNoiseDataset, shards: list[str], shuffle_n: int = 0, seed: int = 0):
        self.base, self.shards, self.shuffle_n, self.seed, self.epoch = base, shards, shuffle_n, seed, 0
        self.by_stem: dict[str, list[int]] = {}
        for i, e in enumerate(base.entries):
            self.by_stem.setdefault(os.path.splitext(os.path.basename(e.audio_filepath))[0], []).append(i)

    def __len__(self) -> int:
        return len(self.base)

    def _samples(self, shard: str):
        if not shard.startswith("pipe:") and not os.path.isfile(shard):
            yield BadItem(shard, "missing shard")
            return
        try:
            tar, proc = _open_tar(shard)
            with tar:
                for m in tar:
                    idx = self.by_stem.get(os.path.splitext(os.path.basename(m.name))[0]) if m.isfile() else None
                    if not idx:
                        continue
                    data = tar.extractfile(m).read()
                    for i in idx:
                        yield self._item(i, data, f"{shard}:{m.name}")
            if proc is not None and proc.wait() != 0:
                yield BadItem(shard, f"pipe command exited with {proc.returncode}")
        except (tarfile.TarError, OSError, EOFError) as e:
            yield BadItem(shard, f"truncated or corrupt shard ({type(e).__name__}: {str(e)[:100]})")

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
        if self.shuffle_n:
            rng.shuffle(shards)
        info = torch.utils.data.get_worker_info()
        if info is not None:
            shards = shards[info.id:: info.num_workers]
            rng = random.Random(f"{self.seed}-{self.epoch}-{info.id}")
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
    """manifest -> out/audio_{0..num_shards-1}.tar + out/tarred_audio_manifest.json (NeMo's layout: entries dealt
    round-robin to shards, member named by basename, manifest rows carry `shard_id`). Returns the tar paths."""
    entries = read_manifests(manifest, min_duration, max_duration)
    if shuffle:
        random.Random(seed).shuffle(entries)
    if num_shards < 1 or num_shards > len(entries):
        raise ValueError(f"num_shards={num_shards} must be in [1, {len(entries)}]")
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
                           "shard_id": s}
                    mf.write(json.dumps(row) + "\n")
    return tars

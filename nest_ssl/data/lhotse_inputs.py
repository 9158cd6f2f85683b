"""Lhotse inputs -> `LhotseItems`: one `ManifestEntry` per cut, where its audio lives, and its source.

Inputs (NeMo's keys): `manifest_filepath` (NeMo JSON manifests; with `tarred_audio_filepaths`, NeMo tarred
shards), `cuts_path` (a lhotse CutSet manifest), `shar_path` (Lhotse Shar directories, read with lhotse's Shar
reader), `input_cfg` (several of these, each with a `weight`). Only metadata is read here; audio stays where it is.
A tar member (Shar `recording.*.tar`, NeMo shards) is located by a header scan of its tar (`tar_index`), so a
DataLoader worker can read exactly one member by offset: random access, which is what lets every rank plan whole
epochs from metadata and read only its own batches.

A cut nest_ssl cannot read exactly as lhotse would (several audio sources, a MixedCut, a per-cut channel of a
multi-channel recording, an in-memory or URL source) is a start-up error naming it; a missing or unreadable tar
member is a bad item (counted, `max_bad_samples`), as in the native loaders.
"""
from __future__ import annotations

import glob
import logging
import os
import tarfile
from dataclasses import dataclass, field

import yaml

from nest_ssl.data.manifest import BadLine, Finding, ManifestEntry, ManifestReport, duration_filtered, split_paths
from nest_ssl.data.source import read_manifests_keyed
from nest_ssl.data.tarred import expand_shards, stem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """A tar member's bytes: `size` bytes at `offset` of `tar`."""

    tar: str
    offset: int
    size: int
    name: str


@dataclass
class LhotseItems:
    entries: list[ManifestEntry] = field(default_factory=list)
    members: list[Member | None] = field(default_factory=list)  # per entry: its tar member, None for a plain file
    shards: list[int] = field(default_factory=list)  # per entry: its shard (the unit shard-order shuffling moves)
    sources: list[int] = field(default_factory=list)  # per entry: its input_cfg source
    weights: list[float] | None = None  # per source, None: one source or unweighted concatenation
    # NeMo shuffles a Shar directory's shards even with shuffle: false (cutset.py, read_lhotse_manifest:
    # CutSet.from_shar(shuffle_shards=True)); cuts and NeMo tarred shards only with shuffle
    shar_shards_shuffled: bool = False
    report: ManifestReport = field(default_factory=ManifestReport)

    def add(self, entry: ManifestEntry, member: Member | None, shard: int, source: int):
        entry.line = len(self.entries)  # the item id: seeds its noise draw, names it in the batch
        self.entries.append(entry)
        self.members.append(member)
        self.shards.append(shard)
        self.sources.append(source)


def tar_index(path: str) -> dict[str, Member]:
    """Member name -> Member for each file in an uncompressed tar, from its headers only (tarfile seeks over the
    data). A compressed tar cannot be read by offset and is refused."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
        raise ValueError(f"{path} is a compressed tar: its members cannot be read by offset; write it uncompressed "
                         "(Shar and NeMo's tarred datasets are)")
    index = {}
    with tarfile.open(path, mode="r:") as tar:
        for m in tar:
            if m.isfile():
                index[m.name] = Member(path, m.offset_data, m.size, m.name)
    return index


class InputReader:
    """Reads the configured inputs into LhotseItems, applying the duration filter as NeMo's DurationFilter does
    (bounds inclusive) and recording what it drops in the report."""

    def __init__(self, cfg, where: str):
        self.cfg, self.where = cfg, where
        self.items = LhotseItems()
        self.shard_base = 0  # shard numbers are global across sources

    def read(self) -> LhotseItems:
        c = self.cfg
        if c.input_cfg is not None:
            self._input_cfg(c.input_cfg)
        elif c.shar_path is not None:
            self._shar_list(c.shar_path, f"{self.where}.shar_path")
        elif c.cuts_path is not None:
            self._cuts(c.cuts_path, 0, f"{self.where}.cuts_path")
        else:
            self._nemo(c.manifest_filepath, c.tarred_audio_filepaths, 0, self.where)
        kept = len(self.items.entries)
        hours = sum(e.duration for e in self.items.entries) / 3600
        log.info("%s (lhotse): %d cuts (%.2f h) in %d shard(s); %d outside [%s, %s] s, %d bad", self.where, kept,
                 hours, self.shard_base, len(self.items.report.filtered), self.cfg.min_duration,
                 self.cfg.max_duration, len(self.items.report.bad))
        return self.items

    # ---- input kinds ----
    def _input_cfg(self, spec):
        key = f"{self.where}.input_cfg"
        if isinstance(spec, str):
            if not os.path.isfile(spec):
                raise ValueError(f"{key}={spec!r}: no such file")
            with open(spec, encoding="utf-8") as f:
                spec = yaml.safe_load(f)
        if not isinstance(spec, list) or not spec:
            raise ValueError(f"{key}: expected a non-empty list of sources ({{type, ..., weight}}), got {spec!r}")
        weights = []
        for i, src in enumerate(spec):
            where = f"{key}[{i}]"
            if not isinstance(src, dict) or "type" not in src:
                raise ValueError(f"{where}: expected a mapping with a 'type', got {src!r}")
            kind, known = src["type"], {"type", "weight", "manifest_filepath", "tarred_audio_filepaths", "cuts_path",
                                        "shar_path"}
            extra = sorted(set(src) - known)
            if extra:
                raise ValueError(f"{where}: keys {extra} are not supported in an input_cfg source (supported: "
                                 f"{sorted(known)})")
            weights.append(float(src.get("weight", 1.0)))
            if kind == "nemo":
                self._nemo(src.get("manifest_filepath"), None, i, where)
            elif kind == "nemo_tarred":
                self._nemo(src.get("manifest_filepath"), src.get("tarred_audio_filepaths"), i, where, tarred=True)
            elif kind == "lhotse":
                self._cuts(src.get("cuts_path"), i, f"{where}.cuts_path")
            elif kind == "lhotse_shar":
                self._shar_dir(src.get("shar_path"), i, f"{where}.shar_path")
            else:
                raise ValueError(f"{where}.type={kind!r}: supported types are nemo, nemo_tarred, lhotse, lhotse_shar")
            if weights[-1] <= 0:
                raise ValueError(f"{where}.weight={weights[-1]}: must be > 0")
        self.items.weights = weights

    def _shar_list(self, spec, key: str):
        if isinstance(spec, str):
            self.items.shar_shards_shuffled = True
            return self._shar_dir(spec, 0, key)
        if not isinstance(spec, list) or not spec:
            raise ValueError(f"{key}={spec!r}: expected a directory, a list of directories or of [directory, weight]")
        weighted = [isinstance(s, (list, tuple)) for s in spec]
        if any(weighted) and not all(weighted):
            raise ValueError(f"{key}: give every directory a weight or none")
        weights = []
        for i, s in enumerate(spec):
            path, weight = (s[0], float(s[1])) if weighted[i] else (s, 1.0)
            self._shar_dir(path, i, f"{key}[{i}]")
            weights.append(weight)
        self.items.weights = weights if all(weighted) else None

    def _shar_dir(self, path, source: int, key: str):
        from lhotse import CutSet

        if not isinstance(path, str) or not os.path.isdir(path):
            raise ValueError(f"{key}={path!r}: not a Shar directory")
        cut_files = sorted(glob.glob(os.path.join(path, "cuts.*.jsonl*")))
        if not cut_files:
            raise ValueError(f"{key}={path!r}: no cuts.*.jsonl(.gz) shard in this directory (not Lhotse Shar)")
        for cut_file in cut_files:
            number = os.path.basename(cut_file).split(".")[1]
            tar = os.path.join(path, f"recording.{number}.tar")
            index = self._index(tar, cut_file) if os.path.exists(tar) else None
            # lhotse's Shar reader over this shard's cuts only: the audio is read later, by offset
            for cut in CutSet.from_shar(fields={"cuts": [cut_file]}):
                self._cut(cut, f"{cut_file}: cut {cut.id}", source, index)
            self.shard_base += 1

    def _index(self, tar: str, cut_file: str) -> dict[str, Member]:
        """Cut id -> Member of a Shar recording tar (members `<id>.<ext>` + `<id>.json`); empty when the tar is
        unreadable (reported once, and every cut of the shard is then a missing member)."""
        by_name = self._readable_index(tar, cut_file) or {}
        return {os.path.splitext(n)[0]: m for n, m in by_name.items() if not n.endswith(".json")}

    def _cuts(self, path, source: int, key: str):
        from lhotse import CutSet

        if not isinstance(path, str) or not os.path.isfile(path):
            raise ValueError(f"{key}={path!r}: no such cuts manifest")
        for cut in CutSet.from_jsonl_lazy(path):
            self._cut(cut, f"{path}: cut {cut.id}", source, None)
        self.shard_base += 1

    def _cut(self, cut, where: str, source: int, index: dict[str, Member] | None):
        from lhotse import MonoCut

        if not isinstance(cut, MonoCut):
            raise ValueError(f"{where}: a {type(cut).__name__} cannot be read by nest_ssl (MonoCuts only)")
        rec = cut.recording
        if rec is None or len(rec.sources) != 1:
            raise ValueError(f"{where}: needs a recording with exactly one audio source "
                             f"(has {0 if rec is None else len(rec.sources)})")
        if rec.num_channels > 1 and not isinstance(cut.channel, list):
            raise ValueError(f"{where}: selects channel {cut.channel} of a {rec.num_channels}-channel recording; "
                             "per-cut channels are not supported (use channel_selector)")
        src = rec.sources[0]
        whole = cut.start == 0 and abs(cut.duration - rec.duration) < 1e-6
        entry = ManifestEntry(src.source if src.type == "file" else f"{where}", float(cut.duration),
                              float(cut.start), "", 0, where, not whole)
        member = None
        if src.type == "shar":
            if index is None:
                raise ValueError(f"{where}: its audio is in the Shar 'recording' field, and this shard has no "
                                 "recording.*.tar beside its cuts")
            member = index.get(cut.id)
            if member is None:
                self.items.report.bad.append(Finding(where, None, "missing_member", "no audio member for this cut "
                                                     "in the shard's recording tar"))
                return
            entry.audio_filepath = f"{member.tar}:{member.name}"
        elif src.type != "file":
            raise ValueError(f"{where}: audio source type {src.type!r} is not supported (file or Shar)")
        self._add(entry, member, self.shard_base, source)

    def _nemo(self, manifests, tars, source: int, where: str, tarred: bool = False):
        c = self.cfg
        key = f"{where}.manifest_filepath"
        if not manifests:
            raise ValueError(f"{key} is not set")
        if tarred and not tars:
            raise ValueError(f"{where}.tarred_audio_filepaths is not set (type nemo_tarred)")
        report = self.items.report
        measure = None if tars else self._measure()
        entries = read_manifests_keyed(key, split_paths(manifests) if not tars else expand_shards(manifests),
                                       c.min_duration, c.max_duration, report=report, skip_bad=c.skip_bad_samples,
                                       measure=measure, check_files=not (c.skip_bad_samples or tars))
        if not tars:
            for e in entries:
                self._add(e, None, self.shard_base, source)
            self.shard_base += 1
            return
        self._nemo_tarred(entries, expand_shards(tars), manifests, source, f"{where}.tarred_audio_filepaths")

    def _nemo_tarred(self, entries, shards: list[str], manifests, source: int, key: str):
        """NeMo tarred rows find their shard by `shard_id`, or, with one manifest per shard (NeMo's sharded
        manifests), by the manifest they are in; members are matched by file stem, as the native tarred loader
        does."""
        per_manifest = len(expand_shards(manifests))
        for e in entries:
            if e.duration is None:
                raise ValueError(f"{e.where}: no 'duration' (needed for batching; a tar member cannot be measured "
                                 "before it is read)")
        indexes: dict[int, dict[str, Member] | None] = {}
        for e in entries:
            shard = e.shard_id
            if shard is None and per_manifest == len(shards):
                shard = self._manifest_number(e.where, manifests)
            if shard is None or not 0 <= shard < len(shards):
                raise ValueError(f"{e.where}: no shard for this row ({key} lists {len(shards)} shards): give rows a "
                                 "shard_id or one manifest per shard")
            if shard not in indexes:
                indexes[shard] = self._stem_index(shards[shard], e.where)
            member = (indexes[shard] or {}).get(stem(e.audio_filepath))
            if member is None:
                if indexes[shard] is not None:  # a whole unreadable shard is reported once, in _stem_index
                    self.items.report.bad.append(Finding(e.where, e.audio_filepath, "missing_member",
                                                         f"not in shard {shards[shard]}"))
                continue
            e.audio_filepath = f"{member.tar}:{member.name}"
            self._add(e, member, self.shard_base + shard, source)
        self.shard_base += len(shards)

    def _manifest_number(self, where: str, manifests) -> int | None:
        path = where.rsplit(":", 1)[0]
        names = expand_shards(manifests)
        return names.index(path) if path in names else None

    def _stem_index(self, tar: str, where: str) -> dict[str, Member] | None:
        by_name = self._readable_index(tar, where)
        return None if by_name is None else {stem(n): m for n, m in by_name.items()}

    def _readable_index(self, tar: str, where: str) -> dict[str, Member] | None:
        """tar_index(tar), or None after reporting the shard as one unreadable bad item at `where`."""
        try:
            return tar_index(tar)
        except (tarfile.TarError, OSError, EOFError) as e:
            self.items.report.bad.append(Finding(where, tar, "unreadable", f"shard {tar}: {type(e).__name__}: "
                                                 f"{str(e)[:100]}"))
            return None

    def _measure(self):
        from nest_ssl.data.audio import measure_duration

        return measure_duration  # plain NeMo rows without a duration are measured, as the native loader does

    def _add(self, e: ManifestEntry, member: Member | None, shard: int, source: int):
        """Keep e unless the duration filter drops it; with bucket_batch_size, a cut longer than the last bin has no
        bucket (NeMo's BucketingFilter drops it too)."""
        c, report = self.cfg, self.items.report
        if duration_filtered(e, c.min_duration, c.max_duration, report):
            return
        last = c.bucket_duration_bins[-1] if c.bucket_batch_size is not None else None
        if last is not None and e.duration > last:
            report.filtered.append(Finding(e.where, e.audio_filepath, "too_long",
                                           f"{e.duration} s > the last bucket_duration_bins edge {last}"))
            return
        self.items.add(e, member, shard, source)


def read_inputs(cfg, where: str) -> LhotseItems:
    """LhotseItems of a validated `use_lhotse` DatasetConfig; ImportError naming the extra without lhotse."""
    require_lhotse(where)
    try:
        return InputReader(cfg, where).read()
    except BadLine as e:
        raise ValueError(f"{where}: {e}") from e


def require_lhotse(where: str) -> None:
    try:
        import lhotse  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{where}.use_lhotse=true needs the lhotse package: pip install 'nest_ssl[lhotse]' "
                          f"({e})") from None

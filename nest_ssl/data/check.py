"""Check a dataset line by line, as the training loader would read it: the logic of `scripts/check_data.py`.

Every manifest line ends up in exactly one place: trained on (counted in the totals), an error (one entry with its
`manifest:line`, path, kind and reason), or filtered by the duration bounds (counted and listed). Warnings
(`all_zero` audio, a `missing_duration` that was measured) describe lines that are still trained on. The kinds
and reasons are those of `nest_ssl.data.manifest` (lines) and `nest_ssl.data.audio` (files), which the loader
uses too, so what this reports is what training would skip.

Lhotse inputs (`check_lhotse`: a cuts manifest, Shar directories, any `use_lhotse` section) are located by
`lhotse_inputs.read_inputs`, as the Lhotse loader locates them (its `missing_member` and shard `unreadable` findings
included), and each item is decoded as `LhotseAudioNoiseDataset` decodes it: a file by path, a tar member by
offset. A cut is reported at `cuts_file:line` (its line in its cuts manifest; JSON rows also carry `cut`, its id).
"""
from __future__ import annotations

import collections
import glob
import gzip
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor

import soundfile as sf

from nest_ssl.data.audio import AudioLoader, BadSample, file_info, measure_duration
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.lhotse_inputs import Member, read_inputs
from nest_ssl.data.manifest import Finding, ManifestEntry, ManifestReport, read_manifests
from nest_ssl.data.tarred import ShardError, shard_list, shard_members, stem, unmeasurable

WARNING_KINDS = ("all_zero", "missing_duration")


def _job(e: ManifestEntry, tolerance):
    return e.where, e.audio_filepath, e.offset, e.duration, not e.offset_given, tolerance


def _inspect(job) -> tuple:
    """(where, path, sample_rate, seconds, kind, reason): kind None for a clean line, "all_zero" for silence."""
    where, path, offset, duration, whole_file, tolerance = job
    try:
        sr = file_info(path).samplerate
        x = AudioLoader(sr, None, tolerance).load(path, offset, duration, whole_file=whole_file)
    except BadSample as e:
        return where, path, None, 0.0, e.kind, e.reason
    return _result(where, path, sr, x)


def _result(where, path, sr, x) -> tuple:
    if not bool(x.abs().max() > 0):
        return where, path, sr, x.shape[0] / sr, "all_zero", "all samples are zero (silence; trained on)"
    return where, path, sr, x.shape[0] / sr, None, None


def _inspect_tarred(entries: list[ManifestEntry], shards: list[str], tolerance) -> list[tuple]:
    """Stream every shard once; entries are matched to members by file stem, as TarredAudioNoiseDataset does."""
    by_stem, seen, out = collections.defaultdict(list), set(), []
    for e in entries:
        by_stem[stem(e.audio_filepath)].append(e)
    for shard in shards:
        try:
            for s, data, name in shard_members(shard, by_stem):
                for e in by_stem[s]:
                    seen.add(e.where)
                    out.append(_member(e, data, name, tolerance))
        except ShardError as err:
            out.append((shard, shard, None, 0.0, err.kind, err.reason))
    out += [(e.where, e.audio_filepath, None, 0.0, "not_in_shards", "no member of that name in any shard")
            for e in entries if e.where not in seen]
    return out


def _member(e: ManifestEntry, data: bytes, name: str, tolerance) -> tuple:
    try:
        sr = sf.info(io.BytesIO(data)).samplerate
        x = AudioLoader(sr, None, tolerance).load(name, e.offset, e.duration, data=data, whole_file=not e.offset_given)
    except (RuntimeError, sf.LibsndfileError, ValueError) as err:
        return e.where, name, None, 0.0, "unreadable", f"unreadable or unknown audio format ({err})"
    except BadSample as err:
        return e.where, name, None, 0.0, err.kind, err.reason
    return _result(e.where, name, sr, x)


def _entry(f: Finding, severity: str) -> dict:
    manifest, _, line = f.where.rpartition(":")
    return {"manifest": manifest or f.where, "line": int(line) if line.isdigit() else None, "path": f.path,
            "kind": f.kind, "severity": severity, "reason": f.reason}


def _position(x: dict) -> tuple:
    return x["manifest"], x["line"] or 0


def check(manifest, tarred=None, min_duration: float | None = None, max_duration: float | None = None,
          tolerance: float | None = 0.1, workers: int = 2) -> dict:
    """The report: totals over the lines that would be trained on, and errors / warnings / filtered entries."""
    rep = ManifestReport()
    measure = measure_duration
    if tarred:  # as the loader: only the duration filters need a duration, and a member cannot be measured
        measure = unmeasurable if min_duration is not None or max_duration is not None else None
    entries = read_manifests(manifest, min_duration, max_duration, report=rep, skip_bad=True, measure=measure)
    if tarred:
        results = _inspect_tarred(entries, shard_list(tarred, 0, 1, "replicate"), tolerance)
    else:
        results = _pool_map(_inspect, [_job(e, tolerance) for e in entries], workers)
    return _summary(rep, results)


def _pool_map(fn, jobs: list, workers: int) -> list:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs, chunksize=8))


def _summary(rep: ManifestReport, results: list[tuple]) -> dict:
    errors = [_entry(f, "error") for f in rep.bad]
    warnings = [_entry(f, "warning") for f in rep.measured]
    for where, path, _, _, kind, reason in results:
        if kind is not None:
            (warnings if kind in WARNING_KINDS else errors).append(_entry(Finding(where, path, kind, reason),
                                                                          "warning" if kind in WARNING_KINDS
                                                                          else "error"))
    errors.sort(key=_position)
    warnings.sort(key=_position)
    good = [r for r in results if r[4] is None or r[4] in WARNING_KINDS]
    counts = collections.Counter(x["kind"] for x in errors + warnings)
    counts.update(f.kind for f in rep.filtered)
    return {"utterances": len(good), "hours": sum(r[3] for r in good) / 3600,
            "sample_rates": dict(collections.Counter(r[2] for r in good)), "errors": errors, "warnings": warnings,
            "filtered": [_entry(f, "filtered") for f in rep.filtered], "counts": dict(counts)}


def check_lhotse(cfg: DatasetConfig, workers: int = 2, where: str = "check_data") -> dict:
    """The report for a `use_lhotse` DatasetConfig (cuts_path, shar_path, input_cfg, NeMo manifests or tarred
    shards), in check()'s shape: items located as the Lhotse loader locates them, each decoded as it decodes them."""
    items = read_inputs(cfg.validate(where), where)
    tol = cfg.duration_tolerance
    jobs = [(e.where, e.audio_filepath, m, e.offset, e.duration, not e.offset_given, tol)
            for e, m in zip(items.entries, items.members)]
    results = _pool_map(_inspect_lhotse, jobs, workers)
    lines = CutLines()
    rep = ManifestReport(*([Finding(lines.where(f.where), f.path, f.kind, f.reason) for f in found]
                           for found in (items.report.bad, items.report.measured, items.report.filtered)))
    out = _summary(rep, [(lines.where(r[0]) if r[4] is not None else r[0], *r[1:]) for r in results])
    for x in out["errors"] + out["warnings"] + out["filtered"]:
        cut = lines.cut(x["manifest"], x["line"])
        if cut is not None:
            x["cut"] = cut
    return out


def _inspect_lhotse(job) -> tuple:
    where, path, member, offset, duration, whole_file, tolerance = job
    if member is None:
        return _inspect((where, path, offset, duration, whole_file, tolerance))
    try:
        data = _member_bytes(member)
    except OSError as err:  # LhotseAudioNoiseDataset's "unreadable tar member"
        return where, path, None, 0.0, "unreadable", f"unreadable tar member: {err}"
    e = ManifestEntry(path, duration, offset, where=where, offset_given=not whole_file)
    return _member(e, data, path, tolerance)


def _member_bytes(m: Member) -> bytes:
    """A tar member's bytes read by offset, as LhotseAudioNoiseDataset._read reads them (without its open-file
    cache, which lives in the dataset's workers)."""
    with open(m.tar, "rb") as f:
        f.seek(m.offset)
        data = f.read(m.size)
    if len(data) != m.size:
        raise OSError(f"{m.tar} is shorter than its index says ({m.name})")
    return data


class CutLines:
    """read_inputs names a cut `<cuts file>: cut <id>`; reports name it `<cuts file>:<line>`, the line of the first
    row with that id (lhotse's jsonl reader reads one cut per line), so that a cut is found as a manifest line is.
    A cuts file is read again only when one of its cuts is reported."""

    def __init__(self):
        self.lines: dict[str, dict[str, int]] = {}  # cuts file -> cut id -> line
        self.cuts: dict[str, str] = {}  # "<cuts file>:<line>" -> cut id

    def _ids(self, path: str) -> dict[str, int]:
        if path not in self.lines:
            from lhotse.serialization import open_best

            ids: dict[str, int] = {}
            with open_best(path, "r") as f:
                for n, row in enumerate(f, 1):
                    ids.setdefault(str(json.loads(row)["id"]), n)
            self.lines[path] = ids
        return self.lines[path]

    def where(self, where: str) -> str:
        path, sep, cut = where.partition(": cut ")
        if not sep:
            return where
        line = self._ids(path).get(cut)
        assert line is not None, f"{where}: lhotse read a cut id that is not in its file"
        self.cuts[f"{path}:{line}"] = cut
        return f"{path}:{line}"

    def cut(self, path: str, line: int | None) -> str | None:
        return self.cuts.get(f"{path}:{line}")


def lhotse_kind(path: str) -> str | None:
    """What a path given as data is, without guessing: "shar" for a directory holding Shar cut shards
    (`cuts.*.jsonl*`); "cuts" for a JSON-lines file (plain or gzip) whose first non-blank row is a lhotse cut (an
    object without `audio_filepath` whose "type" ends in "Cut", or with "id" and "recording"); None otherwise (a
    NeMo manifest, or something that is neither: its own reader reports that)."""
    if os.path.isdir(path):
        return "shar" if glob.glob(os.path.join(path, "cuts.*.jsonl*")) else None
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        packed = f.read(2) == b"\x1f\x8b"
    with (gzip.open if packed else open)(path, "rt", encoding="utf-8", errors="replace") as f:
        first = next((row for row in f if row.strip()), "")
    try:
        row = json.loads(first)
    except ValueError:
        return None
    if not isinstance(row, dict) or "audio_filepath" in row or "audio_filename" in row:
        return None
    cut = str(row.get("type", "")).endswith("Cut") or {"id", "recording"} <= row.keys()
    return "cuts" if cut else None


def format_report(rep: dict) -> str:
    lines = [f"{rep['utterances']} utterances, {rep['hours']:.3f} h, sample rates {rep['sample_rates']} "
             f"(lines that would be trained on)",
             f"{len(rep['errors'])} errors, {len(rep['warnings'])} warnings, {len(rep['filtered'])} filtered by "
             f"duration; by kind: {rep['counts']}"]
    for x in rep["errors"] + rep["warnings"] + rep["filtered"]:
        at = f"{x['manifest']}:{x['line']}" if x["line"] is not None else x["manifest"]
        name = x["path"] or (f"cut {x['cut']}" if "cut" in x else "")
        lines.append(f"{x['severity'].upper()} {at} [{x['kind']}] {name}: {x['reason']}")
    return "\n".join(lines)

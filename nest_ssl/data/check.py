"""Check a dataset line by line, as the training loader would read it: the logic of `scripts/check_data.py`.

Every manifest line ends up in exactly one place: trained on (counted in the totals), an error (one entry with its
`manifest:line`, path, kind and reason), or filtered by the duration bounds (counted and listed). Warnings
(`all_zero` audio, a `missing_duration` that was measured) describe lines that are still trained on. The kinds
and reasons are those of `nest_ssl.data.manifest` (lines) and `nest_ssl.data.audio` (files), which the loader
uses too, so what this reports is what training would skip.
"""
from __future__ import annotations

import collections
import io
from concurrent.futures import ProcessPoolExecutor

import soundfile as sf

from nest_ssl.data.audio import AudioLoader, BadSample, file_info, measure_duration
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
        jobs = [_job(e, tolerance) for e in entries]
        if workers <= 1:
            results = [_inspect(j) for j in jobs]
        else:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(_inspect, jobs, chunksize=8))
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


def format_report(rep: dict) -> str:
    lines = [f"{rep['utterances']} utterances, {rep['hours']:.3f} h, sample rates {rep['sample_rates']} "
             f"(lines that would be trained on)",
             f"{len(rep['errors'])} errors, {len(rep['warnings'])} warnings, {len(rep['filtered'])} filtered by "
             f"duration; by kind: {rep['counts']}"]
    for x in rep["errors"] + rep["warnings"] + rep["filtered"]:
        at = f"{x['manifest']}:{x['line']}" if x["line"] is not None else x["manifest"]
        lines.append(f"{x['severity'].upper()} {at} [{x['kind']}] {x['path'] or ''}: {x['reason']}")
    return "\n".join(lines)

"""JSON-lines manifests: parsing, relative paths, duration filter, brace expansion of path lists.

Each entry becomes a `ManifestEntry`. Relative `audio_filepath`s are joined with the manifest's folder when
that file exists (NeMo's rule), except for tarred manifests where the path is only a member name.

A line that cannot be an entry (invalid JSON, not an object, no `audio_filepath`, a `duration`/`offset` that is not
a finite number >= 0) raises `BadLine` naming file, line number and reason, or, when `read_manifests` is given a
`ManifestReport` with `skip_bad=True`, is recorded there and skipped. An entry without `duration` is measured
(`measure`) before the duration filters apply; filtered entries are counted in the report, never dropped unseen.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class ManifestEntry:
    audio_filepath: str
    duration: float | None = None
    offset: float = 0.0
    text: str = ""
    line: int = 0  # global line index across all manifests (NeMo's item id)
    where: str = ""  # "manifest:lineno", for reports
    offset_given: bool = False  # False: the entry describes the whole file (its duration must match the file's)
    shard_id: int | None = None  # tarred manifests: the shard holding this entry
    label: str | None = None  # utterance class (classification manifests); None when the line has none


class BadLine(ValueError):
    """A manifest line that is not a usable entry; .where ("file:line"), .kind, .reason."""

    def __init__(self, where: str, kind: str, reason: str, path: str | None = None):
        super().__init__(f"{where}: {reason}")
        self.where, self.kind, self.reason, self.path = where, kind, reason, path


@dataclass
class Finding:
    """One reported line: where ("manifest:line"), audio path (may be None), kind, reason."""

    where: str
    path: str | None
    kind: str
    reason: str


@dataclass
class ManifestReport:
    """What read_manifests saw besides the kept entries: bad lines, entries measured, entries filtered out."""

    bad: list[Finding] = field(default_factory=list)
    measured: list[Finding] = field(default_factory=list)
    filtered: list[Finding] = field(default_factory=list)


def split_paths(paths) -> list[str]:
    """A comma-separated string or a list of strings -> list of non-empty stripped paths."""
    if paths is None:
        return []
    if isinstance(paths, str):
        return [p.strip() for p in paths.split(",") if p.strip()]
    if isinstance(paths, (list, tuple)):
        out = []
        for p in paths:
            out += split_paths(p)
        return out
    raise ValueError(f"manifest path must be a string or a list of strings, got {type(paths).__name__}: {paths!r}")


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """NeMo's brace syntax: `(`,`[`,`<`,`_OP_` -> `{` and `)`,`]`,`>`,`_CL_` -> `}`, then bash-style expansion of
    `{a,b}` and `{0..9}` (zero padding kept when the bounds are zero-padded)."""
    for a in ("(", "[", "<", "_OP_"):
        pattern = pattern.replace(a, "{")
    for b in (")", "]", ">", "_CL_"):
        pattern = pattern.replace(b, "}")
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        step = 1 if hi >= lo else -1
        width = len(lo_s) if lo_s.startswith("0") and len(lo_s) > 1 else 0
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        choices = body.split(",")
    out = []
    for c in choices:
        out += expand_braces(head + c + tail)
    return out


def _is_tarred_manifest(path: str) -> bool:
    return "/sharded_manifests/" in path or os.path.basename(path) == "tarred_audio_manifest.json"


def _number(d: dict, key: str, where: str, path: str):
    """d[key] as a finite float >= 0, None when absent/null; BadLine otherwise."""
    v = d.get(key)
    if v is None:
        return None
    x = None
    if not isinstance(v, bool) and isinstance(v, (int, float, str)):
        try:
            x = float(v)
        except ValueError:
            pass
    if x is None:
        raise BadLine(where, f"bad_{key}", f"'{key}' is {v!r}, not a number", path)
    if not math.isfinite(x) or x < 0:
        raise BadLine(where, f"bad_{key}", f"'{key}' is {v!r}; it must be a finite number >= 0", path)
    return x


def parse_line(line: str, where: str, manifest_dir: str, resolve: bool, idx: int) -> ManifestEntry:
    line = line.rstrip("\r\n")
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(where, "invalid_json", f"invalid JSON: {e.msg} (column {e.colno}) in {line[:200]!r}") from None
    if not isinstance(d, dict):
        raise BadLine(where, "not_an_object", f"expected a JSON object, got {line[:200]!r}")
    path = d.get("audio_filepath", d.get("audio_filename"))
    if not isinstance(path, str) or not path:
        raise BadLine(where, "missing_audio_filepath", f"missing 'audio_filepath' in {line[:200]!r}")
    if resolve and not os.path.isabs(path):
        joined = os.path.join(manifest_dir, path)
        if os.path.exists(joined):
            path = joined
    dur, off = _number(d, "duration", where, path), _number(d, "offset", where, path)
    shard = d.get("shard_id")
    shard = shard if isinstance(shard, int) and not isinstance(shard, bool) else None
    label = None if d.get("label") is None else str(d["label"])
    return ManifestEntry(path, dur, off or 0.0, str(d.get("text", "")), idx, where, "offset" in d, shard, label)


def read_manifests(paths, min_duration: float | None = None, max_duration: float | None = None,
                   max_utts: int = 0, *, report: ManifestReport | None = None, skip_bad: bool = False,
                   measure: Callable[[ManifestEntry], float] | None = None,
                   check_files: bool = False) -> list[ManifestEntry]:
    """All entries of all manifests, duration-filtered (bounds inclusive).

    A bad line raises BadLine unless `skip_bad` (then it goes to `report.bad`). `check_files`: each entry's audio
    must exist and be a non-empty file (one stat per entry), so that with skip_bad_samples=false a missing file
    stops the run at start-up rather than at its first batch. `measure(entry) -> seconds` fills a
    missing duration before the filters (raising audio.BadSample for an unusable file); without it such an entry
    is never filtered. Filtered entries go to `report.filtered`.
    """
    files = split_paths(paths)
    if not files:
        raise ValueError(f"manifest_filepath={paths!r}: no manifest given")
    report = report if report is not None else ManifestReport()
    entries, n_filtered, idx = [], len(report.filtered), 0
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"manifest {f!r} does not exist")
        resolve, before = not _is_tarred_manifest(f), idx
        with open(f, encoding="utf-8", errors="surrogateescape") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{lineno}"
                measured = report.measured
                e = _entry(line, where, os.path.dirname(os.path.abspath(f)), resolve, idx, report, skip_bad, measure,
                           check_files)
                idx += 1
                if e is None:
                    continue
                if duration_filtered(e, min_duration, max_duration, report):
                    if measured and measured[-1].where == where:  # reported once: as filtered (measured)
                        report.filtered[-1].reason += " (measured: no 'duration' in the manifest)"
                        measured.pop()
                else:
                    entries.append(e)
                if max_utts and len(entries) >= max_utts:
                    break
        if idx == before:
            log.warning("manifest %s is empty", f)
    hours = sum(e.duration or 0.0 for e in entries) / 3600
    log.info("manifests %s: kept %d items (%.2f h); %d outside [%s, %s] s, %d bad lines", files, len(entries), hours,
             len(report.filtered) - n_filtered, min_duration, max_duration, len(report.bad))
    return entries


def _entry(line, where, manifest_dir, resolve, idx, report, skip_bad, measure, check_files) -> ManifestEntry | None:
    from nest_ssl.data.audio import BadSample, check_file

    try:
        e = parse_line(line, where, manifest_dir, resolve, idx)
        if check_files:
            check_file(e.audio_filepath)
        if e.duration is None and measure is not None:
            e.duration = measure(e)
            report.measured.append(Finding(where, e.audio_filepath, "missing_duration",
                                           f"no 'duration' in the manifest; measured {e.duration:.3f} s"))
        return e
    except BadLine as err:
        if not skip_bad:
            raise
        report.bad.append(Finding(where, err.path, err.kind, err.reason))
    except BadSample as err:
        if not skip_bad:
            raise ValueError(f"{where}: {err.path}: {err.reason} (skip_bad_samples=false)") from None
        report.bad.append(Finding(where, err.path, err.kind, err.reason))
    return None


def duration_filtered(e: ManifestEntry, lo: float | None, hi: float | None, report: ManifestReport) -> bool:
    if e.duration is not None and lo is not None and e.duration < lo:
        report.filtered.append(Finding(e.where, e.audio_filepath, "too_short", f"{e.duration} s < min_duration {lo}"))
        return True
    if e.duration is not None and hi is not None and e.duration > hi:
        report.filtered.append(Finding(e.where, e.audio_filepath, "too_long", f"{e.duration} s > max_duration {hi}"))
        return True
    return False

"""JSON-lines manifests: parsing, relative paths, duration filter, brace expansion of path lists.

Each entry becomes a `ManifestEntry`. Relative `audio_filepath`s are joined with the manifest's folder when
that file exists (NeMo's rule), except for tarred manifests where the path is only a member name.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class ManifestEntry:
    audio_filepath: str
    duration: float | None = None
    offset: float = 0.0
    text: str = ""
    line: int = 0  # global line index across all manifests (NeMo's item id)


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


def parse_line(line: str, where: str, manifest_dir: str, resolve: bool, idx: int) -> ManifestEntry:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg}): {line[:200]!r}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {line[:200]!r}")
    path = d.get("audio_filepath", d.get("audio_filename"))
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: missing 'audio_filepath' in {line[:200]!r}")
    if resolve and not os.path.isabs(path):
        joined = os.path.join(manifest_dir, path)
        if os.path.exists(joined):
            path = joined
    dur = d.get("duration")
    return ManifestEntry(path, None if dur is None else float(dur), float(d.get("offset") or 0.0),
                         str(d.get("text", "")), idx)


def read_manifests(paths, min_duration: float | None = None, max_duration: float | None = None,
                   max_utts: int = 0) -> list[ManifestEntry]:
    """All entries of all manifests, duration-filtered (bounds inclusive; duration None never filtered)."""
    files = split_paths(paths)
    if not files:
        raise ValueError(f"manifest_filepath={paths!r}: no manifest given")
    entries, dropped_short, dropped_long, idx = [], 0, 0, 0
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"manifest {f!r} does not exist")
        resolve, before = not _is_tarred_manifest(f), idx
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                e = parse_line(line, f"{f}:{lineno}", os.path.dirname(os.path.abspath(f)), resolve, idx)
                idx += 1
                if e.duration is not None and min_duration is not None and e.duration < min_duration:
                    dropped_short += 1
                elif e.duration is not None and max_duration is not None and e.duration > max_duration:
                    dropped_long += 1
                else:
                    entries.append(e)
                if max_utts and len(entries) >= max_utts:
                    break
        if idx == before:
            log.warning("manifest %s is empty", f)
    hours = sum(e.duration or 0.0 for e in entries) / 3600
    log.info("manifests %s: kept %d items (%.2f h), dropped %d shorter than %s s and %d longer than %s s",
             files, len(entries), hours, dropped_short, min_duration, dropped_long, max_duration)
    return entries

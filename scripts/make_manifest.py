"""Build a JSON-lines manifest from a folder of audio files: one {"audio_filepath", "duration", "text": ""} per file.

    python scripts/make_manifest.py AUDIO_DIR OUT.json [--ext wav,flac] [--relative] [--workers 2]

Every file is decoded in full (the training loader's own reader), so `duration` is the decoded length: a truncated
file whose header promises more gets what it really holds. Unreadable, empty or NaN files are listed on stderr with
check_data.py's kind and reason (`SKIPPED path [empty]: empty file (0 bytes)`) and left out; the manifest of the
good ones is still written. Exit status: 0 every file is in the manifest, 1 some were skipped (or none was found), 2
bad arguments.
"""
import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nest_ssl import cli  # noqa: E402
from nest_ssl.data.audio import AudioLoader, BadSample, file_info  # noqa: E402


def decoded_duration(path: str) -> tuple[str, float | None, str | None, str | None]:
    """(path, seconds decoded, None, None) or (path, None, kind, reason): the kinds and reasons of check_data.py
    and the training loader (nest_ssl.data.audio.BAD_KINDS), from the same reader."""
    try:
        sr = file_info(path).samplerate
        samples = AudioLoader(sr).load(path).shape[0]  # at the file's own rate: no resampling
    except BadSample as e:
        return path, None, e.kind, e.reason
    return path, samples / sr, None, None


def audio_files(folder: str, exts) -> list[str]:
    exts = {e.lower().lstrip(".") for e in exts}
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                  if f.rsplit(".", 1)[-1].lower() in exts)


def make_manifest(folder: str, out: str, exts=("wav", "flac"), relative: bool = False,
                  workers: int = 1) -> tuple[int, list[tuple[str, str, str]]]:
    """Write the manifest of every readable file under `folder`; returns (entries written, [(bad path, kind,
    reason)])."""
    paths = audio_files(folder, exts)
    if workers > 1 and len(paths) > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(decoded_duration, paths, chunksize=16))
    else:
        results = [decoded_duration(p) for p in paths]
    base = os.path.dirname(os.path.abspath(out))
    rows, bad = [], []
    for p, seconds, kind, reason in results:
        if kind is not None:
            bad.append((p, kind, reason))
            continue
        path = os.path.relpath(p, base) if relative else os.path.abspath(p)
        rows.append({"audio_filepath": path, "duration": seconds, "text": ""})
    rows.sort(key=lambda r: r["audio_filepath"])
    with open(out, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return len(rows), bad


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="searched recursively")
    ap.add_argument("out", help="manifest to write (JSON lines)")
    ap.add_argument("--ext", default="wav,flac", help="comma-separated file extensions (default wav,flac)")
    ap.add_argument("--relative", action="store_true", help="paths relative to the manifest's folder")
    ap.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.folder):
        ap.error(f"{a.folder} is not a directory")
    return cli.run(lambda: write(a), a.debug)


def write(a) -> int:
    n, bad = make_manifest(a.folder, a.out, tuple(a.ext.split(",")), a.relative, a.workers)
    for path, kind, reason in bad:
        print(f"SKIPPED {path} [{kind}]: {reason}", file=sys.stderr)
    print(f"wrote {n} entries to {a.out}" + (f"; skipped {len(bad)} unusable file(s), listed above" if bad else ""))
    if n == 0 and not bad:
        print(f"no .{' / .'.join(a.ext.split(','))} files under {a.folder}", file=sys.stderr)
    return 1 if bad or n == 0 else 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a JSON-lines manifest from a folder of audio files: one {"audio_filepath", "duration", "text": ""} per file.

    python scripts/make_manifest.py AUDIO_DIR OUT.json [--ext wav,flac] [--relative]
"""
import argparse
import json
import os
import sys

import soundfile as sf


def make_manifest(folder: str, out: str, exts=("wav", "flac"), relative: bool = False) -> int:
    rows = []
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            if f.rsplit(".", 1)[-1].lower() in exts:
                p = os.path.join(root, f)
                info = sf.info(p)
                path = os.path.relpath(p, os.path.dirname(os.path.abspath(out))) if relative else os.path.abspath(p)
                rows.append({"audio_filepath": path, "duration": info.frames / info.samplerate, "text": ""})
    rows.sort(key=lambda r: r["audio_filepath"])
    with open(out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return len(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("out")
    ap.add_argument("--ext", default="wav,flac")
    ap.add_argument("--relative", action="store_true", help="paths relative to the manifest's folder")
    a = ap.parse_args(argv)
    n = make_manifest(a.folder, a.out, tuple(a.ext.split(",")), a.relative)
    print(f"wrote {n} entries to {a.out}")


if __name__ == "__main__":
    sys.exit(main())

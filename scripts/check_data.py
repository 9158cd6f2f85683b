"""Read every item of a dataset once and report counts, hours, sample rates and every bad item.

    python scripts/check_data.py --config CFG.yaml --section model.train_ds [model.train_ds.manifest_filepath=M ...]
    python scripts/check_data.py --manifest a.json,b.json [--tarred 'dir/audio__OP_0..7_CL_.tar'] [--json]
Exit status 1 when any item is bad.
"""
import argparse
import collections
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nest_ssl.data.audio import AudioLoader, BadSample  # noqa: E402
from nest_ssl.data.manifest import read_manifests  # noqa: E402
from nest_ssl.data.tarred import shard_list  # noqa: E402


def _check_file(args):
    path, offset, duration = args
    try:
        sr = sf.info(path).samplerate
        x = AudioLoader(sr).load(path, offset, duration)
        return path, sr, x.shape[0] / sr, None
    except BadSample as e:
        return path, None, 0.0, e.reason
    except Exception as e:  # noqa: BLE001 - report anything, never crash the whole check
        return path, None, 0.0, f"{type(e).__name__}: {e}"


def _check_tarred(entries, shards):
    import io
    import tarfile
    stems = collections.defaultdict(list)
    for e in entries:
        stems[os.path.splitext(os.path.basename(e.audio_filepath))[0]].append(e)
    for shard in shards:
        if not os.path.isfile(shard):
            yield shard, None, 0.0, "missing shard"
            continue
        try:
            with tarfile.open(shard, "r|*") as tar:
                for m in tar:
                    for e in stems.get(os.path.splitext(os.path.basename(m.name))[0], []) if m.isfile() else []:
                        data = tar.extractfile(m).read()
                        name = f"{shard}:{m.name}"
                        try:
                            sr = sf.info(io.BytesIO(data)).samplerate
                            x = AudioLoader(sr).load(name, e.offset, e.duration, data=data)
                            yield name, sr, x.shape[0] / sr, None
                        except (BadSample, RuntimeError) as err:
                            yield name, None, 0.0, getattr(err, "reason", str(err))
        except (tarfile.TarError, OSError, EOFError) as err:
            yield shard, None, 0.0, f"truncated or corrupt shard ({type(err).__name__})"


def check(manifest, tarred=None, workers: int = 2, progress: bool = True) -> dict:
    entries = read_manifests(manifest)
    if tarred:
        results = list(_check_tarred(entries, shard_list(tarred, 0, 1, "replicate")))
    else:
        jobs = [(e.audio_filepath, e.offset, e.duration) for e in entries]
        with ProcessPoolExecutor(max(1, workers)) as pool:
            results = []
            for i, r in enumerate(pool.map(_check_file, jobs, chunksize=8)):
                results.append(r)
                if progress and (i + 1) % 50 == 0:
                    print(f"\r{i + 1}/{len(jobs)}", end="", file=sys.stderr)
    good = [r for r in results if r[3] is None]
    return {"utterances": len(good), "hours": sum(r[2] for r in good) / 3600,
            "sample_rates": dict(collections.Counter(r[1] for r in good)),
            "bad": [{"path": r[0], "reason": r[3]} for r in results if r[3] is not None]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--section", default="model.train_ds")
    ap.add_argument("--manifest")
    ap.add_argument("--tarred")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for --config (model.train_ds.manifest_filepath=M)")
    a = ap.parse_args(argv)
    manifest, tarred = a.manifest, a.tarred
    if a.config:
        from nest_ssl.config import apply_overrides, load_yaml, resolve  # YAML with ${} interpolation + overrides
        sec = resolve(apply_overrides(load_yaml(a.config), a.overrides))
        for k in a.section.split("."):
            sec = sec[k]
        manifest = sec["manifest_filepath"]
        tarred = sec.get("tarred_audio_filepaths") if sec.get("is_tarred") else None
    if not manifest:
        ap.error("give --config or --manifest")
    rep = check(manifest, tarred, a.workers, progress=not a.json)
    if a.json:
        print(json.dumps(rep))
    else:
        print(f"\n{rep['utterances']} utterances, {rep['hours']:.3f} h, sample rates {rep['sample_rates']}")
        for b in rep["bad"]:
            print(f"BAD {b['path']}: {b['reason']}")
    return 1 if rep["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Write tarred shards from a manifest: OUT/audio_{0..N-1}.tar + OUT/tarred_audio_manifest.json.

Each manifest line gets `audio_filepath` = the member name inside its tar (the file's basename) and `shard_id`;
stems must be unique, as readers match members to entries by stem. Every entry is kept.

This is our layout, not a copy of NeMo's `convert_to_tarred_audio_dataset.py`, which deals contiguous blocks of
entries to shards, names members by a squashed path, drops the len % num_shards remainder and also writes
`metadata.yaml` and `sharded_manifests/`. Here entries are dealt round-robin, named by basename, none is dropped,
and only the tars and `tarred_audio_manifest.json` are written. Both our loader and NeMo's read the result.

    python scripts/make_tarred_dataset.py --manifest M.json --out DIR --num_shards 8 [--shuffle --seed 0]
Read back with is_tarred: true, tarred_audio_filepaths: DIR/audio__OP_0..7_CL_.tar,
manifest_filepath: DIR/tarred_audio_manifest.json.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nest_ssl import cli  # noqa: E402
from nest_ssl.data.tarred import write_tarred_dataset  # noqa: E402


def main(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num_shards", type=int, default=8)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min_duration", type=float)
    ap.add_argument("--max_duration", type=float)
    a = ap.parse_args(argv)
    return cli.run(lambda: write(a), a.debug)


def write(a) -> int:
    tars = write_tarred_dataset(a.manifest, a.out, a.num_shards, a.shuffle, a.seed, a.min_duration, a.max_duration)
    print(f"wrote {len(tars)} shards to {a.out} (tarred_audio_filepaths: {a.out}/audio__OP_0..{len(tars) - 1}_CL_.tar)")


if __name__ == "__main__":
    sys.exit(main())

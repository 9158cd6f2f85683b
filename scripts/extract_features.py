"""Per-utterance encoder features for downstream tasks, from a manifest and a pretrained checkpoint.

    python scripts/extract_features.py model.nemo --manifest test.json --out feats/ --layers 0,5,-1 --batch-size 16

Writes `<out>/<stem>.npz` per utterance (keys `layer_<i>`, `final`; each (T', d_model) float32), or with `--format
npy` `<out>/<layer>/<stem>.npy`, and `<out>/features_manifest.json`: each input line plus its feature path(s),
written when the run ends (a temp file renamed). An utterance whose audio cannot be read is skipped and listed on
stderr and in `<out>/features_failed.json` (each input line plus `kind` and `reason`), and the exit status is 1; the
manifest then lists only the utterances that have features. `--layers`: comma-separated encoder layer indices
(0-based), -1 or `final` for the encoder output.
The checkpoint may be a `.nemo`, a NeMo Lightning `.ckpt` or one of our training checkpoints. Runs on the GPU if
there is one (`--device` to choose); progress goes to stderr.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nest_ssl import cli  # noqa: E402


def main(argv=None) -> int:
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help=".nemo, NeMo .ckpt or our training checkpoint")
    p.add_argument("--manifest", required=True, help="NeMo JSON-lines manifest (audio_filepath, duration, offset)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", default="-1", help="e.g. 0,5,-1 (-1 / final = encoder output)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--format", choices=("npz", "npy"), default="npz")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    return cli.run(lambda: extract(args), args.debug)


def extract(args) -> int:
    from nest_ssl import export, features

    model = export.load_pretrained(args.checkpoint)
    out, failed = features.extract_features(model, args.manifest, args.out, args.layers, args.batch_size,
                                            args.format, args.device)
    for row in failed:
        print(f"SKIPPED {row['audio_filepath']} [{row['kind']}]: {row['reason']}", file=sys.stderr)
    print(f"wrote {out}" + (f"; {len(failed)} utterance(s) failed, listed above and in {out.parent / features.FAILED}"
                            if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

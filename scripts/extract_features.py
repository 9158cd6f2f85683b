"""Per-utterance encoder features for downstream tasks, from a manifest and a pretrained checkpoint.

    python scripts/extract_features.py model.nemo --manifest test.json --out feats/ --layers 0,5,-1 --batch-size 16

Writes `<out>/<stem>.npz` per utterance (keys `layer_<i>`, `final`; each (T', d_model) float32), or with
`--format npy` `<out>/<layer>/<stem>.npy`, and `<out>/features_manifest.json`: each input line plus its feature
path(s). `--layers`: comma-separated encoder layer indices (0-based), -1 or `final` for the encoder output.
The checkpoint may be a `.nemo`, a NeMo Lightning `.ckpt` or one of our training checkpoints. Runs on the GPU if
there is one (`--device` to choose); progress goes to stderr.
"""
import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help=".nemo, NeMo .ckpt or our training checkpoint")
    p.add_argument("--manifest", required=True, help="NeMo JSON-lines manifest (audio_filepath, duration, offset)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", default="-1", help="e.g. 0,5,-1 (-1 / final = encoder output)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--format", choices=("npz", "npy"), default="npz")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)

    from nest_ssl import export, features

    try:
        model = export.load_pretrained(args.checkpoint)
        out = features.extract_features(model, args.manifest, args.out, args.layers, args.batch_size, args.format,
                                        args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Parameters, FLOPs per audio-second, memory per GPU and wall-clock of a NEST config, before launching it.

    python scripts/estimate.py configs/nest_fast-conformer.yaml trainer.precision=bf16 --hours 60000 --gpus 64
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nest_ssl import cli  # noqa: E402
from nest_ssl.estimate import estimate, format_report  # noqa: E402
from nest_ssl.run_config import load_config  # noqa: E402


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. trainer.precision=bf16")
    ap.add_argument("--hours", type=float, default=1000.0, help="hours of audio per epoch (default 1000)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--gpus", type=int, default=None, help="default: trainer.devices x trainer.num_nodes")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation (default 0.4)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU peak (H100/H200 dense bf16: 989)")
    ap.add_argument("--seconds", type=float, default=None, help="utterance length (default train_ds.max_duration)")
    args = ap.parse_args(argv)
    return cli.run(lambda: report(args), args.debug)


def report(args) -> int:
    plain, run = load_config(args.config, args.overrides)
    e = estimate(plain, run, hours=args.hours, gpus=args.gpus, mfu=args.mfu, peak_tflops=args.peak_tflops,
                 seconds=args.seconds, epochs=args.epochs)
    print(format_report(e, Path(args.config).stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())

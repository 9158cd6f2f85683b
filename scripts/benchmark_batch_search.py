"""The memory model behind `scripts/batch_search.py --device cpu` against measured CPU training steps.

    python scripts/benchmark_batch_search.py                      # NEST-L's YAML at d_model 256, 4 layers
    python scripts/benchmark_batch_search.py --config configs/nest_tiny_cpu.yaml --points 2x4,4x8 --glibc-default

Each point (batch x seconds) runs one fp32 forward + loss + backward in a fresh process and measures its peak two
ways: the tensors alive at once (nest_ssl/memory.py's PeakMemory plus parameters and buffers: what
torch.cuda.max_memory_allocated counts on a GPU), and the growth of the process's peak RSS (with glibc's mmap
threshold pinned, so freed blocks leave the process; --glibc-default adds a column with glibc's own policy). The
optimizer state, which a first step does not allocate, is added to both sides from the accounting. Printed as a
markdown table with the machine.
"""
import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nest_ssl import cli  # noqa: E402
from nest_ssl.batch_search import validate  # noqa: E402
from nest_ssl.memory import REDUCED  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None,
                    help="default: configs/nest_fast-conformer_l.yaml with the overrides of nest_ssl.memory.REDUCED")
    ap.add_argument("--override", action="append", default=[], help="extra config override (model.encoder.x=y)")
    ap.add_argument("--points", default="2x4,4x8,8x8,4x16", help="batch x seconds, comma-separated")
    ap.add_argument("--glibc-default", action="store_true", help="also peak RSS under glibc's default malloc")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def parse_points(text: str) -> list[tuple[int, float]]:
    try:
        points = [(int(b), float(s)) for b, s in (p.split("x") for p in text.split(","))]
    except ValueError:
        raise ValueError(f"--points={text!r}: give batch x seconds pairs, e.g. 2x4,4x8") from None
    if any(b < 1 or not s > 0 for b, s in points):
        raise ValueError(f"--points={text!r}: batch >= 1 and seconds > 0")
    return points


def mib_and_ratio(row: dict, key: str) -> tuple[str, str]:
    """(MiB, measured / model), or n/a where the step did not raise the process's peak RSS."""
    if row[key] is None:
        return "n/a", "n/a"
    return f"{row[key] / MiB:.1f}", f"{row[key] / row['model']:.3f}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def bench(args) -> int:
    points = parse_points(args.points)
    config, overrides = (args.config, args.override) if args.config else \
        (str(ROOT / "configs" / "nest_fast-conformer_l.yaml"), [*REDUCED, *args.override])
    rows = validate(config, overrides, points, args.glibc_default)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}"
    print(f"{' '.join([Path(config).stem, *overrides])}; fp32, one process per point; {machine}")
    glibc = " RSS glibc default MiB | ratio |" if args.glibc_default else ""
    print(f"| batch x s | model MiB | tensor peak MiB | ratio | peak RSS MiB | ratio |{glibc} act. ratio |")
    print("|---|---|---|---|---|---|" + ("---|---|" if glibc else "") + "---|")
    for r in rows:
        cells = [f"{r['batch']} x {r['seconds']:g}", f"{r['model'] / MiB:.1f}", *mib_and_ratio(r, "tensor_peak"),
                 *mib_and_ratio(r, "rss_peak"), *(mib_and_ratio(r, "rss_peak_glibc") if glibc else ()),
                 f"{r['activation_ratio']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    ratios = [r["tensor_peak"] / r["model"] for r in rows]
    print(f"measured / model (tensor peak): {min(ratios):.3f} .. {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark the whole NEST training step (eager vs Triton kernels): `make bench-train`.

    python scripts/benchmark_train.py                                   # NEST-L, 20 s utterances, bf16, GPU
    python scripts/benchmark_train.py --config configs/nest_tiny_cpu.yaml --device cpu --dtype fp32 --batch 2 \\
        --seconds 4 --modes eager
    python scripts/benchmark_train.py --real model.train_ds.manifest_filepath=train.json \\
        model.train_ds.noise_manifest=noise.json                       # the config's own loader: data wait
Rows go to kernels/results/train.csv. --profile prints the top kernels by time.
"""
import argparse
import sys

import torch

from nest_ssl import cli
from nest_ssl.benchmark import DTYPES, append_rows, build, run_mode
from nest_ssl.fit_scan import fit_scan


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/nest_fast-conformer.yaml")
    ap.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. model.encoder.n_layers=4")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--modes", default="eager,triton", help="comma list of eager, triton, eager+compile, "
                    "triton+compile (+compile = trainer.compile: every encoder layer torch.compiled)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--csv", default="kernels/results/train.csv")
    ap.add_argument("--real", action="store_true", help="batches from the config's model.train_ds loader "
                    "(--batch/--seconds are then ignored; the row reports the mean batch and utterance length)")
    ap.add_argument("--scan", action="store_true", help="check that the batch fits, then exit")
    ap.add_argument("--profile", action="store_true", help="print the top 15 kernels of one step per mode")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args, ap), args.debug)


def bench(args, ap) -> int:
    device = torch.device(args.device)
    if args.scan:
        _, run, model, _ = build(args.config, args.overrides, "eager", device)  # trainer.fit_scan's check
        print(fit_scan(model, (args.batch, args.seconds), run.model.sample_rate, DTYPES[args.dtype], device))
        return 0
    rows = []
    for mode in args.modes.split(","):
        if mode.startswith("triton") and device.type != "cuda":  # asked for the kernels: fail, never fall back
            ap.error(f"--modes {mode} needs a CUDA GPU (the Triton kernels run on CUDA); drop it on CPU")
        row = run_mode(args.config, args.overrides, mode, args.batch, args.seconds, args.dtype, args.steps,
                       args.warmup, device, real=args.real)
        rows.append(row)
        print(" ".join(f"{k}={row[k]}" for k in ("mode", "step_ms", "audio_s_per_s", "mfu", "peak_mem_gb")))
        if args.profile:
            with torch.profiler.profile() as prof:
                run_mode(args.config, args.overrides, mode, args.batch, args.seconds, args.dtype, 1, 0, device)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=15))
    base = next((r for r in rows if r["mode"] == "eager"), None)
    for r in rows:
        if base is not None and r is not base:
            print(f"{r['mode']} / eager: {r['audio_s_per_s'] / base['audio_s_per_s']:.2f}x throughput, "
                  f"{r['peak_mem_gb'] / base['peak_mem_gb']:.2f}x peak memory")
    append_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

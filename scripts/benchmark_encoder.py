#!/usr/bin/env python
"""Encoder forward+backward throughput (audio-seconds per second) for a config, batch and duration, CPU or GPU.

    python scripts/benchmark_encoder.py --config configs/nest_fast-conformer.yaml --batch 8 --seconds 20
    # the encoder row of README's paired NeMo comparison: NEST YAML reduced to d256/4 heads/4 layers
    OMP_NUM_THREADS=2 python scripts/benchmark_encoder.py --config configs/nest_fast-conformer.yaml \\
        model.encoder.d_model=256 model.encoder.n_heads=4 model.encoder.n_layers=4 --device cpu --dtype fp32 \\
        --batch 4 --seconds 8
Compare eager vs Triton with --attention-impl / --conv-impl (torch | triton).
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch

from nest_ssl import cli
from nest_ssl.nemo_compat import instantiate
from nest_ssl.run_config import load_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/nest_fast-conformer.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=list(DTYPES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attention-impl", default="torch", choices=["auto", "torch", "triton"])
    ap.add_argument("--conv-impl", default="torch", choices=["auto", "torch", "triton"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def bench(args) -> int:
    plain, _ = load_config(args.config, [*args.overrides, f"++model.encoder.attention_impl={args.attention_impl}",
                                         f"++model.encoder.conv_impl={args.conv_impl}"])
    device = torch.device(args.device)
    enc = instantiate(plain["model"]["encoder"], "model.encoder").to(device).train()
    frames = -(-int(args.seconds * 100) // 16) * 16  # 10 ms hop, padded to 16 as the preprocessor does
    x = torch.randn(args.batch, enc.cfg.feat_in, frames, device=device)
    lengths = torch.full((args.batch,), frames, dtype=torch.long, device=device)
    amp = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out, _ = enc(x, lengths)
        out.float().square().mean().backward()
        enc.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    calls = enc.kernel_calls()
    for kind, impl in (("attention", args.attention_impl), ("conv", args.conv_impl)):
        if impl == "triton" and calls[kind] == 0:  # explicit triton: the figure must be the kernel's
            raise RuntimeError(f"--{kind}-impl triton: the kernel never ran ({calls})")
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"config": args.config, "overrides": args.overrides, "batch": args.batch, "seconds": args.seconds,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": args.dtype, "attention_impl": args.attention_impl,
              "conv_impl": args.conv_impl,
              "kernels": {k: impl for k, (impl, _) in enc.kernel_impls.items()}, "step_ms": round(step * 1e3, 1),
              "audio_s_per_s": round(args.batch * args.seconds / step, 1), "peak_mem_gb": round(peak, 3)}
    print(json.dumps(result) if args.json else
          f"encoder fwd+bwd: {result['audio_s_per_s']} audio-s/s ({result['step_ms']} ms/step, batch {args.batch} x "
          f"{args.seconds} s, {args.dtype}, {result['device']}, peak {result['peak_mem_gb']} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

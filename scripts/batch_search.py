"""Per-bucket batch sizes for NeMo's Lhotse bucketing (model.train_ds.bucket_duration_bins / bucket_batch_size): the
largest batch of each bucket's longest utterances whose training step fits the memory budget (NeMo's OOMptimizer).

    python scripts/batch_search.py configs/nest_fast-conformer.yaml trainer.precision=bf16 --bins 2.5,5,10,20
    python scripts/batch_search.py configs/nest_fast-conformer.yaml --device cpu --memory 80 --num-buckets 8

--device cuda (the default where CUDA is available) measures: one real training step per try (forward + loss +
backward under the trainer.precision autocast, on synthetic audio of exactly the bin's length), its peak
torch.cuda.max_memory_allocated plus the optimizer state (and DDP's buckets with several GPUs) that a first step does
not allocate; running out of memory means "does not fit". --device cpu runs nothing: nest_ssl/estimate.py's memory
model (scripts/benchmark_batch_search.py compares it with measured CPU steps).
Each bucket's batch is searched by doubling then bisection, bounded by the previous bucket's, so the sizes never
increase. The last two lines are the YAML to paste under model.train_ds.
"""
import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nest_ssl import batch_search as bs  # noqa: E402
from nest_ssl import cli  # noqa: E402
from nest_ssl.estimate import config_gpus  # noqa: E402


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. trainer.precision=bf16")
    ap.add_argument("--bins", default=None, help="bucket upper edges in seconds, ascending, e.g. 2.5,5,10,20 "
                    "(default: model.train_ds.bucket_duration_bins, else --num-buckets)")
    ap.add_argument("--num-buckets", type=int, default=None,
                    help="without bins: N equal-width bins numpy.linspace(max(min_duration, 0), max_duration, N+1)[1:] "
                         "(NeMo's provisional rule), the last bin being max_duration itself so the longest utterance "
                         "has a bucket (default model.train_ds.num_buckets)")
    ap.add_argument("--memory", type=float, default=None,
                    help="GiB per GPU (default on cuda: the device's total; required with --device cpu)")
    ap.add_argument("--margin", type=float, default=0.1,
                    help="fraction of --memory kept free (CUDA context, fragmentation; default 0.1)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="cuda: measure real steps; cpu: the memory model, nothing runs (default: cuda if available)")
    ap.add_argument("--world-size", type=int, default=None,
                    help="GPUs in the run, for DDP's gradient buckets (default trainer.devices x trainer.num_nodes)")
    ap.add_argument("--max-batch", type=int, default=4096, help="largest batch tried (default 4096)")
    args = ap.parse_intermixed_args(argv)  # overrides and options in any order
    return cli.run(lambda: report(args), args.debug)


def budget(args, device: torch.device) -> tuple[int, str]:
    """(bytes, how they were chosen)."""
    if not 0 <= args.margin < 1:
        raise ValueError(f"--margin={args.margin}; a fraction in [0, 1)")
    if args.memory is not None and not args.memory > 0:
        raise ValueError(f"--memory={args.memory}; GiB, must be > 0")
    if args.memory is None and device.type != "cuda":
        raise ValueError("--memory GiB is required with --device cpu (the GPU's memory, e.g. --memory 80 for an H100)")
    total = args.memory * bs.GiB if args.memory is not None else torch.cuda.get_device_properties(device).total_memory
    src = f"--memory {args.memory:g} GiB" if args.memory is not None else "the device's total"
    return int(total * (1 - args.margin)), f"{src} less --margin {args.margin:.0%}"


def report(args) -> int:
    plain, run, found = bs.load_config(args.config, args.overrides)
    bins, bins_from = bs.choose_bins(args.bins, found, run.model.train_ds, args.num_buckets)
    if args.max_batch < 1:
        raise ValueError(f"--max-batch={args.max_batch}; must be >= 1")
    if args.world_size is not None and args.world_size < 1:
        raise ValueError(f"--world-size={args.world_size}; must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here; use --device cpu --memory GiB (the memory model)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpus, gpus_from = (args.world_size, "--world-size") if args.world_size else config_gpus(run.trainer)
    limit, limit_from = budget(args, device)
    tc, optim = run.trainer, run.model.optim.name
    if device.type == "cuda":
        from nest_ssl.train import precision_setup

        est = bs.EstimatedMemory(plain["model"], tc.precision, optim, gpus)  # the bytes a first step leaves out
        extra = est.persistent["optimizer"] + est.persistent["ddp_buckets"]
        memory = bs.MeasuredMemory(bs.training_model(plain, run, device), device,
                                   precision_setup(tc.precision, device)[0], run.model.sample_rate, extra)
        method = f"measured on {torch.cuda.get_device_name(device)}"
    else:
        memory = bs.EstimatedMemory(plain["model"], tc.precision, optim, gpus)
        method = "estimated from the memory model (estimate.py), not measured"
    memory = functools.lru_cache(maxsize=None)(memory)  # the table reuses the search's figures

    def fits(batch: int, seconds: float) -> bool:
        used = memory(batch, seconds)
        return used is not None and used <= limit

    sizes = bs.search(fits, bins, args.max_batch, limit / bs.GiB)
    print(f"{Path(args.config).stem}: precision {tc.precision}, {optim}, {gpus} GPU(s) ({gpus_from}); "
          f"bins from {bins_from}")
    print(f"budget {limit / bs.GiB:.2f} GiB per GPU ({limit_from}); {method}")
    if found.get("bucket_batch_size") is not None:
        print(f"the config's model.train_ds.bucket_batch_size: {found['bucket_batch_size']}")
    for note in notes(tc, device):
        print(f"note: {note}")
    print(bs.format_table(bins, sizes, [memory(b, s) / bs.GiB for b, s in zip(sizes, bins)],
                          device.type == "cuda", args.max_batch))
    print(bs.yaml_lines(bins, sizes))
    return 0


def notes(tc, device: torch.device) -> list[str]:
    """What the figures leave out, for this config and method."""
    out = []
    if device.type != "cuda":
        out.append("the model leaves out the CUDA context (~0.5 GiB), fragmentation, autocast's fp32 temporaries and "
                   "backward's transient buffers (measured on CPU: +4-26%, README); --margin covers them")
        if tc.activation_checkpointing != "none":
            out.append(f"trainer.activation_checkpointing={tc.activation_checkpointing} is not in the memory model: "
                       "the batch sizes are lower bounds; measure with --device cuda")
    if str(tc.strategy).startswith("fsdp"):
        out.append("trainer.strategy=fsdp shards the weights and optimizer state; the search counts them whole (lower "
                   "bounds)")
    if tc.compile:
        out.append("trainer.compile=true: the search runs the eager layers")
    return out


if __name__ == "__main__":
    sys.exit(main())

"""Per-rank memory of a NEST training step on CPU gloo processes: ddp vs fsdp, with and without activation
checkpointing, and the decoder head's peak with full log-probs vs the chunked loss.

    python scripts/benchmark_memory.py                       # 2 and 4 processes, the reduced NEST-L config
    python scripts/benchmark_memory.py --worlds 2 --seconds 4 --batch 2
    python scripts/benchmark_memory.py --head-frames 6000    # NEST-L head only: 8 x 60 s utterances

Counts tensor storages (nest_ssl/memory.py): parameters, gradients and AdamW state per rank, activations saved for
backward per audio-second, and the in-step peak (activations, gradients, FSDP's gathered layers, temporaries).
"""
import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

from nest_ssl import cli

MiB = 2**20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,4", help="process counts (gloo, CPU)")
    ap.add_argument("--seconds", type=float, default=4.0, help="utterance length")
    ap.add_argument("--batch", type=int, default=2, help="utterances per rank")
    ap.add_argument("--override", action="append", default=[], help="extra config override (model.encoder.x=y)")
    ap.add_argument("--head-frames", type=int, default=0, help="only the head comparison, at this many frames")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def bench(args) -> int:

    import torch.multiprocessing as mp

    from nest_ssl import memory

    if args.head_frames:
        r = memory.head_peak_ratio(args.head_frames)
        print(f"head + loss, d_model 512, 8192 classes, {r['frames']} frames: full {r['full'] / MiB:.0f} MiB, "
              f"chunked {r['chunked'] / MiB:.0f} MiB, ratio {r['ratio']:.3f}")
        return 0
    variants = [(s, c) for s in ("ddp", "fsdp") for c in ("none", "full")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        for world in (int(w) for w in args.worlds.split(",")):
            mp.spawn(memory.measure_worker, nprocs=world, join=True,
                     args=(world, _port(), args.override, args.seconds, args.batch, variants, str(out)))
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(f"d_model {rows[0]['d_model']}, {rows[0]['n_layers']} layers, {rows[0]['batch_per_rank']} x "
          f"{rows[0]['utt_seconds']:g} s per rank, fp32, MiB per rank")
    print("| processes | strategy | act. ckpt | params | grads | AdamW | frozen+buffers | saved act. / audio-s | "
          "fwd+bwd peak | total peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world_size']} | {r['strategy']} | {r['activation_checkpointing']} | {r['params'] / MiB:.1f} | "
              f"{r['grads'] / MiB:.1f} | {r['optimizer'] / MiB:.1f} | {r['frozen_and_buffers'] / MiB:.1f} | "
              f"{r['saved_activations_per_audio_s'] / MiB:.2f} | {r['fwd_bwd_peak'] / MiB:.1f} | "
              f"{r['total_peak'] / MiB:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

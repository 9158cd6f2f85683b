"""Score a pretrained encoder with a frozen-encoder probe (SUPERB style): CTC characters (CER/WER) or classification.

    python scripts/probe.py model.nemo --train-manifest train.json --eval-manifest test.json [--task ctc]
    python scripts/probe.py --demo [--checkpoint CKPT]    # synthetic labelled corpus; random init vs the make demo run

Manifests are NeMo's JSON lines: `audio_filepath`, `duration`, `text` (task ctc) or `label` (task classification).
Tarred sets: `--train-tarred 'shards/audio__OP_0..7_CL_.tar'` with the tarred manifest as --train-manifest.
The checkpoint may be a `.nemo`, a NeMo Lightning `.ckpt` or one of our training checkpoints.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nest_ssl import cli  # noqa: E402


def main(argv=None) -> int:
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", help=".nemo, NeMo .ckpt or our checkpoint (with --demo: optional)")
    p.add_argument("--demo", action="store_true", help="synthetic corpus; random init vs --checkpoint / make demo's")
    p.add_argument("--demo-dir", default="demo_out/probe", help="where --demo writes its corpus")
    p.add_argument("--demo-runs", default="demo_out/experiments", help="where --demo looks for make demo's model")
    p.add_argument("--train-manifest")
    p.add_argument("--eval-manifest")
    p.add_argument("--train-tarred", default=None)
    p.add_argument("--eval-tarred", default=None)
    p.add_argument("--task", default="ctc", help="ctc | classification")
    p.add_argument("--labels", default=None, help="characters (ctc) or comma-separated classes; default: from data")
    p.add_argument("--layers", default="all", help="'all' or hidden-state indices: 0 subsampling, i layer i-1")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if not args.demo and not (args.checkpoint and args.train_manifest and args.eval_manifest):
        p.error("give CHECKPOINT, --train-manifest and --eval-manifest (or --demo)")
    return cli.run(lambda: run_demo(args) if args.demo else run(args), args.debug)


def run_demo(args) -> int:
    from nest_ssl import probe
    from nest_ssl.run_config import load_config

    ckpt = args.checkpoint or probe.find_demo_checkpoint(args.demo_runs)
    if ckpt is None:
        print(f"note: no checkpoint under {args.demo_runs} (run `make demo` first); random init only", file=sys.stderr)
    plain, _ = load_config(Path(__file__).resolve().parent.parent / "configs" / "nest_tiny_cpu.yaml")
    rows = probe.demo(args.demo_dir, ckpt, plain["model"], seed=args.seed, steps=args.steps,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    return 0


def run(args) -> int:
    import torch

    from nest_ssl import probe
    from nest_ssl.export import load_pretrained

    labels = None
    if args.labels is not None:
        labels = args.labels.split(",") if args.task == "classification" else list(args.labels)
    cfg = probe.ProbeConfig(task=args.task, train_manifest=args.train_manifest, eval_manifest=args.eval_manifest,
                            train_tarred_audio_filepaths=args.train_tarred,
                            eval_tarred_audio_filepaths=args.eval_tarred, labels=labels, layers=args.layers,
                            steps=args.steps, batch_size=args.batch_size, hidden=args.hidden, lr=args.lr,
                            seed=args.seed)
    model = load_pretrained(args.checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
    result = probe.run_probe(model, cfg)
    print(json.dumps(result, indent=1) if args.json else format_rows([{"encoder": args.checkpoint, "task": args.task,
                                                                       **result}]))
    return 0


def format_rows(rows) -> str:
    """A table whose encoder column is as wide as its longest path: a path is never cut."""
    width = max([len("encoder"), *(len(str(r["encoder"])) for r in rows)])
    lines = [f"{'encoder':<{width}} {'task':<15} score               layer weights"]
    for r in rows:
        score = (f"CER {r['probe_cer']:.3f} WER {r['probe_wer']:.3f}" if "probe_cer" in r
                 else f"acc {r['probe_acc']:.3f}")
        weights = " ".join(f"{w:.2f}" for w in r["layer_weights"])
        lines.append(f"{str(r['encoder']):<{width}} {r['task']:<15} {score:<19} {weights}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Export a pretrained encoder (optionally with its preprocessor) to torch.export (.pt2) or ONNX, and verify it.

    python scripts/export.py run/checkpoints/SSL-NEST-FastConformer.nemo --out encoder.pt2 --verify 5
    python scripts/export.py model.nemo --out encoder_with_frontend.pt2 --with-preprocessor --device cuda
    python scripts/export.py model.nemo --out encoder.onnx --format onnx      # needs: pip install 'nest_ssl[onnx]'
    python scripts/export.py model.nemo --out model_copy.nemo --format nemo   # re-save as a NeMo-loadable .nemo
    python scripts/export.py nemo_run-last.ckpt --out run/checkpoints/x-last.ckpt --format ckpt  # continue a NeMo run
    python scripts/export.py run/checkpoints/x-last.dcp --out x.nemo --format nemo  # a sharded (fsdp) checkpoint
    python scripts/export.py run/checkpoints/x-last.dcp --out x.ckpt --format ckpt  # sharded -> one file
    python scripts/export.py model.nemo --out enc_hf/ --format hf --verify 3  # transformers' ParakeetEncoder

The checkpoint may be a `.nemo`, a NeMo Lightning `.ckpt`, one of our training checkpoints or the directory of a
sharded (DCP) checkpoint written by a `trainer.strategy: fsdp` run. Inputs of the exported
program: (x, lengths) with x = features (B, feat_in, T) or, with --with-preprocessor, audio (B, samples); outputs
(encoded (B, d_model, T'), encoded_len (B,)). Batch and time are dynamic. `--verify N` runs the written file (a .pt2
through torch.export.load, a .onnx through onnxruntime) and eager on N random batches and says which file it ran;
without onnxruntime an ONNX export is checked through the torch program it came from, and the output says so.
`--format ckpt` writes our training checkpoint; from a NeMo `.ckpt` it keeps the AdamW state, scheduler and step
(resume it with exp_manager.resume_from_checkpoint). `--format hf` writes a directory that
`transformers.AutoModel.from_pretrained` loads as ParakeetEncoder (needs: pip install 'nest_ssl[hf]'); its `--verify N`
compares last_hidden_state with our encoder on N random padded batches and ParakeetFeatureExtractor with our
preprocessor.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nest_ssl import cli  # noqa: E402

SUFFIXES = {"pt2": ".pt2", "onnx": ".onnx", "nemo": ".nemo", "ckpt": ".ckpt", "hf": ""}  # hf writes a directory


def main(argv=None) -> int:
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help=".nemo, NeMo .ckpt, our training checkpoint or a sharded .dcp directory")
    p.add_argument("--out", required=True, help="output file (.pt2, .onnx, .nemo or .ckpt, as --format; a directory "
                                                "for hf)")
    p.add_argument("--format", choices=tuple(SUFFIXES), default="pt2",
                   help="ckpt: our training checkpoint (from a NeMo .ckpt or a sharded .dcp directory); "
                        "hf: a Hugging Face transformers ParakeetEncoder directory")
    p.add_argument("--with-preprocessor", action="store_true", help="take audio instead of features")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]; the program is exported for this device")
    p.add_argument("--verify", type=int, default=3, metavar="N",
                   help="run the written file and eager on N random batches and compare (0: off)")
    p.add_argument("--max-time", type=int, default=None, help="largest T (features) or samples (audio) to export for")
    args = p.parse_args(argv)
    # A .txt that is really a .pt2 misleads whoever opens it.
    if args.format != "hf" and Path(args.out).suffix != SUFFIXES[args.format]:
        p.error(f"--out {args.out}: --format {args.format} writes a {SUFFIXES[args.format]} file; name it "
                f"{Path(args.out).with_suffix(SUFFIXES[args.format])} (or choose the --format of its extension)")
    return cli.run(lambda: export_to(args), args.debug)


def export_to(args) -> int:
    import torch  # after argument parsing: --help is instant

    from nest_ssl import export

    if args.format == "ckpt":
        print(f"wrote {export.to_training_checkpoint(args.checkpoint, args.out)}")
        return 0
    if args.format == "hf":
        return _export_hf(args)
    model = export.load_pretrained(args.checkpoint, map_location=args.device)
    if args.format == "nemo":
        print(f"wrote {export.save_nemo(model, model.model_cfg, args.out)}")
        return 0
    try:
        info = export.export_encoder(model, args.out, args.with_preprocessor, args.format, args.device,
                                     max_time=args.max_time)
    except RuntimeError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote {info['path']} ({args.format}) in {info['seconds']:.1f} s; torch {torch.__version__}")
    if args.verify > 0:
        # Check the written file itself; only an ONNX file without onnxruntime falls back to the torch program.
        target = info["path"]
        if args.format == "onnx" and not export.onnxruntime_available():
            target = info["program"]
            print(f"note: onnxruntime is not installed, so {info['path']} itself is not run; verifying the torch "
                  "program it was converted from (pip install onnxruntime to check the file)")
        rep = export.verify_export(model, target, args.with_preprocessor, n=args.verify, device=args.device)
        print(f"verify {rep['checked']} against eager on {rep['device']}: {rep['batches']} random batches, "
              f"max rel err {rep['max_rel_err']:.3e}, lengths {'equal' if rep['lengths_equal'] else 'DIFFER'}")
        if not rep["lengths_equal"] or rep["max_rel_err"] > 1e-4:
            return 1
    return 0


def _export_hf(args) -> int:
    from nest_ssl import export, hf_export

    ignored = [flag for flag, used in (("--with-preprocessor", args.with_preprocessor), ("--max-time", args.max_time),
                                       ("--device", args.device != "cpu")) if used]
    if ignored:  # the directory holds weights and configs; verification runs on the CPU
        raise ValueError(f"{', '.join(ignored)} do not apply to --format hf (the preprocessor goes to "
                         "preprocessor_config.json, the weights are device-free)")
    hf_export.require_hf()  # before reading the checkpoint: a missing extra is one line at once
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its per-file progress bars would bury the report
    model = export.load_pretrained(args.checkpoint)
    out = hf_export.save_hf(model, args.out, source=args.checkpoint, step=hf_export.source_step(args.checkpoint))
    print(f"wrote {out} (transformers ParakeetEncoder: config.json, model.safetensors, preprocessor_config.json, "
          "README.md)")
    if args.verify <= 0:
        return 0
    rep = hf_export.verify_hf(model, out, n=args.verify)
    same = "equal" if rep["lengths_equal"] else "DIFFER"
    print(f"verify {out} with transformers against our encoder (eval, fp32, valid frames): {rep['batches']} random "
          f"padded batches, max rel err {rep['max_rel_err']:.3e}, lengths {same}")
    f = hf_export.compare_features(model, out)
    print(f"features: ParakeetFeatureExtractor vs our preprocessor (eval) on the same audio: max abs diff "
          f"{f['max_abs_diff']:.3e} over valid frames, lengths {'equal' if f['lengths_equal'] else 'DIFFER'}; "
          f"T {f['frames_ours']} ours (pad_to={f['pad_to']!r}) vs {f['frames_hf']} HF (padded frames are outside "
          f"the lengths); dither {f['dither']} is ours in training only, HF has none; both normalize per_feature")
    return 0 if rep["lengths_equal"] and rep["max_rel_err"] <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())

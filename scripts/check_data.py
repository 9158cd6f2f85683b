"""Read every line of a dataset once, as training would, and report every bad line; never stops at one.

    python scripts/check_data.py --config CFG.yaml --section model.train_ds [model.train_ds.manifest_filepath=M ...]
    python scripts/check_data.py --manifest a.json,b.json [--tarred 'dir/audio__OP_0..7_CL_.tar'] [--json]
    python scripts/check_data.py --cuts cuts.jsonl.gz          # a lhotse CutSet manifest
    python scripts/check_data.py --shar shar_dir[,shar_dir2]    # Lhotse Shar directories

--cuts, --shar and a --config section with `use_lhotse: true` are read as the Lhotse loader reads them (lhotse's
own reader; Shar audio members by offset) and each cut is decoded as that loader decodes it; a cut is reported at
its cuts file and line (JSON rows add `cut`, its id). The kind of input is never guessed: --manifest refuses a
Shar directory (one holding cuts.*.jsonl*) and a JSON-lines file whose first row is a lhotse cut ("type" ending in
"Cut", or "id" + "recording" without "audio_filepath"), and --cuts refuses a file whose first row is not one.

Each bad line is listed with its manifest and line number, the audio path, a kind and a reason: invalid_json,
not_an_object, missing_audio_filepath, bad_duration, bad_offset, no_such_file, is_directory, unreadable, empty,
nonfinite, offset_past_end, duration_mismatch (beyond --duration-tolerance seconds), not_in_shards and
unmeasurable_duration (tarred: no duration while a duration filter needs one); with Lhotse inputs also
missing_member (no audio member for the cut in its shard) and unreadable at a whole cuts file (its recording tar
is truncated or corrupt: every cut of it is then a missing_member, as the loader skips them).
Warnings (still trained on): all_zero, missing_duration (measured from the header, or by decoding, before the
duration filters). Lines outside [min_duration, max_duration] are counted and listed as filtered. Totals count
only the lines that would be trained on. Exit status 1 when any error exists.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nest_ssl import cli  # noqa: E402
from nest_ssl.data.check import check, check_lhotse, format_report, lhotse_kind  # noqa: E402
from nest_ssl.data.manifest import split_paths  # noqa: E402


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--section", default="model.train_ds")
    ap.add_argument("--manifest")
    ap.add_argument("--tarred")
    ap.add_argument("--cuts", help="a lhotse CutSet manifest (.jsonl / .jsonl.gz)")
    ap.add_argument("--shar", help="Lhotse Shar directories (comma-separated)")
    ap.add_argument("--min-duration", type=float, default=None, help="default: the config section's min_duration")
    ap.add_argument("--max-duration", type=float, default=None, help="default: the config section's max_duration")
    ap.add_argument("--duration-tolerance", type=float, default=None,
                    help="seconds a manifest duration/offset may be off from the file (default: the section's "
                         "duration_tolerance, 0.1)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for --config (model.train_ds.manifest_filepath=M)")
    a = ap.parse_args(argv)
    given = [k for k in ("config", "manifest", "cuts", "shar") if getattr(a, k)]
    if len(given) != 1:
        ap.error(f"give one of --config, --manifest, --cuts or --shar (got {', '.join(given) or 'none'})")
    if a.tarred and not a.manifest:
        ap.error("--tarred goes with --manifest (the tarred manifest)")
    return cli.run(lambda: report(a), a.debug)


def config_section(path: str, section: str, overrides: list[str]) -> dict:
    from nest_ssl.config import apply_overrides, load_yaml, resolve  # YAML with ${} interpolation + overrides
    from nest_ssl.run_config import schema_keys

    sec = resolve(apply_overrides(load_yaml(path), overrides, schema_keys))
    for i, k in enumerate(section.split(".")):
        if not isinstance(sec, dict) or k not in sec:
            raise ValueError(f"--section {section}: {path} has no '{'.'.join(section.split('.')[:i + 1])}'")
        sec = sec[k]
    return sec


def report(a) -> int:
    manifest, tarred, sec = a.manifest, a.tarred, {}
    if a.config:
        sec = config_section(a.config, a.section, a.overrides)
        manifest = sec.get("manifest_filepath")
        tarred = sec.get("tarred_audio_filepaths") if sec.get("is_tarred") else None
    pick = (lambda cli_value, key, default=None: cli_value if cli_value is not None else sec.get(key, default))
    if a.cuts or a.shar or sec.get("use_lhotse") is True:
        rep = check_lhotse(lhotse_section(a, sec), a.workers, a.section if a.config else "check_data")
    else:
        for path in split_paths(manifest) if a.manifest else []:
            kind = lhotse_kind(path)
            if kind:
                what = "Shar directory" if kind == "shar" else "cuts manifest"
                raise ValueError(f"--manifest {path}: this is a lhotse {what}, not a NeMo manifest; check it with "
                                 f"--{kind} {path}")
        rep = check(manifest, tarred, pick(a.min_duration, "min_duration"), pick(a.max_duration, "max_duration"),
                    pick(a.duration_tolerance, "duration_tolerance", 0.1), a.workers)
    print(json.dumps(rep) if a.json else format_report(rep))
    return 1 if rep["errors"] else 0


def lhotse_section(a, sec: dict):
    """The DatasetConfig of --cuts / --shar, or of a `use_lhotse` --config section, with the command line's duration
    bounds and tolerance; bad items are always skipped (reported), never raised."""
    from nest_ssl.config import from_dict
    from nest_ssl.data.config import DatasetConfig
    from nest_ssl.data.lhotse_config import strip_off_keys

    if a.cuts:
        if not os.path.isfile(a.cuts):
            raise ValueError(f"--cuts {a.cuts}: no such file")
        if lhotse_kind(a.cuts) != "cuts":
            raise ValueError(f"--cuts {a.cuts}: its first row is not a lhotse cut (no \"type\": \"...Cut\", nor "
                             "\"id\" + \"recording\"); a NeMo manifest goes to --manifest")
        d = {"use_lhotse": True, "manifest_filepath": None, "cuts_path": a.cuts}
    elif a.shar:
        d = {"use_lhotse": True, "manifest_filepath": None, "shar_path": split_paths(a.shar)}
    else:
        d = strip_off_keys(sec, a.section)
    for key, value in (("min_duration", a.min_duration), ("max_duration", a.max_duration),
                       ("duration_tolerance", a.duration_tolerance)):
        if value is not None:
            d[key] = value
    return from_dict(DatasetConfig, {**d, "skip_bad_samples": True}, a.section if a.config else "check_data")


if __name__ == "__main__":
    sys.exit(main())

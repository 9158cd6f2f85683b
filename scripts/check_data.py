"""Read every line of a dataset once, as training would, and report every bad line; never stops at one.

    python scripts/check_data.py --config CFG.yaml --section model.train_ds [model.train_ds.manifest_filepath=M ...]
    python scripts/check_data.py --manifest a.json,b.json [--tarred 'dir/audio__OP_0..7_CL_.tar'] [--json]

Each bad line is listed with its manifest and line number, the audio path, a kind and a reason: invalid_json,
not_an_object, missing_audio_filepath, bad_duration, bad_offset, no_such_file, is_directory, unreadable, empty,
nonfinite, offset_past_end, duration_mismatch (beyond --duration-tolerance seconds), not_in_shards and
unmeasurable_duration (tarred: no duration while a duration filter needs one).
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
from nest_ssl.data.check import check, format_report  # noqa: E402


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--section", default="model.train_ds")
    ap.add_argument("--manifest")
    ap.add_argument("--tarred")
    ap.add_argument("--min-duration", type=float, default=None, help="default: the config section's min_duration")
    ap.add_argument("--max-duration", type=float, default=None, help="default: the config section's max_duration")
    ap.add_argument("--duration-tolerance", type=float, default=None,
                    help="seconds a manifest duration/offset may be off from the file (default: the section's "
                         "duration_tolerance, 0.1)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for --config (model.train_ds.manifest_filepath=M)")
    a = ap.parse_args(argv)
    if not (a.config or a.manifest):
        ap.error("give --config or --manifest")
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
    rep = check(manifest, tarred, pick(a.min_duration, "min_duration"), pick(a.max_duration, "max_duration"),
                pick(a.duration_tolerance, "duration_tolerance", 0.1), a.workers)
    print(json.dumps(rep) if a.json else format_report(rep))
    return 1 if rep["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

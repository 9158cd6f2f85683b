"""scripts/check_data.py and the training loader on one manifest that mixes every kind of damage with good lines:
one report entry per bad line (line number, path, kind, reason), totals over trainable lines only, durations
measured before the filters, and the loader skipping exactly the same lines."""
import json
import os
import runpy

import numpy as np
import pytest
import soundfile as sf
from test_data import SR, cfg, write_wav

from nest_ssl.data.audio import BAD_KINDS
from nest_ssl.data.check import check
from nest_ssl.data.loader import build_dataloader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (line text or row, expected kind or None for a clean line); files are made by _make_files.
LINES = [
    ({"audio_filepath": "good0.wav", "duration": 1.0}, None),
    ('{"audio_filepath": "ctl\x01.wav", "duration": 1.0}', "invalid_json"),  # raw control character in a string
    ('{"audio_filepath": "good0.wav", "dur', "invalid_json"),  # cut line
    ("[1, 2]", "not_an_object"),
    ({"duration": 1.0}, "missing_audio_filepath"),
    ({"audio_filepath": "good1.wav", "duration": -1.0}, "bad_duration"),
    ({"audio_filepath": "good1.wav", "duration": "1.0s"}, "bad_duration"),
    ({"audio_filepath": "good1.wav", "duration": 1.0, "offset": "x"}, "bad_offset"),
    ({"audio_filepath": "nope.wav", "duration": 1.0}, "no_such_file"),
    ({"audio_filepath": "adir", "duration": 1.0}, "is_directory"),
    ({"audio_filepath": "garbage.wav", "duration": 1.0}, "unreadable"),
    ({"audio_filepath": "zero_bytes.wav", "duration": 1.0}, "empty"),
    ({"audio_filepath": "zero_frames.wav", "duration": 1.0}, "empty"),
    ({"audio_filepath": "nan.wav", "duration": 1.0}, "nonfinite"),
    ({"audio_filepath": "good1.wav", "duration": 2.0}, "duration_mismatch"),  # the file is 1 s: short by 1 s
    ({"audio_filepath": "good1.wav", "duration": 0.5}, "duration_mismatch"),  # whole file (no offset) is longer
    ({"audio_filepath": "good1.wav", "duration": 0.5, "offset": 0.25}, None),  # a segment
    ({"audio_filepath": "good1.wav", "duration": 0.5, "offset": 5.0}, "offset_past_end"),
    ({"audio_filepath": "silence.wav", "duration": 1.0}, "all_zero"),  # warning: still trained on
    ({"audio_filepath": "good2.wav"}, "missing_duration"),  # warning: measured from the header (1.5 s)
    ({"audio_filepath": "vorbis.ogg"}, "missing_duration"),  # measured by decoding (no exact header count)
    ({"audio_filepath": "long.wav"}, "too_long"),  # 6 s, no duration: measured, then max_duration drops it
    ({"audio_filepath": "good0.wav", "duration": 0.2}, "too_short"),
]
MAX_DURATION, MIN_DURATION = 4.0, 0.3
WARNINGS = ("all_zero", "missing_duration")
FILTERED = ("too_long", "too_short")


def _make_files(d):
    write_wav(d / "good0.wav", 1.0, seed=0)
    write_wav(d / "good1.wav", 1.0, seed=1)
    write_wav(d / "good2.wav", 1.5, seed=2)
    write_wav(d / "long.wav", 6.0, sr=8000, seed=3)
    sf.write(str(d / "vorbis.ogg"), np.random.default_rng(4).uniform(-0.5, 0.5, SR).astype(np.float32), SR,
             format="OGG")
    sf.write(str(d / "silence.wav"), np.zeros(SR, np.float32), SR)
    sf.write(str(d / "nan.wav"), np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    sf.write(str(d / "zero_frames.wav"), np.zeros(0, np.float32), SR)
    (d / "zero_bytes.wav").write_bytes(b"")
    (d / "garbage.wav").write_bytes(b"not audio at all" * 10)
    os.mkdir(d / "adir")


@pytest.fixture
def hostile(tmp_path):
    _make_files(tmp_path)
    path = tmp_path / "hostile.json"
    with open(path, "w", encoding="utf-8") as f:
        for row, _ in LINES:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _expected(severity_kinds):
    return [(i + 1, kind) for i, (_, kind) in enumerate(LINES) if kind in severity_kinds]


def test_every_bad_line_is_reported_with_line_number_kind_and_reason(hostile):
    rep = check(hostile, min_duration=MIN_DURATION, max_duration=MAX_DURATION, workers=1)
    errors = {k for _, k in LINES if k is not None} - set(WARNINGS) - set(FILTERED)
    assert [(x["line"], x["kind"]) for x in rep["errors"]] == _expected(errors)
    assert [(x["line"], x["kind"]) for x in rep["warnings"]] == _expected(WARNINGS)
    assert [(x["line"], x["kind"]) for x in rep["filtered"]] == _expected(FILTERED)
    assert all(x["manifest"] == hostile and x["reason"] for x in rep["errors"] + rep["warnings"] + rep["filtered"])
    reasons = {x["kind"]: x["reason"] for x in rep["errors"] + rep["warnings"] + rep["filtered"]}
    assert "Invalid control character" in rep["errors"][0]["reason"]  # the JSON parser's own message
    assert reasons["no_such_file"] == "no such file" and "System error" not in json.dumps(rep)
    assert "short by 1.000 s" in [x for x in rep["errors"] if x["line"] == 15][0]["reason"]
    assert "longer by 0.500 s" in [x for x in rep["errors"] if x["line"] == 16][0]["reason"]
    assert "6.000 s" in reasons["too_long"] or "6.0 s" in reasons["too_long"]
    measured = {x["path"].rsplit("/", 1)[-1]: x["reason"] for x in rep["warnings"] if x["kind"] == "missing_duration"}
    assert "1.500 s" in measured["good2.wav"] and "1.000 s" in measured["vorbis.ogg"]
    file_kinds = {x["kind"] for x in rep["errors"] if x["line"] >= 9}
    assert file_kinds <= set(BAD_KINDS)  # the audio loader's own kinds: what training would skip
    trained = [1, 17, 19, 20, 21]  # good0, the segment, silence, good2 (1.5 s), vorbis (1 s)
    assert rep["utterances"] == len(trained)
    assert rep["hours"] == pytest.approx((1.0 + 0.5 + 1.0 + 1.5 + 1.0) / 3600, rel=1e-3)
    assert rep["sample_rates"] == {SR: 5}
    print(f"\n{len(set(reasons))} kinds over {len(LINES)} lines: {sorted(rep['counts'].items())}")


def test_script_exit_code_json_and_text(hostile, capsys):
    main = runpy.run_path(os.path.join(ROOT, "scripts", "check_data.py"))["main"]
    common = ["--manifest", hostile, "--max-duration", str(MAX_DURATION), "--min-duration", str(MIN_DURATION),
              "--workers", "1"]
    assert main([*common, "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["counts"]["invalid_json"] == 2 and rep["counts"]["too_long"] == 1
    assert main(common) == 1
    text = capsys.readouterr().out
    assert f"ERROR {hostile}:2 [invalid_json]" in text and f"WARNING {hostile}:19 [all_zero]" in text
    assert f"FILTERED {hostile}:22 [too_long]" in text


def test_loader_skips_exactly_the_lines_check_data_reports(hostile):
    rep = check(hostile, min_duration=MIN_DURATION, max_duration=MAX_DURATION, workers=1)
    loader = build_dataloader(cfg(hostile, shuffle=False, batch_size=1, drop_last=False, min_duration=MIN_DURATION,
                                  max_duration=MAX_DURATION))
    got = sum(len(b) for b in loader)
    assert got == rep["utterances"]
    line_errors = {f"{x['manifest']}:{x['line']}: {x['reason']}" for x in rep["errors"] if x["kind"] in (
        "invalid_json", "not_an_object", "missing_audio_filepath", "bad_duration", "bad_offset")}
    file_errors = {x["reason"] for x in rep["errors"]} - {r.split(": ", 1)[-1] for r in line_errors}
    reasons = {r for _, r in loader.bad_samples}
    assert line_errors <= reasons and file_errors <= reasons
    assert len(loader.bad_samples) == len({(x["path"], x["reason"]) for x in rep["errors"]})
    assert [f.kind for f in loader.manifest_report.filtered] == ["too_long", "too_short"]


def test_loader_strict_mode_names_the_first_bad_line_at_start_up(hostile):
    with pytest.raises(ValueError, match=f"{hostile}:2: invalid JSON"):
        build_dataloader(cfg(hostile, skip_bad_samples=False))


def test_bad_lines_count_toward_max_bad_samples(hostile):
    with pytest.raises(RuntimeError, match="exceed max_bad_samples=3"):
        build_dataloader(cfg(hostile, max_bad_samples=3))


def test_a_bad_noise_manifest_line_follows_the_same_setting(hostile, tmp_path):
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps({"audio_filepath": str(tmp_path / "good0.wav"), "duration": 1.0}) + "\n{oops\n")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"audio_filepath": str(tmp_path / "good0.wav"), "duration": 1.0}) + "\n")
    loader = build_dataloader(cfg(str(good), noise_manifest=str(noise), batch_size=1))
    assert [r for _, r in loader.bad_samples] == [f"{noise}:2: invalid JSON: Expecting property name enclosed in "
                                                  "double quotes (column 2) in '{oops'"]
    with pytest.raises(ValueError, match=f"{noise}:2: invalid JSON"):
        build_dataloader(cfg(str(good), noise_manifest=str(noise), skip_bad_samples=False))

"""scripts/check_data.py and the training loader on one manifest that mixes every kind of damage with good lines:
one report entry per bad line (line number, path, kind, reason), totals over trainable lines only, durations
measured before the filters, and the loader skipping exactly the same lines."""
import collections
import contextlib
import io
import json
import os
import runpy
import tarfile

import numpy as np
import pytest
import soundfile as sf
from test_data import SR, cfg, write_manifest, write_wav

from nest_ssl.data.audio import BAD_KINDS
from nest_ssl.data.check import check, check_lhotse
from nest_ssl.data.config import DatasetConfig
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


# ---- Lhotse inputs: a cuts manifest and a Shar directory written by lhotse's own writers from the same files ----
CUT_SECS = [1.0, 1.1, 1.2, 1.3, 1.4]  # cut i is u{i}.wav; Shar shards of 3 cuts: shard 0 holds u0-u2, shard 1 u3-u4


@pytest.fixture
def lhotse_data(tmp_path):
    from lhotse import CutSet, Recording
    from lhotse.shar import SharWriter

    paths = [tmp_path / f"u{i}.wav" for i in range(len(CUT_SECS))]
    for i, (p, secs) in enumerate(zip(paths, CUT_SECS)):
        write_wav(p, secs, seed=i)
    cuts = CutSet.from_cuts([Recording.from_file(str(p)).to_cut() for p in paths])
    cuts.to_file(str(tmp_path / "cuts.jsonl.gz"))
    os.makedirs(tmp_path / "shar")
    with SharWriter(str(tmp_path / "shar"), fields={"recording": "flac"}, shard_size=3) as w:
        for c in cuts:
            w.write(c)
    return tmp_path


def run_main(*argv) -> tuple[int, dict]:
    main = runpy.run_path(os.path.join(ROOT, "scripts", "check_data.py"))["main"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main([*argv, "--workers", "1", "--json"])
    return rc, json.loads(out.getvalue())


def rewrite_member(tar: str, name: str, change):
    """Write `tar` again with member `name`'s bytes replaced by change(bytes), or left out when that is None."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            data = change(data) if m.name == name else data
            if data is not None:
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize("flag,path", [("--cuts", "cuts.jsonl.gz"), ("--shar", "shar")])
def test_good_lhotse_inputs_pass(lhotse_data, flag, path):
    rc, rep = run_main(flag, str(lhotse_data / path))
    assert rc == 0 and rep["errors"] == rep["warnings"] == rep["filtered"] == []
    assert rep["utterances"] == len(CUT_SECS) and rep["sample_rates"] == {str(SR): len(CUT_SECS)}
    assert rep["hours"] == pytest.approx(sum(CUT_SECS) / 3600, rel=1e-6)


def _garbage_in_place(tar: str, name: str):
    with tarfile.open(tar) as t:
        m = t.getmember(name)
    with open(tar, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"not audio " * (m.size // 10))


SHAR_DAMAGE = {  # name -> (damage shard 0 of the Shar, expected (cuts file line, kind) rows)
    "missing_member": (lambda t: rewrite_member(t, "u1.flac", lambda d: None), [(2, "missing_member")]),
    "garbage_member": (lambda t: _garbage_in_place(t, "u1.flac"), [(2, "unreadable")]),
    "truncated_member": (lambda t: rewrite_member(t, "u1.flac", lambda d: d[: len(d) // 2]), [(2, "unreadable")]),
    # cut inside u1.flac: the tar's index cannot be read, so the loader skips every cut of the shard, and says why
    "truncated_tar": (lambda t: os.truncate(t, tarfile.open(t).getmember("u1.flac").offset_data + 100),
                      [(None, "unreadable"), (1, "missing_member"), (2, "missing_member"), (3, "missing_member")]),
}


@pytest.mark.parametrize("damage", list(SHAR_DAMAGE))
def test_damaged_shar_is_reported_per_cut_with_its_reason(lhotse_data, damage, capsys):
    shar = lhotse_data / "shar"
    cut_file, tar = str(shar / "cuts.000000.jsonl.gz"), str(shar / "recording.000000.tar")
    change, expected = SHAR_DAMAGE[damage]
    change(tar)
    rc, rep = run_main("--shar", str(shar))
    assert rc == 1 and [(x["manifest"], x["line"], x["kind"]) for x in rep["errors"]] == [
        (cut_file, line, kind) for line, kind in expected]
    assert all(x["reason"] and x.get("cut") == (f"u{x['line'] - 1}" if x["line"] else None) for x in rep["errors"])
    bad_cuts = sum(line is not None for line, _ in expected)
    assert rep["utterances"] == len(CUT_SECS) - bad_cuts and rep["counts"] == dict(
        collections.Counter(k for _, k in expected))
    main = runpy.run_path(os.path.join(ROOT, "scripts", "check_data.py"))["main"]
    assert main(["--shar", str(shar), "--workers", "1"]) == 1
    text = capsys.readouterr().out
    assert f"ERROR {cut_file}:2 [{expected[-2 if damage == 'truncated_tar' else 0][1]}]" in text


def test_cuts_manifest_pointing_at_a_missing_file_is_reported_at_its_line(lhotse_data, capsys):
    os.remove(lhotse_data / "u3.wav")
    cuts = str(lhotse_data / "cuts.jsonl.gz")
    rc, rep = run_main("--cuts", cuts)
    assert rc == 1 and rep["utterances"] == len(CUT_SECS) - 1
    assert [(x["manifest"], x["line"], x["kind"], x["path"], x["reason"], x["cut"]) for x in rep["errors"]] == [
        (cuts, 4, "no_such_file", str(lhotse_data / "u3.wav"), "no such file", "u3")]
    main = runpy.run_path(os.path.join(ROOT, "scripts", "check_data.py"))["main"]
    assert main(["--cuts", cuts, "--workers", "1"]) == 1
    assert f"ERROR {cuts}:4 [no_such_file] {lhotse_data / 'u3.wav'}: no such file" in capsys.readouterr().out


def test_lhotse_check_reports_what_the_lhotse_loader_skips(lhotse_data):
    shar = lhotse_data / "shar"
    _garbage_in_place(str(shar / "recording.000000.tar"), "u1.flac")
    rewrite_member(str(shar / "recording.000001.tar"), "u4.flac", lambda d: None)
    c = DatasetConfig(manifest_filepath=None, use_lhotse=True, shar_path=str(shar), batch_size=1, min_duration=1.05)
    rep = check_lhotse(c, workers=2)  # through the process pool too
    assert [(x["cut"], x["kind"]) for x in rep["errors"]] == [("u1", "unreadable"), ("u4", "missing_member")]
    assert [x["cut"] for x in rep["filtered"]] == ["u0"]
    loader = build_dataloader(c)
    assert sum(len(b.audio_len) for b in loader) == rep["utterances"] == 2  # u2, u3
    # the loader names an item it never read (no member) by read_inputs' name for the cut
    assert sorted(p for p, _ in loader.bad_samples) == sorted(
        x["path"] or f"{x['manifest']}: cut {x['cut']}" for x in rep["errors"])


def test_no_input_kind_is_guessed(lhotse_data, tmp_path):
    """--manifest refuses lhotse inputs, --cuts a NeMo manifest (a NeMo row naming `id` and `recording` columns is
    still a NeMo manifest: it has an audio_filepath)."""
    nemo = write_manifest(tmp_path / "nemo.json", [{"audio_filepath": str(lhotse_data / "u0.wav"), "duration": 1.0,
                                                     "id": "x", "recording": "y"}])
    for argv, needle in ((["--manifest", str(lhotse_data / "shar")], "is a lhotse Shar directory"),
                         (["--manifest", str(lhotse_data / "cuts.jsonl.gz")], "is a lhotse cuts manifest"),
                         (["--cuts", nemo], "its first row is not a lhotse cut")):
        main = runpy.run_path(os.path.join(ROOT, "scripts", "check_data.py"))["main"]
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert main([*argv, "--workers", "1"]) == 1
        assert needle in err.getvalue(), err.getvalue()
    rc, rep = run_main("--manifest", nemo)
    assert rc == 0 and rep["utterances"] == 1


def test_a_use_lhotse_config_section_is_checked_through_lhotse(lhotse_data):
    rewrite_member(str(lhotse_data / "shar" / "recording.000000.tar"), "u2.flac", lambda d: None)
    rc, rep = run_main("--config", os.path.join(ROOT, "configs", "nest_tiny_cpu.yaml"),
                       "model.train_ds.use_lhotse=true", f"model.train_ds.shar_path={lhotse_data / 'shar'}")
    assert rc == 1 and [(x["line"], x["kind"]) for x in rep["errors"]] == [(3, "missing_member")]

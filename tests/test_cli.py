"""The command-line tools a person meets first: every script's --help, scripts/make_manifest.py on bad files."""
import json
import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))


def script_main(name: str):
    return runpy.run_path(str(ROOT / "scripts" / name))["main"]


def exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse exits
        return e.code


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help_with_its_usage(name, capsys):
    rc = exit_code(script_main(name), ["--help"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.startswith("usage:") and not out.err


# ---- scripts/make_manifest.py ------------------------------------------------------------------------------


def write_audio(path: Path, secs: float, fmt: str = "WAV") -> None:
    x = np.random.default_rng(0).uniform(-0.5, 0.5, int(secs * SR)).astype(np.float32)
    sf.write(str(path), x, SR, format=fmt, subtype="PCM_16")


def truncated_flac(path: Path, secs: float) -> None:
    """A FLAC cut in half: its header still promises `secs` seconds."""
    write_audio(path, secs, "FLAC")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert sf.info(str(path)).duration == pytest.approx(secs)


@pytest.fixture
def mixed_folder(tmp_path):
    d = tmp_path / "audio"
    (d / "sub").mkdir(parents=True)
    write_audio(d / "a.wav", 1.0)
    write_audio(d / "sub" / "b.flac", 1.25, "FLAC")
    (d / "garbage.wav").write_bytes(b"not audio" * 20)
    truncated_flac(d / "cut.flac", 2.0)
    sf.write(str(d / "empty.wav"), np.zeros(0, np.float32), SR)
    return d


def test_make_manifest_lists_bad_files_and_writes_the_good_ones(mixed_folder, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = script_main("make_manifest.py")([str(mixed_folder), str(out)])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["audio_filepath"]).name for r in rows] == ["a.wav", "b.flac"]
    assert [r["duration"] for r in rows] == [1.0, 1.25]
    skipped = {line.split(":")[0].removeprefix("SKIPPED ") for line in captured.err.splitlines()}
    assert skipped == {f"{mixed_folder / n} [{kind}]" for n, kind in (("cut.flac", "unreadable"),
                                                                      ("empty.wav", "empty"),
                                                                      ("garbage.wav", "unreadable"))}
    assert "skipped 3" in captured.out
    assert rc == 1  # some files were left out


def test_make_manifest_duration_is_what_decodes_not_the_header(tmp_path, capsys):
    d = tmp_path / "audio"
    d.mkdir()
    truncated_flac(d / "cut.flac", 2.0)  # header: 2.0 s; the decoder cannot deliver that
    rc = script_main("make_manifest.py")([str(d), str(tmp_path / "m.json")])
    assert rc == 1 and (tmp_path / "m.json").read_text() == ""
    assert "cut.flac [unreadable]: unreadable" in capsys.readouterr().err


def test_make_manifest_all_good_exits_0_with_relative_paths(tmp_path):
    d = tmp_path / "audio"
    d.mkdir()
    write_audio(d / "x.wav", 0.5)
    rc = script_main("make_manifest.py")([str(d), str(tmp_path / "m.json"), "--relative", "--workers", "2"])
    rows = [json.loads(line) for line in (tmp_path / "m.json").read_text().splitlines()]
    assert rc == 0 and rows == [{"audio_filepath": "audio/x.wav", "duration": 0.5, "text": ""}]


# ---- pytest configuration ------------------------------------------------------------------------------------


def test_triton_interpreter_numpy_deprecation_is_filtered_but_ours_are_not():
    """Triton's interpreter converts 1-element arrays to scalars (a NumPy DeprecationWarning, hundreds per run of
    the kernel tests); the filter drops exactly that one, from that module."""
    msg = "Conversion of an array with ndim > 0 to a scalar is deprecated, and will error in future."
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit(msg, DeprecationWarning, "interpreter.py", 888, module="triton.runtime.interpreter",
                               registry={})
        warnings.warn_explicit(msg, DeprecationWarning, "attention.py", 1, module="nest_ssl.conformer.attention",
                               registry={})
    assert [w.filename for w in seen] == ["attention.py"]


# ---- config and data errors: one line naming the key path or file:line, exit 1, traceback only with --debug ---


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from tests.train_support import make_data

    return make_data(tmp_path_factory.mktemp("demo"))


def pretrain(tmp_path, *overrides):
    return ["--config", str(ROOT / "configs" / "nest_tiny_cpu.yaml"), f"exp_manager.exp_dir={tmp_path / 'exp'}",
            "trainer.max_steps=1", *overrides]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def manifests(demo, train=None):
    return [f"model.train_ds.manifest_filepath={train or demo['train']}",
            f"model.validation_ds.manifest_filepath={demo['val']}"]


def test_pretrain_unset_mandatory_value_is_one_line_naming_the_key(tmp_path, capsys):
    assert script_main("pretrain.py")(pretrain(tmp_path, "model.validation_ds.manifest_filepath=v.json")) == 1
    assert "model.train_ds.manifest_filepath" in error_line(capsys)
    assert not (tmp_path / "exp").exists()


def test_pretrain_missing_manifest_is_one_line_naming_key_and_file(tmp_path, demo, capsys):
    rc = script_main("pretrain.py")(pretrain(tmp_path, *manifests(demo, tmp_path / "nope.json")))
    line = error_line(capsys)
    assert rc == 1 and "model.train_ds.manifest_filepath" in line and f"{tmp_path / 'nope.json'}" in line


def test_pretrain_bad_manifest_line_is_one_line_with_file_and_line_number(tmp_path, demo, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(Path(demo["train"]).read_text().splitlines()[0] + "\nnot json at all\n")
    rc = script_main("pretrain.py")(pretrain(tmp_path, *manifests(demo, bad), "+model.train_ds.skip_bad_samples=false"))
    assert rc == 1 and f"{bad}:2: invalid JSON" in error_line(capsys)


def test_pretrain_bad_encoder_value_names_the_encoder_key(tmp_path, demo, capsys):
    rc = script_main("pretrain.py")(pretrain(tmp_path, *manifests(demo), "model.encoder.n_layers=-3"))
    assert rc == 1 and "model.encoder.n_layers=-3" in error_line(capsys)


def test_pretrain_debug_shows_the_traceback(tmp_path, demo):
    with pytest.raises(ValueError, match="model.encoder.n_layers=-3"):
        script_main("pretrain.py")(pretrain(tmp_path, *manifests(demo), "model.encoder.n_layers=-3", "--debug"))


@pytest.mark.parametrize("content", [None, b"not a tar archive at all"])
def test_export_unreadable_checkpoint_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "model.nemo"
    if content is not None:
        path.write_bytes(content)
    assert script_main("export.py")([str(path), "--out", str(tmp_path / "e.pt2")]) == 1
    assert str(path) in error_line(capsys)


# ---- the config CLI ------------------------------------------------------------------------------------------


def test_config_cli_help_and_exit_1_while_a_mandatory_value_is_unset(capsys):
    from nest_ssl.run_config import main

    assert main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage:")
    assert main([str(ROOT / "configs" / "nest_tiny_cpu.yaml")]) == 1
    out = capsys.readouterr()
    assert "model.train_ds.manifest_filepath, model.validation_ds.manifest_filepath" in out.err
    assert "model:" in out.out  # the resolved YAML is still shown
    argv = [str(ROOT / "configs" / "nest_tiny_cpu.yaml"), "model.train_ds.manifest_filepath=a.json",
            "model.validation_ds.manifest_filepath=b.json"]
    assert main(argv) == 0


@pytest.mark.parametrize("module", ["nest_ssl.run_config", "nest_ssl.config"])
def test_python_m_config_with_an_unset_mandatory_value_exits_1(module):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", module, "configs/nest_tiny_cpu.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    expected = "mandatory value ('???') not set" if module == "nest_ssl.run_config" else "python -m nest_ssl.run_config"
    assert proc.returncode == 1 and expected in proc.stderr and "Traceback" not in proc.stderr


def test_a_wrong_type_reached_through_interpolation_blames_the_source_key(tmp_path, demo, capsys):
    from nest_ssl.config import ConfigError
    from nest_ssl.run_config import load_config

    with pytest.raises(ConfigError, match=r"^model.encoder.d_model='abc': expected int.*by model.optim.sched"):
        load_config(ROOT / "configs" / "nest_tiny_cpu.yaml", ["model.encoder.d_model=abc"])
    assert script_main("pretrain.py")(pretrain(tmp_path, *manifests(demo), "model.encoder.d_model=abc")) == 1
    assert error_line(capsys).startswith("error: model.encoder.d_model='abc'")


def test_a_zero_byte_file_is_empty_in_make_manifest_and_check_data_alike(tmp_path, capsys):
    d = tmp_path / "audio"
    d.mkdir()
    (d / "zero.wav").write_bytes(b"")
    assert script_main("make_manifest.py")([str(d), str(tmp_path / "m.json")]) == 1
    skipped = capsys.readouterr().err.strip()
    manifest = tmp_path / "z.json"
    manifest.write_text(json.dumps({"audio_filepath": str(d / "zero.wav"), "duration": 1.0}) + "\n")
    assert script_main("check_data.py")(["--manifest", str(manifest), "--json", "--workers", "1"]) == 1
    (error,) = json.loads(capsys.readouterr().out)["errors"]
    assert skipped == f"SKIPPED {d / 'zero.wav'} [{error['kind']}]: {error['reason']}"
    assert error["kind"] == "empty"


def test_the_probe_table_never_cuts_a_path():
    long = "/a/very/long/run/directory/" + "x" * 80 + "/checkpoints/SSL-NEST-FastConformer.nemo"
    rows = [{"encoder": long, "task": "ctc", "probe_cer": 0.5, "probe_wer": 0.9, "layer_weights": [0.5, 0.5]},
            {"encoder": "random init", "task": "classification", "probe_acc": 0.25, "layer_weights": [1.0]}]
    lines = script_main("probe.py").__globals__["format_rows"](rows).splitlines()
    assert lines[1].startswith(long + " ") and lines[2].startswith("random init ")
    assert len({line.index("ctc") if "ctc" in line else line.index("classification") for line in lines[1:]}) == 1


def test_make_demo_data_prints_progress_lines(tmp_path, capsys):
    script_main("make_demo_data.py")(["--out", str(tmp_path), "--num-files", "26", "--num-val", "1", "--num-noise",
                                      "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines[:-1]] == [
        "make_demo_data: train 25/26 files", "make_demo_data: train 26/26 files", "make_demo_data: val 1/1 files",
        "make_demo_data: noise 1/1 files"]


def test_pretrain_strict_mode_stops_at_start_up_on_a_missing_audio_file(tmp_path, demo, capsys):
    gone = tmp_path / "train.json"
    gone.write_text(Path(demo["train"]).read_text() + json.dumps({"audio_filepath": str(tmp_path / "gone.wav"),
                                                                  "duration": 1.0}) + "\n")
    n = len(gone.read_text().splitlines())
    rc = script_main("pretrain.py")(pretrain(tmp_path, *manifests(demo, gone), "model.train_ds.skip_bad_samples=false"))
    line = error_line(capsys)
    assert rc == 1 and f"{gone}:{n}: {tmp_path / 'gone.wav'}: no such file" in line and "max_bad_samples" not in line
    assert not list((tmp_path / "exp").rglob("*.ckpt"))  # stopped before the first step: nothing to save


def test_make_install_is_not_quiet():
    """The first install downloads ~4.8 GB: pip must show what it is fetching (issue 25: minutes of silence)."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(STAMP): setup.py constraints.txt\n", 1)[1].split("\n\n", 1)[0]
    pip_lines = [line for line in recipe.splitlines() if "pip install" in line]
    assert len(pip_lines) == 2 and all(" -q" not in line and "--progress-bar on" in line for line in pip_lines)

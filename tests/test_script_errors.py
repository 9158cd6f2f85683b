"""Every script's common mistakes (missing file, unreadable file, read-only output, bad option): one line on stderr,
a non-zero exit, never a traceback; `--debug` gives the traceback instead. Each script's main() runs in-process."""
import json
import runpy
import subprocess
from pathlib import Path

import pytest
from test_export import tiny_model

from nest_ssl import export
from nest_ssl.cli import USER_ERRORS

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "nest_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A read-only directory (a read-only tmpfs: a chmod does not stop root), a real .nemo, a garbage file and a
    manifest whose audio does not exist."""
    tmp = tmp_path_factory.mktemp("mistakes")
    ro = tmp / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a read-only tmpfs (root)")
    model = tiny_model()
    garbage = tmp / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint, not YAML: {[" * 10)
    manifest = tmp / "m.json"
    manifest.write_text(json.dumps({"audio_filepath": str(tmp / "gone.wav"), "duration": 1.0}) + "\n")
    yield {"ro": ro, "nemo": export.save_nemo(model, model.model_cfg, tmp / "m.nemo"), "garbage": garbage,
           "manifest": manifest, "missing": tmp / "nope.json", "tmp": tmp}
    subprocess.run(["umount", str(ro)], check=True)


# (script, argv with {placeholders} from `files`, a piece of the one line)
CASES = [
    ("check_data.py", ["--manifest", "{missing}"], "{missing}"),
    ("check_data.py", ["--config", "{missing}"], "{missing}"),
    ("check_data.py", ["--config", "{garbage}"], "invalid YAML"),
    ("check_data.py", ["--config", TINY, "--section", "model.nope"], "model.nope"),
    ("extract_features.py", ["{missing}", "--manifest", "{manifest}", "--out", "{tmp}/f"], "{missing}"),
    ("extract_features.py", ["{garbage}", "--manifest", "{manifest}", "--out", "{tmp}/f"], "{garbage}"),
    ("extract_features.py", ["{nemo}", "--manifest", "{missing}", "--out", "{tmp}/f"], "{missing}"),
    ("extract_features.py", ["{nemo}", "--manifest", "{manifest}", "--out", "{ro}/f"], "Read-only file system"),
    ("export.py", ["{missing}", "--out", "{tmp}/e.pt2"], "{missing}"),
    ("export.py", ["{garbage}", "--out", "{tmp}/e.pt2"], "{garbage}"),
    ("export.py", ["{nemo}", "--out", "{ro}/e.nemo", "--format", "nemo"], "Read-only file system"),
    ("estimate.py", ["{missing}"], "{missing}"),
    ("estimate.py", [TINY, "trainer.max_step=5"], "did you mean trainer.max_steps?"),
    ("batch_search.py", ["{missing}", "--memory", "1"], "{missing}"),
    ("batch_search.py", [TINY, "--device", "cpu", "--memory", "1", "--bins", "2,1"], "--bins"),
    ("benchmark_batch_search.py", ["--config", "{missing}", "--points", "1x1"], "{missing}"),
    ("probe.py", ["{missing}", "--train-manifest", "{manifest}", "--eval-manifest", "{manifest}"], "{missing}"),
    ("make_manifest.py", ["{tmp}", "{ro}/m.json"], "Read-only file system"),
    ("make_tarred_dataset.py", ["--manifest", "{missing}", "--out", "{tmp}/shards"], "{missing}"),
    ("make_tarred_dataset.py", ["--manifest", "{manifest}", "--out", "{ro}/shards", "--num_shards", "1"],
     "Read-only file system"),
    ("make_demo_data.py", ["--out", "{ro}/demo", "--num-files", "1", "--num-val", "1", "--num-noise", "0"],
     "Read-only file system"),
    ("pretrain.py", ["--config", "{missing}"], "{missing}"),
    ("benchmark_encoder.py", ["--config", "{missing}", "--device", "cpu", "--dtype", "fp32"], "{missing}"),
    ("benchmark_train.py", ["--config", "{missing}", "--device", "cpu", "--dtype", "fp32", "--modes", "eager"],
     "{missing}"),
    ("benchmark_data.py", ["--workers", "one"], "'one'"),
    ("pretrain.py", ["--config", TINY, "model.train_ds.manifest_filepath={manifest}",
                     "model.validation_ds.manifest_filepath={manifest}", "exp_manager.exp_dir={ro}/exp"],
     "exp_manager.exp_dir: cannot write the run directory {ro}/exp/"),
]
BAD_OPTION = ["check_data.py", "extract_features.py", "export.py", "estimate.py", "probe.py", "make_manifest.py",
              "make_tarred_dataset.py", "make_demo_data.py", "benchmark_data.py", "benchmark_encoder.py",
              "benchmark_memory.py", "benchmark_train.py", "batch_search.py", "benchmark_batch_search.py"]


def run(script: str, argv: list[str], capsys) -> tuple[int, list[str], str]:
    main = runpy.run_path(str(ROOT / "scripts" / script))["main"]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()], err


@pytest.mark.parametrize("script,argv,needle", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_mistake_is_one_line_and_a_nonzero_exit_and_debug_shows_the_traceback(files, script, argv, needle,
                                                                                capsys):
    argv = [a.format(**files) for a in argv]
    rc, lines, err = run(script, argv, capsys)
    assert rc not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and needle.format(**files) in lines[0], lines[0]
    with pytest.raises(USER_ERRORS):
        runpy.run_path(str(ROOT / "scripts" / script))["main"]([*argv, "--debug"])


@pytest.mark.parametrize("script", BAD_OPTION)
def test_a_bad_option_is_one_line_and_exit_2(script, capsys):
    rc, lines, err = run(script, ["--no-such-option", "x"], capsys)  # or a required one missing: argparse's first
    assert rc == 2 and len(lines) == 1 and ": error: " in lines[0] and "(--help for the usage)" in lines[0], err


def test_export_refuses_an_out_extension_that_does_not_match_the_format(files, capsys):
    rc, lines, err = run("export.py", [str(files["nemo"]), "--out", str(files["tmp"] / "x.txt")], capsys)
    assert rc == 2 and len(lines) == 1 and "--format pt2 writes a .pt2 file" in lines[0], err
    assert not (files["tmp"] / "x.txt").exists()

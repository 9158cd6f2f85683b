"""`make gpu-check` (scripts/gpu_check.sh): its CPU dry run lists the steps, limits and compile estimate, writes
nothing, and every script and option it would call exists; its first step refuses a run that does not use the
kernels."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(outdir):
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(outdir), "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_dry_run_lists_steps_limits_and_compiles_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu"
    run = _dry_run(out)
    assert run.returncode == 0, run.stderr
    steps = re.findall(r"^step (\S+) \(limit (\d+)s\): (.*)$", run.stdout, re.M)
    assert [s[0] for s in steps] == ["kernels_used", "gpu_tests", "bench", "train"]
    assert sum(int(s[1]) for s in steps) <= 450  # 8 minutes with start-up to spare
    assert re.search(r"Triton compiles \(estimate\): \d+-\d+", run.stdout)
    assert "NEST_SSL_PIN_KERNEL_CONFIGS=1" in run.stdout
    for _, _, cmd in steps:  # every result file lands under OUTDIR
        outputs = re.findall(r"--(?:out|csv|junitxml)[= ](\S+)", cmd)
        assert outputs and all(o.startswith(str(out)) for o in outputs), cmd
    assert not out.exists()


def test_dry_run_commands_name_existing_files_and_options(tmp_path):
    steps = re.findall(r"^step \S+ \(limit \d+s\): (.*)$", _dry_run(tmp_path).stdout, re.M)
    for cmd in steps:
        words = cmd.split()
        for path in [w for w in words if w.endswith((".py", ".yaml"))]:
            assert (ROOT / path).exists(), path
        script = next((w for w in words if w.endswith(".py") and "/" in w and not w.startswith("tests/")), None)
        if script and "pytest" not in cmd:
            helps = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120,
                                   cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}).stdout
            for opt in re.findall(r"(--[a-z][a-z-]*)", cmd):
                assert opt in helps, f"{script} has no {opt}"


def test_gpu_tests_check_the_first_backward_of_a_fresh_autotune_key(tmp_path):
    # The autotuner's benchmark runs once per new key; a check on warmed-up keys would miss what it corrupts.
    cmd = next(c for n, c in re.findall(r"^step (\S+) \(limit \d+s\): (.*)$", _dry_run(tmp_path).stdout, re.M)
               if n == "gpu_tests")
    sources = [(ROOT / w).read_text() for w in cmd.split() if w.startswith("tests/")]
    assert "-m gpu" in cmd and any("@pytest.mark.gpu" in s and "def test_gpu_first_backward_of_a_fresh_autotune_key"
                                   in s and "cache.clear()" in s for s in sources)


def test_missing_outdir_is_a_usage_error():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "usage" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_kernel_check_refuses_when_auto_does_not_pick_triton():
    from nest_ssl.conformer.kernel_check import check_kernels_used
    with pytest.raises(RuntimeError, match="not the ones used.*auto: parameters on cpu"):
        check_kernels_used(torch.device("cpu"), d_model=32, n_heads=2, frames=160)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_0(flag, tmp_path):
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), flag], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode == 0 and not run.stderr, run.stderr
    assert run.stdout.startswith("One GPU check") and "OUTDIR [--dry-run]" in run.stdout
    assert "set -euo" not in run.stdout and not list(tmp_path.iterdir())  # the text only; nothing written

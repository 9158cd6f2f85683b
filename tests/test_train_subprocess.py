"""Real signals on a real process: SIGUSR1 -> checkpoint + requeue exit code; kill -9 -> exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nest_ssl import checkpoint as ckpt
from nest_ssl.train import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE
from tests.train_support import make_data, run_config, train_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("demo"))


def default_sigint() -> None:
    """The child's SIGINT as a terminal gives it: a test runner started in the background (make test &, CI) has
    SIGINT ignored, and an ignored signal stays ignored across exec (Python would then install no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cfg: dict, tmp_path: Path, sleep: float) -> subprocess.Popen:
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_support.py"), str(tmp_path / "cfg.json"),
                             str(sleep)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=default_sigint)


def wait_for(pred, proc, timeout=60.0):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stdout.read().decode()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (Linux: the SigCgt mask in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def start_training(data, tmp_path: Path, sleep: float) -> subprocess.Popen:
    """A long tiny run (steps of `sleep` seconds) whose signal handlers are installed: train() writes config.yaml
    before it installs them, and on a loaded machine a signal sent in between killed the process (exit -10).
    Python catches SIGINT from the start, so SIGUSR1's handler is the one to wait for; SIGINT's is set just after."""
    proc = start(run_config(data, tmp_path / "exp", max_steps=10_000, val_every=10_000), tmp_path, sleep=sleep)
    wait_for(lambda: catches(proc.pid, signal.SIGUSR1), proc)
    time.sleep(0.5)
    return proc


def lasts(exp):
    d = Path(exp, "tiny", "checkpoints")
    return list(d.glob("*-last.ckpt")) if d.is_dir() else []


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_with_requeue_code(data, tmp_path):
    proc = start_training(data, tmp_path, sleep=0.02)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(60) == REQUEUE_EXIT_CODE, proc.stdout.read().decode()
    (path,) = lasts(tmp_path / "exp")
    state = torch.load(path, weights_only=True)
    assert 0 < state["global_step"] < 10_000


@pytest.mark.slow
def test_first_ctrl_c_checkpoints_at_the_current_step_and_exits_130(data, tmp_path):
    proc = start_training(data, tmp_path, sleep=0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == INTERRUPT_EXIT_CODE
    out = proc.stdout.read().decode()
    (path,) = lasts(tmp_path / "exp")
    step = torch.load(path, weights_only=True)["global_step"]
    assert 0 < step < 10_000 and "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert f"step {step}: Ctrl-C; checkpoint {path}; exiting with {INTERRUPT_EXIT_CODE}" in out.splitlines(), out


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(data, tmp_path):
    """Each step sleeps 20 s: the first Ctrl-C would wait for the step's end, the second ends the process now."""
    proc = start_training(data, tmp_path, sleep=20.0)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: not catches(proc.pid, signal.SIGINT), proc, timeout=10)  # the first one was handled
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == -signal.SIGINT and time.monotonic() - t0 < 10
    assert lasts(tmp_path / "exp") == []


@pytest.mark.slow
def test_kill9_then_resume_is_bit_exact(data, tmp_path):
    full = train_tiny(run_config(data, tmp_path / "a", max_steps=12, val_every=2))
    proc = start(run_config(data, tmp_path / "b", max_steps=12, val_every=2), tmp_path, sleep=0.15)
    wait_for(lambda: any("step=6" in p.name or "step=8" in p.name for p in lasts(tmp_path / "b")), proc)
    proc.kill()  # SIGKILL: no handler runs; the atomic writes must leave a loadable checkpoint
    proc.wait()
    rest = train_tiny(run_config(data, tmp_path / "b", max_steps=12, val_every=2))
    assert 0 < len(rest["losses"]) < 12
    assert rest["losses"] == full["losses"][12 - len(rest["losses"]):]
    a = ckpt.load(lasts(tmp_path / "a")[0])["state_dict"]
    b = ckpt.load(lasts(tmp_path / "b")[0])["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_script_config_error_exits_1_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/pretrain.py", "--config-path", "configs", "--config-name",
                           "nest_tiny_cpu", "model.train_ds.manifest_filepath=x.json",
                           "model.validation_ds.manifest_filepath=x.json", f"exp_manager.exp_dir={tmp_path}",
                           "trainer.max_stepz=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "max_stepz" in proc.stderr
    assert not any(tmp_path.iterdir())

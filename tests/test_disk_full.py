"""A full disk ends the run with exit 74 and one line `error: no space left on device writing PATH ...`, whatever
the free space: nothing half-written left, the earlier checkpoints intact (issue 25 §4). Real small tmpfs mounts as
exp_dir (conftest.small_disk; mounting needs root: skipped otherwise); the stand-in model carries ~1 MB of frozen
weights, the size of the tiny NEST model's checkpoint, through scripts/pretrain.py's own error handling."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nest_ssl import checkpoint as ckpt
from nest_ssl.checkpoint import DISK_FULL_EXIT_CODE
from tests.train_support import make_data, run_config

ROOT = Path(__file__).resolve().parents[1]
BALLAST = 250_000  # frozen float32 weights: ~1 MB per checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("demo"))


@pytest.mark.slow
@pytest.mark.parametrize("free", [0, 8 * 1024, 100 * 1024, 2**20, 2 * 2**20], ids=["0", "8K", "100K", "1M", "2M"])
def test_a_full_disk_exits_74_with_one_line_and_keeps_earlier_checkpoints(data, small_disk, tmp_path, free):
    exp = small_disk(free)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(run_config(data, exp, max_steps=6, val_every=2)))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "train_support.py"), "--pretrain", str(BALLAST),
                          "--config", str(cfg)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == DISK_FULL_EXIT_CODE, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith(f"error: no space left on device writing {exp}"), errors[0]
    assert not [p for p in exp.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written
    for path in exp.rglob("*.ckpt"):  # what was written before is whole
        assert ckpt.load(path)["global_step"] > 0

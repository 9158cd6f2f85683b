"""Shared test settings: fixture paths, markers, determinism."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity"
SPEC = FIXTURES / "spec"

# One thread per pytest-xdist worker keeps CPU results reproducible and the 2-core CI machine unoversubscribed.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: slower CPU test (still run by make test)")
    config.addinivalue_line("markers", "numerics: compares numbers with a reference from another run or machine "
                                       "(golden losses, NeMo parity, kernel vs torch); `make test-numerics` runs "
                                       "them again under another CPU dispatch")
    # Triton's interpreter (TRITON_INTERPRET=1) turns 1-element arrays into scalars, which NumPy >= 1.25 deprecates:
    # hundreds of identical warnings per run that are not ours. Only that message from that module is dropped.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0 to a scalar"
                                              ":DeprecationWarning:triton.runtime.interpreter")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_interpret():
    """Skip unless Triton kernels can run here: on a GPU, or on CPU under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (make test sets it)")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_disk(tmp_path):
    """mount(free_bytes) -> a directory on a fresh tmpfs with that much free space; unmounted afterwards."""
    mounts = []

    def mount(free: int) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        size = max(free, 64 * 1024)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs for the full-disk test (needs root): {done.stderr.strip()}")
        mounts.append(d)
        if free < size:  # fill it down to `free` bytes (tmpfs counts whole pages)
            with open(d / "filler", "wb") as f:
                try:
                    f.write(b"\0" * (size - free))
                    f.flush()
                except OSError:
                    pass
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], check=False)

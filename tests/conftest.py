"""Shared test settings: fixture paths, markers, determinism."""
import os
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

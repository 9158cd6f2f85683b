"""Run the NeMo parity checker (a copy of shared/parity/parity_check.py) against our adapter, one test per check.

A check whose adapter function does not exist yet is reported as skipped by the checker; this test then fails,
so a missing piece can never pass silently.
"""
import importlib.util
import io
from contextlib import redirect_stdout

import pytest

from conftest import PARITY

CHECKS = ["features", "pre_encode", "encode", "quantize", "mask", "decode", "mlm_loss", "forward", "train_grads",
          "noam_lr", "augment", "augment_with_decisions"]


def _checker():
    spec = importlib.util.spec_from_file_location("parity_check", PARITY / "parity_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("check", CHECKS)
def test_nest_tiny_matches_nemo(check):
    checker = _checker()
    adapter = checker.load_adapter("nest_ssl.testing.nemo_parity")
    if not adapter.has(check):
        pytest.fail(f"adapter function {check!r} is missing from nest_ssl.testing.nemo_parity")
    out = io.StringIO()
    with redirect_stdout(out):
        rc = checker.run(PARITY / "nest_tiny", adapter, require_all=True, only={check})
    text = out.getvalue()
    assert "warning: files missing" not in text, text
    assert rc == 0, text
    assert " ok" in text, text  # at least one compared row

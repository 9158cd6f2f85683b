"""Adapter between NeMo's parity checker (tests/fixtures/parity/parity_check.py) and nest_ssl.

Every function takes and returns numpy arrays, builds our modules from the parity set's NeMo `model` config,
loads the set's NeMo state_dict strictly (no key mapping: our attribute names are NeMo's) and runs them.

    python tests/fixtures/parity/parity_check.py tests/fixtures/parity/nest_tiny --adapter nest_ssl.testing.nemo_parity
"""
from __future__ import annotations

import numpy as np
import torch


def _t(x, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if dtype is None else t.to(dtype)


def _sub_state(state_dict: dict, prefix: str) -> dict:
    """The tensors under `prefix.` with the prefix stripped, as torch tensors."""
    n = len(prefix) + 1
    return {k[n:]: _t(v) for k, v in state_dict.items() if k.startswith(prefix + ".")}


# ---- front-end (preprocessor) ----------------------------------------------------------------------


# ---- encoder ----------------------------------------------------------------------------------------


# ---- SSL heads, losses, augmentation, full models -----------------------------------------------


# ---- optimisation (NoamAnnealing) -------------------------------------------------------------------

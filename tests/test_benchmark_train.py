"""The training-step benchmark runs end to end on CPU and writes rows with the issue's columns."""
import csv

import torch

from nest_ssl.benchmark import COLUMNS, append_rows, run_mode


def test_one_cpu_step_gives_a_full_row(tmp_path):
    row = run_mode("configs/nest_tiny_cpu.yaml", [], "eager", batch=2, seconds=2.0, dtype="fp32", steps=1,
                   warmup=0, device=torch.device("cpu"))
    assert set(row) == set(COLUMNS)
    assert row["step_ms"] > 0 and row["audio_s_per_s"] > 0 and row["gpu_name"] == "cpu"
    append_rows(tmp_path / "train.csv", [row, row])
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and list(rows[0]) == COLUMNS


def test_unknown_mode_is_rejected_with_the_allowed_list():
    import pytest

    from nest_ssl.benchmark import build
    with pytest.raises(ValueError, match="allowed: eager, triton, eager\\+compile, triton\\+compile"):
        build("configs/nest_tiny_cpu.yaml", [], "fast", torch.device("cpu"))

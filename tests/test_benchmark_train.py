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


def test_real_data_mode_uses_the_config_loader(tmp_path):
    from tests.train_support import make_data
    data = make_data(tmp_path / "demo")
    overrides = [f"model.train_ds.manifest_filepath={data['train']}", f"model.train_ds.noise_manifest={data['noise']}",
                 "model.train_ds.batch_size=3", "model.train_ds.num_workers=0"]
    row = run_mode("configs/nest_tiny_cpu.yaml", overrides, "eager", batch=99, seconds=99.0, dtype="fp32", steps=3,
                   warmup=1, device=torch.device("cpu"), real=True)
    assert row["batch"] == 3 and 0 < row["utt_seconds"] < 99  # what the loader delivered, not --batch/--seconds
    assert 0 < row["data_wait"] < 1 and row["audio_s_per_s"] > 0 and row["config"].endswith("[real data]")


def test_mfu_denominator_per_gpu():
    import math

    from nest_ssl.benchmark import peak_bf16_flops
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12 and math.isnan(peak_bf16_flops("cpu"))

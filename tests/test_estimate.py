"""scripts/estimate.py: meta-device activation count equals a real CPU forward's, memory and wall-clock arithmetic."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PARITY
from nest_ssl.estimate import estimate, parameter_counts, saved_activation_bytes
from nest_ssl.nemo_compat import build_model
from nest_ssl.run_config import load_config

ROOT = Path(__file__).resolve().parent.parent


def tiny_model_cfg():
    return json.loads((PARITY / "nest_tiny" / "config.json").read_text())["model"]


def real_saved_bytes(model, batch, seconds):
    """The same count on real CPU tensors, deduplicated by data pointer."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    frames = int(round(seconds / 0.01))
    frames += -frames % 16
    feats = torch.randn(batch, 80, frames)
    lens = torch.full((batch,), frames)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc, enc_len = model.encoder(feats, lens)
        lp = model.decoder(enc)
        model.loss(torch.ones_like(feats), lp, torch.zeros(lp.shape[:2] + lp.shape[3:], dtype=torch.long), enc_len)
    return sum(seen.values())


@pytest.mark.parametrize("batch,seconds", [(1, 1.0), (3, 2.37)])
def test_meta_activation_count_equals_a_real_forward(batch, seconds):
    cfg = tiny_model_cfg()
    meta = build_model(cfg, device="meta")
    torch.manual_seed(0)
    real = build_model(cfg).train()
    assert saved_activation_bytes(meta, batch, seconds) == real_saved_bytes(real, batch, seconds) > 0


def test_parameter_counts_match_a_built_model():
    cfg = tiny_model_cfg()
    real = build_model(cfg)
    total, trainable, _ = parameter_counts(build_model(cfg, device="meta"))
    assert total == sum(p.numel() for p in real.parameters())
    assert trainable == sum(p.numel() for p in real.parameters() if p.requires_grad) < total  # frozen quantizer


def test_estimate_arithmetic():
    plain, run = load_config(ROOT / "configs" / "nest_tiny_cpu.yaml", [])
    e = estimate(plain, run, hours=10, gpus=2, mfu=0.5, peak_tflops=100, seconds=4.0)
    n = e["trainable"]
    assert e["memory"]["gradients"] == 4 * n and e["memory"]["optimizer"] == 8 * n  # adamw: two fp32 states
    assert e["memory"]["ddp_buckets"] == 4 * n and e["memory"]["autocast_weight_cache"] == 0  # precision 32
    assert e["batch"] == 4
    assert e["wall_clock_s"] == pytest.approx(10 * 3600 * e["flops_per_audio_second"] / (2 * 100e12 * 0.5))
    assert e["activation_bytes_per_audio_second"] == pytest.approx(e["memory"]["activations"] / (4 * 4.0))
    with pytest.raises(ValueError, match="mfu"):
        estimate(plain, run, mfu=1.5)


def test_cli_prints_the_report():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "estimate.py"), str(ROOT / "configs" /
                          "nest_tiny_cpu.yaml"), "trainer.precision=bf16", "--gpus", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert "parameters" in out and "GFLOP" in out and "autocast_weight_cache" in out and "wall-clock" in out


def test_the_gpu_count_comes_from_the_config_and_tiny_times_are_not_zero():
    from nest_ssl.estimate import format_report, human_duration
    from nest_ssl.run_config import load_config

    plain, run = load_config(ROOT / "configs" / "nest_tiny_cpu.yaml", ["model.train_ds.manifest_filepath=a.json",
                                                                      "model.validation_ds.manifest_filepath=b.json"])
    report = format_report(estimate(plain, run), "tiny")
    assert "1 GPU(s) (trainer.devices=1 x num_nodes=1)" in report and "8 GPU" not in report
    assert not any(line.rstrip().endswith(": 0 s") for line in report.splitlines())
    assert " 0.00 GiB" not in report  # a 256k-parameter model is shown in MiB
    run.trainer.devices, run.trainer.num_nodes = -1, 2
    assert "--gpus not given" in format_report(estimate(plain, run), "all visible")
    assert estimate(plain, run, gpus=3)["gpus"] == 3
    assert [human_duration(s) for s in (0.0003, 0.17, 4.25, 86)] == ["0.3 ms", "170 ms", "4.2 s", "86 s"]

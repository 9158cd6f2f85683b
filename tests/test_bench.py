"""`make bench` on CPU: the torch providers run, Triton rows are skipped with a reason, rows have the columns."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cpu_bench_writes_rows_for_both_kernels(tmp_path):
    out = tmp_path / "bench.csv"
    run = subprocess.run([sys.executable, str(ROOT / "kernels" / "bench.py"), "--quick", "--providers", "torch,triton",
                          "--modes", "fwd,fwd+bwd", "--reps", "2", "--out", str(out)], capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Triton rows need a GPU" in run.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert {r["kernel"] for r in rows} == {"rel_pos_attention", "conv_module", "conv_module_xl", "conv_core",
                                           "conv_gemms"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(float(r["ms_p50"]) > 0 and r["git_sha"] and r["gpu_name"] == "cpu" for r in rows)
    # GB/s only where the timed code is the code whose bytes are counted (the core between the two GEMMs)
    assert all(float(r["gbps"]) > 0 for r in rows if r["kernel"] == "conv_core")
    assert all(r["gbps"] == "nan" for r in rows if r["kernel"] != "conv_core")


def test_triton_modes_fail_on_cpu_instead_of_falling_back():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    train = subprocess.run([sys.executable, "scripts/benchmark_train.py", "--config", "configs/nest_tiny_cpu.yaml",
                            "--modes", "triton", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env=env)
    assert train.returncode == 2 and "needs a CUDA GPU" in train.stderr
    enc = subprocess.run([sys.executable, "scripts/benchmark_encoder.py", "--config", "configs/nest_tiny_cpu.yaml",
                          "--device", "cpu", "--dtype", "fp32", "--batch", "1", "--seconds", "1", "--steps", "1",
                          "--warmup", "0", "--attention-impl", "triton"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    assert enc.returncode != 0 and "need a CUDA device" in enc.stderr

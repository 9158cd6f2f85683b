"""The committed sm_90 static report (kernels/results/sm90_static.csv, `make kernel-report`) is current and clean.

Compiling every configuration takes minutes of CPU, so the report is committed with a hash of the kernel sources; these
tests check that the hash is current, that no reachable configuration over-sizes shared memory, spills or drops below
the occupancy floor (every row is clean; a known-debt entry would need a cap and a reason), and recompile
the bf16 NEST-L configurations of the kernels that changed most to confirm the committed rows.
"""
import csv
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "kernels" / "results" / "sm90_static.csv"


SR = importlib.import_module("nest_ssl.kernels.static_report")
ROWS = list(csv.DictReader(REPORT.open())) if REPORT.exists() else []

# Known debt (kernel, dtype, head-dim block) -> the most spill-load bytes per thread allowed. Empty: no reachable
# configuration spills. A new entry needs a reason here and in README ("Kernel static report").
KNOWN_SPILLS: dict[tuple[str, str, int], int] = {}


def test_report_is_current_for_the_kernel_sources():
    assert ROWS, f"{REPORT} is missing: run `make kernel-report`"
    assert {r["src_sha256"] for r in ROWS} == {SR.source_hash()}, \
        "the kernels changed since the report was made: run `make kernel-report` and commit the CSV"


def test_report_covers_every_kernel_family():
    kernels = {r["kernel"] for r in ROWS}
    assert {"_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_glu_dwconv_fwd",
            "_affine_silu_fwd", "_affine_silu_bwd", "_dwconv_glu_bwd"} <= kernels
    assert {(r["dtype"], r["block_d"]) for r in ROWS if r["kernel"] == "_bwd_dq_kernel"} == \
        {("bf16", "64"), ("bf16", "128"), ("fp32", "64"), ("fp32", "128")}


def test_no_reachable_configuration_oversizes_or_spills_beyond_the_known_debt():
    for r in ROWS:
        where = f"{r['kernel']} {r['dtype']} d{r['block_d']} {r['config']} w{r['num_warps']}"
        assert int(r["smem"]) <= SR.SM90["smem_cta"], f"{where} needs {r['smem']} B of shared memory"
        assert int(r["warps_per_sm"]) >= SR.FLOOR["conv" if "glu" in r["kernel"] or "silu" in r["kernel"]
                                                  else "attn"], f"{where}: {r['warps_per_sm']} warps per SM"
        cap = KNOWN_SPILLS.get((r["kernel"], r["dtype"], int(r["block_d"])), 0)
        assert int(r["spill_load"]) <= cap, f"{where} spills {r['spill_load']} B per thread (allowed {cap})"


def test_every_reachable_configuration_is_clean():
    # clean = no spill, fits sm_90's shared memory, at least the occupancy floor (static_report.row).
    assert ROWS and all(r["clean"] == "True" for r in ROWS), [r for r in ROWS if r["clean"] != "True"]


def test_dq_atomics_are_relaxed_and_the_attention_loops_have_no_gpu_fences():
    for r in ROWS:
        if r["kernel"].startswith("_bwd_dq") and r["dtype"] == "bf16":
            # Before: acq_rel atomics, each wrapped in MEMBAR.ALL.GPU (70 in the loop); now relaxed RED, no fence.
            assert int(r["atomics_loop"]) > 0 and int(r["membar_gpu_loop"]) == 0, r


@pytest.mark.slow
def test_representative_configurations_recompile_to_their_committed_rows(tmp_path):
    pytest.importorskip("triton")
    kernels = "_bwd_dq_kernel,_glu_dwconv_fwd,_dwconv_glu_bwd"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles, not the interpreter
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "static.csv"
    run = subprocess.run([sys.executable, str(ROOT / "kernels" / "static_report.py"), "--only", kernels, "--dtypes",
                          "bf16", "--block-d", "64", "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]  # 1 = a row is not clean
    fresh = list(csv.DictReader(out.open()))
    key = lambda r: (r["kernel"], r["dtype"], r["block_d"], r["config"], r["num_warps"], r["num_stages"])
    committed = {key(r): r for r in ROWS}
    assert fresh
    for r in fresh:
        want = committed[key(r)]
        assert [r[c] for c in ("regs", "spill_load", "smem", "wgmma")] == \
            [want[c] for c in ("regs", "spill_load", "smem", "wgmma")], key(r)

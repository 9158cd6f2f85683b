"""README's kernel tables, rendered from the sm_90 report (kernels/results/sm90_static.csv), never written by hand:

    python kernels/report_table.py        # prints the block README holds between its sm90-table markers

tests/test_static_report.py checks that README holds exactly this block, so its figures follow the report. The
tables show the binaries of the T = 750 launches; those only a T divisible by 16 compiles stay in the CSV alone.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parent / "results" / "sm90_static.csv"
START, END = "<!-- sm90-table start: python kernels/report_table.py -->", "<!-- sm90-table end -->"
SHORT = {"_fwd_kernel": "fwd", "_bwd_preprocess": "bwd delta", "_bwd_dkdv_kernel": "dk/dv", "_bwd_dq_kernel": "dq",
         "_glu_dwconv_fwd": "GLU+dwconv fwd", "_bn_finalize_fwd": "BN finalize", "_affine_silu_fwd": "BN+SiLU fwd",
         "_affine_silu_bwd": "BN+SiLU bwd", "_dwconv_glu_bwd": "dwconv+GLU bwd", "_column_sums": "column sums"}
ATTENTION = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
DIVISIBLE = "T%16=0"  # the label suffix of the T = 752 launches (kernels/launches.py)


def _t750(row: dict) -> list[str]:
    """The shipped shapes whose T = 750 launch compiles to this binary, without the precision (the dtype column)."""
    labels = [label.split(" ", 1)[1] for label in row["launches"].split(", ")]
    return list(dict.fromkeys(label for label in labels if not label.endswith(DIVISIBLE)))


def _shapes(row: dict) -> str:
    return ", ".join(_t750(row))


def _dtypes(row: dict) -> str:
    """Every precision whose T = 750 launches compile to this binary (one binary can serve several: bf16 and
    bf16-fsdp where no parameter enters the kernel)."""
    labels = [label for label in row["launches"].split(", ") if not label.endswith(DIVISIBLE)]
    return ", ".join(dict.fromkeys(label.split(" ", 1)[0] for label in labels))


def _config(row: dict) -> str:
    blocks = [row["config"].split(f"{k}=")[1].split(",")[0] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_W")
              if f"{k}=" in row["config"]]
    drop = "" if "DROPOUT" not in row["config"] else (" drop" if "DROPOUT=True" in row["config"] else " no-drop")
    return f"{','.join(blocks)}{drop} w{row['num_warps']}s{row['num_stages']}"


def _figures(row: dict) -> str:
    spill = f"{row['spill_store']}/{row['spill_load']}"
    return f"{row['regs']} | {spill} | {int(row['smem']):,} | {row['ctas_per_sm']} ({row['warps_per_sm']} warps)"


def attention_table(rows: list[dict]) -> list[str]:
    out = ["| kernel | dtype | shapes | blocks M,N,W, dropout, warps/stages | MMA (wgmma / mma.sync in PTX) | regs | "
           "spill st/ld B | smem B | CTAs/SM | atomics per loop |", "|" + "---|" * 10]
    for r in rows:
        if r["kernel"] in ATTENTION:
            mma = f"{r['mma']} ({r['wgmma']} / {r['mma_sync']})" if r["mma"] != "fma" else "fma (IEEE fp32)"
            out.append(f"| {SHORT[r['kernel']]} | {_dtypes(r)} | {_shapes(r)} | {_config(r)} | {mma} | {_figures(r)} |"
                       f" {r['atomic_ops'] or '-'} |")
    return out


def other_table(rows: list[dict]) -> list[str]:
    """The kernels without dots (attention delta, conv module): figures only."""
    out = ["| kernel | dtype | shapes | config | regs | spill st/ld B | smem B | CTAs/SM |", "|" + "---|" * 8]
    for r in rows:
        if r["kernel"] not in ATTENTION:
            cfg = ",".join(kv for kv in r["config"].split(",") if not kv.startswith(("BLOCK_", "RANKS", "LOCAL")))
            out.append(f"| {SHORT[r['kernel']]} | {_dtypes(r)} | {_shapes(r)} | {cfg or '-'} w{r['num_warps']}"
                       f"s{r['num_stages']} | {_figures(r)} |")
    return out


def render(path: Path = REPORT) -> str:
    rows = [r for r in csv.DictReader(path.open()) if _t750(r)]
    return "\n".join([START, "", *attention_table(rows), "", *other_table(rows), "", END])


if __name__ == "__main__":
    sys.stdout.write(render() + "\n")

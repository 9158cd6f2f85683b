"""sm_90 static report: compile every kernel and autotune configuration reachable at NEST-L / NEST-XL for Hopper on a
CPU machine (no GPU needed) and record what the hardware will see: `make kernel-report`.

    python kernels/static_report.py [--out kernels/results/sm90_static.csv] [--only NAME]

Per (kernel, dtype, head-dim/channel block, config): registers per thread, spill store/load bytes (ptxas -v),
shared memory per CTA, CTAs per SM (registers, shared memory and warp slots of an H100/H200), warpgroup MMAs
(`wgmma.mma_async` in the PTX) and, from the SASS of the main loop (the longest backward branch), its instruction count,
memory barriers and atomics. Every row carries `src_sha256`, a hash of the kernel sources and this file, so a test can
tell a stale report from a current one (tests/test_static_report.py).

What is reachable: NEST-L (d_model 512, 8 heads: d_k 64) and NEST-XL (d_model 1024, 8 heads: d_k 128), bf16 (autocast)
and fp32; attention dropout 0.1 in training (DROPOUT=True in every backward kernel, both in the forward), the
conv module with kernel size 9 (its channel count is a runtime argument: one compile serves C = 512 and 1024).

A row is clean when it does not spill, fits sm_90's 227 KB of shared memory per CTA, and keeps at least the
occupancy floor of resident warps per SM: 8 for the attention kernels (two per scheduler: one issues wgmma while another
loads, the FlashAttention-2/3 minimum) and 16 for the bandwidth-bound conv kernels (four per scheduler keep enough
loads in flight to cover HBM latency without asynchronous copies).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "sm90_static.csv"
SOURCES = ("rel_pos_attention.py", "conv_module.py", "static_report.py")
COLUMNS = ["kernel", "dtype", "block_d", "config", "num_warps", "num_stages", "regs", "spill_store", "spill_load",
           "smem", "ctas_per_sm", "warps_per_sm", "wgmma", "sass_total", "sass_loop", "membar_loop",
           "membar_gpu_loop", "atomics_loop", "clean",
           "src_sha256"]
SM90 = dict(regs=65536, smem_sm=233472, smem_cta=232448, warps=64, ctas=32, reserved_smem=1024)
FLOOR = {"attn": 8, "conv": 16}  # resident warps per SM, see the module docstring
PTR_TYPES = {  # pointer arguments: "act" = the activation dtype, else a fixed Triton type
    "attn": dict(Q="act", K="act", V="act", P="act", DO="act", OUT="act", DK="act", DV="act", DQ="act", U="fp32",
                 VB="fp32", LEN="i32", LSE="fp32", DELTA="fp32", DP="fp32", DBIAS="fp32", DQU="fp32", DQV="fp32"),
    "conv": dict(h_ptr="act", dout_ptr="act", dh_ptr="act", out_ptr="act", y_ptr="act", dy_ptr="act", len_ptr="i32",
             stats_ptr="fp64"),
}
FLOAT_SCALARS = {"sm_scale", "qk_scale", "dropout_p", "momentum", "keep", "eps", "unbiased"}


@dataclass
class Case:
    name: str  # kernel function name in its module
    family: str  # "attn" | "conv"
    module: str
    dtype: str  # "bf16" | "fp32"
    block_d: int
    consts: dict
    num_warps: int
    num_stages: int


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


def cases() -> list[Case]:
    """Every (kernel, dtype, d_k or channel block, config) the autotuner or a fixed launch can use at NEST-L/XL."""
    attn = importlib.import_module("nest_ssl.kernels.rel_pos_attention")
    conv = importlib.import_module("nest_ssl.kernels.conv_module")
    out = []
    for dtype in ("bf16", "fp32"):
        for block_d in (64, 128):
            for kernel, dropouts in attn.STATIC_KERNELS:
                for cfg in attn.gpu_configs(kernel, dtype, block_d):
                    for dropout in dropouts:
                        consts = dict(cfg.kwargs, BLOCK_D=block_d, DROPOUT=dropout, UPCAST=False,
                                      IEEE=dtype == "fp32")
                        out.append(Case(kernel, "attn", attn.__name__, dtype, block_d, consts, cfg.num_warps,
                                        cfg.num_stages))
            for kernel, consts, warps, stages in attn.STATIC_FIXED:
                out.append(Case(kernel, "attn", attn.__name__, dtype, block_d, dict(consts, BLOCK_D=block_d), warps,
                                stages))
        for kernel, consts, warps, stages in conv.static_cases():
            out.append(Case(kernel, "conv", conv.__name__, dtype, consts["BLOCK_C"], consts, warps, stages))
    return out


def _signature(fn, case: Case) -> dict:
    act = {"bf16": "bf16", "fp32": "fp32"}[case.dtype]
    sig, types = {}, PTR_TYPES[case.family]
    for arg in fn.arg_names:
        if arg in case.consts:
            sig[arg] = "constexpr"
        elif arg in types or arg.endswith("_ptr"):
            kind = types.get(arg, "fp32")
            sig[arg] = "*" + (act if kind == "act" else kind)
        else:
            sig[arg] = "fp32" if arg in FLOAT_SCALARS else "i32"
    return sig


def compile_case(case: Case) -> dict:
    """Compile one case for sm_90 (no cache) -> the static figures of its cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(case.module), case.name)
    fn = fn if hasattr(fn, "arg_names") else fn.fn  # an autotuned kernel wraps the JITFunction
    src = ASTSource(fn, _signature(fn, case),
                    constexprs={(fn.arg_names.index(k),): v for k, v in case.consts.items() if k in fn.arg_names})
    log = io.StringIO()
    with _ptxas_log(), contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    text = log.getvalue()
    # The kernel's own figures (the log may also list device functions it calls).
    text = text[text.index(f"Compiling entry function '{case.name}'"):]
    regs, spills = re.search(r"Used (\d+) registers", text), re.search(r"(\d+) bytes spill stores, (\d+) bytes spill "
                                                                        r"loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v figures for {case.name}: {text[-500:]}")
    regs, (st, ld) = int(regs.group(1)), (int(x) for x in spills.groups())
    smem = int(kernel.metadata.shared)
    loop = _sass_loop(kernel.asm["cubin"])
    return dict(regs=regs, spill_store=st, spill_load=ld, smem=smem, wgmma=kernel.asm["ptx"].count("wgmma.mma_async"),
                **loop, **_occupancy(regs, smem, case.num_warps))


@contextlib.contextmanager
def _ptxas_log():
    """Fresh compiles (a cache hit would skip ptxas and its -v log) with the log printed to stdout."""
    import triton
    old = (triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile)
    triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile = True, True
    try:
        yield
    finally:
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile = old


def _occupancy(regs: int, smem: int, warps: int) -> dict:
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = SM90["regs"] // (per_warp * warps)
    by_smem = SM90["smem_sm"] // (smem + SM90["reserved_smem"]) if smem <= SM90["smem_cta"] else 0
    ctas = min(by_regs, by_smem, SM90["warps"] // warps, SM90["ctas"])
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * warps)


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _sass_loop(cubin: bytes) -> dict:
    """Instructions, MEMBARs (all, and GPU/system scope: the fences acq_rel atomics bring) and atomics (ATOM/RED) in
    the longest loop of the SASS (a branch to an earlier instruction)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    instrs = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {addr: i for i, (addr, _) in enumerate(instrs)}
    best = (0, 0)
    for i, (_, ins) in enumerate(instrs):
        target = re.search(r"\bBRA\s+(0x[0-9a-f]+)", ins)
        start = index.get(int(target.group(1), 16)) if target else None
        if start is not None and start <= i and i + 1 - start > best[1] - best[0]:
            best = (start, i + 1)
    body = [ins for _, ins in instrs[best[0]:best[1]]]
    return dict(sass_total=len(instrs), sass_loop=len(body), membar_loop=sum("MEMBAR" in s for s in body),
                membar_gpu_loop=sum(bool(re.search(r"MEMBAR\S*\.(GPU|SYS)", s)) for s in body),
                atomics_loop=sum(bool(re.search(r"\b(ATOM|RED)[A-Z]*\.", s)) for s in body))


def row(case: Case, figures: dict, src: str) -> dict:
    cfg = ",".join(f"{k}={v}" for k, v in case.consts.items() if k not in ("BLOCK_D", "UPCAST", "IEEE", "K", "LEFT"))
    clean = (figures["spill_store"] == 0 and figures["spill_load"] == 0 and figures["smem"] <= SM90["smem_cta"]
             and figures["warps_per_sm"] >= FLOOR[case.family])
    return dict(kernel=case.name, dtype=case.dtype, block_d=case.block_d, config=cfg, num_warps=case.num_warps,
                num_stages=case.num_stages, **figures, clean=clean, src_sha256=src)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--only", default="", help="comma list of kernel names (a partial report, for development)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--block-d", default="64,128", help="attention head-dim blocks to compile")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    src = source_hash()
    todo = [c for c in cases() if (not args.only or c.name in args.only.split(",")) and c.dtype in args.dtypes
            and (c.family != "attn" or str(c.block_d) in args.block_d.split(","))]
    rows = []
    for i, case in enumerate(todo):
        rows.append(row(case, compile_case(case), src))
        r = rows[-1]
        print(f"[{i + 1}/{len(todo)}] {r['kernel']} {r['dtype']} d{r['block_d']} {r['config']} w{r['num_warps']}"
              f"s{r['num_stages']}: regs {r['regs']} spill {r['spill_load']} smem {r['smem']} ctas {r['ctas_per_sm']} "
              f"wgmma {r['wgmma']} loop {r['sass_loop']} membar {r['membar_loop']} atomics {r['atomics_loop']}"
              f"{'' if r['clean'] else '  NOT CLEAN'}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    bad = [r for r in rows if not r["clean"]]
    print(f"{len(rows)} configurations, {len(bad)} not clean -> {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

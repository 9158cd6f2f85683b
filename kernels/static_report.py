"""sm_90 static report: compile every kernel launch the shipped configs make, as Triton's launch path compiles it, for
Hopper on a CPU machine (no GPU needed), and record what the hardware will see: `make kernel-report`.

    python kernels/static_report.py [--out kernels/results/sm90_static.csv] [--only NAME,...] [--dtypes fp32,...]

The launches come from kernels/launches.py: the host wrappers run on fake CUDA tensors and every kernel launch (each
config an autotuned kernel's pruner keeps) is recorded with its real arguments. Each is compiled by
`JITFunction.warmup` (the launch's own path: Triton's binder derives the signature and the specialisation, 16-byte
pointer alignment and integers divisible by 16, from those arguments; num_warps/num_stages are the launch's, Triton's
default num_stages=3 where a launch gives none) with a stand-in driver whose target is sm_90. Launches that compile to
the same binary share one row (`launches` lists them).

Per binary: registers per thread, spill store/load bytes (ptxas -v), shared memory per CTA, CTAs per SM (registers,
shared memory and warp slots of an H100/H200), the matrix instructions the dots compile to (`mma`: wgmma, mma.sync or
both, fma for IEEE fp32 dots, - for kernels without dots) with the wgmma and mma.sync counts in the PTX, and, from
the SASS of the main loop (the longest backward branch), its instruction count, memory barriers, atomics and their
opcodes. Every row carries `src_sha256`, a hash of the kernel sources and these two files, so a test can tell a stale
report from a current one (tests/test_static_report.py).

A row is clean when it does not spill, fits sm_90's 227 KB of shared memory per CTA, and keeps at least the
occupancy floor of resident warps per SM: 8 for the attention kernels (two per scheduler: one issues MMAs while another
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
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "sm90_static.csv"
SOURCES = ("rel_pos_attention.py", "conv_module.py", "launches.py", "static_report.py")
COLUMNS = ["kernel", "dtype", "block_d", "config", "num_warps", "num_stages", "regs", "spill_store", "spill_load",
           "smem", "ctas_per_sm", "warps_per_sm", "mma", "wgmma", "mma_sync", "sass_total", "sass_loop", "membar_loop",
           "membar_gpu_loop", "atomics_loop", "atomic_ops", "clean", "launches", "src_sha256"]
SM90 = dict(regs=65536, smem_sm=233472, smem_cta=232448, warps=64, ctas=32, reserved_smem=1024)
FLOOR = {"attn": 8, "conv": 16}  # resident warps per SM, see the module docstring
ATTN_KERNELS = {"_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
HIDDEN = ("BLOCK_D", "BLOCK_C", "UPCAST", "IEEE", "LEFT")  # constexprs not in the config column (block_d, dtype)


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


class _Sm90Driver:
    """What Triton's launch path asks the active driver for before it compiles: device, stream and target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def sm90_launch_path():
    """Triton's launch path compiling for sm_90 on a machine without a GPU (the binary is never loaded)."""
    from triton.runtime import driver
    old = driver._active
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        driver._active = old


def compile_launch(launch):
    """The launch's binary through `JITFunction.warmup` -> (CompiledKernel, ptxas -v log). Its in-memory caches are
    dropped first, so Triton compiles (and ptxas logs) even when this process compiled the same launch before."""
    launch.fn.device_caches.pop(0, None)
    log = io.StringIO()
    with sm90_launch_path(), _ptxas_log(), contextlib.redirect_stdout(log):
        kernel = launch.fn.warmup(*launch.args, grid=(1,), **launch.kwargs)
    return kernel, log.getvalue()


def figures(name: str, kernel, log: str, num_warps: int) -> dict:
    """The static figures of one compiled kernel."""
    # The kernel's own figures (the log may also list device functions it calls).
    text = log[log.index(f"Compiling entry function '{name}'"):]
    regs, spills = re.search(r"Used (\d+) registers", text), re.search(r"(\d+) bytes spill stores, (\d+) bytes spill "
                                                                        r"loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v figures for {name}: {text[-500:]}")
    regs, (st, ld) = int(regs.group(1)), (int(x) for x in spills.groups())
    smem = int(kernel.metadata.shared)
    ptx = kernel.asm["ptx"]
    wgmma, mma_sync = ptx.count("wgmma.mma_async"), len(re.findall(r"\bmma\.sync", ptx))
    kinds = [k for k, n in (("wgmma", wgmma), ("mma.sync", mma_sync)) if n]
    mma = "+".join(kinds) or ("fma" if "tt.dot" in kernel.asm["ttir"] else "-")  # IEEE fp32 dots: FMA loops
    return dict(regs=regs, spill_store=st, spill_load=ld, smem=smem, mma=mma, wgmma=wgmma, mma_sync=mma_sync,
                **_sass_loop(kernel.asm["cubin"]), **_occupancy(regs, smem, num_warps))


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
    atomics = [m.group(0) for s in body if (m := re.search(r"\b(ATOM|RED)[A-Z]*\.\S+", s))]
    return dict(sass_total=len(instrs), sass_loop=len(body), membar_loop=sum("MEMBAR" in s for s in body),
                membar_gpu_loop=sum(bool(re.search(r"MEMBAR\S*\.(GPU|SYS)", s)) for s in body),
                atomics_loop=len(atomics),
                atomic_ops=" ".join(f"{n}x {op}" for op, n in sorted(Counter(atomics).items())))


def row(name: str, dtype: str, consts: dict, options, figs: dict, src: str) -> dict:
    cfg = ",".join(f"{k}={v}" for k, v in consts.items() if k not in HIDDEN)
    family = "attn" if name in ATTN_KERNELS else "conv"
    clean = (figs["spill_store"] == 0 and figs["spill_load"] == 0 and figs["smem"] <= SM90["smem_cta"]
             and figs["warps_per_sm"] >= FLOOR[family])
    return dict(kernel=name, dtype=dtype, block_d=consts.get("BLOCK_D", consts.get("BLOCK_C")), config=cfg,
                num_warps=options["num_warps"], num_stages=options["num_stages"], **figs, clean=clean, launches="",
                src_sha256=src)


def report(only=(), dtypes=None, log=print):
    """Yields one row per distinct binary of the shipped launches (filtered by kernel name and precision), each as
    soon as it is compiled, with the labels of the launches that share it filled in as they come."""
    launches = importlib.import_module("nest_ssl.kernels.launches")
    src = source_hash()
    todo = [(p, x) for p, x in launches.shipped_launches()
            if (dtypes is None or p in dtypes) and (not only or x.name in only)]
    by_binary = {}
    for i, (prec, launch) in enumerate(todo):
        key = _binary_key(launch)
        if key in by_binary:  # the same binary as an earlier launch: name this launch on its row
            by_binary[key]["launches"] += ", " + ", ".join(launch.labels)
            continue
        kernel, text = compile_launch(launch)
        consts = {k: v for k, v in launch.kwargs.items() if k in [launch.fn.arg_names[j] for j in launch.fn.constexprs]}
        meta = kernel.metadata._asdict()
        r = row(launch.name, prec, consts, meta, figures(launch.name, kernel, text, meta["num_warps"]), src)
        r["launches"] = ", ".join(launch.labels)
        by_binary[key] = r
        log(f"[{i + 1}/{len(todo)}] {r['kernel']} {r['dtype']} {r['block_d']} {r['config']} w{r['num_warps']}"
            f"s{r['num_stages']}: regs {r['regs']} spill {r['spill_load']} smem {r['smem']} ctas {r['ctas_per_sm']} "
            f"{r['mma']} (wgmma {r['wgmma']}) loop {r['sass_loop']} atomics {r['atomics_loop']} {r['atomic_ops']}"
            f"{'' if r['clean'] else '  NOT CLEAN'} [{r['launches']}]")
        yield r


def _binary_key(launch) -> str:
    """The key Triton's launch path caches the binary under: the binder's specialisation and options."""
    from triton.runtime.jit import compute_cache_key
    with sm90_launch_path():
        _, key_cache, _, _, binder = launch.fn.device_caches[0]
        _, spec, options = binder(*launch.args, **launch.kwargs)
        return f"{launch.name}:{compute_cache_key(key_cache, spec, options)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--only", default="", help="comma list of kernel names (a partial report, for development)")
    ap.add_argument("--dtypes", default="",
                    help="comma list of precisions (launches.PRECISIONS: fp32, bf16, fp16, bf16-fsdp); default all")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("static_report.py compiles real kernels: run it without TRITON_INTERPRET=1")
    rows = list(report([n for n in args.only.split(",") if n], [d for d in args.dtypes.split(",") if d] or None,
                       log=lambda m: print(m, flush=True)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    bad = [r for r in rows if not r["clean"]]
    print(f"{len(rows)} binaries, {len(bad)} not clean -> {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

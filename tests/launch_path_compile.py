"""Compile kernel launches for sm_90 the way a real launch does, for tests/test_static_report.py (run without
TRITON_INTERPRET, in a subprocess): `python tests/launch_path_compile.py KERNEL:LABEL[#N] ...` prints one JSON line per
launch with the figures the report records (the first launch of KERNEL under LABEL, or its N-th).

Each launch is the host wrapper's own call (kernels/launches.py records its arguments), replayed as
`kernel[grid](*args, **kwargs)`: through the Autotuner for a tuned kernel (it prunes and benchmarks its first config
with a one-run stand-in benchmark), so Triton's `JITFunction.run` binds, specialises and compiles it; the launch then
stops where it would load the binary (the stand-in driver has none). The report (kernels/static_report.py) instead
compiles each recorded launch through `JITFunction.warmup`; this is the path to compare it with.
"""
import contextlib
import io
import json
import sys

from nest_ssl.kernels import launches as L
from nest_ssl.kernels import static_report as SR


class Compiled(Exception):
    """Raised where the launch would load its binary: by then Triton has compiled it."""


class _Driver(SR._Sm90Driver):
    def get_benchmarker(self):
        return lambda kernel_call, quantiles: (kernel_call(), [1.0 for _ in quantiles])[1]

    @property
    def launcher_cls(self):
        raise Compiled


def launch_path_figures(launch) -> dict:
    launch.fn.device_caches.pop(0, None)  # a fresh compile: ptxas logs only when it runs
    log = io.StringIO()
    from triton.runtime import driver
    old = driver._active
    driver.set_active(_Driver())
    try:
        with SR._ptxas_log(), contextlib.redirect_stdout(log):
            try:
                launch.launched[(1,)](*launch.args, **launch.call_kwargs)
            except Compiled:
                pass
            else:
                raise AssertionError(f"{launch.name} launched without compiling")
    finally:
        driver._active = old
    (kernel,) = launch.fn.device_caches[0][0].values()
    meta = kernel.metadata._asdict()
    figs = SR.figures(launch.name, kernel, log.getvalue(), meta["num_warps"])
    consts = {k: v for k, v in launch.kwargs.items() if k in [launch.fn.arg_names[j] for j in launch.fn.constexprs]}
    return SR.row(launch.name, "", consts, meta, figs, "")


def main(specs):
    wanted = {s if "#" in s else s + "#1" for s in specs}
    precisions = {s.split(":", 1)[1].split()[0] for s in wanted}
    seen = {}
    for prec, launch in L.shipped_launches():
        if prec not in precisions:
            continue
        spec = f"{launch.name}:{launch.labels[0]}"
        seen[spec] = seen.get(spec, 0) + 1
        if f"{spec}#{seen[spec]}" in wanted:  # #1: the first launch (first pruned config)
            wanted.remove(f"{spec}#{seen[spec]}")
            n = "" if seen[spec] == 1 else f"#{seen[spec]}"
            print(json.dumps(dict(launch_path_figures(launch), label=launch.labels[0], spec=spec + n)), flush=True)
    if wanted:
        raise SystemExit(f"no recorded launch for {sorted(wanted)}")


if __name__ == "__main__":
    main(sys.argv[1:])

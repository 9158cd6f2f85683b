"""Kernel benchmark: `make bench` (GPU) or `python kernels/bench.py --quick` (tiny CPU run).

One method for every kernel: a provider builds `(fn, inputs)` for a shape, where `fn()` runs the forward and
returns the output and `inputs` are the leaves that need gradients. Modes: fwd, bwd (autograd.grad of a fixed
forward graph), fwd+bwd. GPU timing uses `triton.testing.do_bench` (median, p20, p80) and the peak memory above
the inputs; on CPU a perf_counter loop, no memory, and no Triton rows (they need a GPU). Rows are appended to
kernels/results/bench.csv; PNG plots go beside it when matplotlib is importable (it is not a dependency).

Adding a kernel: put its default dims in KERNELS and decorate builders with `@register("<kernel>", "<provider>")`.
"""
import argparse
import csv
import math
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["kernel", "provider", "mode", "T", "batch", "dtype", "ms_p50", "ms_p20", "ms_p80", "peak_mem_mb",
           "gbps", "copy_gbps", "gpu_name", "torch", "triton", "git_sha", "timestamp"]
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Per kernel: default model dims, full-run lengths and constant token count, quick-run overrides.
KERNELS = {
    "rel_pos_attention": dict(dims=dict(H=8, d=64, dropout=0.0), T=(125, 250, 375, 750, 1500, 3000), tokens=24000,
                              quick=dict(dims=dict(H=2, d=16, dropout=0.0), T=(25, 50), tokens=100)),
    # The whole Conformer conv module (pointwise GEMMs included) at NEST-L (C=512) and NEST-XL (C=1024) widths.
    "conv_module": dict(dims=dict(C=512, K=9), T=(125, 375, 750, 1500), tokens=48000,
                        quick=dict(dims=dict(C=16, K=9), T=(25, 50), tokens=100)),
    "conv_module_xl": dict(dims=dict(C=1024, K=9), T=(125, 375, 750, 1500), tokens=48000,
                           quick=dict(dims=dict(C=32, K=9), T=(25,), tokens=50)),
    # The part between the two GEMMs alone (GLU, depthwise conv, BatchNorm, SiLU): its GB/s is the bytes this code
    # must move divided by its own time. The two pointwise GEMMs are timed on their own as conv_gemms.
    "conv_core": dict(dims=dict(C=512, K=9), T=(125, 375, 750, 1500), tokens=48000,
                      quick=dict(dims=dict(C=16, K=9), T=(25,), tokens=50)),
    "conv_gemms": dict(dims=dict(C=512, K=9), T=(125, 375, 750, 1500), tokens=48000,
                       quick=dict(dims=dict(C=16, K=9), T=(25,), tokens=50)),
}
REGISTRY = {}  # kernel -> {provider: (builder, needs_gpu)}


def register(kernel, provider, needs_gpu=False):
    def deco(builder):
        REGISTRY.setdefault(kernel, {})[provider] = (builder, needs_gpu)
        return builder
    return deco


# ---- rel_pos_attention providers -------------------------------------------------------------------------------
def _attn_inputs(T, batch, dtype, device, dims):
    H, d = dims["H"], dims["d"]
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    q, k, v = mk(batch, H, T, d), mk(batch, H, T, d), mk(batch, H, T, d)  # (B, H, T, d_k)
    p = mk(1, H, 2 * T - 1, d)  # (1, H, 2T-1, d_k): linear_pos(pos_emb), shared by the batch
    u, vb = mk(H, d), mk(H, d)
    # NeMo-style lengths: the last 3/4 of the batch is 10% shorter, so padding is exercised.
    lengths = torch.full((batch,), T, dtype=torch.int64)
    lengths[batch // 4:] = max(1, int(T * 0.9))
    return [q, k, v, p, u, vb], lengths.to(device)


def _attn_mask(lengths, T):
    valid = torch.arange(T, device=lengths.device)[None] < lengths[:, None]  # (B, T)
    return ~(valid[:, None, :] & valid[:, :, None])  # (B, T, T), True = masked


def _eager(T, batch, dtype, device, dims):
    from nest_ssl.conformer.attention import rel_pos_attention_torch
    inputs, lengths = _attn_inputs(T, batch, dtype, device, dims)
    mask = _attn_mask(lengths, T)
    return (lambda: rel_pos_attention_torch(*inputs, mask, dropout_p=dims["dropout"], training=True)), inputs


@register("rel_pos_attention", "torch")
def attn_torch(T, batch, dtype, device, dims):
    return _eager(T, batch, dtype, device, dims)


@register("rel_pos_attention", "torch.compile")
def attn_compile(T, batch, dtype, device, dims):
    from nest_ssl.conformer.attention import rel_pos_attention_torch
    inputs, lengths = _attn_inputs(T, batch, dtype, device, dims)
    mask = _attn_mask(lengths, T)
    # The bwd mode replays one graph's backward (retain_graph=True), which donated buffers forbid.
    torch._functorch.config.donated_buffer = False
    fn = torch.compile(rel_pos_attention_torch)
    return (lambda: fn(*inputs, mask, dropout_p=dims["dropout"], training=True)), inputs


def _bias(inputs, mask):
    """NeMo use_pytorch_sdpa: rel-shifted bd / sqrt(d_k), masked entries -10000, as a dense (B, H, T, T) bias."""
    q, _, _, p, _, vb = inputs
    T, d = q.shape[2], q.shape[3]
    bd = (q + vb[None, :, None, :]) @ p.transpose(-1, -2)  # (B, H, T, 2T-1)
    idx = (T - 1) - torch.arange(T, device=q.device)[:, None] + torch.arange(T, device=q.device)[None]  # (T, T)
    bd = bd.gather(-1, idx.expand(*bd.shape[:2], T, T))  # rel_shift closed form: bd[i, (T-1) - i + j]
    return (bd / math.sqrt(d)).masked_fill(mask[:, None], -10000.0)


@register("rel_pos_attention", "sdpa")
def attn_sdpa(T, batch, dtype, device, dims):
    inputs, lengths = _attn_inputs(T, batch, dtype, device, dims)
    mask = _attn_mask(lengths, T)
    pad = (torch.arange(T, device=device)[None] >= lengths[:, None])[:, None, :, None]  # (B, 1, T, 1)

    def fn():
        q, k, v, _, u, _ = inputs
        out = F.scaled_dot_product_attention(q + u[None, :, None, :], k, v, attn_mask=_bias(inputs, mask),
                                             dropout_p=dims["dropout"])
        return out.masked_fill(pad, 0.0)  # NeMo zeroes fully masked rows after SDPA
    return fn, inputs


@register("rel_pos_attention", "flex")
def attn_flex(T, batch, dtype, device, dims):
    from torch.nn.attention.flex_attention import flex_attention
    inputs, lengths = _attn_inputs(T, batch, dtype, device, dims)
    mask = _attn_mask(lengths, T)
    flex = torch.compile(flex_attention)

    def fn():
        q, k, v, _, u, _ = inputs
        bias = _bias(inputs, mask)  # (B, H, T, T) buffer indexed by score_mod; flex has no attention dropout
        return flex(q + u[None, :, None, :], k, v, score_mod=lambda s, b, h, i, j: s + bias[b, h, i, j])
    return fn, inputs


@register("rel_pos_attention", "triton", needs_gpu=True)
def attn_triton(T, batch, dtype, device, dims):
    # Absolute import: `make bench` runs this file as a script, where relative imports do not work.
    from nest_ssl.kernels.rel_pos_attention import rel_pos_attention
    inputs, lengths = _attn_inputs(T, batch, dtype, device, dims)
    return (lambda: rel_pos_attention(*inputs, lengths, dropout_p=dims["dropout"], training=True)), inputs


# ---- harness ---------------------------------------------------------------------------------------------------
# ---- conv_module providers (NeMo's ConformerConvolution, (B, T, C) in and out) -----------------------------------
def _conv_setup(T, batch, dtype, device, dims, impl):
    from nest_ssl.conformer.conv_module import ConformerConvolution

    torch.manual_seed(0)
    mod = ConformerConvolution(dims["C"], dims["K"], conv_impl=impl).to(device=device, dtype=dtype).train()
    x = (torch.randn(batch, T, dims["C"], device=device) * 0.5).to(dtype).requires_grad_()
    lengths = torch.full((batch,), T, device=device)
    lengths[batch // 4:] = max(1, int(T * 0.9))
    pad = torch.arange(T, device=device)[None] >= lengths[:, None]
    return mod, x, pad


@register("conv_module", "torch")
def conv_torch(T, batch, dtype, device, dims):
    mod, x, pad = _conv_setup(T, batch, dtype, device, dims, "torch")
    return (lambda: mod(x, pad)), [x, *mod.parameters()]


@register("conv_module", "torch.compile")
def conv_compile(T, batch, dtype, device, dims):
    mod, x, pad = _conv_setup(T, batch, dtype, device, dims, "torch")
    # bwd mode replays one graph's backward (retain_graph=True), which donated buffers forbid; the attention
    # provider sets this too, but `--kernel conv_module` alone never runs it.
    import torch._functorch.config as functorch_config
    functorch_config.donated_buffer = False
    fn = torch.compile(mod)
    return (lambda: fn(x, pad)), [x, *mod.parameters()]


@register("conv_module", "triton", needs_gpu=True)
def conv_triton(T, batch, dtype, device, dims):
    mod, x, pad = _conv_setup(T, batch, dtype, device, dims, "triton")
    return (lambda: mod(x, pad)), [x, *mod.parameters()]


REGISTRY["conv_module_xl"] = REGISTRY["conv_module"]  # same providers, XL width


def _core_setup(T, batch, dtype, device, dims):
    mod, x, pad = _conv_setup(T, batch, dtype, device, dims, "torch")
    h = (torch.randn(batch, T, 2 * dims["C"], device=device) * 0.5).to(dtype).requires_grad_()  # (B, T, 2C)
    return mod, h, pad, [h, mod.depthwise_conv.weight, mod.batch_norm.weight, mod.batch_norm.bias]


@register("conv_core", "torch")
def core_torch(T, batch, dtype, device, dims):
    from nest_ssl.conformer.conv_module import glu_dwconv_norm_silu_torch
    mod, h, pad, leaves = _core_setup(T, batch, dtype, device, dims)
    return (lambda: glu_dwconv_norm_silu_torch(h, pad, mod.depthwise_conv, mod.batch_norm, mod.context)), leaves


@register("conv_core", "triton", needs_gpu=True)
def core_triton(T, batch, dtype, device, dims):
    from nest_ssl.kernels.conv_module import conv_glu_dw_bn_silu
    mod, h, pad, leaves = _core_setup(T, batch, dtype, device, dims)
    lengths = (~pad).sum(1)
    dw = mod.depthwise_conv
    return (lambda: conv_glu_dw_bn_silu(h, lengths, dw.weight, dw.bias, mod.batch_norm, mod.context)), leaves


@register("conv_gemms", "torch")
def gemms_torch(T, batch, dtype, device, dims):
    """pointwise_conv1 (C -> 2C) and pointwise_conv2 (C -> C) alone: the module time the core does not cover."""
    mod, x, _ = _conv_setup(T, batch, dtype, device, dims, "torch")
    w1, w2 = mod.pointwise_conv1.weight.squeeze(-1), mod.pointwise_conv2.weight.squeeze(-1)
    c = dims["C"]
    return (lambda: F.linear(F.linear(x, w1, mod.pointwise_conv1.bias)[..., :c], w2, mod.pointwise_conv2.bias)), \
        [x, *mod.parameters()]


def _conv_min_bytes(T, batch, dtype, dims, mode):
    """Least HBM traffic of the path between the two GEMMs (conv_core): fwd reads h (2C) and writes the output (C);
    bwd reads h, the output gradient and y (C), writes dh (2C). Weights and per-channel statistics are negligible."""
    item = torch.tensor([], dtype=dtype).element_size()
    per_frame = {"fwd": 3, "bwd": 7, "fwd+bwd": 10}[mode] * dims["C"] * item
    return per_frame * T * batch


def _copy_bandwidth(device, nbytes=1 << 28):
    """Measured device copy bandwidth (read + write) in GB/s: the roofline the conv path is compared with."""
    if device != "cuda":
        return float("nan")
    import triton.testing
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * nbytes / ms / 1e6


def _mode_fn(fn, inputs, mode):
    if mode == "fwd":
        return lambda: fn()
    if mode == "fwd+bwd":
        def run():
            out = fn()
            torch.autograd.grad(out, inputs, torch.ones_like(out))
        return run
    out = fn()
    grad = torch.ones_like(out)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def _time(run, device, reps):
    if device == "cuda":
        import triton.testing
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        p50, p20, p80 = triton.testing.do_bench(run, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80, peak
    for _ in range(2):  # warm-up (and compile)
        run()
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        ms.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else ms * 9
    return statistics.median(ms), qs[1], qs[7], float("nan")  # CPU: no allocator peak to read


def _env(device):
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=RESULTS.parent).stdout.strip() or "unknown"
    except OSError:
        sha = "unknown"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return dict(gpu_name=gpu, torch=torch.__version__, triton=tv, git_sha=sha)


def run_bench(kernel, providers, modes, Ts, tokens, dtype, device, dims, reps):
    env, rows = _env(device), []
    copy_gbps = _copy_bandwidth(device) if kernel == "conv_core" else float("nan")
    for T in Ts:
        batch = max(1, tokens // T)
        for name in providers:
            builder, needs_gpu = REGISTRY[kernel][name]
            if needs_gpu and device != "cuda":
                print(f"skip {kernel}/{name}: Triton rows need a GPU")
                continue
            for mode in modes:
                try:
                    fn, inputs = builder(T, batch, DTYPES[dtype], device, dims)
                    p50, p20, p80, peak = _time(_mode_fn(fn, inputs, mode), device, reps)
                except Exception as e:  # a baseline failing (OOM, no compiler) must not stop the others
                    if name == "triton":  # our kernels: a failure is a failure, never a skipped row
                        raise
                    print(f"skip {kernel}/{name}/{mode}/T={T}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                prov = name if not dims.get("dropout") else f"{name}+drop{dims['dropout']}"
                # Only where the timed code is the code the bytes count: the whole module's time includes GEMMs.
                gbps = _conv_min_bytes(T, batch, DTYPES[dtype], dims, mode) / p50 / 1e6 \
                    if kernel == "conv_core" else float("nan")
                rows.append(dict(kernel=kernel, provider=prov, mode=mode, T=T, batch=batch, dtype=dtype,
                                 ms_p50=f"{p50:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}",
                                 peak_mem_mb=f"{peak:.1f}", gbps=f"{gbps:.4g}", copy_gbps=f"{copy_gbps:.4g}",
                                 timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), **env))
                print(f"{kernel:18s} {prov:16s} {mode:8s} T={T:5d} B={batch:4d} {p50:9.3f} ms  peak {peak:9.1f} MiB")
    return rows


def write_rows(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)


def plot(rows, outdir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: plots skipped (CSV written)")
        return
    for kernel in sorted({r["kernel"] for r in rows}):
        for mode in MODES:
            sel = [r for r in rows if r["kernel"] == kernel and r["mode"] == mode]
            if not sel:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for prov in sorted({r["provider"] for r in sel}):
                pts = [r for r in sel if r["provider"] == prov]
                Ts = [r["T"] for r in pts]
                axes[0].plot(Ts, [float(r["ms_p50"]) for r in pts], marker="o", label=prov)
                axes[1].plot(Ts, [float(r["peak_mem_mb"]) for r in pts], marker="o", label=prov)
            for ax, yl in zip(axes, ("ms (median)", "peak MiB")):
                ax.set_xlabel("T (constant tokens)")
                ax.set_ylabel(yl)
                ax.set_xscale("log")
                ax.legend()
            fig.suptitle(f"{kernel} {mode} {sel[0]['dtype']} {sel[0]['gpu_name']}")
            fig.savefig(outdir / f"{kernel}_{mode.replace('+', '_')}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="all", help=f"one of {sorted(KERNELS)} or all")
    ap.add_argument("--providers", default="all", help="comma list, or all")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--T", default=None, help="comma list of lengths (default: the kernel's list)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per batch kept constant across T")
    ap.add_argument("--dropout", type=float, default=None, help="attention dropout for providers that have it")
    ap.add_argument("--reps", type=int, default=5, help="CPU timing repetitions")
    ap.add_argument("--quick", action="store_true", help="tiny shapes for a CPU smoke run")
    ap.add_argument("--out", default=None, help="CSV to append to (default results/bench.csv; quick: bench_quick.csv)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    kernels = sorted(KERNELS) if args.kernel == "all" else [args.kernel]
    for name in kernels:
        if name not in KERNELS:
            raise ValueError(f"--kernel={name!r}; allowed: {sorted(KERNELS)} or all")
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        raise ValueError(f"--modes={args.modes!r}; allowed: {MODES}")
    rows = []
    for name in kernels:
        spec = {**KERNELS[name], **(KERNELS[name]["quick"] if args.quick else {})}
        dims = dict(spec["dims"])
        if args.dropout is not None:
            dims["dropout"] = args.dropout
        Ts = [int(t) for t in args.T.split(",")] if args.T else list(spec["T"])
        # A kernel runs the asked providers it has (conv_gemms has only torch); an unknown provider is an error.
        provs = sorted(REGISTRY[name]) if args.providers == "all" else \
            [p for p in args.providers.split(",") if p in REGISTRY[name]]
        unknown = set(args.providers.split(",")) - {p for k in kernels for p in REGISTRY[k]} - {"all"}
        if unknown:
            raise ValueError(f"--providers: {sorted(unknown)} unknown; allowed: "
                             f"{sorted({p for k in kernels for p in REGISTRY[k]})}")
        rows += run_bench(name, provs, modes, Ts, args.tokens or spec["tokens"], dtype, device, dims,
                          args.reps)
    out = Path(args.out or RESULTS / ("bench_quick.csv" if args.quick else "bench.csv"))
    write_rows(rows, out)
    print(f"{len(rows)} rows appended to {out}")
    plot(rows, out.parent)


if __name__ == "__main__":
    main()

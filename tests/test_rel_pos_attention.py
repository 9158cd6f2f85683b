"""Fused relative-position attention kernel vs the torch reference (nest_ssl.conformer.attention).

CPU: TRITON_INTERPRET=1, tiny shapes (each launch takes about a second, so cases are few and chosen to cover
T=1, primes, one past the interpreter's 16-wide blocks, d_k not a power of two, padded and empty rows,
batched p, limited context). GPU (`-m gpu`): NEST-L sizes with stated tolerances.
"""
import pytest
import torch

from nest_ssl.conformer.attention import rel_pos_attention_torch

triton = pytest.importorskip("triton")
from nest_ssl.kernels.rel_pos_attention import dropout_mask_debug, rel_pos_attention  # noqa: E402

# The interpreter converts 1-element arrays to loop bounds; numpy >= 1.25 warns about it on every launch.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(B, H, T, d, p_batch=1, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()
    # q, k, v: (B, H, T, d_k); p: (1 or B, H, 2T-1, d_k); biases (H, d_k) nonzero so their gradients are checked.
    return [mk(B, H, T, d), mk(B, H, T, d), mk(B, H, T, d), mk(p_batch, H, 2 * T - 1, d), mk(H, d), mk(H, d)]


def _att_mask(lengths, T, ctx=(-1, -1)):
    """NeMo encoder mask: (B, T, T), True = masked; limited context keeps j - i in [-L, R]."""
    valid = torch.arange(T, device=lengths.device)[None] < lengths[:, None]  # (B, T)
    keep = valid[:, None, :] & valid[:, :, None]
    if ctx[0] >= 0:
        keep = keep.triu(-ctx[0])
    if ctx[1] >= 0:
        keep = keep.tril(ctx[1])
    return ~keep


def _rel_err(a, b):
    # Floor 0.1 (the gradients here are O(1)): a structurally zero gradient (T=1, a softmax over one key: all but
    # dv) is compared on an absolute scale; the kernel's delta = rowsum(dO * O) cancels dP to rounding, not to the bit.
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(0.1)).item()


def _compare(inputs, lengths, ctx, tol, dropout_p=0.0, seed=None, device="cpu"):
    """Output and all six gradients of the kernel vs the reference run in fp32 on the same values."""
    T = inputs[0].shape[2]
    out = rel_pos_attention(*inputs, lengths, att_context_size=ctx, dropout_p=dropout_p, training=dropout_p > 0,
                            seed=seed)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    mask = None
    if dropout_p > 0:
        B, H = inputs[0].shape[:2]
        mask = dropout_mask_debug(B, H, T, dropout_p, seed, device=device)
    ref = rel_pos_attention_torch(*ref_in, _att_mask(lengths, T, ctx), dropout_p=dropout_p, training=dropout_p > 0,
                                  dropout_mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.float())
    assert out.dtype == inputs[0].dtype and out.shape == ref.shape
    names = ["out", "dq", "dk", "dv", "dp", "dpos_bias_u", "dpos_bias_v"]
    errs = {n: _rel_err(a, b) for n, a, b in zip(names, [out, *grads], [ref, *ref_grads])}
    assert max(errs.values()) <= tol, errs
    return out


CASES = [  # (B, H, T, d_k, lengths, p_batch, att_context_size)
    (1, 1, 1, 16, [1], 1, (-1, -1)),  # T=1: a single key
    (2, 2, 5, 32, [5, 3], 1, (-1, -1)),  # prime T, padded row
    (2, 2, 17, 16, [17, 0], 2, (-1, -1)),  # one past a 16-block; an empty sequence; p per batch row
    (2, 2, 33, 32, [33, 20], 1, (-1, -1)),  # two block boundaries
    (2, 2, 17, 44, [12, 17], 1, (3, 2)),  # NEST-S head dim (not a power of two) + limited context
]


@pytest.mark.numerics
@pytest.mark.parametrize("B,H,T,d,lengths,p_batch,ctx", CASES)
def test_fp32_output_and_grads_match_torch_reference(triton_interpret, B, H, T, d, lengths, p_batch, ctx):
    _compare(_inputs(B, H, T, d, p_batch), torch.tensor(lengths), ctx, tol=1e-5)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_precision_inputs_match_fp32_reference(triton_interpret, dtype, tol):
    # Tolerance: bf16 has 8 mantissa bits (rel. step 7.8e-3); inputs and outputs are rounded, math is fp32.
    _compare(_inputs(2, 2, 17, 16, dtype=dtype), torch.tensor([17, 9]), (-1, -1), tol=tol)


def test_fp32_biases_with_bf16_activations_keep_their_dtype(triton_interpret):
    # Under bf16 autocast the linears give bf16 q/k/v/p while pos_bias_u/v stay fp32 parameters.
    x = _inputs(1, 2, 5, 16, dtype=torch.bfloat16)
    x[4], x[5] = (t.detach().float().requires_grad_() for t in x[4:])
    out = rel_pos_attention(*x, torch.tensor([5]))
    grads = torch.autograd.grad(out.float().sum(), x)
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads] == [t.dtype for t in x]


def test_padded_query_rows_are_zero(triton_interpret):
    out = rel_pos_attention(*_inputs(2, 1, 5, 16), torch.tensor([5, 2]))
    assert torch.all(out[1, :, 2:] == 0) and torch.all(out[0] != 0)


def test_dropout_matches_reference_fed_the_kernel_mask(triton_interpret):
    # Forward and backward must regenerate the same Philox mask for every gradient to match.
    _compare(_inputs(2, 2, 17, 16), torch.tensor([17, 9]), (-1, -1), tol=1e-5, dropout_p=0.3, seed=123)


def test_dropout_same_seed_same_output_other_seed_differs(triton_interpret):
    x = [t.detach() for t in _inputs(1, 2, 9, 16)]
    run = lambda s: rel_pos_attention(*x, torch.tensor([9]), dropout_p=0.5, training=True, seed=s)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_dropout_off_in_eval(triton_interpret):
    x = [t.detach() for t in _inputs(1, 1, 5, 16)]
    ev = rel_pos_attention(*x, None, dropout_p=0.5, training=False, seed=3)
    assert torch.equal(ev, rel_pos_attention(*x, None))


def test_dropout_keep_rate_and_scale(triton_interpret):
    p = 0.3
    m = dropout_mask_debug(2, 2, 64, p, seed=42)
    n = m.numel()
    keep = (m > 0).float().mean().item()
    assert abs(keep - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)  # 5 sigma of a binomial
    assert torch.allclose(torch.unique(m), torch.tensor([0.0, 1 / (1 - p)]))
    assert not torch.equal(m[0, 0], m[0, 1]) and not torch.equal(m[0, 0], m[1, 0])  # streams differ per (b, h)


@pytest.mark.parametrize("bad", ["p_shape", "bias_shape", "lengths_shape", "head_dim", "dropout"])
def test_bad_input_raises_value_error(bad):
    x = [t.detach() for t in _inputs(1, 1, 5, 16)]
    lengths, kw = torch.tensor([5]), {}
    if bad == "p_shape":
        x[3] = x[3][:, :, :-1]
    elif bad == "bias_shape":
        x[4] = x[4][:, :8]
    elif bad == "lengths_shape":
        lengths = torch.tensor([5, 5])
    elif bad == "head_dim":
        x = [t.detach() for t in _inputs(1, 1, 2, 160)]
    else:
        kw = dict(dropout_p=1.0, training=True)
    with pytest.raises(ValueError):
        rel_pos_attention(*x, lengths, **kw)


# ---- GPU, real sizes -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("d", [44, 64, 128])
def test_gpu_nest_sizes_match_reference(dtype, tol, d):
    # fp32 uses IEEE dots (tolerance = accumulation-order noise over T=750 keys); bf16 rounds inputs, P and dS.
    lengths = torch.tensor([750, 700, 512, 1], device="cuda")
    _compare(_inputs(4, 8, 750, d, dtype=dtype, device="cuda"), lengths, (-1, -1), tol=tol, device="cuda")


@pytest.mark.gpu
def test_gpu_dropout_and_limited_context():
    lengths = torch.tensor([257, 200], device="cuda")
    _compare(_inputs(2, 4, 257, 64, device="cuda"), lengths, (64, 32), tol=1e-4, dropout_p=0.1, seed=5,
             device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_gpu_first_backward_of_a_fresh_autotune_key_matches_reference(dtype, tol):
    """The call that benchmarks (do_bench runs each candidate hundreds of times, with gpu-check's pinned configs too)
    gives the reference gradients: the autotune caches are cleared first, so this is each kernel's first call."""
    import importlib
    m = importlib.import_module("nest_ssl.kernels.rel_pos_attention")
    tuned = (m._fwd, m._bwd_dkdv, m._bwd_dq)
    for kernel in tuned:
        kernel.cache.clear()
    lengths = torch.tensor([300, 211], device="cuda")
    _compare(_inputs(2, 4, 300, 64, dtype=dtype, device="cuda"), lengths, (-1, -1), tol=tol, device="cuda")
    assert all(len(k.cache) == 1 for k in tuned)  # each benchmarked exactly this key: the call was a first call


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_T():
    # One (B, H, T, T) fp32 score matrix is 72 MiB here; the kernel's fwd+bwd must stay well below it.
    x = _inputs(4, 8, 750, 64, dtype=torch.bfloat16, device="cuda")
    lengths = torch.full((4,), 750, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = rel_pos_attention(*x, lengths, dropout_p=0.1, training=True)
    out.sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 4 * 8 * 750 * 750 * 4 / 4


def test_autotune_pruner_keeps_the_configs_of_the_launch_dtype_and_head_dim(monkeypatch):
    import importlib
    m = importlib.import_module("nest_ssl.kernels.rel_pos_attention")
    for name in m.CONFIGS:
        union, prune = m._configs(name), m._prune(name)
        for (dtype, d), table in m.CONFIGS[name].items():  # d: a BLOCK_D, or a head dim with its own list (44)
            kept = prune(union, {}, IEEE=dtype == "fp32", BLOCK_D=triton.next_power_of_2(d), D=d)
            assert [str(c) for c in kept] == [str(m._config(*c)) for c in table]
    # NEST-S's own forward list; its backward uses d_k 64's.
    fwd, dq = m._prune("_fwd_kernel"), m._prune("_bwd_dq_kernel")
    assert [str(c) for c in fwd(m._configs("_fwd_kernel"), {}, IEEE=False, BLOCK_D=64, D=44)] == \
        [str(m._config(*c)) for c in m.CONFIGS["_fwd_kernel"][("bf16", 44)]]
    assert [str(c) for c in dq(m._configs("_bwd_dq_kernel"), {}, IEEE=False, BLOCK_D=64, D=44)] == \
        [str(m._config(*c)) for c in m.CONFIGS["_bwd_dq_kernel"][("bf16", 64)]]
    union, prune = m._configs("_bwd_dq_kernel"), m._prune("_bwd_dq_kernel")
    monkeypatch.setenv(m.PIN_ENV, "1")  # gpu-check: one config per kernel
    assert len(prune(union, {}, IEEE=False, BLOCK_D=64)) == 1


def test_memory_is_linear_in_T_and_far_below_eager(triton_interpret):
    """kernels/memory_report.py's live-tensor tracker: on CPU with the kernels running (small shape), and counting
    the allocations at NEST-L training shapes (B 16, H 8, d_k 64, bf16) on the meta device."""
    import importlib
    mem = importlib.import_module("nest_ssl.kernels.memory_report")
    B, H, T, d = 2, 2, 40, 16
    eager, _ = mem.peak_fwd_bwd("eager", B, H, T, d, dtype=torch.float32, device="cpu")
    kernel, largest = mem.peak_fwd_bwd("triton", B, H, T, d, dtype=torch.float32, device="cpu")
    assert kernel < eager and largest < B * H * T * T * 4  # no T x T tensor
    peaks = {T: [mem.peak_fwd_bwd(path, 16, 8, T, 64)[0] for path in ("eager", "triton")] for T in (250, 750)}
    assert peaks[750][1] / peaks[750][0] < 0.15  # measured 0.107 (eager 1154 MiB, triton 124 MiB)
    assert peaks[750][1] / peaks[250][1] < 3.2 < peaks[750][0] / peaks[250][0]  # linear vs quadratic in T


# ---- The first call of a new autotune key -----------------------------------------------------------------------
def _bench_three_runs(kernel_call, quantiles):
    """Stand-in for Triton's do_bench (the interpreter has no timer): each config runs three times, as do_bench runs
    it hundreds of times on a GPU; equal times, so the first pruned config wins."""
    for _ in range(3):
        kernel_call()
    return [1.0 for _ in quantiles]


@pytest.mark.parametrize("keep_one", [False, True])  # two configs benchmarked, or one left by the pruner (pinned)
def test_first_autotuned_call_matches_torch_reference(triton_interpret, monkeypatch, keep_one):
    """The kernels under Triton's own Autotuner (two configs, a fresh cache) give the right output and gradients on
    their FIRST call, the one that benchmarks. Without reset_to_zero on dp it came back 7x (4x with one config)."""
    import importlib
    m = importlib.import_module("nest_ssl.kernels.rel_pos_attention")
    configs = [triton.Config(m.INTERPRET_BLOCKS), triton.Config(dict(BLOCK_M=32, BLOCK_N=16, BLOCK_W=64))]
    prune = (lambda cs, named_args, **kw: cs[:1]) if keep_one else None
    tuned = {name: m.autotuned(getattr(m, name + "_kernel"), configs, prune, do_bench=_bench_three_runs)
             for name in ("_fwd", "_bwd_dkdv", "_bwd_dq")}
    for name, kernel in tuned.items():
        monkeypatch.setattr(m, name, kernel)
    _compare(_inputs(2, 1, 20, 16), torch.tensor([20, 13]), (-1, -1), tol=1e-5, device=triton_interpret)
    assert all(len(k.cache) == 1 for k in tuned.values())  # each kernel benchmarked its key once: a first call


def test_tuned_kernels_reset_every_buffer_they_accumulate_into():
    """Source audit: every pointer a tuned attention kernel atomically adds into is in ACCUMULATES (reset_to_zero),
    and no conv-module kernel is autotuned or uses atomics (each is launched once per step and stores its outputs)."""
    import importlib
    import inspect
    import re
    m = importlib.import_module("nest_ssl.kernels.rel_pos_attention")
    for name in m.CONFIGS:
        src = inspect.getsource(getattr(m, name).fn)
        assert set(re.findall(r"tl\.atomic_\w+\((\w+)", src)) <= set(m.ACCUMULATES[name]), name
    conv = importlib.import_module("nest_ssl.kernels.conv_module")
    kernels = [v for v in vars(conv).values() if hasattr(v, "arg_names")]  # @triton.jit (or autotuned) functions
    assert len(kernels) >= 6 and not any(isinstance(k, triton.runtime.Autotuner) for k in kernels)
    assert not any("atomic_" in inspect.getsource(k.fn) for k in kernels)

"""Fused Transformer-XL relative-position attention (NeMo `RelPositionMultiHeadAttention` core), O(T) memory.

Math, as NeMo's RelPositionMultiHeadAttention computes it (reference: the torch path in
nest_ssl/conformer/attention.py), per batch b and head h, with s = 1/sqrt(d_k):

    ac[i, j]  = (q[i] + u) . k[j]
    bd[i, j]  = (q[i] + v_bias) . p[(T - 1) - i + j]          # NeMo's rel_shift, closed form
    score     = (ac + bd) * s, masked -> excluded             # NeMo: replaced by -10000, probs zeroed after
    ctx[i]    = sum_j dropout(softmax(score)[i, j]) * v[j]    # a fully masked (padded) query row gives 0

Masked (i, j): i >= length, j >= length, or outside the limited context j - i < -L / j - i > R.
For a valid query row NeMo's -10000 entries get exp(-10000 - max) == 0 in fp32, so excluding them is exact.

Reference: `nest_ssl.conformer.attention.rel_pos_attention_torch` (tests compare against it).

How the position term stays on chip: for a (BLOCK_M query x BLOCK_N key) tile the needed p rows
form one window of BLOCK_M + BLOCK_N - 1 consecutive rows. We compute the (BLOCK_M x BLOCK_W) product
(q + v_bias) . window^T and skew it into the score tile with `tl.gather` (column BLOCK_M - 1 - ii + jj).
The backward un-skews d(score) into the window with the inverse gather and accumulates dp with relaxed fp32
atomics (tiles on one diagonal share a window) into a per-batch-row buffer, so only one (b, h)'s query blocks ever
add into the same rows; the host sums it over the batch when p is shared. Nothing of size T x T or T x (2T - 1) is
ever stored.

Backward: `_bwd_preprocess` computes delta = rowsum(dO * O); `_bwd_dkdv_kernel` (a program per key block) and
`_bwd_dq_kernel` (a program per query block) each recompute their score tiles. dq has one fp32 accumulator for
d(q + u) + d(q + v_bias), stored in q's dtype; the bias gradients come from per-program (d_k,) partials (the column
sums of dS against k, and the row sums of dq), so no (B, H, T, d_k) fp32 tensor is allocated. Memory beyond the
inputs and gradients: lse and delta (B, H, T) fp32 and the dp buffer (B, H, 2T - 1, d_k) fp32, all O(T).

Cost model per (b, h), dense (no padding), W = BLOCK_W = 2 * BLOCK_M (the window doubles the position product):
    forward   FLOPs  2T^2 d (q.k) + 2T^2 d W/BLOCK_N (q.window) + 2T^2 d (P.v)                    = 8 T^2 d
    backward  FLOPs  dkdv: recompute 8 + dP 2 + dk 2 + dv 2; dq: recompute 8 + dP 2 + dq 6 + dp 4  = 34 T^2 d
    HBM bytes forward 4 T d s (q, k, v, out; p is shared by the batch and stays in L2) + 4 T (lse), s = itemsize;
              backward 9 T d s (q, k, v, o, dO in; dq, dk, dv out) + 8 (2T - 1) d (dp buffer written, then summed)
NEST-L training call (B 16, H 8, T 750, d 64, bf16): 3.7e10 + 1.5e11 FLOPs, 49 MB + 0.2 GB; ideal on an H100 SXM
(989 TFLOP/s dense bf16, 3.35 TB/s) 37 us forward / 158 us backward, compute-bound; on an H200 (989 TFLOP/s,
4.8 TB/s) the same compute bound. The eager path does 6 T^2 d forward FLOPs but stores (B, H, T, T) fp32 tensors,
0.29 GB each at this shape.

Dropout: Philox (`tl.rand`) keyed by `seed`, counter (b*H + h) << 32 | (i*T + j); the backward and
`dropout_mask_debug` regenerate the same bits. Softmax statistics are kept as a base-2 logsumexp (B, H, T).

Limits: d_k <= 128 (padded to a power of two with masks), T <= 46340 (32-bit i*T + j), CUDA or
TRITON_INTERPRET=1. The interpreter computes every dot in fp32 (its bf16 dot is wrong) and uses one config.
"""
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


# Autotune candidates (BLOCK_M, BLOCK_N, BLOCK_W, num_warps, num_stages) per kernel and (dtype, BLOCK_D or d_k), chosen
# from the sm_90 static report of the launches as they compile (kernels/results/sm90_static.csv): within sm_90's shared
# memory, at least 8 resident warps per SM, no spills (README lists any left). Larger tiles are out because they
# spill: the backward's 64x64 tiles 0.6-2.6 KB per thread, its 32-row bf16 tiles at d_k 128 8-344 B (mma.sync operands
# with K = 128 are held whole per warp), the fp32 dk/dv 32-row tiles 12-24 B as launched (d_k 64 and 128), and fp32
# 64x64 forward tiles need up to 336 KB of shared memory. A head dim with its own entry (d_k 44, NEST-S) uses it: its
# 32x32 forward tiles with 4 warps spilled 8 B (eval, bf16 pos_bias under FSDP, T divisible by 16), with 8 warps not.
# BLOCK_W >= BLOCK_M + BLOCK_N - 1 (the p window of one tile), a power of two. The first entry is the one
# NEST_SSL_PIN_KERNEL_CONFIGS=1 pins.
_SMALL = (16, 16, 32, 4, 2)
_SMALL8 = (16, 16, 32, 8, 2)
CONFIGS = {
    "_fwd_kernel": {("bf16", 64): [(64, 64, 128, 8, 3), (32, 32, 64, 4, 2)], ("bf16", 128): [(32, 32, 64, 4, 2)],
                    ("bf16", 44): [(64, 64, 128, 8, 3), (32, 32, 64, 8, 2)],
                    ("fp32", 64): [_SMALL], ("fp32", 128): [_SMALL]},
    "_bwd_dkdv_kernel": {("bf16", 64): [(32, 32, 64, 8, 2), (32, 16, 64, 8, 2)], ("bf16", 128): [_SMALL8],
                         ("fp32", 64): [_SMALL8], ("fp32", 128): [_SMALL8]},
    "_bwd_dq_kernel": {("bf16", 64): [(32, 16, 64, 8, 2), (32, 32, 64, 8, 2)], ("bf16", 128): [_SMALL, _SMALL8],
                       ("fp32", 64): [(32, 16, 64, 8, 2)], ("fp32", 128): [_SMALL8]},
}
PIN_ENV = "NEST_SSL_PIN_KERNEL_CONFIGS"  # "1": autotune nothing, use each kernel's first config (bounded compiles)


def _config(m, n, w, nw, ns):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_W": w}, num_warps=nw, num_stages=ns)


def gpu_configs(kernel, dtype, block_d, d_k=None):
    """The candidates for one launch; bf16 and fp16 share their lists (same operand width); the head dim's own list
    where it has one, else d_k <= 64 uses 64's."""
    dtype = "fp32" if dtype == "fp32" else "bf16"
    table = CONFIGS[kernel].get((dtype, d_k)) or CONFIGS[kernel][(dtype, 64 if block_d <= 64 else 128)]
    return [_config(*c) for c in (table[:1] if os.environ.get(PIN_ENV) == "1" else table)]


def _prune(kernel_name):
    def prune(configs, named_args, **kwargs):
        dtype = "fp32" if kwargs["IEEE"] else "bf16"
        wanted = {str(c) for c in gpu_configs(kernel_name, dtype, kwargs["BLOCK_D"], kwargs.get("D"))}
        return [c for c in configs if str(c) in wanted]
    return prune


# The interpreter's blocks: tiny, so its (numpy) launches stay cheap. It runs the kernels bare, without the autotuner.
INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_W=32)


def _configs(kernel):
    configs = {c: None for table in CONFIGS[kernel].values() for c in table}  # the union, in order, once each
    return [_config(*c) for c in configs]


# The dropout seed is drawn per call: specialised like other integers, the 1 in 16 divisible by 16 would compile (and
# run) other binaries of every kernel that takes it.
SEED_ARG = ["seed"]


@triton.jit
def _keep_mask(seed, bh, offs_m, offs_n, T, dropout_p):
    # 64-bit Philox counter: high word = (b, h), low word = i*T + j, so every (b, h, i, j) has its own draw.
    off = (bh.to(tl.int64) << 32) | (offs_m[:, None] * T + offs_n[None, :]).to(tl.int64)
    return tl.rand(seed, off) >= dropout_p


@triton.jit
def _load_rows(ptr, base, offs, offs_d, n_rows, D, dt: tl.constexpr):
    """Rows offs of a (n_rows, D) matrix at ptr + base as a (len(offs), BLOCK_D) tile in dt; out-of-range rows are 0."""
    mask = ((offs[:, None] >= 0) & (offs[:, None] < n_rows)) & (offs_d[None, :] < D)
    return tl.load(ptr + base + offs[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(dt)


@triton.jit
def _scores(qu, qv, k, pw, offs_m, offs_n, length, ctx_l, ctx_r, qk_scale, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Masked, base-2-scaled score tile (BLOCK_M, BLOCK_N) from q + u, q + v_bias, the keys and the p window."""
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    ac = tl.dot(qu, tl.trans(k), input_precision=prec)  # (BLOCK_M, BLOCK_N)
    bdw = tl.dot(qv, tl.trans(pw), input_precision=prec)  # (BLOCK_M, BLOCK_W)
    ii = tl.arange(0, BLOCK_M)[:, None]
    jj = tl.arange(0, BLOCK_N)[None, :]
    bd = tl.gather(bdw, (BLOCK_M - 1) - ii + jj, axis=1)  # rel_shift: window column of p[(T-1) - i + j]
    rel = offs_n[None, :] - offs_m[:, None]
    valid = (offs_m[:, None] < length) & (offs_n[None, :] < length)
    valid = valid & ((ctx_l < 0) | (rel >= -ctx_l)) & ((ctx_r < 0) | (rel <= ctx_r))
    s = tl.where(valid, (ac + bd) * qk_scale, float("-inf"))
    return s, valid


@triton.jit
def _load_q(Q, U, VB, qkv_base, h, offs_m, offs_d, T, D, dt: tl.constexpr):
    dmask = offs_d < D
    q = tl.load(Q + qkv_base + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < T) & dmask[None, :], other=0.0).to(tl.float32)
    u = tl.load(U + h * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    vb = tl.load(VB + h * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    return (q + u[None, :]).to(dt), (q + vb[None, :]).to(dt)


@triton.jit
def _key_range(m_lo, m_hi, length, ctx_l, ctx_r, BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) that can be unmasked for query rows [m_lo, m_hi); empty for padded rows."""
    lo = tl.where(ctx_l >= 0, tl.maximum(m_lo - ctx_l, 0), 0)
    hi = tl.where(ctx_r >= 0, tl.minimum(m_hi + ctx_r, length), length)
    hi = tl.where(m_lo < length, hi, 0)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit(do_not_specialize=SEED_ARG)
def _fwd_kernel(Q, K, V, P, U, VB, LEN, OUT, LSE, seed, T, H, D, stride_pb, qk_scale, ctx_l, ctx_r, dropout_p,
                T_BUCKET,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
                DROPOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    length = tl.load(LEN + b)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qkv_base = bh.to(tl.int64) * T * D
    p_base = b.to(tl.int64) * stride_pb + h.to(tl.int64) * (2 * T - 1) * D
    dt: tl.constexpr = tl.float32 if UPCAST else Q.dtype.element_ty
    qu, qv = _load_q(Q, U, VB, qkv_base, h, offs_m, offs_d, T, D, dt)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, hi = _key_range(m0, m0 + BLOCK_M, length, ctx_l, ctx_r, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_w = (T - BLOCK_M - m0 + n0) + tl.arange(0, BLOCK_W)  # p rows of this tile's window
        k = _load_rows(K, qkv_base, offs_n, offs_d, T, D, dt)
        pw = _load_rows(P, p_base, offs_w, offs_d, 2 * T - 1, D, dt)
        s, valid = _scores(qu, qv, k, pw, offs_m, offs_n, length, ctx_l, ctx_r, qk_scale, BLOCK_M, BLOCK_N, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet
        alpha = tl.exp2(m_i - m_safe)
        prob = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        if DROPOUT:
            keep = _keep_mask(seed, bh, offs_m, offs_n, T, dropout_p)
            prob = tl.where(keep, prob / (1.0 - dropout_p), 0.0)
        v = _load_rows(V, qkv_base, offs_n, offs_d, T, D, dt)
        acc = acc * alpha[:, None] + tl.dot(prob.to(dt), v, input_precision="ieee" if IEEE else "tf32")
        m_i = m_new
    row_ok = l_i > 0.0  # False exactly for padded query rows: NeMo zeroes their probabilities
    out = tl.where(row_ok[:, None], acc / tl.where(row_ok, l_i, 1.0)[:, None], 0.0)
    tl.store(OUT + qkv_base + offs_m[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_d[None, :] < D))
    lse = tl.where(row_ok, m_i + tl.log2(tl.where(row_ok, l_i, 1.0)), 0.0)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _bwd_ds(s, valid, do, v, lse, delta, seed, bh, offs_m, offs_n, T, dropout_p, DROPOUT: tl.constexpr,
            IEEE: tl.constexpr):
    """From a recomputed score tile: d(score) (unscaled by 1/sqrt(d)) and the dropped probabilities."""
    prob = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dprob = tl.dot(do, tl.trans(v), input_precision="ieee" if IEEE else "tf32")  # (BLOCK_M, BLOCK_N)
    pdrop = prob
    if DROPOUT:
        keep = _keep_mask(seed, bh, offs_m, offs_n, T, dropout_p)
        pdrop = tl.where(keep, prob / (1.0 - dropout_p), 0.0)
        dprob = tl.where(keep, dprob / (1.0 - dropout_p), 0.0)
    ds = prob * (dprob - delta[:, None])
    return ds, pdrop


@triton.jit
def _load_row_terms(DO, LSE, DELTA, bh, qkv_base, offs_m, offs_d, T, D, dt: tl.constexpr):
    """dO rows (in dt), the base-2 logsumexp and delta of query rows offs_m."""
    rmask = offs_m < T
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=rmask, other=0.0)
    return _load_rows(DO, qkv_base, offs_m, offs_d, T, D, dt), lse, delta


@triton.jit(do_not_specialize=SEED_ARG)
def _bwd_dkdv_kernel(Q, K, V, P, U, VB, LEN, DO, LSE, DELTA, DK, DV, DBIAS, seed, T, H, D, stride_pb, sm_scale,
                     qk_scale, ctx_l, ctx_r, dropout_p, T_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                     IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    length = tl.load(LEN + b)
    n0 = pid_n * BLOCK_N
    qkv_base = bh.to(tl.int64) * T * D
    p_base = b.to(tl.int64) * stride_pb + h.to(tl.int64) * (2 * T - 1) * D
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    dt: tl.constexpr = tl.float32 if UPCAST else Q.dtype.element_ty
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    ds_cols = tl.zeros((BLOCK_N,), tl.float32)  # sum_i ds[i, j]: d(pos_bias_u) = sum_j ds_cols[j] k[j]
    # Query rows that may see this key block: i in [j - R, j + L] (context swapped relative to the forward).
    lo, hi = _key_range(n0, n0 + BLOCK_N, length, ctx_r, ctx_l, BLOCK_M)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_w = (T - BLOCK_M - m0 + n0) + tl.arange(0, BLOCK_W)  # p rows of this tile's window
        # This program's keys and values are reloaded each iteration (cache hits), the row terms after the scores:
        # held across the loop, or loaded earlier, they make the fp32 tiles spill.
        qu, qv = _load_q(Q, U, VB, qkv_base, h, offs_m, offs_d, T, D, dt)
        k = _load_rows(K, qkv_base, offs_n, offs_d, T, D, dt)
        pw = _load_rows(P, p_base, offs_w, offs_d, 2 * T - 1, D, dt)
        s, valid = _scores(qu, qv, k, pw, offs_m, offs_n, length, ctx_l, ctx_r, qk_scale, BLOCK_M, BLOCK_N, IEEE)
        do, lse, delta = _load_row_terms(DO, LSE, DELTA, bh, qkv_base, offs_m, offs_d, T, D, dt)
        v = _load_rows(V, qkv_base, offs_n, offs_d, T, D, dt)
        ds, pdrop = _bwd_ds(s, valid, do, v, lse, delta, seed, bh, offs_m, offs_n, T, dropout_p, DROPOUT, IEEE)
        dv += tl.dot(tl.trans(pdrop.to(do.dtype)), do, input_precision=prec)
        dk += tl.dot(tl.trans(ds.to(qu.dtype)), qu, input_precision=prec)
        ds_cols += tl.sum(ds, 0)
    ptrs = qkv_base + offs_n[:, None] * D + offs_d[None, :]
    mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    tl.store(DK + ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=mask)
    k = tl.load(K + ptrs, mask=mask, other=0.0).to(tl.float32)
    # One (d_k,) partial of d(pos_bias_u) per program, summed on the host (no atomics).
    tl.store(DBIAS + (bh.to(tl.int64) * ((T + 15) // 16) + pid_n) * D + offs_d,
             tl.sum(ds_cols[:, None] * k, 0) * sm_scale, mask=offs_d < D)


@triton.jit(do_not_specialize=SEED_ARG)
def _bwd_dq_kernel(Q, K, V, P, U, VB, LEN, DO, LSE, DELTA, DQ, DP, DBIAS, seed, T, H, D, stride_pb, sm_scale,
                   qk_scale, ctx_l, ctx_r, dropout_p, T_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                   IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    length = tl.load(LEN + b)
    m0 = pid_m * BLOCK_M
    qkv_base = bh.to(tl.int64) * T * D
    p_base = b.to(tl.int64) * stride_pb + h.to(tl.int64) * (2 * T - 1) * D
    # dp is per batch row even when p is shared (the host sums it): programs of other batch rows never add into the
    # same rows, only this (b, h)'s query blocks, which reach a shared window at different loop iterations.
    dp_base = bh.to(tl.int64) * (2 * T - 1) * D
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    dt: tl.constexpr = tl.float32 if UPCAST else Q.dtype.element_ty
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # This program's query rows: loaded once, outside the key loop.
    qu, qv = _load_q(Q, U, VB, qkv_base, h, offs_m, offs_d, T, D, dt)
    do, lse, delta = _load_row_terms(DO, LSE, DELTA, bh, qkv_base, offs_m, offs_d, T, D, dt)
    ii = tl.arange(0, BLOCK_M)[:, None]
    cc = tl.arange(0, BLOCK_W)[None, :]
    jidx = cc - (BLOCK_M - 1) + ii  # inverse skew: window column c of row ii holds key jj = c - (BLOCK_M-1) + ii
    jin = (jidx >= 0) & (jidx < BLOCK_N)
    jidx = tl.minimum(tl.maximum(jidx, 0), BLOCK_N - 1)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # d(q + u) + d(q + v_bias): one accumulator
    lo, hi = _key_range(m0, m0 + BLOCK_M, length, ctx_l, ctx_r, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_w = (T - BLOCK_M - m0 + n0) + tl.arange(0, BLOCK_W)  # p rows of this tile's window
        k = _load_rows(K, qkv_base, offs_n, offs_d, T, D, dt)
        pw = _load_rows(P, p_base, offs_w, offs_d, 2 * T - 1, D, dt)
        s, valid = _scores(qu, qv, k, pw, offs_m, offs_n, length, ctx_l, ctx_r, qk_scale, BLOCK_M, BLOCK_N, IEEE)
        v = _load_rows(V, qkv_base, offs_n, offs_d, T, D, dt)
        ds, _ = _bwd_ds(s, valid, do, v, lse, delta, seed, bh, offs_m, offs_n, T, dropout_p, DROPOUT, IEEE)
        dsw = tl.where(jin, tl.gather(ds, jidx, axis=1), 0.0).to(qv.dtype)  # (BLOCK_M, BLOCK_W)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=prec)
        dq += tl.dot(dsw, pw, input_precision=prec)
        dpw = tl.dot(tl.trans(dsw), qv, input_precision=prec) * sm_scale  # (BLOCK_W, BLOCK_D)
        wmask = ((offs_w[:, None] >= 0) & (offs_w[:, None] < 2 * T - 1)) & (offs_d[None, :] < D)
        # Relaxed: only the sum matters, so no fences around the add (acq_rel would wrap each in MEMBAR.GPU).
        tl.atomic_add(DP + dp_base + offs_w[:, None] * D + offs_d[None, :], dpw, mask=wmask, sem="relaxed")
    ptrs = qkv_base + offs_m[:, None] * D + offs_d[None, :]
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    dq = dq * sm_scale
    tl.store(DQ + ptrs, dq.to(DQ.dtype.element_ty), mask=mask)
    # sum_i (dq_u[i] + dq_v[i]) of this block in fp32: with the u part from the dkdv kernel it gives d(pos_bias_v).
    tl.store(DBIAS + (bh.to(tl.int64) * ((T + 15) // 16) + pid_m) * D + offs_d, tl.sum(dq, 0), mask=offs_d < D)


@triton.jit
def _bwd_preprocess(OUT, DO, DELTA, T, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[i] = rowsum(dO * O) = rowsum(P * dP) (dropout included): the softmax backward's row term."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    ptrs = bh.to(tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :]
    o = tl.load(OUT + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit(do_not_specialize=SEED_ARG)
def _dropout_mask_kernel(OUT, seed, T, dropout_p, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    for n0 in range(0, T, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        keep = _keep_mask(seed, bh, offs_m, offs_n, T, dropout_p)
        val = tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
        tl.store(OUT + bh.to(tl.int64) * T * T + offs_m[:, None] * T + offs_n[None, :], val,
                 mask=(offs_m[:, None] < T) & (offs_n[None, :] < T))


# The arguments each tuned kernel accumulates into (atomics) rather than stores. Triton's autotuner runs a kernel
# many times while it benchmarks a new key (every pruned config, even a single one, whenever the config list has more
# than one entry), then launches it once more: these are zeroed before every benchmark run and again before the real
# launch, or the first call of every new key returns the sum of all those runs. Every other output is stored, so a
# rerun rewrites the same values (tests/test_rel_pos_attention.py runs the first call through Triton's Autotuner).
ACCUMULATES = {"_fwd_kernel": (), "_bwd_dkdv_kernel": (), "_bwd_dq_kernel": ("DP",)}


def autotuned(kernel, configs, prune=None, do_bench=None):
    """`kernel` under Triton's autotuner. Keyed on T rounded up to a power of two: training sees a new T almost every
    batch, tuning each is too slow. `prune` keeps a launch's candidates; `do_bench` None is Triton's timer."""
    return triton.autotune(configs, key=["T_BUCKET", "D", "DROPOUT", "IEEE"],  # D: a head dim can have its own list
                           prune_configs_by=None if prune is None else {"early_config_prune": prune},
                           reset_to_zero=list(ACCUMULATES[kernel.__name__]), do_bench=do_bench)(kernel)


def _maybe_tune(kernel):
    if INTERPRET:
        return kernel
    # The pruner keeps the candidates of this launch's (dtype, BLOCK_D or d_k) from CONFIGS.
    return autotuned(kernel, _configs(kernel.__name__), _prune(kernel.__name__))


_fwd = _maybe_tune(_fwd_kernel)
_bwd_dkdv = _maybe_tune(_bwd_dkdv_kernel)
_bwd_dq = _maybe_tune(_bwd_dq_kernel)


def _launch(kernel, blocks_of, bh, *args, _axis="rows", **consts):
    """Autotuned launch on GPU; a bare kernel (the interpreter's) gets the interpreter's config explicitly.
    Grid: (blocks along _axis, B*H)."""
    meta = {} if isinstance(kernel, triton.runtime.Autotuner) else INTERPRET_BLOCKS
    key = "BLOCK_M" if _axis == "rows" else "BLOCK_N"
    kernel[lambda m: (triton.cdiv(blocks_of, m[key]), bh)](*args, **consts, **meta)


def _check(q, k, v, p, pos_bias_u, pos_bias_v, lengths, att_context_size, dropout_p):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share shape (B, H, T, d_k); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, T, D = q.shape
    if p.dim() != 4 or p.shape[0] not in (1, B) or tuple(p.shape[1:]) != (H, 2 * T - 1, D):
        raise ValueError(f"p must be (1 or {B}, {H}, {2 * T - 1}, {D}); got {tuple(p.shape)}")
    for name, t in (("pos_bias_u", pos_bias_u), ("pos_bias_v", pos_bias_v)):
        if tuple(t.shape) != (H, D):
            raise ValueError(f"{name} must be ({H}, {D}); got {tuple(t.shape)}")
    if lengths is not None and tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be ({B},); got {tuple(lengths.shape)}")
    if D > 128:
        raise ValueError(f"d_k={D} is not supported; allowed d_k <= 128")
    if T > 46340:
        raise ValueError(f"T={T} is not supported; allowed T <= 46340 (32-bit dropout counter)")
    if len(att_context_size) != 2:
        raise ValueError(f"att_context_size must be [L, R]; got {att_context_size}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p}; allowed 0 <= dropout_p < 1")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("rel_pos_attention's Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on CPU")


def _common(q, p, ctx_l, ctx_r, dropout_p):
    B, H, T, D = q.shape
    sm_scale = 1.0 / math.sqrt(D)
    return dict(T=T, H=H, D=D, stride_pb=0 if p.shape[0] == 1 else H * (2 * T - 1) * D,
                ctx_l=ctx_l, ctx_r=ctx_r, dropout_p=float(dropout_p), T_BUCKET=triton.next_power_of_2(T),
                BLOCK_D=max(16, triton.next_power_of_2(D)),
                DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, IEEE=q.dtype == torch.float32), sm_scale


class RelPosAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p, pos_bias_u, pos_bias_v, lengths, ctx_l, ctx_r, dropout_p, seed):
        q, k, v, p = (t.contiguous() for t in (q, k, v, p))
        B, H, T, D = q.shape
        consts, sm_scale = _common(q, p, ctx_l, ctx_r, dropout_p)
        o = torch.empty_like(q)
        lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
        _launch(_fwd, T, B * H, q, k, v, p, pos_bias_u.contiguous(), pos_bias_v.contiguous(), lengths, o, lse, seed,
                qk_scale=sm_scale * LOG2E, **consts)
        ctx.save_for_backward(q, k, v, p, pos_bias_u, pos_bias_v, lengths, o, lse)
        ctx.cfg = (ctx_l, ctx_r, dropout_p, seed)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, p, u, vb, lengths, o, lse = ctx.saved_tensors
        ctx_l, ctx_r, dropout_p, seed = ctx.cfg
        B, H, T, D = q.shape
        do = do.contiguous()
        consts, sm_scale = _common(q, p, ctx_l, ctx_r, dropout_p)
        delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
        _bwd_preprocess[(triton.cdiv(T, 64), B * H)](o, do, delta, T, D, BLOCK_M=64, BLOCK_D=consts["BLOCK_D"])
        args = (q, k, v, p, u.contiguous(), vb.contiguous(), lengths, do, lse, delta)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        # Per-program (d_k,) partials of the bias gradients, cdiv(T, 16) rows per (b, h): enough for any block >= 16.
        du_part = torch.zeros((B * H, triton.cdiv(T, 16), D), device=q.device, dtype=torch.float32)
        _launch(_bwd_dkdv, T, B * H, *args, dk, dv, du_part, seed, sm_scale=sm_scale, qk_scale=sm_scale * LOG2E,
                _axis="keys", **consts)
        dq = torch.empty_like(q)
        dq_part = torch.zeros_like(du_part)
        dp = torch.zeros((B, H, 2 * T - 1, D), device=p.device, dtype=torch.float32)  # per batch row, see the kernel
        _launch(_bwd_dq, T, B * H, *args, dq, dp, dq_part, seed, sm_scale=sm_scale, qk_scale=sm_scale * LOG2E,
                **consts)
        du = du_part.view(B, H, -1, D).sum((0, 2))  # (H, d_k): the bias is shared by every batch row and query
        dvb = (dq_part.view(B, H, -1, D).sum((0, 2)) - du).to(vb.dtype)
        du = du.to(u.dtype)
        dp = dp.sum(0, keepdim=True) if p.shape[0] == 1 else dp
        return dq, dk, dv, dp.to(p.dtype), du, dvb, None, None, None, None, None


def rel_pos_attention(q, k, v, p, pos_bias_u, pos_bias_v, lengths, att_context_size=(-1, -1), dropout_p=0.0,
                      training=False, seed=None):
    """Fused NeMo relative-position attention. q, k, v: (B, H, T, d_k) (q without biases); p: (1 or B, H, 2T-1, d_k);
    pos_bias_u/v: (H, d_k); lengths: (B,) int or None (= all T). Returns ctx (B, H, T, d_k), zero on padded rows."""
    _check(q, k, v, p, pos_bias_u, pos_bias_v, lengths, att_context_size, dropout_p)
    B, H, T, D = q.shape
    if lengths is None:
        lengths = torch.full((B,), T, device=q.device, dtype=torch.int32)
    # Clamped: keys past T are not loaded, so a length > T must not mark them valid.
    lengths = lengths.to(device=q.device, dtype=torch.int32).clamp(0, T).contiguous()
    # Under autocast the linears may hand over mixed dtypes; the kernel runs in q's dtype (gradients cast back).
    k, v, p = (t.to(q.dtype) for t in (k, v, p))
    p_eff = dropout_p if training else 0.0
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p_eff > 0 else 0
    ctx_l, ctx_r = (int(c) for c in att_context_size)
    return RelPosAttentionFunction.apply(q, k, v, p, pos_bias_u, pos_bias_v, lengths, ctx_l, ctx_r, p_eff, int(seed))


def dropout_mask_debug(B, H, T, dropout_p, seed, device="cpu"):
    """The kernel's dropout scaling (B, H, T, T) in {0, 1/(1-p)} for `seed`; small sizes only (tests)."""
    out = torch.empty((B, H, T, T), device=device, dtype=torch.float32)
    _dropout_mask_kernel[(triton.cdiv(T, 16), B * H)](out, int(seed), T, float(dropout_p), BLOCK=16)
    return out

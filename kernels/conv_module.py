"""Fused Conformer convolution-module core: GLU -> padding mask -> depthwise conv -> BatchNorm -> SiLU, in (B, T, C).

Math, as NeMo's ConformerConvolution computes it (reference: the torch path in nest_ssl/conformer/conv_module.py),
h = pointwise_conv1(x) of shape (B, T, 2C), context (l, r) with l + r + 1 = K:

    g[t, c]  = h[t, c] * sigmoid(h[t, C + c])             if t < length else 0      # GLU, then NeMo's pad mask
    y[t, c]  = sum_k w[c, k] * g[t + k - l, c] + bias[c]                             # zero outside [0, T)
    out      = silu((y - mean) * rsqrt(var + eps) * gamma + beta)                    # BN over all B*T frames

BatchNorm statistics cover every B x T position, padding included, as NeMo does; running stats update like
nn.BatchNorm1d (momentum, unbiased running variance). Reference: `nest_ssl.conformer.conv_module.
glu_dwconv_norm_silu_torch` (tests compare against it).

Kernels: A (`_glu_dwconv_fwd`) loads a halo tile of BLOCK_H rows of h once, evaluates the GLU and its sigmoid once per
element, and forms the K taps as row shifts of that tile in registers (`tl.gather`); it adds the bias and writes
per-(row block, channel) sum and centred second moment of y (no atomics, deterministic); `_bn_finalize_fwd` turns them
into mean, rstd, the running-stat update and the per-channel scale/shift in one launch (fp64 Chan combine; with a
SyncBatchNorm process group, one launch per rank combines its blocks, the ranks' (N, sum, M2) are all-gathered and the
same kernel finalizes them); B (`_affine_silu_fwd`) applies the normalisation + SiLU. Eval mode folds BN into a
per-channel scale/shift and runs kernel A alone with SiLU fused. Backward: `_affine_silu_bwd` (BN/SiLU backward, with
partial sums for dgamma/dbeta), then `_dwconv_glu_bwd`: a dy halo tile gives the transposed conv, then an h halo tile
gives the GLU backward and the depthwise-weight and bias partials, each tile loaded once and each GLU evaluated once.
`_column_sums` finalizes both backward reductions (dgamma/dbeta and the global sums BN's input gradient needs; dw in its
(C, 1, K) layout and dbias).
No torch compute op runs between the kernels: one training step is 3 launches forward and 5 backward (plus the
SyncBatchNorm collectives and one more finalize launch when synced). The intermediates y (conv output) and dy (its
gradient) are stored in h's dtype (bf16 under autocast); every sum is accumulated in fp32, the BN statistics in fp64.

No kernel here is autotuned and none accumulates across launches: every partial is stored by the one program that
owns it and each kernel runs once per use, so a rerun writes the same values. If one is ever tuned, `_bn_finalize_fwd`
with UPDATE rewrites the running stats in place and would need `restore_value` on them.

Limits: batch_norm only (layer/group norm use the torch path); CUDA, or CPU under TRITON_INTERPRET=1. The variance
comes from per-block fp32 sums and centred second moments of y, combined in fp64 (Chan).
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elementwise kernels: (BLOCK_T rows x BLOCK_C channels) per program. Halo kernels (depthwise conv): HALO_C channels
# (half that for 128-row tiles), so their five live (rows x channels) fp32 tiles fit in registers. Elementwise kernels
# 8 warps, halo kernels 16: at 8 the fp32 backward spilled 12 B at kernel size 9 and size 31 left 8 warps per SM; at
# 16 with full-width 128-row tiles the bf16 forward spilled 4 B. Now none spills and every conv kernel keeps >= 16
# resident warps per SM (kernels/results/sm90_static.csv).
BLOCK_T, BLOCK_C = (16, 16) if INTERPRET else (64, 64)
HALO_C = 16 if INTERPRET else 32
NUM_WARPS = 8
HALO_WARPS = 16
# Finalize kernels (per-channel reductions of the partial rows): FIN_C channels x FIN_P rows per step, 4 warps; 8
# rows keep the fp64 finalize at <= 128 registers (>= 16 resident warps per SM). They read ~B*T/56 rows: tiny.
FIN_C, FIN_P = (16, 8) if INTERPRET else (64, 8)


def _halo_rows(K: int) -> int:
    """Rows of the conv kernels' halo tile (a power of two): at most a quarter of it is halo (K - 1 rows), so GLU
    work wasted on halo rows stays <= 25% of the tile. NEST-L/XL (K = 9) on GPU: 64 rows, 56 outputs."""
    return max(BLOCK_T, triton.next_power_of_2(4 * (K - 1)))


def _halo_channels(K: int) -> int:
    """Channels of the conv kernels' halo tile: HALO_C, halved when the tile has more than 64 rows (K > 16), so the
    registers per thread stay those of a 64-row tile."""
    return HALO_C if _halo_rows(K) <= 64 else HALO_C // 2


@triton.jit
def _glu_halo(h_row, t0, length, offs_c, cmask, C, BLOCK_H: tl.constexpr):
    """Rows t0 .. t0 + BLOCK_H - 1 of h, loaded once: (a, sigmoid(gate), GLU output masked past length)."""
    tt = t0 + tl.arange(0, BLOCK_H)
    m = ((tt >= 0) & (tt < length))[:, None] & cmask[None, :]
    a = tl.load(h_row + tt[:, None] * 2 * C + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(tl.load(h_row + tt[:, None] * 2 * C + C + offs_c[None, :], mask=m, other=0.0).to(tl.float32))
    return a, sig, a * sig  # a = 0 outside [0, length): the GLU output there is 0, NeMo's pad mask


@triton.jit
def _shift_rows(x, by, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[i] = x[i + by] (rows past the tile repeat the last one; the caller masks them)."""
    idx = tl.minimum(tl.arange(0, BLOCK_H) + by, BLOCK_H - 1)
    return tl.gather(x, tl.broadcast_to(idx[:, None], (BLOCK_H, BLOCK_C)), axis=0)


@triton.jit
def _glu_dwconv_fwd(h_ptr, len_ptr, w_ptr, b_ptr, y_ptr, part_ptr, scale_ptr, shift_ptr, T, C, n_tb,
                    K: tl.constexpr, LEFT: tl.constexpr, HAS_BIAS: tl.constexpr, FOLDED: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    # A program owns OUT = BLOCK_H - (K - 1) output rows and loads the BLOCK_H-row halo tile once: the GLU and its
    # sigmoid are evaluated once per element, and tap k reads the tile shifted by k rows (a register gather).
    OUT: tl.constexpr = BLOCK_H - (K - 1)
    b, tb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    length = tl.load(len_ptr + b)
    _, _, g = _glu_halo(h_ptr + b * T * 2 * C, tb * OUT - LEFT, length, offs_c, cmask, C, BLOCK_H)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        wk = tl.load(w_ptr + offs_c * K + k, mask=cmask, other=0.0).to(tl.float32)
        acc += _shift_rows(g, k, BLOCK_H, BLOCK_C) * wk[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    rows = tl.arange(0, BLOCK_H)
    offs_t = tb * OUT + rows
    om = ((rows < OUT) & (offs_t < T))[:, None] & cmask[None, :]
    out_ptrs = y_ptr + b * T * C + offs_t[:, None] * C + offs_c[None, :]
    if FOLDED:  # eval: BN folded into scale/shift, SiLU fused: one kernel
        z = acc * tl.load(scale_ptr + offs_c, mask=cmask, other=0.0)[None, :] \
            + tl.load(shift_ptr + offs_c, mask=cmask, other=0.0)[None, :]
        tl.store(out_ptrs, (z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=om)
    else:
        tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=om)
        # Per-block sum and centred second moment (combined on the host with Chan's formula: no cancellation).
        n_rows = tl.minimum(T - tb * OUT, OUT).to(tl.float32)
        acc = tl.where(om, acc, 0.0)
        s1 = tl.sum(acc, axis=0)
        centred = tl.where(om, acc - (s1 / n_rows)[None, :], 0.0)
        row = part_ptr + (b * n_tb + tb) * 2 * C
        tl.store(row + offs_c, s1, mask=cmask)
        tl.store(row + C + offs_c, tl.sum(centred * centred, axis=0), mask=cmask)


@triton.jit
def _affine_silu_fwd(y_ptr, out_ptr, scale_ptr, shift_ptr, R, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    m = (offs_r < R)[:, None] & cmask[None, :]
    y = tl.load(y_ptr + offs_r[:, None] * C + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
    z = y * tl.load(scale_ptr + offs_c, mask=cmask, other=0.0)[None, :] \
        + tl.load(shift_ptr + offs_c, mask=cmask, other=0.0)[None, :]
    tl.store(out_ptr + offs_r[:, None] * C + offs_c[None, :], (z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _affine_silu_bwd(y_ptr, dout_ptr, dy_ptr, part_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, sums_ptr,
                     inv_n_ptr, R, C, SECOND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # SECOND=False: partial sums of dz and dz*xhat. SECOND=True: dy = gamma*rstd*(dz - mean(dz) - xhat*mean(dz*xhat))
    pr = tl.program_id(0)
    offs_r = pr * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    m = (offs_r < R)[:, None] & cmask[None, :]
    ptrs = offs_r[:, None] * C + offs_c[None, :]
    y = tl.load(y_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_c, mask=cmask, other=0.0)[None, :]
    z = y * scale + tl.load(shift_ptr + offs_c, mask=cmask, other=0.0)[None, :]
    s = tl.sigmoid(z)
    dz = tl.load(dout_ptr + ptrs, mask=m, other=0.0).to(tl.float32) * (s + z * s * (1.0 - s))
    dz = tl.where(m, dz, 0.0)
    xhat = (y - tl.load(mean_ptr + offs_c, mask=cmask, other=0.0)[None, :]) \
        * tl.load(rstd_ptr + offs_c, mask=cmask, other=0.0)[None, :]
    if SECOND:
        sum_dz = tl.load(sums_ptr + offs_c, mask=cmask, other=0.0)[None, :]
        sum_dzx = tl.load(sums_ptr + C + offs_c, mask=cmask, other=0.0)[None, :]
        # scale = gamma * rstd; inv_n = 1 / frames in the (synced) batch
        inv_n = tl.load(inv_n_ptr + offs_c, mask=cmask, other=0.0)[None, :]
        dy = scale * (dz - sum_dz * inv_n - xhat * sum_dzx * inv_n)
        tl.store(dy_ptr + ptrs, dy.to(dy_ptr.dtype.element_ty), mask=m)
    else:
        row = part_ptr + pr * 2 * C
        tl.store(row + offs_c, tl.sum(dz, axis=0), mask=cmask)
        tl.store(row + C + offs_c, tl.sum(dz * tl.where(m, xhat, 0.0), axis=0), mask=cmask)


@triton.jit
def _dwconv_glu_bwd(h_ptr, len_ptr, w_ptr, dy_ptr, dh_ptr, dw_part_ptr, T, C, n_tb,
                    K: tl.constexpr, LEFT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    # Output rows t0 .. t0 + OUT - 1. Halo tiles loaded once: h at rows t0 - LEFT + j (GLU evaluated once) and dy at
    # rows t0 - RIGHT + j; every tap is a row shift of one of them.
    OUT: tl.constexpr = BLOCK_H - (K - 1)
    RIGHT: tl.constexpr = K - 1 - LEFT
    b, tb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tb * OUT
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    length = tl.load(len_ptr + b)
    rows = tl.arange(0, BLOCK_H)
    offs_t = t0 + rows
    om = ((rows < OUT) & (offs_t < T))[:, None] & cmask[None, :]
    # Phase 1, dy only: d(GLU output) and dy at this program's rows (fewer live tiles than loading both at once).
    td = t0 - RIGHT + rows
    dy_h = tl.load(dy_ptr + b * T * C + td[:, None] * C + offs_c[None, :],
                   mask=((td >= 0) & (td < T))[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    dg = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)  # d(GLU output) at rows t0 + i
    for k in tl.static_range(K):
        # y[t] = sum_k w[k] g[t + k - LEFT]: g[t0 + i] feeds y[t0 + i - k + LEFT] = dy_h[i + K - 1 - k]
        wk = tl.load(w_ptr + offs_c * K + k, mask=cmask, other=0.0).to(tl.float32)
        dg += _shift_rows(dy_h, K - 1 - k, BLOCK_H, BLOCK_C) * wk[None, :]
    dy = tl.where(om, _shift_rows(dy_h, RIGHT, BLOCK_H, BLOCK_C), 0.0)
    # Phase 2, h: the GLU backward at rows t0 + i, then the weight-gradient partials from the GLU halo tile.
    a, sig, g = _glu_halo(h_ptr + b * T * 2 * C, t0 - LEFT, length, offs_c, cmask, C, BLOCK_H)
    a_c = _shift_rows(a, LEFT, BLOCK_H, BLOCK_C)  # 0 past length: masked GLU outputs get no gradient
    sig_c = _shift_rows(sig, LEFT, BLOCK_H, BLOCK_C)
    valid = (offs_t < length)[:, None]
    dh_row = dh_ptr + b * T * 2 * C + offs_t[:, None] * 2 * C + offs_c[None, :]
    tl.store(dh_row, tl.where(valid, dg * sig_c, 0.0).to(dh_ptr.dtype.element_ty), mask=om)
    tl.store(dh_row + C, tl.where(valid, dg * a_c * sig_c * (1.0 - sig_c), 0.0).to(dh_ptr.dtype.element_ty), mask=om)
    for k in tl.static_range(K):
        # dw[c, k] partial over this block's output rows: sum_i dy[t0 + i] g[t0 + i + k - LEFT]
        tl.store(dw_part_ptr + ((b * n_tb + tb) * (K + HAS_BIAS) + k) * C + offs_c,
                 tl.sum(dy * _shift_rows(g, k, BLOCK_H, BLOCK_C), axis=0), mask=cmask)
    if HAS_BIAS:  # the bias gradient's partial: dy summed over this block's rows (as stored, in h's dtype)
        tl.store(dw_part_ptr + ((b * n_tb + tb) * (K + 1) + K) * C + offs_c, tl.sum(dy, axis=0), mask=cmask)


@triton.jit
def _rcp64(x):
    """1 / x in fp64 to within an ulp or two: an fp32 reciprocal refined by two Newton steps (24 -> 48 -> 96 bits).
    sm_90's IEEE fp64 division calls a slow-path subroutine whose stack frame counts as spill; this does not."""
    r = (1.0 / x.to(tl.float32)).to(tl.float64)
    r = r * (2.0 - x * r)
    return r * (2.0 - x * r)


@triton.jit
def _chan_rows(part_ptr, stats_ptr, p, offs_c, m, C, T, n_tb, OUT: tl.constexpr, RANKS: tl.constexpr):
    """Rows p of the partials as fp64 (frames n, sum, centred M2). RANKS: (n, sum, M2) per rank from `stats_ptr`,
    else per-block (sum, M2) from `part_ptr`, whose frame count follows from the block's place in time."""
    if RANKS:
        row = stats_ptr + p[:, None] * 3 * C + offs_c[None, :]
        n = tl.load(row, mask=m, other=0.0)
        s = tl.load(row + C, mask=m, other=0.0)
        m2 = tl.load(row + 2 * C, mask=m, other=0.0)
    else:
        n = tl.where(m, tl.minimum(T - (p % n_tb) * OUT, OUT).to(tl.float64)[:, None], 0.0)
        row = part_ptr + p[:, None] * 2 * C + offs_c[None, :]
        s = tl.load(row, mask=m, other=0.0).to(tl.float64)
        m2 = tl.load(row + C, mask=m, other=0.0).to(tl.float64)
    return n, s, m2


@triton.jit
def _bn_finalize_fwd(part_ptr, stats_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, mean_ptr, rstd_ptr, scale_ptr,
                     shift_ptr, inv_n_ptr, P, C, T, n_tb, momentum, keep, eps, OUT: tl.constexpr, RANKS: tl.constexpr,
                     LOCAL: tl.constexpr, UPDATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """BatchNorm statistics from P partial rows in one launch, fp64 throughout (Chan's parallel combine):

        N = sum_p n_p,  mean = sum_p s_p / N,  M2 = sum_p [M2_p + n_p (s_p / n_p - mean)^2],  var = M2 / N

    Each M2_p is centred on its own block mean, so no E[y^2] - E[y]^2 cancellation. LOCAL writes this rank's
    (N, sum, M2) to `stats_ptr` (SyncBatchNorm gathers them from every rank, then runs this kernel with RANKS on
    the gathered rows). Otherwise it writes mean, rstd = 1/sqrt(var + eps), scale = gamma * rstd,
    shift = beta - mean * scale and 1 / N (fp32, for the backward), and with UPDATE the running stats as
    nn.BatchNorm1d does:
    r_mean = keep * r_mean + momentum * mean, r_var = keep * r_var + momentum * var * N / (N - 1) (unbiased)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    tot_n = tl.zeros((BLOCK_C,), dtype=tl.float64)
    tot_s = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n, s, _ = _chan_rows(part_ptr, stats_ptr, p, offs_c, (p < P)[:, None] & cmask[None, :], C, T, n_tb, OUT,
                             RANKS)
        tot_n += tl.sum(n, axis=0)
        tot_s += tl.sum(s, axis=0)
    inv_n = _rcp64(tl.where(cmask, tot_n, 1.0))
    mean = tot_s * inv_n
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & cmask[None, :]
        n, s, m2_p = _chan_rows(part_ptr, stats_ptr, p, offs_c, m, C, T, n_tb, OUT, RANKS)
        d = s * _rcp64(tl.where(m, n, 1.0)) - mean[None, :]
        m2 += tl.sum(tl.where(m, m2_p + n * d * d, 0.0), axis=0)
    if LOCAL:
        tl.store(stats_ptr + offs_c, tot_n, mask=cmask)
        tl.store(stats_ptr + C + offs_c, tot_s, mask=cmask)
        tl.store(stats_ptr + 2 * C + offs_c, m2, mask=cmask)
    else:
        var = m2 * inv_n
        if UPDATE:
            rm = tl.load(rmean_ptr + offs_c, mask=cmask, other=0.0)
            rv = tl.load(rvar_ptr + offs_c, mask=cmask, other=0.0)
            unbiased = (var * tot_n * _rcp64(tl.where(cmask, tot_n - 1.0, 1.0))).to(rv.dtype)
            tl.store(rmean_ptr + offs_c, rm * keep + momentum * mean.to(rm.dtype), mask=cmask)
            tl.store(rvar_ptr + offs_c, rv * keep + momentum * unbiased, mask=cmask)
        rstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
        mean32 = mean.to(tl.float32)
        scale = tl.load(gamma_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32) * rstd
        tl.store(mean_ptr + offs_c, mean32, mask=cmask)
        tl.store(rstd_ptr + offs_c, rstd, mask=cmask)
        tl.store(inv_n_ptr + offs_c, inv_n.to(tl.float32), mask=cmask)
        tl.store(scale_ptr + offs_c, scale, mask=cmask)
        tl.store(shift_ptr + offs_c, tl.load(beta_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
                 - mean32 * scale, mask=cmask)


@triton.jit
def _column_sums(part_ptr, out_ptr, tail_ptr, P, C, J, LEAD, out_sc, out_sj, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Backward finalize: fp32 sums over the P partial rows of part (P, J, C). Sums j < LEAD go to
    out[c * out_sc + j * out_sj] in out's dtype (dw lands directly in its (C, K) layout), sum LEAD to tail[c]
    (the conv bias gradient)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    for j in range(J):
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            m = (p < P)[:, None] & cmask[None, :]
            acc += tl.sum(tl.load(part_ptr + (p[:, None] * J + j) * C + offs_c[None, :], mask=m, other=0.0), axis=0)
        lead = cmask & (j < LEAD)
        tl.store(out_ptr + offs_c * out_sc + j * out_sj, acc.to(out_ptr.dtype.element_ty), mask=lead)
        tl.store(tail_ptr + offs_c, acc.to(tail_ptr.dtype.element_ty), mask=cmask & (j >= LEAD))


def _synced(group) -> bool:
    return group is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if _synced(group):
        torch.distributed.all_reduce(t, group=group)
    return t


def _batch_stats(part, T, n_tb, out_rows, gamma, beta, running_mean, running_var, momentum, eps, group):
    """(mean, rstd, scale, shift, 1/N) over all B*T frames (and ranks) from per-block (sum, centred M2) partials;
    updates the running stats in the same launch. SyncBatchNorm: one launch combines this rank's blocks, the
    (N, sum, M2) of every rank are gathered, and the finalize runs on those rows (the same Chan combine)."""
    C = part.shape[-1]
    grid = (triton.cdiv(C, FIN_C),)
    f32 = dict(device=part.device, dtype=torch.float32)
    mean, rstd, scale, shift, inv_n = (torch.empty(C, **f32) for _ in range(5))
    stats = part.new_empty(3, C, dtype=torch.float64)
    args = dict(OUT=out_rows, BLOCK_P=FIN_P, BLOCK_C=FIN_C, num_warps=4)
    rows = part.shape[0]
    if _synced(group):
        _bn_finalize_fwd[grid](part, stats, gamma, beta, gamma, gamma, mean, rstd, scale, shift, inv_n, rows, C, T,
                               n_tb, 0.0, 0.0, 0.0, RANKS=False, LOCAL=True, UPDATE=False, **args)
        gathered = [torch.empty_like(stats) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(gathered, stats, group=group)
        stats, rows = torch.stack(gathered), len(gathered)
    update = running_mean is not None
    _bn_finalize_fwd[grid](part, stats, gamma, beta, running_mean if update else gamma,
                           running_var if update else gamma, mean, rstd, scale, shift, inv_n, rows, C, T, n_tb,
                           momentum, 1.0 - momentum, eps, RANKS=_synced(group), LOCAL=False, UPDATE=update, **args)
    return mean, rstd, scale, shift, inv_n


def _check(h, lengths, weight, context):
    if h.dim() != 3 or h.shape[-1] % 2:
        raise ValueError(f"h must be (B, T, 2C); got {tuple(h.shape)}")
    B, T, C2 = h.shape
    if weight.shape[0] != C2 // 2 or weight.shape[-1] != context[0] + context[1] + 1:
        raise ValueError(f"depthwise weight {tuple(weight.shape)} does not fit C={C2 // 2}, context={context}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be ({B},); got {tuple(lengths.shape)}")
    if not h.is_cuda and not INTERPRET:
        raise RuntimeError("the Triton conv-module kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")


class _ConvModuleCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, lengths, weight, bias, gamma, beta, running_mean, running_var, momentum, eps, left,
                group):
        h = h.contiguous()
        B, T, C2 = h.shape
        C, K = C2 // 2, weight.shape[-1]
        w = weight.reshape(C, K).contiguous()
        lengths = lengths.to(torch.int32).contiguous()
        block_h = _halo_rows(K)
        n_tb = triton.cdiv(T, block_h - (K - 1))
        halo_c = _halo_channels(K)
        grid = (B, n_tb, triton.cdiv(C, halo_c))
        # y in h's dtype (bf16 under autocast): half the bytes written here and read three times later; the BN
        # statistics come from the kernel's fp32 accumulator, so they are exact either way.
        y = torch.empty(B, T, C, device=h.device, dtype=h.dtype)
        part = torch.empty(B * n_tb, 2, C, device=h.device, dtype=torch.float32)
        dummy = w.new_empty(1, dtype=torch.float32)
        _glu_dwconv_fwd[grid](h, lengths, w, bias if bias is not None else dummy, y, part, dummy, dummy, T, C,
                              n_tb, K=K, LEFT=left, HAS_BIAS=bias is not None, FOLDED=False, BLOCK_H=block_h,
                              BLOCK_C=halo_c, num_warps=HALO_WARPS)
        with torch.no_grad():  # the running stats are updated in place, outside autograd
            mean, rstd, scale, shift, inv_n = _batch_stats(part, T, n_tb, block_h - (K - 1), gamma, beta, running_mean,
                                                    running_var, momentum, eps, group)
        out = torch.empty(B, T, C, device=h.device, dtype=h.dtype)
        _affine_silu_fwd[(triton.cdiv(B * T, BLOCK_T), triton.cdiv(C, BLOCK_C))](
            y, out, scale, shift, B * T, C, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
        ctx.save_for_backward(h, lengths, w, y, mean, rstd, scale, shift, inv_n)
        ctx.meta = (left, K, n_tb, group, bias is not None, weight.shape, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, lengths, w, y, mean, rstd, scale, shift, inv_n = ctx.saved_tensors
        left, K, n_tb, group, has_bias, w_shape, w_dtype = ctx.meta
        B, T, C2 = h.shape
        C, R = C2 // 2, B * T
        dout = dout.contiguous()
        n_rb = triton.cdiv(R, BLOCK_T)
        grid_r = (n_rb, triton.cdiv(C, BLOCK_C))
        part = torch.empty(n_rb, 2, C, device=h.device, dtype=torch.float32)
        dy = torch.empty(B, T, C, device=h.device, dtype=h.dtype)  # as y: read twice, in h's dtype
        _affine_silu_bwd[grid_r](y, dout, dy, part, scale, shift, mean, rstd, part, inv_n, R, C, SECOND=False,
                                 BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
        sums = torch.empty(2, C, device=h.device, dtype=torch.float32)  # sum dz, sum dz * xhat on this rank
        _column_sums[(triton.cdiv(C, FIN_C),)](part, sums, sums, n_rb, C, 2, 2, 1, C, BLOCK_P=FIN_P, BLOCK_C=FIN_C,
                                               num_warps=4)
        dbeta, dgamma = sums  # parameter grads: per rank (DDP averages them)
        if _synced(group):  # BN's input gradient needs the global sums
            dbeta, dgamma = sums.clone()
            _all_reduce(sums, group)
        _affine_silu_bwd[grid_r](y, dout, dy, part, scale, shift, mean, rstd, sums, inv_n, R, C, SECOND=True,
                                 BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
        dh = torch.empty_like(h)
        J = K + has_bias  # row K of the partials: the bias gradient (sum of dy)
        dw_part = torch.empty(B * n_tb, J, C, device=h.device, dtype=torch.float32)
        halo_c = _halo_channels(K)
        _dwconv_glu_bwd[(B, n_tb, triton.cdiv(C, halo_c))](h, lengths, w, dy, dh, dw_part, T, C, n_tb, K=K, LEFT=left,
                                                            HAS_BIAS=has_bias, BLOCK_H=_halo_rows(K), BLOCK_C=halo_c,
                                                            num_warps=HALO_WARPS)
        dw = torch.empty(w_shape, device=h.device, dtype=w_dtype)  # (C, 1, K)
        dbias = torch.empty(C, device=h.device, dtype=w_dtype) if has_bias else None
        _column_sums[(triton.cdiv(C, FIN_C),)](dw_part, dw, dbias if has_bias else dw, B * n_tb, C, J, K, K, 1,
                                               BLOCK_P=FIN_P, BLOCK_C=FIN_C, num_warps=4)
        return dh, None, dw, dbias, dgamma, dbeta, None, None, None, None, None, None


def conv_glu_dw_bn_silu(h, lengths, weight, bias, bn: torch.nn.BatchNorm1d, context: tuple[int, int],
                        process_group=None):
    """h (B, T, 2C) after pointwise_conv1, lengths (B,) -> (B, T, C): the fused path between the two GEMMs.

    `bn` supplies gamma/beta, running stats, momentum and eps; in training its running stats are updated in place.
    `process_group` all-reduces the BN statistics (SyncBatchNorm)."""
    _check(h, lengths, weight, context)
    if bn.training and h.shape[0] * h.shape[1] < 2:
        raise ValueError(f"BatchNorm in training needs more than 1 frame per channel; got h of shape {tuple(h.shape)}")
    if bn.training or not bn.track_running_stats:
        momentum = 0.1 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
        return _ConvModuleCore.apply(h, lengths, weight, bias, bn.weight, bn.bias,
                                     bn.running_mean if bn.training else None, bn.running_var, momentum, bn.eps,
                                     context[0], process_group)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        raise ValueError("the eval-mode (BN-folded) kernel is inference-only; run it under torch.no_grad() or use "
                         "the torch path when gradients through eval-mode BatchNorm are needed")
    return _folded_eval(h, lengths, weight, bias, bn, context)


def _folded_eval(h, lengths, weight, bias, bn, context):
    """Eval: BN folded into a per-channel scale/shift; one kernel (no autograd)."""
    B, T, C2 = h.shape
    C, K = C2 // 2, weight.shape[-1]
    scale = (bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)).contiguous()
    b = bias.float() if bias is not None else torch.zeros_like(scale)
    shift = (bn.bias.float() + (b - bn.running_mean.float()) * scale).contiguous()
    out = torch.empty(B, T, C, device=h.device, dtype=h.dtype)
    block_h = _halo_rows(K)
    n_tb = triton.cdiv(T, block_h - (K - 1))
    w = weight.reshape(C, K).contiguous()
    halo_c = _halo_channels(K)
    _glu_dwconv_fwd[(B, n_tb, triton.cdiv(C, halo_c))](
        h.contiguous(), lengths.to(torch.int32).contiguous(), w, scale, out, scale, scale, shift, T, C, n_tb, K=K,
        LEFT=context[0], HAS_BIAS=False, FOLDED=True, BLOCK_H=block_h, BLOCK_C=halo_c, num_warps=HALO_WARPS)
    return out

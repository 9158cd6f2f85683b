"""Fused Conformer convolution-module core: GLU -> padding mask -> depthwise conv -> BatchNorm -> SiLU, in (B, T, C).

Math (spec nemo_nest.md section 3.4), h = pointwise_conv1(x) of shape (B, T, 2C), context (l, r) with l + r + 1 = K:

    g[t, c]  = h[t, c] * sigmoid(h[t, C + c])             if t < length else 0      # GLU, then NeMo's pad mask
    y[t, c]  = sum_k w[c, k] * g[t + k - l, c] + bias[c]                             # zero outside [0, T)
    out      = silu((y - mean) * rsqrt(var + eps) * gamma + beta)                    # BN over all B*T frames

BatchNorm statistics cover every B x T position, padding included, as NeMo does; running stats update like
nn.BatchNorm1d (momentum, unbiased running variance). Reference: `nest_ssl.conformer.conv_module.
glu_dwconv_norm_silu_torch` (tests compare against it).

Kernels: A (`_glu_dwconv_fwd`) loads a halo tile of BLOCK_H rows of h once, evaluates the GLU and its sigmoid once per
element, and forms the K taps as row shifts of that tile in registers (`tl.gather`); it adds the bias and writes
per-(row block, channel) sum and centred second moment of y (no atomics, deterministic); the host turns them into
mean/var (fp64 Chan combine), all-reducing them first when a SyncBatchNorm process group is given; B
(`_affine_silu_fwd`) applies the normalisation + SiLU. Eval mode folds BN into a per-channel scale/shift and runs kernel
A alone with SiLU fused. Backward: `_affine_silu_bwd` (BN/SiLU backward, with partial sums for dgamma/dbeta), then
`_dwconv_glu_bwd`: a dy halo tile gives the transposed conv, then an h halo tile gives the GLU backward and the
depthwise-weight partials, each tile loaded once and each GLU evaluated once. The intermediates y (conv output) and
dy (its gradient) are stored in h's dtype (bf16 under autocast); every sum and statistic is accumulated in fp32.

Limits: batch_norm only (layer/group norm use the torch path); CUDA, or CPU under TRITON_INTERPRET=1. The variance
comes from sums of y and y^2 in fp32 per block, combined in fp64.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elementwise kernels: (BLOCK_T rows x BLOCK_C channels) per program. Halo kernels (depthwise conv): HALO_C channels,
# so their five live (rows x channels) fp32 tiles fit in registers. 8 warps everywhere: no spill and >= 16 resident
# warps per SM for every conv kernel (kernels/results/sm90_static.csv).
BLOCK_T, BLOCK_C = (16, 16) if INTERPRET else (64, 64)
HALO_C = 16 if INTERPRET else 32
NUM_WARPS = 8


def _halo_rows(K: int) -> int:
    """Rows of the conv kernels' halo tile (a power of two): at most a quarter of it is halo (K - 1 rows), so GLU
    work wasted on halo rows stays <= 25% of the tile. NEST-L/XL (K = 9) on GPU: 64 rows, 56 outputs."""
    return max(BLOCK_T, triton.next_power_of_2(4 * (K - 1)))


def static_cases():
    """(kernel, constexprs, num_warps, num_stages) of every launch, for kernels/static_report.py."""
    k = dict(K=9, LEFT=4, BLOCK_H=_halo_rows(9), BLOCK_C=HALO_C)
    blocks = dict(BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return [("_glu_dwconv_fwd", dict(k, HAS_BIAS=True, FOLDED=False), NUM_WARPS, 3),
            ("_glu_dwconv_fwd", dict(k, HAS_BIAS=False, FOLDED=True), NUM_WARPS, 3),
            ("_affine_silu_fwd", blocks, NUM_WARPS, 3),
            ("_affine_silu_bwd", dict(blocks, SECOND=False), NUM_WARPS, 3),
            ("_affine_silu_bwd", dict(blocks, SECOND=True), NUM_WARPS, 3),
            ("_dwconv_glu_bwd", k, NUM_WARPS, 3)]


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
                     R, C, inv_n, SECOND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
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
        # scale = gamma * rstd
        dy = scale * (dz - sum_dz * inv_n - xhat * sum_dzx * inv_n)
        tl.store(dy_ptr + ptrs, dy.to(dy_ptr.dtype.element_ty), mask=m)
    else:
        row = part_ptr + pr * 2 * C
        tl.store(row + offs_c, tl.sum(dz, axis=0), mask=cmask)
        tl.store(row + C + offs_c, tl.sum(dz * tl.where(m, xhat, 0.0), axis=0), mask=cmask)


@triton.jit
def _dwconv_glu_bwd(h_ptr, len_ptr, w_ptr, dy_ptr, dh_ptr, dw_part_ptr, T, C, n_tb,
                    K: tl.constexpr, LEFT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
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
    # Phase 1, dy only: d(GLU output) and dy at this program's rows (fewer live tiles: no spill at 8 warps).
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
        tl.store(dw_part_ptr + ((b * n_tb + tb) * K + k) * C + offs_c,
                 tl.sum(dy * _shift_rows(g, k, BLOCK_H, BLOCK_C), axis=0), mask=cmask)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, group=group)
    return t


def _batch_stats(part: torch.Tensor, T: int, n_tb: int, out_rows: int, group):
    """Mean, biased variance and count over all B*T frames (and ranks) from per-block (sum, centred M2) partials."""
    part = part.double()
    rows = torch.full((n_tb,), float(out_rows), dtype=torch.float64, device=part.device)
    rows[-1] = T - (n_tb - 1) * out_rows
    n_b = rows.repeat(part.shape[0] // n_tb)[:, None]  # (R, 1): frames in each block
    totals = _all_reduce(torch.cat([part[:, 0].sum(0), n_b.sum().reshape(1)]), group)  # SyncBN: global sums
    n = totals[-1]
    mean = totals[:-1] / n
    m2 = (part[:, 1] + n_b * (part[:, 0] / n_b - mean) ** 2).sum(0)  # Chan: blocks around the global mean
    return mean, _all_reduce(m2, group) / n, n


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
        grid = (B, n_tb, triton.cdiv(C, HALO_C))
        # y in h's dtype (bf16 under autocast): half the bytes written here and read three times later; the BN
        # statistics come from the kernel's fp32 accumulator, so they are exact either way.
        y = torch.empty(B, T, C, device=h.device, dtype=h.dtype)
        part = torch.empty(B * n_tb, 2, C, device=h.device, dtype=torch.float32)
        dummy = w.new_empty(1, dtype=torch.float32)
        _glu_dwconv_fwd[grid](h, lengths, w, bias if bias is not None else dummy, y, part, dummy, dummy, T, C,
                              n_tb, K=K, LEFT=left, HAS_BIAS=bias is not None, FOLDED=False, BLOCK_H=block_h,
                              BLOCK_C=HALO_C, num_warps=NUM_WARPS)
        mean, var, n = _batch_stats(part, T, n_tb, block_h - (K - 1), group)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_(momentum * (var * n / (n - 1)).to(running_var.dtype))
        rstd = torch.rsqrt(var + eps).float()
        mean = mean.float()
        scale = (gamma.float() * rstd).contiguous()
        shift = (beta.float() - mean * scale).contiguous()
        out = torch.empty(B, T, C, device=h.device, dtype=h.dtype)
        _affine_silu_fwd[(triton.cdiv(B * T, BLOCK_T), triton.cdiv(C, BLOCK_C))](
            y, out, scale, shift, B * T, C, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
        ctx.save_for_backward(h, lengths, w, y, mean, rstd, scale, shift)
        ctx.meta = (left, K, n_tb, group, float(n), bias is not None, weight.shape, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, lengths, w, y, mean, rstd, scale, shift = ctx.saved_tensors
        left, K, n_tb, group, n, has_bias, w_shape, w_dtype = ctx.meta
        B, T, C2 = h.shape
        C, R = C2 // 2, B * T
        dout = dout.contiguous()
        n_rb = triton.cdiv(R, BLOCK_T)
        grid_r = (n_rb, triton.cdiv(C, BLOCK_C))
        part = torch.empty(n_rb, 2, C, device=h.device, dtype=torch.float32)
        dy = torch.empty(B, T, C, device=h.device, dtype=h.dtype)  # as y: read twice, in h's dtype
        _affine_silu_bwd[grid_r](y, dout, dy, part, scale, shift, mean, rstd, part, R, C, 0.0, SECOND=False,
                                 BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
        local = part.sum(0)  # (2, C): sum dz, sum dz * xhat on this rank
        dbeta, dgamma = local[0].clone(), local[1].clone()  # parameter grads: per rank (DDP averages them)
        sums = _all_reduce(local.clone(), group).contiguous()  # BN's input gradient needs the global sums
        _affine_silu_bwd[grid_r](y, dout, dy, part, scale, shift, mean, rstd, sums, R, C, 1.0 / n, SECOND=True,
                                 BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
        dh = torch.empty_like(h)
        dw_part = torch.empty(B * n_tb, K, C, device=h.device, dtype=torch.float32)
        _dwconv_glu_bwd[(B, n_tb, triton.cdiv(C, HALO_C))](h, lengths, w, dy, dh, dw_part, T, C, n_tb, K=K, LEFT=left,
                                                            BLOCK_H=_halo_rows(K), BLOCK_C=HALO_C, num_warps=NUM_WARPS)
        dw = dw_part.sum(0).t().reshape(w_shape).to(w_dtype)  # (K, C) -> (C, 1, K)
        dbias = dy.sum((0, 1), dtype=torch.float32).to(w_dtype) if has_bias else None
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
    _glu_dwconv_fwd[(B, n_tb, triton.cdiv(C, HALO_C))](
        h.contiguous(), lengths.to(torch.int32).contiguous(), w, scale, out, scale, scale, shift, T, C, n_tb, K=K,
        LEFT=context[0], HAS_BIAS=False, FOLDED=True, BLOCK_H=block_h, BLOCK_C=HALO_C, num_warps=NUM_WARPS)
    return out

"""Triton kernels for the per-tile passes of `stapo.core.lm_head` (CUDA; CPU under TRITON_INTERPRET=1).

The GEMMs stay in cuBLAS (16-bit in, float32 out); these kernels replace the PyTorch tile passes,
which read and write the float32 tile five to seven times, with one read (forward) or one read and
one 16-bit write (backward):

    fold_tile   one program per row: online softmax over the tile's columns, updating
                m, S = Σ e^{z−m}, X = Σ e^{z−m}(z−m), Q = Σ e^{2(z−m)} and the target logit
    grad_tile   one program per (row, column block): dz = g · (onehot(a) − e^{z−lse}) · scale

Same signatures and meaning as `fold_tile_torch` / `grad_tile_torch` in `stapo.core.lm_head`.

The "triton-gemm" backend goes one step further and never writes the logits tile at all: its GEMM
is a Triton matmul whose epilogue does the softmax work on the [BM, BN] block still in registers
(the forward's matmul-with-row-statistics, as in flash attention without the second matmul; the
backward's matmul-with-dz, which writes dz in the compute dtype for the two cuBLAS GEMMs):

    gemm_fold   per (row block, column block): m_b, S_b, X_b, Q_b of the block and the target logit,
                merged into the running row statistics (`merge_block_stats`)
    gemm_grad   per (row block, column block): dz = g · (onehot(a) − e^{z−lse}) · scale

This saves the float32 tile's write and read in each direction (2 × 4 bytes × N × V per pass).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None
    AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FOLD_BLOCK = 1024
GRAD_BLOCK = 1024

if AVAILABLE:

    @triton.jit
    def _fold_kernel(
        z_ptr, z_stride, bias_ptr, tgt_ptr, vocab_start, n_cols, scale,
        m_ptr, s_ptr, x_ptr, q_ptr, tz_ptr,
        HAS_BIAS: tl.constexpr, HAS_Q: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * z_stride
        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        x = tl.load(x_ptr + row)
        q = tl.load(q_ptr + row)
        tz = tl.load(tz_ptr + row)
        local = tl.load(tgt_ptr + row) - vocab_start
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = z * scale
            hit = (local >= start) & (local < start + BLOCK) & (local < n_cols)
            tz = tl.where(hit, tl.sum(tl.where(offs == local, z, 0.0), axis=0), tz)
            new_m = tl.maximum(m, tl.max(tl.where(mask, z, float("-inf")), axis=0))
            # First block of a row: s = 0 and m = −inf, shift by 0 (avoids inf·0 = nan).
            delta = tl.where(s > 0, m - new_m, 0.0)
            rescale = tl.exp(delta)
            zc = tl.where(mask, z - new_m, 0.0)
            e = tl.where(mask, tl.exp(zc), 0.0)
            x = rescale * (x + delta * s) + tl.sum(e * zc, axis=0)
            s = rescale * s + tl.sum(e, axis=0)
            if HAS_Q:
                q = rescale * rescale * q + tl.sum(e * e, axis=0)
            m = new_m
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(x_ptr + row, x)
        tl.store(tz_ptr + row, tz)
        if HAS_Q:
            tl.store(q_ptr + row, q)

    @triton.jit
    def _grad_kernel(
        z_ptr, z_stride, bias_ptr, tgt_ptr, vocab_start, n_cols, scale,
        lse_ptr, g_ptr, out_ptr, out_stride,
        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        z = tl.load(z_ptr + row * z_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z * scale - tl.load(lse_ptr + row))
        local = tl.load(tgt_ptr + row) - vocab_start
        d = (tl.where(offs == local, 1.0, 0.0) - p) * (tl.load(g_ptr + row) * scale)
        tl.store(out_ptr + row * out_stride + offs, d.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _logits_block(h_ptr, w_ptr, stride_hm, stride_hk, stride_wn, stride_wk, R, C, K, pid_m, pid_n,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                      UPCAST: tl.constexpr):
        """acc[BM, BN] = h[rows] @ w[cols]ᵀ with float32 accumulation."""
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = h_ptr + rm[:, None].to(tl.int64) * stride_hm + rk[None, :] * stride_hk
        b_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(a_ptrs, mask=(rm[:, None] < R) & (rk[None, :] + k0 < K), other=0.0)
            b = tl.load(b_ptrs, mask=(rn[None, :] < C) & (rk[:, None] + k0 < K), other=0.0)
            if UPCAST:  # the CPU interpreter's 16-bit tl.dot is wrong; exact either way (fp32 accumulation)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BK * stride_hk
            b_ptrs += BK * stride_wk
        return acc, rm, rn

    @triton.jit
    def _block_ids(R, C, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column block) of this program, grouped so neighbours share weight columns in L2."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(R, BM)
        num_n = tl.cdiv(C, BN)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m

    @triton.jit
    def _raw_logits_block(h_ptr, w_ptr, bias_ptr, stride_hm, stride_hk, stride_wn, stride_wk, R, C, K,
                          HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's block of h @ wᵀ + bias (float32), its row and column indices, its column block."""
        pid_m, pid_n = _block_ids(R, C, BM, BN, GROUP_M)
        z, rm, rn = _logits_block(h_ptr, w_ptr, stride_hm, stride_hk, stride_wn, stride_wk, R, C, K,
                                  pid_m, pid_n, BM, BN, BK, IEEE, UPCAST)
        if HAS_BIAS:
            z += tl.load(bias_ptr + rn, mask=rn < C, other=0.0).to(tl.float32)[None, :]
        return z, rm, rn, pid_n

    @triton.jit
    def _gemm_fold_kernel(
        h_ptr, w_ptr, bias_ptr, tgt_ptr, stats_ptr, tz_ptr,
        stride_hm, stride_hk, stride_wn, stride_wk, R, C, K, vocab_start, scale, plane,
        HAS_BIAS: tl.constexpr, HAS_Q: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        z, rm, rn, pid_n = _raw_logits_block(h_ptr, w_ptr, bias_ptr, stride_hm, stride_hk, stride_wn, stride_wk,
                                             R, C, K, HAS_BIAS, IEEE, UPCAST, BM, BN, BK, GROUP_M)
        col_ok = rn < C
        row_ok = rm < R
        z = z * scale
        m_b = tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1)  # every block has a column
        zc = tl.where(col_ok[None, :], z - m_b[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(zc), 0.0)
        s_b = tl.sum(e, axis=1)
        x_b = tl.sum(e * zc, axis=1)
        # stats[k, block, row] for k = m, S, X, Q; plane = blocks · R (< 2^31, checked by the caller)
        out = stats_ptr + pid_n * R + rm
        tl.store(out, m_b, mask=row_ok)
        tl.store(out + plane, s_b, mask=row_ok)
        tl.store(out + 2 * plane, x_b, mask=row_ok)
        if HAS_Q:
            tl.store(out + 3 * plane, tl.sum(e * e, axis=1), mask=row_ok)
        local = tl.load(tgt_ptr + rm, mask=row_ok, other=-1) - vocab_start
        hit = row_ok & (local >= pid_n * BN) & (local < pid_n * BN + BN) & (local < C)
        picked = tl.sum(tl.where(rn[None, :] == local[:, None], z, 0.0), axis=1)
        tl.store(tz_ptr + rm, picked, mask=hit)

    @triton.jit
    def _gemm_grad_kernel(
        h_ptr, w_ptr, bias_ptr, tgt_ptr, lse_ptr, g_ptr, out_ptr,
        stride_hm, stride_hk, stride_wn, stride_wk, stride_om, R, C, K, vocab_start, scale,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        z, rm, rn, pid_n = _raw_logits_block(h_ptr, w_ptr, bias_ptr, stride_hm, stride_hk, stride_wn, stride_wk,
                                             R, C, K, HAS_BIAS, IEEE, UPCAST, BM, BN, BK, GROUP_M)
        col_ok = rn < C
        row_ok = rm < R
        lse = tl.load(lse_ptr + rm, mask=row_ok, other=0.0)
        p = tl.exp(z * scale - lse[:, None])
        local = tl.load(tgt_ptr + rm, mask=row_ok, other=-1) - vocab_start
        g = tl.load(g_ptr + rm, mask=row_ok, other=0.0) * scale
        d = (tl.where(rn[None, :] == local[:, None], 1.0, 0.0) - p) * g[:, None]
        ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(ptrs, d.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# The GEMM tiles: BN (columns per block) is fixed, since it sets the layout of the forward's block
# statistics; the row block, K step, warps and stages are autotuned per (R, C, K) on the card (a
# few configurations, timed on the first call of each shape). The interpreter (CPU tests) gets the
# smallest tile tl.dot accepts.
GEMM_BN = 16 if INTERPRET else 128
GEMM_GROUP_M = 1 if INTERPRET else 8
# The forward writes no tile, only [blocks, rows] statistics: it takes wider vocabulary chunks than
# the backward (fewer launches and merges; 64 MiB of statistics at 16k rows).
GEMM_FOLD_COLUMNS = 1024 if INTERPRET else 32768

if AVAILABLE:
    if INTERPRET:
        _GEMM_CONFIGS = [triton.Config({"BM": 16, "BK": 16}, num_warps=1, num_stages=1)]
    else:
        _GEMM_CONFIGS = [
            triton.Config({"BM": 128, "BK": 64}, num_warps=8, num_stages=3),
            triton.Config({"BM": 128, "BK": 64}, num_warps=4, num_stages=4),
            triton.Config({"BM": 64, "BK": 64}, num_warps=4, num_stages=4),
            triton.Config({"BM": 128, "BK": 32}, num_warps=4, num_stages=4),
        ]
    _gemm_fold_tuned = triton.autotune(_GEMM_CONFIGS, key=["R", "C", "K"])(_gemm_fold_kernel)
    _gemm_grad_tuned = triton.autotune(_GEMM_CONFIGS, key=["R", "C", "K"])(_gemm_grad_kernel)


def _gemm_launch_args(
    h: torch.Tensor, w: torch.Tensor
) -> tuple[Callable[[dict[str, Any]], tuple[int]], dict[str, Any]]:
    if not AVAILABLE:
        raise RuntimeError("triton is not installed")
    if h.dtype != w.dtype:
        raise ValueError(f"hidden ({h.dtype}) and weight ({w.dtype}) tiles must share the compute dtype")
    rows, cols = h.shape[0], w.shape[0]
    n_col_blocks = triton.cdiv(cols, GEMM_BN)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(rows, meta["BM"]) * n_col_blocks,)

    upcast = INTERPRET and h.dtype != torch.float32
    meta = dict(IEEE=h.dtype == torch.float32 or upcast, UPCAST=upcast, BN=GEMM_BN, GROUP_M=GEMM_GROUP_M)
    return grid, meta


def gemm_fold(
    h: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    targets: torch.Tensor,
    vocab_start: int,
    m: torch.Tensor,
    s: torch.Tensor,
    x: torch.Tensor,
    q: torch.Tensor | None,
    target_z: torch.Tensor,
) -> None:
    """Fold the logits tile (h @ wᵀ + bias) · scale into the row statistics without materialising it.

    h [R, H] and w [C, H] in the compute dtype; m, s, x, q (or None), target_z float32 [R] (in place).
    """
    rows, cols = h.shape[0], w.shape[0]
    if rows == 0 or cols == 0:
        return
    grid, meta = _gemm_launch_args(h, w)
    n_blocks = triton.cdiv(cols, GEMM_BN)
    stats = torch.empty((4 if q is not None else 3, n_blocks, rows), device=h.device, dtype=torch.float32)
    if stats.numel() >= 2**31:
        raise ValueError(f"gemm_fold: {rows} rows x {cols} columns is too large for one call; use smaller tiles")
    _gemm_fold_tuned[grid](
        h, w, bias if bias is not None else h, targets.contiguous(), stats, target_z,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), rows, cols, h.shape[1], vocab_start, float(scale),
        n_blocks * rows, HAS_BIAS=bias is not None, HAS_Q=q is not None, **meta,
    )
    merge_block_stats(m, s, x, q, stats)


def gemm_grad(
    h: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    targets: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """dlogprob/dz_raw of the logits tile (h @ wᵀ + bias), written to out [R, C] (any float dtype)."""
    rows, cols = h.shape[0], w.shape[0]
    if rows == 0 or cols == 0:
        return
    if out.stride(1) != 1:
        raise ValueError("out must be row-major contiguous")
    grid, meta = _gemm_launch_args(h, w)
    _gemm_grad_tuned[grid](
        h, w, bias if bias is not None else h, targets.contiguous(), lse.contiguous(), grad.contiguous(), out,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), out.stride(0), rows, cols, h.shape[1],
        vocab_start, float(scale), HAS_BIAS=bias is not None, **meta,
    )


def merge_block_stats(
    m: torch.Tensor, s: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None, stats: torch.Tensor
) -> None:
    """Fold per-block statistics stats[k, block, row] (k = m_b, S_b, X_b[, Q_b], each relative to its
    block's max m_b) into the running m, S, X[, Q] (in place):

        m' = max(m, max_b m_b),  d_b = m_b − m',  w_b = e^{d_b}
        S' = e^{m−m'} S + Σ_b w_b S_b
        X' = e^{m−m'} (X + (m−m') S) + Σ_b w_b (X_b + d_b S_b)
        Q' = e^{2(m−m')} Q + Σ_b w_b² Q_b
    """
    m_b, s_b, x_b = stats[0], stats[1], stats[2]
    new_m = torch.maximum(m, m_b.amax(0))
    delta = torch.where(s > 0, m - new_m, torch.zeros_like(m))  # unseen rows: m = −inf, S = 0
    rescale = delta.exp()
    d = m_b - new_m
    w = d.exp()
    x.copy_(rescale * (x + delta * s) + (w * (x_b + d * s_b)).sum(0))
    s.copy_(rescale * s + (w * s_b).sum(0))
    if q is not None:
        q.copy_(rescale * rescale * q + (w * w * stats[3]).sum(0))
    m.copy_(new_m)


def _check(z: torch.Tensor) -> None:
    if not AVAILABLE:
        raise RuntimeError("triton is not installed")
    if z.stride(1) != 1:
        raise ValueError("logits tile must be row-major contiguous")


def fold_tile(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    targets: torch.Tensor,
    vocab_start: int,
    m: torch.Tensor,
    s: torch.Tensor,
    x: torch.Tensor,
    q: torch.Tensor | None,
    target_z: torch.Tensor,
) -> None:
    """Triton twin of `stapo.core.lm_head.fold_tile_torch` (z is read, not modified)."""
    _check(z)
    rows, cols = z.shape
    if rows == 0:
        return
    _fold_kernel[(rows,)](
        z, z.stride(0), bias if bias is not None else z, targets.contiguous(), vocab_start, cols, float(scale),
        m, s, x, q if q is not None else s, target_z,
        HAS_BIAS=bias is not None, HAS_Q=q is not None, BLOCK=FOLD_BLOCK,
    )


def grad_tile(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    targets: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Triton twin of `stapo.core.lm_head.grad_tile_torch` (out may alias z when both are float32)."""
    _check(z)
    rows, cols = z.shape
    if rows == 0:
        return
    _grad_kernel[(rows, triton.cdiv(cols, GRAD_BLOCK))](
        z, z.stride(0), bias if bias is not None else z, targets.contiguous(), vocab_start, cols, float(scale),
        lse, grad, out, out.stride(0),
        HAS_BIAS=bias is not None, BLOCK=GRAD_BLOCK,
    )

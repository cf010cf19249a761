"""Triton kernels for the per-tile passes of `stapo.core.lm_head` (CUDA; CPU under TRITON_INTERPRET=1).

The GEMMs stay in cuBLAS (16-bit in, float32 out); these kernels replace the PyTorch tile passes,
which read and write the float32 tile five to seven times, with one read (forward) or one read and
one 16-bit write (backward):

    fold_tile   one program per row: online softmax over the tile's columns, updating
                m, S = Σ e^{z−m}, X = Σ e^{z−m}(z−m), Q = Σ e^{2(z−m)} and the target logit
    grad_tile   one program per (row, column block): dz = g · (onehot(a) − e^{z−lse}) · scale

Same signatures and meaning as `fold_tile_torch` / `grad_tile_torch` in `stapo.core.lm_head`.
"""

from __future__ import annotations

import os

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


def _check(z):
    if not AVAILABLE:
        raise RuntimeError("triton is not installed")
    if z.stride(1) != 1:
        raise ValueError("logits tile must be row-major contiguous")


def fold_tile(z, bias, scale, targets, vocab_start, m, s, x, q, target_z):
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


def grad_tile(z, bias, scale, targets, vocab_start, lse, grad, out):
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

"""JumpReLU (Rajamanoharan et al. 2024) elementwise kernels: ``relu(pre) * (pre > θ)`` (SAELens's maths: no
negative activation even where θ < 0), the Heaviside step, and their
straight-through backward with a rectangle kernel of width ``bandwidth``.

Everything is computed in float32 after loading, with the roundings PyTorch applies at the input precision
reproduced where they decide a comparison: ``u = (pre - θ) / bandwidth`` is rounded to the input dtype after the
subtraction and after the (correctly rounded) division, so the rectangle ``|u| < 1/2`` selects the same entries
as the reference in bfloat16/float16 too. The threshold gradient is a column sum over the batch: each program owns
a column block and a contiguous row range and writes one float32 partial per (row range, column); the launcher
adds the few partials (no atomics, deterministic).
"""

import triton
import triton.language as tl


@triton.jit
def _jumprelu_fwd_kernel(
    pre_ptr,
    threshold_ptr,
    out_ptr,
    N,
    D,
    stride_pn,
    stride_on,
    STEP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out = relu(pre) * (pre > θ)`` (or ``(pre > θ)`` as pre's dtype with STEP), θ ``[D]`` broadcast over
    rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < D
    mask = (rows < N)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    p = tl.load(pre_ptr + rows64[:, None] * stride_pn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    theta = tl.load(threshold_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    above = p > theta[None, :]
    if STEP:
        out = above.to(tl.float32)
    else:
        out = tl.where(above & (p > 0.0), p, 0.0)
    tl.store(out_ptr + rows64[:, None] * stride_on + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _jumprelu_bwd_kernel(
    grad_ptr,
    pre_ptr,
    threshold_ptr,
    d_pre_ptr,
    partial_ptr,
    N,
    D,
    ROWS_PER_PROGRAM,
    stride_gn,
    stride_pn,
    stride_dn,
    bandwidth,
    inv_bandwidth,
    STEP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Straight-through backward over rows ``[pid_1 * ROWS_PER_PROGRAM, ...)`` and columns of block ``pid_0``.

    JumpReLU: ``d_pre = grad * (pre > θ) * (pre > 0)`` and the partial ``sum_rows -(relu(θ) / bandwidth) * K(u) *
    grad`` (relu(θ): the jump's height, 0 where the ReLU hides it); STEP (the
    L0 term) has no ``d_pre`` and the partial ``sum_rows -(1 / bandwidth) * K(u) * grad``. Each product is
    rounded to the input dtype before the float32 sum, as PyTorch forms it."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < D
    first = tl.program_id(1) * ROWS_PER_PROGRAM
    dtype = pre_ptr.dtype.element_ty
    theta = tl.load(threshold_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # scalar arguments as [BLOCK_C] vectors: the interpreter passes Python floats, the compiler fp32 scalars
    bw = tl.zeros([BLOCK_C], dtype=tl.float32) + bandwidth
    if STEP:
        coef = (tl.zeros([BLOCK_C], dtype=tl.float32) - inv_bandwidth).to(dtype).to(tl.float32)
    else:
        coef = -(tl.math.div_rn(tl.maximum(theta, 0.0), bw).to(dtype).to(tl.float32))
    partial = tl.zeros([BLOCK_C], dtype=tl.float32)
    last = tl.minimum(first + ROWS_PER_PROGRAM, N)
    rs = tl.arange(0, BLOCK_R)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + rs
        mask = (rows < last)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        g = tl.load(grad_ptr + rows64[:, None] * stride_gn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.load(pre_ptr + rows64[:, None] * stride_pn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if not STEP:
            d_pre = tl.where((p > theta[None, :]) & (p > 0.0), g, 0.0)
            tl.store(d_pre_ptr + rows64[:, None] * stride_dn + cols[None, :], d_pre.to(dtype), mask=mask)
        diff = (p - theta[None, :]).to(dtype).to(tl.float32)
        u = tl.math.div_rn(diff, bw[None, :]).to(dtype).to(tl.float32)
        inside = (u > -0.5) & (u < 0.5) & mask
        contrib = (coef[None, :] * g).to(dtype).to(tl.float32)
        partial += tl.sum(tl.where(inside, contrib, 0.0), axis=0)
    tl.store(partial_ptr + tl.program_id(1) * D + cols, partial, mask=col_mask)

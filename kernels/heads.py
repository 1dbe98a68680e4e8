"""Per-head partial sums of the pre-activation at selected latents (docs/architecture.md#attribution).

For head-major inputs (head h owns columns ``h * d_head : (h + 1) * d_head``), ``out[n, j, h] = (x[n] - b_dec)_h ·
W_enc[h-block, indices[n, j]]``. Summed over heads and added to the constant term it is the pre-activation exactly,
so it attributes every active latent's activation to heads. Only the selected ``(token, latent)`` pairs are
computed: ``N * m * d_in`` multiply-adds, the cost of one decoder pass (docs/architecture.md#head-partials), instead of
``n_heads`` accumulators per output of the full ``[N, d_sae]`` GEMM.
"""

import triton
import triton.language as tl


@triton.jit
def _head_partial_sums_fwd_kernel(
    x_ptr,
    b_dec_ptr,
    table_ptr,
    indices_ptr,
    out_ptr,
    N,
    M,
    D_HEAD,
    N_HEADS,
    stride_xn,
    stride_tr,
    stride_td,
    stride_in,
    HAS_B_DEC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out [N, M, N_HEADS]`` (contiguous) from ``x [N, d_in]`` and ``table``, the encoder as rows per latent:
    ``table[i, d]`` at ``i * stride_tr + d * stride_td`` (W_enc^T, or W_enc itself with swapped strides).

    One program per (BLOCK_T tokens, BLOCK_J slots); heads in order, each head's columns in BLOCK_D steps. The
    centred input is rounded to its dtype first, as the reference forms ``x - b_dec``."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    tok_mask = tokens < N
    entry_mask = tok_mask[:, None] & (slots < M)[None, :]
    tok64 = tokens.to(tl.int64)
    idx = tl.load(indices_ptr + tok64[:, None] * stride_in + slots[None, :], mask=entry_mask, other=0).to(tl.int64)
    out_base = out_ptr + (tok64[:, None] * M + slots[None, :]) * N_HEADS
    ds = tl.arange(0, BLOCK_D)
    for h in range(0, N_HEADS):
        acc = tl.zeros([BLOCK_T, BLOCK_J], dtype=tl.float32)
        for d0 in range(0, D_HEAD, BLOCK_D):
            d_mask = (d0 + ds) < D_HEAD
            cols = h * D_HEAD + d0 + ds
            xs = tl.load(
                x_ptr + tok64[:, None] * stride_xn + cols[None, :],
                mask=tok_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if HAS_B_DEC:
                b = tl.load(b_dec_ptr + cols, mask=d_mask, other=0.0).to(tl.float32)
                xs = (xs.to(tl.float32) - b[None, :]).to(x_ptr.dtype.element_ty)
            rows = tl.load(
                table_ptr + idx[:, :, None] * stride_tr + cols.to(tl.int64)[None, None, :] * stride_td,
                mask=entry_mask[:, :, None] & d_mask[None, None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(rows * xs.to(tl.float32)[:, None, :], axis=2)
        tl.store(out_base + h, acc.to(out_ptr.dtype.element_ty), mask=entry_mask)

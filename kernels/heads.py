"""Per-head partial sums of the pre-activation at selected latents (docs/architecture.md#attribution).

For head-major inputs (head h owns columns ``h * d_head : (h + 1) * d_head``), ``out[n, j, h] = (x[n] - b_dec)_h ·
W_enc[h-block, indices[n, j]]``. Summed over heads and added to the constant term it is the pre-activation exactly,
so it attributes every active latent's activation to heads. Only the selected ``(token, latent)`` pairs are
computed: ``N * m * d_in`` multiply-adds, the cost of one decoder pass (docs/architecture.md#head-partials), instead of
``n_heads`` accumulators per output of the full ``[N, d_sae]`` GEMM.

For a fixed feature set requested at every token (an attribution scan), ``_encode_heads_fwd_kernel`` is the
encoder itself restricted to those columns, its K loop aligned to heads: each head's partial comes out of the
same tensor-core pass that forms the pre-activation.
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


@triton.jit
def _encode_heads_fwd_kernel(
    x_ptr,
    w_ptr,
    b_enc_ptr,
    features_ptr,
    parts_ptr,
    pre_ptr,
    N,
    M,
    D_HEAD,
    N_HEADS,
    stride_xn,
    stride_wd,
    stride_wl,
    WRITE_PRE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The encoder over a fixed feature set, one head at a time: for ``features [M]`` (the same for every token),
    ``parts [N, M, N_HEADS]`` (contiguous) ``= x_c[:, head h] @ W_enc[head h, features]`` and, with WRITE_PRE,
    ``pre [N, M] = sum_h parts + b_enc[features]``, from the centred input ``x_c [N, d_in]``.

    A program owns a ``[BLOCK_M, BLOCK_F]`` output tile; its K loop runs over d_in in BLOCK_K steps that never
    cross a head boundary, so each head's partial is a tensor-core accumulator that is stored when the head ends
    and added to the total: the per-head attribution of an attribution scan costs the encoder GEMM over the
    requested columns (``N * M * d_in`` multiply-adds on tensor cores) instead of a gather per (token, feature)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_mask = rows < N
    f_mask = fs < M
    feats = tl.load(features_ptr + fs, mask=f_mask, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    out_mask = row_mask[:, None] & f_mask[None, :]
    part_ptrs = parts_ptr + (rows64[:, None] * M + fs[None, :]) * N_HEADS
    total = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    for h in range(0, N_HEADS):
        acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
        head_end = (h + 1) * D_HEAD
        for k0 in range(h * D_HEAD, head_end, BLOCK_K):
            k = k0 + ks
            k_mask = k < head_end
            x = tl.load(
                x_ptr + rows64[:, None] * stride_xn + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
            )
            w = tl.load(
                w_ptr + k.to(tl.int64)[:, None] * stride_wd + feats[None, :] * stride_wl,
                mask=k_mask[:, None] & f_mask[None, :],
                other=0.0,
            )
            if UPCAST_DOT:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        tl.store(part_ptrs + h, acc.to(parts_ptr.dtype.element_ty), mask=out_mask)
        total += acc
    if WRITE_PRE:
        bias = tl.load(b_enc_ptr + feats, mask=f_mask, other=0.0).to(tl.float32)
        pre = total + bias[None, :]
        tl.store(pre_ptr + rows64[:, None] * M + fs[None, :], pre.to(pre_ptr.dtype.element_ty), mask=out_mask)

"""Matryoshka decoder + loss kernels: the full reconstruction and every prefix's squared error in one pass over the
active entries, and the backward in one more (docs/architecture.md#decoder; maths in
``fusedsae.reference.matryoshka_decode_loss`` and ``matryoshka_decode_loss_backward``).

With ``values``/``indices [N, m]`` sorted by latent within each row, so that level l's entries (``widths[l-1] <=
index < widths[l]``) are the slots ``[ends[:, l-1], ends[:, l])`` (``ends [N, L]`` int32, level 0 from slot 0),
``W_dec [d_sae, D]`` and the target ``y [N, D]``:

* ``_matryoshka_decode_loss_fwd_kernel``: one program per (BLOCK_T tokens, BLOCK_D columns) visits the levels in
  order, adds each level's run into one float32 running sum, and after level l adds ``||sum + b_dec - y||^2``
  over its columns to ``sq_part[column block, token, l]``; the launcher sums the column blocks in order. The
  ``[N, L, D]`` prefixes never exist: the cost is one sparse decode plus ``L`` squared norms per token.
* ``_matryoshka_decode_loss_bwd_kernel``: the same tiles run the levels last to first from ``e = recon - y``. With
  ``G_l = 2 grad_sq[:, l] e_l`` and the suffix ``S_l = grad_recon + sum_{l' >= l} G_l'``, each level-l entry's
  W_dec row, gathered once, serves both its ``d value`` partial ``S_l · W_dec[i]`` (over the program's columns, to
  ``dv_part``, in sorted slot order) and the step down ``e_{l-1} = e_l - value * W_dec[i]``. ``S_l`` is stored per
  (token, level) for the per-latent sums of ``d W_dec`` (the sparse kernels' segment sum), ``dy = -sum_l G_l``.

A level's loop runs over the union of its tokens' runs (the block's smallest start to its largest end, each token
masked to its own run), so the slots are walked about once in all, and each row of W_dec is gathered once: the
gathers of one sparse decode. Loads use int64 offsets and accumulate in float32. The forward skips entries whose
value is exactly 0 (padding); the backward gathers them too, since ``d value`` at a zero value is still
``S_l · W_dec[i]``.
"""

import triton
import triton.language as tl


@triton.jit
def _matryoshka_decode_loss_fwd_kernel(
    values_ptr,
    indices_ptr,
    ends_ptr,
    table_ptr,
    bias_ptr,
    y_ptr,
    recon_ptr,
    sq_part_ptr,
    N,
    M,
    D,
    L,
    stride_vn,
    stride_in,
    stride_en,
    stride_tr,
    stride_yn,
    stride_rn,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """``recon [N, D] = sum_j values[:, j] * table[indices[:, j]] + bias`` and ``sq_part [col blocks, N, L]``:
    this program's columns' share of every prefix's squared error (levels in order, slots in order within a level:
    deterministic)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_mask = tokens < N
    col_mask = cols < D
    tile = tok_mask[:, None] & col_mask[None, :]
    tok64 = tokens.to(tl.int64)
    cols64 = cols.to(tl.int64)
    # the running sum is compared with y - b_dec, so the bias is added once, to the reconstruction
    target = tl.load(y_ptr + tok64[:, None] * stride_yn + cols64[None, :], mask=tile, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    target = target - bias[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    level_ids = tl.arange(0, BLOCK_L)
    sq = tl.zeros([BLOCK_T, BLOCK_L], dtype=tl.float32)
    start = tl.zeros([BLOCK_T], dtype=tl.int32)
    for level in range(0, L):
        end = tl.load(ends_ptr + tok64 * stride_en + level, mask=tok_mask, other=0)
        for j in range(tl.min(start, axis=0), tl.max(end, axis=0)):
            mine = tok_mask & (j >= start) & (j < end)
            v = tl.load(values_ptr + tok64 * stride_vn + j, mask=mine, other=0.0).to(tl.float32)
            i = tl.load(indices_ptr + tok64 * stride_in + j, mask=mine, other=0).to(tl.int64)
            live = (v != 0.0)[:, None] & col_mask[None, :]
            w = tl.load(table_ptr + i[:, None] * stride_tr + cols64[None, :], mask=live, other=0.0)
            acc += v[:, None] * w.to(tl.float32)
        start = end
        err = tl.where(tile, acc - target, 0.0)
        sq += tl.where(level_ids[None, :] == level, tl.sum(err * err, axis=1)[:, None], 0.0)
    acc += bias[None, :]
    tl.store(recon_ptr + tok64[:, None] * stride_rn + cols64[None, :], acc.to(recon_ptr.dtype.element_ty), mask=tile)
    part = sq_part_ptr + (tl.program_id(1).to(tl.int64) * N + tok64)[:, None] * L + level_ids[None, :]
    tl.store(part, sq, mask=tok_mask[:, None] & (level_ids < L)[None, :])


@triton.jit
def _matryoshka_decode_loss_bwd_kernel(
    values_ptr,
    indices_ptr,
    ends_ptr,
    table_ptr,
    recon_ptr,
    y_ptr,
    grad_recon_ptr,
    grad_sq_ptr,
    suffix_ptr,
    dv_part_ptr,
    dy_ptr,
    N,
    M,
    D,
    L,
    stride_vn,
    stride_in,
    stride_en,
    stride_tr,
    stride_rn,
    stride_yn,
    stride_gn,
    stride_qn,
    stride_dyn,
    HAS_GRAD_RECON: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """For this program's tokens and columns: ``suffix [N, L, D]`` (``S_l``), ``dv_part [col blocks, N, M]`` (each
    sorted slot's ``S_l · table[i]`` over these columns, written once, at the slot's level) and ``dy [N, D]``."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_mask = tokens < N
    col_mask = cols < D
    tile = tok_mask[:, None] & col_mask[None, :]
    tok64 = tokens.to(tl.int64)
    cols64 = cols.to(tl.int64)
    recon = tl.load(recon_ptr + tok64[:, None] * stride_rn + cols64[None, :], mask=tile, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + tok64[:, None] * stride_yn + cols64[None, :], mask=tile, other=0.0).to(tl.float32)
    err = recon - y
    if HAS_GRAD_RECON:
        s = tl.load(grad_recon_ptr + tok64[:, None] * stride_gn + cols64[None, :], mask=tile, other=0.0)
        s = s.to(tl.float32)
    else:
        s = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dy = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dv_row = dv_part_ptr + (tl.program_id(1).to(tl.int64) * N + tok64) * M
    for step in range(0, L):
        level = L - 1 - step
        g = 2.0 * tl.load(grad_sq_ptr + tok64 * stride_qn + level, mask=tok_mask, other=0.0).to(tl.float32)
        contrib = g[:, None] * err
        s += contrib
        dy -= contrib
        suffix = suffix_ptr + (tok64 * L + level)[:, None] * D + cols64[None, :]
        tl.store(suffix, s.to(suffix_ptr.dtype.element_ty), mask=tile)
        end = tl.load(ends_ptr + tok64 * stride_en + level, mask=tok_mask, other=0)
        # level 0 starts at slot 0 (the load reads level 0's end and is discarded)
        previous = tl.load(ends_ptr + tok64 * stride_en + tl.maximum(level - 1, 0), mask=tok_mask, other=0)
        start = tl.where(level > 0, previous, 0)
        for j in range(tl.min(start, axis=0), tl.max(end, axis=0)):
            mine = tok_mask & (j >= start) & (j < end)
            v = tl.load(values_ptr + tok64 * stride_vn + j, mask=mine, other=0.0).to(tl.float32)
            i = tl.load(indices_ptr + tok64 * stride_in + j, mask=mine, other=0).to(tl.int64)
            w = tl.load(
                table_ptr + i[:, None] * stride_tr + cols64[None, :], mask=mine[:, None] & col_mask[None, :], other=0.0
            ).to(tl.float32)
            tl.store(dv_row + j, tl.sum(s * w, axis=1), mask=mine)
            err -= v[:, None] * w
    tl.store(dy_ptr + tok64[:, None] * stride_dyn + cols64[None, :], dy.to(dy_ptr.dtype.element_ty), mask=tile)

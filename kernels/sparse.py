"""Sparse decoder and sparse encoder-backward kernels: gathers and per-latent reductions over the ``N * m`` active
entries only.

With ``values``/``indices [N, m]``:

* ``_gather_sum_kernel``: ``out[n] = sum_j values[n, j] * table[indices[n, j]] (+ bias)``. The decoder forward
  (table = W_dec) and the encoder's ``d x`` (table = W_enc^T).
* ``_gather_dot_kernel``: ``out[n, j] = table[indices[n, j]] · vectors[n]``. The decoder's ``d values``.
* ``_segment_sum_kernel``: ``out[i] = sum over entries e of latent i of weights[e] * (src[token(e)] - shift)``,
  entries grouped by latent with a stable sort. ``d W_dec`` (src = grad_out) and ``d W_enc`` (src = x, shift =
  b_dec, written transposed) plus ``d b_enc`` (the sums of the weights). Deterministic: each latent's entries are
  summed in token order by one program, no atomics.
* ``_scatter_add_kernel``: the same sums with float32 atomics, token-major (no sort); opt-in, not deterministic.
* ``_matvec_kernel``: ``out = scale * W @ v``, the ``d b_dec = -W_enc @ d b_enc`` that reduces over the batch first.

All are gather-bandwidth bound (about 1 FLOP per byte, docs/architecture.md#sparse-gathers): at 16384 tokens, k = 32 and
d_in = 768 one pass gathers 0.8 GB of bf16 rows. Loads use int64 offsets (rows times strides pass 2**31 at real sizes)
and accumulate in float32. A value of exactly 0 (BatchTopK padding) skips its row load.
"""

import triton
import triton.language as tl


@triton.jit
def _gather_sum_kernel(
    values_ptr,
    indices_ptr,
    table_ptr,
    bias_ptr,
    out_ptr,
    N,
    M,
    D,
    stride_vn,
    stride_in,
    stride_tr,
    stride_td,
    stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out [N, D] = sum_j values[:, j, None] * table[indices[:, j]] + bias``; one program per (BLOCK_T tokens,
    BLOCK_D columns), slots summed in order j = 0..m-1 (deterministic)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_mask = tokens < N
    col_mask = cols < D
    tok64 = tokens.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(0, M):
        v = tl.load(values_ptr + tok64 * stride_vn + j, mask=tok_mask, other=0.0).to(tl.float32)
        i = tl.load(indices_ptr + tok64 * stride_in + j, mask=tok_mask, other=0).to(tl.int64)
        live = (v != 0.0)[:, None] & col_mask[None, :]
        w = tl.load(table_ptr + i[:, None] * stride_tr + cols.to(tl.int64)[None, :] * stride_td, mask=live, other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + tok64[:, None] * stride_on + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tok_mask[:, None] & col_mask[None, :])


@triton.jit
def _gather_dot_kernel(
    table_ptr,
    indices_ptr,
    vectors_ptr,
    out_ptr,
    N,
    M,
    D,
    stride_tr,
    stride_in,
    stride_vn,
    stride_on,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out [N, M]``: ``out[n, j] = table[indices[n, j]] · vectors[n]`` over D in BLOCK_D steps; the gathered
    ``[BLOCK_T, BLOCK_J, BLOCK_D]`` block is multiplied by the token's vector slice, loaded once per step."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    tok_mask = tokens < N
    entry_mask = tok_mask[:, None] & (slots < M)[None, :]
    tok64 = tokens.to(tl.int64)
    idx = tl.load(indices_ptr + tok64[:, None] * stride_in + slots[None, :], mask=entry_mask, other=0).to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_T, BLOCK_J], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + ds) < D
        g = tl.load(
            vectors_ptr + tok64[:, None] * stride_vn + (d0 + ds)[None, :],
            mask=tok_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        rows = tl.load(
            table_ptr + idx[:, :, None] * stride_tr + (d0 + ds)[None, None, :],
            mask=entry_mask[:, :, None] & d_mask[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(rows * g[:, None, :], axis=2)
    out_ptrs = out_ptr + tok64[:, None] * stride_on + slots[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=entry_mask)


@triton.jit
def _segment_sum_kernel(
    src_ptr,
    shift_ptr,
    order_ptr,
    weights_ptr,
    offsets_ptr,
    out_ptr,
    sums_ptr,
    N_OUT,
    D,
    M,
    stride_sn,
    stride_ol,
    stride_od,
    HAS_SHIFT: tl.constexpr,
    WRITE_SUMS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Deterministic per-latent sums over a latent-sorted entry list.

    ``order [E]`` lists flat entry ids (``token * M + slot``) sorted by latent, stably (so by token within a
    latent); latent ``i`` owns ``order[offsets[i]:offsets[i + 1]]``. Each program owns BLOCK_L consecutive
    latents and BLOCK_D columns and walks their entry lists in step (``s``-th entry of every latent at once), so
    a latent's sum is always formed in the same order: ``out[i, :] = sum_s weights[e_s] * (src[e_s // M] -
    shift)``, stored through ``(stride_ol, stride_od)`` so ``d W_enc`` lands transposed in its ``[d_in, d_sae]``
    layout. Latents with no entry get zero rows. With WRITE_SUMS the column-0 programs also store
    ``sums[i] = sum_s weights[e_s]`` (``d b_enc``).
    """
    lats = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lat_mask = lats < N_OUT
    col_mask = cols < D
    start = tl.load(offsets_ptr + lats, mask=lat_mask, other=0)
    length = tl.load(offsets_ptr + lats + 1, mask=lat_mask, other=0) - start
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    total = tl.zeros([BLOCK_L], dtype=tl.float32)
    steps = tl.max(length, axis=0).to(tl.int32)  # a latent has fewer than 2**31 entries
    for s in range(0, steps):
        live = s < length
        entry = tl.load(order_ptr + start + s, mask=live, other=0).to(tl.int64)
        w = tl.load(weights_ptr + entry, mask=live, other=0.0).to(tl.float32)
        token = entry // M
        row = tl.load(
            src_ptr + token[:, None] * stride_sn + cols[None, :],
            mask=live[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_SHIFT:
            row = row - shift[None, :]
        acc += w[:, None] * row
        total += w
    out_ptrs = out_ptr + lats.to(tl.int64)[:, None] * stride_ol + cols.to(tl.int64)[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=lat_mask[:, None] & col_mask[None, :])
    if WRITE_SUMS:
        tl.store(sums_ptr + lats, total.to(sums_ptr.dtype.element_ty), mask=lat_mask & (tl.program_id(1) == 0))


@triton.jit
def _scatter_add_kernel(
    src_ptr,
    shift_ptr,
    indices_ptr,
    weights_ptr,
    out_ptr,
    sums_ptr,
    E,
    D,
    M,
    stride_sn,
    stride_ol,
    stride_od,
    HAS_SHIFT: tl.constexpr,
    WRITE_SUMS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The sums of ``_segment_sum_kernel`` by float32 atomics into zeroed ``out``/``sums``, entries in token order
    (no sort). The order in which atomics land varies run to run, so results vary in the last bits."""
    entries = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_mask = entries < E
    col_mask = cols < D
    entries64 = entries.to(tl.int64)
    lat = tl.load(indices_ptr + entries64, mask=e_mask, other=0).to(tl.int64)
    w = tl.load(weights_ptr + entries64, mask=e_mask, other=0.0).to(tl.float32)
    token = entries64 // M
    mask = e_mask[:, None] & col_mask[None, :]
    row = tl.load(src_ptr + token[:, None] * stride_sn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        row = row - tl.load(shift_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + lat[:, None] * stride_ol + cols.to(tl.int64)[None, :] * stride_od
    tl.atomic_add(out_ptrs, w[:, None] * row, mask=mask)
    if WRITE_SUMS:
        tl.atomic_add(sums_ptr + lat, w, mask=e_mask & (tl.program_id(1) == 0))


@triton.jit
def _matvec_kernel(
    w_ptr,
    v_ptr,
    out_ptr,
    R,
    C,
    stride_wr,
    stride_wc,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out [R] = scale * W [R, C] @ v [C]``, each row's dot product formed by one program in a fixed order."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    cs = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_mask = (c0 + cs) < C
        v = tl.load(v_ptr + c0 + cs, mask=c_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows.to(tl.int64)[:, None] * stride_wr + (c0 + cs).to(tl.int64)[None, :] * stride_wc,
            mask=row_mask[:, None] & c_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * v[None, :], axis=1)
    tl.store(out_ptr + rows, (scale * acc).to(out_ptr.dtype.element_ty), mask=row_mask)

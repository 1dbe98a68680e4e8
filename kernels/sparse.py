"""Sparse decoder and sparse encoder-backward kernels: gathers and per-latent reductions over the ``N * m`` active
entries only.

With ``values``/``indices [N, m]``:

* ``_gather_sum_kernel``: ``out[n] = sum_j values[n, j] * table[indices[n, j]] (+ bias)``. The decoder forward
  (table = W_dec) and the encoder's ``d x`` (table = W_enc^T).
* ``_gather_dot_kernel``: ``out[n, j] = table[indices[n, j]] · vectors[n]``. The decoder's ``d values``.
* ``_segment_chunk_kernel`` + ``_segment_combine_kernel``: ``out[i] = sum over entries e of latent i of
  weights[e] * (src[token(e)] - shift)``, entries grouped by latent with one stable sort per step
  (``reference.latent_segments``). ``d W_dec`` (src = grad_out) and ``d W_enc`` (src = x, shift = b_dec, written
  transposed) plus ``d b_enc`` (the sums of the weights). The sorted list is cut into fixed-size chunks, one program
  each, and the pieces of latents that cross chunks are added in chunk order: deterministic (no atomics), and a
  latent that fires on every token costs what the same entries spread over many latents cost.
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
def _segmented_add(flag_a, sum_a, flag_b, sum_b):
    """Combine of a segmented inclusive scan: ``flag`` marks a segment's first element; a sum restarts there."""
    return flag_a | flag_b, tl.where(flag_b, sum_b, sum_a + sum_b)


@triton.jit
def _segment_chunk_kernel(
    src_ptr,
    shift_ptr,
    order_ptr,
    keys_ptr,
    weights_ptr,
    offsets_ptr,
    out_ptr,
    sums_ptr,
    part_ptr,
    part_sums_ptr,
    E,
    D,
    M,
    stride_sn,
    stride_ol,
    stride_od,
    HAS_SHIFT: tl.constexpr,
    WRITE_SUMS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Phase 1 of the deterministic per-latent sums: one program per CHUNK consecutive entries of the latent-sorted
    list and BLOCK_D columns, whatever latents they belong to.

    ``order [E]`` lists flat entry ids (``token * M + slot``) sorted stably by latent, ``keys [E]`` (int32) the
    latent of each, and latent ``i`` owns ``order[offsets[i]:offsets[i + 1]]``. The program gathers its CHUNK rows
    ``weights[e] * (src[e // M] - shift)`` at once (no chain of dependent loads) and sums each latent's run with a
    segmented scan (a fixed tree, so the result is bitwise repeatable). A latent whose entries all lie in the chunk
    is complete and stored through ``(stride_ol, stride_od)``; the piece of a latent that crosses the chunk's start
    goes to ``part[chunk, 0]``, the piece of one that starts inside and crosses its end to ``part[chunk, 1]``
    (float32), for :func:`_segment_combine_kernel`. So a latent firing on every token is split over many programs
    like any other entries: cost follows the number of entries, not the longest list. With WRITE_SUMS the column-0
    programs do the same for ``sums[i] = sum of weights`` (``d b_enc``) through ``part_sums``. Entries with weight 0
    (BatchTopK padding, AuxK fillers) skip their row load.
    """
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    base = chunk.to(tl.int64) * CHUNK
    pos = base + tl.arange(0, CHUNK)
    valid = pos < E
    lat = tl.load(keys_ptr + pos, mask=valid, other=-1)
    # a run starts at the chunk's first entry or where the latent changes; it ends at the chunk's last valid entry
    # or where the next entry (within the chunk) has another latent
    prev = tl.load(keys_ptr + pos - 1, mask=valid & (pos > base), other=-1)
    nxt = tl.load(keys_ptr + pos + 1, mask=valid & (pos + 1 < base + CHUNK) & (pos + 1 < E), other=-1)
    starts = valid & (lat != prev)
    ends = valid & (lat != nxt)
    entry = tl.load(order_ptr + pos, mask=valid, other=0).to(tl.int64)
    w = tl.load(weights_ptr + entry, mask=valid, other=0.0).to(tl.float32)
    token = entry // M
    live = valid & (w != 0.0)
    row = tl.load(
        src_ptr + token[:, None] * stride_sn + cols[None, :],
        mask=live[:, None] & col_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_SHIFT:
        row = row - tl.load(shift_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    contrib = tl.where(live[:, None], w[:, None] * row, 0.0)
    flags = tl.broadcast_to(starts[:, None], [CHUNK, BLOCK_D])
    _, run_sums = tl.associative_scan((flags, contrib), 0, _segmented_add)
    lat64 = tl.where(ends, lat, 0).to(tl.int64)
    seg_lo = tl.load(offsets_ptr + lat64, mask=ends, other=0)
    seg_hi = tl.load(offsets_ptr + lat64 + 1, mask=ends, other=0)
    complete = ends & (seg_lo >= base) & (seg_hi <= base + CHUNK)
    piece = ends & ((seg_lo < base) | (seg_hi > base + CHUNK))
    slot = tl.where(seg_lo < base, 0, 1).to(tl.int64)
    cols64 = cols.to(tl.int64)
    out_ptrs = out_ptr + lat64[:, None] * stride_ol + cols64[None, :] * stride_od
    tl.store(out_ptrs, run_sums.to(out_ptr.dtype.element_ty), mask=complete[:, None] & col_mask[None, :])
    part_ptrs = part_ptr + ((chunk.to(tl.int64) * 2 + slot) * D)[:, None] + cols64[None, :]
    tl.store(part_ptrs, run_sums, mask=piece[:, None] & col_mask[None, :])
    if WRITE_SUMS:
        # a [CHUNK] bool tensor, not a scalar: newer interpreters (triton 3.9, numpy 2.4) reject a mask made of a
        # tensor & a scalar bool ('mask has unsupported dtype')
        first_cols = (tl.zeros([CHUNK], dtype=tl.int32) + tl.program_id(1)) == 0
        _, w_sums = tl.associative_scan((starts, tl.where(valid, w, 0.0)), 0, _segmented_add)
        tl.store(sums_ptr + lat64, w_sums.to(sums_ptr.dtype.element_ty), mask=complete & first_cols)
        tl.store(part_sums_ptr + chunk.to(tl.int64) * 2 + slot, w_sums, mask=piece & first_cols)


@triton.jit
def _segment_combine_kernel(
    offsets_ptr,
    part_ptr,
    part_sums_ptr,
    out_ptr,
    sums_ptr,
    N_OUT,
    D,
    stride_ol,
    stride_od,
    WRITE_SUMS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Phase 2: every latent :func:`_segment_chunk_kernel` did not complete. A latent whose entries span chunks
    ``c0 < c1`` is ``part[c0, 1] + part[c0 + 1, 0] + ... + part[c1, 0]``, added in that order (bitwise
    repeatable); a latent with no entry gets zeros. ``(c1 - c0)`` is its entry count over CHUNK, so a hot latent
    costs one load per CHUNK entries here."""
    lats = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lat_mask = lats < N_OUT
    col_mask = cols < D
    lo = tl.load(offsets_ptr + lats, mask=lat_mask, other=0)
    hi = tl.load(offsets_ptr + lats + 1, mask=lat_mask, other=0)
    empty = lat_mask & (hi == lo)
    c0 = lo // CHUNK
    spans = tl.where(lat_mask & (hi > lo), (hi - 1) // CHUNK - c0, 0)
    crossing = spans > 0
    cols64 = cols.to(tl.int64)
    mask2 = crossing[:, None] & col_mask[None, :]
    acc = tl.load(part_ptr + ((c0 * 2 + 1) * D)[:, None] + cols64[None, :], mask=mask2, other=0.0)
    total = tl.zeros([BLOCK_L], dtype=tl.float32)
    if WRITE_SUMS:
        total = tl.load(part_sums_ptr + c0 * 2 + 1, mask=crossing, other=0.0)
    for s in range(1, tl.max(spans, axis=0) + 1):
        more = s <= spans
        acc += tl.load(
            part_ptr + (((c0 + s) * 2) * D)[:, None] + cols64[None, :],
            mask=more[:, None] & col_mask[None, :],
            other=0.0,
        )
        if WRITE_SUMS:
            total += tl.load(part_sums_ptr + (c0 + s) * 2, mask=more, other=0.0)
    write = empty | crossing
    out_ptrs = out_ptr + lats.to(tl.int64)[:, None] * stride_ol + cols64[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=write[:, None] & col_mask[None, :])
    if WRITE_SUMS:
        first_cols = (tl.zeros([BLOCK_L], dtype=tl.int32) + tl.program_id(1)) == 0  # a bool tensor (see above)
        tl.store(sums_ptr + lats, total.to(sums_ptr.dtype.element_ty), mask=write & first_cols)


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
    """The sums of ``_segment_chunk_kernel`` by float32 atomics into zeroed ``out``/``sums``, entries in token order
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
        first_cols = (tl.zeros([BLOCK_E], dtype=tl.int32) + tl.program_id(1)) == 0  # a bool tensor (triton 3.9)
        tl.atomic_add(sums_ptr + lat, w, mask=e_mask & first_cols)


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

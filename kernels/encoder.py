"""Fused encoder kernels: ``(x - b_dec) @ W_enc + b_enc`` (x centred by the launcher) on tensor cores with fp32
accumulation, and an epilogue that works on the accumulator while it is still in registers: ReLU / JumpReLU
masking (dense output), or TopK selection (a running per-row bound filters each tile into a small candidate buffer,
optionally a second one among AuxK latents) so that the ``[N, d_sae]`` pre-activation is never written.

Cost model (docs/architecture.md#encoder-gemm, #fused-topk): at 16384 x 768 x 32768 the GEMM is 825 GFLOP, about 1.03 ms
at the 800 TFLOP/s an H100 sustains, while writing the bf16 pre-activation alone is 1.07 GB (0.36 ms) before torch.topk
reads it back several times (1-2 ms). The fused TopK kernel writes only candidate keys, int64: about 760 per row and
column split for random data at k = 32, 16384 columns per split, so about 19% of the bf16 pre-activation's bytes at
32768 latents (the launcher's buffers, with headroom, hold 31%).
"""

import triton
import triton.language as tl

from .topk import KEY_NONE, append_candidates, merge_top, sortable_keys, update_bucket_max

# encode_dense epilogues
ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_JUMPRELU = tl.constexpr(2)


@triton.jit
def _pre_activation_tile(
    x_in,
    w_in,
    b_enc_ptr,
    rows,
    cols,
    row0,
    col0,
    N,
    D_IN,
    D_SAE,
    stride_xn,
    stride_xd,
    stride_wd,
    stride_wl,
    USE_TMA: tl.constexpr,
    W_T: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The pre-activation tile ``[rows, cols]`` (``rows = row0 + arange(BLOCK_M)``, likewise cols) in float32: the
    K loop over ``d_in`` in BLOCK_K steps, plus ``b_enc``.

    The input arrives centred (the launcher forms ``x - b_dec`` once, rounded to the input dtype as the reference
    rounds it before its GEMM): centring inside the loop would put the A operand through registers (a shared-
    memory load and layout conversions per K step) instead of feeding wgmma from shared memory, and folding
    ``b_dec @ W_enc`` into the bias would cancel large terms when activations carry a large mean.

    With USE_TMA, ``x_in`` and ``w_in`` are tensor descriptors (Hopper's TMA copies whole tiles into shared memory,
    zero-filled past the edges, with no address arithmetic in registers); ``W_T`` means ``w_in`` describes W_enc^T
    ``[d_sae, d_in]`` (an encoder stored as decoder-shaped rows), loaded K-major and transposed in shared memory.
    Otherwise they are pointers with strides. ``UPCAST_DOT`` feeds float32 operands to ``tl.dot``; only the
    launcher's interpreter path sets it, because triton 3.6's interpreter multiplies bfloat16 bit patterns as
    integers (triton-lang/triton#11584).
    """
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if USE_TMA:
        for k0 in range(0, D_IN, BLOCK_K):
            x = x_in.load([row0, k0])
            if W_T:
                w = w_in.load([col0, k0]).T
            else:
                w = w_in.load([k0, col0])
            if UPCAST_DOT:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    else:
        row_mask = rows < N
        col_mask = cols < D_SAE
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_in + rows.to(tl.int64)[:, None] * stride_xn + ks[None, :] * stride_xd
        w_ptrs = w_in + ks.to(tl.int64)[:, None] * stride_wd + cols.to(tl.int64)[None, :] * stride_wl
        for k0 in range(0, D_IN, BLOCK_K):
            k_mask = (k0 + ks) < D_IN
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST_DOT:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xd
            w_ptrs += BLOCK_K * stride_wd
    bias = tl.load(b_enc_ptr + cols, mask=cols < D_SAE, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _encode_dense_fwd_kernel(
    x_in,
    w_in,
    b_enc_ptr,
    threshold_ptr,
    out_ptr,
    N,
    D_IN,
    D_SAE,
    stride_xn,
    stride_xd,
    stride_wd,
    stride_wl,
    stride_on,
    ACTIVATION: tl.constexpr,
    USE_TMA: tl.constexpr,
    W_T: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out [N, d_sae] = act(x_c @ W_enc + b_enc)`` from the centred input ``x_c [N, d_in]``, act = none | relu |
    jumprelu (``relu(pre) * (pre > θ)``).

    Programs are grouped GROUP_M row blocks at a time along the columns, so a column block of W_enc is read from
    HBM once per group and from L2 by the others. The activation compares the pre-activation after rounding it to
    the output dtype, as the reference's ``relu(addmm(...))`` does."""
    pid = tl.program_id(0)
    n_pid_m = tl.cdiv(N, BLOCK_M)
    n_pid_n = tl.cdiv(D_SAE, BLOCK_N)
    group_size = GROUP_M * n_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    pre = _pre_activation_tile(
        x_in,
        w_in,
        b_enc_ptr,
        rows,
        cols,
        row0,
        col0,
        N,
        D_IN,
        D_SAE,
        stride_xn,
        stride_xd,
        stride_wd,
        stride_wl,
        USE_TMA,
        W_T,
        UPCAST_DOT,
        DOT_PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    pre = pre.to(out_ptr.dtype.element_ty).to(tl.float32)
    col_mask = cols < D_SAE
    if ACTIVATION == ACT_RELU:
        pre = tl.maximum(pre, 0.0)
    elif ACTIVATION == ACT_JUMPRELU:
        theta = tl.load(threshold_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        pre = tl.where((pre > theta[None, :]) & (pre > 0.0), pre, 0.0)
    mask = (rows < N)[:, None] & col_mask[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :]
    tl.store(out_ptrs, pre.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``t [BLOCK_M, BLOCK_N]`` as its left and right ``[BLOCK_M, BLOCK_N // 2]`` column halves (in the wgmma
    accumulator layout each thread holds whole column groups, so this moves no data)."""
    return tl.split(tl.permute(tl.reshape(t, [BLOCK_M, 2, BLOCK_N // 2]), [0, 2, 1]))


@triton.jit
def _filter_part(pre, keep, keys, bound, row_ptrs, count, bucket_max, CAP, NB: tl.constexpr, WIDTH: tl.constexpr):
    """The TopK (or AuxK) filter over one column part ``pre [BLOCK_M, WIDTH]`` of a tile (``keep``: the entries that
    may be selected, ``keys``: their int64 keys): appends those strictly above the row's running ``bound [BLOCK_M]``
    and folds the part into ``bucket_max [BLOCK_M, NB]``, the slice of the row's bucket maxima whose columns the
    part holds. Returns the new count and slice."""
    count = append_candidates(keep & (pre > bound[:, None]), keys, row_ptrs, count, CAP)
    if WIDTH == NB:  # one column per bucket: no regrouping of the part
        bucket_max = tl.maximum(bucket_max, tl.where(keep, pre, float("-inf")))
    else:
        bucket_max = update_bucket_max(bucket_max, tl.where(keep, pre, float("-inf")), NB, WIDTH)
    return count, bucket_max


@triton.jit
def _bound(b0, b1, b2, b3, SLICES: tl.constexpr):
    """The row's running bound ``[BLOCK_M]``: the smallest bucket maximum over the SLICES (1, 2 or 4) slices."""
    bound = tl.min(b0, axis=1)
    if SLICES > 1:
        bound = tl.minimum(bound, tl.min(b1, axis=1))
    if SLICES > 2:
        bound = tl.minimum(bound, tl.minimum(tl.min(b2, axis=1), tl.min(b3, axis=1)))
    return bound


@triton.jit
def _topk_encode_fwd_kernel(
    x_in,
    w_in,
    b_enc_ptr,
    aux_mask_ptr,
    cand_ptr,
    count_ptr,
    aux_cand_ptr,
    aux_count_ptr,
    N,
    D_IN,
    D_SAE,
    TILES_PER_SPLIT,
    N_SPLITS,
    CAP,
    CAP_AUX,
    stride_xn,
    stride_xd,
    stride_wd,
    stride_wl,
    HAS_AUX: tl.constexpr,
    USE_TMA: tl.constexpr,
    W_T: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KP: tl.constexpr,
    KP_AUX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    """Fused GEMM + TopK filter over the centred input. A work item is a (row block, column split); the program
    sweeps the split's column tiles, and in each tile's epilogue the rounded pre-activations strictly above the
    row's running bound (``update_bucket_max``) are appended as int64 keys to the row's candidate buffer
    ``cand[row, split, :CAP]`` and counted in ``count[row, split]``. With HAS_AUX the same happens among latents
    where ``aux_mask`` is non-zero, with its own bound and buffer. ``_topk_candidates_kernel`` then selects the k
    best candidates; a row whose count exceeds CAP is recomputed by the launcher's two-pass path, so the result is
    always exact.

    Per element the epilogue costs a compare, a prefix sum and a bucket max (no sort), while the tile is still in
    registers; the ``[N, d_sae]`` pre-activation is never written. Work items are numbered split-fastest and a
    program takes items ``pid, pid + num_programs, ...`` (one item each when the grid covers them all, a
    persistent loop when the launcher caps the grid at the resident programs): the programs running at one time
    then cover ``num_programs / N_SPLITS`` row blocks, whose x blocks (reread for every column tile) stay in L2,
    and the programs of one split walk the same W_enc tiles together. The pre-activation is rounded to the input
    dtype before ranking so that ties and order match the reference's ``addmm`` output.

    The epilogue works on EPILOGUE_SPLIT (1, 2 or 4) column parts of the tile in turn, so that its per-element
    temporaries live for a part at a time; a bound with more buckets than a part has columns keeps them in slices,
    a part updating one slice. So the split does not depend on KP or KP_AUX (BLOCK_N >= KP, KP_AUX suffices): the
    AuxK filter's 128 buckets split like the TopK filter's 32. The selection is the same for every split."""
    tl.static_assert(EPILOGUE_SPLIT == 1 or EPILOGUE_SPLIT == 2 or EPILOGUE_SPLIT == 4)
    WIDTH: tl.constexpr = BLOCK_N // EPILOGUE_SPLIT
    # More buckets than a part has columns: the buckets in slices of one column each (see below).
    SLICES: tl.constexpr = KP // WIDTH if KP > WIDTH else 1
    AUX_SLICES: tl.constexpr = KP_AUX // WIDTH if KP_AUX > WIDTH else 1
    NB: tl.constexpr = KP // SLICES
    NA: tl.constexpr = KP_AUX // AUX_SLICES
    n_items = tl.cdiv(N, BLOCK_M) * N_SPLITS
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        split = item % N_SPLITS
        row0 = (item // N_SPLITS) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)
        row_ptrs = cand_ptr + (rows64 * N_SPLITS + split) * CAP
        # The row's KP bucket maxima. A bucket is any fixed set of columns (the bound needs KP distinct entries,
        # not which ones): with KP <= WIDTH, every part updates all KP buckets, each taking WIDTH // KP adjacent
        # columns of the part (one each when WIDTH == KP: no regrouping of the tile); with KP > WIDTH (AuxK's 128
        # buckets, k = 64 over quarters), SLICES = KP // WIDTH slices of WIDTH one-column buckets, part p updating
        # slice p * SLICES // EPILOGUE_SPLIT only. Slices past SLICES are never updated, so no loop carries them.
        count = tl.zeros([BLOCK_M], dtype=tl.int32)
        b0 = tl.full([BLOCK_M, KP // SLICES], float("-inf"), tl.float32)
        b1 = b0
        b2 = b0
        b3 = b0
        aux_row_ptrs = row_ptrs  # without AuxK, a placeholder that nothing uses
        if HAS_AUX:
            aux_row_ptrs = aux_cand_ptr + (rows64 * N_SPLITS + split) * CAP_AUX
        aux_count = tl.zeros([BLOCK_M], dtype=tl.int32)
        a0 = tl.full([BLOCK_M, KP_AUX // AUX_SLICES], float("-inf"), tl.float32)
        a1 = a0
        a2 = a0
        a3 = a0
        for t in range(0, TILES_PER_SPLIT):
            col0 = (split * TILES_PER_SPLIT + t) * BLOCK_N
            cols = col0 + tl.arange(0, BLOCK_N)
            pre = _pre_activation_tile(
                x_in,
                w_in,
                b_enc_ptr,
                rows,
                cols,
                row0,
                col0,
                N,
                D_IN,
                D_SAE,
                stride_xn,
                stride_xd,
                stride_wd,
                stride_wl,
                USE_TMA,
                W_T,
                UPCAST_DOT,
                DOT_PRECISION,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
            )
            pre = pre.to(b_enc_ptr.dtype.element_ty).to(tl.float32)
            # The filter on column halves (or quarters) in turn: its per-element temporaries (keys, slots,
            # addresses) exist for a part of the tile at a time, which is what keeps it from spilling.
            if EPILOGUE_SPLIT == 1:
                parts = (pre,)
            else:
                left, right = _halves(pre, BLOCK_M, BLOCK_N)
                if EPILOGUE_SPLIT == 2:
                    parts = (left, right)
                else:
                    parts = _halves(left, BLOCK_M, BLOCK_N // 2) + _halves(right, BLOCK_M, BLOCK_N // 2)
            for p in tl.static_range(EPILOGUE_SPLIT):
                part = parts[p]
                part_cols = col0 + p * WIDTH + tl.arange(0, WIDTH)
                valid = row_mask[:, None] & (part_cols < D_SAE)[None, :]
                keys = sortable_keys(part, part_cols[None, :])
                bound = _bound(b0, b1, b2, b3, SLICES)
                s = p * SLICES // EPILOGUE_SPLIT  # constexpr: the slice of this part's columns
                if s == 0:
                    count, b0 = _filter_part(part, valid, keys, bound, row_ptrs, count, b0, CAP, NB, WIDTH)
                elif s == 1:
                    count, b1 = _filter_part(part, valid, keys, bound, row_ptrs, count, b1, CAP, NB, WIDTH)
                elif s == 2:
                    count, b2 = _filter_part(part, valid, keys, bound, row_ptrs, count, b2, CAP, NB, WIDTH)
                else:
                    count, b3 = _filter_part(part, valid, keys, bound, row_ptrs, count, b3, CAP, NB, WIDTH)
                if HAS_AUX:
                    dead_cols = tl.load(aux_mask_ptr + part_cols, mask=part_cols < D_SAE, other=0) != 0
                    dead = valid & dead_cols[None, :]
                    aux_bound = _bound(a0, a1, a2, a3, AUX_SLICES)
                    sa = p * AUX_SLICES // EPILOGUE_SPLIT
                    if sa == 0:
                        aux_count, a0 = _filter_part(
                            part, dead, keys, aux_bound, aux_row_ptrs, aux_count, a0, CAP_AUX, NA, WIDTH
                        )
                    elif sa == 1:
                        aux_count, a1 = _filter_part(
                            part, dead, keys, aux_bound, aux_row_ptrs, aux_count, a1, CAP_AUX, NA, WIDTH
                        )
                    elif sa == 2:
                        aux_count, a2 = _filter_part(
                            part, dead, keys, aux_bound, aux_row_ptrs, aux_count, a2, CAP_AUX, NA, WIDTH
                        )
                    else:
                        aux_count, a3 = _filter_part(
                            part, dead, keys, aux_bound, aux_row_ptrs, aux_count, a3, CAP_AUX, NA, WIDTH
                        )
        tl.store(count_ptr + rows64 * N_SPLITS + split, count, mask=row_mask)
        if HAS_AUX:
            tl.store(aux_count_ptr + rows64 * N_SPLITS + split, aux_count, mask=row_mask)


@triton.jit
def _topk_encode_redo_kernel(
    x_ptr,
    w_ptr,
    b_enc_ptr,
    aux_mask_ptr,
    redo_ptr,
    keys_ptr,
    aux_keys_ptr,
    N,
    D_IN,
    D_SAE,
    stride_xn,
    stride_xd,
    stride_wd,
    stride_wl,
    stride_kn,
    stride_akn,
    HAS_AUX: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KP: tl.constexpr,
    KP_AUX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Exact TopK (and AuxK) keys from the centred input for the rows the candidate filter could not serve
    (``redo [N]`` non-zero: a candidate buffer overflowed, or fewer than k entries rose above -inf), decided on the
    device: a program whose row block has no such row does nothing, so the launcher never asks the host which rows
    to redo.

    A redone block recomputes its pre-activation tiles over all columns and keeps a running merge of the KP best
    keys (``merge_top``, no buffer to overflow), rounded as in ``_topk_encode_fwd_kernel``. AuxK ranks the latents
    outside ``aux_mask`` as -inf (as the reference's masked fill does), so a row with fewer eligible latents than
    aux_k still gets valid indices. Writes ``keys[row, :KP]`` (``aux_keys[row, :KP_AUX]``) of the redone rows only."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    redo = row_mask & (tl.load(redo_ptr + rows, mask=row_mask, other=0) != 0)
    if tl.max(redo.to(tl.int32), axis=0) > 0:
        best = tl.full([BLOCK_M, KP], KEY_NONE, tl.int64)
        aux_best = tl.full([BLOCK_M, KP_AUX], KEY_NONE, tl.int64)
        for c0 in range(0, D_SAE, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            pre = _pre_activation_tile(
                x_ptr,
                w_ptr,
                b_enc_ptr,
                rows,
                cols,
                tl.program_id(0) * BLOCK_M,
                c0,
                N,
                D_IN,
                D_SAE,
                stride_xn,
                stride_xd,
                stride_wd,
                stride_wl,
                False,
                False,
                UPCAST_DOT,
                DOT_PRECISION,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
            )
            pre = pre.to(b_enc_ptr.dtype.element_ty).to(tl.float32)
            valid = row_mask[:, None] & (cols < D_SAE)[None, :]
            best = merge_top(best, tl.where(valid, sortable_keys(pre, cols[None, :]), KEY_NONE), KP)
            if HAS_AUX:
                dead = (tl.load(aux_mask_ptr + cols, mask=cols < D_SAE, other=0) != 0)[None, :]
                aux_pre = tl.where(dead, pre, float("-inf"))
                aux_keys = tl.where(valid, sortable_keys(aux_pre, cols[None, :]), KEY_NONE)
                aux_best = merge_top(aux_best, aux_keys, KP_AUX)
        rows64 = rows.to(tl.int64)
        tl.store(keys_ptr + rows64[:, None] * stride_kn + tl.arange(0, KP)[None, :], best, mask=redo[:, None])
        if HAS_AUX:
            aux_ptrs = aux_keys_ptr + rows64[:, None] * stride_akn + tl.arange(0, KP_AUX)[None, :]
            tl.store(aux_ptrs, aux_best, mask=redo[:, None])

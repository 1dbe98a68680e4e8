"""Fused encoder kernels: ``(x - b_dec) @ W_enc + b_enc`` on tensor cores with fp32 accumulation, and an epilogue
that works on the accumulator while it is still in registers: ReLU / JumpReLU masking (dense output), or TopK
selection (a running per-row bound filters each tile into a small candidate buffer, optionally a second one among
AuxK latents) so that the ``[N, d_sae]`` pre-activation is never written.

Cost model (docs/architecture.md#encoder-gemm, #fused-topk): at 16384 x 768 x 32768 the GEMM is 825 GFLOP, about 1.03 ms
at the 800 TFLOP/s an H100 sustains, while writing the bf16 pre-activation alone is 1.07 GB (0.36 ms) before torch.topk
reads it back several times (1-2 ms). The fused TopK kernel writes only candidate keys, int64: about 760 per row and
column split for random data at k = 32, 16384 columns per split, so about 19% of the bf16 pre-activation's bytes at
32768 latents (the launcher's buffers, with headroom, hold 31%).
"""

import triton
import triton.language as tl

from fusedsae.kernels.topk import _KEY_NONE, _append_candidates, _bucket_max, _merge_top, _sortable_keys

# encode_dense epilogues
ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_JUMPRELU = tl.constexpr(2)


@triton.jit
def _pre_activation_tile(
    x_ptr,
    w_ptr,
    b_enc_ptr,
    b_dec_ptr,
    rows,
    cols,
    N,
    D_IN,
    D_SAE,
    stride_xn,
    stride_xd,
    stride_wd,
    stride_wl,
    HAS_B_DEC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The pre-activation tile ``[rows, cols]`` in float32: the K loop over ``d_in`` in BLOCK_K steps.

    The input is centred in the loop (``x - b_dec`` rounded to the input dtype, as PyTorch rounds it before its
    GEMM) rather than folding ``b_dec @ W_enc`` into the bias: folding cancels large terms when activations carry
    a large mean, and the subtraction is BLOCK_M * BLOCK_K operations per BLOCK_M * BLOCK_N * BLOCK_K MMA.
    ``UPCAST_DOT`` feeds float32 operands to ``tl.dot``; only the launcher's interpreter path sets it, because
    triton 3.6's interpreter multiplies bfloat16 bit patterns as integers (triton-lang/triton#11584).
    """
    row_mask = rows < N
    col_mask = cols < D_SAE
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xn + ks[None, :] * stride_xd
    w_ptrs = w_ptr + ks.to(tl.int64)[:, None] * stride_wd + cols.to(tl.int64)[None, :] * stride_wl
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        k_mask = (k0 + ks) < D_IN
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_B_DEC:
            b = tl.load(b_dec_ptr + k0 + ks, mask=k_mask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) - b[None, :]).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST_DOT:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    bias = tl.load(b_enc_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _encode_dense_fwd_kernel(
    x_ptr,
    w_ptr,
    b_enc_ptr,
    b_dec_ptr,
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
    HAS_B_DEC: tl.constexpr,
    ACTIVATION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out [N, d_sae] = act((x - b_dec) @ W_enc + b_enc)``, act = none | relu | jumprelu (``relu(pre) * (pre > θ)``).

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
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pre = _pre_activation_tile(
        x_ptr,
        w_ptr,
        b_enc_ptr,
        b_dec_ptr,
        rows,
        cols,
        N,
        D_IN,
        D_SAE,
        stride_xn,
        stride_xd,
        stride_wd,
        stride_wl,
        HAS_B_DEC,
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
def _topk_encode_fwd_kernel(
    x_ptr,
    w_ptr,
    b_enc_ptr,
    b_dec_ptr,
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
    HAS_B_DEC: tl.constexpr,
    HAS_AUX: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KP: tl.constexpr,
    KP_AUX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Fused GEMM + TopK filter. Per (row block, column split), sweeps the split's column tiles; in each tile's
    epilogue the rounded pre-activations strictly above the row's running bound (``_bucket_max``) are appended as
    int64 keys to the row's candidate buffer ``cand[row, split, :CAP]`` and counted in ``count[row, split]``.
    With HAS_AUX the same happens among latents where ``aux_mask`` is non-zero, with its own bound and buffer.
    ``_topk_candidates_kernel`` then selects the k best candidates; a row whose count exceeds CAP is recomputed by
    the launcher's two-pass path, so the result is always exact.

    Per element the epilogue costs a compare, a prefix sum and a bucket max (no sort), while the tile is still in
    registers; the ``[N, d_sae]`` pre-activation is never written. The grid's fastest axis is the row block, so
    concurrently running programs read the same W_enc tile (one HBM read, the rest from L2). The pre-activation
    is rounded to the input dtype before ranking so that ties and order match the reference's ``addmm`` output."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    row_ptrs = cand_ptr + (rows64 * N_SPLITS + split) * CAP
    bucket_max = tl.full([BLOCK_M, KP], float("-inf"), tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_AUX:
        aux_row_ptrs = aux_cand_ptr + (rows64 * N_SPLITS + split) * CAP_AUX
        aux_bucket_max = tl.full([BLOCK_M, KP_AUX], float("-inf"), tl.float32)
        aux_count = tl.zeros([BLOCK_M], dtype=tl.int32)
    for t in range(0, TILES_PER_SPLIT):
        cols = (split * TILES_PER_SPLIT + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        pre = _pre_activation_tile(
            x_ptr,
            w_ptr,
            b_enc_ptr,
            b_dec_ptr,
            rows,
            cols,
            N,
            D_IN,
            D_SAE,
            stride_xn,
            stride_xd,
            stride_wd,
            stride_wl,
            HAS_B_DEC,
            UPCAST_DOT,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        pre = pre.to(x_ptr.dtype.element_ty).to(tl.float32)
        valid = row_mask[:, None] & (cols < D_SAE)[None, :]
        keys = _sortable_keys(pre, cols[None, :])
        bound = tl.min(bucket_max, axis=1)
        count = _append_candidates(valid & (pre > bound[:, None]), keys, row_ptrs, count, CAP)
        bucket_max = _bucket_max(bucket_max, tl.where(valid, pre, float("-inf")), KP, BLOCK_N)
        if HAS_AUX:
            dead = valid & (tl.load(aux_mask_ptr + cols, mask=cols < D_SAE, other=0) != 0)[None, :]
            aux_bound = tl.min(aux_bucket_max, axis=1)
            aux_keep = dead & (pre > aux_bound[:, None])
            aux_count = _append_candidates(aux_keep, keys, aux_row_ptrs, aux_count, CAP_AUX)
            aux_bucket_max = _bucket_max(aux_bucket_max, tl.where(dead, pre, float("-inf")), KP_AUX, BLOCK_N)
    tl.store(count_ptr + rows64 * N_SPLITS + split, count, mask=row_mask)
    if HAS_AUX:
        tl.store(aux_count_ptr + rows64 * N_SPLITS + split, aux_count, mask=row_mask)


@triton.jit
def _topk_encode_redo_kernel(
    x_ptr,
    w_ptr,
    b_enc_ptr,
    b_dec_ptr,
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
    HAS_B_DEC: tl.constexpr,
    HAS_AUX: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KP: tl.constexpr,
    KP_AUX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Exact TopK (and AuxK) keys for the rows the candidate filter could not serve (``redo [N]`` non-zero: a
    candidate buffer overflowed, or fewer than k entries rose above -inf), decided on the device: a program whose
    row block has no such row does nothing, so the launcher never asks the host which rows to redo.

    A redone block recomputes its pre-activation tiles over all columns and keeps a running merge of the KP best
    keys (``_merge_top``, no buffer to overflow), rounded as in ``_topk_encode_fwd_kernel``. AuxK ranks the latents
    outside ``aux_mask`` as -inf (as the reference's masked fill does), so a row with fewer eligible latents than
    aux_k still gets valid indices. Writes ``keys[row, :KP]`` (``aux_keys[row, :KP_AUX]``) of the redone rows only."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    redo = row_mask & (tl.load(redo_ptr + rows, mask=row_mask, other=0) != 0)
    if tl.max(redo.to(tl.int32), axis=0) > 0:
        best = tl.full([BLOCK_M, KP], _KEY_NONE, tl.int64)
        aux_best = tl.full([BLOCK_M, KP_AUX], _KEY_NONE, tl.int64)
        for c0 in range(0, D_SAE, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            pre = _pre_activation_tile(
                x_ptr,
                w_ptr,
                b_enc_ptr,
                b_dec_ptr,
                rows,
                cols,
                N,
                D_IN,
                D_SAE,
                stride_xn,
                stride_xd,
                stride_wd,
                stride_wl,
                HAS_B_DEC,
                UPCAST_DOT,
                DOT_PRECISION,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
            )
            pre = pre.to(x_ptr.dtype.element_ty).to(tl.float32)
            valid = row_mask[:, None] & (cols < D_SAE)[None, :]
            best = _merge_top(best, tl.where(valid, _sortable_keys(pre, cols[None, :]), _KEY_NONE), KP)
            if HAS_AUX:
                dead = (tl.load(aux_mask_ptr + cols, mask=cols < D_SAE, other=0) != 0)[None, :]
                aux_pre = tl.where(dead, pre, float("-inf"))
                aux_keys = tl.where(valid, _sortable_keys(aux_pre, cols[None, :]), _KEY_NONE)
                aux_best = _merge_top(aux_best, aux_keys, KP_AUX)
        rows64 = rows.to(tl.int64)
        tl.store(keys_ptr + rows64[:, None] * stride_kn + tl.arange(0, KP)[None, :], best, mask=redo[:, None])
        if HAS_AUX:
            aux_ptrs = aux_keys_ptr + rows64[:, None] * stride_akn + tl.arange(0, KP_AUX)[None, :]
            tl.store(aux_ptrs, aux_best, mask=redo[:, None])

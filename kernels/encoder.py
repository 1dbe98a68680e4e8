"""Fused encoder kernels: ``(x - b_dec) @ W_enc + b_enc`` on tensor cores with fp32 accumulation, and an epilogue
that works on the accumulator while it is still in registers: ReLU / JumpReLU masking (dense output), or TopK
selection (running per-row top-k, optionally a second one among AuxK latents) so that the ``[N, d_sae]``
pre-activation is never written.

Cost model (gpu_limits.md §1.3, §2.3): at 16384 x 768 x 32768 the GEMM is 825 GFLOP, about 1.03 ms at the
800 TFLOP/s an H100 sustains, while writing the bf16 pre-activation alone is 1.07 GB (0.36 ms) before torch.topk
reads it back several times (1-2 ms). The fused TopK kernel writes only ``n_splits * KP`` int64 keys per row.
"""

import triton
import triton.language as tl

from fusedsae.kernels.topk import _KEY_NONE, _merge_top, _sortable_keys

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
    """``out [N, d_sae] = act((x - b_dec) @ W_enc + b_enc)``, act = none | relu | jumprelu (``pre * (pre > θ)``).

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
        pre = tl.where(pre > theta[None, :], pre, 0.0)
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
    keys_ptr,
    aux_keys_ptr,
    N,
    D_IN,
    D_SAE,
    TILES_PER_SPLIT,
    stride_xn,
    stride_xd,
    stride_wd,
    stride_wl,
    stride_kn,
    stride_an,
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
    """Fused GEMM + TopK: per (row block, column split), the KP largest pre-activation keys of each row within
    the split (and, with HAS_AUX, the KP_AUX largest among latents where ``aux_mask`` is non-zero), written sorted
    to ``keys[row, split * KP : ...]`` / ``aux_keys[row, split * KP_AUX : ...]``. The launcher merges the splits
    (a ``torch.topk`` over ``n_splits * KP`` keys per row) and decodes values and indices.

    Each program sweeps its split's column tiles; the grid's fastest axis is the row block, so concurrently running
    programs read the same W_enc tile (one HBM read, the rest from L2). The pre-activation is rounded to the input
    dtype before ranking so that ties and order match the reference, which ranks the rounded ``addmm`` output."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    best = tl.full([BLOCK_M, KP], _KEY_NONE, tl.int64)
    aux_best = tl.full([BLOCK_M, KP_AUX], _KEY_NONE, tl.int64)
    for t in range(0, TILES_PER_SPLIT):
        cols = (split * TILES_PER_SPLIT + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < D_SAE
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
        keys = tl.where(col_mask[None, :], _sortable_keys(pre, cols[None, :]), _KEY_NONE)
        best = _merge_top(best, keys, KP)
        if HAS_AUX:
            dead = tl.load(aux_mask_ptr + cols, mask=col_mask, other=0) != 0
            aux_best = _merge_top(aux_best, tl.where(dead[None, :], keys, _KEY_NONE), KP_AUX)
    row_mask = (rows < N)[:, None]
    rows64 = rows.to(tl.int64)
    slots = split * KP + tl.arange(0, KP)
    tl.store(keys_ptr + rows64[:, None] * stride_kn + slots[None, :], best, mask=row_mask)
    if HAS_AUX:
        aux_slots = split * KP_AUX + tl.arange(0, KP_AUX)
        tl.store(aux_keys_ptr + rows64[:, None] * stride_an + aux_slots[None, :], aux_best, mask=row_mask)

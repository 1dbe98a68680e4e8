"""Launchers of :mod:`fusedsae.kernels.sparse`: the sparse decoder (``sparse_decode``) and the sparse backwards
(``sparse_decode_backward``, ``sparse_encode_backward``), built from gathers of table rows (``gather_rows``,
``gather_dot``) and per-latent sums over the entries grouped by latent (``segment_sums``).

Determinism: ``d W_dec``, ``d W_enc`` and ``d b_enc`` sort the active entries by latent and sum fixed chunks of the
entries in token order, with no float atomics, so they are bitwise reproducible.
:func:`~.launch.set_deterministic` (``False``) or ``FUSEDSAE_DETERMINISTIC=0`` switches them to float32 atomics
instead (no sort; results vary in the last bits). ``torch.use_deterministic_algorithms(True)`` always wins.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from fusedsae import reference
from fusedsae.backends import register
from fusedsae.backends.common import first_refusal, latent_rows
from fusedsae.kernels import sparse as kernels

from .launch import checked_grid, deterministic, gpu, on_device, refuse_floats, refuse_indices, row_major

# ---------------------------------------------------------------------------------------------------------------
# gathers and per-latent sums
# ---------------------------------------------------------------------------------------------------------------


def gather_rows(
    values: Tensor, indices: Tensor, table: Tensor, stride_tr: int, stride_td: int, bias: Tensor | None, d: int
) -> Tensor:
    """``out [N, d] = sum_j values[:, j] * table[indices[:, j]] + bias`` for ``values, indices [N, m]``: a
    gather of latent rows of ``table`` (``stride_tr`` elements between latents, ``stride_td`` between features),
    fp32 accumulation, slots in order; the decoder (W_dec) and the encoder's ``dx`` (W_enc's latent rows)."""
    n, m = values.shape
    out = values.new_empty(n, d)
    if n == 0:
        return out
    # 4 tokens x 256 columns: 512-byte contiguous bf16 row segments per gather, 8 elements per thread at 4 warps.
    block_t, block_d, launch = (4, 256, {"num_warps": 4}) if gpu(values) else (16, 16, {})
    kernels._gather_sum_kernel[checked_grid(triton.cdiv(n, block_t), triton.cdiv(d, block_d))](
        values,
        indices,
        table,
        bias,
        out,
        n,
        m,
        d,
        values.stride(0),
        indices.stride(0),
        stride_tr,
        stride_td,
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        **launch,
    )
    return out


def gather_dot(table: Tensor, indices: Tensor, vectors: Tensor) -> Tensor:
    """``out [N, m] = <table[indices[n, j]], vectors[n]>`` for ``indices [N, m]``, ``table [rows, d]`` (unit
    stride along d) and ``vectors [N, d]``: the decoder's ``d values``."""
    n, m = indices.shape
    d = table.shape[1]
    out = vectors.new_empty(n, m)
    if n == 0:
        return out
    # [2 tokens, 16 slots, 128 columns] = 4096 gathered elements per step, 32 per thread at 4 warps.
    block_t, block_j, block_d, launch = (2, 16, 128, {"num_warps": 4}) if gpu(vectors) else (4, 4, 16, {})
    kernels._gather_dot_kernel[checked_grid(triton.cdiv(n, block_t), triton.cdiv(m, block_j))](
        table,
        indices,
        vectors,
        out,
        n,
        m,
        d,
        table.stride(0),
        indices.stride(0),
        vectors.stride(0),
        out.stride(0),
        BLOCK_T=block_t,
        BLOCK_J=block_j,
        BLOCK_D=block_d,
        **launch,
    )
    return out


def segment_sums(
    src: Tensor,
    shift: Tensor | None,
    indices: Tensor,
    weights: Tensor,
    out: Tensor,
    n_out: int,
    out_strides: tuple[int, int],
    sums: Tensor | None,
    segments: tuple[Tensor, Tensor, Tensor] | None,
) -> None:
    """``out[i] = sum over (n, j) with indices[n, j] == i of weights[n, j] * (src[n] - shift)`` for every latent
    ``i < n_out`` (zero rows for unused latents), stored through ``out_strides = (latent, column)``; with ``sums``,
    also ``sums[i] = sum of those weights``. Deterministic (sorted; ``segments`` are
    :func:`fusedsae.reference.latent_segments` of ``indices`` if the caller has them) unless :func:`deterministic`
    is off."""
    d = src.shape[1]
    m = indices.shape[1]
    flat = indices.reshape(-1)
    on_gpu = gpu(src)
    if not deterministic():
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        acc_sums = None if sums is None else torch.zeros(n_out, dtype=torch.float32, device=out.device)
        block_e, block_d = (32, 128) if on_gpu else (16, 16)
        kernels._scatter_add_kernel[checked_grid(triton.cdiv(flat.numel(), block_e), triton.cdiv(d, block_d))](
            src,
            shift,
            flat,
            weights.reshape(-1),
            acc,
            acc_sums,
            flat.numel(),
            d,
            m,
            src.stride(0),
            out_strides[0],
            out_strides[1],
            HAS_SHIFT=shift is not None,
            WRITE_SUMS=sums is not None,
            BLOCK_E=block_e,
            BLOCK_D=block_d,
        )
        out.copy_(acc)
        if sums is not None:
            sums.copy_(acc_sums)
        return
    # Group entries by latent (one stable int32 sort per step, shared with the other backward when the caller
    # passes it), then sum fixed chunks of the sorted list and combine the pieces of latents that cross chunks.
    order, keys, offsets = segments if segments is not None else reference.latent_segments(indices, n_out)
    n_entries = flat.numel()
    # 64 entries x 64 columns per program: a [64, 64] float32 tile gathered at once, then a segmented scan (offline
    # sm_90 build at 64 x 128: 252-255 registers, 120 B spilled with the weight sums; at 64 x 64 half the tile).
    # About 16 entries per latent at 16384 x 32 / 32768, so a chunk holds a few latents; a latent firing on all
    # 16384 tokens is 256 chunks of parallel work plus a 256-step combine, instead of a 16384-step walk.
    chunk, block_d, launch = (64, 64, {"num_warps": 4}) if on_gpu else (16, 16, {})
    n_chunks = triton.cdiv(n_entries, chunk)
    part = torch.empty(n_chunks, 2, d, dtype=torch.float32, device=out.device)
    part_sums = None if sums is None else torch.empty(n_chunks, 2, dtype=torch.float32, device=out.device)
    col_blocks = triton.cdiv(d, block_d)
    kernels._segment_chunk_kernel[checked_grid(n_chunks, col_blocks)](
        src,
        shift,
        order,
        keys,
        weights.reshape(-1),
        offsets,
        out,
        sums,
        part,
        part_sums,
        n_entries,
        d,
        m,
        src.stride(0),
        out_strides[0],
        out_strides[1],
        HAS_SHIFT=shift is not None,
        WRITE_SUMS=sums is not None,
        CHUNK=chunk,
        BLOCK_D=block_d,
        **launch,
    )
    block_l = 16
    kernels._segment_combine_kernel[checked_grid(triton.cdiv(n_out, block_l), col_blocks)](
        offsets,
        part,
        part_sums,
        out,
        sums,
        n_out,
        d,
        out_strides[0],
        out_strides[1],
        WRITE_SUMS=sums is not None,
        CHUNK=chunk,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        **launch,
    )


def matvec(W: Tensor, v: Tensor, scale: float) -> Tensor:
    """``scale * W @ v`` for ``W [r, c]`` and ``v [c]`` (fp32 accumulation): the encoder's ``db_dec``."""
    r, c = W.shape
    out = v.new_empty(r)
    block_r, block_c = (32, 256) if gpu(v) else (16, 32)
    kernels._matvec_kernel[checked_grid(triton.cdiv(r, block_r))](
        W, v, out, r, c, W.stride(0), W.stride(1), scale, BLOCK_R=block_r, BLOCK_C=block_c
    )
    return out


def _refuse_sparse(values: Tensor, indices: Tensor, *floats: Tensor | None) -> str | None:
    return first_refusal(refuse_floats(values, *floats), refuse_indices(indices))


# ---------------------------------------------------------------------------------------------------------------
# sparse_decode
# ---------------------------------------------------------------------------------------------------------------


def supports_sparse_decode(values, indices, W_dec, b_dec) -> str | None:
    return _refuse_sparse(values, indices, W_dec, b_dec)


@register("triton", "sparse_decode", supports=supports_sparse_decode)
@on_device
def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``x_hat [N, d_in] = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` (fp32 accumulation, slots in
    order)."""
    W_dec = row_major(W_dec)
    bias = None if b_dec is None else b_dec.contiguous()
    return gather_rows(values.contiguous(), indices.contiguous(), W_dec, W_dec.stride(0), 1, bias, W_dec.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# sparse_decode_backward
# ---------------------------------------------------------------------------------------------------------------


def supports_sparse_decode_backward(grad_out, values, indices, W_dec, *_segments) -> str | None:
    return _refuse_sparse(values, indices, grad_out, W_dec)


@register("triton", "sparse_decode_backward", supports=supports_sparse_decode_backward)
@on_device
def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    order: Tensor | None = None,
    keys: Tensor | None = None,
    offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(d_values [N, m], dW_dec [d_sae, d_in])``: a gather-dot at the active rows, and per-latent sums of
    ``value * grad_out[token]`` (deterministic unless :func:`set_deterministic` is off)."""
    grad_out, values, indices, W_dec = row_major(grad_out), values.contiguous(), indices.contiguous(), row_major(W_dec)
    d_values = gather_dot(W_dec, indices, grad_out)
    dW_dec = torch.empty(W_dec.shape, dtype=grad_out.dtype, device=grad_out.device)
    if values.numel() == 0:
        dW_dec.zero_()
    else:
        segments = None if order is None else (order, keys, offsets)
        segment_sums(grad_out, None, indices, values, dW_dec, W_dec.shape[0], (dW_dec.stride(0), 1), None, segments)
    return d_values, dW_dec


# ---------------------------------------------------------------------------------------------------------------
# sparse_encode_backward
# ---------------------------------------------------------------------------------------------------------------


def supports_sparse_encode_backward(grad, indices, x, W_enc, b_dec, need_dx, *_segments) -> str | None:
    return _refuse_sparse(grad, indices, x, W_enc, b_dec)


@register("triton", "sparse_encode_backward", supports=supports_sparse_encode_backward)
@on_device
def sparse_encode_backward(
    grad: Tensor,
    indices: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor | None,
    need_dx: bool,
    order: Tensor | None = None,
    keys: Tensor | None = None,
    offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx [N, d_in] or [0], dW_enc [d_in, d_sae], db_enc [d_sae], db_dec [d_in] or [0])`` from the gradient at
    the active entries (repeated indices add up). Only the ``N*m`` active entries are touched: ``dW_enc`` is a
    per-latent sum of centred inputs written straight into its transposed layout, ``db_enc`` comes from the same
    pass, ``db_dec = -W_enc @ db_enc`` reduces over the batch first, and ``dx`` gathers latent rows of W_enc."""
    grad, indices, x = grad.contiguous(), indices.contiguous(), row_major(x)
    b_dec = None if b_dec is None else b_dec.contiguous()
    d_in, d_sae = W_enc.shape
    dW_enc = torch.empty(d_in, d_sae, dtype=grad.dtype, device=grad.device)
    db_enc = torch.empty(d_sae, dtype=grad.dtype, device=grad.device)
    if grad.numel() == 0:
        dW_enc.zero_()
        db_enc.zero_()
    else:
        segments = None if order is None else (order, keys, offsets)
        segment_sums(x, b_dec, indices, grad, dW_enc, d_sae, (dW_enc.stride(1), dW_enc.stride(0)), db_enc, segments)
    db_dec = matvec(W_enc, db_enc, -1.0) if b_dec is not None else grad.new_empty(0)
    if need_dx:
        table, stride_tr, stride_td = latent_rows(W_enc, grad.numel())
        dx = gather_rows(grad, indices, table, stride_tr, stride_td, None, d_in)
    else:
        dx = grad.new_empty(0)
    return dx, dW_enc, db_enc, db_dec

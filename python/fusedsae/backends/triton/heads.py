"""Launchers of :mod:`fusedsae.kernels.heads`: per-head partial sums of the pre-activation
(docs/architecture.md#attribution), gathered at selected (token, latent) pairs (``head_partial_sums``) or, for one
feature list at every token, from the encoder's head-aligned K loop (``encode_head_partials``)."""

from __future__ import annotations

import triton
from torch import Tensor

from fusedsae import reference
from fusedsae.backends import register
from fusedsae.backends.common import first_refusal, latent_rows
from fusedsae.kernels import heads as kernels

from .launch import checked_grid, dot_args, gpu, on_device, refuse_floats, refuse_indices, row_major


def supports_head_partial_sums(x, W_enc, b_dec, indices, n_heads) -> str | None:
    # the kernel splits d_in into n_heads equal slices; a remainder would be dropped silently
    heads = (
        None
        if n_heads >= 1 and W_enc.shape[0] % n_heads == 0
        else f"n_heads={n_heads} must divide d_in={W_enc.shape[0]}"
    )
    return first_refusal(refuse_floats(x, W_enc, b_dec), refuse_indices(indices), heads)


@register("triton", "head_partial_sums", supports=supports_head_partial_sums)
@on_device
def head_partial_sums(x: Tensor, W_enc: Tensor, b_dec: Tensor | None, indices: Tensor, n_heads: int) -> Tensor:
    """``[N, m, n_heads]``: per-head partial dot products at the selected latents; see
    :func:`fusedsae.reference.head_partial_sums`."""
    if indices.dim() == 2 and indices.shape[0] > 1 and indices.stride(0) == 0:
        # one feature list broadcast over the tokens (an attribution scan): the encoder's head-aligned K loop
        return _launch_encode_heads(x, W_enc, None, b_dec, indices[0], n_heads)[1]
    x, indices = row_major(x), indices.contiguous()
    b_dec = None if b_dec is None else b_dec.contiguous()
    n, d_in = x.shape
    m = indices.shape[1]
    out = x.new_empty(n, m, n_heads)
    if n == 0 or m == 0:
        return out
    table, stride_tr, stride_td = latent_rows(W_enc, indices.numel())
    block_t, block_j, block_d, launch = (2, 16, 64, {"num_warps": 4}) if gpu(x) else (4, 4, 16, {})
    kernels._head_partial_sums_fwd_kernel[checked_grid(triton.cdiv(n, block_t), triton.cdiv(m, block_j))](
        x,
        b_dec,
        table,
        indices,
        out,
        n,
        m,
        d_in // n_heads,
        n_heads,
        x.stride(0),
        stride_tr,
        stride_td,
        indices.stride(0),
        HAS_B_DEC=b_dec is not None,
        BLOCK_T=block_t,
        BLOCK_J=block_j,
        BLOCK_D=block_d,
        **launch,
    )
    return out


def _launch_encode_heads(
    x: Tensor, W_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor | None, features: Tensor, n_heads: int
) -> tuple[Tensor | None, Tensor]:
    n, d_in = x.shape
    m = features.shape[0]
    parts = x.new_empty(n, m, n_heads)
    pre = x.new_empty(n, m) if b_enc is not None else None
    if n == 0 or m == 0:
        return pre, parts
    xc = row_major(reference.center(x, None if b_dec is None else b_dec.contiguous()))
    # 64 x 64 output tiles, K steps of 32 (d_head is 64 or 128 in practice: whole steps per head), 8 warps (4 spill
    # the gathered W_enc column addresses in the offline sm_90 build)
    block_m, block_f, block_k, launch = (64, 64, 32, {"num_warps": 8, "num_stages": 3}) if gpu(x) else (16, 16, 16, {})
    kernels._encode_heads_fwd_kernel[checked_grid(triton.cdiv(n, block_m), triton.cdiv(m, block_f))](
        xc,
        W_enc,
        b_enc,
        features.contiguous(),
        parts,
        pre,
        n,
        m,
        d_in // n_heads,
        n_heads,
        xc.stride(0),
        W_enc.stride(0),
        W_enc.stride(1),
        WRITE_PRE=pre is not None,
        BLOCK_M=block_m,
        BLOCK_F=block_f,
        BLOCK_K=block_k,
        **dot_args(x),
        **launch,
    )
    return pre, parts


@on_device
def encode_head_partials(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, features: Tensor, n_heads: int
) -> tuple[Tensor, Tensor]:
    """``(pre [N, m], parts [N, m, n_heads])`` for one feature list at every token, from one tensor-core pass of
    the encoder over those columns with head-aligned K steps; see :func:`fusedsae.reference.encode_head_partials`.
    ``head_partial_sums`` takes this route when its indices are one row broadcast over the tokens (stride 0)."""
    refusal = supports_head_partial_sums(x, W_enc, b_dec, features.view(1, -1), n_heads) or refuse_floats(b_enc)
    if refusal is not None:
        raise ValueError(refusal)
    pre, parts = _launch_encode_heads(x, W_enc, b_enc.contiguous(), b_dec, features, n_heads)
    assert pre is not None
    return pre, parts

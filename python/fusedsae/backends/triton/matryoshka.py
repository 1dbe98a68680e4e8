"""Launchers of :mod:`fusedsae.kernels.matryoshka`: the Matryoshka reconstruction and every prefix's squared error
(``matryoshka_decode_loss``, one pass over the active entries, no ``[N, L, d_out]`` prefixes) and its backward
(``matryoshka_decode_loss_backward``: one kernel for ``d values``, ``dy`` and the per-(token, level) suffix vectors,
then the per-latent segment sum of :mod:`.sparse` for ``d W_dec``). Maths: docs/architecture.md#decoder."""

from __future__ import annotations

from typing import Any

import torch
import triton
from torch import Tensor

from fusedsae import reference
from fusedsae.backends import register
from fusedsae.backends.common import first_refusal
from fusedsae.kernels import matryoshka as kernels

from .launch import checked_grid, deterministic, gpu, on_device, refuse_floats, refuse_indices, row_major
from .sparse import segment_sums


def _matryoshka_blocks(t: Tensor) -> tuple[int, int, dict[str, Any]]:
    # 4 tokens x 256 columns, as the sparse decoder: 512-byte contiguous bf16 row segments per gather, 8 elements
    # per thread at 4 warps; the backward holds three such float32 tiles (error, suffix, dy) plus the gathered one.
    return (4, 256, {"num_warps": 4}) if gpu(t) else (8, 16, {})


def supports_matryoshka_decode_loss(values, indices, W_dec, b_dec, y, widths) -> str | None:
    return first_refusal(refuse_floats(values, W_dec, b_dec, y), refuse_indices(indices))


def supports_matryoshka_decode_loss_backward(
    grad_recon, grad_sq, values, indices, W_dec, y, recon, *_rest
) -> str | None:
    return first_refusal(refuse_floats(values, grad_recon, grad_sq, W_dec, y, recon), refuse_indices(indices))


@register("triton", "matryoshka_decode_loss", supports=supports_matryoshka_decode_loss)
@on_device
def matryoshka_decode_loss(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, y: Tensor, widths: list[int]
) -> tuple[Tensor, Tensor]:
    """``(recon [N, d_out], sq_err [N, L])`` from one pass over the active entries; see
    :func:`fusedsae.reference.matryoshka_decode_loss`. Each column block's share of the squared errors is summed
    over the blocks in order (deterministic)."""
    values, indices, W_dec, y = values.contiguous(), indices.contiguous(), row_major(W_dec), row_major(y)
    bias = None if b_dec is None else b_dec.contiguous()
    (n, m), d, levels = indices.shape, W_dec.shape[1], len(widths)
    recon = y.new_empty(n, d)
    block_t, block_d, launch = _matryoshka_blocks(y)
    col_blocks = triton.cdiv(d, block_d)
    sq_part = torch.zeros(col_blocks, n, levels, dtype=torch.float32, device=y.device)
    if n and d:
        runs = reference.level_runs(values, indices, widths)
        kernels._matryoshka_decode_loss_fwd_kernel[checked_grid(triton.cdiv(n, block_t), col_blocks)](
            runs.values,
            runs.indices,
            runs.ends,
            W_dec,
            bias,
            y,
            recon,
            sq_part,
            n,
            m,
            d,
            levels,
            runs.values.stride(0),
            runs.indices.stride(0),
            runs.ends.stride(0),
            W_dec.stride(0),
            y.stride(0),
            recon.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            BLOCK_L=triton.next_power_of_2(levels),
            **launch,
        )
    return recon, sq_part.sum(0).to(y.dtype)


@register("triton", "matryoshka_decode_loss_backward", supports=supports_matryoshka_decode_loss_backward)
@on_device
def matryoshka_decode_loss_backward(
    grad_recon: Tensor | None,
    grad_sq: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    y: Tensor,
    recon: Tensor,
    widths: list[int],
    order: Tensor | None = None,
    keys: Tensor | None = None,
    offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d_values [N, m], dW_dec [d_sae, d_out], db_dec [d_out], dy [N, d_out])``; see
    :func:`fusedsae.reference.matryoshka_decode_loss_backward`. One kernel walks the levels last to first (each
    entry's W_dec row gathered once serves its ``d value`` and the step to the previous prefix) and writes the
    suffix vectors ``S [N, L, d_out]``; ``dW_dec`` is the per-latent segment sum of ``value * S[token, level]``
    (:func:`fusedsae.reference.level_segments` re-addresses the sorted entries to those rows)."""
    values, indices, W_dec, y, recon = (
        values.contiguous(),
        indices.contiguous(),
        row_major(W_dec),
        row_major(y),
        row_major(recon),
    )
    grad_sq = grad_sq.contiguous()
    grad_recon = None if grad_recon is None else row_major(grad_recon)
    (n, m), (d_sae, d), levels = indices.shape, W_dec.shape, len(widths)
    level = reference.matryoshka_levels(indices, widths)
    suffix = y.new_empty(n, levels, d)
    dy = y.new_empty(n, d)
    block_t, block_d, launch = _matryoshka_blocks(y)
    col_blocks = triton.cdiv(d, block_d)
    dv_part = torch.zeros(col_blocks, n, m, dtype=torch.float32, device=y.device)
    runs = reference.level_runs(values, indices, widths)
    if n and d:
        kernels._matryoshka_decode_loss_bwd_kernel[checked_grid(triton.cdiv(n, block_t), col_blocks)](
            runs.values,
            runs.indices,
            runs.ends,
            W_dec,
            recon,
            y,
            grad_recon,
            grad_sq,
            suffix,
            dv_part,
            dy,
            n,
            m,
            d,
            levels,
            runs.values.stride(0),
            runs.indices.stride(0),
            runs.ends.stride(0),
            W_dec.stride(0),
            recon.stride(0),
            y.stride(0),
            0 if grad_recon is None else grad_recon.stride(0),
            grad_sq.stride(0),
            dy.stride(0),
            HAS_GRAD_RECON=grad_recon is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            **launch,
        )
    else:
        suffix.zero_()
        dy.zero_()
    dW_dec = torch.empty(W_dec.shape, dtype=y.dtype, device=y.device)
    table = suffix.view(n * levels, d)
    if values.numel() == 0:
        dW_dec.zero_()
    elif deterministic():
        # The sorted entries re-addressed to an [N * L, m] layout (row n * L + level): the segment sum reads source
        # row S[n, level] and weight values[n, j] for each entry, from the one sort the step already made.
        segments = reference.latent_segments(indices, d_sae) if order is None else (order, keys, offsets)
        by_level = reference.level_segments(reference.Segments(*segments), level, levels)  # type: ignore[arg-type]
        weights = values[:, None, :].expand(n, levels, m)
        segment_sums(table, None, indices, weights, dW_dec, d_sae, (dW_dec.stride(0), 1), None, tuple(by_level))
    else:
        # The atomic sums walk entries in token order: give them the [N * L, m] layout itself, value 0 off-level.
        slots = torch.arange(levels, device=y.device)[None, :, None]
        weights = torch.where(level[:, None, :] == slots, values[:, None, :], 0).reshape(n * levels, m)
        rows = indices[:, None, :].expand(n, levels, m).reshape(n * levels, m)
        segment_sums(table, None, rows, weights, dW_dec, d_sae, (dW_dec.stride(0), 1), None, None)
    db_dec = suffix[:, 0].sum(0, dtype=torch.float32).to(y.dtype)
    # the kernel wrote d values in each row's sorted slot order: back to the caller's slots
    d_values = torch.empty_like(values).scatter_(1, runs.perm, dv_part.sum(0).to(values.dtype))
    return d_values, dW_dec, db_dec, dy

"""Decisions that more than one backend makes: made here once, so the ``triton`` and ``cuda`` backends cannot drift
apart (docs/architecture.md#backends)."""

from __future__ import annotations

from torch import Tensor

# A gather that reads a latent's column of a row-major W_enc in place touches one 32-byte DRAM sector per element
# (the column's elements are d_sae elements apart): the memory system moves 32 bytes for every element used.
SECTOR_BYTES = 32


def latent_rows(W_enc: Tensor, n_gathers: int) -> tuple[Tensor, int, int]:
    """``W_enc [d_in, d_sae]`` as a table of latent rows for ``n_gathers`` gathered (token, latent) pairs:
    ``(table, stride between latents, stride between features)``, strides in elements.

    Either ``W_enc`` itself, read column-wise in place, or a transposed contiguous copy ``[d_sae, d_in]``. The copy
    reads and writes all of ``W_enc`` once (``2 * d_sae * d_in * elt`` bytes) and then every gathered latent is one
    contiguous row (``d_in * elt`` bytes) instead of ``d_in`` scattered sectors (``d_in * 32`` bytes). So it pays
    when ``2 * d_sae * elt < n_gathers * (32 - elt)``: any training batch (16384 tokens x 32 latents = 524,288
    pairs; 32768 latents in bf16 need more than 4,369), never an attribution of a few tokens. A latent-major
    ``W_enc`` (the transposed view of a ``[d_sae, d_in]`` tensor) is already such a table.
    """
    if W_enc.stride(0) == 1:
        return W_enc, W_enc.stride(1), 1
    d_in, d_sae = W_enc.shape
    elt = W_enc.element_size()
    if 2 * d_sae * elt < n_gathers * (SECTOR_BYTES - elt):
        return W_enc.t().contiguous(), d_in, 1
    return W_enc, W_enc.stride(1), W_enc.stride(0)


def first_refusal(*reasons: str | None) -> str | None:
    """The first reason that is not None: a capability check runs its checks in order and reports the first
    failure."""
    return next((r for r in reasons if r is not None), None)

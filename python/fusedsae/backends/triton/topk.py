"""Launchers of :mod:`fusedsae.kernels.topk`: exact top-k selection on int64 (value, index) keys. The op
``row_topk``, and the pieces the encoder's selection shares: keys <-> (values, indices), the candidate buffers'
size, the selection among candidates, and which rows to redo."""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from fusedsae.backends import register
from fusedsae.backends.common import first_refusal
from fusedsae.kernels import topk as kernels

from .launch import axis_chunks, checked_grid, gpu, on_device, refuse_floats, refuse_width, row_chunk, row_major, splits

# Largest next_pow2(k) selected by the fused path. The encoder's bound keeps [64, KP] fp32 bucket maxima next to
# the accumulator and lets about KP * H(KP) * ln(columns / 128) entries per row through (over 2000 at KP = 128:
# the candidate buffer grows with KP); the candidate selection keeps [32, KP] int64 keys (218 registers at 128 in
# the sm_90 build). Beyond it the two-pass path is used.
FUSED_K_MAX = 128

# The key below every real key (kernels/topk.py): padding, and the sign that a row lacks candidates.
KEY_NONE: int = kernels.KEY_NONE.value


def fits_fused(k: int) -> bool:
    """Whether a selection of ``k`` takes the fused path (``next_pow2(k) <= FUSED_K_MAX``)."""
    return triton.next_power_of_2(k) <= FUSED_K_MAX


def decode_keys(keys: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(values [.., k] in dtype, indices [.., k] int64)`` from int64 selection keys (kernels/topk.py)."""
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    values = bits.view(torch.float32).to(dtype)
    indices = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return values, indices


def candidate_capacity(kp: int, columns: int, block_n: int) -> int:
    """Slots per (row, split) candidate buffer: the expected number of appends (first tile whole, then about
    ``KP * H(KP) / c`` per column c, see kernels/topk.py ``update_bucket_max``) with 50% + 64 slots of headroom, in
    whole tiles. 1280 slots (10 KiB) per row and split at k = 32, 16384 columns per split; rows past it (columns
    sorted by value, heavy-tailed rows) are recomputed exactly by the two-pass path."""
    harmonic = sum(1.0 / i for i in range(1, kp + 1))
    expected = block_n + kp * harmonic * math.log(max(1.0, columns / block_n))
    return block_n * triton.cdiv(int(1.5 * expected) + 64, block_n)


def select_candidates(cand: Tensor, count: Tensor, k: int, t: Tensor) -> Tensor:
    """Sorted keys ``[N, next_pow2(k)]``: the best of each row's candidates ``cand [N, splits, cap]`` (``count
    [N, splits]`` valid each); ``KEY_NONE`` where a row has fewer candidates. ``t``: a tensor on the launch
    device."""
    n, n_splits, cap = cand.shape
    kp = triton.next_power_of_2(k)
    block_m, block_n, launch = (32, max(128, kp), {"num_warps": 8}) if gpu(t) else (16, max(16, kp), {})
    keys = torch.empty(n, kp, dtype=torch.int64, device=cand.device)
    kernels._topk_candidates_kernel[checked_grid(triton.cdiv(n, block_m))](
        cand, count, keys, n, n_splits, cap, keys.stride(0), KP=kp, BLOCK_M=block_m, BLOCK_N=block_n, **launch
    )
    return keys


def needs_redo(keys: Tensor, count: Tensor, cap: int, k: int) -> Tensor:
    """``[N]`` bool, on the device: rows whose candidates cannot be trusted (a buffer overflowed, so entries above
    the bound were dropped) or that hold fewer than k candidates (fewer than k entries above -inf)."""
    return (count > cap).any(dim=1) | (keys[:, k - 1] == KEY_NONE)


def row_keys(scores: Tensor, mask: Tensor | None) -> Tensor:
    """int64 keys ``[N, M]`` of every entry of ``scores [N, M]`` (``KEY_NONE`` outside ``mask [M]`` bool)."""
    n, width = scores.shape
    keys = torch.empty(n, width, dtype=torch.int64, device=scores.device)
    block_m, block_n = (16, 128) if gpu(scores) else (16, 32)
    # column blocks on axis x (2**31 - 1 programs: any d_sae below 2**31), row blocks on y in launches of at most
    # 65535 blocks
    for start, stop in axis_chunks(triton.cdiv(n, block_m), axis=1):
        chunk = slice(start * block_m, min(n, stop * block_m))
        kernels._row_keys_kernel[checked_grid(triton.cdiv(width, block_n), stop - start)](
            scores[chunk],
            None if mask is None else mask.view(torch.uint8),
            keys[chunk],
            chunk.stop - chunk.start,
            width,
            scores.stride(0),
            keys.stride(0),
            HAS_MASK=mask is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
        )
    return keys


def _keys_by_torch_topk(scores: Tensor, k: int) -> Tensor:
    """Sorted keys ``[N, k]``: keys of every entry (a Triton kernel) in row chunks, selected by ``torch.topk``."""
    n, width = scores.shape
    keys = torch.empty(n, k, dtype=torch.int64, device=scores.device)
    step = row_chunk(n, width, scores)
    for start in range(0, n, step):
        chunk = slice(start, min(n, start + step))
        keys[chunk] = torch.topk(row_keys(scores[chunk], None), k, dim=1, sorted=True).values
    return keys


# ---------------------------------------------------------------------------------------------------------------
# row_topk
# ---------------------------------------------------------------------------------------------------------------


def supports_row_topk(scores: Tensor, k: int) -> str | None:
    return first_refusal(refuse_floats(scores), refuse_width(scores.shape[1]))


@register("triton", "row_topk", supports=supports_row_topk)
@on_device
def row_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(values [N, k], indices [N, k] int64)``: the k largest of each row, ties by lower index, sorted. When
    ``next_pow2(k) <= FUSED_K_MAX``, the encoder's filter over the scores and a selection among its candidates
    (rows that overflow their buffer, and larger k: keys + ``torch.topk``)."""
    scores = row_major(scores)
    n, width = scores.shape
    if n == 0:
        return scores.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=scores.device)
    if not fits_fused(k):
        return decode_keys(_keys_by_torch_topk(scores, k), scores.dtype)
    kp = triton.next_power_of_2(k)
    # memory-bound: 16 rows x 256 columns of scores per step, 4 warps
    block_m, block_n, launch = (16, max(256, kp), {"num_warps": 4}) if gpu(scores) else (16, max(16, kp), {})
    row_blocks = triton.cdiv(n, block_m)
    n_splits, per_split = splits(row_blocks, triton.cdiv(width, block_n), scores)
    cap = min(candidate_capacity(kp, per_split * block_n, block_n), block_n * per_split)
    cand = torch.empty(n, n_splits, cap, dtype=torch.int64, device=scores.device)
    count = torch.empty(n, n_splits, dtype=torch.int32, device=scores.device)
    kernels._row_topk_fwd_kernel[checked_grid(row_blocks, n_splits)](
        scores,
        cand,
        count,
        n,
        width,
        per_split,
        n_splits,
        cap,
        scores.stride(0),
        KP=kp,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **launch,
    )
    keys = select_candidates(cand, count, k, scores)
    redo = needs_redo(keys, count, cap, k)
    block_m, block_n, launch = (16, max(128, kp), {"num_warps": 8}) if gpu(scores) else (16, max(16, kp), {})
    kernels._row_topk_redo_kernel[checked_grid(triton.cdiv(n, block_m))](
        scores,
        redo,
        keys,
        n,
        width,
        scores.stride(0),
        keys.stride(0),
        KP=kp,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **launch,
    )
    return decode_keys(keys[:, :k], scores.dtype)

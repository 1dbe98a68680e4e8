"""The maths of every fusedsae op in plain PyTorch: the CPU backend, the test oracle and the benchmark baseline.

Conventions (docs/architecture.md#maths): row-major ``x @ W``; ``x [N, d_in]``, ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``. ``b_dec=None`` means the input is not centred
(``apply_b_dec_to_input=False``). Sparse activations are ``values [N, m]`` with ``indices [N, m]`` (int32 or
int64); padded slots hold value 0 and index 0.

These functions take validated inputs (``fusedsae.functional`` checks them) and never materialise an
``[N, k, d_in]`` gather or a dense ``[N, d_sae]`` gradient: the sparse backward passes group the active entries by
latent (a stable sort) and reduce each group with ``embedding_bag``, which is deterministic and touches only the
``N*k`` active entries. TopK runs over row chunks so that the ``[N, d_sae]`` pre-activation is never held whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of pre-activation held at once by the chunked TopK encoder: never the whole [N, d_sae] block, but chunks
# large enough that the GEMM keeps its speed. On 2 CPU threads at N=4096, 768 -> 16384, k=32 (GEMM alone 0.63 s),
# addmm + topk took 0.94 s in 128-row chunks, 0.79-0.82 s in 256/512, 0.74 s in 1024 (64 MiB fp32), 0.71-0.72 s
# whole; on a GPU large chunks keep the GEMM efficient.
_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}


def _rows_per_chunk(n_rows: int, row_elements: int, device: torch.device) -> int:
    budget = _CHUNK_ELEMENTS.get(device.type, 1 << 26)
    return max(1, min(n_rows, budget // max(1, row_elements)))


def transposed(t: Tensor) -> Tensor:
    """``t.t().contiguous()`` for a 2-D ``t``. On the CPU, copied in blocks of 256 rows: one strided copy of a
    large transpose thrashes the cache (16384 x 768 fp32 on 2 threads: 39 ms whole, 9 ms in blocks)."""
    if t.device.type != "cpu":
        return t.t().contiguous()
    out = t.new_empty(t.shape[1], t.shape[0])
    for start in range(0, t.shape[0], 256):
        out[:, start : start + 256].copy_(t[start : start + 256].t())
    return out


def center(x: Tensor, b_dec: Tensor | None) -> Tensor:
    """``x - b_dec`` (or ``x`` when the SAE does not centre its input)."""
    return x if b_dec is None else x - b_dec


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------


def encode_pre(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None) -> Tensor:
    """Pre-activation ``(x - b_dec) @ W_enc + b_enc``: ``[N, d_in] -> [N, d_sae]``."""
    return torch.addmm(b_enc, center(x, b_dec), W_enc)


def encode_dense(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    activation: str,
) -> Tensor:
    """Dense encoder ``[N, d_in] -> [N, d_sae]``: ``activation`` is "none" (the pre-activation), "relu" or
    "jumprelu" (``relu(pre) * (pre > threshold)``, threshold ``[d_sae]``)."""
    pre = encode_pre(x, W_enc, b_enc, b_dec)
    if activation == "none":
        return pre
    if activation == "relu":
        return torch.relu(pre)
    if activation == "jumprelu":
        assert threshold is not None
        return jumprelu(pre, threshold)
    raise ValueError(f"unknown dense activation {activation!r}")


def _order_by_value_then_index(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sorts each row by value (descending), equal values by index (ascending): one deterministic order."""
    indices, perm = torch.sort(indices, dim=1)
    values = values.gather(1, perm)
    values, perm = torch.sort(values, dim=1, descending=True, stable=True)
    return values, indices.gather(1, perm)


# Whether the reference may read a CPU tensor's values on the host (one check of the TopK tie condition). On the
# CPU that read waits for nothing and saves two passes over the scores; on an accelerator it would stall the queue,
# so there the tie fix-up runs on the device. tests/test_sync.py turns it off to count what a GPU would run.
CPU_HOST_READS = True


def row_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row, ties broken by the lower index, sorted by value then index.

    ``scores [N, M] -> (values [N, k], indices [N, k] int64)``. ``torch.topk`` promises no order among ties, so
    entries equal to the k-th value may be the wrong ones. On the CPU this takes k+1 candidates and redoes rows
    whose (k+1)-th value equals their k-th with a stable sort (rare on real data: all-equal rows, quantised
    inputs); elsewhere (no host read) the slots holding the k-th value are refilled on the device with the
    lowest-index entries equal to it.
    """
    width = scores.shape[1]
    if k >= width:
        values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
        return values[:, :k], indices[:, :k]
    if not (CPU_HOST_READS and scores.device.type == "cpu"):
        return _row_topk_on_device(scores, k)
    values, indices = torch.topk(scores, k + 1, dim=1, largest=True, sorted=True)
    tied = values[:, k] == values[:, k - 1]
    values, indices = values[:, :k], indices[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        v, i = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values = values.clone()
        indices = indices.clone()
        values[rows] = v[:, :k]
        indices[rows] = i[:, :k]
    return _order_by_value_then_index(values, indices)


def _row_topk_on_device(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`row_topk` with static shapes and no host read. Every entry above the k-th value ``t`` is in any
    top-k set (the first ``n_gt`` slots of the sorted result); the other slots hold ``t`` and go to the
    lowest-index entries equal to ``t``, found by a second ``topk`` on ``where(s == t, M - column, 0)`` (distinct
    keys among the ties). Three extra passes over the scores."""
    width = scores.shape[1]
    values, indices = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    t = values[:, k - 1 :]
    n_gt = (values > t).sum(1, keepdim=True)
    reversed_cols = torch.arange(width, 0, -1, device=scores.device)
    first_tied = width - torch.topk(torch.where(scores == t, reversed_cols, 0), k, dim=1, sorted=True).values
    slots = torch.arange(k, device=scores.device).expand_as(indices)
    tied_slot = slots >= n_gt
    refill = first_tied.gather(1, (slots - n_gt).clamp_min(0))
    # t is NaN when a row holds NaNs among its top k: nothing equals it, so keep topk's choice in that row
    indices = torch.where(tied_slot & ~torch.isnan(t), refill, indices)
    return _order_by_value_then_index(values, indices)


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    aux_k: int,
    aux_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Encoder with TopK selection, plus the AuxK selection from the same pre-activation.

    Returns ``(values [N, k], indices [N, k], aux_values [N, aux_k], aux_indices [N, aux_k])``: the
    *pre-activation* values at the k largest entries of each row (apply ReLU to get the activations), and at
    the ``aux_k`` largest among latents where ``aux_mask [d_sae]`` is true (the dead ones). ``aux_k=0`` gives
    ``[N, 0]`` tensors. Indices are int64, sorted by value then index.
    """
    return chunked_topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask, row_topk)


def chunked_topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    aux_k: int,
    aux_mask: Tensor | None,
    select: Callable[[Tensor, int], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`topk_encode` with the row selection ``select(scores, k) -> (values, indices)`` given: one GEMM per
    row chunk, TopK and AuxK from the same chunk. Backends with their own selection kernel (cuda) pass it, so
    their pre-activations are the reference's bit for bit."""
    n = x.shape[0]
    d_sae = W_enc.shape[1]
    values = x.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    aux_values = x.new_empty(n, aux_k)
    aux_indices = torch.empty(n, aux_k, dtype=torch.int64, device=x.device)
    x_c = center(x, b_dec)
    step = _rows_per_chunk(n, d_sae, x.device)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        pre = torch.addmm(b_enc, x_c[rows], W_enc)
        values[rows], indices[rows] = select(pre, k)
        if aux_k:
            assert aux_mask is not None
            # AuxK among the dead latents only (overwrites this chunk's pre-activation, no longer needed)
            aux_values[rows], aux_indices[rows] = select(pre.masked_fill_(~aux_mask, float("-inf")), aux_k)
    return values, indices, aux_values, aux_indices


def batchtopk_select(pre: Tensor, k: int) -> Tensor:
    """BatchTopK's active set: the ``k*N`` largest entries of ``relu(pre)`` over the whole batch, ties broken by
    the lower flat (row-major) index; zeros never count as active. ``pre [N, M] -> bool [N, M]``."""
    return batch_active(pre, k * pre.shape[0])


def batch_active(scores: Tensor, budget: int) -> Tensor:
    """The ``budget`` largest positive entries of ``scores [N, M]`` over the whole tensor, ties broken by the lower
    flat (row-major) index: ``bool [N, M]``. The triton backend runs it on its per-row candidates, which are in
    flat-index order among equal values. No host read: the entries equal to the cut-off are ranked by a running
    count in flat order, and a cut-off at or below 0 leaves just the positive entries."""
    flat = scores.reshape(-1)
    if budget >= flat.numel():
        return scores > 0
    cutoff = torch.topk(flat, budget, sorted=False).values.min()
    above = flat > cutoff
    missing = budget - above.sum()
    tied = flat == cutoff
    active = (above | (tied & (torch.cumsum(tied, 0) <= missing))) & (flat > 0)
    return active.view(scores.shape)


def pack_rows(pre: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """Padded sparse form of ``pre`` at ``active``: each row's active entries in latent order, then padding
    (value 0, index 0). Width = the largest row count (at least 1): the one host read of a BatchTopK encode."""
    n, m = pre.shape
    counts = active.sum(1)
    width = max(1, int(counts.max())) if n else 1
    # each active entry's slot is its rank in its row; inactive entries all go to a dropped column `width`
    slots = torch.where(active, torch.cumsum(active, 1) - 1, width)
    values = pre.new_zeros(n, width + 1).scatter_(1, slots, torch.where(active, pre, torch.zeros_like(pre)))
    columns = torch.arange(m, device=pre.device).expand(n, m)
    indices = torch.zeros(n, width + 1, dtype=torch.int64, device=pre.device).scatter_(1, slots, columns)
    return values[:, :width], indices[:, :width]


def batchtopk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    aux_k: int,
    aux_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Encoder with BatchTopK selection (Bussmann et al. 2024), plus AuxK as in :func:`topk_encode`.

    Returns ``(values [N, m], indices [N, m], aux_values [N, aux_k], aux_indices [N, aux_k])`` where ``m`` is the
    largest number of active latents in a row: the pre-activation values (all > 0) at the active entries in
    latent order, padded with value 0 and index 0.
    """
    pre = encode_pre(x, W_enc, b_enc, b_dec)
    values, indices = pack_rows(pre, batchtopk_select(pre, k))
    if aux_k:
        assert aux_mask is not None
        aux_values, aux_indices = row_topk(pre.masked_fill_(~aux_mask, float("-inf")), aux_k)
    else:
        aux_values = x.new_empty(x.shape[0], 0)
        aux_indices = torch.empty(x.shape[0], 0, dtype=torch.int64, device=x.device)
    return values, indices, aux_values, aux_indices


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
    """Gradients of a sparse encoder, given ``grad [N, m]``, the gradient of the loss w.r.t. the pre-activation
    at the active entries ``indices [N, m]`` (repeated indices add up). ``order, keys, offsets``: the
    :func:`latent_segments` of ``indices`` if already computed.

    Returns ``(dx [N, d_in] or [0], dW_enc [d_in, d_sae], db_enc [d_sae], db_dec [d_in] or [0])``. ``dW_enc`` is
    non-zero only at active columns; ``db_dec = -W_enc @ db_enc`` reduces over the batch before the mat-vec.
    """
    d_sae = W_enc.shape[1]
    x_c = center(x, b_dec)
    segments = None if order is None else Segments(order, keys, offsets)  # type: ignore[arg-type]
    dW_enc = transposed(scatter_rows(x_c, indices, grad, d_sae, segments))
    db_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
    db_enc.index_add_(0, indices.reshape(-1).long(), grad.reshape(-1))
    db_dec = -(W_enc @ db_enc) if b_dec is not None else grad.new_empty(0)
    if need_dx:
        dx = F.embedding_bag(indices, transposed(W_enc), per_sample_weights=grad, mode="sum")
    else:
        dx = grad.new_empty(0)
    return dx, dW_enc, db_enc, db_dec


# ---------------------------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------------------------


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec``: ``[N, m] -> [N, d_in]``."""
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    return out if b_dec is None else out + b_dec


def matryoshka_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, widths: list[int]
) -> Tensor:
    """Every Matryoshka prefix reconstruction in one pass over the active latents.

    ``out[n, l] = sum over j with indices[n, j] < widths[l] of values[n, j] * W_dec[indices[n, j]] + b_dec``:
    ``([N, m], [N, m], [d_sae, d_in], [d_in] or None, L increasing widths) -> [N, L, d_in]``.

    Each row's entries are put in latent order, so the entries of level l (``widths[l-1] <= index < widths[l]``)
    form one contiguous bag; a single ``embedding_bag`` gathers every active row of ``W_dec`` once into the
    per-level partial sums ``[N·L, d_in]``, and a cumulative sum over levels gives the prefixes. No dense
    ``[N, d_sae]`` tensor and no second decode: the cost is one sparse decode plus ``N·L·d_in`` additions.
    Differentiable (autograd of ``embedding_bag`` and ``cumsum``); padding entries (value 0) add nothing.
    """
    n = indices.shape[0]
    levels = len(widths)
    order = indices.argsort(dim=1, stable=True)
    sorted_idx = indices.gather(1, order)
    sorted_val = values.gather(1, order)
    level = matryoshka_levels(sorted_idx, widths)
    bag = (torch.arange(n, device=indices.device)[:, None] * levels + level).reshape(-1)
    # bag ids are non-decreasing along the flattened rows; empty bags get an offset equal to the next one's
    offsets = torch.searchsorted(bag, torch.arange(n * levels, device=indices.device))
    partial = F.embedding_bag(
        sorted_idx.reshape(-1), W_dec, offsets, per_sample_weights=sorted_val.reshape(-1), mode="sum"
    )
    out = partial.view(n, levels, -1).cumsum(1)
    return out if b_dec is None else out + b_dec


def matryoshka_levels(indices: Tensor, widths: list[int]) -> Tensor:
    """The Matryoshka level of every entry: ``level[n, j] = l`` for ``widths[l-1] <= indices[n, j] < widths[l]``
    (``[N, m]`` int32; entries are below ``widths[-1] = d_sae``). Compared with Python ints, so no host-to-device
    copy of the widths (a hidden sync on CUDA)."""
    level = torch.zeros(indices.shape, dtype=torch.int32, device=indices.device)
    for width in widths[:-1]:
        level += indices >= width
    return level


class LevelRuns(NamedTuple):
    """A code with each row in latent order, so that each Matryoshka level's entries are one run of slots
    (:func:`level_runs`). ``values``/``indices [N, m]`` sorted; ``perm [N, m]`` int64: the original slot of each
    sorted one; ``ends [N, L]`` int32: level l holds sorted slots ``[ends[:, l-1], ends[:, l])`` (from 0; the last
    end is m)."""

    values: Tensor
    indices: Tensor
    perm: Tensor
    ends: Tensor


def level_runs(values: Tensor, indices: Tensor, widths: list[int]) -> LevelRuns:
    """:class:`LevelRuns` of a code: one stable sort of each row by latent (cheap next to any gather: ``[N, m]``) and
    the run ends as counts of entries below each width (compared with Python ints: no host-to-device copy). The
    kernels then visit each level's slots only, instead of every slot once per level."""
    indices, perm = torch.sort(indices, dim=1, stable=True)
    ends = torch.full((indices.shape[0], len(widths)), indices.shape[1], dtype=torch.int32, device=indices.device)
    for level, width in enumerate(widths[:-1]):
        ends[:, level] = (indices < width).sum(1)
    return LevelRuns(values.gather(1, perm), indices, perm, ends)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16- and 32-bit inputs, float64 for float64: what the Matryoshka sums accumulate in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LevelBags(NamedTuple):
    """The entries of an ``[N, m]`` code grouped level-major (:func:`level_bags`): ``indices``/``values [N*m]``
    sorted so that bag ``l * N + n`` (token n's level-l entries, slots in order) is
    ``[offsets[l*N + n], offsets[l*N + n + 1])``; ``bounds``: the ``L + 1`` level boundaries as Python ints, or None
    where the host may not read them (see :func:`level_bags`)."""

    indices: Tensor
    values: Tensor
    offsets: Tensor
    bounds: list[int] | None


def level_bags(values: Tensor, indices: Tensor, level: Tensor, levels: int) -> LevelBags:
    """:class:`LevelBags` of a code whose entries have levels ``level [N, m]``: one stable sort, after which each
    level's bags are one contiguous run and every entry is gathered once over all levels. On the CPU the ``L + 1``
    level boundaries are read to the host (``embedding_bag`` wants each run's offsets from 0), so each level is
    summed on its own; elsewhere (:data:`CPU_HOST_READS`) that read would synchronise, so ``bounds`` is None and
    :func:`level_partials` sums every level's bags at once."""
    n = indices.shape[0]
    key = (level.long() * n + torch.arange(n, device=indices.device)[:, None]).reshape(-1)
    key, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(key, torch.arange(levels * n + 1, device=indices.device))
    bounds = None
    if CPU_HOST_READS and indices.device.type == "cpu":
        bounds = offsets[:: max(1, n)].tolist() if n else [0] * (levels + 1)
    return LevelBags(indices.reshape(-1)[order], values.reshape(-1)[order], offsets, bounds)


def level_partials(W_dec: Tensor, bags: LevelBags, n: int, levels: int) -> Callable[[int], Tensor]:
    """``partial(l) -> [N, d_out]`` in :func:`accumulation_dtype`: each token's sum of its level-l entries. With the
    level boundaries on the host, one ``embedding_bag`` per level when asked (one ``[N, d_out]`` at a time);
    without them, one ``embedding_bag`` over all ``L * N`` bags up front (``[L, N, d_out]``: the memory of the
    prefixes, but no synchronisation)."""
    acc_dtype = accumulation_dtype(W_dec.dtype)
    if bags.bounds is None:
        every = F.embedding_bag(
            bags.indices, W_dec, bags.offsets[:-1], per_sample_weights=bags.values, mode="sum"
        ).view(levels, n, -1)
        return lambda level: every[level].to(acc_dtype)
    return lambda level: _level_partial(W_dec, bags, n, level)


def _level_partial(W_dec: Tensor, bags: LevelBags, n: int, level: int) -> Tensor:
    """``[N, d_out]`` in :func:`accumulation_dtype`: each token's sum of its level-``level`` entries (one
    ``embedding_bag`` over that level's run of :func:`level_bags`; rounded to W_dec's dtype once per level)."""
    assert bags.bounds is not None
    lo, hi = bags.bounds[level], bags.bounds[level + 1]
    part = F.embedding_bag(
        bags.indices[lo:hi],
        W_dec,
        bags.offsets[level * n : (level + 1) * n + 1] - lo,
        per_sample_weights=bags.values[lo:hi],
        mode="sum",
        include_last_offset=True,
    )
    return part.to(accumulation_dtype(W_dec.dtype))


def matryoshka_decode_loss(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, y: Tensor, widths: list[int]
) -> tuple[Tensor, Tensor]:
    """The full reconstruction and the squared error of every Matryoshka prefix, without the prefixes.

    ``(values [N, m], indices [N, m], W_dec [d_sae, d_out], b_dec [d_out] or None, y [N, d_out], L widths) ->
    (recon [N, d_out], sq_err [N, L])``: ``recon = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` and
    ``sq_err[n, l] = ||P_l[n] + b_dec - y[n]||^2`` where ``P_l`` sums the entries with index below ``widths[l]``
    (the last level is the whole code, so ``sq_err[:, -1]`` is the ordinary per-token squared error).

    Levels are visited in order with one ``[N, d_out]`` float32 running sum: level l's entries (one
    ``embedding_bag`` over the level-major bags, every entry gathered once) are added and the error of prefix l
    is taken, so on the CPU no ``[N, L, d_out]`` tensor exists (elsewhere :func:`level_partials` trades that for
    not synchronising). Sums are float32 (float64 for float64 inputs) and rounded once to the inputs' dtype.
    Padding entries (value 0) add nothing. Gradients: :func:`matryoshka_decode_loss_backward`.
    """
    n, levels = indices.shape[0], len(widths)
    partial = level_partials(W_dec, level_bags(values, indices, matryoshka_levels(indices, widths), levels), n, levels)
    acc_dtype = accumulation_dtype(y.dtype)
    target = y.to(acc_dtype) if b_dec is None else y.to(acc_dtype) - b_dec.to(acc_dtype)
    acc = torch.zeros(y.shape, dtype=acc_dtype, device=y.device)
    sq_err = torch.empty(n, levels, dtype=acc_dtype, device=y.device)
    for level in range(levels):
        acc += partial(level)
        err = acc - target
        sq_err[:, level] = err.mul_(err).sum(-1)  # squared in place: one temporary per level
    recon = acc if b_dec is None else acc + b_dec.to(acc_dtype)
    return recon.to(y.dtype), sq_err.to(y.dtype)


def level_segments(segments: Segments, level: Tensor, levels: int) -> Segments:
    """:class:`Segments` of an ``[N, m]`` index array re-addressed for per-(token, level) source rows: entry
    ``(n, j)`` of level ``l = level[n, j]`` becomes flat position ``(n * levels + l) * m + j`` of an
    ``[N * levels, m]`` layout, so a per-latent sum (:func:`scatter_rows`, the triton and cuda segment sums) reads
    source row ``n * levels + l`` of an ``[N * levels, d]`` table and weight ``(n * levels + l, j)`` of a
    ``[N * levels, m]`` weight array. Keys and offsets are unchanged: the same sort serves both."""
    m = level.shape[1]
    order = segments.order
    token, slot = torch.div(order, m, rounding_mode="floor"), order % m
    rows = token * levels + level.reshape(-1)[order]
    return Segments(rows * m + slot, segments.keys, segments.offsets)


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
    """Gradients of :func:`matryoshka_decode_loss` given ``grad_recon [N, d_out]`` (or None) and
    ``grad_sq [N, L]``: ``(d_values [N, m], dW_dec [d_sae, d_out], db_dec [d_out], dy [N, d_out])``; ``order,
    keys, offsets``: the :func:`latent_segments` of ``indices`` if already computed.

    With prefix errors ``e_l = P_l + b_dec - y`` and ``G_l = 2 grad_sq[:, l] e_l`` (plus ``grad_recon`` at the
    last level), an entry of level l feeds prefixes l..L-1, so its gradient vector is the suffix sum
    ``S_l = sum_{l' >= l} G_l'``: ``d value = S_l · W_dec[i]``, ``dW_dec[i] = sum of value * S_l`` over the uses
    of latent i (the per-latent segment sum, with source row ``(token, level)``), ``db_dec = sum_n S_0`` and
    ``dy = -sum_l 2 grad_sq[:, l] e_l``. The levels run last to first from ``e_{L-1} = recon - y``: ``e_{l-1} =
    e_l - D_l`` with ``D_l`` level l's entries, re-gathered once (the forward's cost); ``S`` is kept as
    ``[N, L, d_out]`` in the inputs' dtype for the segment sum.
    """
    n, m = indices.shape
    levels = len(widths)
    level = matryoshka_levels(indices, widths)
    partial = level_partials(W_dec, level_bags(values, indices, level, levels), n, levels)
    acc_dtype = accumulation_dtype(y.dtype)
    e = recon.to(acc_dtype) - y.to(acc_dtype)
    suffix = grad_recon.to(acc_dtype, copy=True) if grad_recon is not None else torch.zeros_like(e)
    dy = torch.zeros_like(e)
    table = torch.empty(n, levels, y.shape[1], dtype=y.dtype, device=y.device)
    g2 = 2 * grad_sq.to(acc_dtype)
    for lev in range(levels - 1, -1, -1):
        suffix.addcmul_(g2[:, lev, None], e)
        dy.addcmul_(g2[:, lev, None], e, value=-1)
        table[:, lev] = suffix
        if lev:
            e -= partial(lev)
    table = table.view(n * levels, -1)
    rows = torch.arange(n, device=indices.device)[:, None] * levels + level
    d_values = gather_dot(W_dec, indices, table, rows)
    segments = latent_segments(indices, W_dec.shape[0]) if order is None else Segments(order, keys, offsets)  # type: ignore[arg-type]
    weights = values[:, None, :].expand(n, levels, m)
    dW_dec = scatter_rows(table, indices, weights, W_dec.shape[0], level_segments(segments, level, levels))
    return d_values, dW_dec, suffix.sum(0).to(y.dtype), dy.to(y.dtype)


def gather_dot(table: Tensor, indices: Tensor, vectors: Tensor, rows: Tensor | None = None) -> Tensor:
    """``out[n, j] = table[indices[n, j]] · vectors[n]``: ``([M, d], [N, m], [N, d]) -> [N, m]``; with ``rows
    [N, m]`` (int), ``vectors[rows[n, j]]`` instead (any number of vector rows).

    This is exactly the gradient of ``embedding_bag``'s per-sample weights, so it runs as that C++ kernel: one dot
    product per active entry, no ``[N, m, d]`` gather in memory (on 2 CPU threads at N=4096, m=32, d=768,
    d=16384 latents: 63 ms against 290 ms for a gather + bmm in 256-row chunks)."""
    n, m = indices.shape
    flat = indices.reshape(-1).long()
    offsets = torch.arange(0, n * m, m, device=indices.device)
    if rows is None:
        bags = torch.div(torch.arange(n * m, device=indices.device), m, rounding_mode="floor")
    else:
        bags = rows.reshape(-1).long()
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(vectors, table, flat, offsets, bags, 0, -1)
    return out.view(n, m)


class Segments(NamedTuple):
    """The active entries of an ``[N, m]`` index array grouped by latent: one stable sort, shared by every per-latent
    sum of a step (the decoder's ``d W_dec`` and the encoder's ``d W_enc``/``d b_enc``).

    ``order [N*m]`` int64: flat entry positions ``n * m + j`` by latent, then by position; ``keys [N*m]`` int32: the
    latent of each (sorted); ``offsets [n_latents + 1]`` int64: latent ``i`` owns ``order[offsets[i]:offsets[i+1]]``.
    """

    order: Tensor
    keys: Tensor
    offsets: Tensor


def latent_segments(indices: Tensor, n_latents: int) -> Segments:
    """:class:`Segments` of ``indices [N, m]`` (values in ``[0, n_latents)``, ``n_latents < 2**31``). int32 keys
    halve the sort's traffic; ``searchsorted`` finds the offsets on the device (``bincount`` would read its range
    back to the host on CUDA)."""
    keys, order = torch.sort(indices.reshape(-1).to(torch.int32), stable=True)
    bounds = torch.arange(n_latents + 1, dtype=torch.int32, device=indices.device)
    return Segments(order, keys, torch.searchsorted(keys, bounds))


def scatter_rows(src: Tensor, indices: Tensor, weights: Tensor, n_out: int, segments: Segments | None = None) -> Tensor:
    """``out[i] = sum over (n, j) with indices[n, j] == i of weights[n, j] * src[n]``: ``[n_out, d]``.

    Deterministic: entries are grouped by ``i`` with a stable sort (``segments``, computed here if not given) and
    each group is summed in token order by ``embedding_bag`` (no float atomics).
    """
    m = indices.shape[1]
    order, _, offsets = segments if segments is not None else latent_segments(indices, n_out)
    tokens = torch.div(order, m, rounding_mode="floor")
    return F.embedding_bag(
        tokens, src, offsets[:-1], per_sample_weights=weights.reshape(-1)[order].to(src.dtype), mode="sum"
    )


def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    order: Tensor | None = None,
    keys: Tensor | None = None,
    offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`sparse_decode` given ``grad_out [N, d_in]``: ``(d_values [N, m], dW_dec [d_sae, d_in])``;
    ``order, keys, offsets`` as for :func:`sparse_encode_backward`.

    ``d_values`` is a gather-dot over the active rows only; ``dW_dec`` sums ``value * grad_out[token]`` per
    latent, deterministically. (``d b_dec = grad_out.sum(0)``.)
    """
    d_values = gather_dot(W_dec, indices, grad_out)
    segments = None if order is None else Segments(order, keys, offsets)  # type: ignore[arg-type]
    dW_dec = scatter_rows(grad_out, indices, values, W_dec.shape[0], segments)
    return d_values, dW_dec


# ---------------------------------------------------------------------------------------------------------------
# JumpReLU (Rajamanoharan et al. 2024): straight-through estimator with a rectangle kernel of width `bandwidth`
# ---------------------------------------------------------------------------------------------------------------


def jumprelu(pre: Tensor, threshold: Tensor) -> Tensor:
    """``relu(pre) * (pre > threshold)`` (SAELens's maths); ``threshold [d_sae]`` broadcasts over rows.

    The ReLU matters only where a threshold is negative: ``pre`` in ``(threshold, 0]`` gives 0, never a negative
    activation (docs/architecture.md#jumprelu)."""
    return torch.relu(pre) * (pre > threshold)


def step(pre: Tensor, threshold: Tensor) -> Tensor:
    """Heaviside ``(pre > threshold)`` as ``pre``'s dtype; its row sum is the L0 the JumpReLU loss penalises."""
    return (pre > threshold).to(pre.dtype)


def rectangle(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """The STE kernel ``K(u) = 1[-1/2 < u < 1/2]`` at ``u = (pre - threshold) / bandwidth``, as pre's dtype
    (computed at the input precision, so every backend selects the same entries)."""
    u = (pre - threshold) / bandwidth
    return ((u > -0.5) & (u < 0.5)).to(pre.dtype)


def jumprelu_backward(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """``(d_pre, d_threshold)`` of :func:`jumprelu`: ``d_pre = grad * (pre > threshold) * (pre > 0)``; the
    threshold gets the STE pseudo-gradient ``-(relu(threshold) / bandwidth) * K((pre - threshold) / bandwidth) *
    grad`` summed over rows. ``relu(threshold)`` is the height of the jump at ``pre = threshold``: SAELens's
    ``threshold / bandwidth`` for the positive thresholds it trains (``exp(log_threshold)``), and 0 for a negative
    one, where the ReLU already hides the jump and moving the threshold changes nothing."""
    d_pre = grad * ((pre > threshold) & (pre > 0))
    kernel = rectangle(pre, threshold, bandwidth)
    d_threshold = (-(threshold.clamp_min(0) / bandwidth) * kernel * grad).sum(0)
    return d_pre, d_threshold


def step_backward(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``d_threshold`` of :func:`step` (``d_pre`` is 0): ``-(1 / bandwidth) * K(...) * grad`` summed over rows."""
    return (-(1.0 / bandwidth) * rectangle(pre, threshold, bandwidth) * grad).sum(0)


# ---------------------------------------------------------------------------------------------------------------
# Per-head attribution (docs/architecture.md#attribution)
# ---------------------------------------------------------------------------------------------------------------


def encode_head_partials(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, features: Tensor, n_heads: int
) -> tuple[Tensor, Tensor]:
    """One feature list at every token: ``(pre [N, m], parts [N, m, n_heads])`` with ``parts[n, j, h] =
    (x[n] - b_dec)_h · W_enc[h, features[j]]`` (what :func:`head_partial_sums` gives for ``indices`` equal to
    ``features`` in every row) and ``pre = sum_h parts + b_enc[features]``, the pre-activation at those features
    when ``b_dec`` is the SAE's centring. One GEMM per head over the requested columns."""
    n, d_in = x.shape
    m = features.shape[0]
    d_head = d_in // n_heads
    x_c = center(x, b_dec)
    W = W_enc[:, features].reshape(n_heads, d_head, m)
    parts = torch.einsum("nhd,hdm->nmh", x_c.reshape(n, n_heads, d_head).float(), W.float())
    pre = parts.sum(-1) + b_enc[features].float()
    return pre.to(x.dtype), parts.to(x.dtype)


def head_partial_sums(x: Tensor, W_enc: Tensor, b_dec: Tensor | None, indices: Tensor, n_heads: int) -> Tensor:
    """Per-head partial dot products at selected latents: ``out[n, j, h] = (x[n] - b_dec)_h · W_enc[h, indices[n, j]]``
    where ``_h`` is head h's ``d_in / n_heads`` columns. ``[N, m, n_heads]``; ``N*m*d_in`` multiply-adds.

    Pass ``b_dec=None`` for the "raw" convention (``z_h · W_enc[h, f]``)."""
    n, m = indices.shape
    d_in = x.shape[1]
    d_head = d_in // n_heads
    x_c = center(x, b_dec)
    W_t = W_enc.t()
    out = x.new_empty(n, m, n_heads)
    step_rows = _rows_per_chunk(n, m * d_in, x.device)
    for start in range(0, n, step_rows):
        rows = slice(start, min(n, start + step_rows))
        cols = W_t[indices[rows]].view(-1, m, n_heads, d_head)
        out[rows] = (cols * x_c[rows].view(-1, 1, n_heads, d_head)).sum(-1)
    return out

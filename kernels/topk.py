"""Exact top-k selection: order-preserving (value, index) keys, the running per-row merge on register tiles, the
epilogue filter of the fused encoder (bucket-maximum bound + candidate compaction) and the candidate selection.

Every selection in fusedsae ranks entries by value (descending) and breaks ties by the lower index, exactly as
``fusedsae.reference.row_topk``. Packing both into one int64 key makes that order a plain integer order:

* high 32 bits: the float32 bit pattern made monotonic as a signed int32 (for negative floats the 31 magnitude bits
  are flipped), after mapping -0.0 to +0.0 because torch ranks the two zeros as equal;
* low 32 bits: ``0xFFFFFFFF - index``, so that among equal values the lower index has the larger key.

Keys are unique within a row (distinct indices), so the k largest keys are one well-defined set in one order, and
``torch.topk`` on keys (used to merge per-split candidates) needs no tie handling. Values are recovered exactly
from the high half. ``KEY_NONE`` (-2**63) is below every real key (the smallest, -NaN at index 0, is
-2**63 + 0xFFFFFFFF) and marks padding columns (and, in the fused filter, latents outside an AuxK mask).
"""

import triton
import triton.language as tl

KEY_NONE = tl.constexpr(-(2**63))


@triton.jit
def sortable_keys(values, cols):
    """int64 keys of ``values`` (float32, any shape) at column indices ``cols`` (broadcastable int32): larger key =
    larger value, or equal value and lower column."""
    v = tl.where(values == 0.0, 0.0, values)
    bits = v.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (4294967295 - cols.to(tl.int64))


@triton.jit
def merge_top(best, keys, KP: tl.constexpr):
    """The KP largest of ``best [BM, KP]`` (sorted descending) and ``keys [BM, BN]`` (BN >= KP), sorted descending.

    ``tl.topk`` reduces the tile to its KP largest (bitonic sort of KP-wide chunks, then max-halving); the running
    set and the reversed tile top form a bitonic sequence whose elementwise max holds the KP largest of both, and
    one bitonic merge (log2 KP compare-exchange steps on [BM, KP]) sorts it again.
    """
    top = tl.topk(keys, KP, dim=1)
    return tl.bitonic_merge(tl.maximum(best, tl.flip(top, 1)), 1, descending=True)


@triton.jit
def append_candidates(keep, keys, row_ptrs, count, CAP):
    """Appends ``keys [BM, BN]`` where ``keep`` to each row's candidate buffer (``row_ptrs [BM]`` point at slot 0)
    after its ``count [BM]`` entries, in column order, and returns the new counts. Slots at or beyond CAP are not
    written, but counted: a count above CAP tells the launcher that the row overflowed.

    The compaction is a prefix sum over the keep mask, about a dozen integer operations per element, instead of
    a sort of the whole tile."""
    keep_i = keep.to(tl.int32)
    slot = count[:, None] + tl.cumsum(keep_i, axis=1) - 1
    tl.store(row_ptrs[:, None] + slot, keys, mask=keep & (slot < CAP))
    return count + tl.sum(keep_i, axis=1)


@triton.jit
def update_bucket_max(bucket_max, values, KP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Running per-row maxima of KP column buckets (bucket = position within the tile // (BLOCK_N / KP)), from
    ``values [BM, BLOCK_N]`` (-inf where invalid) into ``bucket_max [BM, KP]``.

    The smallest of the KP maxima is a lower bound of the row's KP-th largest value seen so far (KP distinct
    entries reach it), hence of its k-th largest for k <= KP: an entry of a later tile that is not strictly above
    it cannot be selected (the KP bucket maxima rank above it, by value or, if equal, by their lower index).
    For iid columns an entry at column c survives with probability about KP * H(KP) / c, so a row appends about
    BLOCK_N + KP * H(KP) * ln(c / BLOCK_N) candidates: about 760 for k = 32 over 16384 columns."""
    grouped = tl.reshape(values, [values.shape[0], KP, BLOCK_N // KP])
    return tl.maximum(bucket_max, tl.max(grouped, axis=2))


@triton.jit
def _topk_candidates_kernel(
    cand_ptr,
    count_ptr,
    keys_ptr,
    N,
    N_SPLITS,
    CAP,
    stride_kn,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The KP largest keys per row among its candidates (``cand [N, N_SPLITS, CAP]`` int64, ``count [N, N_SPLITS]``
    valid entries each, clamped to CAP), sorted, into ``keys[row, :KP]``: a running merge (``merge_top``) over
    the few hundred candidates the filter kept instead of all d_sae columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    best = tl.full([BLOCK_M, KP], KEY_NONE, tl.int64)
    for split in range(0, N_SPLITS):
        count = tl.load(count_ptr + rows64 * N_SPLITS + split, mask=row_mask, other=0)
        count = tl.minimum(count, CAP)
        row_ptrs = cand_ptr + (rows64 * N_SPLITS + split) * CAP
        for c0 in range(0, tl.max(count, axis=0), BLOCK_N):
            slots = c0 + tl.arange(0, BLOCK_N)
            keys = tl.load(row_ptrs[:, None] + slots[None, :], mask=slots[None, :] < count[:, None], other=KEY_NONE)
            best = merge_top(best, keys, KP)
    tl.store(keys_ptr + rows64[:, None] * stride_kn + tl.arange(0, KP)[None, :], best, mask=row_mask[:, None])


@triton.jit
def _row_topk_fwd_kernel(
    scores_ptr,
    cand_ptr,
    count_ptr,
    N,
    M,
    TILES_PER_SPLIT,
    N_SPLITS,
    CAP,
    stride_sn,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The fused encoder's TopK filter over a given ``scores [N, M]`` buffer: per (row block, column split), the
    entries strictly above the row's running bound are appended as keys to ``cand[row, split, :CAP]`` and counted
    in ``count[row, split]``; ``_topk_candidates_kernel`` selects among them. One read of the scores, a few
    integer operations per entry, nothing of the scores' size written.

    Each tile is read in PARTS column parts (quarters, or halves, as long as a part holds KP columns, one per
    bucket at least): the filter's int64 keys, slots and addresses exist for a part at a time. At the DESIGN shapes
    (16 x 256 tiles, 4 warps) that is 94-107 registers instead of 255 (64 B spilled in float32): 4-5 resident
    blocks instead of 2 for a kernel that is bound by reading the scores."""
    PARTS: tl.constexpr = 4 if BLOCK_N // 4 >= KP else (2 if BLOCK_N // 2 >= KP else 1)
    WIDTH: tl.constexpr = BLOCK_N // PARTS
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    row_ptrs = cand_ptr + (rows64 * N_SPLITS + split) * CAP
    bucket_max = tl.full([BLOCK_M, KP], float("-inf"), tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    for t in range(0, TILES_PER_SPLIT):
        for h in tl.static_range(PARTS):
            cols = (split * TILES_PER_SPLIT + t) * BLOCK_N + h * WIDTH + tl.arange(0, WIDTH)
            valid = row_mask[:, None] & (cols < M)[None, :]
            s = tl.load(scores_ptr + rows64[:, None] * stride_sn + cols[None, :], mask=valid, other=0.0)
            s = s.to(tl.float32)
            bound = tl.min(bucket_max, axis=1)
            keys = sortable_keys(s, cols[None, :])
            count = append_candidates(valid & (s > bound[:, None]), keys, row_ptrs, count, CAP)
            bucket_max = update_bucket_max(bucket_max, tl.where(valid, s, float("-inf")), KP, WIDTH)
    tl.store(count_ptr + rows64 * N_SPLITS + split, count, mask=row_mask)


@triton.jit
def _row_keys_kernel(
    scores_ptr,
    mask_ptr,
    keys_ptr,
    N,
    M,
    stride_sn,
    stride_kn,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Keys of every entry of ``scores [N, M]`` (where ``mask [M]`` is 0, the key of -inf at that column, as the
    reference's masked fill ranks it): the two-pass selection for k beyond what the running merge keeps in
    registers, finished by ``torch.topk`` on the keys. Column blocks on grid axis 0 (whose limit, 2**31 - 1, no
    d_sae reaches), row blocks on axis 1."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    col_mask = cols < M
    inside = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    s = tl.load(scores_ptr + rows64[:, None] * stride_sn + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + cols, mask=col_mask, other=0) != 0
        s = tl.where(keep[None, :], s, float("-inf"))
    keys = sortable_keys(s, cols[None, :])
    tl.store(keys_ptr + rows64[:, None] * stride_kn + cols[None, :], keys, mask=inside)


@triton.jit
def _row_topk_redo_kernel(
    scores_ptr,
    redo_ptr,
    keys_ptr,
    N,
    M,
    stride_sn,
    stride_kn,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Exact keys ``keys[row, :KP]`` for the rows of ``scores [N, M]`` whose candidate buffer overflowed or that
    have fewer than k entries above -inf (``redo [N]`` non-zero), by a running merge over all columns. Blocks
    without such a row return at once: the launcher decides nothing on the host."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    redo = row_mask & (tl.load(redo_ptr + rows, mask=row_mask, other=0) != 0)
    if tl.max(redo.to(tl.int32), axis=0) > 0:
        rows64 = rows.to(tl.int64)
        best = tl.full([BLOCK_M, KP], KEY_NONE, tl.int64)
        for c0 in range(0, M, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            valid = redo[:, None] & (cols < M)[None, :]
            s = tl.load(scores_ptr + rows64[:, None] * stride_sn + cols[None, :], mask=valid, other=0.0)
            keys = tl.where(valid, sortable_keys(s.to(tl.float32), cols[None, :]), KEY_NONE)
            best = merge_top(best, keys, KP)
        tl.store(keys_ptr + rows64[:, None] * stride_kn + tl.arange(0, KP)[None, :], best, mask=redo[:, None])

"""Launchers of :mod:`fusedsae.kernels.encoder`: the dense encoder (``encode_dense``) and the encoder with TopK
selection in its epilogue (``topk_encode``, ``batchtopk_encode``), with their tile configurations.

Selection (TopK, BatchTopK, AuxK) is exact and ordered like the reference: ranked on int64 keys that pack (value,
index) (:mod:`fusedsae.kernels.topk`, launched from :mod:`.topk`). When ``next_pow2(k)`` is at most
:data:`~.topk.FUSED_K_MAX` the encoder filters in its GEMM epilogue (entries above a running per-row bound go to a
small candidate buffer) and a second kernel selects among the candidates, so the ``[N, d_sae]`` pre-activation is
never written; rows whose buffer overflows, and larger k, take a two-pass path (the Triton GEMM writes the
pre-activation in row chunks, a Triton kernel turns it into keys, ``torch.topk`` selects). An AuxK ``aux_k`` beyond
the limit is selected from a second GEMM over only the masked (dead) columns.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import triton
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from fusedsae import reference
from fusedsae.backends import register
from fusedsae.backends.common import first_refusal
from fusedsae.kernels import encoder as kernels

from . import topk
from .launch import (
    INTERPRETED,
    checked_grid,
    dot_args,
    gpu,
    on_device,
    refuse_floats,
    refuse_width,
    row_chunk,
    row_major,
    sm_count,
    splits,
)

# ---------------------------------------------------------------------------------------------------------------
# tile configurations of the fused encoder
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Tiles and launch of the fused encoder + TopK kernel on a GPU (the interpreter uses small tiles).

    ``block_k`` is for 16-bit inputs; float32 takes half (the same bytes per pipeline stage). ``tma`` loads x and
    W_enc tiles through tensor descriptors where the layout allows it (Hopper or newer, 16-byte aligned rows),
    else through pointers. ``persistent`` caps the grid at ``programs_per_sm`` programs per SM, each looping over
    (row block, split) work items; otherwise there is one program per item."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = True
    persistent: bool = False
    programs_per_sm: int = 1
    maxnreg: int | None = None
    epilogue_split: int = 1


# Candidates for a GPU check to time side by side (FUSEDSAE_ENCODER_CONFIG=<name> or set_encoder_config(name)).
# The offline sm_90 compile at the DESIGN shapes (benchmarks/results/compile_report.md) decides which can be
# candidates at all; every one feeds wgmma from shared memory in bf16 (m64n128-ptr spills 172 B, and the fused AuxK
# filter spills except on 8 warps at 64 x 128: see the report's "candidates").
CANDIDATE_CONFIGS: dict[str, EncoderConfig] = {
    # the tiles and loads before the Hopper work (only x is centred outside the kernel now): 255 registers, spills
    "m64n128-ptr": EncoderConfig(64, 128, 64, 8, 3, tma=False),
    # 64 x 128 tiles, 4 warps, filter on column quarters: two resident blocks, one's epilogue under the other's MMAs
    "m64n128-w4": EncoderConfig(64, 128, 64, 4, 3, epilogue_split=4),
    # the same tile over 8 warps (one block per SM, fewer registers per thread)
    "m64n128": EncoderConfig(64, 128, 64, 8, 3, epilogue_split=4),
    # wider tiles: more MMA work per byte of x and W_enc loaded
    "m64n256": EncoderConfig(64, 256, 64, 8, 3, epilogue_split=4),
    "m128n128": EncoderConfig(128, 128, 64, 8, 3, epilogue_split=4),
    # persistent grid over the 2-block configuration
    "m64n128-w4-persistent": EncoderConfig(64, 128, 64, 4, 3, epilogue_split=4, persistent=True, programs_per_sm=2),
}
# Chosen by the offline compile (benchmarks/results/compile_report.md): 16-bit inputs with next_pow2(k) <= 64 take
# the two-block configuration (219 registers at k = 32, 237 at k = 64, no spills); wider bounds (the fused AuxK's
# 128 buckets, BatchTopK's 2k candidates at k = 64) and float32 take 8 warps, where 4 warps would spill.
DEFAULT_ENCODER_CONFIG = "m64n128-w4"
WIDE_ENCODER_CONFIG = "m64n128"
_encoder_config_override: str | None = None

# Budget for the x blocks that the programs running at one time reread for every column tile: half of an H100's
# 50 MB L2, the other half for W_enc tiles and the candidate writes.
_L2_X_BUDGET = 24 << 20


def set_encoder_config(name: str | None) -> None:
    """Force one of :data:`CANDIDATE_CONFIGS` for the fused encoder (``None``: ``FUSEDSAE_ENCODER_CONFIG``, else
    :data:`DEFAULT_ENCODER_CONFIG`)."""
    if name is not None and name not in CANDIDATE_CONFIGS:
        raise ValueError(f"unknown encoder config {name!r}; choose one of {', '.join(CANDIDATE_CONFIGS)}")
    global _encoder_config_override
    _encoder_config_override = name


def encoder_config(dtype: torch.dtype = torch.bfloat16, kp: int = 32) -> tuple[str, EncoderConfig]:
    """``(name, config)`` the fused encoder launches with for inputs of ``dtype`` and a bound over ``kp`` buckets:
    :func:`set_encoder_config`, else the ``FUSEDSAE_ENCODER_CONFIG`` environment variable, else
    :data:`DEFAULT_ENCODER_CONFIG` (16-bit inputs, ``kp <= 64``) or :data:`WIDE_ENCODER_CONFIG`."""
    default = DEFAULT_ENCODER_CONFIG if dtype != torch.float32 and kp <= 64 else WIDE_ENCODER_CONFIG
    name = _encoder_config_override or os.environ.get("FUSEDSAE_ENCODER_CONFIG", "").strip() or default
    if name not in CANDIDATE_CONFIGS:
        raise ValueError(
            f"FUSEDSAE_ENCODER_CONFIG={name!r} is not an encoder config; choose one of {', '.join(CANDIDATE_CONFIGS)}"
        )
    return name, CANDIDATE_CONFIGS[name]


def _tma_capable(t: Tensor) -> bool:
    """Tensor descriptors: a GPU of compute capability 9.0 (Hopper) or newer, or the interpreter (which takes the
    same layouts; so does the offline compile for sm_90, which passes CPU tensors)."""
    return t.device.type != "cuda" or INTERPRETED or torch.cuda.get_device_capability(t.device) >= (9, 0)


def _tma_layout(t: Tensor) -> bool:
    """A 2-D tensor TMA can describe: unit inner stride, 16-byte aligned base and row stride."""
    size = t.element_size()
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0


def _encoder_operands(
    xc: Tensor, W_enc: Tensor, block_m: int, block_n: int, block_k: int, tma: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """``(x operand, W_enc operand, constexprs)``: tensor descriptors of ``[block_m, block_k]`` x tiles and
    ``[block_k, block_n]`` W_enc tiles (or ``[block_n, block_k]`` tiles of W_enc^T when W_enc is a transposed
    view, ``W_T``) when ``tma`` and both layouts allow it, else the tensors themselves (pointer loads)."""
    w_t = W_enc.stride(1) != 1 and W_enc.stride(0) == 1
    w_view = W_enc.t() if w_t else W_enc
    if tma and _tma_capable(xc) and _tma_layout(xc) and w_view.dim() == 2 and _tma_layout(w_view):
        x_desc = TensorDescriptor.from_tensor(xc, [block_m, block_k])
        w_desc = TensorDescriptor.from_tensor(w_view, [block_n, block_k] if w_t else [block_k, block_n])
        return x_desc, w_desc, {"USE_TMA": True, "W_T": w_t}
    return xc, W_enc, {"USE_TMA": False, "W_T": False}


def _encoder_refusal(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None) -> str | None:
    return first_refusal(refuse_floats(x, W_enc, b_enc, b_dec), refuse_width(W_enc.shape[1]))


# ---------------------------------------------------------------------------------------------------------------
# encode_dense
# ---------------------------------------------------------------------------------------------------------------

_ACTIVATIONS = {"none": 0, "relu": 1, "jumprelu": 2}


def supports_encode_dense(x, W_enc, b_enc, b_dec, threshold, activation) -> str | None:
    if activation not in _ACTIVATIONS:
        return f"unknown activation {activation!r}"
    return _encoder_refusal(x, W_enc, b_enc, b_dec)


def _launch_encode_dense(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, threshold: Tensor | None, activation: str
) -> Tensor:
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    out = x.new_empty(n, d_sae)
    if n == 0:
        return out
    xc = row_major(reference.center(x, b_dec))
    if gpu(x):
        # 128x128 output tiles, K steps of 64 (bf16/fp16; 32 for fp32), 3 stages, TMA loads where the layout
        # allows; tests/compile_for_gpu.py reports registers and shared memory of the sm_90 build. fp32 without
        # TF32 runs on FMA units like torch's own fp32 GEMM.
        block_m, block_n = 128, 128
        block_k = 32 if x.dtype == torch.float32 else 64
        launch = {"GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    else:
        block_m, block_n, block_k = 16, 32, 16
        launch = {"GROUP_M": 2}
    x_in, w_in, layout = _encoder_operands(xc, W_enc, block_m, block_n, block_k, tma=True)
    grid = checked_grid(triton.cdiv(n, block_m) * triton.cdiv(d_sae, block_n))
    kernels._encode_dense_fwd_kernel[grid](
        x_in,
        w_in,
        b_enc,
        threshold,
        out,
        n,
        d_in,
        d_sae,
        xc.stride(0),
        xc.stride(1),
        W_enc.stride(0),
        W_enc.stride(1),
        out.stride(0),
        ACTIVATION=_ACTIVATIONS[activation],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **layout,
        **dot_args(x),
        **launch,
    )
    return out


@register("triton", "encode_dense", supports=supports_encode_dense)
@on_device
def encode_dense(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, threshold: Tensor | None, activation: str
) -> Tensor:
    """``act((x - b_dec) @ W_enc + b_enc)``: ``[N, d_in] -> [N, d_sae]`` in x's dtype (fp32 accumulation)."""
    if activation == "jumprelu" and threshold is None:
        raise ValueError("activation='jumprelu' needs threshold [d_sae]")
    return _launch_encode_dense(
        x,
        W_enc,
        b_enc.contiguous(),
        None if b_dec is None else b_dec.contiguous(),
        None if threshold is None else threshold.contiguous(),
        activation,
    )


# ---------------------------------------------------------------------------------------------------------------
# topk_encode: fused (GEMM epilogue) or two-pass (dense GEMM in row chunks + keys + torch.topk)
# ---------------------------------------------------------------------------------------------------------------


def _fused_topk_keys(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Sorted keys ``[N, k]`` (and ``[N, aux_k]`` among ``aux_mask``): the fused GEMM + filter kernel, then the
    selection among its candidates; rows that overflowed a candidate buffer go through the two-pass path."""
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    kp = triton.next_power_of_2(k)
    kp_aux = triton.next_power_of_2(aux_k) if aux_k else 1
    xc = row_major(reference.center(x, b_dec))
    config = encoder_config(x.dtype, max(kp, kp_aux))[1]
    if gpu(x):
        # CANDIDATE_CONFIGS[...]: 64 rows is the smallest M for which Hopper's wgmma is used; the epilogue holds
        # the fp32 accumulator, its int64 keys and [BLOCK_M, KP] bucket maxima (see tests/compile_for_gpu.py).
        block_m, block_n = config.block_m, max(config.block_n, kp, kp_aux)
        block_k = config.block_k // 2 if x.dtype == torch.float32 else config.block_k
        launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if config.maxnreg:
            launch["maxnreg"] = config.maxnreg
        resident = sm_count(x) * config.programs_per_sm
    else:
        block_m, block_n, block_k = 16, max(16, kp, kp_aux), 16
        launch = {}
        resident = 2
    # the filter splits at any bound width (kernels/encoder.py keeps wider bounds in slices); the interpreter's
    # tiles split in halves
    split_epilogue = config.epilogue_split if gpu(x) else 2
    row_blocks = triton.cdiv(n, block_m)
    # Enough splits that the row blocks running at one time (resident programs / splits, split-fastest order)
    # keep their x blocks in L2: 3 at 4096 -> 131072 in bf16, 1 at 768.
    x_block = block_m * d_in * x.element_size()
    n_splits, per_split = splits(
        row_blocks, triton.cdiv(d_sae, block_n), x, min_splits=triton.cdiv(resident * x_block, _L2_X_BUDGET)
    )
    columns = per_split * block_n
    cap = min(topk.candidate_capacity(kp, columns, block_n), block_n * per_split)
    cand = torch.empty(n, n_splits, cap, dtype=torch.int64, device=x.device)
    count = torch.empty(n, n_splits, dtype=torch.int32, device=x.device)
    aux_cand = aux_count = None
    cap_aux = 1
    if aux_k:
        assert aux_mask is not None
        # sized like the main buffer, not by the dead count: reading that count would stall the host every step
        cap_aux = min(topk.candidate_capacity(kp_aux, columns, block_n), block_n * per_split)
        aux_cand = torch.empty(n, n_splits, cap_aux, dtype=torch.int64, device=x.device)
        aux_count = torch.empty(n, n_splits, dtype=torch.int32, device=x.device)
    x_in, w_in, layout = _encoder_operands(xc, W_enc, block_m, block_n, block_k, config.tma)
    n_items = row_blocks * n_splits
    grid = checked_grid(min(n_items, resident) if config.persistent else n_items)
    kernels._topk_encode_fwd_kernel[grid](
        x_in,
        w_in,
        b_enc,
        None if aux_cand is None else aux_mask.view(torch.uint8),
        cand,
        count,
        aux_cand,
        aux_count,
        n,
        d_in,
        d_sae,
        per_split,
        n_splits,
        cap,
        cap_aux,
        xc.stride(0),
        xc.stride(1),
        W_enc.stride(0),
        W_enc.stride(1),
        HAS_AUX=aux_cand is not None,
        KP=kp,
        KP_AUX=kp_aux,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EPILOGUE_SPLIT=split_epilogue,
        **layout,
        **dot_args(x),
        **launch,
    )
    keys = topk.select_candidates(cand, count, k, x)
    redo = topk.needs_redo(keys, count, cap, k)
    aux_keys = None
    if aux_cand is not None:
        aux_keys = topk.select_candidates(aux_cand, aux_count, aux_k, x)
        redo |= topk.needs_redo(aux_keys, aux_count, cap_aux, aux_k)
    # Rows to redo are redone by a kernel that reads `redo` itself (blocks without one exit at once): no host read,
    # so the step stays asynchronous and capturable in a CUDA graph.
    if gpu(x):
        block_m, block_n, block_k = 32, 128, 32 if x.dtype == torch.float32 else 64
        launch = {"num_warps": 8, "num_stages": 2}
    kernels._topk_encode_redo_kernel[checked_grid(triton.cdiv(n, block_m))](
        xc,
        W_enc,
        b_enc,
        None if aux_keys is None else aux_mask.view(torch.uint8),
        redo,
        keys,
        aux_keys,
        n,
        d_in,
        d_sae,
        xc.stride(0),
        xc.stride(1),
        W_enc.stride(0),
        W_enc.stride(1),
        keys.stride(0),
        0 if aux_keys is None else aux_keys.stride(0),
        HAS_AUX=aux_keys is not None,
        KP=kp,
        KP_AUX=kp_aux,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **dot_args(x),
        **launch,
    )
    return keys[:, :k], None if aux_keys is None else aux_keys[:, :aux_k]


def _two_pass_topk_keys(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Same result as :func:`_fused_topk_keys` for any k: per row chunk, the Triton GEMM writes the
    pre-activation, a Triton kernel turns it into keys (latents outside ``aux_mask`` keyed as -inf for AuxK), and
    ``torch.topk`` selects on them. ``k=0`` selects only the AuxK keys (``[N, 0]`` main keys)."""
    n = x.shape[0]
    d_sae = W_enc.shape[1]
    keys = torch.empty(n, k, dtype=torch.int64, device=x.device)
    aux_keys = torch.empty(n, aux_k, dtype=torch.int64, device=x.device) if aux_k else None
    step = row_chunk(n, d_sae, x)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        pre = _launch_encode_dense(x[rows], W_enc, b_enc, b_dec, None, "none")
        if k:
            keys[rows] = torch.topk(topk.row_keys(pre, None), k, dim=1, sorted=True).values
        if aux_keys is not None:
            aux_keys[rows] = torch.topk(topk.row_keys(pre, aux_mask), aux_k, dim=1, sorted=True).values
    return keys, aux_keys


def _topk_select(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(values [N, k], indices [N, k], aux_values [N, aux_k], aux_indices [N, aux_k])``, values in x's dtype."""
    n = x.shape[0]
    if not topk.fits_fused(k):
        keys, aux_keys = _two_pass_topk_keys(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask)
    elif aux_k == 0 or topk.fits_fused(aux_k):
        keys, aux_keys = _fused_topk_keys(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask)
    else:
        # A wide AuxK selection takes a second GEMM over all columns (the dead ones are not listed: that needs a
        # host read). Training does not come here: SparseAutoencoder.training_forward selects AuxK over a
        # static-size list of the possibly dead columns (fusedsae.functional.auxk_reconstruction).
        keys, _ = _fused_topk_keys(x, W_enc, b_enc, b_dec, k, 0, None)
        _, aux_keys = _two_pass_topk_keys(x, W_enc, b_enc, b_dec, 0, aux_k, aux_mask)
    values, indices = topk.decode_keys(keys, x.dtype)
    if aux_keys is None:
        return values, indices, x.new_empty(n, 0), torch.empty(n, 0, dtype=torch.int64, device=x.device)
    aux_values, aux_indices = topk.decode_keys(aux_keys, x.dtype)
    return values, indices, aux_values, aux_indices


def supports_topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask) -> str | None:
    return _encoder_refusal(x, W_enc, b_enc, b_dec)


def _contiguous_encoder_args(
    b_enc: Tensor, b_dec: Tensor | None, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    return (
        b_enc.contiguous(),
        None if b_dec is None else b_dec.contiguous(),
        None if aux_mask is None else aux_mask.contiguous(),
    )


@register("triton", "topk_encode", supports=supports_topk_encode)
@on_device
def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused encoder + TopK (+ AuxK among ``aux_mask``): pre-activation values and int64 indices, ``[N, k]`` and
    ``[N, aux_k]``, sorted by value then index; see :func:`fusedsae.reference.topk_encode`."""
    b_enc, b_dec, aux_mask = _contiguous_encoder_args(b_enc, b_dec, aux_mask)
    if x.shape[0] == 0:
        return _empty_selection(x, k, aux_k)
    return _topk_select(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask)


def _empty_selection(x: Tensor, k: int, aux_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty ``[0, k]``/``[0, aux_k]`` results for an empty batch."""
    long = {"dtype": torch.int64, "device": x.device}
    return x.new_empty(0, k), torch.empty(0, k, **long), x.new_empty(0, aux_k), torch.empty(0, aux_k, **long)


# ---------------------------------------------------------------------------------------------------------------
# BatchTopK: per-row candidates from the same selection, then the batch-level cut-off over the candidates only
# ---------------------------------------------------------------------------------------------------------------


# the same inputs and limits as topk_encode
@register("triton", "batchtopk_encode", supports=supports_topk_encode)
@on_device
def batchtopk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchTopK in padded form (see :func:`fusedsae.reference.batchtopk_encode`) without the ``[N, d_sae]``
    pre-activation.

    Each row contributes its ``w`` best candidates (w = 2k to start, ``next_pow2`` within the fused limit); the
    ``k * N``-th largest candidate is a lower bound of the batch cut-off. A row all of whose candidates end up
    active might have more, so only those rows are selected again with 4x the width (to d_sae at most) until
    no row is saturated; then the candidates hold the exact BatchTopK set (every entry left out of a row ranks
    below that row's first inactive candidate, hence below the cut-off). One host read (the output width, and
    whether to refine) per step; each refining round adds two (its rows, the next check)."""
    b_enc, b_dec, aux_mask = _contiguous_encoder_args(b_enc, b_dec, aux_mask)
    n = x.shape[0]
    d_sae = W_enc.shape[1]
    if n == 0:
        v, i, av, ai = _empty_selection(x, 1, aux_k)
        return v, i, av, ai
    width = min(d_sae, 2 * k)
    if topk.fits_fused(width):
        width = min(d_sae, triton.next_power_of_2(width))
    values, indices, aux_values, aux_indices = _topk_select(x, W_enc, b_enc, b_dec, width, aux_k, aux_mask)
    values = values.float()
    while True:
        active = reference.batch_active(values, k * n)
        saturated = active[:, -1] if width < d_sae else torch.zeros_like(active[:, -1])
        counts = active.sum(1)
        # the step's one host read: whether a row needs refining and the output width, packed in one integer
        code = int(2 * counts.max() + saturated.any())
        if not code & 1:
            break
        rows = saturated.nonzero().squeeze(1)
        new_width = min(d_sae, 4 * width)
        pad = new_width - width
        values = torch.cat([values, values.new_full((n, pad), float("-inf"))], dim=1)
        indices = torch.cat([indices, indices.new_zeros(n, pad)], dim=1)
        more_values, more_indices, _, _ = _topk_select(x[rows], W_enc, b_enc, b_dec, new_width, 0, None)
        values[rows] = more_values.float()
        indices[rows] = more_indices
        width = new_width
    m = max(1, code >> 1)
    # each row's active entries are a prefix of its candidates: sort that prefix by latent
    order_key = torch.where(active, indices, torch.full_like(indices, d_sae))
    order_key, perm = torch.sort(order_key[:, :m], dim=1)
    picked = values.gather(1, perm)
    live = order_key < d_sae
    out_values = torch.where(live, picked, torch.zeros_like(picked)).to(x.dtype)
    out_indices = torch.where(live, order_key, torch.zeros_like(order_key))
    return out_values, out_indices, aux_values, aux_indices

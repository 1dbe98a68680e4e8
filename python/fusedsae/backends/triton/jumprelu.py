"""Launchers of :mod:`fusedsae.kernels.jumprelu`: the threshold ops ``jumprelu`` and ``step`` (forward: one pass
over the pre-activation) and their backwards (``d_pre`` and the straight-through ``d_threshold`` column sums)."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from fusedsae.backends import register
from fusedsae.kernels import jumprelu as kernels

from .launch import axis_chunks, checked_grid, gpu, on_device, refuse_floats, row_major, sm_count

# ---------------------------------------------------------------------------------------------------------------
# one launcher each way for the four ops
# ---------------------------------------------------------------------------------------------------------------


def _launch_threshold(pre: Tensor, threshold: Tensor, step: bool) -> Tensor:
    """``jumprelu`` (or, with ``step``, ``step``) of ``pre [N, d_sae]`` at ``threshold [d_sae]``."""
    pre = row_major(pre)
    n, d = pre.shape
    out = torch.empty_like(pre, memory_format=torch.contiguous_format)
    if n == 0:
        return out
    block_r, block_c = (8, 256) if gpu(pre) else (16, 32)
    threshold = threshold.contiguous()
    # column blocks on axis y: launches of at most 65535 column blocks (16.7M latents each at the GPU's 256)
    for start, stop in axis_chunks(triton.cdiv(d, block_c), axis=1):
        cols = slice(start * block_c, min(d, stop * block_c))
        kernels._jumprelu_fwd_kernel[checked_grid(triton.cdiv(n, block_r), stop - start)](
            pre[:, cols],
            threshold[cols],
            out[:, cols],
            n,
            cols.stop - cols.start,
            pre.stride(0),
            out.stride(0),
            STEP=step,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
    return out


def _launch_threshold_backward(
    grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float, step: bool
) -> tuple[Tensor | None, Tensor]:
    """``(d_pre [N, d_sae] or None with step, d_threshold [d_sae])`` of ``jumprelu`` (or ``step``) given ``grad``."""
    grad, pre, threshold = row_major(grad), row_major(pre), threshold.contiguous()
    n, d = pre.shape
    d_pre = None if step else torch.empty(n, d, dtype=pre.dtype, device=pre.device)
    if n == 0:
        return d_pre, torch.zeros_like(threshold)
    on_gpu = gpu(pre)
    block_r, block_c = (16, 128) if on_gpu else (16, 32)
    col_blocks = triton.cdiv(d, block_c)
    # Row groups give the column sums enough programs (about 4 waves over 132 SMs); each group writes one fp32
    # partial row, and the few partial rows are added by torch (a fixed-order reduction).
    target = 4 * sm_count(pre) if on_gpu else 2
    groups = max(1, min(triton.cdiv(n, block_r), triton.cdiv(target, col_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(n, groups), block_r) * block_r
    groups = triton.cdiv(n, rows_per_program)
    partial = torch.empty(groups, d, dtype=torch.float32, device=pre.device)
    kernels._jumprelu_bwd_kernel[checked_grid(col_blocks, groups)](
        grad,
        pre,
        threshold,
        d_pre,
        partial,
        n,
        d,
        rows_per_program,
        grad.stride(0),
        pre.stride(0),
        0 if d_pre is None else d_pre.stride(0),
        float(bandwidth),
        1.0 / float(bandwidth),
        STEP=step,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return d_pre, partial.sum(0).to(pre.dtype)


# ---------------------------------------------------------------------------------------------------------------
# the four threshold ops
# ---------------------------------------------------------------------------------------------------------------


def supports_jumprelu(pre: Tensor, threshold: Tensor) -> str | None:
    return refuse_floats(pre, threshold)


@register("triton", "jumprelu", supports=supports_jumprelu)
@on_device
def jumprelu(pre: Tensor, threshold: Tensor) -> Tensor:
    """``relu(pre) * (pre > threshold)``, threshold ``[d_sae]`` broadcast over rows."""
    return _launch_threshold(pre, threshold, step=False)


# step takes jumprelu's inputs
@register("triton", "step", supports=supports_jumprelu)
@on_device
def step(pre: Tensor, threshold: Tensor) -> Tensor:
    """``(pre > threshold)`` in pre's dtype."""
    return _launch_threshold(pre, threshold, step=True)


def supports_jumprelu_backward(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float) -> str | None:
    return refuse_floats(grad, pre, threshold)


@register("triton", "jumprelu_backward", supports=supports_jumprelu_backward)
@on_device
def jumprelu_backward(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """``(d_pre [N, d_sae], d_threshold [d_sae])``; see :func:`fusedsae.reference.jumprelu_backward`."""
    d_pre, d_threshold = _launch_threshold_backward(grad, pre, threshold, bandwidth, step=False)
    assert d_pre is not None
    return d_pre, d_threshold


# step_backward takes jumprelu_backward's inputs
@register("triton", "step_backward", supports=supports_jumprelu_backward)
@on_device
def step_backward(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``d_threshold [d_sae]``; see :func:`fusedsae.reference.step_backward`."""
    return _launch_threshold_backward(grad, pre, threshold, bandwidth, step=True)[1]

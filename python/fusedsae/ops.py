"""The registered ops ``torch.ops.fusedsae.*``: one ``torch.library.custom_op`` per op, its fake (shape-only)
implementation for meta tensors and ``torch.compile``, and its autograd rule.

Each op's implementation asks the dispatcher (:mod:`fusedsae.backends`) for a backend; backward rules call other
registered ops (``sparse_encode_backward``, ``sparse_decode_backward``, ``jumprelu_backward``…), so a backend that
adds a kernel for one of those speeds up training without touching this file. Inputs are validated by
:mod:`fusedsae.functional`; the ops assume shapes, dtypes and devices agree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedsae import backends, reference

_LIB = "fusedsae"


def _int64(*shape: Any, like: Tensor) -> Tensor:
    return torch.empty(*shape, dtype=torch.int64, device=like.device)


# One sort per step: the decoder's and the encoder's backward both group the same TopK indices by latent. The
# decoder's backward runs first and leaves its segments here; the encoder's finds them if it is handed the same
# index tensor, unchanged (same storage, same version counter; the entry holds a reference, so the storage cannot
# be freed and reused by another tensor while it is cached). One entry: the next step's indices replace it.
_segments_memo: list[Any] = []


def latent_segments(indices: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(order, keys, offsets)`` of :func:`fusedsae.reference.latent_segments`, computed once per index tensor."""
    try:
        if torch.compiler.is_compiling():
            raise RuntimeError("traced")
        key = (indices.data_ptr(), indices._version, indices.shape, indices.stride(), indices.dtype, indices.device)
    except RuntimeError:  # traced or fake tensors have no storage to compare: sort as the graph says
        return tuple(reference.latent_segments(indices, n_latents))  # type: ignore[return-value]
    if _segments_memo and _segments_memo[1] == (key, n_latents):
        return _segments_memo[2]
    segments = tuple(reference.latent_segments(indices, n_latents))
    _segments_memo[:] = [indices, (key, n_latents), segments]
    return segments  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# encode_dense: (x - b_dec) @ W_enc + b_enc, then "none" | "relu" | "jumprelu"
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::encode_dense", mutates_args=())
def encode_dense(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor | None,
    activation: str,
) -> Tensor:
    """Dense encoder ``[N, d_in] -> [N, d_sae]``; see :func:`fusedsae.reference.encode_dense`. The threshold gets
    no gradient here: training JumpReLU goes through activation="none" and :func:`jumprelu`."""
    return backends.call("encode_dense", x, W_enc, b_enc, b_dec, threshold, activation)


@encode_dense.register_fake
def _(x, W_enc, b_enc, b_dec, threshold, activation):
    return x.new_empty(x.shape[0], W_enc.shape[1])


def _encode_dense_setup(ctx, inputs, output):
    x, W_enc, _b_enc, b_dec, _threshold, activation = inputs
    ctx.activation = activation
    ctx.has_b_dec = b_dec is not None
    ctx.save_for_backward(x, W_enc, b_dec, output if activation != "none" else None)


def _encode_dense_backward(ctx, grad):
    x, W_enc, b_dec, out = ctx.saved_tensors
    d_pre = grad if out is None else grad * (out != 0)
    need = ctx.needs_input_grad
    dx = d_pre @ W_enc.t() if need[0] else None
    dW_enc = (x if b_dec is None else x - b_dec).t() @ d_pre if need[1] else None
    db_enc = d_pre.sum(0) if (need[2] or need[3]) else None
    db_dec = -(W_enc @ db_enc) if ctx.has_b_dec and need[3] else None
    return dx, dW_enc, db_enc if need[2] else None, db_dec, None, None


torch.library.register_autograd(f"{_LIB}::encode_dense", _encode_dense_backward, setup_context=_encode_dense_setup)


# ---------------------------------------------------------------------------------------------------------------
# topk_encode / batchtopk_encode: fused encoder + selection (+ AuxK selection from the same pre-activation)
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::topk_encode", mutates_args=())
def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    aux_k: int,
    aux_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(values [N, k], indices [N, k], aux_values [N, aux_k], aux_indices [N, aux_k])``; see
    :func:`fusedsae.reference.topk_encode`. Values are pre-activations (apply ReLU for activations)."""
    return backends.call("topk_encode", x, W_enc, b_enc, b_dec, k, aux_k, aux_mask)


@topk_encode.register_fake
def _(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask):
    n = x.shape[0]
    return x.new_empty(n, k), _int64(n, k, like=x), x.new_empty(n, aux_k), _int64(n, aux_k, like=x)


@torch.library.custom_op(f"{_LIB}::batchtopk_encode", mutates_args=())
def batchtopk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    aux_k: int,
    aux_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(values [N, m], indices [N, m], aux_values [N, aux_k], aux_indices [N, aux_k])`` with a data-dependent
    width ``m``; see :func:`fusedsae.reference.batchtopk_encode`. Padded slots hold value 0 and index 0."""
    return backends.call("batchtopk_encode", x, W_enc, b_enc, b_dec, k, aux_k, aux_mask)


@batchtopk_encode.register_fake
def _(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask):
    n = x.shape[0]
    width = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(n, width), _int64(n, width, like=x), x.new_empty(n, aux_k), _int64(n, aux_k, like=x)


def _selection_setup(ctx, inputs, output):
    x, W_enc, _b_enc, b_dec, _k, _aux_k, _aux_mask = inputs
    values, indices, _aux_values, aux_indices = output
    ctx.has_b_dec = b_dec is not None
    ctx.save_for_backward(x, W_enc, b_dec, values, indices, aux_indices)


def _selection_backward(ctx, grad_values, _gi, grad_aux, _gai, *, padded: bool):
    x, W_enc, b_dec, values, indices, aux_indices = ctx.saved_tensors
    if grad_values is None:
        grad_values = torch.zeros_like(values)
    elif padded:
        # BatchTopK padding slots (value exactly 0; every real entry is > 0) must not train latent 0.
        grad_values = grad_values * (values != 0)
    grad, idx = grad_values, indices
    if aux_indices.shape[1] and grad_aux is not None:
        grad = torch.cat([grad, grad_aux], dim=1)
        idx = torch.cat([idx, aux_indices], dim=1)
    need = ctx.needs_input_grad
    idx = idx.contiguous()
    order, keys, offsets = latent_segments(idx, W_enc.shape[1])
    dx, dW_enc, db_enc, db_dec = torch.ops.fusedsae.sparse_encode_backward(
        grad.contiguous(), idx, x, W_enc, b_dec, need[0], order, keys, offsets
    )
    return (
        dx if need[0] else None,
        dW_enc if need[1] else None,
        db_enc if need[2] else None,
        db_dec if (ctx.has_b_dec and need[3]) else None,
        None,
        None,
        None,
    )


def _topk_backward(ctx, gv, gi, ga, gai):
    return _selection_backward(ctx, gv, gi, ga, gai, padded=False)


def _batchtopk_backward(ctx, gv, gi, ga, gai):
    return _selection_backward(ctx, gv, gi, ga, gai, padded=True)


torch.library.register_autograd(f"{_LIB}::topk_encode", _topk_backward, setup_context=_selection_setup)
torch.library.register_autograd(f"{_LIB}::batchtopk_encode", _batchtopk_backward, setup_context=_selection_setup)


@torch.library.custom_op(f"{_LIB}::sparse_encode_backward", mutates_args=())
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
    the active entries; see :func:`fusedsae.reference.sparse_encode_backward`. ``order, keys, offsets``: the
    entries already grouped by latent (:func:`latent_segments` of ``indices``), or None to sort here."""
    return backends.call("sparse_encode_backward", grad, indices, x, W_enc, b_dec, need_dx, order, keys, offsets)


@sparse_encode_backward.register_fake
def _(grad, indices, x, W_enc, b_dec, need_dx, order=None, keys=None, offsets=None):
    dx = x.new_empty(x.shape) if need_dx else grad.new_empty(0)
    db_dec = grad.new_empty(W_enc.shape[0]) if b_dec is not None else grad.new_empty(0)
    return dx, W_enc.new_empty(W_enc.shape), grad.new_empty(W_enc.shape[1]), db_dec


# ---------------------------------------------------------------------------------------------------------------
# sparse_decode: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::sparse_decode", mutates_args=())
def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``[N, m] -> [N, d_in]``; see :func:`fusedsae.reference.sparse_decode`."""
    return backends.call("sparse_decode", values, indices, W_dec, b_dec)


@sparse_decode.register_fake
def _(values, indices, W_dec, b_dec):
    return values.new_empty(values.shape[0], W_dec.shape[1])


def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec = inputs
    ctx.has_b_dec = b_dec is not None
    ctx.save_for_backward(values, indices, W_dec)


def _sparse_decode_backward(ctx, grad):
    values, indices, W_dec = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_values = dW_dec = None
    if need[0] or need[2]:
        indices = indices.contiguous()
        order, keys, offsets = latent_segments(indices, W_dec.shape[0])
        d_values, dW_dec = torch.ops.fusedsae.sparse_decode_backward(
            grad.contiguous(), values, indices, W_dec, order, keys, offsets
        )
    db_dec = grad.sum(0) if (ctx.has_b_dec and need[3]) else None
    return d_values if need[0] else None, None, dW_dec if need[2] else None, db_dec


torch.library.register_autograd(f"{_LIB}::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup)


@torch.library.custom_op(f"{_LIB}::sparse_decode_backward", mutates_args=())
def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    order: Tensor | None = None,
    keys: Tensor | None = None,
    offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(d_values [N, m], dW_dec [d_sae, d_in])``; see :func:`fusedsae.reference.sparse_decode_backward`.
    ``order, keys, offsets`` as for :func:`sparse_encode_backward`."""
    return backends.call("sparse_decode_backward", grad_out, values, indices, W_dec, order, keys, offsets)


@sparse_decode_backward.register_fake
def _(grad_out, values, indices, W_dec, order=None, keys=None, offsets=None):
    return values.new_empty(values.shape), W_dec.new_empty(W_dec.shape)


# ---------------------------------------------------------------------------------------------------------------
# matryoshka_decode_loss: the full reconstruction and every prefix's squared error, without the prefixes
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::matryoshka_decode_loss", mutates_args=())
def matryoshka_decode_loss(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, y: Tensor, widths: list[int]
) -> tuple[Tensor, Tensor]:
    """``(recon [N, d_out], sq_err [N, L])``; see :func:`fusedsae.reference.matryoshka_decode_loss`."""
    return backends.call("matryoshka_decode_loss", values, indices, W_dec, b_dec, y, widths)


@matryoshka_decode_loss.register_fake
def _(values, indices, W_dec, b_dec, y, widths):
    torch._check(y.shape[0] == values.shape[0], lambda: "y and values must have one row per token")
    torch._check(y.shape[1] == W_dec.shape[1], lambda: "y must have d_out = W_dec.shape[1] columns")
    return y.new_empty(y.shape), y.new_empty(y.shape[0], len(widths))


def _matryoshka_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec, y, widths = inputs
    ctx.widths = list(widths)
    ctx.has_b_dec = b_dec is not None
    ctx.save_for_backward(values, indices, W_dec, y, output[0])


def _matryoshka_backward(ctx, grad_recon, grad_sq):
    values, indices, W_dec, y, recon = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_sq is None:
        grad_sq = recon.new_zeros(recon.shape[0], len(ctx.widths))
    indices = indices.contiguous()
    order, keys, offsets = latent_segments(indices, W_dec.shape[0])
    d_values, dW_dec, db_dec, dy = torch.ops.fusedsae.matryoshka_decode_loss_backward(
        None if grad_recon is None else grad_recon.contiguous(),
        grad_sq.contiguous(),
        values,
        indices,
        W_dec,
        y,
        recon,
        ctx.widths,
        order,
        keys,
        offsets,
    )
    return (
        d_values if need[0] else None,
        None,
        dW_dec if need[2] else None,
        db_dec if (ctx.has_b_dec and need[3]) else None,
        dy if need[4] else None,
        None,
    )


torch.library.register_autograd(
    f"{_LIB}::matryoshka_decode_loss", _matryoshka_backward, setup_context=_matryoshka_setup
)


@torch.library.custom_op(f"{_LIB}::matryoshka_decode_loss_backward", mutates_args=())
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
    """``(d_values [N, m], dW_dec [d_sae, d_out], db_dec [d_out], dy [N, d_out])`` in one pass over the active
    entries; see :func:`fusedsae.reference.matryoshka_decode_loss_backward`. ``order, keys, offsets`` as for
    :func:`sparse_encode_backward`."""
    return backends.call(
        "matryoshka_decode_loss_backward",
        grad_recon,
        grad_sq,
        values,
        indices,
        W_dec,
        y,
        recon,
        widths,
        order,
        keys,
        offsets,
    )


@matryoshka_decode_loss_backward.register_fake
def _(grad_recon, grad_sq, values, indices, W_dec, y, recon, widths, order=None, keys=None, offsets=None):
    return values.new_empty(values.shape), W_dec.new_empty(W_dec.shape), y.new_empty(y.shape[1]), y.new_empty(y.shape)


# ---------------------------------------------------------------------------------------------------------------
# row_topk: deterministic row-wise TopK of a pre-activation buffer (the unfused path)
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::row_topk", mutates_args=())
def row_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``[N, M] -> (values [N, k], indices [N, k] int64)``, ties by lower index; see
    :func:`fusedsae.reference.row_topk`."""
    return backends.call("row_topk", scores, k)


@row_topk.register_fake
def _(scores, k):
    return scores.new_empty(scores.shape[0], k), _int64(scores.shape[0], k, like=scores)


def _row_topk_setup(ctx, inputs, output):
    scores, _k = inputs
    ctx.shape = scores.shape
    ctx.save_for_backward(output[1])


def _row_topk_backward(ctx, grad_values, _gi):
    (indices,) = ctx.saved_tensors
    return grad_values.new_zeros(ctx.shape).scatter_(1, indices, grad_values), None


torch.library.register_autograd(f"{_LIB}::row_topk", _row_topk_backward, setup_context=_row_topk_setup)


# ---------------------------------------------------------------------------------------------------------------
# JumpReLU and its L0 step, with the straight-through threshold gradient
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::jumprelu", mutates_args=())
def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``relu(pre) * (pre > threshold)`` with the STE threshold gradient of kernel width ``bandwidth``."""
    return backends.call("jumprelu", pre, threshold)


@jumprelu.register_fake
def _(pre, threshold, bandwidth):
    return torch.empty_like(pre)


@torch.library.custom_op(f"{_LIB}::step", mutates_args=())
def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Heaviside ``(pre > threshold)``; gradient only to the threshold (STE), as the JumpReLU L0 penalty needs."""
    return backends.call("step", pre, threshold)


@step.register_fake
def _(pre, threshold, bandwidth):
    return torch.empty_like(pre)


def _threshold_setup(ctx, inputs, output):
    pre, threshold, bandwidth = inputs
    ctx.bandwidth = bandwidth
    ctx.save_for_backward(pre, threshold)


def _jumprelu_backward(ctx, grad):
    pre, threshold = ctx.saved_tensors
    d_pre, d_threshold = torch.ops.fusedsae.jumprelu_backward(grad, pre, threshold, ctx.bandwidth)
    return d_pre, d_threshold, None


def _step_backward(ctx, grad):
    pre, threshold = ctx.saved_tensors
    return None, torch.ops.fusedsae.step_backward(grad, pre, threshold, ctx.bandwidth), None


torch.library.register_autograd(f"{_LIB}::jumprelu", _jumprelu_backward, setup_context=_threshold_setup)
torch.library.register_autograd(f"{_LIB}::step", _step_backward, setup_context=_threshold_setup)


@torch.library.custom_op(f"{_LIB}::jumprelu_backward", mutates_args=())
def jumprelu_backward(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """``(d_pre [N, d_sae], d_threshold [d_sae])``; see :func:`fusedsae.reference.jumprelu_backward`."""
    return backends.call("jumprelu_backward", grad, pre, threshold, bandwidth)


@jumprelu_backward.register_fake
def _(grad, pre, threshold, bandwidth):
    return torch.empty_like(pre), torch.empty_like(threshold)


@torch.library.custom_op(f"{_LIB}::step_backward", mutates_args=())
def step_backward(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``d_threshold [d_sae]``; see :func:`fusedsae.reference.step_backward`."""
    return backends.call("step_backward", grad, pre, threshold, bandwidth)


@step_backward.register_fake
def _(grad, pre, threshold, bandwidth):
    return torch.empty_like(threshold)


# ---------------------------------------------------------------------------------------------------------------
# head_partial_sums: per-head contributions at selected (token, latent) pairs
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::head_partial_sums", mutates_args=())
def head_partial_sums(x: Tensor, W_enc: Tensor, b_dec: Tensor | None, indices: Tensor, n_heads: int) -> Tensor:
    """``[N, m, n_heads]``; see :func:`fusedsae.reference.head_partial_sums`."""
    return backends.call("head_partial_sums", x, W_enc, b_dec, indices, n_heads)


@head_partial_sums.register_fake
def _(x, W_enc, b_dec, indices, n_heads):
    return x.new_empty(indices.shape[0], indices.shape[1], n_heads)

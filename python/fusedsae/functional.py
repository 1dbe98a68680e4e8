"""Stateless SAE ops (docs/architecture.md#public-api): validated, any leading dims, dispatched to the fastest usable
backend.

Every function takes ``x [..., d_in]`` with any leading dims (flattened to ``[N, d_in]`` and restored) and the
SAELens weight layout ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``.
``b_dec=None`` skips the input centring (``apply_b_dec_to_input=False``). All tensors must share one device and
one floating dtype; wrong shapes, dtypes, devices or k raise ``ValueError``/``TypeError`` naming the problem.

Sparse results are ``(values, indices)`` pairs: TopK gives ``[..., k]``; variable-count activations a padded
form whose padding has value 0 and index 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fusedsae import ops, reference
from fusedsae.config import check_matryoshka_widths

__all__ = [
    "MatryoshkaLoss",
    "SparseCode",
    "auxk_reconstruction",
    "batchtopk_encode",
    "check_finite",
    "decode",
    "encode",
    "encode_pre",
    "head_partial_sums",
    "jumprelu",
    "jumprelu_encode",
    "matryoshka_decode",
    "matryoshka_decode_loss",
    "relu_encode",
    "row_topk",
    "sparse_decode",
    "step",
    "to_dense",
    "to_sparse",
    "topk_encode",
]


class SparseCode(NamedTuple):
    """Sparse activations. ``values``/``indices``: ``[..., m]``; ``aux_values``/``aux_indices``: the AuxK
    selection among dead latents, ``[..., aux_k]`` (``[..., 0]`` when not asked for)."""

    values: Tensor
    indices: Tensor
    aux_values: Tensor
    aux_indices: Tensor


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------


def _check_tensor(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_same(x: Tensor, others: dict[str, Tensor | None]) -> None:
    for name, t in others.items():
        if t is None:
            continue
        _check_tensor(t, name)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")


def _check_encoder(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None) -> tuple[int, int]:
    _check_tensor(x, "x")
    _check_tensor(W_enc, "W_enc")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [d_in, d_sae], got shape {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(
            f"x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}) but the SAE expects d_in={d_in}"
        )
    if b_enc.shape != (d_sae,):
        raise ValueError(f"b_enc must be [d_sae={d_sae}], got shape {tuple(b_enc.shape)}")
    if b_dec is not None and b_dec.shape != (d_in,):
        raise ValueError(f"b_dec must be [d_in={d_in}], got shape {tuple(b_dec.shape)}")
    _check_same(x, {"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec})
    return d_in, d_sae


def _check_k(k: int, d_sae: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= d_sae:
        raise ValueError(f"{name}={k} is out of range: it must be in [1, d_sae={d_sae}]")


def _check_aux(aux_k: int, aux_mask: Tensor | None, d_sae: int, x: Tensor) -> None:
    if aux_k == 0:
        return
    _check_k(aux_k, d_sae, "aux_k")
    if aux_mask is None:
        raise ValueError("aux_k > 0 needs aux_mask, the [d_sae] bool mask of latents AuxK may use (dead ones)")
    if aux_mask.shape != (d_sae,) or aux_mask.dtype != torch.bool:
        raise ValueError(
            f"aux_mask must be a bool tensor of shape [d_sae={d_sae}], got {aux_mask.dtype} {tuple(aux_mask.shape)}"
        )
    if aux_mask.device != x.device:
        raise ValueError(f"aux_mask is on {aux_mask.device} but x is on {x.device}")
    eligible = int(aux_mask.sum())
    if eligible < aux_k:
        raise ValueError(
            f"aux_k={aux_k} but only {eligible} latents are eligible in aux_mask; "
            "use aux_k = min(aux_k, aux_mask.sum())"
        )


def _check_sparse(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, check_indices: bool = True
) -> None:
    _check_tensor(values, "values")
    _check_tensor(indices, "indices")
    _check_tensor(W_dec, "W_dec")
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have one shape")
    if values.dim() < 1 or values.shape[-1] < 1:
        raise ValueError(f"values must be [..., m] with m >= 1, got shape {tuple(values.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"values must be floating point, got {values.dtype}")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [d_sae, d_in], got shape {tuple(W_dec.shape)}")
    if b_dec is not None and b_dec.shape != (W_dec.shape[1],):
        raise ValueError(f"b_dec must be [d_in={W_dec.shape[1]}], got shape {tuple(b_dec.shape)}")
    _check_same(values, {"W_dec": W_dec, "b_dec": b_dec})
    if indices.device != values.device:
        raise ValueError(f"indices are on {indices.device} but values are on {values.device}")
    if check_indices and indices.numel() and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= W_dec.shape[0]:
            raise ValueError(f"indices must be in [0, d_sae={W_dec.shape[0]}), got values in [{lo}, {hi}]")


def check_finite(t: Tensor, name: str) -> None:
    """Raises ``ValueError`` if ``t`` holds NaN or Inf, naming how many and the first position."""
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or Inf), first at index {first}; "
            "check the activations you feed the SAE"
        )


def _flat(x: Tensor) -> tuple[Tensor, torch.Size]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


# ---------------------------------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------------------------------


def encode_pre(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Pre-activation ``(x - b_dec) @ W_enc + b_enc``: ``[..., d_in] -> [..., d_sae]``."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    x2, lead = _flat(x)
    return ops.encode_dense(x2, W_enc, b_enc, b_dec, None, "none").reshape(*lead, -1)


def relu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """ReLU ("standard") encoder: ``relu(pre)``, ``[..., d_in] -> [..., d_sae]``."""
    _check_encoder(x, W_enc, b_enc, b_dec)
    x2, lead = _flat(x)
    return ops.encode_dense(x2, W_enc, b_enc, b_dec, None, "relu").reshape(*lead, -1)


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float = 0.001) -> Tensor:
    """JumpReLU ``relu(pre) * (pre > threshold)`` on ``[..., d_sae]`` (SAELens's maths, so a negative threshold
    never yields a negative activation); ``threshold [d_sae]`` is trained by the straight-through estimator with a
    rectangle kernel of width ``bandwidth`` (Rajamanoharan et al. 2024; see
    :func:`fusedsae.reference.jumprelu_backward`)."""
    _check_threshold(pre, threshold, bandwidth)
    p2, lead = _flat(pre)
    return ops.jumprelu(p2, threshold, float(bandwidth)).reshape(*lead, -1)


def step(pre: Tensor, threshold: Tensor, bandwidth: float = 0.001) -> Tensor:
    """Heaviside ``(pre > threshold)`` as ``pre.dtype``; gradient (STE) only to ``threshold``. Its row sum is the
    L0 that the JumpReLU loss penalises."""
    _check_threshold(pre, threshold, bandwidth)
    p2, lead = _flat(pre)
    return ops.step(p2, threshold, float(bandwidth)).reshape(*lead, -1)


def _check_threshold(pre: Tensor, threshold: Tensor, bandwidth: float) -> None:
    _check_tensor(pre, "pre")
    _check_tensor(threshold, "threshold")
    if threshold.shape != (pre.shape[-1],):
        raise ValueError(f"threshold must be [d_sae={pre.shape[-1]}], got shape {tuple(threshold.shape)}")
    _check_same(pre, {"threshold": threshold})
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")


def jumprelu_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    threshold: Tensor,
    bandwidth: float = 0.001,
) -> Tensor:
    """JumpReLU encoder ``[..., d_in] -> [..., d_sae]``. Fused when no gradient reaches ``threshold``; otherwise
    the pre-activation is kept so the straight-through threshold gradient can be formed."""
    _, d_sae = _check_encoder(x, W_enc, b_enc, b_dec)
    _check_same(x, {"threshold": threshold})
    if threshold.shape != (d_sae,):
        raise ValueError(f"threshold must be [d_sae={d_sae}], got shape {tuple(threshold.shape)}")
    x2, lead = _flat(x)
    if torch.is_grad_enabled() and threshold.requires_grad:
        pre = ops.encode_dense(x2, W_enc, b_enc, b_dec, None, "none")
        acts = ops.jumprelu(pre, threshold, float(bandwidth))
    else:
        acts = ops.encode_dense(x2, W_enc, b_enc, b_dec, threshold, "jumprelu")
    return acts.reshape(*lead, -1)


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None = None,
    *,
    k: int,
    aux_k: int = 0,
    aux_mask: Tensor | None = None,
    aux_relu: bool = True,
) -> SparseCode:
    """TopK encoder (Gao et al. 2024): per token the k largest pre-activations, then ReLU.

    Returns :class:`SparseCode` with ``values [..., k]`` (activations, >= 0), ``indices [..., k]`` (int64, by
    value descending, ties by lower index) and, when ``aux_k > 0``, the AuxK selection: the ``aux_k`` largest
    pre-activations among latents where ``aux_mask [d_sae]`` is true, ReLU'd (``aux_relu=False`` keeps them raw,
    as SAELens's AuxK loss uses them). The ``[N, d_sae]`` pre-activation is never returned; gradients reach
    ``W_enc`` only at the selected columns.
    """
    _, d_sae = _check_encoder(x, W_enc, b_enc, b_dec)
    _check_k(k, d_sae)
    _check_aux(aux_k, aux_mask, d_sae, x)
    x2, lead = _flat(x)
    values, indices, aux_values, aux_indices = ops.topk_encode(x2, W_enc, b_enc, b_dec, k, aux_k, aux_mask)
    return SparseCode(
        torch.relu(values).reshape(*lead, -1),
        indices.reshape(*lead, -1),
        (torch.relu(aux_values) if aux_relu else aux_values).reshape(*lead, -1),
        aux_indices.reshape(*lead, -1),
    )


def batchtopk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None = None,
    *,
    k: int,
    aux_k: int = 0,
    aux_mask: Tensor | None = None,
    aux_relu: bool = True,
) -> SparseCode:
    """BatchTopK encoder (Bussmann et al. 2024): the ``k * N`` largest ReLU'd pre-activations over the whole
    batch of N tokens (ties by lower flat index). ``x`` must be ``[N, d_in]`` (the batch is the selection set).

    Returns :class:`SparseCode` in padded form ``[N, m]`` (m = the largest count in a row; each row's entries in
    latent order, then padding with value 0 and index 0), plus the AuxK selection as in :func:`topk_encode`
    (``aux_relu`` likewise).
    """
    _, d_sae = _check_encoder(x, W_enc, b_enc, b_dec)
    if x.dim() != 2:
        raise ValueError(f"BatchTopK selects over a batch: x must be [N, d_in], got shape {tuple(x.shape)}")
    _check_k(k, d_sae)
    _check_aux(aux_k, aux_mask, d_sae, x)
    values, indices, aux_values, aux_indices = ops.batchtopk_encode(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask)
    return SparseCode(values, indices, torch.relu(aux_values) if aux_relu else aux_values, aux_indices)


def encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None = None,
    *,
    activation: str = "relu",
    k: int | None = None,
    threshold: Tensor | None = None,
    bandwidth: float = 0.001,
) -> Tensor:
    """Dense activations ``[..., d_sae]`` for any activation ("relu", "jumprelu", "topk", "batchtopk")."""
    if activation == "relu":
        return relu_encode(x, W_enc, b_enc, b_dec)
    if activation == "jumprelu":
        if threshold is None:
            raise ValueError("activation='jumprelu' needs threshold [d_sae]")
        return jumprelu_encode(x, W_enc, b_enc, b_dec, threshold, bandwidth)
    if activation in ("topk", "batchtopk"):
        if k is None:
            raise ValueError(f"activation={activation!r} needs k")
        fn = topk_encode if activation == "topk" else batchtopk_encode
        code = fn(x, W_enc, b_enc, b_dec, k=k)
        return to_dense(code.values, code.indices, W_enc.shape[1])
    raise ValueError(f"unknown activation {activation!r}; use relu, jumprelu, topk or batchtopk")


# ---------------------------------------------------------------------------------------------------------------
# decoders
# ---------------------------------------------------------------------------------------------------------------


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None = None, *, check_indices: bool = True
) -> Tensor:
    """``x_hat = sum_j values[..., j] * W_dec[indices[..., j]] + b_dec``: ``[..., m] -> [..., d_in]``.

    Only the active rows of ``W_dec`` are read, and the backward touches only them (``d values`` is a gather-dot,
    ``d W_dec`` a per-latent sum). ``check_indices=False`` skips the range check of ``indices`` (a device-to-host
    synchronisation) for indices a fusedsae encoder produced, which are in range by construction."""
    _check_sparse(values, indices, W_dec, b_dec, check_indices)
    v2, lead = _flat(values)
    out = ops.sparse_decode(v2, indices.reshape(-1, indices.shape[-1]), W_dec, b_dec)
    return out.reshape(*lead, -1)


def matryoshka_decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor | None,
    widths: list[int],
    check_indices: bool = True,
) -> Tensor:
    """Every Matryoshka prefix reconstruction from one pass over the active latents: ``[..., m] -> [..., L, d_in]``,
    level l summing the active latents with index below ``widths[l]`` (increasing, the last = ``d_sae`` gives the
    ordinary reconstruction). See :func:`fusedsae.reference.matryoshka_decode`.

    Runs the PyTorch implementation on every device (one ``embedding_bag`` pass, differentiable) and holds every
    prefix; a training loss wants :func:`matryoshka_decode_loss`, which never forms them. ``check_indices=False``
    skips the index range check (a host read), for indices that come from our own encoder."""
    _check_sparse(values, indices, W_dec, b_dec, check_indices)
    widths = check_matryoshka_widths(widths, W_dec.shape[0])
    v2, lead = _flat(values)
    out = reference.matryoshka_decode(v2, indices.reshape(-1, indices.shape[-1]), W_dec, b_dec, widths)
    return out.reshape(*lead, len(widths), -1)


class MatryoshkaLoss(NamedTuple):
    """Result of :func:`matryoshka_decode_loss`. ``recon [..., d_out]``: the full reconstruction;
    ``sq_errors [..., L]``: ``||prefix_l + b_dec - y||^2`` per token for every width (the last is the full one)."""

    recon: Tensor
    sq_errors: Tensor


def matryoshka_decode_loss(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor | None,
    y: Tensor,
    widths: list[int],
    *,
    check_indices: bool = True,
) -> MatryoshkaLoss:
    """The Matryoshka reconstruction and the squared error of every prefix, fused: no ``[..., L, d_out]`` prefix
    tensor. ``values, indices [..., m]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` or None, the target
    ``y [..., d_out]`` and increasing ``widths`` (the last = ``d_sae``) give :class:`MatryoshkaLoss`
    ``(recon [..., d_out], sq_errors [..., L])``; ``sq_errors[..., l]`` sums ``(prefix_l + b_dec - y)**2`` over
    ``d_out`` for the reconstruction from the active latents below ``widths[l]``, so the Matryoshka loss terms
    are ``sq_errors.mean(0)``. Sums accumulate in float32 (float64 for float64 inputs).

    Differentiable in ``values``, ``W_dec``, ``b_dec`` and ``y``; the backward is one more pass over the active
    entries (fused kernels in the triton and cuda backends; see
    :func:`fusedsae.reference.matryoshka_decode_loss_backward` for the maths). ``check_indices=False`` skips the
    index range check (a host read), for indices that come from our own encoder."""
    _check_sparse(values, indices, W_dec, b_dec, check_indices)
    _check_tensor(y, "y")
    expected = (*values.shape[:-1], W_dec.shape[1])
    if tuple(y.shape) != expected:
        raise ValueError(
            f"y must be [..., d_out] = {list(expected)} (one row per code row, d_out = W_dec.shape[1]), "
            f"got shape {tuple(y.shape)}"
        )
    _check_same(values, {"y": y})
    widths = check_matryoshka_widths(widths, W_dec.shape[0])
    v2, lead = _flat(values)
    recon, sq_errors = ops.matryoshka_decode_loss(
        v2, indices.reshape(-1, indices.shape[-1]), W_dec, b_dec, y.reshape(-1, y.shape[-1]), widths
    )
    return MatryoshkaLoss(recon.reshape(*lead, -1), sq_errors.reshape(*lead, len(widths)))


def decode(acts: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Dense decoder ``acts @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_in]``."""
    _check_tensor(acts, "acts")
    _check_tensor(W_dec, "W_dec")
    if acts.shape[-1] != W_dec.shape[0]:
        raise ValueError(f"acts has {acts.shape[-1]} latents but W_dec has d_sae={W_dec.shape[0]}")
    _check_same(acts, {"W_dec": W_dec, "b_dec": b_dec})
    out = acts @ W_dec
    return out if b_dec is None else out + b_dec


# AuxK decodes densely over its columns (a GEMM over the possibly dead latents, zeros where not selected) while
# there are at most this many columns per selected slot, else sparsely (aux_k gathers per token). Tensor cores do
# about 200x more multiply-adds per second than a gather moves bf16 elements (~600 TFLOP/s vs ~3 TB/s from L2), so
# dense wins up to far wider; 16 keeps the dense path's [N, width] activations within 16x the sparse form's
# [N, aux_k] values and indices, and also suits fp32 without TF32 (~60 TFLOP/s on FMA units).
AUX_DENSE_RATIO = 16


def auxk_reconstruction(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    W_dec: Tensor,
    dead_mask: Tensor,
    aux_k: int,
    capacity: int | None = None,
) -> Tensor:
    """AuxK's reconstruction ``[N, d_in]`` (no ``b_dec``): the ``aux_k`` largest pre-activations among the latents
    where ``dead_mask [d_sae]`` is true, ReLU'd and decoded; differentiable in every weight.

    Static shapes, no host read, whatever the dead count. ``capacity`` (an upper bound on the dead count, or None
    for ``d_sae``) sets the work: a stable sort of the mask lists the dead latents first, and AuxK runs over the
    first ``width = capacity`` columns, the live ones among them given a bias of -inf (never selected, ReLU 0, no
    gradient). When ``width <= aux_k`` every dead latent is selected and no selection runs. The decode is dense over
    those columns while ``width <= AUX_DENSE_RATIO * aux_k`` (its cost follows the dead count), sparse beyond.
    Slots beyond the dead count select live latents at -inf: they add 0, so the result equals the reference's
    top-``min(aux_k, n_dead)``.
    """
    _, d_sae = _check_encoder(x, W_enc, b_enc, b_dec)
    if dead_mask.shape != (d_sae,) or dead_mask.dtype != torch.bool or dead_mask.device != x.device:
        raise ValueError(
            f"aux_mask must be a bool tensor of shape [d_sae={d_sae}] on {x.device}, got {dead_mask.dtype} "
            f"{tuple(dead_mask.shape)} on {dead_mask.device}"
        )
    _check_k(aux_k, d_sae, "aux_k")
    width = d_sae if capacity is None else max(1, min(d_sae, capacity))
    if width < d_sae:
        cols = torch.sort((~dead_mask).to(torch.uint8), stable=True).indices[:width]
        W_enc, b_enc, dead_mask = (
            W_enc.index_select(1, cols),
            b_enc.index_select(0, cols),
            dead_mask.index_select(0, cols),
        )
        W_dec_cols = W_dec.index_select(0, cols)
    else:
        cols, W_dec_cols = None, W_dec
    bias = torch.where(dead_mask, b_enc, torch.full_like(b_enc, float("-inf")))
    aux_k = min(aux_k, width)
    if width <= AUX_DENSE_RATIO * aux_k:
        pre = torch.addmm(bias, x if b_dec is None else x - b_dec, W_enc)
        acts = torch.relu(pre)
        if aux_k < width:
            _, chosen = row_topk(pre.detach(), aux_k)
            keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, chosen, True)
            acts = torch.where(keep, acts, torch.zeros_like(acts))
        return acts @ W_dec_cols
    code = topk_encode(x, W_enc, bias, b_dec, k=aux_k)
    chosen = code.indices if cols is None else cols[code.indices]
    return sparse_decode(code.values, chosen, W_dec, None, check_indices=False)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def row_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise TopK of ``[N, M]`` with deterministic ties (lower index first): ``(values, indices) [N, k]``."""
    _check_tensor(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, M], got shape {tuple(scores.shape)}")
    _check_k(k, scores.shape[1])
    return ops.row_topk(scores, k)


def to_dense(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """Scatters sparse ``(values, indices) [..., m]`` into dense ``[..., d_sae]`` (padding adds 0)."""
    out = values.new_zeros(*values.shape[:-1], d_sae)
    return out.scatter_add_(-1, indices.long(), values)


def to_sparse(acts: Tensor) -> tuple[Tensor, Tensor]:
    """Padded sparse form of dense ``acts [..., d_sae]``: each row's non-zeros in latent order, padded with value
    0 and index 0 to the largest count in a row (at least 1)."""
    a2, lead = _flat(acts)
    values, indices = reference.pack_rows(a2, a2 != 0)
    return values.reshape(*lead, -1), indices.reshape(*lead, -1)


def head_partial_sums(
    x: Tensor,
    W_enc: Tensor,
    indices: Tensor,
    n_heads: int,
    b_dec: Tensor | None = None,
) -> Tensor:
    """Per-head partial sums of the pre-activation at selected latents (docs/architecture.md#attribution).

    ``out[..., j, h] = (x - b_dec)_h · W_enc[h-block, indices[..., j]]`` for x ``[..., d_in]`` (head-major,
    ``d_in = n_heads * d_head``), indices ``[..., m]``: ``[..., m, n_heads]``. Omit ``b_dec`` for the "raw"
    convention. Summed over heads and added to the constant term this gives the pre-activation exactly.
    """
    _check_tensor(x, "x")
    d_in = W_enc.shape[0]
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but the SAE expects d_in={d_in}")
    if n_heads < 1 or d_in % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide d_in={d_in}")
    if indices.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"indices {tuple(indices.shape)} must match x's leading dims {tuple(x.shape[:-1])}")
    _check_same(x, {"W_enc": W_enc, "b_dec": b_dec})
    x2, lead = _flat(x)
    out = ops.head_partial_sums(x2, W_enc, b_dec, indices.reshape(-1, indices.shape[-1]), int(n_heads))
    return out.reshape(*lead, indices.shape[-1], n_heads)

"""Metric definitions (docs/architecture.md#metrics, contract names), written once and used by the trainer, the CLI and
the tests.

* ``mse``: per-token squared error summed over ``d_in``, mean over tokens (SAELens's training ``mse_loss``).
* ``fvu``: ``sum ‖x − x̂‖² / sum ‖x − mean(x)‖²`` over the batch (sparsify's FVU; SAELens's train-time
  explained variance is ``1 − fvu``); ``explained_variance = 1 − fvu``.
* ``explained_variance_legacy``: the per-token ratio averaged, ``mean_t (1 − ‖x_t − x̂_t‖² / ‖x_t − mean(x)‖²)``,
  which SAELens logs beside it and SAEBench's published numbers used.
* ``l0``: mean number of active latents per token. ``dead_fraction``: latents that have not fired for
  ``dead_tokens`` tokens, over ``d_sae`` (counted by the trainer).
* ``mmcs``: mean over true features of the max cosine similarity with any decoder row (Sharkey et al.).

Small batches: ``mse`` and ``l0`` are means over tokens, defined for any batch of at least one token. ``fvu``,
``explained_variance`` and ``explained_variance_legacy`` divide by the batch's variance, which a batch of one token
(or of identical tokens) does not have: they are NaN there, never a number divided by a clamp (one token used to
report FVU 8e37). The AuxK loss follows the same rule (0 without residual variance) and the trainer refuses the
batch sizes at which it would be meaningless (:func:`fusedsae.training.check_batch_size`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


def _total_variance(x: Tensor) -> Tensor:
    x = x.float()
    return (x - x.mean(0)).pow(2).sum()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained over the batch ``x, x_hat [N, d]`` (scalar; NaN when the batch has no
    variance, e.g. N = 1)."""
    residual = (x.float() - x_hat.float()).pow(2).sum()
    return divide_by_variance(residual, _total_variance(x))


def divide_by_variance(value: Tensor, variance: Tensor) -> Tensor:
    """``value / variance`` where ``variance > 0``, NaN where it is 0 (the small-batch rule above); no host sync."""
    safe = variance.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(variance > 0, value / safe, torch.full_like(safe, float("nan")))


def batch_variance(x: Tensor, sum_over: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``mean_t ‖x_t − mean(x)‖²`` over the batch ``x [N, d]`` (scalar). With ``sum_over`` (sums a tensor over the
    ranks that hold the other parts of a data-parallel batch, in place or not, returning it) it is the global
    batch's, in two passes as one device computes it: AuxK's normaliser, so that N ranks train as one process."""
    if sum_over is None:
        return (x - x.mean(0)).pow(2).sum(-1).mean()
    total = sum_over(torch.cat([x.sum(0), x.new_tensor([float(x.shape[0])])]))
    mean = total[:-1] / total[-1]
    return sum_over((x - mean).pow(2).sum().reshape(1))[0] / total[-1]


def fvu_moments(x: Tensor, x_hat: Tensor) -> Tensor:
    """The per-token means that :func:`fvu_from_moments` needs, in float64: ``[mean ‖x−x̂‖², mean ‖x‖², mean(x)…]``
    (``[2 + d]``). Averaging these over ranks with equal batches gives the global batch's moments."""
    x64, x_hat64 = x.double(), x_hat.double()
    return torch.cat(
        [
            torch.stack([(x64 - x_hat64).pow(2).sum(-1).mean(), x64.pow(2).sum(-1).mean()]),
            x64.mean(0),
        ]
    )


def fvu_from_moments(moments: Tensor) -> Tensor:
    """:func:`fvu` of a batch from its :func:`fvu_moments` (possibly averaged over the ranks that hold its parts):
    ``mean ‖x−x̂‖² / (mean ‖x‖² − ‖mean(x)‖²)``."""
    return divide_by_variance(moments[0], moments[1] - moments[2:].pow(2).sum())


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    return 1.0 - fvu(x, x_hat)


def explained_variance_legacy(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-token ratio, then the mean (SAELens ``explained_variance_legacy``)."""
    x = x.float()
    per_token_residual = (x - x_hat.float()).pow(2).sum(-1)
    per_token_variance = (x - x.mean(0)).pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    ratio = (1.0 - per_token_residual / per_token_variance).mean()
    return torch.where(_total_variance(x) > 0, ratio, torch.full_like(ratio, float("nan")))


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities between the rows of ``a [n, d]`` and ``b [m, d]``: ``[n, m]`` (float32)."""
    a = a.float() / a.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b.float() / b.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.t()


def max_cosines(true_directions: Tensor, W_dec: Tensor) -> Tensor:
    """For each true feature ``[n, d]``, the best cosine with any decoder row ``[d_sae, d]``: ``[n]``."""
    return cosine_matrix(true_directions, W_dec.detach().to(true_directions.device)).max(1).values


def mmcs(true_directions: Tensor, W_dec: Tensor) -> Tensor:
    """Mean max cosine similarity of the true features with the decoder rows (scalar)."""
    return max_cosines(true_directions, W_dec).mean()


def recovered_fraction(true_directions: Tensor, W_dec: Tensor, threshold: float = 0.9) -> Tensor:
    """Fraction of true features whose best decoder row has cosine above ``threshold``."""
    return (max_cosines(true_directions, W_dec) > threshold).float().mean()

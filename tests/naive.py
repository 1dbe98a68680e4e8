"""Independent, obviously-correct implementations used as test oracles: dense tensors, plain autograd, loops where
they make the maths plainer. They share no code with fusedsae.reference."""

from __future__ import annotations

import torch
from torch import Tensor


def pre(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None) -> Tensor:
    xc = x if b_dec is None else x - b_dec
    return xc @ W_enc + b_enc


def topk_select(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k largest per row, ties by lower index, ordered by (value desc, index asc): a full stable sort."""
    rows_v, rows_i = [], []
    for row in scores:
        ranked = sorted(range(row.numel()), key=lambda j: (-float(row[j]), j))[:k]
        chosen = torch.tensor(ranked, dtype=torch.int64)
        rows_i.append(chosen)
        rows_v.append(row[chosen])
    return torch.stack(rows_v), torch.stack(rows_i)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    _, idx = topk_select(scores, k)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def batchtopk_mask(p: Tensor, k: int) -> Tensor:
    """The k*N largest of relu(p) over the batch, ties by lower flat index, zeros never active."""
    n = p.shape[0]
    flat = torch.relu(p).reshape(-1)
    ranked = sorted(range(flat.numel()), key=lambda j: (-float(flat[j]), j))[: k * n]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.tensor(ranked, dtype=torch.int64)] = True
    return (mask & (flat > 0)).reshape(p.shape)


def decode(acts: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    out = acts @ W_dec
    return out if b_dec is None else out + b_dec


def sparse_to_dense(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    out = torch.zeros(*values.shape[:-1], d_sae, dtype=values.dtype)
    for n in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[n, int(indices[n, j])] += values[n, j]
    return out


def jumprelu_threshold_grad(p: Tensor, threshold: Tensor, bandwidth: float, grad: Tensor, l0: bool) -> Tensor:
    """STE threshold gradient written element by element (Rajamanoharan et al. 2024, eq. 11-12). The JumpReLU
    scale is the jump's height relu(threshold) (SAELens trains only positive thresholds, where it is threshold)."""
    out = torch.zeros_like(threshold)
    for n in range(p.shape[0]):
        for i in range(p.shape[1]):
            u = (float(p[n, i]) - float(threshold[i])) / bandwidth
            if -0.5 < u < 0.5:
                scale = 1.0 if l0 else max(float(threshold[i]), 0.0)
                out[i] -= scale / bandwidth * grad[n, i]
    return out


def jumprelu(p: Tensor, threshold: Tensor) -> Tensor:
    """SAELens's JumpReLU, element by element: relu(p) where p > threshold, else 0."""
    out = torch.zeros_like(p)
    for n in range(p.shape[0]):
        for i in range(p.shape[1]):
            if float(p[n, i]) > float(threshold[i]):
                out[n, i] = max(float(p[n, i]), 0.0)
    return out


def fvu(x: Tensor, x_hat: Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

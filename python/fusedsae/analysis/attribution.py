"""Exact per-head and per-source-position attribution for SAEs on attention outputs (docs/architecture.md#attribution).

For z ``[..., n_heads * d_head]`` (head-major: head h owns columns ``h*d_head:(h+1)*d_head``)::

    pre_f = sum_h c_{h,f} + constant_f
      "raw":     c_{h,f} = z_h · W_enc[h, f]                constant_f = b_enc[f] - b_dec · W_enc[:, f]
      "centred": c_{h,f} = (z_h - b_dec_h) · W_enc[h, f]    constant_f = b_enc[f]

(for an SAE with ``apply_b_dec_to_input=False`` both read ``c = z_h · W_enc[h, f]``, ``constant = b_enc``). For
every *active* feature of a ReLU, JumpReLU, TopK or BatchTopK SAE the activation *is* the pre-activation, so
contributions + constant reproduce it exactly (to float rounding): the non-linearity only decides which features
are active. This is not an ablation: zeroing head h moves ``pre_f`` by exactly ``-c_{h,f}`` (raw convention) but
moves the activation by a clipped amount, and single-head ablation effects do not add up
(:func:`single_head_ablations` shows it).

Per source position: ``z_h[dest] = sum_src A_h[dest, src] v_h[src]`` (values include the value bias), so
``c_{h,f}[dest] = sum_src A_h[dest, src] (v_h[src] · W_enc[h, f])`` (:func:`source_contributions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fusedsae import functional as F

if TYPE_CHECKING:
    from fusedsae.sae import SparseAutoencoder

CONVENTIONS: tuple[str, ...] = ("raw", "centred")
# Elements of a dense [rows, d_sae] block held at once when pre-activations are gathered (64 MiB of float32).
_DENSE_CHUNK = 1 << 24
# Elements of the [rows, d_in] block of repeated value vectors built per chunk of destinations.
_SOURCE_CHUNK = 1 << 22


@dataclass
class HeadContributions:
    """Per-head decomposition of feature pre-activations at each token (:func:`head_contributions`).

    Shapes, for z ``[..., d_in]``: ``m`` entries per token.

    Attributes:
        indices: ``[..., m]`` int64 feature ids: the token's active features (padded form for ReLU/JumpReLU: each
            token's features in latent order, then padding), the TopK selection, or the user's feature list.
        activations: ``[..., m]`` the SAE's activation of that feature at that token (0 where not active).
        pre_activations: ``[..., m]`` the pre-activation; equals ``activations`` where ``active``. For inactive
            entries this is a *pre-activation*, not an activation: the feature did not fire.
        contributions: ``[..., m, n_heads]`` the per-head terms ``c_{h,f}`` in ``convention``.
        constant: ``[..., m]`` the token-independent term of the convention.
        active: ``[..., m]`` bool, the feature fired at that token.
        valid: ``[..., m]`` bool, false on padding slots (which decompose feature 0's pre-activation and mean
            nothing).
        convention: ``"raw"`` or ``"centred"``.
        selection: ``"active"`` (the SAE's own active set / TopK selection) or ``"features"`` (a user list).

    ``contributions.sum(-1) + constant == pre_activations`` everywhere (to float rounding), hence ``== activations``
    at every active entry.
    """

    indices: Tensor
    activations: Tensor
    pre_activations: Tensor
    contributions: Tensor
    constant: Tensor
    active: Tensor
    valid: Tensor
    convention: str
    selection: str

    @property
    def n_heads(self) -> int:
        return int(self.contributions.shape[-1])

    def total(self) -> Tensor:
        """``contributions.sum(-1) + constant``: ``[..., m]``, the reconstructed pre-activation."""
        return self.contributions.sum(-1) + self.constant

    def labels(self) -> list[str]:
        """What ``total()`` reproduces at each entry, flattened: ``"activation"`` (active), ``"pre-activation
        (inactive)"`` or ``"padding"``."""
        out = []
        for active, valid in zip(self.active.reshape(-1).tolist(), self.valid.reshape(-1).tolist()):
            out.append("activation" if active else ("pre-activation (inactive)" if valid else "padding"))
        return out


def _n_heads(sae: SparseAutoencoder, n_heads: int | None) -> int:
    n = n_heads if n_heads is not None else sae.cfg.n_heads
    if n is None:
        raise ValueError(
            "the SAE has no n_heads in its config; pass n_heads= (its input must be the head-major concatenation of "
            f"n_heads attention outputs of d_head each, d_in={sae.cfg.d_in})"
        )
    if n < 1 or sae.cfg.d_in % n:
        raise ValueError(f"n_heads={n} must divide the SAE's d_in={sae.cfg.d_in}")
    return int(n)


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def _check_mode(sae: SparseAutoencoder) -> None:
    if sae.cfg.activation == "batchtopk" and sae.training:
        raise ValueError(
            "a BatchTopK SAE in training mode selects over the whole batch, so its activations depend on which tokens "
            "are analysed together; call sae.eval() to attribute with its inference threshold"
        )


def _offset(sae: SparseAutoencoder, convention: str) -> Tensor | None:
    """The vector subtracted from z inside the per-head terms: b_dec in the centred convention, else nothing."""
    return sae.b_dec.detach() if convention == "centred" and sae.cfg.apply_b_dec_to_input else None


def feature_constant(sae: SparseAutoencoder, convention: str = "raw") -> Tensor:
    """``[d_sae]`` constant term per feature: ``b_enc - b_dec @ W_enc`` ("raw", when the SAE centres its input) or
    ``b_enc`` ("centred")."""
    _check_convention(convention)
    b_enc = sae.b_enc.detach()
    if convention == "raw" and sae.cfg.apply_b_dec_to_input:
        return b_enc - sae.b_dec.detach() @ sae.W_enc.detach()
    return b_enc.clone()


def _gather_dense(fn, z2: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """``fn(z2[rows]) [rows, d_sae]`` gathered at ``indices [N, m]``, in row chunks of bounded size."""
    out = z2.new_empty(indices.shape)
    step = max(1, _DENSE_CHUNK // max(1, d_sae))
    for start in range(0, z2.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = fn(z2[rows]).gather(1, indices[rows])
    return out


@torch.no_grad()
def head_contributions(
    sae: SparseAutoencoder,
    z: Tensor,
    convention: str = "raw",
    features: Tensor | list[int] | None = None,
    n_heads: int | None = None,
) -> HeadContributions:
    """Per-head contributions to the SAE's features at each token of ``z [..., d_in]``
    (docs/architecture.md#attribution).

    Args:
        sae: a :class:`fusedsae.SparseAutoencoder` trained on head-major concatenated attention outputs.
        z: ``[..., d_in]`` activations (cast to the SAE's dtype, on its device).
        convention: ``"raw"`` (``z_h · W_enc[h, f]``, constant ``b_enc - b_dec · W_enc``) or ``"centred"``
            (``(z_h - b_dec_h) · W_enc[h, f]``, constant ``b_enc``).
        features: None for each token's active features (TopK: its k selected features, including any whose
            activation is 0), or a list of feature ids to decompose at every token (``[F]``; their pre-activations
            are returned, labelled by ``active``).
        n_heads: defaults to ``sae.cfg.n_heads``.

    Returns:
        :class:`HeadContributions` with ``indices``/``activations``/``constant`` ``[..., m]`` and ``contributions
        [..., m, n_heads]``. The per-head terms come from :func:`fusedsae.functional.head_partial_sums`, which runs
        on the fastest backend available (GPU kernels where present).
    """
    _check_convention(convention)
    heads = _n_heads(sae, n_heads)
    _check_mode(sae)
    lead = z.shape[:-1]
    z2 = sae.flatten_input(z)
    d_sae = sae.cfg.d_sae
    if features is None:
        values, indices = sae.encode_sparse(z2)
        indices = indices.long()
        active = values != 0
        if sae.cfg.activation in ("topk", "batchtopk") and not sae.uses_threshold():
            valid = torch.ones_like(active)
        else:
            valid = active
        activations = values
        selection = "active"
    else:
        feats = torch.as_tensor(features, dtype=torch.int64, device=z2.device).reshape(-1)
        if feats.numel() == 0:
            raise ValueError("features is empty; give at least one feature id")
        lo, hi = int(feats.min()), int(feats.max())
        if lo < 0 or hi >= d_sae:
            raise ValueError(f"feature ids must be in [0, d_sae={d_sae}), got values in [{lo}, {hi}]")
        indices = feats.expand(z2.shape[0], -1).contiguous()
        activations = _gather_dense(sae.encode, z2, indices, d_sae)
        active = activations != 0
        valid = torch.ones_like(active)
        selection = "features"
    pre = _gather_dense(sae.encode_pre, z2, indices, d_sae)
    pre = torch.where(active, activations, pre)
    # A feature list is passed as one row broadcast over the tokens (stride 0): the triton backend then runs the
    # encoder over those columns with head-aligned K steps (tensor cores) instead of a gather per (token, feature).
    per_head_indices = indices if features is None else feats.expand(z2.shape[0], -1)
    contributions = F.head_partial_sums(z2, sae.W_enc.detach(), per_head_indices, heads, b_dec=_offset(sae, convention))
    constant = feature_constant(sae, convention)[indices]
    m = indices.shape[1]
    return HeadContributions(
        indices=indices.reshape(*lead, m),
        activations=activations.reshape(*lead, m),
        pre_activations=pre.reshape(*lead, m),
        contributions=contributions.reshape(*lead, m, heads),
        constant=constant.reshape(*lead, m),
        active=active.reshape(*lead, m),
        valid=valid.reshape(*lead, m),
        convention=convention,
        selection=selection,
    )


@torch.no_grad()
def source_contributions(
    sae: SparseAutoencoder,
    attention: Tensor,
    values: Tensor,
    indices: Tensor,
    convention: str = "raw",
    n_heads: int | None = None,
) -> Tensor:
    """Each head's contribution split over source positions: ``A_h[dest, src] (v_h[src] - o_h) · W_enc[h, f]``.

    Args:
        attention: ``[..., n_heads, S_dest, S_src]`` attention probabilities (rows sum to 1).
        values: ``[..., S_src, d_in]`` value vectors, value bias included, head-major like z.
        indices: ``[..., S_dest, m]`` the features to attribute at each destination (e.g.
            ``head_contributions(...).indices`` of the same tokens).
        convention: ``"raw"`` (``o = 0``) or ``"centred"`` (``o = b_dec``; valid because each attention row sums
            to 1, so ``z_h - b_dec_h = sum_src A_h (v_h[src] - b_dec_h)``).

    Returns:
        ``[..., S_dest, m, n_heads, S_src]``; summed over the last dim it equals the per-head contributions of
        :func:`head_contributions` for the z the model computed from these A and v (to float rounding).
    """
    _check_convention(convention)
    heads = _n_heads(sae, n_heads)
    if attention.dim() < 3 or attention.shape[-3] != heads:
        raise ValueError(f"attention must be [..., n_heads={heads}, S_dest, S_src], got {tuple(attention.shape)}")
    lead = attention.shape[:-3]
    s_dest, s_src = attention.shape[-2:]
    d_in = sae.cfg.d_in
    if values.shape != (*lead, s_src, d_in):
        raise ValueError(
            f"values must be [..., S_src={s_src}, d_in={d_in}] matching attention {tuple(attention.shape)}, "
            f"got {tuple(values.shape)}"
        )
    if indices.shape[:-1] != (*lead, s_dest):
        raise ValueError(f"indices must be [..., S_dest={s_dest}, m], got {tuple(indices.shape)}")
    m = indices.shape[-1]
    dtype, device = sae.dtype, sae.device
    A = attention.reshape(-1, heads, s_dest, s_src).to(device, dtype)
    V = values.reshape(-1, s_src, d_in).to(device, dtype)
    idx = indices.reshape(-1, s_dest, m).to(device).long()
    W_enc = sae.W_enc.detach()
    offset = _offset(sae, convention)
    out = V.new_empty(A.shape[0], s_dest, m, heads, s_src)
    step = max(1, _SOURCE_CHUNK // max(1, s_src * d_in))
    for b in range(A.shape[0]):
        for start in range(0, s_dest, step):
            dest = slice(start, min(s_dest, start + step))
            n_dest = dest.stop - dest.start
            # one row per (destination, source) pair: the source's value vector, the destination's features
            rows = V[b].unsqueeze(0).expand(n_dest, s_src, d_in).reshape(-1, d_in)
            feats = idx[b, dest].unsqueeze(1).expand(n_dest, s_src, m).reshape(-1, m)
            parts = F.head_partial_sums(rows, W_enc, feats, heads, b_dec=offset).view(n_dest, s_src, m, heads)
            weights = A[b, :, dest].permute(1, 0, 2).unsqueeze(1)  # [n_dest, 1, heads, s_src]
            out[b, dest] = parts.permute(0, 2, 3, 1) * weights
    return out.reshape(*lead, s_dest, m, heads, s_src)


def weight_head_shares(sae: SparseAutoencoder, which: str = "decoder", n_heads: int | None = None) -> Tensor:
    """Data-free head attribution: each head's share of a feature's squared weight norm, ``[d_sae, n_heads]``
    (rows sum to 1). ``which="decoder"``: the share of head h's block in ``W_dec[f]`` (where the feature writes);
    ``"encoder"``: in ``W_enc[:, f]`` (what it reads)."""
    heads = _n_heads(sae, n_heads)
    if which == "decoder" and sae.cfg.is_transcoder:
        raise ValueError(
            f"a transcoder's decoder writes its output y (d_out={sae.cfg.d_out}), not the heads' z: it has no head "
            "blocks; use which='encoder'"
        )
    if which == "decoder":
        weights = sae.W_dec.detach()
    elif which == "encoder":
        weights = sae.W_enc.detach().t()
    else:
        raise ValueError(f"which must be 'decoder' or 'encoder', got {which!r}")
    d_sae, d_in = weights.shape
    per_head = weights.float().reshape(d_sae, heads, d_in // heads).pow(2).sum(-1)
    return per_head / per_head.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def single_head_ablations(
    sae: SparseAutoencoder,
    z: Tensor,
    features: Tensor | list[int],
    n_heads: int | None = None,
    replacement: str = "zero",
) -> tuple[Tensor, Tensor]:
    """What ablating one head at a time does to the given features: ``(d_pre, d_act)``, each ``[..., F, n_heads]``.

    ``replacement="zero"`` sets z_h to 0 (then ``d_pre = -c_{h,f}`` exactly, raw convention); ``"b_dec"`` sets it
    to ``b_dec_h`` (then ``d_pre = -c_{h,f}`` in the centred convention). ``d_act`` is the change of the SAE's own
    activation (after its non-linearity and, for TopK, its re-selection): not additive over heads, and not equal
    to the contributions — attribution is not ablation.
    """
    heads = _n_heads(sae, n_heads)
    _check_mode(sae)
    if replacement not in ("zero", "b_dec"):
        raise ValueError(f"replacement must be 'zero' or 'b_dec', got {replacement!r}")
    if replacement == "b_dec" and not sae.cfg.apply_b_dec_to_input:
        why = "a transcoder: b_dec lives in its output space" if sae.cfg.is_transcoder else "apply_b_dec_to_input=False"
        raise ValueError(
            f"replacement='b_dec' needs an SAE that centres its input by b_dec; this one does not ({why}); use "
            "replacement='zero'"
        )
    lead = z.shape[:-1]
    z2 = sae.flatten_input(z)
    d_sae, d_in = sae.cfg.d_sae, sae.cfg.d_in
    d_head = d_in // heads
    feats = torch.as_tensor(features, dtype=torch.int64, device=z2.device).reshape(-1)
    indices = feats.expand(z2.shape[0], -1).contiguous()
    base_pre = _gather_dense(sae.encode_pre, z2, indices, d_sae)
    base_act = _gather_dense(sae.encode, z2, indices, d_sae)
    d_pre = z2.new_empty(*indices.shape, heads)
    d_act = z2.new_empty(*indices.shape, heads)
    for h in range(heads):
        ablated = z2.clone()
        cols = slice(h * d_head, (h + 1) * d_head)
        ablated[:, cols] = 0.0 if replacement == "zero" else sae.b_dec.detach()[cols]
        d_pre[..., h] = _gather_dense(sae.encode_pre, ablated, indices, d_sae) - base_pre
        d_act[..., h] = _gather_dense(sae.encode, ablated, indices, d_sae) - base_act
    f = feats.numel()
    return d_pre.reshape(*lead, f, heads), d_act.reshape(*lead, f, heads)

"""SparseAutoencoder: the drop-in SAE layer (SAELens 6.x weights and maths, sparsify-style k-sparse encode)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusedsae import functional as F
from fusedsae import metrics as M
from fusedsae.config import SPARSE_ACTIVATIONS, SAEConfig, dtype_name


def _check_finite_default() -> bool:
    return os.environ.get("FUSEDSAE_CHECK_FINITE", "1") not in ("0", "false", "False", "")


@dataclass
class TrainingOutput:
    """What :meth:`SparseAutoencoder.training_forward` returns.

    Attributes:
        loss: scalar total loss (what to backpropagate).
        losses: the loss terms by SAELens name: ``mse_loss`` always, ``l1_loss`` (ReLU), ``l0_loss`` (JumpReLU),
            ``auxiliary_reconstruction_loss`` (TopK/BatchTopK with dead latents); each already multiplied by its
            coefficient.
        sae_in: the input as the SAE saw it, ``[N, d_in]`` (flattened, in the SAE's dtype).
        sae_out: reconstruction ``[N, d_out]`` (``d_out = d_in`` for an SAE; skip path included).
        values, indices: sparse activations ``[N, m]`` (TopK: m = k; BatchTopK: padded) or None for dense SAEs.
        dense_acts: ``[N, d_sae]`` activations of dense SAEs (ReLU, JumpReLU), else None.
        n_dead: dead latents the AuxK loss could use (TopK family with a dead mask: a device tensor, so that the
            step never waits for the host; 0 otherwise).
        nonfinite: with ``defer_checks``, the number of NaN/Inf input values (int64 device tensor), else None.
        sae_target: what ``sae_out`` reconstructs, ``[N, d_out]``: a transcoder's ``y``; None for an SAE, whose
            target is ``sae_in`` (read either through :attr:`target`).
    """

    loss: Tensor
    losses: dict[str, Tensor]
    sae_in: Tensor
    sae_out: Tensor
    values: Tensor | None = None
    indices: Tensor | None = None
    dense_acts: Tensor | None = None
    n_dead: int | Tensor = 0
    extras: dict[str, Any] = field(default_factory=dict)
    nonfinite: Tensor | None = None
    sae_target: Tensor | None = None

    @property
    def target(self) -> Tensor:
        """The reconstruction target ``[N, d_out]``: ``y`` for a transcoder, ``sae_in`` for an SAE (what the MSE,
        FVU and explained variance compare ``sae_out`` with)."""
        return self.sae_in if self.sae_target is None else self.sae_target

    @property
    def feature_acts(self) -> Tensor:
        """Dense activations ``[N, d_sae]`` (built on demand for sparse SAEs)."""
        if self.dense_acts is not None:
            return self.dense_acts
        assert self.values is not None and self.indices is not None
        return F.to_dense(self.values, self.indices, self.extras["d_sae"])

    def firing_counts(self) -> Tensor:
        """``[d_sae]`` int64: on how many tokens of this batch each latent was active."""
        if self.dense_acts is not None:
            return (self.dense_acts != 0).sum(0)
        assert self.values is not None and self.indices is not None
        counts = torch.zeros(self.extras["d_sae"], dtype=torch.int64, device=self.values.device)
        return counts.index_add_(0, self.indices.reshape(-1), (self.values.reshape(-1) > 0).to(torch.int64))

    def fired(self) -> Tensor:
        """``[d_sae]`` bool: latents that were active on at least one token of this batch."""
        return self.firing_counts() > 0

    def l0(self) -> Tensor:
        """Mean number of active latents per token (scalar)."""
        if self.dense_acts is not None:
            return (self.dense_acts != 0).sum(-1).float().mean()
        assert self.values is not None
        return (self.values > 0).sum(-1).float().mean()


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder (or transcoder) with SAELens's parameters and maths.

    ``SparseAutoencoder(cfg)`` or ``SparseAutoencoder(d_in=768, d_sae=16384, activation="topk", k=32)``.

    Parameters: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and
    ``threshold [d_sae]`` (JumpReLU: a trained parameter; BatchTopK: a buffer holding the inference threshold, an
    EMA of the smallest positive activation in training batches).

    A transcoder (``cfg.d_out`` set) reads ``x [..., d_in]`` and reconstructs ``y [..., d_out]``: ``W_dec [d_sae,
    d_out]``, ``b_dec [d_out]``, the input never centred by ``b_dec``; the encoder and the selection are those of an
    SAE. ``cfg.skip_connection`` adds ``x @ W_skip.T`` (``W_skip [d_out, d_in]``, zeros at first) to ``forward``'s
    reconstruction (not to :meth:`decode`, which sees only the latents, as in SAELens).

    Inputs may have any leading dims: ``x [..., d_in]``. Floating inputs are cast to the SAE's dtype (as SAELens);
    wrong widths, non-floating dtypes, another device, NaN or Inf raise errors that name the problem (the finite
    check costs one reduction; turn it off with ``sae.check_finite = False`` or ``FUSEDSAE_CHECK_FINITE=0``).

    BatchTopK selects over the batch in training mode and uses ``threshold`` (JumpReLU maths) in eval mode,
    as SAELens and dictionary_learning do at inference.
    """

    threshold: Tensor

    def __init__(self, cfg: SAEConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if cfg is not None and not isinstance(cfg, SAEConfig):
            # a SAELens or sparsify config object (issue 10: it used to fail on a missing torch_dtype)
            raise TypeError(
                f"cfg must be a fusedsae.SAEConfig, got {type(cfg).__module__}.{type(cfg).__name__}; build SAELens "
                "configs with fusedsae.compat.sae_lens.SAE(cfg) and sparsify configs with "
                "fusedsae.compat.sparsify.SparseCoder(d_in, cfg)"
            )
        if cfg is None:
            cfg = SAEConfig(**kwargs)
        elif kwargs:
            cfg = cfg.replace(**kwargs)
        self.cfg = cfg
        self.check_finite = _check_finite_default()
        factory = {"dtype": cfg.torch_dtype, "device": cfg.device}
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.out_width, **factory))
        self.b_dec = nn.Parameter(torch.zeros(cfg.out_width, **factory))
        self.W_skip: nn.Parameter | None = None
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(cfg.out_width, cfg.d_in, **factory))
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, **factory))
        elif cfg.activation == "batchtopk":
            self.register_buffer("threshold", torch.zeros(cfg.d_sae, **factory))
        self.reset_parameters()

    # -------------------------------------------------------------------------------------------------------------
    # construction
    # -------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows drawn uniformly on the unit sphere; ``W_enc = W_dec^T``; biases 0
        (docs/architecture.md#maths). A transcoder's input and output are different spaces, so its encoder columns
        are drawn on the unit sphere of ``d_in`` independently of the decoder rows; ``W_skip`` starts at 0 (as
        SAELens and sparsify)."""
        cfg = self.cfg
        w = torch.randn(cfg.d_sae, cfg.out_width, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        if cfg.is_transcoder:
            w = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_enc.copy_(w.t())
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    @torch.no_grad()
    def init_b_dec(self, x: Tensor, method: str = "geometric_median") -> None:
        """Sets ``b_dec`` from a sample of the reconstruction target, ``x [..., d_out]`` (the inputs of an SAE, a
        transcoder's ``y``): its ``"mean"`` or ``"geometric_median"`` (Weiszfeld iterations; robust to outliers, as
        OpenAI's TopK training does), or ``"zeros"``."""
        # float64 statistics whatever the SAE's dtype
        x2 = self.flatten_target(x, name="y" if self.cfg.is_transcoder else "x").double()
        if method == "zeros":
            center = torch.zeros(self.cfg.out_width)
        elif method == "mean":
            center = x2.mean(0)
        elif method == "geometric_median":
            center = geometric_median(x2)
        else:
            raise ValueError(f"unknown b_dec init {method!r}; use geometric_median, mean or zeros")
        self.b_dec.copy_(center.to(self.b_dec))

    # -------------------------------------------------------------------------------------------------------------
    # inference
    # -------------------------------------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of the reconstruction (``d_in`` for an SAE)."""
        return self.cfg.out_width

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def _apply(self, fn: Any, recurse: bool = True) -> SparseAutoencoder:
        """Every ``.to()``/``.half()``/``.cuda()`` goes through here: ``cfg.dtype`` and ``cfg.device`` follow the
        parameters, so ``save()`` writes a cfg.json that matches the weights."""
        out = super()._apply(fn, recurse)
        self.cfg.dtype = dtype_name(self.W_enc.dtype)
        self.cfg.device = str(self.W_enc.device)
        return out

    @property
    def _b_dec_in(self) -> Tensor | None:
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    def flatten_input(self, x: Tensor, check_finite: bool = True) -> Tensor:
        """``x [..., d_in]`` validated (width, floating dtype, device, finite unless ``check_finite=False``) and
        flattened to ``[N, d_in]`` in the SAE's dtype: what every method feeds the ops."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}) "
                f"but the SAE expects d_in={self.cfg.d_in}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the SAE is on {self.device}; use sae.to(x.device)")
        if self.check_finite and check_finite:
            F.check_finite(x, "x")
        return x.reshape(-1, self.cfg.d_in).to(self.dtype)

    def flatten_target(self, y: Tensor, check_finite: bool = True, name: str = "y") -> Tensor:
        """The reconstruction target ``y [..., d_out]`` (an SAE's: its input, ``d_out = d_in``) validated like
        :meth:`flatten_input` and flattened to ``[N, d_out]`` in the SAE's dtype; errors call it ``name``."""
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        width = self.cfg.out_width
        if y.dim() == 0 or y.shape[-1] != width:
            expects = (
                f"the transcoder reconstructs d_out={width}"
                if self.cfg.is_transcoder
                else f"the SAE expects d_in={width}"
            )
            raise ValueError(
                f"{name} has {y.shape[-1] if y.dim() else 0} features (shape {tuple(y.shape)}) but {expects}"
            )
        if not y.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {y.dtype}")
        if y.device != self.device:
            raise ValueError(f"{name} is on {y.device} but the SAE is on {self.device}; use sae.to({name}.device)")
        if self.check_finite and check_finite:
            F.check_finite(y, name)
        return y.reshape(-1, width).to(self.dtype)

    def skip(self, x: Tensor) -> Tensor | None:
        """The skip path ``x @ W_skip.T`` ``[..., d_in] -> [..., d_out]`` (None without ``skip_connection``); ``x``
        must already be validated and in the SAE's dtype."""
        return None if self.W_skip is None else x @ self.W_skip.t()

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activation ``[..., d_in] -> [..., d_sae]``."""
        lead = x.shape[:-1]
        return F.encode_pre(self.flatten_input(x), self.W_enc, self.b_enc, self._b_dec_in).reshape(*lead, -1)

    def uses_threshold(self) -> bool:
        """True when activations come from ``threshold`` (JumpReLU; BatchTopK in eval mode) rather than a
        selection (TopK; BatchTopK in training mode) or ReLU."""
        return self.cfg.activation == "jumprelu" or (self.cfg.activation == "batchtopk" and not self.training)

    def _activate(self, x2: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        """The one activation dispatch of inference, on ``x2 [N, d_in]``: the sparse ``(values, indices)`` of a
        TopK/BatchTopK selection, or dense ``[N, d_sae]`` activations (ReLU, JumpReLU, thresholded BatchTopK)."""
        cfg = self.cfg
        if cfg.activation in SPARSE_ACTIVATIONS and not self.uses_threshold():
            assert cfg.k is not None
            select = F.topk_encode if cfg.activation == "topk" else F.batchtopk_encode
            code = select(x2, self.W_enc, self.b_enc, self._b_dec_in, k=cfg.k)
            return code.values, code.indices
        activation = "relu" if cfg.activation == "relu" else "jumprelu"
        threshold = None if activation == "relu" else self.threshold
        return F.encode(
            x2,
            self.W_enc,
            self.b_enc,
            self._b_dec_in,
            activation=activation,
            threshold=threshold,
            bandwidth=cfg.jumprelu_bandwidth,
        )

    def encode(self, x: Tensor) -> Tensor:
        """Dense activations ``[..., d_in] -> [..., d_sae]`` (SAELens ``encode``)."""
        lead = x.shape[:-1]
        acts = self._activate(self.flatten_input(x))
        if isinstance(acts, tuple):
            acts = F.to_dense(*acts, self.cfg.d_sae)
        return acts.reshape(*lead, -1)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse activations ``(values, indices)`` (sparsify-style ``top_acts, top_indices``).

        TopK: ``[..., k]`` sorted by value. Other activations: padded form ``[..., m]`` (value 0, index 0 pads).
        """
        lead = x.shape[:-1]
        acts = self._activate(self.flatten_input(x))
        values, indices = acts if isinstance(acts, tuple) else F.to_sparse(acts)
        return values.reshape(*lead, -1), indices.reshape(*lead, -1)

    def decode(self, acts: Tensor) -> Tensor:
        """Dense decoder ``[..., d_sae] -> [..., d_out]``: ``acts @ W_dec + b_dec`` (no skip path: it needs x)."""
        return F.decode(acts.to(self.dtype), self.W_dec, self.b_dec)

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """Sparse decoder ``[..., m] -> [..., d_out]``, reading only the active rows of ``W_dec`` (no skip path)."""
        return F.sparse_decode(values.to(self.dtype), indices, self.W_dec, self.b_dec)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``[..., d_in] -> [..., d_out]`` (SAELens ``forward``; a transcoder's prediction of y, skip
        path included); a selection decodes sparsely."""
        lead = x.shape[:-1]
        x2 = self.flatten_input(x)
        acts = self._activate(x2)
        out = self.decode_sparse(*acts) if isinstance(acts, tuple) else self.decode(acts)
        skip = self.skip(x2)
        if skip is not None:
            out = out + skip
        return out.reshape(*lead, -1)

    # -------------------------------------------------------------------------------------------------------------
    # training
    # -------------------------------------------------------------------------------------------------------------

    def training_forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        dead_mask: Tensor | None = None,
        coefficient_scale: float = 1.0,
        *,
        dead_capacity: int | None = None,
        defer_checks: bool = False,
        batch_sum: Callable[[Tensor], Tensor] | None = None,
    ) -> TrainingOutput:
        """Forward pass with the training loss.

        Args:
            x: ``[..., d_in]`` activations.
            y: a transcoder's target ``[..., d_out]`` (same leading dims as x; required); an SAE reconstructs x and
                takes no y.
            dead_mask: ``[d_sae]`` bool, latents counted as dead; enables the AuxK loss (TopK/BatchTopK).
            coefficient_scale: multiplier of the sparsity coefficient (the trainer's warm-up, 0 → 1).
            dead_capacity: an upper bound on ``dead_mask.sum()`` known without reading the mask
                (:meth:`fusedsae.Trainer.dead_capacity` derives an exact one); AuxK then works on that many
                columns instead of all ``d_sae``. A bound that is too small leaves dead latents out of AuxK.
            defer_checks: count NaN/Inf inputs on the device (``out.nonfinite``) instead of raising, so that the
                step issues no host synchronisation; the caller reads the count when it syncs anyway.
            batch_sum: under data parallelism, sums a tensor over the ranks' parts of the batch, so that AuxK is
                normalised by the global batch's residual variance (:func:`fusedsae.metrics.batch_variance`).

        Loss = MSE against the target (x, or a transcoder's y; summed over its width, mean over tokens) + one of:
        ``l1_coefficient`` × L1 of the activations weighted by decoder-row norms (ReLU); ``l0_coefficient`` × L0
        through the STE (JumpReLU); ``aux_loss_coefficient`` × AuxK (TopK family, whenever ``dead_mask`` is given,
        0 when nothing is dead): the top ``aux_k`` dead latents reconstruct the detached residual (``y - ŷ`` for a
        transcoder), normalised by the residual's variance and scaled by ``min(n_dead / aux_k, 1)`` (Gao et al.);
        see :func:`fusedsae.functional.auxk_reconstruction`.
        Matryoshka SAEs (``cfg.matryoshka_widths``) add ``inner_mse_loss_<w>``, the MSE of the reconstruction from
        the active latents below each inner width w, all prefixes from one pass of the sparse decoder.

        A TopK step (this, backward, and the Trainer's optimizer step) reads nothing back to the host: shapes are
        static and the dead count stays on the device. BatchTopK reads its output width back
        (docs/architecture.md#sync).
        """
        cfg = self.cfg
        if isinstance(y, Tensor) and dead_mask is None and y.dtype == torch.bool:
            raise TypeError(
                "training_forward's second argument is y (a transcoder's target); pass the dead mask as dead_mask="
            )
        x2 = self.flatten_input(x, check_finite=not defer_checks)
        if cfg.is_transcoder:
            if y is None:
                raise ValueError(
                    f"a transcoder (d_out={cfg.d_out}) needs its target: training_forward(x, y) with y [..., d_out]"
                )
            if y.shape[:-1] != x.shape[:-1]:
                raise ValueError(
                    f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same leading dims (one y per x)"
                )
            target = self.flatten_target(y, check_finite=not defer_checks)
        elif y is not None:
            raise ValueError(
                "y is given but this SAE reconstructs its input (cfg.d_out is None); build a transcoder with "
                "SAEConfig(d_out=...) to reconstruct another activation"
            )
        else:
            target = x2
        nonfinite = None
        if defer_checks and self.check_finite:
            nonfinite = (~torch.isfinite(x2)).sum()
            if target is not x2:
                nonfinite = nonfinite + (~torch.isfinite(target)).sum()
        skip = self.skip(x2)
        b_dec_in = self._b_dec_in
        losses: dict[str, Tensor] = {}
        extras: dict[str, Any] = {"d_sae": cfg.d_sae}
        values = indices = dense = None
        n_dead: int | Tensor = 0
        if cfg.activation in SPARSE_ACTIVATIONS:
            select = F.topk_encode if cfg.activation == "topk" else F.batchtopk_encode
            assert cfg.k is not None
            code = select(x2, self.W_enc, self.b_enc, b_dec_in, k=cfg.k)
            values, indices = code.values, code.indices
            if cfg.matryoshka_widths:
                # the reconstruction and every prefix's squared error from one fused pass (no [N, L, d] prefixes);
                # the last level is the whole code, i.e. the ordinary MSE
                # a skip path adds the same x @ W_skip.T to every prefix: the prefixes are compared with y - skip
                # (the fused op is differentiable in its target, so W_skip gets its gradient through it)
                goal = target if skip is None else target - skip
                sae_out, sq_errors = F.matryoshka_decode_loss(
                    values, indices, self.W_dec, self.b_dec, goal, cfg.matryoshka_widths, check_indices=False
                )
                if skip is not None:
                    sae_out = sae_out + skip
                per_level = sq_errors.mean(0)
                for level, width in enumerate(cfg.matryoshka_widths[:-1]):
                    losses[f"inner_mse_loss_{width}"] = per_level[level]
                mse = per_level[-1]
            else:
                # our own encoder's indices: skip the range check, a device-to-host sync per call
                sae_out = F.sparse_decode(values, indices, self.W_dec, self.b_dec, check_indices=False)
                if skip is not None:
                    sae_out = sae_out + skip
                mse = (sae_out - target).pow(2).sum(-1).mean()
            if dead_mask is not None and cfg.aux_k:
                n_dead = dead_mask.sum()
                residual = (target - sae_out).detach()
                aux_out = F.auxk_reconstruction(
                    x2,
                    self.W_enc,
                    self.b_enc,
                    b_dec_in,
                    self.W_dec,
                    dead_mask,
                    min(cfg.aux_k, cfg.d_sae),
                    dead_capacity,
                )
                variance = M.batch_variance(residual, batch_sum)
                scale = (n_dead / cfg.aux_k).clamp(max=1.0)
                # small-batch rule (fusedsae.metrics): no residual variance (one token) -> no AuxK term, not the
                # error over a 1e-12 clamp (loss 6e10 at batch size 1)
                error = (aux_out - residual).pow(2).sum(-1).mean()
                # exactly 0 (not 0 x a NaN from a bad batch) when no latent is dead or the residual has no variance
                aux = torch.where(
                    (variance > 0) & (n_dead > 0), scale * error / variance.clamp_min(1e-12), torch.zeros_like(error)
                )
                losses["auxiliary_reconstruction_loss"] = cfg.aux_loss_coefficient * aux
            if cfg.activation == "batchtopk" and self.training:
                self._update_threshold(values)
        else:  # relu, jumprelu
            dense, sae_out, mse, penalty = self.dense_training_terms(
                x2, b_dec_in, coefficient_scale, target=target, skip=skip
            )
            losses.update(penalty)
        losses = {"mse_loss": mse, **losses}
        loss = torch.stack([term.float() for term in losses.values()]).sum()
        return TrainingOutput(
            loss,
            losses,
            x2,
            sae_out,
            values,
            indices,
            dense,
            n_dead,
            extras,
            nonfinite,
            sae_target=target if cfg.is_transcoder else None,
        )

    def dense_training_terms(
        self,
        x2: Tensor,
        b_dec_in: Tensor | None,
        coefficient_scale: float = 1.0,
        shard_sum: Callable[[Tensor], Tensor] | None = None,
        *,
        target: Tensor | None = None,
        skip: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """The ReLU / JumpReLU part of :meth:`training_forward` (the latent-sharded SAE uses it too).

        ``x2 [N, d_in]`` (flattened), ``b_dec_in`` (``b_dec`` when applied to the input, else None) ->
        ``(dense_acts [N, d_sae], sae_out [N, d_out], mse, {name: penalty})``, the penalty ``l1_loss`` (ReLU: L1
        weighted by decoder-row norms) or ``l0_loss`` (JumpReLU: L0 through the STE), times its coefficient and
        ``coefficient_scale``. ``shard_sum``: under latent sharding (this SAE holds a slice of the latents), sums
        a partial over the slices: the decoder's output before ``b_dec``, and the penalty. Transcoders: ``target
        [N, d_out]`` is what the MSE compares with (default ``x2``), ``skip [N, d_out]`` the skip path's output
        added to the reconstruction.
        """
        cfg = self.cfg
        if cfg.activation == "relu":
            dense = F.relu_encode(x2, self.W_enc, self.b_enc, b_dec_in)
            name, coefficient = "l1_loss", cfg.l1_coefficient
            penalty = (dense * self.W_dec.norm(dim=1)).sum(-1).mean()
        else:
            pre = F.encode_pre(x2, self.W_enc, self.b_enc, b_dec_in)
            dense = F.jumprelu(pre, self.threshold, cfg.jumprelu_bandwidth)
            name, coefficient = "l0_loss", cfg.l0_coefficient
            penalty = F.step(pre, self.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
        if shard_sum is None:
            sae_out = F.decode(dense, self.W_dec, self.b_dec)
        else:
            sae_out = shard_sum(F.decode(dense, self.W_dec)) + self.b_dec
            penalty = shard_sum(penalty)
        if skip is not None:
            sae_out = sae_out + skip
        mse = (sae_out - (x2 if target is None else target)).pow(2).sum(-1).mean()
        return dense, sae_out, mse, {name: coefficient_scale * coefficient * penalty}

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        """BatchTopK inference threshold: EMA (rate ``topk_threshold_lr``) of the smallest positive activation
        of each training batch; the first batch sets it, a batch without positive activations leaves it. On the
        device, no host read."""
        if values.numel() == 0:
            return
        smallest = torch.where(values > 0, values, torch.full_like(values, float("inf"))).amin()
        smallest = smallest.to(self.threshold.dtype)
        current = self.threshold[0]
        lr = self.cfg.topk_threshold_lr
        new = torch.where(current <= 0, smallest, (1 - lr) * current + lr * smallest)
        self.threshold.copy_(torch.where(torch.isinf(smallest), current, new).expand_as(self.threshold))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Removes from ``W_dec.grad`` each row's component along that (unit) row, so a step keeps norms ~1."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder_rows(self, skip: Tensor | None = None) -> None:
        """Rescales decoder rows to unit norm. ``skip``: a 0-dim bool tensor; where true the rows are left exactly
        as they are (the trainer's skipped steps: renormalising unit rows would still change their last bits),
        decided on the device without a host sync."""
        norms = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if skip is not None:
            norms = torch.where(skip, torch.ones_like(norms), norms)
        self.W_dec /= norms

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Makes decoder rows unit-norm without changing reconstructions (SAELens ``fold_W_dec_norm``):
        encoder columns, ``b_enc`` and ``threshold`` take the norms. TopK selection may change if norms differ."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec /= norms[:, None]
        self.W_enc *= norms[None, :]
        self.b_enc *= norms
        if self.cfg.activation == "jumprelu":
            self.threshold *= norms

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scale: float, out_scale: float | None = None) -> None:
        """Folds input scales into the weights (SAELens name): an SAE trained on ``scale * x`` becomes one that
        takes raw ``x`` and returns raw reconstructions, with identical latent activations.

        A transcoder trained on ``(scale * x, out_scale * y)`` (each with its own factor; ``out_scale`` defaults to
        ``scale``, an SAE's case) becomes ``g(x) = f(scale * x) / out_scale``: the pre-activation
        ``scale * x @ W_enc + b_enc`` (no centring) needs ``W_enc * scale``; the output ``acts @ W_dec + b_dec +
        scale * x @ W_skip.T`` divided by ``out_scale`` needs ``W_dec / out_scale``, ``b_dec / out_scale`` and
        ``W_skip * scale / out_scale``. With ``apply_b_dec_to_input`` (an SAE, one scale) ``(scale * x - b_dec)
        @ W_enc = (x - b_dec / scale) @ (scale * W_enc)``, so the same ``b_dec / scale`` serves both places.
        """
        out_scale = scale if out_scale is None else out_scale
        self.W_enc *= scale
        self.b_dec /= out_scale
        self.W_dec /= out_scale
        if self.W_skip is not None:
            self.W_skip *= scale / out_scale

    # -------------------------------------------------------------------------------------------------------------
    # files
    # -------------------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], sparsity: Tensor | None = None, format: str = "sae_lens") -> Path:
        """Writes a SAELens 6.x folder (``cfg.json`` + ``sae_weights.safetensors`` [+ ``sparsity.safetensors``])
        that SAELens's ``SAE.load_from_disk`` and :func:`fusedsae.load` read. Atomic: a crash leaves either the
        old folder or the new one. ``format="sparsify"`` writes sparsify's folder instead (``cfg.json`` +
        ``sae.safetensors``; TopK SAEs and transcoders with ``d_out = d_in``, skip path included; see
        :meth:`fusedsae.compat.sparsify.SparseCoder.from_fusedsae`)."""
        if format == "sparsify":
            from fusedsae.compat.sparsify import SparseCoder

            SparseCoder.from_fusedsae(self).save_to_disk(path)
            return Path(path)
        if format != "sae_lens":
            raise ValueError(f"unknown SAE file format {format!r}; use 'sae_lens' or 'sparsify'")
        from fusedsae.formats import save_sae

        return save_sae(self, path, sparsity=sparsity)

    def extra_repr(self) -> str:
        cfg = self.cfg
        k = f", k={cfg.k}" if cfg.k is not None else ""
        heads = f", n_heads={cfg.n_heads}" if cfg.n_heads else ""
        out = f", d_out={cfg.d_out}" if cfg.d_out is not None else ""
        skip = ", skip_connection=True" if cfg.skip_connection else ""
        return (
            f"d_in={cfg.d_in}{out}, d_sae={cfg.d_sae}, activation={cfg.activation}{k}{heads}{skip}, dtype={cfg.dtype}"
        )


def geometric_median(x: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Geometric median of the rows of ``x [N, d]`` by Weiszfeld's algorithm (float64 inside): ``[d]``."""
    points = x.double()
    median = points.mean(0)
    for _ in range(iterations):
        dist = (points - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * max(1.0, float(median.norm())):
            break
    return median.to(x.dtype)

"""sparsify 1.3's ``SparseCoder`` on fusedsae's ops: ``from fusedsae.compat.sparsify import SparseCoder``.

Covered: ``SparseCoderConfig`` (``SaeConfig``), ``SparseCoder`` (``Sae``) with ``encoder`` (an ``nn.Linear``,
weight ``[num_latents, d_in]``), ``W_dec [num_latents, d_in]``, ``b_dec [d_in]``, ``W_skip [d_in, d_in]`` (skip
connection), ``num_latents``, ``d_in``, ``device``, ``dtype``; ``encode`` → :class:`EncoderOutput`
``(top_acts, top_indices, pre_acts)``; ``decode(top_acts, top_indices)``; ``forward(x, y=None, *, dead_mask=None,
total_variance=None)`` → :class:`ForwardOutput` with ``fvu``, ``auxk_loss``, ``multi_topk_fvu``;
``set_decoder_norm_to_unit_norm``, ``remove_gradient_parallel_to_decoder_directions``; ``save_to_disk`` /
``load_from_disk`` / ``load_many(path, local=True)`` in sparsify's own folder format (``cfg.json`` +
``sae.safetensors``), which sparsify itself reads; transcoders (``transcode=True``, an input not centred by
``b_dec``) and skip connections.

Not covered, and why: ``activation="groupmax"`` (no fused GroupMax op; refused at construction);
``load_from_hub`` (fusedsae never downloads; fetch the folder and use ``load_from_disk``); the CUDA bf16 autocast
that sparsify's ``forward`` enables on its own (run under ``torch.autocast`` yourself); with ``multi_topk`` sparsify
returns the 4k-sparse reconstruction and codes as ``sae_out``/``latent_acts`` (an accident of variable reuse: its
``fvu`` is still the k one), we return the k-sparse ones that ``fvu`` measures.

One deliberate difference in gradients: sparsify 1.3's fused encoder ignores the gradient that reaches
``pre_acts``, so its AuxK and Multi-TopK losses train only ``W_dec`` and ``b_dec``, never the encoder of the dead
latents AuxK is meant to revive (Gao et al. 2024 train both). Here both reach the encoder; set
``SparseCoder.exact_sparsify_gradients = True`` (class or instance) to reproduce sparsify's gradients bit for bit.

Any leading dims are accepted (sparsify needs ``[N, d_in]``); ``pre_acts`` is ``relu(x W^T + b)`` ``[..., M]``.
``encode`` forms the dense ``pre_acts`` because its output contract includes them; ``forward`` does not need them
and runs the fused encoder + TopK (+ AuxK selection among dead latents) without materialising ``[N, M]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fusedsae import functional as F
from fusedsae.formats import (
    SAEFormatError,
    assign_weights,
    atomic_write,
    read_json,
    read_safetensors,
    write_safetensors,
)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


@dataclass
class SparseCoderConfig:
    """sparsify's ``SparseCoderConfig`` (field names, defaults and ``cfg.json`` keys as sparsify 1.3)."""

    activation: str = "topk"
    expansion_factor: int = 32
    normalize_decoder: bool = True
    num_latents: int = 0
    k: int = 32
    multi_topk: bool = False
    skip_connection: bool = False
    transcode: bool = False

    def __post_init__(self) -> None:
        if self.activation != "topk":
            raise ValueError(
                f"activation={self.activation!r}: fusedsae.compat.sparsify implements sparsify's 'topk' only "
                "(GroupMax has no fused op here)"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], drop_extra_fields: bool = True) -> SparseCoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - names)
        if extra and not drop_extra_fields:
            raise ValueError(f"unknown SparseCoderConfig fields: {', '.join(extra)}")
        return cls(**{key: value for key, value in data.items() if key in names})


SaeConfig = SparseCoderConfig


class EncoderOutput(NamedTuple):
    """``top_acts [..., k]`` (>= 0), ``top_indices [..., k]`` (int64, by value descending, ties by lower index),
    ``pre_acts [..., M]`` = ``relu(x W^T + b)``."""

    top_acts: Tensor
    top_indices: Tensor
    pre_acts: Tensor


class ForwardOutput(NamedTuple):
    """sparsify's training output. ``sae_out [..., d_out]``; ``latent_acts``/``latent_indices [..., k]``; scalar
    ``fvu`` = Σ(y − ŷ)² / Σ(y − ȳ)² over the batch; ``auxk_loss`` (0 without dead latents);
    ``multi_topk_fvu`` (0 unless ``multi_topk``)."""

    sae_out: Tensor
    latent_acts: Tensor
    latent_indices: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    multi_topk_fvu: Tensor


class SparseCoder(nn.Module):
    """sparsify's ``SparseCoder(d_in, cfg, device="cpu", dtype=None, *, decoder=True)`` on fusedsae's ops.

    Parameters as sparsify: ``encoder.weight [M, d_in]``, ``encoder.bias [M]``, ``W_dec [M, d_in]`` (None when
    ``decoder=False``), ``b_dec [d_in]``, ``W_skip [d_in, d_in]`` or None. ``encoder.weight.t()`` is the SAELens /
    fusedsae ``W_enc [d_in, M]``: a view, so no copy is made per call.
    """

    #: True reproduces sparsify 1.3's gradients: AuxK and Multi-TopK train the decoder only (see module doc).
    exact_sparsify_gradients: bool = False

    def __init__(
        self,
        d_in: int,
        cfg: SparseCoderConfig | Any,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        decoder: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, SparseCoderConfig):  # sparsify's own config object, or a dict
            cfg = SparseCoderConfig.from_dict(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg))
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
            raise ValueError(f"d_in must be a positive integer, got {d_in!r}")
        self.cfg = cfg
        self.d_in = d_in
        self.num_latents = cfg.num_latents or d_in * cfg.expansion_factor
        if cfg.k > self.num_latents:
            raise ValueError(f"k={cfg.k} is larger than num_latents={self.num_latents}")
        self.encoder = nn.Linear(d_in, self.num_latents, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        self.W_dec: nn.Parameter | None
        if decoder:
            if cfg.transcode:
                self.W_dec = nn.Parameter(torch.zeros_like(self.encoder.weight.data))
            else:
                self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
                if cfg.normalize_decoder:
                    self.set_decoder_norm_to_unit_norm()
        else:
            self.W_dec = None
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_in, device=device, dtype=dtype)) if cfg.skip_connection else None

    # -------------------------------------------------------------------------------------------------------------
    # files (sparsify's folder format)
    # -------------------------------------------------------------------------------------------------------------

    @staticmethod
    def load_from_disk(
        path: str | os.PathLike[str], device: str | torch.device = "cpu", *, decoder: bool = True
    ) -> SparseCoder:
        """Reads a sparsify folder (``cfg.json`` + ``sae.safetensors``); the dtype is that of the stored tensors."""
        folder = Path(path)
        raw = read_json(folder / CFG_FILE) if (folder / CFG_FILE).is_file() else None
        if raw is None:
            raise SAEFormatError(f"{folder} has no {CFG_FILE}: it is not a sparsify SparseCoder folder")
        if "d_in" not in raw:
            raise SAEFormatError(f"{folder / CFG_FILE} has no d_in: it is not a sparsify SparseCoder config")
        raw = dict(raw)
        d_in = int(raw.pop("d_in"))
        tensors = read_safetensors(folder / WEIGHTS_FILE)
        if "encoder.weight" not in tensors:
            raise SAEFormatError(f"{folder / WEIGHTS_FILE} has no encoder.weight")
        coder = SparseCoder(
            d_in,
            SparseCoderConfig.from_dict(raw),
            device=device,
            dtype=tensors["encoder.weight"].dtype,
            decoder=decoder,
        )
        assign_weights(coder, tensors, str(folder / WEIGHTS_FILE), check_finite=False)
        return coder

    @staticmethod
    def load_many(
        name: str | os.PathLike[str],
        local: bool = True,
        layers: list[str] | None = None,
        device: str | torch.device = "cpu",
        *,
        decoder: bool = True,
    ) -> dict[str, SparseCoder]:
        """Loads every layer folder of a sparsify root (or those named in ``layers``), sorted by name."""
        if not local:
            raise ValueError("fusedsae.compat.sparsify loads local folders only (local=True); download the repo first")
        from fusedsae.formats import sparsify_layers

        root = Path(name)
        names = layers if layers is not None else sparsify_layers(root)
        return {layer: SparseCoder.load_from_disk(root / layer, device=device, decoder=decoder) for layer in names}

    @staticmethod
    def load_from_hub(*args: Any, **kwargs: Any) -> SparseCoder:
        raise RuntimeError("fusedsae does not download models; fetch the folder and use SparseCoder.load_from_disk")

    def save_to_disk(self, path: str | os.PathLike[str]) -> None:
        """Writes ``cfg.json`` ({**cfg, "d_in"}) and ``sae.safetensors`` exactly as sparsify does."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / WEIGHTS_FILE, dict(self.state_dict()))
        atomic_write(folder / CFG_FILE, json.dumps({**self.cfg.to_dict(), "d_in": self.d_in}))

    # -------------------------------------------------------------------------------------------------------------
    # maths
    # -------------------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    def _encoder_args(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        x = x.to(self.dtype)
        return x, self.encoder.weight.t(), self.encoder.bias, None if self.cfg.transcode else self.b_dec

    def _decoder(self) -> Tensor:
        if self.W_dec is None:
            raise RuntimeError("this SparseCoder was built with decoder=False; it has no W_dec to decode with")
        return self.W_dec

    def encode(self, x: Tensor) -> EncoderOutput:
        """``x [..., d_in]`` → top-k of ``relu(x W^T + b)`` (``x - b_dec`` unless transcoding)."""
        x, W_enc, b_enc, b_dec = self._encoder_args(x)
        pre_acts = F.relu_encode(x, W_enc, b_enc, b_dec)
        flat = pre_acts.reshape(-1, self.num_latents)
        values, indices = F.row_topk(flat, self.cfg.k)
        lead = pre_acts.shape[:-1]
        return EncoderOutput(values.reshape(*lead, -1), indices.reshape(*lead, -1), pre_acts)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """``[..., k]`` sparse codes → ``[..., d_in]``: ``Σ_j top_acts_j · W_dec[top_indices_j] + b_dec``."""
        return F.sparse_decode(top_acts.to(self.dtype), top_indices, self._decoder(), self.b_dec)

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        dead_mask: Tensor | None = None,
        total_variance: Tensor | None = None,
    ) -> ForwardOutput:
        """sparsify's training forward: reconstruction of ``y`` (default ``x``), FVU, AuxK over ``dead_mask
        [M]`` (bool; the top ``d_out // 2`` dead latents' pre-activations reconstruct the detached residual,
        scaled by ``min(n_dead / k_aux, 1)`` and divided by the total variance) and the Multi-TopK FVU (4k)."""
        x, W_enc, b_enc, b_dec = self._encoder_args(x)
        if y is None:
            y = x
        W_dec = self._decoder()
        k_aux = num_dead = 0
        if dead_mask is not None:
            num_dead = int(dead_mask.sum())
            k_aux = min(y.shape[-1] // 2, num_dead)
        code = F.topk_encode(x, W_enc, b_enc, b_dec, k=self.cfg.k, aux_k=k_aux, aux_mask=dead_mask if k_aux else None)
        sae_out = F.sparse_decode(code.values, code.indices, W_dec, self.b_dec)
        if self.W_skip is not None:
            sae_out = sae_out + x @ self.W_skip.mT
        e = y - sae_out
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()
        if k_aux:
            aux_values = code.aux_values.detach() if self.exact_sparsify_gradients else code.aux_values
            e_hat = F.sparse_decode(aux_values, code.aux_indices, W_dec, None)
            scale = min(num_dead / (y.shape[-1] // 2), 1.0)
            auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = sae_out.new_tensor(0.0)
        fvu = e.pow(2).sum() / total_variance
        if self.cfg.multi_topk:
            wide = F.topk_encode(x, W_enc, b_enc, b_dec, k=min(4 * self.cfg.k, self.num_latents))
            wide_values = wide.values.detach() if self.exact_sparsify_gradients else wide.values
            multi_out = F.sparse_decode(wide_values, wide.indices, W_dec, self.b_dec)
            multi_topk_fvu = (multi_out - y).pow(2).sum() / total_variance
        else:
            multi_topk_fvu = sae_out.new_tensor(0.0)
        return ForwardOutput(sae_out, code.values, code.indices, fvu, auxk_loss, multi_topk_fvu)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        W_dec = self._decoder()
        eps = torch.finfo(W_dec.dtype).eps
        W_dec.data /= torch.norm(W_dec.data, dim=1, keepdim=True) + eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        W_dec = self._decoder()
        if W_dec.grad is None:
            raise RuntimeError("W_dec has no gradient yet; call backward() first")
        parallel = (W_dec.grad * W_dec.data).sum(1, keepdim=True)
        W_dec.grad -= parallel * W_dec.data

    # -------------------------------------------------------------------------------------------------------------
    # conversion
    # -------------------------------------------------------------------------------------------------------------

    def to_fusedsae(self) -> Any:
        """This coder as a :class:`fusedsae.SparseAutoencoder` (TopK; a copy): a transcoder (``transcode``)
        becomes one with ``d_out = d_in`` and an uncentred input, a skip connection ``skip_connection=True`` with
        the same ``W_skip``."""
        from fusedsae.sae import SparseAutoencoder

        sae = SparseAutoencoder(
            d_in=self.d_in,
            d_sae=self.num_latents,
            activation="topk",
            k=self.cfg.k,
            d_out=self.d_in if self.cfg.transcode else None,
            skip_connection=self.W_skip is not None,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            normalize_decoder=self.cfg.normalize_decoder,
            metadata={"source": "sparsify"},
        )
        with torch.no_grad():
            sae.W_enc.copy_(self.encoder.weight.t())
            sae.b_enc.copy_(self.encoder.bias)
            sae.W_dec.copy_(self._decoder())
            sae.b_dec.copy_(self.b_dec)
            if sae.W_skip is not None:
                sae.W_skip.copy_(self.W_skip)
        return sae

    @staticmethod
    def from_fusedsae(sae: Any) -> SparseCoder:
        """A :class:`fusedsae.SparseAutoencoder` as sparsify's coder (a copy), for sparsify's folder format
        (:meth:`save_to_disk`). sparsify models TopK only, transcoders only with ``d_out = d_in`` (``transcode``:
        the input not centred) and SAEs only with a centred input; anything else raises ``ValueError`` naming
        why."""
        cfg = sae.cfg
        if cfg.activation != "topk" or cfg.matryoshka_widths:
            raise ValueError(
                f"sparsify's format holds TopK coders only; this SAE is {cfg.activation}"
                + (" with matryoshka_widths" if cfg.matryoshka_widths else "")
                + "; save it in SAELens's format (sae.save(path))"
            )
        if cfg.is_transcoder and cfg.d_out != cfg.d_in:
            raise ValueError(
                f"sparsify's transcoders reconstruct an output as wide as their input; this one maps d_in={cfg.d_in} "
                f"to d_out={cfg.d_out}; save it in SAELens's format (sae.save(path))"
            )
        if not cfg.is_transcoder and not cfg.apply_b_dec_to_input:
            raise ValueError(
                "sparsify's SAEs always centre their input by b_dec; this SAE has apply_b_dec_to_input=False; save it "
                "in SAELens's format (sae.save(path))"
            )
        coder_cfg = SparseCoderConfig(
            num_latents=cfg.d_sae,
            k=int(cfg.k),
            normalize_decoder=bool(cfg.normalize_decoder),
            skip_connection=cfg.skip_connection,
            transcode=cfg.is_transcoder,
        )
        coder = SparseCoder(cfg.d_in, coder_cfg, device=sae.device, dtype=sae.dtype)
        with torch.no_grad():
            coder.encoder.weight.copy_(sae.W_enc.t())
            coder.encoder.bias.copy_(sae.b_enc)
            coder._decoder().copy_(sae.W_dec)
            coder.b_dec.copy_(sae.b_dec)
            if coder.W_skip is not None:
                coder.W_skip.copy_(sae.W_skip)
        return coder


Sae = SparseCoder

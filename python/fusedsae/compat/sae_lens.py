"""SAELens 6.x's SAE classes on fusedsae's ops: ``from fusedsae.compat.sae_lens import SAE, TopKTrainingSAE, ...``.

Covered (names, fields, defaults and maths as SAELens 6.x):

- configs: ``StandardSAEConfig``, ``TopKSAEConfig``, ``JumpReLUSAEConfig``, ``GatedSAEConfig`` (inference) and
  ``StandardTrainingSAEConfig``, ``TopKTrainingSAEConfig``, ``BatchTopKTrainingSAEConfig``,
  ``MatryoshkaBatchTopKTrainingSAEConfig``, ``JumpReLUTrainingSAEConfig`` (training), with ``architecture()``,
  ``to_dict``, ``from_dict`` and ``metadata`` (:class:`SAEMetadata`: ``cfg.metadata.hook_name``, missing keys
  read as None);
- ``SAE`` / ``TrainingSAE`` and one class per architecture (``StandardSAE``, ``TopKSAE``, ``JumpReLUSAE``,
  ``GatedSAE``, ``StandardTrainingSAE``, ``TopKTrainingSAE``, ``BatchTopKTrainingSAE``,
  ``MatryoshkaBatchTopKTrainingSAE``, ``JumpReLUTrainingSAE``),
  constructible from these configs, from SAELens's own config objects, or from dicts (``SAE.from_dict``);
- ``encode``, ``decode``, ``forward`` (with ``use_error_term``), ``encode_with_hidden_pre``,
  ``training_forward_pass(TrainStepInput)`` → :class:`TrainStepOutput` (``sae_in``, ``sae_out``,
  ``feature_acts``, ``hidden_pre``, ``loss``, ``losses`` with SAELens's keys, ``metrics``), ``get_coefficients``,
  ``fold_W_dec_norm``, ``fold_activation_norm_scaling_factor``, ``run_time_activation_norm_fn_in/out``
  (``constant_norm_rescale``, ``layer_norm``), ``hook_z`` reshaping, ``save_model`` / ``save_inference_model`` /
  ``load_from_disk`` in SAELens's folder format (SAELens reads ours and we read its), ``log_histograms``, and
  ``.to(dtype/device)`` keeping ``cfg.dtype``/``cfg.device`` in step.

Not covered, and why: TransformerLens ``HookPoint``s and ``HookedSAETransformer`` (hook points would force the
dense activations the fused kernels avoid; splice the SAE in with your own forward hook), ``from_pretrained``
(fusedsae never downloads; fetch the folder and call ``load_from_disk``), transcoder *training* (SAELens trains
none; its four transcoder classes are covered for inference and files), Matryoshka's ``use_matryoshka_aux_loss``
and the newer research architectures, ``covariance_whitening``, JumpReLU's ``pre_act_loss_coefficient`` and
``jumprelu_ste_to_input=True`` (refused at construction with that reason), gated *training* (gated folders load
for inference), and ``use_sparse_activations`` (the sparse path is what fusedsae always runs).

Where it goes through the fused kernels: TopK and BatchTopK ``training_forward_pass`` and ``forward`` run the
fused encoder + selection (+ AuxK selection among dead latents) and the sparse decoder without forming the
``[N, d_sae]`` pre-activation. ``TrainStepOutput.hidden_pre`` is then computed only if read, from the weights at
that moment (read it before ``optimizer.step()``), detached. ``rescale_acts_by_decoder_norm`` is applied exactly
(selection on ``pre * ‖W_dec row‖``, decoding ``acts / ‖W_dec row‖``) by scaling the encoder's columns, which
keeps the fused op and its gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from fusedsae import functional as F
from fusedsae.config import check_matryoshka_widths, dtype_from_name, dtype_name
from fusedsae.formats import (
    CFG_FILE,
    MATRYOSHKA_ARCHITECTURE,
    SAE_LENS_SCHEMA_VERSION,
    WEIGHTS_FILE,
    SAEFormatError,
    assign_weights,
    atomic_write,
    read_json,
    read_safetensors,
    upgrade_sae_lens_config,
    write_safetensors,
)

NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


class SAEMetadata:
    """SAELens's metadata object: attribute and item access, and any key never set reads as None."""

    def __init__(self, **kwargs: Any) -> None:
        self.sae_lens_version = kwargs.pop("sae_lens_version", SAE_LENS_SCHEMA_VERSION)
        self.sae_lens_training_version = kwargs.pop("sae_lens_training_version", SAE_LENS_SCHEMA_VERSION)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # keep copy/pickle protocols working
            raise AttributeError(name)
        return None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.__dict__

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    def keys(self) -> Any:
        return self.__dict__.keys()

    def values(self) -> Any:
        return self.__dict__.values()

    def items(self) -> Any:
        return self.__dict__.items()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEMetadata:
        return cls(**data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SAEMetadata) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        return f"SAEMetadata({self.__dict__})"

    def __deepcopy__(self, memo: dict[int, Any]) -> SAEMetadata:
        return SAEMetadata(**copy.deepcopy(self.__dict__, memo))


def _metadata(value: Any) -> SAEMetadata:
    if isinstance(value, SAEMetadata):
        return value
    if value is None:
        return SAEMetadata()
    if isinstance(value, dict):
        return SAEMetadata(**value)
    if hasattr(value, "to_dict"):  # SAELens's own SAEMetadata
        return SAEMetadata(**value.to_dict())
    raise TypeError(f"metadata must be a dict or SAEMetadata, got {type(value).__name__}")


# -------------------------------------------------------------------------------------------------------------------
# configs
# -------------------------------------------------------------------------------------------------------------------


@dataclass
class SAEConfig:
    """Fields every SAELens 6.x config has. ``architecture()`` names the SAE class (``cfg.json``'s key)."""

    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    metadata: SAEMetadata = field(default_factory=SAEMetadata)

    @classmethod
    def architecture(cls) -> str:
        raise NotImplementedError(f"{cls.__name__} is abstract; use one of the architecture configs")

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_name(self.dtype)
        self.dtype = dtype_name(dtype_from_name(self.dtype))
        self.device = str(self.device)
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported; use one of {NORMALIZATIONS}"
            )
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(f"reshape_activations must be 'none' or 'hook_z', got {self.reshape_activations!r}")
        self.metadata = _metadata(self.metadata)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["metadata"] = self.metadata.to_dict()
        out["architecture"] = self.architecture()
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> SAEConfig:
        """The config of ``config_dict["architecture"]`` (inference registry); unknown keys are dropped."""
        return _config_from_dict(config_dict, training=False, expected=cls)


@dataclass
class StandardSAEConfig(SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "standard"


@dataclass
class TopKSAEConfig(SAEConfig):
    k: int = 100
    rescale_acts_by_decoder_norm: bool = False

    @classmethod
    def architecture(cls) -> str:
        return "topk"


@dataclass
class JumpReLUSAEConfig(SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu"


@dataclass
class GatedSAEConfig(SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "gated"


@dataclass
class TranscoderConfig(SAEConfig):
    """SAELens's transcoder config: reads ``x [..., d_in]``, reconstructs ``y [..., d_out]``; the input is never
    centred, so ``apply_b_dec_to_input=True`` is refused (as SAELens refuses it)."""

    d_out: int = 768

    @classmethod
    def architecture(cls) -> str:
        return "transcoder"

    def __post_init__(self) -> None:
        if self.apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input is not supported for transcoders")
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out < 1:
            raise ValueError(f"d_out must be a positive integer, got {self.d_out!r}")
        super().__post_init__()


@dataclass
class SkipTranscoderConfig(TranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "skip_transcoder"


@dataclass
class JumpReLUTranscoderConfig(TranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_transcoder"


@dataclass
class JumpReLUSkipTranscoderConfig(JumpReLUTranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_skip_transcoder"


# transcoder architecture -> the maths of its encoder (the architecture name the methods below branch on)
_TRANSCODER_ACTIVATION = {
    "transcoder": "standard",
    "skip_transcoder": "standard",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
}


@dataclass(kw_only=True)
class TrainingSAEConfig(SAEConfig):
    decoder_init_norm: float | None = 0.1

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TrainingSAEConfig:  # type: ignore[override]
        """The training config of ``config_dict["architecture"]``; unknown keys are dropped."""
        return _config_from_dict(config_dict, training=True, expected=cls)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["metadata"] = {**out["metadata"], "training_architecture": self.architecture()}
        return out

    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        """The inference config (what ``save_inference_model`` writes): the inference class's fields only."""
        inference_cls = _INFERENCE[_INFERENCE_ARCHITECTURE.get(self.architecture(), self.architecture())][1]
        names = {f.name for f in dataclasses.fields(inference_cls)}
        out = {name: getattr(self, name) for name in names}
        out["metadata"] = {**self.metadata.to_dict(), "training_architecture": self.architecture()}
        if self.architecture() == MATRYOSHKA_ARCHITECTURE:  # as SAELens: the widths survive the inference save
            inference_fields = {f.name for f in dataclasses.fields(inference_cls)}
            out["metadata"]["training_architecture_details"] = {
                f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in inference_fields
            }
        out["architecture"] = inference_cls.architecture()
        return out


@dataclass
class StandardTrainingSAEConfig(TrainingSAEConfig):
    l1_coefficient: float = 1.0
    lp_norm: float = 1.0
    l1_warm_up_steps: int = 0

    @classmethod
    def architecture(cls) -> str:
        return "standard"


@dataclass
class TopKTrainingSAEConfig(TrainingSAEConfig):
    k: int = 100
    use_sparse_activations: bool = False
    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True

    @classmethod
    def architecture(cls) -> str:
        return "topk"


@dataclass
class BatchTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    topk_threshold_lr: float = 0.01

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk"


@dataclass
class MatryoshkaBatchTopKTrainingSAEConfig(BatchTopKTrainingSAEConfig):
    """SAELens's ``matryoshka_batchtopk`` (>= 6.15): ``matryoshka_widths`` strictly increasing, ``d_sae`` appended
    when missing (as SAELens does). ``use_matryoshka_aux_loss=True`` (AuxK per level) is not implemented."""

    matryoshka_widths: list[int] = field(default_factory=list)
    use_matryoshka_aux_loss: bool = False

    @classmethod
    def architecture(cls) -> str:
        return MATRYOSHKA_ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.matryoshka_widths:
            raise ValueError("matryoshka_widths must not be empty")
        widths = [int(w) for w in self.matryoshka_widths]
        if widths[-1] != self.d_sae:
            widths.append(self.d_sae)
        self.matryoshka_widths = check_matryoshka_widths(widths, self.d_sae)
        if self.use_matryoshka_aux_loss:
            raise ValueError(
                "use_matryoshka_aux_loss=True is not implemented by fusedsae.compat.sae_lens (AuxK reconstructs the "
                "whole SAE's residual, SAELens's default); leave it False"
            )


@dataclass
class JumpReLUTrainingSAEConfig(TrainingSAEConfig):
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: str = "step"
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    pre_act_loss_coefficient: float | None = None
    jumprelu_tanh_scale: float = 4.0
    jumprelu_ste_to_input: bool = False
    target_l0: float | None = None

    @classmethod
    def architecture(cls) -> str:
        return "jumprelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.jumprelu_sparsity_loss_mode not in ("step", "tanh", "quadratic"):
            raise ValueError(
                f"jumprelu_sparsity_loss_mode must be step, tanh or quadratic, got {self.jumprelu_sparsity_loss_mode!r}"
            )
        if self.jumprelu_sparsity_loss_mode == "quadratic" and self.target_l0 is None:
            raise ValueError("jumprelu_sparsity_loss_mode='quadratic' needs target_l0")
        if self.pre_act_loss_coefficient is not None:
            raise ValueError("pre_act_loss_coefficient is not implemented by fusedsae.compat.sae_lens; leave it None")
        if self.jumprelu_ste_to_input:
            raise ValueError(
                "jumprelu_ste_to_input=True is not implemented by fusedsae.compat.sae_lens (fusedsae's JumpReLU "
                "sends the straight-through gradient to the threshold only, as DeepMind's); leave it False"
            )


def _config_from_dict(config_dict: dict[str, Any], training: bool, expected: type) -> SAEConfig:
    if not isinstance(config_dict, dict):
        raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
    registry = _TRAINING if training else _INFERENCE
    architecture = config_dict.get("architecture", expected.architecture() if expected not in _BASES else None)
    if architecture not in registry:
        kind = "training" if training else "inference"
        raise ValueError(
            f"architecture {architecture!r} has no {kind} class in fusedsae.compat.sae_lens (it has "
            f"{', '.join(sorted(registry))})"
        )
    cfg_cls = registry[architecture][1]
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    cfg = cfg_cls(**{k: v for k, v in config_dict.items() if k in names and k != "metadata"})
    cfg.metadata = _metadata(config_dict.get("metadata"))
    if not isinstance(cfg, expected):
        raise ValueError(f"a {architecture!r} config is a {cfg_cls.__name__}, not a {expected.__name__}")
    return cfg


def as_config(cfg: Any, training: bool) -> SAEConfig:
    """Our config for ``cfg``: one of ours (returned as is), a dict, or a SAELens config object (its ``to_dict``)."""
    if isinstance(cfg, SAEConfig):
        return cfg
    if isinstance(cfg, dict):
        return _config_from_dict(cfg, training, TrainingSAEConfig if training else SAEConfig)
    if hasattr(cfg, "to_dict") and hasattr(cfg, "architecture"):
        data = cfg.to_dict()
        data["architecture"] = cfg.architecture()
        return _config_from_dict(data, training, TrainingSAEConfig if training else SAEConfig)
    raise TypeError(f"cfg must be a SAELens config object, one of ours, or a dict; got {type(cfg).__name__}")


# -------------------------------------------------------------------------------------------------------------------
# training-step types
# -------------------------------------------------------------------------------------------------------------------


class TrainCoefficientConfig(NamedTuple):
    value: float
    warm_up_steps: int


@dataclass
class TrainStepInput:
    """What SAELens's trainer hands ``training_forward_pass``: ``sae_in [N, d_in]``, the current coefficients
    (``{"l1": ...}`` or ``{"l0": ...}``), ``dead_neuron_mask [d_sae]`` bool or None, the step number."""

    sae_in: Tensor
    coefficients: dict[str, float]
    dead_neuron_mask: Tensor | None
    n_training_steps: int = 0
    is_logging_step: bool = False


class TrainStepOutput:
    """SAELens's ``TrainStepOutput`` fields: ``sae_in``, ``sae_out``, ``feature_acts [N, d_sae]``, ``hidden_pre``,
    ``loss``, ``losses`` (``mse_loss`` + ``l1_loss`` / ``auxiliary_reconstruction_loss`` / ``l0_loss``), ``metrics``.

    ``hidden_pre`` may be computed on first read (fused TopK paths never form it); it is then detached.
    """

    def __init__(
        self,
        sae_in: Tensor,
        sae_out: Tensor,
        feature_acts: Tensor,
        hidden_pre: Tensor | Callable[[], Tensor],
        loss: Tensor,
        losses: dict[str, Tensor],
        metrics: dict[str, Any] | None = None,
    ) -> None:
        self.sae_in = sae_in
        self.sae_out = sae_out
        self.feature_acts = feature_acts
        self._hidden_pre = hidden_pre
        self.loss = loss
        self.losses = losses
        self.metrics = {} if metrics is None else metrics

    @property
    def hidden_pre(self) -> Tensor:
        if callable(self._hidden_pre):
            self._hidden_pre = self._hidden_pre()
        return self._hidden_pre


# -------------------------------------------------------------------------------------------------------------------
# the SAE
# -------------------------------------------------------------------------------------------------------------------


class SAE(nn.Module):
    """SAELens's ``SAE`` on fusedsae's ops. ``SAE(cfg)`` builds the class of ``cfg.architecture()``;
    ``SAE.from_dict``, ``SAE.load_from_disk`` too.

    Parameters (SAELens names and shapes): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]`` (not gated),
    ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``; JumpReLU ``threshold [d_sae]``; gated ``b_gate``, ``r_mag``,
    ``b_mag [d_sae]``; BatchTopK (training) the buffer ``topk_threshold`` (0-dim float64). Transcoders (inference,
    as SAELens 6.x: ``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``):
    ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, skip ones ``W_skip [d_out, d_in]`` (``forward`` adds
    ``x @ W_skip.T``; ``decode`` does not); no input centring, no hook_z reshaping and no output de-normalisation
    (SAELens's transcoders do neither).
    """

    cfg: Any
    _training_class: ClassVar[bool] = False

    def __new__(cls, cfg: Any = None, *args: Any, **kwargs: Any) -> SAE:
        if cls in (SAE, TrainingSAE) and cfg is not None:
            config = as_config(cfg, training=cls is TrainingSAE)
            registry = _TRAINING if cls is TrainingSAE else _INFERENCE
            cls = registry[config.architecture()][0]
        return super().__new__(cls)

    def __init__(self, cfg: Any, use_error_term: bool = False) -> None:
        super().__init__()
        cfg = as_config(cfg, training=self._training_class)
        expected = (_TRAINING if self._training_class else _INFERENCE)[cfg.architecture()][0]
        if not isinstance(self, expected):
            raise ValueError(f"a {cfg.architecture()!r} config builds a {expected.__name__}, not {type(self).__name__}")
        self.cfg = cfg
        self.use_error_term = use_error_term
        #: a transcoder's architecture name; None for an SAE
        self.transcoder = cfg.architecture() if cfg.architecture() in _TRANSCODER_ACTIVATION else None
        # the maths to run: a Matryoshka BatchTopK SAE is a BatchTopK SAE plus inner losses in training; a
        # transcoder runs its encoder's (standard or jumprelu)
        arch = cfg.architecture()
        self.architecture = _RUNS_AS.get(arch, _TRANSCODER_ACTIVATION.get(arch, arch))
        self._hook_z = cfg.reshape_activations == "hook_z" and not self._training_class and not self.transcoder
        self.d_head: int | None = None
        self.d_out = int(getattr(cfg, "d_out", cfg.d_in))
        factory = {"dtype": dtype_from_name(cfg.dtype), "device": cfg.device}
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **factory))
        w_dec = torch.empty(cfg.d_sae, self.d_out, **factory)
        nn.init.kaiming_uniform_(w_dec)
        init_norm = getattr(cfg, "decoder_init_norm", None)
        if init_norm is not None:
            w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * init_norm
        self.W_dec = nn.Parameter(w_dec)
        if self.transcoder:  # input and output are different spaces: SAELens draws the encoder on its own
            w_enc = torch.empty(cfg.d_in, cfg.d_sae, **factory)
            nn.init.kaiming_uniform_(w_enc)
            self.W_enc = nn.Parameter(w_enc)
        else:
            self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.W_skip: nn.Parameter | None = None
        if self.transcoder and "skip" in self.transcoder:
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, cfg.d_in, **factory))
        if self.architecture == "gated":
            self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
            self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
            self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
        else:
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
        if self.architecture == "jumprelu":
            init = getattr(cfg, "jumprelu_init_threshold", 0.0)
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(init), **factory))
        if self.architecture == "batchtopk":
            self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.float64, device=cfg.device))
        self._setup_activation_normalization()

    # ---------------------------------------------------------------------------------------------------------------
    # dtype / device follow the parameters
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def _apply(self, fn: Any, recurse: bool = True) -> SAE:
        out = super()._apply(fn, recurse)
        self.cfg.dtype = dtype_name(self.W_dec.dtype)
        self.cfg.device = str(self.W_dec.device)
        return out

    # ---------------------------------------------------------------------------------------------------------------
    # run-time input normalisation and hook_z reshaping (SAELens semantics)
    # ---------------------------------------------------------------------------------------------------------------

    def _setup_activation_normalization(self) -> None:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":

            def norm_in(x: Tensor) -> Tensor:
                self.x_norm_coeff = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True)
                return x * self.x_norm_coeff

            def norm_out(x: Tensor) -> Tensor:
                x = x / self.x_norm_coeff
                del self.x_norm_coeff
                return x

        elif mode == "layer_norm":

            def norm_in(x: Tensor, eps: float = 1e-5) -> Tensor:
                mu = x.mean(dim=-1, keepdim=True)
                x = x - mu
                std = x.std(dim=-1, keepdim=True)
                self.ln_mu, self.ln_std = mu, std
                return x / (std + eps)

            def norm_out(x: Tensor, eps: float = 1e-5) -> Tensor:
                x = x * self.ln_std + self.ln_mu
                del self.ln_mu, self.ln_std
                return x

        else:

            def norm_in(x: Tensor) -> Tensor:
                return x

            def norm_out(x: Tensor) -> Tensor:
                return x

        self.run_time_activation_norm_fn_in = norm_in
        self.run_time_activation_norm_fn_out = norm_out

    def _sae_in(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        """``x`` as the encoder sees it, flattened to ``[N, d_in]`` (the input centring by ``b_dec`` happens
        inside the fused ops), and the leading shape to restore."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        x = x.to(self.dtype)
        if self._hook_z:
            self.d_head = x.shape[-1]
            x = x.flatten(-2)
        lead = x.shape[:-1]
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"x has shape {tuple(x.shape)} but this SAE takes [..., d_in={self.cfg.d_in}]")
        x = self.run_time_activation_norm_fn_in(x)
        return x.reshape(-1, self.cfg.d_in), lead

    def _sae_out(self, out: Tensor, lead: torch.Size) -> Tensor:
        if self.transcoder:  # SAELens's transcoders undo no normalisation: the output is another activation
            return out.reshape(*lead, self.d_out)
        out = self.run_time_activation_norm_fn_out(out.reshape(*lead, self.cfg.d_in))
        if self._hook_z and self.d_head is not None:
            out = out.unflatten(-1, (-1, self.d_head))
        return out

    @property
    def _b_dec_in(self) -> Tensor | None:
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    # ---------------------------------------------------------------------------------------------------------------
    # maths
    # ---------------------------------------------------------------------------------------------------------------

    def _rescales(self) -> bool:
        return self.architecture in ("topk", "batchtopk") and bool(self.cfg.rescale_acts_by_decoder_norm)

    def _topk_encoder(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(W_enc, b_enc, ‖W_dec row‖ or None): with ``rescale_acts_by_decoder_norm`` the columns are scaled so
        that the fused op selects on ``pre * ‖W_dec row‖`` exactly as SAELens does."""
        if not self._rescales():
            return self.W_enc, self.b_enc, None
        norms = self.W_dec.norm(dim=-1)
        return self.W_enc * norms, self.b_enc * norms, norms

    def _threshold(self) -> Tensor:
        return self.threshold.to(self.dtype)

    def _bandwidth(self) -> float:
        return float(getattr(self.cfg, "jumprelu_bandwidth", 0.05))

    def _gated(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        gate = F.encode_pre(x2, self.W_enc, self.b_gate, self._b_dec_in)
        mag_pre = F.encode_pre(x2, self.W_enc * self.r_mag.exp(), self.b_mag, self._b_dec_in)
        return (gate > 0).to(self.dtype) * torch.relu(mag_pre), mag_pre

    def _encode_flat(self, x2: Tensor) -> Tensor:
        arch = self.architecture
        if arch == "standard":
            return F.relu_encode(x2, self.W_enc, self.b_enc, self._b_dec_in)
        if arch == "jumprelu":
            return F.jumprelu_encode(x2, self.W_enc, self.b_enc, self._b_dec_in, self._threshold(), self._bandwidth())
        if arch == "gated":
            return self._gated(x2)[0]
        W, b, _ = self._topk_encoder()
        encode = F.topk_encode if arch == "topk" else F.batchtopk_encode
        code = encode(x2, W, b, self._b_dec_in, k=int(self.cfg.k))
        return F.to_dense(code.values, code.indices, self.cfg.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations ``[..., d_in] -> [..., d_sae]`` (hook_z: ``[..., n_heads, d_head]`` in)."""
        x2, lead = self._sae_in(x)
        return self._encode_flat(x2).reshape(*lead, self.cfg.d_sae)

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(feature_acts, hidden_pre)``, both ``[..., d_sae]`` and differentiable (TopK: ``hidden_pre`` is the
        pre-activation times ``‖W_dec row‖`` when rescaling, as SAELens returns it)."""
        x2, lead = self._sae_in(x)
        arch = self.architecture
        if arch == "gated":
            acts, pre = self._gated(x2)
        elif arch in ("topk", "batchtopk"):
            W, b, _ = self._topk_encoder()
            pre = F.encode_pre(x2, W, b, self._b_dec_in)
            if arch == "topk":
                values, indices = F.row_topk(pre, int(self.cfg.k))
                acts = F.to_dense(torch.relu(values), indices, self.cfg.d_sae)
            else:
                code = F.batchtopk_encode(x2, W, b, self._b_dec_in, k=int(self.cfg.k))
                acts = F.to_dense(code.values, code.indices, self.cfg.d_sae)
        else:
            pre = F.encode_pre(x2, self.W_enc, self.b_enc, self._b_dec_in)
            if arch == "standard":
                acts = torch.relu(pre)
            else:
                acts = F.jumprelu(pre, self._threshold(), self._bandwidth())
        return acts.reshape(*lead, -1), pre.reshape(*lead, -1)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``feature_acts [..., d_sae] -> [..., d_in]`` (a transcoder's ``d_out``, without its skip path):
        ``acts @ W_dec + b_dec`` (``acts / ‖W_dec row‖`` first
        when rescaling), then the run-time normalisation is undone."""
        acts = feature_acts.to(self.dtype)
        if self._rescales():
            acts = acts * (1 / self.W_dec.norm(dim=-1))
        lead = acts.shape[:-1]
        return self._sae_out(F.decode(acts, self.W_dec, self.b_dec), lead)

    def _decode_sparse(self, values: Tensor, indices: Tensor, bias: bool = True) -> Tensor:
        if self._rescales():
            values = values / self.W_dec.norm(dim=-1)[indices]
        return F.sparse_decode(values, indices, self.W_dec, self.b_dec if bias else None)

    def _forward_flat(self, x: Tensor) -> Tensor:
        x2, lead = self._sae_in(x)
        if self.architecture == "topk":  # fused encoder + TopK, sparse decoder: [N, d_sae] never formed
            W, b, _ = self._topk_encoder()
            code = F.topk_encode(x2, W, b, self._b_dec_in, k=int(self.cfg.k))
            return self._sae_out(self._decode_sparse(code.values, code.indices), lead)
        acts = self._encode_flat(x2)
        if self._rescales():
            acts = acts * (1 / self.W_dec.norm(dim=-1))
        return self._sae_out(F.decode(acts, self.W_dec, self.b_dec), lead)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction; with ``use_error_term`` the exact error is added, so the output equals ``x``. A
        transcoder returns its prediction of y (skip path included) and has no error term (SAELens's has none)."""
        sae_out = self._forward_flat(x)
        if self.transcoder:
            if self.W_skip is not None:
                sae_out = sae_out + x.to(self.dtype) @ self.W_skip.T
            return sae_out
        if self.use_error_term:
            with torch.no_grad():
                sae_out = sae_out + (x - self._forward_flat(x))
        return sae_out

    # ---------------------------------------------------------------------------------------------------------------
    # folding
    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def get_W_dec_norm(self) -> Tensor:
        return self.W_dec.norm(dim=-1).clamp(min=1e-8)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Unit-norm decoder rows with unchanged reconstructions (encoder, biases and threshold take the norms).
        TopK without ``rescale_acts_by_decoder_norm`` refuses, as SAELens does: selection would change."""
        if self.architecture in ("topk", "batchtopk") and not self._rescales():
            raise NotImplementedError(
                "folding W_dec norms is not safe for TopK SAEs with rescale_acts_by_decoder_norm=False: it may change "
                "which latents are selected"
            )
        norms = self.get_W_dec_norm()
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        for name in ("b_enc", "b_gate", "b_mag"):
            if hasattr(self, name):
                getattr(self, name).mul_(norms)
        if self.architecture == "jumprelu":
            self.threshold.mul_(norms)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        self.W_enc.mul_(scaling_factor)
        self.W_dec.div_(scaling_factor)
        self.b_dec.div_(scaling_factor)
        if self.architecture == "batchtopk" and self._rescales():
            self.topk_threshold /= scaling_factor
        self.cfg.normalize_activations = "none"

    # ---------------------------------------------------------------------------------------------------------------
    # files
    # ---------------------------------------------------------------------------------------------------------------

    def _write(
        self, path: str | os.PathLike[str], tensors: dict[str, Tensor], cfg: dict[str, Any]
    ) -> tuple[Path, Path]:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / WEIGHTS_FILE, tensors)
        atomic_write(folder / CFG_FILE, json.dumps(cfg))
        return folder / WEIGHTS_FILE, folder / CFG_FILE

    def save_model(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Writes ``sae_weights.safetensors`` (the state dict) and ``cfg.json`` (``cfg.to_dict()``), as SAELens;
        returns both paths."""
        return self._write(path, dict(self.state_dict()), self.cfg.to_dict())

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> SAE:
        """A freshly initialised SAE of ``config_dict["architecture"]``."""
        training = issubclass(cls, TrainingSAE)
        cfg = _config_from_dict(config_dict, training, TrainingSAEConfig if training else SAEConfig)
        sae_cls = (_TRAINING if training else _INFERENCE)[cfg.architecture()][0]
        if not issubclass(sae_cls, cls):
            raise ValueError(f"a {cfg.architecture()!r} config builds a {sae_cls.__name__}, not a {cls.__name__}")
        return sae_cls(cfg)

    @classmethod
    def load_from_disk(
        cls,
        path: str | os.PathLike[str],
        device: str = "cpu",
        dtype: str | None = None,
        converter: Any = None,
        fold_W_dec_norm: bool = False,
    ) -> SAE:
        """Reads a SAELens folder (6.x or older ``cfg.json``). ``SAE``/inference classes turn a BatchTopK or
        Matryoshka BatchTopK training folder into the JumpReLU SAE SAELens saves for inference; ``TrainingSAE`` keeps
        training architectures (Matryoshka training is fusedsae's own: ``fusedsae.load`` reads either folder as a
        Matryoshka SAE)."""
        if converter is not None:
            raise ValueError("custom converters are not supported by fusedsae.compat.sae_lens; pass a SAELens folder")
        folder = Path(path)
        if not (folder / CFG_FILE).is_file():
            raise SAEFormatError(f"{folder} has no {CFG_FILE}: it is not a SAELens SAE folder")
        raw = upgrade_sae_lens_config(read_json(folder / CFG_FILE))
        tensors = read_safetensors(folder / WEIGHTS_FILE)
        if "log_threshold" in tensors:  # older JumpReLU training checkpoints
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        training = issubclass(cls, TrainingSAE)
        raw = {**raw, "device": device}
        if dtype is not None:
            raw["dtype"] = dtype
        if not training and raw.get("architecture") in ("batchtopk", MATRYOSHKA_ARCHITECTURE):
            # a Matryoshka BatchTopK training folder serves as the same JumpReLU SAE (its widths only shape training)
            raw, tensors = _batchtopk_as_jumprelu(raw, tensors)
        if not training and raw.get("architecture") not in _INFERENCE:
            raise SAEFormatError(
                f"{folder}: architecture {raw.get('architecture')!r} is not supported by fusedsae.compat.sae_lens "
                f"(it reads {', '.join(sorted({*_INFERENCE, 'batchtopk', MATRYOSHKA_ARCHITECTURE}))})"
            )
        sae = cls.from_dict(raw)
        assign_weights(sae, tensors, str(folder / WEIGHTS_FILE), check_finite=False)
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        return sae

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> SAE:
        raise RuntimeError("fusedsae does not download SAEs; fetch the folder and use SAE.load_from_disk(path)")

    def to_fusedsae(self) -> Any:
        """A :class:`fusedsae.SparseAutoencoder` copy (standard, TopK without rescaling, JumpReLU, BatchTopK)."""
        from fusedsae.sae import SparseAutoencoder

        if self.architecture == "gated" or self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                f"a {self.architecture} SAE with normalize_activations={self.cfg.normalize_activations!r} has no "
                "fusedsae.SparseAutoencoder form"
            )
        activation = {"standard": "relu", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}
        sae = SparseAutoencoder(
            d_in=self.cfg.d_in,
            d_sae=self.cfg.d_sae,
            d_out=self.d_out if self.transcoder else None,
            skip_connection=self.W_skip is not None,
            activation=activation[self.architecture],
            k=getattr(self.cfg, "k", None),
            apply_b_dec_to_input=self.cfg.apply_b_dec_to_input,
            dtype=self.cfg.dtype,
            device=str(self.device),
            normalize_decoder=False,
            matryoshka_widths=getattr(self.cfg, "matryoshka_widths", None),
            metadata=self.cfg.metadata.to_dict(),
        )
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(self, name))
            if self.W_skip is not None:
                sae.W_skip.copy_(self.W_skip)
            if self.architecture == "jumprelu":
                sae.threshold.copy_(self.threshold)
            if self.architecture == "batchtopk":
                sae.threshold.fill_(float(self.topk_threshold))
            if self._rescales():
                sae.fold_W_dec_norm()
        return sae


class TrainingSAE(SAE):
    """SAELens's ``TrainingSAE``: adds ``training_forward_pass``, ``get_coefficients``, ``save_inference_model``."""

    _training_class = True

    def get_coefficients(self) -> dict[str, TrainCoefficientConfig]:
        if self.architecture == "standard":
            return {"l1": TrainCoefficientConfig(self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps)}
        if self.architecture == "jumprelu":
            return {"l0": TrainCoefficientConfig(self.cfg.l0_coefficient, self.cfg.l0_warm_up_steps)}
        return {}

    def training_forward_pass(self, step_input: Any) -> TrainStepOutput:
        """One training step's forward: MSE (summed over d_in, mean over tokens) plus the architecture's terms,
        with SAELens's definitions: ``l1_loss`` = mean over tokens of ``coefficients["l1"] * ‖acts * ‖W_dec
        row‖‖_p``; ``auxiliary_reconstruction_loss`` = ``aux_loss_coefficient * min(n_dead / (d_in // 2), 1)`` ×
        MSE of the top ``d_in // 2`` dead pre-activations decoding the detached residual (no variance
        normalisation, no ``b_dec``); ``l0_loss`` = mean of ``coefficients["l0"]`` × the step-function L0 (or
        tanh / quadratic)."""
        sae_in = step_input.sae_in
        if self.architecture in ("topk", "batchtopk"):
            out = self._sparse_training_forward(step_input)
            if self.architecture == "batchtopk":
                self.update_topk_threshold(out.feature_acts)
                out.metrics["topk_threshold"] = self.topk_threshold
            return out
        if self.architecture == "jumprelu":
            with torch.no_grad():
                self.threshold.clamp_(min=0.0)
        feature_acts, hidden_pre = self.encode_with_hidden_pre(sae_in)
        sae_out = self.decode(feature_acts)
        losses = {"mse_loss": (sae_out - sae_in).pow(2).sum(-1).mean()}
        coefficients = step_input.coefficients
        if self.architecture == "standard":
            weighted = feature_acts * self.W_dec.norm(dim=1)
            sparsity = weighted.norm(p=self.cfg.lp_norm, dim=-1)
            losses["l1_loss"] = (coefficients["l1"] * sparsity).mean()
        else:
            mode = self.cfg.jumprelu_sparsity_loss_mode
            if mode == "tanh":
                per_item = torch.tanh(self.cfg.jumprelu_tanh_scale * feature_acts * self.W_dec.norm(dim=1)).sum(-1)
            else:
                l0 = F.step(hidden_pre, self._threshold(), self._bandwidth()).sum(-1)
                target = self.cfg.target_l0
                per_item = 2 / target * (l0 - target) ** 2 if mode == "quadratic" else l0
            losses["l0_loss"] = (coefficients["l0"] * per_item).mean()
        loss = sum(losses.values(), torch.zeros((), dtype=sae_out.dtype, device=sae_out.device))
        return TrainStepOutput(sae_in, sae_out, feature_acts, hidden_pre, loss, losses)

    def _sparse_training_forward(self, step_input: Any) -> TrainStepOutput:
        sae_in = step_input.sae_in
        x2, lead = self._sae_in(sae_in)
        W, b, _ = self._topk_encoder()
        dead = step_input.dead_neuron_mask
        num_dead = int(dead.sum()) if dead is not None else 0
        k_aux = min(self.cfg.d_in // 2, num_dead)
        if k_aux and self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                f"the TopK auxiliary loss does not support normalize_activations={self.cfg.normalize_activations!r}"
            )
        encode = F.topk_encode if self.architecture == "topk" else F.batchtopk_encode
        code = encode(
            x2, W, b, self._b_dec_in, k=int(self.cfg.k), aux_k=k_aux, aux_mask=dead if k_aux else None, aux_relu=False
        )
        sae_out = self._sae_out(self._decode_sparse(code.values, code.indices), lead)
        losses = {"mse_loss": (sae_out - sae_in).pow(2).sum(-1).mean()}
        if k_aux:
            residual = (sae_in - sae_out).detach().reshape(-1, self.cfg.d_in)
            recons = self._decode_sparse(code.aux_values, code.aux_indices, bias=False)
            scale = min(num_dead / (self.cfg.d_in // 2), 1.0)
            aux = (recons - residual).pow(2).sum(-1).mean()
            losses["auxiliary_reconstruction_loss"] = self.cfg.aux_loss_coefficient * scale * aux
        else:
            losses["auxiliary_reconstruction_loss"] = sae_out.new_tensor(0.0)
        feature_acts = F.to_dense(code.values, code.indices, self.cfg.d_sae).reshape(*lead, -1)
        loss = losses["mse_loss"] + losses["auxiliary_reconstruction_loss"]

        def hidden_pre() -> Tensor:
            with torch.no_grad():
                W_now, b_now, _ = self._topk_encoder()
                return F.encode_pre(x2, W_now, b_now, self._b_dec_in).reshape(*lead, -1)

        return TrainStepOutput(sae_in, sae_out, feature_acts, hidden_pre, loss, losses)

    @torch.no_grad()
    def update_topk_threshold(self, acts_topk: Tensor) -> None:
        """BatchTopK's inference threshold: EMA (rate ``topk_threshold_lr``, from 0) of the smallest positive
        activation of each training batch, in float64, as SAELens."""
        positive = acts_topk[acts_topk > 0]
        if positive.numel():
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * positive.min().to(self.topk_threshold.dtype)

    def save_inference_model(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Writes the inference form: TopK/BatchTopK decoder norms folded in when rescaling, BatchTopK as JumpReLU
        with ``threshold`` = the scalar ``topk_threshold`` repeated (SAELens's own conversion)."""
        tensors = dict(self.state_dict())
        cfg = self.cfg.get_inference_sae_cfg_dict()
        if self._rescales():
            norms = self.get_W_dec_norm()
            tensors["W_enc"] = tensors["W_enc"] * norms[None, :]
            tensors["b_enc"] = tensors["b_enc"] * norms
            tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
            cfg["rescale_acts_by_decoder_norm"] = False
        if self.architecture == "batchtopk":
            tensors["threshold"] = torch.ones_like(self.b_enc) * float(tensors.pop("topk_threshold"))
            cfg.pop("rescale_acts_by_decoder_norm", None)
        return self._write(path, tensors, cfg)

    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        out = {"weights/W_dec_norms": self.W_dec.detach().float().norm(dim=1).cpu().numpy()}
        if hasattr(self, "b_enc"):
            out["weights/b_e"] = self.b_enc.detach().float().cpu().numpy()
        return out

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec.grad is None:
            raise RuntimeError("W_dec has no gradient yet; call backward() first")
        unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad -= (self.W_dec.grad * unit).sum(1, keepdim=True) * unit


def _batchtopk_as_jumprelu(raw: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A SAELens BatchTopK training folder as the JumpReLU SAE SAELens saves for inference: decoder norms folded
    when it rescaled by them, the scalar ``topk_threshold`` repeated over latents."""
    tensors = dict(tensors)
    if "topk_threshold" not in tensors:
        raise SAEFormatError("a batchtopk folder must hold topk_threshold (SAELens's BatchTopK training checkpoint)")
    threshold = float(tensors.pop("topk_threshold"))
    if raw.get("rescale_acts_by_decoder_norm", True):
        norms = tensors["W_dec"].norm(dim=-1).clamp(min=1e-8)
        tensors["W_enc"] = tensors["W_enc"] * norms[None, :]
        tensors["b_enc"] = tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    tensors["threshold"] = torch.full_like(tensors["b_enc"], threshold)
    return {**raw, "architecture": "jumprelu"}, tensors


_INFERENCE_ARCHITECTURE = {"batchtopk": "jumprelu", MATRYOSHKA_ARCHITECTURE: "jumprelu"}
_RUNS_AS = {MATRYOSHKA_ARCHITECTURE: "batchtopk"}


class StandardSAE(SAE):
    pass


class TopKSAE(SAE):
    pass


class JumpReLUSAE(SAE):
    pass


class GatedSAE(SAE):
    """Inference only: ``acts = 1[x W_enc + b_gate > 0] * relu(x (W_enc ∘ exp(r_mag)) + b_mag)``."""

    @torch.no_grad()
    def magnitude_path(self, n_heads: int | None = None) -> Any:
        """The gated SAE's magnitude path as a ReLU :class:`fusedsae.SparseAutoencoder` (``W_enc ∘ exp(r_mag)``,
        ``b_mag``, the same ``W_dec``, ``b_dec``): wherever the gate is open its activations are the gated SAE's,
        so :func:`fusedsae.analysis.head_contributions` on it attributes every active gated latent exactly (keep
        the latents with ``self.encode(z) != 0``: the gate decides which fire, the magnitude path how much).
        ``n_heads``: for SAEs on concatenated attention outputs."""
        from fusedsae.sae import SparseAutoencoder

        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                f"normalize_activations={self.cfg.normalize_activations!r} rescales each input at run time, so the "
                "magnitude path is not a fixed SparseAutoencoder"
            )
        sae = SparseAutoencoder(
            d_in=self.cfg.d_in,
            d_sae=self.cfg.d_sae,
            activation="relu",
            n_heads=n_heads,
            apply_b_dec_to_input=self.cfg.apply_b_dec_to_input,
            dtype=self.cfg.dtype,
            device=str(self.device),
            normalize_decoder=False,
            metadata=self.cfg.metadata.to_dict(),
        )
        sae.W_enc.copy_(self.W_enc * self.r_mag.exp())
        sae.b_enc.copy_(self.b_mag)
        sae.W_dec.copy_(self.W_dec)
        sae.b_dec.copy_(self.b_dec)
        return sae.eval()


class Transcoder(SAE):
    """``f(x) = relu(x W_enc + b_enc) W_dec + b_dec``, ``[..., d_in] -> [..., d_out]``."""


class SkipTranscoder(Transcoder):
    """A :class:`Transcoder` whose ``forward`` adds ``x @ W_skip.T`` (``W_skip [d_out, d_in]``, zeros at first)."""


class JumpReLUTranscoder(Transcoder):
    """A :class:`Transcoder` with SAELens's JumpReLU: ``relu(pre) * (pre > threshold)``."""


class JumpReLUSkipTranscoder(JumpReLUTranscoder, SkipTranscoder):
    pass


class StandardTrainingSAE(TrainingSAE):
    pass


class TopKTrainingSAE(TrainingSAE):
    pass


class BatchTopKTrainingSAE(TopKTrainingSAE):
    pass


class MatryoshkaBatchTopKTrainingSAE(BatchTopKTrainingSAE):
    """SAELens's ``MatryoshkaBatchTopKTrainingSAE``: the BatchTopK step plus ``inner_mse_loss_<w>`` for every inner
    width (the reconstruction from the latents below w of the same BatchTopK activations, weight 1 each).
    ``save_model`` writes SAELens's ``matryoshka_batchtopk`` training folder, ``save_inference_model`` its
    ``jumprelu`` folder with ``metadata.training_architecture_details``; ``fusedsae.load`` reads both back as a
    Matryoshka SAE (:meth:`to_fusedsae` too)."""

    def training_forward_pass(self, step_input: Any) -> TrainStepOutput:
        out = super().training_forward_pass(step_input)
        acts = out.feature_acts.reshape(-1, self.cfg.d_sae)
        if self._rescales():
            acts = acts * (1 / self.W_dec.norm(dim=-1))
        lead = out.sae_in.shape[:-1]
        for width in self.cfg.matryoshka_widths[:-1]:
            inner = self._sae_out(F.decode(acts[:, :width], self.W_dec[:width], self.b_dec), lead)
            loss = (inner - out.sae_in).pow(2).sum(-1).mean()
            out.losses[f"inner_mse_loss_{width}"] = loss
            out.loss = out.loss + loss
        return out


class JumpReLUTrainingSAE(TrainingSAE):
    pass


_BASES = (SAEConfig, TrainingSAEConfig)
_INFERENCE: dict[str, tuple[type[SAE], type[SAEConfig]]] = {
    "standard": (StandardSAE, StandardSAEConfig),
    "topk": (TopKSAE, TopKSAEConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
    "gated": (GatedSAE, GatedSAEConfig),
    "transcoder": (Transcoder, TranscoderConfig),
    "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
    "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
}
_TRAINING: dict[str, tuple[type[SAE], type[SAEConfig]]] = {
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
    MATRYOSHKA_ARCHITECTURE: (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
}

__all__ = [
    "SAE",
    "BatchTopKTrainingSAE",
    "BatchTopKTrainingSAEConfig",
    "GatedSAE",
    "GatedSAEConfig",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "JumpReLUSkipTranscoder",
    "JumpReLUSkipTranscoderConfig",
    "JumpReLUTrainingSAE",
    "JumpReLUTrainingSAEConfig",
    "JumpReLUTranscoder",
    "JumpReLUTranscoderConfig",
    "MatryoshkaBatchTopKTrainingSAE",
    "MatryoshkaBatchTopKTrainingSAEConfig",
    "SAEConfig",
    "SAEMetadata",
    "SkipTranscoder",
    "SkipTranscoderConfig",
    "StandardSAE",
    "StandardSAEConfig",
    "StandardTrainingSAE",
    "StandardTrainingSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "TopKTrainingSAE",
    "TopKTrainingSAEConfig",
    "TrainCoefficientConfig",
    "TrainStepInput",
    "TrainStepOutput",
    "TrainingSAE",
    "TrainingSAEConfig",
    "Transcoder",
    "TranscoderConfig",
    "as_config",
]

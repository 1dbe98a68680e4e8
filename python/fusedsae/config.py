"""SAEConfig: what an SAE is (shapes, activation, loss coefficients), with SAELens's field names where it has one."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Activation = Literal["relu", "topk", "batchtopk", "jumprelu"]
ACTIVATIONS: tuple[str, ...] = ("relu", "topk", "batchtopk", "jumprelu")
SPARSE_ACTIVATIONS: tuple[str, ...] = ("topk", "batchtopk")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """'float32', 'torch.bfloat16' or a torch.dtype -> torch.dtype (SAELens writes both spellings)."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; use one of {sorted(_DTYPES)}")
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_matryoshka_widths(widths: Any, d_sae: int) -> list[int]:
    """``widths`` as a list of ints, strictly increasing from >= 1 and ending at ``d_sae``; ``ValueError`` else."""
    try:
        checked = [int(w) for w in widths]
    except (TypeError, ValueError):
        raise ValueError(f"matryoshka_widths must be a list of integers, got {widths!r}") from None
    if not checked or checked[0] < 1 or any(b <= a for a, b in itertools.pairwise(checked)) or checked[-1] != d_sae:
        raise ValueError(f"matryoshka_widths must increase strictly from >= 1 up to d_sae={d_sae}, got {checked}")
    return checked


@dataclass
class SAEConfig:
    """Configuration of a :class:`fusedsae.SparseAutoencoder`.

    Shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` (``d_out = d_in``
    for an SAE), for JumpReLU and BatchTopK ``threshold [d_sae]``, and with ``skip_connection`` ``W_skip [d_out,
    d_in]``.

    Attributes:
        d_in: input width; for attention SAEs ``n_heads * d_head`` (head-major concatenation of z).
        d_sae: number of latents.
        activation: ``"relu"`` (standard, L1 penalty), ``"topk"``, ``"batchtopk"`` or ``"jumprelu"``.
        k: active latents per token for TopK, and the mean per token for BatchTopK.
        n_heads: for SAEs on concatenated attention outputs; enables per-head attribution.
        apply_b_dec_to_input: encode ``x - b_dec`` (SAELens default) rather than ``x``. Default (None): True for
            an SAE, False for a transcoder, whose ``b_dec`` lives in y's space; True with ``d_out`` set is refused,
            as SAELens's ``TranscoderConfig`` refuses it (even for ``d_out = d_in``) and sparsify's ``transcode``
            never centres the input.
        normalize_activations: ``"none"`` or ``"expected_average_only_in"`` (the trainer scales inputs so that
            E‖x‖ = sqrt(d_in) and folds the scale into the weights when it saves).
        normalize_decoder: keep decoder rows at unit norm (gradient projection + renormalisation each step).
            Default: True for TopK/BatchTopK (as OpenAI and sparsify), False for ReLU/JumpReLU (as SAELens).
        l1_coefficient: weight of the decoder-norm-weighted L1 penalty (ReLU).
        l0_coefficient: weight of the L0 penalty (JumpReLU).
        jumprelu_init_threshold, jumprelu_bandwidth: JumpReLU's initial threshold and STE kernel width.
        aux_k: dead latents used by the AuxK loss (TopK/BatchTopK); default ``d_in // 2``; 0 disables it.
        aux_loss_coefficient: weight of the AuxK loss (Gao et al. 2024: 1/32).
        topk_threshold_lr: EMA rate of BatchTopK's inference threshold.
        matryoshka_widths: Matryoshka SAEs (TopK/BatchTopK; Bussmann et al. 2025, Nabeshima 2025): strictly
            increasing prefix widths ending at ``d_sae`` (``d_sae`` is appended when missing, as SAELens does). The
            training loss adds, for every inner width w, the MSE of the reconstruction from the active latents
            below w (``inner_mse_loss_<w>``, weight 1 each as SAELens sums them; dictionary_learning weights the
            levels by ``group_weights``, default their mean). All prefixes share the one selection of the whole
            dictionary, as in both SAELens (6.54: the inner levels slice the BatchTopK activations) and
            dictionary_learning, so every prefix reconstruction comes from one pass over the active latents.
        d_out: a transcoder (Dunefsky et al. 2024; SAELens ``Transcoder``, sparsify ``transcode``): the SAE reads
            ``x [..., d_in]`` and reconstructs another activation ``y [..., d_out]`` (e.g. an MLP's input -> its
            output). None (default) is an ordinary SAE, the target being x itself. Training rows are ``[x | y]``
            of width :attr:`data_width` = ``d_in + d_out`` (:func:`fusedsae.data.split_pair`).
        skip_connection: adds a linear skip path ``x @ W_skip.T`` to the reconstruction, ``W_skip [d_out, d_in]``
            initialised to zeros (SAELens ``SkipTranscoder``, sparsify ``skip_connection``; sparsify allows it on
            an SAE too, and so does fusedsae).
        dtype, device: of the parameters.
        metadata: free-form provenance written to ``cfg.json`` (``hook_name``, ``model_name``…, SAELens keys).
    """

    d_in: int
    d_sae: int
    activation: str = "topk"
    k: int | None = None
    n_heads: int | None = None
    apply_b_dec_to_input: bool | None = None
    normalize_activations: str = "none"
    normalize_decoder: bool | None = None
    l1_coefficient: float = 1.0
    l0_coefficient: float = 1.0
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    aux_k: int | None = None
    aux_loss_coefficient: float = 1.0 / 32.0
    topk_threshold_lr: float = 0.01
    matryoshka_widths: list[int] | None = None
    d_out: int | None = None
    skip_connection: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_name(self.dtype)
        self.dtype = dtype_name(dtype_from_name(self.dtype))
        self.device = str(self.device)
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_out is not None and (
            not isinstance(self.d_out, int) or isinstance(self.d_out, bool) or self.d_out < 1
        ):
            raise ValueError(f"d_out must be a positive integer (a transcoder) or None (an SAE), got {self.d_out!r}")
        if not isinstance(self.skip_connection, bool):
            raise ValueError(f"skip_connection must be true or false, got {self.skip_connection!r}")
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = self.d_out is None
        elif self.apply_b_dec_to_input and self.d_out is not None:
            raise ValueError(
                f"apply_b_dec_to_input=True is not supported for a transcoder (d_out={self.d_out}): b_dec [d_out] "
                "lives in the output's space, so the input is not centred by it (as SAELens and sparsify); leave it "
                "unset or False"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation in SPARSE_ACTIVATIONS:
            if self.k is None:
                raise ValueError(f"activation={self.activation!r} needs k (active latents per token)")
            if not 1 <= self.k <= self.d_sae:
                raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got k={self.k}")
        if self.n_heads is not None and (self.n_heads < 1 or self.d_in % self.n_heads):
            raise ValueError(
                f"n_heads={self.n_heads} must divide d_in={self.d_in} (attention SAEs take the head-major "
                "concatenation of the per-head outputs z, so d_in = n_heads * d_head)"
            )
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise ValueError(
                "normalize_activations must be 'none' or 'expected_average_only_in', "
                f"got {self.normalize_activations!r}"
            )
        if self.normalize_decoder is None:
            self.normalize_decoder = self.activation in SPARSE_ACTIVATIONS
        if self.aux_k is None:
            self.aux_k = max(1, self.d_in // 2) if self.activation in SPARSE_ACTIVATIONS else 0
        if self.aux_k < 0:
            raise ValueError(f"aux_k must be >= 0, got {self.aux_k}")
        if self.jumprelu_bandwidth <= 0:
            raise ValueError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")
        if self.matryoshka_widths is not None:
            if self.activation not in SPARSE_ACTIVATIONS:
                raise ValueError(f"matryoshka_widths need a topk or batchtopk SAE, not activation={self.activation!r}")
            widths = list(self.matryoshka_widths)
            if widths and widths[-1] != self.d_sae:
                widths.append(self.d_sae)  # as SAELens does
            self.matryoshka_widths = check_matryoshka_widths(widths, self.d_sae) if widths else None

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def is_transcoder(self) -> bool:
        """True when the SAE reconstructs another activation ``y [..., d_out]`` (``d_out`` is set)."""
        return self.d_out is not None

    @property
    def out_width(self) -> int:
        """Width of the reconstruction: ``d_out`` for a transcoder, ``d_in`` for an SAE."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def data_width(self) -> int:
        """Width of a training row: ``d_in`` for an SAE, ``d_in + d_out`` for a transcoder's ``[x | y]`` rows."""
        return self.d_in if self.d_out is None else self.d_in + self.d_out

    @property
    def d_head(self) -> int | None:
        return None if self.n_heads is None else self.d_in // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Builds a config from a dict, ignoring keys this version does not know (forward compatibility)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)

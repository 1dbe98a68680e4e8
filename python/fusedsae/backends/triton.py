"""The ``triton`` backend: launchers (reshape, allocate, choose blocks and grid, launch; no autograd) for the
kernels in :mod:`fusedsae.kernels`, registered for every op in :data:`fusedsae.backends.OPS`.

It runs CUDA tensors. Under ``TRITON_INTERPRET=1`` (which triton 3.6 reads when ``@triton.jit`` decorates a
kernel, so it must be set before :mod:`fusedsae.kernels` is first imported) the kernels run in Triton's
interpreter and an explicit ``FUSEDSAE_BACKEND=triton`` also takes CPU tensors: that is how CI checks every kernel
without a GPU. The dispatcher imports this module lazily, so importing fusedsae never imports triton.

Selection (TopK, BatchTopK, AuxK, ``row_topk``) is exact and ordered like the reference: ranked on int64 keys that
pack (value, index) (:mod:`fusedsae.kernels.topk`). When ``next_pow2(k)`` is at most :data:`FUSED_K_MAX` the
encoder filters in its GEMM epilogue (entries above a running per-row bound go to a small candidate buffer) and a
second kernel selects among the candidates, so the ``[N, d_sae]`` pre-activation is never written; rows whose
buffer overflows, and larger k, take a two-pass path (the Triton GEMM writes the pre-activation in row chunks, a
Triton kernel turns it into keys, ``torch.topk`` selects). An AuxK ``aux_k`` beyond the limit is selected from a
second GEMM over only the masked (dead) columns.

Determinism: ``d W_dec``, ``d W_enc`` and ``d b_enc`` sort the active entries by latent and sum fixed chunks of the
entries in token order, with no float atomics, so they are bitwise reproducible. :func:`set_deterministic`
(``False``) or ``FUSEDSAE_DETERMINISTIC=0`` switches them to float32 atomics instead (no sort; results vary in
the last bits). ``torch.use_deterministic_algorithms(True)`` always wins. Every other kernel is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from fusedsae import reference
from fusedsae.backends import define_backend, register

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.tools.tensor_descriptor import TensorDescriptor

    from fusedsae.kernels import encoder, heads, jumprelu, matryoshka, sparse, topk

    _IMPORT_ERROR: str | None = None
    # True when the kernels were decorated under TRITON_INTERPRET=1 (they then run in the interpreter on any device).
    INTERPRETED = isinstance(topk._row_topk_fwd_kernel, InterpretedFunction)
except ImportError as exc:  # triton wheels exist for Linux x86-64 only
    _IMPORT_ERROR = f"triton is not installed ({exc}); pip install triton (Linux x86-64)"
    INTERPRETED = False

# Largest next_pow2(k) selected by the fused path. The encoder's bound keeps [64, KP] fp32 bucket maxima next to
# the accumulator and lets about KP * H(KP) * ln(columns / 128) entries per row through (over 2000 at KP = 128:
# the candidate buffer grows with KP); the candidate selection keeps [32, KP] int64 keys (218 registers at 128 in
# the sm_90 build). Beyond it the two-pass path is used.
FUSED_K_MAX = 128

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)

_deterministic_override: bool | None = None


def set_deterministic(flag: bool | None) -> None:
    """Deterministic (``True``, the default) or float32-atomic (``False``) ``d W_dec``/``d W_enc``/``d b_enc``;
    ``None`` defers to ``FUSEDSAE_DETERMINISTIC`` (unset or anything but ``0`` means deterministic)."""
    global _deterministic_override
    _deterministic_override = flag


def deterministic() -> bool:
    """Whether the latent-sum gradients run the sorted, atomic-free path (see :func:`set_deterministic`)."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    if _deterministic_override is not None:
        return _deterministic_override
    return os.environ.get("FUSEDSAE_DETERMINISTIC", "1").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------------------------
# availability, capability checks, launch helpers
# ---------------------------------------------------------------------------------------------------------------


def _availability() -> tuple[bool, str]:
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    version = triton.__version__
    if INTERPRETED:
        return True, (
            f"triton {version} interpreter (TRITON_INTERPRET=1): kernels run on CPU and CUDA tensors, slowly; "
            "for tests (auto still sends CPU tensors to the reference)"
        )
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return False, (
                "TRITON_INTERPRET was set after fusedsae.kernels was imported (triton reads it when a kernel is "
                "decorated); set it before importing fusedsae"
            )
        return False, "no CUDA device and TRITON_INTERPRET is not set"
    return True, f"triton {version} on {torch.cuda.get_device_name()}"


_backend = define_backend(
    "triton",
    _availability,
    devices=("cuda",),
    explicit_devices=("cuda", "cpu") if INTERPRETED else ("cuda",),
)


def _dtype_refusal(*tensors: Tensor | None) -> str | None:
    for t in tensors:
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            return (
                f"triton kernels take float32, bfloat16 or float16 tensors, got {t.dtype} "
                "(the reference backend runs it)"
            )
    first = next(t for t in tensors if t is not None)
    if (
        first.device.type == "cuda"
        and not INTERPRETED
        and first.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(first.device) < (8, 0)
    ):
        major, minor = torch.cuda.get_device_capability(first.device)
        return f"bfloat16 tl.dot needs compute capability >= 8.0, this GPU has {major}.{minor}"
    return None


def _index_refusal(indices: Tensor) -> str | None:
    if indices.dtype not in _INDEX_DTYPES:
        return f"indices must be int32 or int64, got {indices.dtype}"
    return None


def _width_refusal(width: int) -> str | None:
    # Column indices are int32 in the kernels (and the selection keys keep them in 32 bits).
    if width >= 2**31:
        return f"d_sae={width} is too wide: the triton kernels index latents with int32 (d_sae < 2**31)"
    return None


# CUDA's launch limits on grid axes x, y, z.
_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _checked_grid(*axes: int) -> tuple[int, ...]:
    """The launch grid ``axes``, or a one-line ValueError naming the axis above CUDA's limit (launchers tile an
    axis that can grow with the problem with :func:`_axis_chunks`; the rest refuse here instead of failing at
    launch with a CUDA error)."""
    for name, size, limit in zip("xyz", axes, _GRID_LIMITS, strict=False):
        if size > limit:
            raise ValueError(
                f"the launch needs {size} programs on grid axis {name}, above the GPU's limit of {limit}: "
                "the problem is too large for the triton kernels (the reference backend runs it)"
            )
    return axes


def _axis_chunks(blocks: int, axis: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` block ranges of at most the limit of grid ``axis`` covering ``range(blocks)``: one
    launch each, for an axis whose block count can pass the limit."""
    limit = _GRID_LIMITS[axis]
    return [(start, min(blocks, start + limit)) for start in range(0, blocks, limit)]


def _first(*checks: str | None) -> str | None:
    return next((c for c in checks if c is not None), None)


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _on_device(fn: _Fn) -> _Fn:
    """Launch on the tensors' device: triton launches on torch's current device, which may be another GPU."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        device = next(a.device for a in args if isinstance(a, Tensor))
        if device.type == "cuda":
            with torch.cuda.device(device):
                return fn(*args)
        return fn(*args)

    return wrapper  # type: ignore[return-value]


def _gpu(t: Tensor) -> bool:
    """Compiled kernels on a GPU (block sizes for speed), else the interpreter (small blocks, few programs)."""
    return t.device.type == "cuda" and not INTERPRETED


def _rows(t: Tensor) -> Tensor:
    """``t`` with unit stride along its last dim (kernels index rows by one stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _sm_count(t: Tensor) -> int:
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def _dot_args(t: Tensor) -> dict[str, Any]:
    # fp32 follows torch's own TF32 switch for matmuls (off by default: exact fp32 products); 16-bit operands
    # always run on tensor cores. The interpreter cannot multiply bfloat16 (triton-lang/triton#11584): upcast there.
    if t.dtype == torch.float32:
        precision = "tf32" if (_gpu(t) and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    else:
        precision = "tf32"
    return {"UPCAST_DOT": INTERPRETED and t.dtype == torch.bfloat16, "DOT_PRECISION": precision}


# ---------------------------------------------------------------------------------------------------------------
# keys <-> (values, indices)
# ---------------------------------------------------------------------------------------------------------------


def _decode_keys(keys: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(values [.., k] in dtype, indices [.., k] int64)`` from int64 selection keys (kernels/topk.py)."""
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    values = bits.view(torch.float32).to(dtype)
    indices = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return values, indices


def _splits(row_blocks: int, n_tiles: int, t: Tensor, min_splits: int = 1) -> tuple[int, int]:
    """``(n_splits, tiles_per_split)``: split each row's column tiles so that about two waves of programs run
    (132 SMs on an H100: 16384 rows in 64-row blocks are 256 blocks, so 2 splits; 1024 rows, 17 splits). Each
    split has its own bound and warm-up tile, so splits add candidates (about 760 per split at k = 32 over 16384
    columns); few rows need many splits, many rows need few. Under the interpreter two splits, so that merging
    splits is always exercised."""
    target = 2 * _sm_count(t) if _gpu(t) else 2
    n_splits = max(1, min(n_tiles, max(min_splits, triton.cdiv(target, row_blocks))))
    per_split = triton.cdiv(n_tiles, n_splits)
    return triton.cdiv(n_tiles, per_split), per_split


def _row_chunk(n_rows: int, width: int, t: Tensor) -> int:
    """Rows per chunk of a two-pass selection: the pre-activation and its int64 keys for 2**26 (GPU) entries at a
    time, 768 MiB in fp32, or 2**10 in the interpreter (several chunks at test sizes)."""
    budget = 1 << 26 if _gpu(t) else 1 << 10
    return max(1, min(n_rows, budget // max(1, width)))


# ---------------------------------------------------------------------------------------------------------------
# encode_dense
# ---------------------------------------------------------------------------------------------------------------

_ACTIVATIONS = {"none": 0, "relu": 1, "jumprelu": 2}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Tiles and launch of the fused encoder + TopK kernel on a GPU (the interpreter uses small tiles).

    ``block_k`` is for 16-bit inputs; float32 takes half (the same bytes per pipeline stage). ``tma`` loads x and
    W_enc tiles through tensor descriptors where the layout allows it (Hopper or newer, 16-byte aligned rows),
    else through pointers. ``persistent`` caps the grid at ``programs_per_sm`` programs per SM, each looping over
    (row block, split) work items; otherwise there is one program per item."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = True
    persistent: bool = False
    programs_per_sm: int = 1
    maxnreg: int | None = None
    epilogue_split: int = 1


# Candidates for a GPU check to time side by side (FUSEDSAE_ENCODER_CONFIG=<name> or set_encoder_config(name)).
# The offline sm_90 compile at the DESIGN shapes (benchmarks/results/compile_report.md) decides which can be
# candidates at all: none of these spills, and every one feeds wgmma from shared memory in bf16.
CANDIDATE_CONFIGS: dict[str, EncoderConfig] = {
    # the tiles and loads before the Hopper work (only x is centred outside the kernel now): 255 registers, spills
    "m64n128-ptr": EncoderConfig(64, 128, 64, 8, 3, tma=False),
    # 64 x 128 tiles, 4 warps, filter on column quarters: two resident blocks, one's epilogue under the other's MMAs
    "m64n128-w4": EncoderConfig(64, 128, 64, 4, 3, epilogue_split=4),
    # the same tile over 8 warps (one block per SM, fewer registers per thread)
    "m64n128": EncoderConfig(64, 128, 64, 8, 3, epilogue_split=4),
    # wider tiles: more MMA work per byte of x and W_enc loaded
    "m64n256": EncoderConfig(64, 256, 64, 8, 3, epilogue_split=4),
    "m128n128": EncoderConfig(128, 128, 64, 8, 3, epilogue_split=4),
    # persistent grid over the 2-block configuration
    "m64n128-w4-persistent": EncoderConfig(64, 128, 64, 4, 3, epilogue_split=4, persistent=True, programs_per_sm=2),
}
# Chosen by the offline compile (benchmarks/results/compile_report.md): 16-bit inputs with next_pow2(k) <= 32 take
# the two-block configuration (219 registers, no spills at 768 -> 32768); wider bounds (k = 64 at 4096 -> 131072,
# BatchTopK's 2k candidates) and float32 need more registers per element and take 8 warps (235, no spills at
# k = 64 in bf16), where 4 warps would spill.
DEFAULT_ENCODER_CONFIG = "m64n128-w4"
WIDE_ENCODER_CONFIG = "m64n128"
_encoder_config_override: str | None = None

# Budget for the x blocks that the programs running at one time reread for every column tile: half of an H100's
# 50 MB L2, the other half for W_enc tiles and the candidate writes.
_L2_X_BUDGET = 24 << 20


def set_encoder_config(name: str | None) -> None:
    """Force one of :data:`CANDIDATE_CONFIGS` for the fused encoder (``None``: ``FUSEDSAE_ENCODER_CONFIG``, else
    :data:`DEFAULT_ENCODER_CONFIG`)."""
    if name is not None and name not in CANDIDATE_CONFIGS:
        raise ValueError(f"unknown encoder config {name!r}; choose one of {', '.join(CANDIDATE_CONFIGS)}")
    global _encoder_config_override
    _encoder_config_override = name


def encoder_config(dtype: torch.dtype = torch.bfloat16, kp: int = 32) -> tuple[str, EncoderConfig]:
    """``(name, config)`` the fused encoder launches with for inputs of ``dtype`` and a bound over ``kp`` buckets:
    :func:`set_encoder_config`, else the ``FUSEDSAE_ENCODER_CONFIG`` environment variable, else
    :data:`DEFAULT_ENCODER_CONFIG` (16-bit inputs, ``kp <= 32``) or :data:`WIDE_ENCODER_CONFIG`."""
    default = DEFAULT_ENCODER_CONFIG if dtype != torch.float32 and kp <= 32 else WIDE_ENCODER_CONFIG
    name = _encoder_config_override or os.environ.get("FUSEDSAE_ENCODER_CONFIG", "").strip() or default
    if name not in CANDIDATE_CONFIGS:
        raise ValueError(
            f"FUSEDSAE_ENCODER_CONFIG={name!r} is not an encoder config; choose one of {', '.join(CANDIDATE_CONFIGS)}"
        )
    return name, CANDIDATE_CONFIGS[name]


def _tma_capable(t: Tensor) -> bool:
    """Tensor descriptors: a GPU of compute capability 9.0 (Hopper) or newer, or the interpreter (which takes the
    same layouts; so does the offline compile for sm_90, which passes CPU tensors)."""
    return t.device.type != "cuda" or INTERPRETED or torch.cuda.get_device_capability(t.device) >= (9, 0)


def _tma_layout(t: Tensor) -> bool:
    """A 2-D tensor TMA can describe: unit inner stride, 16-byte aligned base and row stride."""
    size = t.element_size()
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0


def _encoder_operands(
    xc: Tensor, W_enc: Tensor, block_m: int, block_n: int, block_k: int, tma: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """``(x operand, W_enc operand, constexprs)``: tensor descriptors of ``[block_m, block_k]`` x tiles and
    ``[block_k, block_n]`` W_enc tiles (or ``[block_n, block_k]`` tiles of W_enc^T when W_enc is a transposed
    view, ``W_T``) when ``tma`` and both layouts allow it, else the tensors themselves (pointer loads)."""
    w_t = W_enc.stride(1) != 1 and W_enc.stride(0) == 1
    w_view = W_enc.t() if w_t else W_enc
    if tma and _tma_capable(xc) and _tma_layout(xc) and w_view.dim() == 2 and _tma_layout(w_view):
        x_desc = TensorDescriptor.from_tensor(xc, [block_m, block_k])
        w_desc = TensorDescriptor.from_tensor(w_view, [block_n, block_k] if w_t else [block_k, block_n])
        return x_desc, w_desc, {"USE_TMA": True, "W_T": w_t}
    return xc, W_enc, {"USE_TMA": False, "W_T": False}


def _encoder_refusal(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None) -> str | None:
    return _first(_dtype_refusal(x, W_enc, b_enc, b_dec), _width_refusal(W_enc.shape[1]))


def _encode_dense_supports(x, W_enc, b_enc, b_dec, threshold, activation) -> str | None:
    if activation not in _ACTIVATIONS:
        return f"unknown activation {activation!r}"
    return _encoder_refusal(x, W_enc, b_enc, b_dec)


def _launch_encode_dense(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, threshold: Tensor | None, activation: str
) -> Tensor:
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    out = x.new_empty(n, d_sae)
    if n == 0:
        return out
    xc = _rows(reference.center(x, b_dec))
    if _gpu(x):
        # 128x128 output tiles, K steps of 64 (bf16/fp16; 32 for fp32), 3 stages, TMA loads where the layout
        # allows; tests/compile_for_gpu.py reports registers and shared memory of the sm_90 build. fp32 without
        # TF32 runs on FMA units like torch's own fp32 GEMM.
        block_m, block_n = 128, 128
        block_k = 32 if x.dtype == torch.float32 else 64
        launch = {"GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    else:
        block_m, block_n, block_k = 16, 32, 16
        launch = {"GROUP_M": 2}
    x_in, w_in, layout = _encoder_operands(xc, W_enc, block_m, block_n, block_k, tma=True)
    grid = _checked_grid(triton.cdiv(n, block_m) * triton.cdiv(d_sae, block_n))
    encoder._encode_dense_fwd_kernel[grid](
        x_in,
        w_in,
        b_enc,
        threshold,
        out,
        n,
        d_in,
        d_sae,
        xc.stride(0),
        xc.stride(1),
        W_enc.stride(0),
        W_enc.stride(1),
        out.stride(0),
        ACTIVATION=_ACTIVATIONS[activation],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **layout,
        **_dot_args(x),
        **launch,
    )
    return out


@_on_device
def encode_dense_fwd(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, threshold: Tensor | None, activation: str
) -> Tensor:
    """``act((x - b_dec) @ W_enc + b_enc)``: ``[N, d_in] -> [N, d_sae]`` in x's dtype (fp32 accumulation)."""
    if activation == "jumprelu" and threshold is None:
        raise ValueError("activation='jumprelu' needs threshold [d_sae]")
    return _launch_encode_dense(
        x,
        W_enc,
        b_enc.contiguous(),
        None if b_dec is None else b_dec.contiguous(),
        None if threshold is None else threshold.contiguous(),
        activation,
    )


# ---------------------------------------------------------------------------------------------------------------
# TopK selection: fused (GEMM epilogue) or two-pass (dense GEMM in row chunks + keys + torch.topk)
# ---------------------------------------------------------------------------------------------------------------


def _candidate_capacity(kp: int, columns: int, block_n: int) -> int:
    """Slots per (row, split) candidate buffer: the expected number of appends (first tile whole, then about
    ``KP * H(KP) / c`` per column c, see kernels/topk.py ``_bucket_max``) with 50% + 64 slots of headroom, in
    whole tiles. 1280 slots (10 KiB) per row and split at k = 32, 16384 columns per split; rows past it (columns
    sorted by value, heavy-tailed rows) are recomputed exactly by the two-pass path."""
    harmonic = sum(1.0 / i for i in range(1, kp + 1))
    expected = block_n + kp * harmonic * math.log(max(1.0, columns / block_n))
    return block_n * triton.cdiv(int(1.5 * expected) + 64, block_n)


def _select_candidates(cand: Tensor, count: Tensor, k: int, t: Tensor) -> Tensor:
    """Sorted keys ``[N, next_pow2(k)]``: the best of each row's candidates (``_topk_candidates_kernel``);
    ``KEY_NONE`` where a row has fewer candidates."""
    n, n_splits, cap = cand.shape
    kp = triton.next_power_of_2(k)
    block_m, block_n, launch = (32, max(128, kp), {"num_warps": 8}) if _gpu(t) else (16, max(16, kp), {})
    keys = torch.empty(n, kp, dtype=torch.int64, device=cand.device)
    topk._topk_candidates_kernel[_checked_grid(triton.cdiv(n, block_m))](
        cand, count, keys, n, n_splits, cap, keys.stride(0), KP=kp, BLOCK_M=block_m, BLOCK_N=block_n, **launch
    )
    return keys


# The key below every real key (kernels/topk.py _KEY_NONE): padding, and the sign that a row lacks candidates.
KEY_NONE = -(2**63)


def _needs_redo(keys: Tensor, count: Tensor, cap: int, k: int) -> Tensor:
    """``[N]`` bool, on the device: rows whose candidates cannot be trusted (a buffer overflowed, so entries above
    the bound were dropped) or that hold fewer than k candidates (fewer than k entries above -inf)."""
    return (count > cap).any(dim=1) | (keys[:, k - 1] == KEY_NONE)


def _fused_topk_keys(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Sorted keys ``[N, k]`` (and ``[N, aux_k]`` among ``aux_mask``): the fused GEMM + filter kernel, then the
    selection among its candidates; rows that overflowed a candidate buffer go through the two-pass path."""
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    kp = triton.next_power_of_2(k)
    kp_aux = triton.next_power_of_2(aux_k) if aux_k else 1
    xc = _rows(reference.center(x, b_dec))
    config = encoder_config(x.dtype, max(kp, kp_aux))[1]
    if _gpu(x):
        # CANDIDATE_CONFIGS[...]: 64 rows is the smallest M for which Hopper's wgmma is used; the epilogue holds
        # the fp32 accumulator, its int64 keys and [BLOCK_M, KP] bucket maxima (see tests/compile_for_gpu.py).
        block_m, block_n = config.block_m, max(config.block_n, kp, kp_aux)
        block_k = config.block_k // 2 if x.dtype == torch.float32 else config.block_k
        launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if config.maxnreg:
            launch["maxnreg"] = config.maxnreg
        resident = _sm_count(x) * config.programs_per_sm
    else:
        block_m, block_n, block_k = 16, max(16, kp, kp_aux), 16
        launch = {}
        resident = 2
    # parts of the tile hold at least KP columns (one per bucket); the interpreter's tiles split when they can
    split_epilogue = config.epilogue_split if _gpu(x) else 2
    while split_epilogue > 1 and block_n // split_epilogue < max(kp, kp_aux):
        split_epilogue //= 2
    row_blocks = triton.cdiv(n, block_m)
    # Enough splits that the row blocks running at one time (resident programs / splits, split-fastest order)
    # keep their x blocks in L2: 3 at 4096 -> 131072 in bf16, 1 at 768.
    x_block = block_m * d_in * x.element_size()
    n_splits, per_split = _splits(
        row_blocks, triton.cdiv(d_sae, block_n), x, min_splits=triton.cdiv(resident * x_block, _L2_X_BUDGET)
    )
    columns = per_split * block_n
    cap = min(_candidate_capacity(kp, columns, block_n), block_n * per_split)
    cand = torch.empty(n, n_splits, cap, dtype=torch.int64, device=x.device)
    count = torch.empty(n, n_splits, dtype=torch.int32, device=x.device)
    aux_cand = aux_count = None
    cap_aux = 1
    if aux_k:
        assert aux_mask is not None
        # sized like the main buffer, not by the dead count: reading that count would stall the host every step
        cap_aux = min(_candidate_capacity(kp_aux, columns, block_n), block_n * per_split)
        aux_cand = torch.empty(n, n_splits, cap_aux, dtype=torch.int64, device=x.device)
        aux_count = torch.empty(n, n_splits, dtype=torch.int32, device=x.device)
    x_in, w_in, layout = _encoder_operands(xc, W_enc, block_m, block_n, block_k, config.tma)
    n_items = row_blocks * n_splits
    grid = _checked_grid(min(n_items, resident) if config.persistent else n_items)
    encoder._topk_encode_fwd_kernel[grid](
        x_in,
        w_in,
        b_enc,
        None if aux_cand is None else aux_mask.view(torch.uint8),
        cand,
        count,
        aux_cand,
        aux_count,
        n,
        d_in,
        d_sae,
        per_split,
        n_splits,
        cap,
        cap_aux,
        xc.stride(0),
        xc.stride(1),
        W_enc.stride(0),
        W_enc.stride(1),
        HAS_AUX=aux_cand is not None,
        KP=kp,
        KP_AUX=kp_aux,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EPILOGUE_SPLIT=split_epilogue,
        **layout,
        **_dot_args(x),
        **launch,
    )
    keys = _select_candidates(cand, count, k, x)
    redo = _needs_redo(keys, count, cap, k)
    aux_keys = None
    if aux_cand is not None:
        aux_keys = _select_candidates(aux_cand, aux_count, aux_k, x)
        redo |= _needs_redo(aux_keys, aux_count, cap_aux, aux_k)
    # Rows to redo are redone by a kernel that reads `redo` itself (blocks without one exit at once): no host read,
    # so the step stays asynchronous and capturable in a CUDA graph.
    if _gpu(x):
        block_m, block_n, block_k = 32, 128, 32 if x.dtype == torch.float32 else 64
        launch = {"num_warps": 8, "num_stages": 2}
    encoder._topk_encode_redo_kernel[_checked_grid(triton.cdiv(n, block_m))](
        xc,
        W_enc,
        b_enc,
        None if aux_keys is None else aux_mask.view(torch.uint8),
        redo,
        keys,
        aux_keys,
        n,
        d_in,
        d_sae,
        xc.stride(0),
        xc.stride(1),
        W_enc.stride(0),
        W_enc.stride(1),
        keys.stride(0),
        0 if aux_keys is None else aux_keys.stride(0),
        HAS_AUX=aux_keys is not None,
        KP=kp,
        KP_AUX=kp_aux,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **_dot_args(x),
        **launch,
    )
    return keys[:, :k], None if aux_keys is None else aux_keys[:, :aux_k]


def _launch_row_keys(scores: Tensor, mask: Tensor | None) -> Tensor:
    n, width = scores.shape
    keys = torch.empty(n, width, dtype=torch.int64, device=scores.device)
    block_m, block_n = (16, 128) if _gpu(scores) else (16, 32)
    # column blocks on axis x (2**31 - 1 programs: any d_sae below 2**31), row blocks on y in launches of at most
    # 65535 blocks
    for start, stop in _axis_chunks(triton.cdiv(n, block_m), axis=1):
        rows = slice(start * block_m, min(n, stop * block_m))
        topk._row_keys_kernel[_checked_grid(triton.cdiv(width, block_n), stop - start)](
            scores[rows],
            None if mask is None else mask.view(torch.uint8),
            keys[rows],
            rows.stop - rows.start,
            width,
            scores.stride(0),
            keys.stride(0),
            HAS_MASK=mask is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
        )
    return keys


def _two_pass_topk_keys(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Same result as :func:`_fused_topk_keys` for any k: per row chunk, the Triton GEMM writes the
    pre-activation, a Triton kernel turns it into keys (latents outside ``aux_mask`` keyed as -inf for AuxK), and
    ``torch.topk`` selects on them. ``k=0`` selects only the AuxK keys (``[N, 0]`` main keys)."""
    n = x.shape[0]
    d_sae = W_enc.shape[1]
    keys = torch.empty(n, k, dtype=torch.int64, device=x.device)
    aux_keys = torch.empty(n, aux_k, dtype=torch.int64, device=x.device) if aux_k else None
    step = _row_chunk(n, d_sae, x)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        pre = _launch_encode_dense(x[rows], W_enc, b_enc, b_dec, None, "none")
        if k:
            keys[rows] = torch.topk(_launch_row_keys(pre, None), k, dim=1, sorted=True).values
        if aux_keys is not None:
            aux_keys[rows] = torch.topk(_launch_row_keys(pre, aux_mask), aux_k, dim=1, sorted=True).values
    return keys, aux_keys


def _fits_fused(k: int) -> bool:
    return triton.next_power_of_2(k) <= FUSED_K_MAX


def _topk_select(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(values [N, k], indices [N, k], aux_values [N, aux_k], aux_indices [N, aux_k])``, values in x's dtype."""
    n = x.shape[0]
    if not _fits_fused(k):
        keys, aux_keys = _two_pass_topk_keys(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask)
    elif aux_k == 0 or _fits_fused(aux_k):
        keys, aux_keys = _fused_topk_keys(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask)
    else:
        # A wide AuxK selection takes a second GEMM over all columns (the dead ones are not listed: that needs a
        # host read). Training does not come here: SparseAutoencoder.training_forward selects AuxK over a
        # static-size list of the possibly dead columns (fusedsae.functional.auxk_reconstruction).
        keys, _ = _fused_topk_keys(x, W_enc, b_enc, b_dec, k, 0, None)
        _, aux_keys = _two_pass_topk_keys(x, W_enc, b_enc, b_dec, 0, aux_k, aux_mask)
    values, indices = _decode_keys(keys, x.dtype)
    if aux_keys is None:
        return values, indices, x.new_empty(n, 0), torch.empty(n, 0, dtype=torch.int64, device=x.device)
    aux_values, aux_indices = _decode_keys(aux_keys, x.dtype)
    return values, indices, aux_values, aux_indices


def _selection_supports(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask) -> str | None:
    return _encoder_refusal(x, W_enc, b_enc, b_dec)


def _contiguous_encoder_args(
    b_enc: Tensor, b_dec: Tensor | None, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    return (
        b_enc.contiguous(),
        None if b_dec is None else b_dec.contiguous(),
        None if aux_mask is None else aux_mask.contiguous(),
    )


@_on_device
def topk_encode_fwd(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused encoder + TopK (+ AuxK among ``aux_mask``): pre-activation values and int64 indices, ``[N, k]`` and
    ``[N, aux_k]``, sorted by value then index; see :func:`fusedsae.reference.topk_encode`."""
    b_enc, b_dec, aux_mask = _contiguous_encoder_args(b_enc, b_dec, aux_mask)
    if x.shape[0] == 0:
        return _empty_selection(x, k, aux_k)
    return _topk_select(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask)


def _empty_selection(x: Tensor, k: int, aux_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty ``[0, k]``/``[0, aux_k]`` results for an empty batch."""
    long = {"dtype": torch.int64, "device": x.device}
    return x.new_empty(0, k), torch.empty(0, k, **long), x.new_empty(0, aux_k), torch.empty(0, aux_k, **long)


# ---------------------------------------------------------------------------------------------------------------
# BatchTopK: per-row candidates from the same selection, then the batch-level cut-off over the candidates only
# ---------------------------------------------------------------------------------------------------------------


@_on_device
def batchtopk_encode_fwd(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, aux_k: int, aux_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchTopK in padded form (see :func:`fusedsae.reference.batchtopk_encode`) without the ``[N, d_sae]``
    pre-activation.

    Each row contributes its ``w`` best candidates (w = 2k to start, ``next_pow2`` within the fused limit); the
    ``k * N``-th largest candidate is a lower bound of the batch cut-off. A row all of whose candidates end up
    active might have more, so only those rows are selected again with 4x the width (to d_sae at most) until
    no row is saturated; then the candidates hold the exact BatchTopK set (every entry left out of a row ranks
    below that row's first inactive candidate, hence below the cut-off). One host read (the output width, and
    whether to refine) per step; each refining round adds two (its rows, the next check)."""
    b_enc, b_dec, aux_mask = _contiguous_encoder_args(b_enc, b_dec, aux_mask)
    n = x.shape[0]
    d_sae = W_enc.shape[1]
    if n == 0:
        v, i, av, ai = _empty_selection(x, 1, aux_k)
        return v, i, av, ai
    width = min(d_sae, 2 * k)
    if _fits_fused(width):
        width = min(d_sae, triton.next_power_of_2(width))
    values, indices, aux_values, aux_indices = _topk_select(x, W_enc, b_enc, b_dec, width, aux_k, aux_mask)
    values = values.float()
    while True:
        active = reference.batch_active(values, k * n)
        saturated = active[:, -1] if width < d_sae else torch.zeros_like(active[:, -1])
        counts = active.sum(1)
        # the step's one host read: whether a row needs refining and the output width, packed in one integer
        code = int(2 * counts.max() + saturated.any())
        if not code & 1:
            break
        rows = saturated.nonzero().squeeze(1)
        new_width = min(d_sae, 4 * width)
        pad = new_width - width
        values = torch.cat([values, values.new_full((n, pad), float("-inf"))], dim=1)
        indices = torch.cat([indices, indices.new_zeros(n, pad)], dim=1)
        more_values, more_indices, _, _ = _topk_select(x[rows], W_enc, b_enc, b_dec, new_width, 0, None)
        values[rows] = more_values.float()
        indices[rows] = more_indices
        width = new_width
    m = max(1, code >> 1)
    # each row's active entries are a prefix of its candidates: sort that prefix by latent
    order_key = torch.where(active, indices, torch.full_like(indices, d_sae))
    order_key, perm = torch.sort(order_key[:, :m], dim=1)
    picked = values.gather(1, perm)
    live = order_key < d_sae
    out_values = torch.where(live, picked, torch.zeros_like(picked)).to(x.dtype)
    out_indices = torch.where(live, order_key, torch.zeros_like(order_key))
    return out_values, out_indices, aux_values, aux_indices


# ---------------------------------------------------------------------------------------------------------------
# sparse gathers and per-latent sums (decoder forward/backward, encoder backward)
# ---------------------------------------------------------------------------------------------------------------


def _latent_rows(W_enc: Tensor, n_gathers: int) -> tuple[Tensor, int, int]:
    """W_enc ``[d_in, d_sae]`` as a table of latent rows: ``(table, stride_latent, stride_d)``.

    Gathering a latent's column straight from row-major W_enc reads one 32-byte sector per element; a transposed
    copy costs two passes over W_enc (2 * d_in * d_sae elements) and makes every later gather contiguous. Worth
    it once the gathers outnumber about a quarter of the latents (training: 16384 x 32 gathers vs 32768 latents)."""
    if W_enc.stride(0) == 1:
        return W_enc, W_enc.stride(1), 1
    if 4 * n_gathers >= W_enc.shape[1]:
        table = W_enc.t().contiguous()
        return table, table.stride(0), 1
    return W_enc, W_enc.stride(1), W_enc.stride(0)


def _launch_gather_sum(
    values: Tensor, indices: Tensor, table: Tensor, stride_tr: int, stride_td: int, bias: Tensor | None, d: int
) -> Tensor:
    n, m = values.shape
    out = values.new_empty(n, d)
    if n == 0:
        return out
    # 4 tokens x 256 columns: 512-byte contiguous bf16 row segments per gather, 8 elements per thread at 4 warps.
    block_t, block_d, launch = (4, 256, {"num_warps": 4}) if _gpu(values) else (16, 16, {})
    sparse._gather_sum_kernel[_checked_grid(triton.cdiv(n, block_t), triton.cdiv(d, block_d))](
        values,
        indices,
        table,
        bias,
        out,
        n,
        m,
        d,
        values.stride(0),
        indices.stride(0),
        stride_tr,
        stride_td,
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        **launch,
    )
    return out


def _launch_gather_dot(table: Tensor, indices: Tensor, vectors: Tensor) -> Tensor:
    n, m = indices.shape
    d = table.shape[1]
    out = vectors.new_empty(n, m)
    if n == 0:
        return out
    # [2 tokens, 16 slots, 128 columns] = 4096 gathered elements per step, 32 per thread at 4 warps.
    block_t, block_j, block_d, launch = (2, 16, 128, {"num_warps": 4}) if _gpu(vectors) else (4, 4, 16, {})
    sparse._gather_dot_kernel[_checked_grid(triton.cdiv(n, block_t), triton.cdiv(m, block_j))](
        table,
        indices,
        vectors,
        out,
        n,
        m,
        d,
        table.stride(0),
        indices.stride(0),
        vectors.stride(0),
        out.stride(0),
        BLOCK_T=block_t,
        BLOCK_J=block_j,
        BLOCK_D=block_d,
        **launch,
    )
    return out


def _latent_sums(
    src: Tensor,
    shift: Tensor | None,
    indices: Tensor,
    weights: Tensor,
    out: Tensor,
    n_out: int,
    out_strides: tuple[int, int],
    sums: Tensor | None,
    segments: tuple[Tensor, Tensor, Tensor] | None,
) -> None:
    """``out[i] = sum over (n, j) with indices[n, j] == i of weights[n, j] * (src[n] - shift)`` for every latent
    ``i < n_out`` (zero rows for unused latents), stored through ``out_strides = (latent, column)``; with ``sums``,
    also ``sums[i] = sum of those weights``. Deterministic (sorted; ``segments`` are
    :func:`fusedsae.reference.latent_segments` of ``indices`` if the caller has them) unless :func:`deterministic`
    is off."""
    d = src.shape[1]
    m = indices.shape[1]
    flat = indices.reshape(-1)
    gpu = _gpu(src)
    if not deterministic():
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        acc_sums = None if sums is None else torch.zeros(n_out, dtype=torch.float32, device=out.device)
        block_e, block_d = (32, 128) if gpu else (16, 16)
        sparse._scatter_add_kernel[_checked_grid(triton.cdiv(flat.numel(), block_e), triton.cdiv(d, block_d))](
            src,
            shift,
            flat,
            weights.reshape(-1),
            acc,
            acc_sums,
            flat.numel(),
            d,
            m,
            src.stride(0),
            out_strides[0],
            out_strides[1],
            HAS_SHIFT=shift is not None,
            WRITE_SUMS=sums is not None,
            BLOCK_E=block_e,
            BLOCK_D=block_d,
        )
        out.copy_(acc)
        if sums is not None:
            sums.copy_(acc_sums)
        return
    # Group entries by latent (one stable int32 sort per step, shared with the other backward when the caller
    # passes it), then sum fixed chunks of the sorted list and combine the pieces of latents that cross chunks.
    order, keys, offsets = segments if segments is not None else reference.latent_segments(indices, n_out)
    n_entries = flat.numel()
    # 64 entries x 64 columns per program: a [64, 64] float32 tile gathered at once, then a segmented scan (offline
    # sm_90 build at 64 x 128: 252-255 registers, 120 B spilled with the weight sums; at 64 x 64 half the tile).
    # About 16 entries per latent at 16384 x 32 / 32768, so a chunk holds a few latents; a latent firing on all
    # 16384 tokens is 256 chunks of parallel work plus a 256-step combine, instead of a 16384-step walk.
    chunk, block_d, launch = (64, 64, {"num_warps": 4}) if gpu else (16, 16, {})
    n_chunks = triton.cdiv(n_entries, chunk)
    part = torch.empty(n_chunks, 2, d, dtype=torch.float32, device=out.device)
    part_sums = None if sums is None else torch.empty(n_chunks, 2, dtype=torch.float32, device=out.device)
    col_blocks = triton.cdiv(d, block_d)
    sparse._segment_chunk_kernel[_checked_grid(n_chunks, col_blocks)](
        src,
        shift,
        order,
        keys,
        weights.reshape(-1),
        offsets,
        out,
        sums,
        part,
        part_sums,
        n_entries,
        d,
        m,
        src.stride(0),
        out_strides[0],
        out_strides[1],
        HAS_SHIFT=shift is not None,
        WRITE_SUMS=sums is not None,
        CHUNK=chunk,
        BLOCK_D=block_d,
        **launch,
    )
    block_l = 16
    sparse._segment_combine_kernel[_checked_grid(triton.cdiv(n_out, block_l), col_blocks)](
        offsets,
        part,
        part_sums,
        out,
        sums,
        n_out,
        d,
        out_strides[0],
        out_strides[1],
        WRITE_SUMS=sums is not None,
        CHUNK=chunk,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        **launch,
    )


def _launch_matvec(W: Tensor, v: Tensor, scale: float) -> Tensor:
    r, c = W.shape
    out = v.new_empty(r)
    block_r, block_c = (32, 256) if _gpu(v) else (16, 32)
    sparse._matvec_kernel[_checked_grid(triton.cdiv(r, block_r))](
        W, v, out, r, c, W.stride(0), W.stride(1), scale, BLOCK_R=block_r, BLOCK_C=block_c
    )
    return out


def _sparse_refusal(values: Tensor, indices: Tensor, *floats: Tensor | None) -> str | None:
    return _first(_dtype_refusal(values, *floats), _index_refusal(indices))


@_on_device
def sparse_encode_backward_fwd(
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
    the active entries (repeated indices add up). Only the ``N*m`` active entries are touched: ``dW_enc`` is a
    per-latent sum of centred inputs written straight into its transposed layout, ``db_enc`` comes from the same
    pass, ``db_dec = -W_enc @ db_enc`` reduces over the batch first, and ``dx`` gathers latent rows of W_enc."""
    grad, indices, x = grad.contiguous(), indices.contiguous(), _rows(x)
    b_dec = None if b_dec is None else b_dec.contiguous()
    d_in, d_sae = W_enc.shape
    dW_enc = torch.empty(d_in, d_sae, dtype=grad.dtype, device=grad.device)
    db_enc = torch.empty(d_sae, dtype=grad.dtype, device=grad.device)
    if grad.numel() == 0:
        dW_enc.zero_()
        db_enc.zero_()
    else:
        segments = None if order is None else (order, keys, offsets)
        _latent_sums(x, b_dec, indices, grad, dW_enc, d_sae, (dW_enc.stride(1), dW_enc.stride(0)), db_enc, segments)
    db_dec = _launch_matvec(W_enc, db_enc, -1.0) if b_dec is not None else grad.new_empty(0)
    if need_dx:
        table, stride_tr, stride_td = _latent_rows(W_enc, grad.numel())
        dx = _launch_gather_sum(grad, indices, table, stride_tr, stride_td, None, d_in)
    else:
        dx = grad.new_empty(0)
    return dx, dW_enc, db_enc, db_dec


@_on_device
def sparse_decode_fwd(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``x_hat [N, d_in] = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` (fp32 accumulation, slots in
    order)."""
    W_dec = _rows(W_dec)
    bias = None if b_dec is None else b_dec.contiguous()
    return _launch_gather_sum(
        values.contiguous(), indices.contiguous(), W_dec, W_dec.stride(0), 1, bias, W_dec.shape[1]
    )


@_on_device
def sparse_decode_backward_fwd(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    order: Tensor | None = None,
    keys: Tensor | None = None,
    offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(d_values [N, m], dW_dec [d_sae, d_in])``: a gather-dot at the active rows, and per-latent sums of
    ``value * grad_out[token]`` (deterministic unless :func:`set_deterministic` is off)."""
    grad_out, values, indices, W_dec = _rows(grad_out), values.contiguous(), indices.contiguous(), _rows(W_dec)
    d_values = _launch_gather_dot(W_dec, indices, grad_out)
    dW_dec = torch.empty(W_dec.shape, dtype=grad_out.dtype, device=grad_out.device)
    if values.numel() == 0:
        dW_dec.zero_()
    else:
        segments = None if order is None else (order, keys, offsets)
        _latent_sums(grad_out, None, indices, values, dW_dec, W_dec.shape[0], (dW_dec.stride(0), 1), None, segments)
    return d_values, dW_dec


# ---------------------------------------------------------------------------------------------------------------
# row_topk
# ---------------------------------------------------------------------------------------------------------------


def _keys_by_torch_topk(scores: Tensor, k: int) -> Tensor:
    """Sorted keys ``[N, k]``: keys of every entry (a Triton kernel) in row chunks, selected by ``torch.topk``."""
    n, width = scores.shape
    keys = torch.empty(n, k, dtype=torch.int64, device=scores.device)
    step = _row_chunk(n, width, scores)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        keys[rows] = torch.topk(_launch_row_keys(scores[rows], None), k, dim=1, sorted=True).values
    return keys


@_on_device
def row_topk_fwd(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(values [N, k], indices [N, k] int64)``: the k largest of each row, ties by lower index, sorted. When
    ``next_pow2(k) <= FUSED_K_MAX``, the encoder's filter over the scores and a selection among its candidates
    (rows that overflow their buffer, and larger k: keys + ``torch.topk``)."""
    scores = _rows(scores)
    n, width = scores.shape
    if n == 0:
        return scores.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=scores.device)
    if not _fits_fused(k):
        return _decode_keys(_keys_by_torch_topk(scores, k), scores.dtype)
    kp = triton.next_power_of_2(k)
    # memory-bound: 16 rows x 256 columns of scores per step, 4 warps
    block_m, block_n, launch = (16, max(256, kp), {"num_warps": 4}) if _gpu(scores) else (16, max(16, kp), {})
    row_blocks = triton.cdiv(n, block_m)
    n_splits, per_split = _splits(row_blocks, triton.cdiv(width, block_n), scores)
    cap = min(_candidate_capacity(kp, per_split * block_n, block_n), block_n * per_split)
    cand = torch.empty(n, n_splits, cap, dtype=torch.int64, device=scores.device)
    count = torch.empty(n, n_splits, dtype=torch.int32, device=scores.device)
    topk._row_topk_fwd_kernel[_checked_grid(row_blocks, n_splits)](
        scores,
        cand,
        count,
        n,
        width,
        per_split,
        n_splits,
        cap,
        scores.stride(0),
        KP=kp,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **launch,
    )
    keys = _select_candidates(cand, count, k, scores)
    redo = _needs_redo(keys, count, cap, k)
    block_m, block_n, launch = (16, max(128, kp), {"num_warps": 8}) if _gpu(scores) else (16, max(16, kp), {})
    topk._row_topk_redo_kernel[_checked_grid(triton.cdiv(n, block_m))](
        scores,
        redo,
        keys,
        n,
        width,
        scores.stride(0),
        keys.stride(0),
        KP=kp,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **launch,
    )
    return _decode_keys(keys[:, :k], scores.dtype)


# ---------------------------------------------------------------------------------------------------------------
# JumpReLU
# ---------------------------------------------------------------------------------------------------------------


def _launch_threshold_fwd(pre: Tensor, threshold: Tensor, step: bool) -> Tensor:
    pre = _rows(pre)
    n, d = pre.shape
    out = torch.empty_like(pre, memory_format=torch.contiguous_format)
    if n == 0:
        return out
    block_r, block_c = (8, 256) if _gpu(pre) else (16, 32)
    threshold = threshold.contiguous()
    # column blocks on axis y: launches of at most 65535 column blocks (16.7M latents each at the GPU's 256)
    for start, stop in _axis_chunks(triton.cdiv(d, block_c), axis=1):
        cols = slice(start * block_c, min(d, stop * block_c))
        jumprelu._jumprelu_fwd_kernel[_checked_grid(triton.cdiv(n, block_r), stop - start)](
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


def _launch_threshold_bwd(
    grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float, step: bool
) -> tuple[Tensor | None, Tensor]:
    grad, pre, threshold = _rows(grad), _rows(pre), threshold.contiguous()
    n, d = pre.shape
    d_pre = None if step else torch.empty(n, d, dtype=pre.dtype, device=pre.device)
    if n == 0:
        return d_pre, torch.zeros_like(threshold)
    gpu = _gpu(pre)
    block_r, block_c = (16, 128) if gpu else (16, 32)
    col_blocks = triton.cdiv(d, block_c)
    # Row groups give the column sums enough programs (about 4 waves over 132 SMs); each group writes one fp32
    # partial row, and the few partial rows are added by torch (a fixed-order reduction).
    target = 4 * _sm_count(pre) if gpu else 2
    groups = max(1, min(triton.cdiv(n, block_r), triton.cdiv(target, col_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(n, groups), block_r) * block_r
    groups = triton.cdiv(n, rows_per_program)
    partial = torch.empty(groups, d, dtype=torch.float32, device=pre.device)
    jumprelu._jumprelu_bwd_kernel[_checked_grid(col_blocks, groups)](
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


@_on_device
def jumprelu_fwd(pre: Tensor, threshold: Tensor) -> Tensor:
    """``relu(pre) * (pre > threshold)``, threshold ``[d_sae]`` broadcast over rows."""
    return _launch_threshold_fwd(pre, threshold, step=False)


@_on_device
def step_fwd(pre: Tensor, threshold: Tensor) -> Tensor:
    """``(pre > threshold)`` in pre's dtype."""
    return _launch_threshold_fwd(pre, threshold, step=True)


@_on_device
def jumprelu_backward_fwd(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """``(d_pre [N, d_sae], d_threshold [d_sae])``; see :func:`fusedsae.reference.jumprelu_backward`."""
    d_pre, d_threshold = _launch_threshold_bwd(grad, pre, threshold, bandwidth, step=False)
    assert d_pre is not None
    return d_pre, d_threshold


@_on_device
def step_backward_fwd(grad: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``d_threshold [d_sae]``; see :func:`fusedsae.reference.step_backward`."""
    return _launch_threshold_bwd(grad, pre, threshold, bandwidth, step=True)[1]


# ---------------------------------------------------------------------------------------------------------------
# head_partial_sums
# ---------------------------------------------------------------------------------------------------------------


@_on_device
def head_partial_sums_fwd(x: Tensor, W_enc: Tensor, b_dec: Tensor | None, indices: Tensor, n_heads: int) -> Tensor:
    """``[N, m, n_heads]``: per-head partial dot products at the selected latents; see
    :func:`fusedsae.reference.head_partial_sums`."""
    if indices.dim() == 2 and indices.shape[0] > 1 and indices.stride(0) == 0:
        # one feature list broadcast over the tokens (an attribution scan): the encoder's head-aligned K loop
        return _launch_encode_heads(x, W_enc, None, b_dec, indices[0], n_heads)[1]
    x, indices = _rows(x), indices.contiguous()
    b_dec = None if b_dec is None else b_dec.contiguous()
    n, d_in = x.shape
    m = indices.shape[1]
    out = x.new_empty(n, m, n_heads)
    if n == 0 or m == 0:
        return out
    table, stride_tr, stride_td = _latent_rows(W_enc, indices.numel())
    block_t, block_j, block_d, launch = (2, 16, 64, {"num_warps": 4}) if _gpu(x) else (4, 4, 16, {})
    heads._head_partial_sums_fwd_kernel[_checked_grid(triton.cdiv(n, block_t), triton.cdiv(m, block_j))](
        x,
        b_dec,
        table,
        indices,
        out,
        n,
        m,
        d_in // n_heads,
        n_heads,
        x.stride(0),
        stride_tr,
        stride_td,
        indices.stride(0),
        HAS_B_DEC=b_dec is not None,
        BLOCK_T=block_t,
        BLOCK_J=block_j,
        BLOCK_D=block_d,
        **launch,
    )
    return out


def _launch_encode_heads(
    x: Tensor, W_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor | None, features: Tensor, n_heads: int
) -> tuple[Tensor | None, Tensor]:
    n, d_in = x.shape
    m = features.shape[0]
    parts = x.new_empty(n, m, n_heads)
    pre = x.new_empty(n, m) if b_enc is not None else None
    if n == 0 or m == 0:
        return pre, parts
    xc = _rows(reference.center(x, None if b_dec is None else b_dec.contiguous()))
    # 64 x 64 output tiles, K steps of 32 (d_head is 64 or 128 in practice: whole steps per head), 8 warps (4 spill
    # the gathered W_enc column addresses in the offline sm_90 build)
    block_m, block_f, block_k, launch = (64, 64, 32, {"num_warps": 8, "num_stages": 3}) if _gpu(x) else (16, 16, 16, {})
    heads._encode_heads_fwd_kernel[_checked_grid(triton.cdiv(n, block_m), triton.cdiv(m, block_f))](
        xc,
        W_enc,
        b_enc,
        features.contiguous(),
        parts,
        pre,
        n,
        m,
        d_in // n_heads,
        n_heads,
        xc.stride(0),
        W_enc.stride(0),
        W_enc.stride(1),
        WRITE_PRE=pre is not None,
        BLOCK_M=block_m,
        BLOCK_F=block_f,
        BLOCK_K=block_k,
        **_dot_args(x),
        **launch,
    )
    return pre, parts


@_on_device
def encode_head_partials_fwd(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, features: Tensor, n_heads: int
) -> tuple[Tensor, Tensor]:
    """``(pre [N, m], parts [N, m, n_heads])`` for one feature list at every token, from one tensor-core pass of
    the encoder over those columns with head-aligned K steps; see :func:`fusedsae.reference.encode_head_partials`.
    ``head_partial_sums`` takes this route when its indices are one row broadcast over the tokens (stride 0)."""
    refusal = _heads_supports(x, W_enc, b_dec, features.view(1, -1), n_heads) or _dtype_refusal(b_enc)
    if refusal is not None:
        raise ValueError(refusal)
    pre, parts = _launch_encode_heads(x, W_enc, b_enc.contiguous(), b_dec, features, n_heads)
    assert pre is not None
    return pre, parts


# ---------------------------------------------------------------------------------------------------------------
# registration: every op, each with what it cannot take
# ---------------------------------------------------------------------------------------------------------------


def _decode_supports(values, indices, W_dec, b_dec) -> str | None:
    return _sparse_refusal(values, indices, W_dec, b_dec)


def _decode_backward_supports(grad_out, values, indices, W_dec, *_segments) -> str | None:
    return _sparse_refusal(values, indices, grad_out, W_dec)


def _encode_backward_supports(grad, indices, x, W_enc, b_dec, need_dx, *_segments) -> str | None:
    return _sparse_refusal(grad, indices, x, W_enc, b_dec)


def _row_topk_supports(scores, k) -> str | None:
    return _first(_dtype_refusal(scores), _width_refusal(scores.shape[1]))


def _threshold_supports(pre, threshold, *_rest) -> str | None:
    return _dtype_refusal(pre, threshold)


def _heads_supports(x, W_enc, b_dec, indices, n_heads) -> str | None:
    # the kernel splits d_in into n_heads equal slices; a remainder would be dropped silently
    heads = (
        None
        if n_heads >= 1 and W_enc.shape[0] % n_heads == 0
        else f"n_heads={n_heads} must divide d_in={W_enc.shape[0]}"
    )
    return _first(_dtype_refusal(x, W_enc, b_dec), _index_refusal(indices), heads)


register("triton", "encode_dense", supports=_encode_dense_supports)(encode_dense_fwd)
register("triton", "topk_encode", supports=_selection_supports)(topk_encode_fwd)
register("triton", "batchtopk_encode", supports=_selection_supports)(batchtopk_encode_fwd)
register("triton", "sparse_encode_backward", supports=_encode_backward_supports)(sparse_encode_backward_fwd)
register("triton", "sparse_decode", supports=_decode_supports)(sparse_decode_fwd)
register("triton", "sparse_decode_backward", supports=_decode_backward_supports)(sparse_decode_backward_fwd)
register("triton", "row_topk", supports=_row_topk_supports)(row_topk_fwd)
register("triton", "jumprelu", supports=_threshold_supports)(jumprelu_fwd)
register("triton", "jumprelu_backward", supports=_threshold_supports)(jumprelu_backward_fwd)
register("triton", "step", supports=_threshold_supports)(step_fwd)
register("triton", "step_backward", supports=_threshold_supports)(step_backward_fwd)
register("triton", "head_partial_sums", supports=_heads_supports)(head_partial_sums_fwd)


# ---------------------------------------------------------------------------------------------------------------
# matryoshka_decode_loss (kernels/matryoshka.py): the reconstruction and every prefix's squared error, and the
# one-pass backward. Kept in one block so that it moves as a whole into the backends/triton package.
# ---------------------------------------------------------------------------------------------------------------


def _matryoshka_blocks(t: Tensor) -> tuple[int, int, dict[str, Any]]:
    # 4 tokens x 256 columns, as the sparse decoder: 512-byte contiguous bf16 row segments per gather, 8 elements
    # per thread at 4 warps; the backward holds three such float32 tiles (error, suffix, dy) plus the gathered one.
    return (4, 256, {"num_warps": 4}) if _gpu(t) else (8, 16, {})


def _matryoshka_supports(values, indices, W_dec, b_dec, y, widths) -> str | None:
    return _sparse_refusal(values, indices, W_dec, b_dec, y)


def _matryoshka_backward_supports(grad_recon, grad_sq, values, indices, W_dec, y, recon, *_rest) -> str | None:
    return _sparse_refusal(values, indices, grad_recon, grad_sq, W_dec, y, recon)


@_on_device
def matryoshka_decode_loss_fwd(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, y: Tensor, widths: list[int]
) -> tuple[Tensor, Tensor]:
    """``(recon [N, d_out], sq_err [N, L])`` from one pass over the active entries; see
    :func:`fusedsae.reference.matryoshka_decode_loss`. Each column block's share of the squared errors is summed
    over the blocks in order (deterministic)."""
    values, indices, W_dec, y = values.contiguous(), indices.contiguous(), _rows(W_dec), _rows(y)
    bias = None if b_dec is None else b_dec.contiguous()
    (n, m), d, levels = indices.shape, W_dec.shape[1], len(widths)
    recon = y.new_empty(n, d)
    block_t, block_d, launch = _matryoshka_blocks(y)
    col_blocks = triton.cdiv(d, block_d)
    sq_part = torch.zeros(col_blocks, n, levels, dtype=torch.float32, device=y.device)
    if n and d:
        level = reference.matryoshka_levels(indices, widths)
        matryoshka._matryoshka_decode_loss_fwd_kernel[_checked_grid(triton.cdiv(n, block_t), col_blocks)](
            values,
            indices,
            level,
            W_dec,
            bias,
            y,
            recon,
            sq_part,
            n,
            m,
            d,
            levels,
            values.stride(0),
            indices.stride(0),
            level.stride(0),
            W_dec.stride(0),
            y.stride(0),
            recon.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            BLOCK_L=triton.next_power_of_2(levels),
            **launch,
        )
    return recon, sq_part.sum(0).to(y.dtype)


@_on_device
def matryoshka_decode_loss_backward_fwd(
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
    """``(d_values [N, m], dW_dec [d_sae, d_out], db_dec [d_out], dy [N, d_out])``; see
    :func:`fusedsae.reference.matryoshka_decode_loss_backward`. One kernel walks the levels last to first (each
    entry's W_dec row gathered once serves its ``d value`` and the step to the previous prefix) and writes the
    suffix vectors ``S [N, L, d_out]``; ``dW_dec`` is the per-latent segment sum of ``value * S[token, level]``
    (:func:`fusedsae.reference.level_segments` re-addresses the sorted entries to those rows)."""
    values, indices, W_dec, y, recon = values.contiguous(), indices.contiguous(), _rows(W_dec), _rows(y), _rows(recon)
    grad_sq = grad_sq.contiguous()
    grad_recon = None if grad_recon is None else _rows(grad_recon)
    (n, m), (d_sae, d), levels = indices.shape, W_dec.shape, len(widths)
    level = reference.matryoshka_levels(indices, widths)
    suffix = y.new_empty(n, levels, d)
    dy = y.new_empty(n, d)
    block_t, block_d, launch = _matryoshka_blocks(y)
    col_blocks = triton.cdiv(d, block_d)
    dv_part = torch.zeros(col_blocks, n, m, dtype=torch.float32, device=y.device)
    if n and d:
        matryoshka._matryoshka_decode_loss_bwd_kernel[_checked_grid(triton.cdiv(n, block_t), col_blocks)](
            values,
            indices,
            level,
            W_dec,
            recon,
            y,
            grad_recon,
            grad_sq,
            suffix,
            dv_part,
            dy,
            n,
            m,
            d,
            levels,
            values.stride(0),
            indices.stride(0),
            level.stride(0),
            W_dec.stride(0),
            recon.stride(0),
            y.stride(0),
            0 if grad_recon is None else grad_recon.stride(0),
            grad_sq.stride(0),
            dy.stride(0),
            HAS_GRAD_RECON=grad_recon is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            **launch,
        )
    else:
        suffix.zero_()
        dy.zero_()
    dW_dec = torch.empty(W_dec.shape, dtype=y.dtype, device=y.device)
    table = suffix.view(n * levels, d)
    if values.numel() == 0:
        dW_dec.zero_()
    elif deterministic():
        # The sorted entries re-addressed to an [N * L, m] layout (row n * L + level): the segment sum reads source
        # row S[n, level] and weight values[n, j] for each entry, from the one sort the step already made.
        segments = reference.latent_segments(indices, d_sae) if order is None else (order, keys, offsets)
        by_level = reference.level_segments(reference.Segments(*segments), level, levels)  # type: ignore[arg-type]
        weights = values[:, None, :].expand(n, levels, m)
        _latent_sums(table, None, indices, weights, dW_dec, d_sae, (dW_dec.stride(0), 1), None, tuple(by_level))
    else:
        # The atomic sums walk entries in token order: give them the [N * L, m] layout itself, value 0 off-level.
        slots = torch.arange(levels, device=y.device)[None, :, None]
        weights = torch.where(level[:, None, :] == slots, values[:, None, :], 0).reshape(n * levels, m)
        rows = indices[:, None, :].expand(n, levels, m).reshape(n * levels, m)
        _latent_sums(table, None, rows, weights, dW_dec, d_sae, (dW_dec.stride(0), 1), None, None)
    db_dec = suffix[:, 0].sum(0, dtype=torch.float32).to(y.dtype)
    return dv_part.sum(0).to(values.dtype), dW_dec, db_dec, dy


register("triton", "matryoshka_decode_loss", supports=_matryoshka_supports)(matryoshka_decode_loss_fwd)
register("triton", "matryoshka_decode_loss_backward", supports=_matryoshka_backward_supports)(
    matryoshka_decode_loss_backward_fwd
)

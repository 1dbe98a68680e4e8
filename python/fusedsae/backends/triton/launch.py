"""What every triton launcher shares: whether triton can run here, the dtype and size refusals, CUDA's grid limits,
block sizes for a GPU or the interpreter, and the determinism switch. Imports no kernel module (only
:mod:`fusedsae.kernels.topk`, to tell whether the kernels were decorated for the interpreter)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from fusedsae.kernels import topk as topk_kernels

    IMPORT_ERROR: str | None = None
    # True when the kernels were decorated under TRITON_INTERPRET=1 (they then run in the interpreter on any device).
    INTERPRETED = isinstance(topk_kernels.sortable_keys, InterpretedFunction)
except ImportError as exc:  # triton wheels exist for Linux x86-64 only
    IMPORT_ERROR = f"triton is not installed ({exc}); pip install triton (Linux x86-64)"
    INTERPRETED = False

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)

# CUDA's launch limits on grid axes x, y, z.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def availability() -> tuple[bool, str]:
    """Whether the triton kernels can run here, and why (not)."""
    if IMPORT_ERROR is not None:
        return False, IMPORT_ERROR
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


# ---------------------------------------------------------------------------------------------------------------
# refusals (each returns why the kernels cannot take the inputs, or None)
# ---------------------------------------------------------------------------------------------------------------


def refuse_floats(*tensors: Tensor | None) -> str | None:
    """The float tensors among the inputs (None: absent) are float32, bfloat16 or float16, and bfloat16 only where
    ``tl.dot`` takes it."""
    for t in tensors:
        if t is not None and t.dtype not in FLOAT_DTYPES:
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


def refuse_indices(indices: Tensor) -> str | None:
    if indices.dtype not in INDEX_DTYPES:
        return f"indices must be int32 or int64, got {indices.dtype}"
    return None


def refuse_width(width: int) -> str | None:
    # Column indices are int32 in the kernels (and the selection keys keep them in 32 bits).
    if width >= 2**31:
        return f"d_sae={width} is too wide: the triton kernels index latents with int32 (d_sae < 2**31)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------------------------------------------


def checked_grid(*axes: int) -> tuple[int, ...]:
    """The launch grid ``axes``, or a one-line ValueError naming the axis above CUDA's limit (launchers tile an
    axis that can grow with the problem with :func:`axis_chunks`; the rest refuse here instead of failing at
    launch with a CUDA error)."""
    for name, size, limit in zip("xyz", axes, GRID_LIMITS, strict=False):
        if size > limit:
            raise ValueError(
                f"the launch needs {size} programs on grid axis {name}, above the GPU's limit of {limit}: "
                "the problem is too large for the triton kernels (the reference backend runs it)"
            )
    return axes


def axis_chunks(blocks: int, axis: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` block ranges of at most the limit of grid ``axis`` covering ``range(blocks)``: one
    launch each, for an axis whose block count can pass the limit."""
    limit = GRID_LIMITS[axis]
    return [(start, min(blocks, start + limit)) for start in range(0, blocks, limit)]


# ---------------------------------------------------------------------------------------------------------------
# GPU or interpreter: block sizes and program counts
# ---------------------------------------------------------------------------------------------------------------

_assumed_sm_count: int | None = None


def assume_gpu(sm_count: int | None) -> None:
    """Launch with the GPU's block sizes and program counts for a GPU of ``sm_count`` SMs whatever the tensors'
    device (``None``: decide by the device). For the offline compile (tests/compile_for_gpu.py launches the sm_90
    build on CPU tensors) and for tests that run the GPU configurations in the interpreter."""
    global _assumed_sm_count
    _assumed_sm_count = sm_count


def gpu(t: Tensor) -> bool:
    """Compiled kernels on a GPU (block sizes for speed), else the interpreter (small blocks, few programs)."""
    return _assumed_sm_count is not None or (t.device.type == "cuda" and not INTERPRETED)


def sm_count(t: Tensor) -> int:
    if _assumed_sm_count is not None:
        return _assumed_sm_count
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def splits(row_blocks: int, n_tiles: int, t: Tensor, min_splits: int = 1) -> tuple[int, int]:
    """``(n_splits, tiles_per_split)``: split each row's column tiles so that about two waves of programs run
    (132 SMs on an H100: 16384 rows in 64-row blocks are 256 blocks, so 2 splits; 1024 rows, 17 splits). Each
    split has its own bound and warm-up tile, so splits add candidates (about 760 per split at k = 32 over 16384
    columns); few rows need many splits, many rows need few. Under the interpreter two splits, so that merging
    splits is always exercised."""
    target = 2 * sm_count(t) if gpu(t) else 2
    n_splits = max(1, min(n_tiles, max(min_splits, triton.cdiv(target, row_blocks))))
    per_split = triton.cdiv(n_tiles, n_splits)
    return triton.cdiv(n_tiles, per_split), per_split


def row_chunk(n_rows: int, width: int, t: Tensor) -> int:
    """Rows per chunk of a two-pass selection: the pre-activation and its int64 keys for 2**26 (GPU) entries at a
    time, 768 MiB in fp32, or 2**10 in the interpreter (several chunks at test sizes)."""
    budget = 1 << 26 if gpu(t) else 1 << 10
    return max(1, min(n_rows, budget // max(1, width)))


def dot_args(t: Tensor) -> dict[str, Any]:
    """The ``UPCAST_DOT`` and ``DOT_PRECISION`` constexprs of the kernels that call ``tl.dot`` on ``t``'s dtype."""
    # fp32 follows torch's own TF32 switch for matmuls (off by default: exact fp32 products); 16-bit operands
    # always run on tensor cores. The interpreter cannot multiply bfloat16 (triton-lang/triton#11584): upcast there.
    if t.dtype == torch.float32:
        precision = "tf32" if (gpu(t) and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    else:
        precision = "tf32"
    return {"UPCAST_DOT": INTERPRETED and t.dtype == torch.bfloat16, "DOT_PRECISION": precision}


# ---------------------------------------------------------------------------------------------------------------
# tensors and devices
# ---------------------------------------------------------------------------------------------------------------


def row_major(t: Tensor) -> Tensor:
    """``t`` with unit stride along its last dim (kernels index rows by one stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def on_device(fn: _Fn) -> _Fn:
    """Launch on the tensors' device: triton launches on torch's current device, which may be another GPU."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        device = next(a.device for a in args if isinstance(a, Tensor))
        if device.type == "cuda":
            with torch.cuda.device(device):
                return fn(*args)
        return fn(*args)

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# determinism of the per-latent sums
# ---------------------------------------------------------------------------------------------------------------

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

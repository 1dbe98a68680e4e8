"""The ``cuda`` backend: hand-written CUDA kernels for the memory-bound sparse work (docs/architecture.md#layers:
csrc/ knows nothing of torch).

The kernels live in ``csrc/`` and reach Python through the pybind11 extension ``fusedsae._C``, which knows nothing
of torch. This module is their launcher layer: it checks device, dtype, layout and shapes, allocates every output
(destination passing), and hands data pointers, sizes, strides (in elements) and the current stream to ``_C`` as
integers. It serves:

* ``sparse_decode``: per token, a gather of ``W_dec`` rows weighted by the values (``gather_rows``).
* ``sparse_decode_backward``: ``d_values`` as a gather-dot at the active entries (``gather_dot``) and ``dW_dec`` as
  per-latent sums over the entries sorted by latent (``segment_sum_rows``, in fixed-size chunks so that a hot latent
  is no slower than spread entries): deterministic, no float atomics.
* ``sparse_encode_backward``: ``dW_enc`` and ``db_enc`` per latent the same way (``segment_sum_columns``, written in
  ``W_enc``'s ``[d_in, d_sae]`` layout), ``dx`` a gather of ``W_enc`` columns (``gather_rows``), and
  ``db_dec = -W_enc @ db_enc`` as one cuBLAS mat-vec.
* ``row_topk``: exact radix select per row with ties to the lower index (``row_topk_select``), then a stable sort of
  the k winners by value.
* ``topk_encode``: the unfused path, a cuBLAS GEMM (torch) per row chunk followed by ``row_topk``.
* ``head_partial_sums``: per-head dot products at the selected (token, latent) pairs.
* ``matryoshka_decode_loss`` and its backward: the reconstruction and every Matryoshka prefix's squared error from
  one pass over the active entries, and the backward's ``d values``, ``dy`` and per-(token, level) suffix vectors
  from one more (``matryoshka_decode_loss``, ``matryoshka_decode_loss_backward``); ``dW_dec`` is
  ``segment_sum_rows`` over the entries re-addressed to those rows.

Sums accumulate in float32 whatever the storage dtype (float32, bfloat16, float16). In the sparse sums an entry
whose value (decoder) or gradient (encoder) is exactly 0 is skipped: it adds nothing, and BatchTopK's padding slots
(value 0, index 0) would otherwise all queue on latent 0. So, unlike the reference, 0 times a non-finite weight
gives 0 rather than NaN there. Indices must lie in ``[0, d_sae)`` (``fusedsae.functional`` checks it); the kernels
do not.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from fusedsae import reference
from fusedsae.backends import define_backend, register
from fusedsae.backends.common import first_refusal, latent_rows

# The dtype codes of csrc/bindings.cpp.
FLOAT_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INDEX_CODES: dict[torch.dtype, int] = {torch.int32: 0, torch.int64: 1}

# Written by setup.py beside the extension: {"built": bool, "reason": str, ...}.
BUILD_RECORD = Path(__file__).resolve().parent.parent / "_cuda_build.json"

_INT32_MAX = 2**31 - 1  # row_topk counts a row in 32-bit integers; CUDA grids hold at most 2^31 - 1 blocks


def build_record() -> dict[str, Any] | None:
    """What setup.py did about the extension, or None if it never ran here (a source tree on ``PYTHONPATH``)."""
    try:
        return json.loads(BUILD_RECORD.read_text())
    except (OSError, ValueError):
        return None


@functools.cache
def extension() -> tuple[ModuleType | None, str]:
    """``(fusedsae._C, "")``, or ``(None, why it cannot be used)``. Never raises."""
    try:
        return importlib.import_module("fusedsae._C"), ""
    except Exception as exc:  # a broken or missing extension must not break fusedsae
        record = build_record()
        if isinstance(exc, ModuleNotFoundError) and exc.name == "fusedsae._C":
            if record is None:
                return None, "not compiled: setup.py never ran here (install fusedsae with pip to build fusedsae._C)"
            if not record.get("built"):
                return None, f"not compiled: {record.get('reason', 'no reason recorded')}"
        return None, f"import failed: {type(exc).__name__}: {exc}"


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


@functools.cache
def availability() -> tuple[bool, str]:
    """Whether the kernels can run here, and why (not). Asks the CUDA runtime linked into the extension, so it
    answers even where torch has no CUDA."""
    module, why = extension()
    if module is None:
        return False, why
    archs = ", ".join(f"sm_{a}" for a in module.ARCHS.split(";") if a)
    built = f"compiled for {archs} with CUDA {_cuda_version(module.CUDA_VERSION)}"
    info = module.runtime_info()
    driver, runtime = info["driver_version"], info["runtime_version"]
    if driver == 0:
        return False, f"{built}; no GPU (no NVIDIA driver)"
    if driver // 1000 < runtime // 1000:
        return False, (
            f"{built}; no usable GPU: the NVIDIA driver supports CUDA {_cuda_version(driver)} only; update the "
            f"driver or rebuild with the nvcc of CUDA {driver // 1000} (CUDA_HOME=... pip install -e .)"
        )
    count = info["device_count"]
    if count == 0:
        return False, f"{built}; no GPU ({info['error'] or 'the CUDA runtime sees no device'})"
    if not torch.cuda.is_available():
        return False, f"{built}; {count} GPU(s), but torch {torch.__version__} has no CUDA support"
    # a GPU the build has no code for (e.g. sm_75 with the default 80;90) is usable by no op
    refusal = _device_refusal(torch.cuda.current_device())
    if refusal is not None:
        return False, f"{built}; {refusal}"
    return True, f"{built}; {count} GPU(s)"


backend = define_backend("cuda", availability, devices=("cuda",))


def _lib() -> ModuleType:
    module, why = extension()
    if module is None:
        raise RuntimeError(f"the cuda backend cannot run: {why}")
    return module


# ---------------------------------------------------------------------------------------------------------------
# checks (each returns why the kernels cannot take the inputs, or None)
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _device_refusal(index: int) -> str | None:
    with torch.cuda.device(index):
        error = _lib().kernel_image_error()
    if not error:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (
        f"fusedsae._C has no code for {torch.cuda.get_device_name(index)} (sm_{major}{minor}; built for "
        f"{_lib().ARCHS}): reinstall with FUSEDSAE_CUDA_ARCHS={major}{minor} ({error})"
    )


def _refuse_device(**tensors: Tensor | None) -> str | None:
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device.type != "cuda":
            return f"the cuda kernels take CUDA tensors, but {name} is on {t.device}"
        if t.device != first.device:
            return f"{name} is on {t.device} but {first_name} is on {first.device}"
    return _device_refusal(first.device.index)


def _refuse_floats(**tensors: Tensor | None) -> str | None:
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    if first.dtype not in FLOAT_CODES:
        return f"the cuda kernels take float32, bfloat16 or float16, but {first_name} is {first.dtype}"
    for name, t in present.items():
        if t.dtype != first.dtype:
            return f"{name} is {t.dtype} but {first_name} is {first.dtype}; the cuda kernels take one dtype"
    return None


def _refuse_sparse(values: Tensor, indices: Tensor, table_rows: int) -> str | None:
    if values.dim() != 2 or indices.shape != values.shape:
        return f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must be one [N, m] shape"
    if indices.dtype not in INDEX_CODES:
        return f"indices must be int32 or int64, got {indices.dtype}"
    if values.shape[0] > _INT32_MAX or table_rows > _INT32_MAX:
        return f"at most 2^31 - 1 rows and latents, got {values.shape[0]} rows and {table_rows} latents"
    return None


# ---------------------------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------------------------


def _row_major(t: Tensor) -> Tensor:
    """``t`` if its elements are contiguous along the last dim (rows may be strided, e.g. a column slice), else a
    contiguous copy; the kernels take a row stride but read each row as one run."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(t: Tensor) -> int:
    """The handle of torch's current stream on ``t``'s device: the kernels queue behind torch's own work."""
    return torch.cuda.current_stream(t.device).cuda_stream


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s GPU current, so that the extension's CUDA runtime launches on the context of ``t``'s stream."""
    return torch.cuda.device(t.device)


def _segments(
    indices: Tensor, n_latents: int, d: int, order: Tensor | None, keys: Tensor | None, offsets: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The entries of ``indices [N, m]`` grouped by latent (:func:`fusedsae.reference.latent_segments`, unless the
    caller passes them: one sort per step) and the float32 scratch of the chunked sums: ``(order, keys, offsets,
    part [chunks, 2, d], part_sum [chunks, 2])``. Zero-weight entries (BatchTopK padding) stay in their segments:
    the kernels skip their rows, and the chunking keeps a crowded latent 0 cheap."""
    if order is None or keys is None or offsets is None:
        order, keys, offsets = reference.latent_segments(indices, n_latents)
    chunks = -(-order.numel() // _lib().SEGMENT_CHUNK)
    part = torch.empty(chunks, 2, d, dtype=torch.float32, device=indices.device)
    part_sum = torch.empty(chunks, 2, dtype=torch.float32, device=indices.device)
    return order, keys.contiguous(), offsets, part, part_sum


# ---------------------------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------------------------


def supports_sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> str | None:
    return first_refusal(
        _refuse_device(values=values, indices=indices, W_dec=W_dec, b_dec=b_dec),
        _refuse_floats(values=values, W_dec=W_dec, b_dec=b_dec),
        _refuse_sparse(values, indices, W_dec.shape[0]),
    )


@register("cuda", "sparse_decode", supports=supports_sparse_decode)
def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``[N, m] -> [N, d_in]``: ``x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec``."""
    values, indices = _row_major(values), _row_major(indices)
    bias = None if b_dec is None else b_dec.contiguous()
    n, m = values.shape
    d_in = W_dec.shape[1]
    out = values.new_empty(n, d_in)
    with _device_guard(values):
        _lib().gather_rows(
            dtype=FLOAT_CODES[values.dtype], index_dtype=INDEX_CODES[indices.dtype],
            out=out.data_ptr(), out_stride=d_in,
            values=values.data_ptr(), values_stride=values.stride(0),
            indices=indices.data_ptr(), indices_stride=indices.stride(0),
            table=W_dec.data_ptr(), table_stride_latent=W_dec.stride(0), table_stride_feature=W_dec.stride(1),
            bias=_ptr(bias), n_rows=n, m=m, d=d_in, stream=_stream(values),
        )  # fmt: skip
    return out


def supports_sparse_decode_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, *_segments: Tensor | None
) -> str | None:
    return first_refusal(
        _refuse_device(grad_out=grad_out, values=values, indices=indices, W_dec=W_dec),
        _refuse_floats(grad_out=grad_out, values=values, W_dec=W_dec),
        _refuse_sparse(values, indices, W_dec.shape[0]),
    )


@register("cuda", "sparse_decode_backward", supports=supports_sparse_decode_backward)
def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    order: Tensor | None = None,
    keys: Tensor | None = None,
    offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(d_values [N, m], dW_dec [d_sae, d_in])`` given ``grad_out [N, d_in]``; ``dW_dec`` is bitwise
    reproducible (chunked per-latent sums combined in a fixed order). ``order, keys, offsets``: the latent
    segments of ``indices`` if the caller has them."""
    grad_out, values, indices = _row_major(grad_out), _row_major(values), _row_major(indices)
    n, m = values.shape
    d_sae, d_in = W_dec.shape
    dtype, index_dtype = FLOAT_CODES[values.dtype], INDEX_CODES[indices.dtype]
    d_values = grad_out.new_empty(n, m)
    dW_dec = grad_out.new_empty(d_sae, d_in)
    order, keys, offsets, part, _ = _segments(indices, d_sae, d_in, order, keys, offsets)
    with _device_guard(values):
        stream = _stream(values)
        _lib().gather_dot(
            dtype=dtype, index_dtype=index_dtype,
            out=d_values.data_ptr(), out_stride=m,
            vectors=grad_out.data_ptr(), vectors_stride=grad_out.stride(0),
            indices=indices.data_ptr(), indices_stride=indices.stride(0),
            table=W_dec.data_ptr(), table_stride_latent=W_dec.stride(0), table_stride_feature=W_dec.stride(1),
            n_rows=n, m=m, d=d_in, stream=stream,
        )  # fmt: skip
        _lib().segment_sum_rows(
            dtype=dtype,
            out=dW_dec.data_ptr(), order=order.data_ptr(), keys=keys.data_ptr(), offsets=offsets.data_ptr(),
            n_entries=order.numel(), part=part.data_ptr(),
            weights=values.data_ptr(), weights_stride=values.stride(0), m=m,
            src=grad_out.data_ptr(), src_stride=grad_out.stride(0),
            n_latents=d_sae, d=d_in, stream=stream,
        )  # fmt: skip
    return d_values, dW_dec


def supports_sparse_encode_backward(
    grad: Tensor,
    indices: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor | None,
    need_dx: bool,
    *_segments: Tensor | None,
) -> str | None:
    return first_refusal(
        _refuse_device(grad=grad, indices=indices, x=x, W_enc=W_enc, b_dec=b_dec),
        _refuse_floats(grad=grad, x=x, W_enc=W_enc, b_dec=b_dec),
        _refuse_sparse(grad, indices, W_enc.shape[1]),
    )


@register("cuda", "sparse_encode_backward", supports=supports_sparse_encode_backward)
def sparse_encode_backward(
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
    """``(dx [N, d_in] or [0], dW_enc [d_in, d_sae], db_enc [d_sae], db_dec [d_in] or [0])`` from ``grad [N, m]``,
    the gradient at the active pre-activations ``indices [N, m]``; see
    :func:`fusedsae.reference.sparse_encode_backward`."""
    grad, indices, x = _row_major(grad), _row_major(indices), _row_major(x)
    sub = None if b_dec is None else b_dec.contiguous()
    n, m = grad.shape
    d_in, d_sae = W_enc.shape
    dtype, index_dtype = FLOAT_CODES[grad.dtype], INDEX_CODES[indices.dtype]
    dW_enc = x.new_empty(d_in, d_sae)
    db_enc = grad.new_empty(d_sae)
    order, keys, offsets, part, part_sum = _segments(indices, d_sae, d_in, order, keys, offsets)
    with _device_guard(grad):
        stream = _stream(grad)
        _lib().segment_sum_columns(
            dtype=dtype,
            out=dW_enc.data_ptr(), out_sum=db_enc.data_ptr(), order=order.data_ptr(), keys=keys.data_ptr(),
            offsets=offsets.data_ptr(), n_entries=order.numel(), part=part.data_ptr(), part_sum=part_sum.data_ptr(),
            weights=grad.data_ptr(), weights_stride=grad.stride(0), m=m,
            src=x.data_ptr(), src_stride=x.stride(0), sub=_ptr(sub),
            n_latents=d_sae, d=d_in, stream=stream,
        )  # fmt: skip
        # Reduce over the batch first, then one mat-vec (d_in * d_sae multiply-adds, not N * m * d_in).
        db_dec = -(W_enc @ db_enc) if b_dec is not None else grad.new_empty(0)
        if need_dx:
            table, stride_latent, stride_feature = latent_rows(W_enc, n * m)
            dx = x.new_empty(n, d_in)
            _lib().gather_rows(
                dtype=dtype, index_dtype=index_dtype,
                out=dx.data_ptr(), out_stride=d_in,
                values=grad.data_ptr(), values_stride=grad.stride(0),
                indices=indices.data_ptr(), indices_stride=indices.stride(0),
                table=table.data_ptr(), table_stride_latent=stride_latent, table_stride_feature=stride_feature,
                bias=0, n_rows=n, m=m, d=d_in, stream=stream,
            )  # fmt: skip
        else:
            dx = grad.new_empty(0)
    return dx, dW_enc, db_enc, db_dec


def supports_row_topk(scores: Tensor, k: int) -> str | None:
    reason = first_refusal(_refuse_device(scores=scores), _refuse_floats(scores=scores))
    if reason is None and scores.dim() != 2:
        return f"scores must be [N, M], got shape {tuple(scores.shape)}"
    if reason is None and not 1 <= k <= scores.shape[1] <= _INT32_MAX:
        return f"row_topk needs 1 <= k <= M <= 2^31 - 1, got k={k}, M={scores.shape[1]}"
    if reason is None and scores.shape[0] > _INT32_MAX:
        return f"at most 2^31 - 1 rows, got {scores.shape[0]}"
    return reason


@register("cuda", "row_topk", supports=supports_row_topk)
def row_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``[N, M] -> (values [N, k], indices [N, k] int64)``: the k largest of each row, ties to the lower index,
    sorted by value (descending) then index."""
    scores = _row_major(scores)
    n, width = scores.shape
    values = scores.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.int64, device=scores.device)
    with _device_guard(scores):
        _lib().row_topk_select(
            dtype=FLOAT_CODES[scores.dtype],
            values=values.data_ptr(), indices=indices.data_ptr(),
            scores=scores.data_ptr(), scores_stride=scores.stride(0),
            n_rows=n, width=width, k=k, stream=_stream(scores),
        )  # fmt: skip
    # The kernel lists the k winners in index order, so a stable sort by value leaves equal values by index.
    values, perm = torch.sort(values, dim=1, descending=True, stable=True)
    return values, indices.gather(1, perm)


def supports_topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    aux_k: int,
    aux_mask: Tensor | None,
) -> str | None:
    d_sae = W_enc.shape[1]
    return first_refusal(
        _refuse_device(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, aux_mask=aux_mask),
        _refuse_floats(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec),
        None if 1 <= k <= d_sae <= _INT32_MAX else f"TopK needs 1 <= k <= d_sae <= 2^31 - 1, got k={k}, d_sae={d_sae}",
        None if 0 <= aux_k <= d_sae else f"aux_k={aux_k} is out of [0, d_sae={d_sae}]",
    )


@register("cuda", "topk_encode", supports=supports_topk_encode)
def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    aux_k: int,
    aux_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The unfused TopK encoder: cuBLAS GEMM (torch) then :func:`row_topk`, over the same row chunks as the
    reference (so the pre-activations, and hence the selections, are the reference's); AuxK from the same chunk."""
    return reference.chunked_topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, aux_mask, row_topk)


def supports_head_partial_sums(
    x: Tensor, W_enc: Tensor, b_dec: Tensor | None, indices: Tensor, n_heads: int
) -> str | None:
    reason = first_refusal(
        _refuse_device(x=x, W_enc=W_enc, b_dec=b_dec, indices=indices),
        _refuse_floats(x=x, W_enc=W_enc, b_dec=b_dec),
    )
    if reason is None and indices.dtype not in INDEX_CODES:
        return f"indices must be int32 or int64, got {indices.dtype}"
    if reason is None and (indices.dim() != 2 or indices.shape[0] > _INT32_MAX):
        return f"indices must be [N, m] with N <= 2^31 - 1, got shape {tuple(indices.shape)}"
    if reason is None and (n_heads < 1 or W_enc.shape[0] % n_heads):
        return f"n_heads={n_heads} must divide d_in={W_enc.shape[0]}"
    return reason


@register("cuda", "head_partial_sums", supports=supports_head_partial_sums)
def head_partial_sums(x: Tensor, W_enc: Tensor, b_dec: Tensor | None, indices: Tensor, n_heads: int) -> Tensor:
    """``[N, m, n_heads]``: ``out[n, j, h] = (x[n] - b_dec)_h · W_enc[h-block, indices[n, j]]``
    (docs/architecture.md#attribution)."""
    x, indices = _row_major(x), _row_major(indices)
    sub = None if b_dec is None else b_dec.contiguous()
    n, m = indices.shape
    d_in = W_enc.shape[0]
    out = x.new_empty(n, m, n_heads)
    table, stride_latent, stride_feature = latent_rows(W_enc, n * m)
    with _device_guard(x):
        _lib().head_partial_sums(
            dtype=FLOAT_CODES[x.dtype], index_dtype=INDEX_CODES[indices.dtype],
            out=out.data_ptr(), x=x.data_ptr(), x_stride=x.stride(0), sub=_ptr(sub),
            indices=indices.data_ptr(), indices_stride=indices.stride(0),
            table=table.data_ptr(), table_stride_latent=stride_latent, table_stride_feature=stride_feature,
            n_rows=n, m=m, n_heads=n_heads, d_head=d_in // n_heads, stream=_stream(x),
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# matryoshka_decode_loss (csrc/matryoshka.cu): one block per token and column block
# ---------------------------------------------------------------------------------------------------------------


def supports_matryoshka_decode_loss(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, y: Tensor, widths: list[int]
) -> str | None:
    return first_refusal(
        _refuse_device(values=values, indices=indices, W_dec=W_dec, b_dec=b_dec, y=y),
        _refuse_floats(values=values, W_dec=W_dec, b_dec=b_dec, y=y),
        _refuse_sparse(values, indices, W_dec.shape[0]),
    )


def supports_matryoshka_decode_loss_backward(
    grad_recon: Tensor | None,
    grad_sq: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    y: Tensor,
    recon: Tensor,
    *_rest: Any,
) -> str | None:
    return first_refusal(
        _refuse_device(grad_recon=grad_recon, grad_sq=grad_sq, values=values, indices=indices, W_dec=W_dec, y=y),
        _refuse_floats(grad_recon=grad_recon, grad_sq=grad_sq, values=values, W_dec=W_dec, y=y, recon=recon),
        _refuse_sparse(values, indices, W_dec.shape[0]),
    )


def _matryoshka_args(runs: reference.LevelRuns, W_dec: Tensor, y: Tensor) -> dict[str, int]:
    """The keyword arguments of ``MatryoshkaArgs`` (csrc/fusedsae.h) shared by both launchers: the code in latent
    order with its level runs (:func:`fusedsae.reference.level_runs`)."""
    values, indices = runs.values, runs.indices
    return {
        "dtype": FLOAT_CODES[values.dtype], "index_dtype": INDEX_CODES[indices.dtype],
        "values": values.data_ptr(), "values_stride": values.stride(0),
        "indices": indices.data_ptr(), "indices_stride": indices.stride(0),
        "ends": runs.ends.data_ptr(), "ends_stride": runs.ends.stride(0),
        "table": W_dec.data_ptr(), "table_stride": W_dec.stride(0),
        "y": y.data_ptr(), "y_stride": y.stride(0),
        "n_rows": indices.shape[0], "m": indices.shape[1], "d": W_dec.shape[1],
    }  # fmt: skip


def _column_blocks(d: int) -> int:
    # the kernels' column blocks never exceed this (MATRYOSHKA_COLUMNS per block); partial buffers are zero-filled
    return -(-d // _lib().MATRYOSHKA_COLUMNS)


@register("cuda", "matryoshka_decode_loss", supports=supports_matryoshka_decode_loss)
def matryoshka_decode_loss(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, y: Tensor, widths: list[int]
) -> tuple[Tensor, Tensor]:
    """``(recon [N, d_out], sq_err [N, L])``; see :func:`fusedsae.reference.matryoshka_decode_loss`. Each column
    block's share of the squared errors is summed over the blocks in order (deterministic)."""
    values, indices, W_dec, y = _row_major(values), _row_major(indices), W_dec.contiguous(), _row_major(y)
    bias = None if b_dec is None else b_dec.contiguous()
    n, d, levels = indices.shape[0], W_dec.shape[1], len(widths)
    runs = reference.level_runs(values, indices, widths)
    recon = y.new_empty(n, d)
    sq_part = torch.zeros(_column_blocks(d), n, levels, dtype=torch.float32, device=y.device)
    with _device_guard(values):
        _lib().matryoshka_decode_loss(
            recon=recon.data_ptr(), recon_stride=recon.stride(0), sq_part=sq_part.data_ptr(),
            bias=_ptr(bias), n_levels=levels, stream=_stream(values),
            **_matryoshka_args(runs, W_dec, y),
        )  # fmt: skip
    return recon, sq_part.sum(0).to(y.dtype)


@register("cuda", "matryoshka_decode_loss_backward", supports=supports_matryoshka_decode_loss_backward)
def matryoshka_decode_loss_backward(
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
    :func:`fusedsae.reference.matryoshka_decode_loss_backward`. One kernel walks the levels last to first and
    writes the suffix vectors ``S [N, L, d_out]``; ``dW_dec`` is ``segment_sum_rows`` over the entries re-addressed
    to ``(token, level)`` rows (:func:`fusedsae.reference.level_segments`): deterministic, no atomics."""
    values, indices, W_dec = _row_major(values), _row_major(indices), W_dec.contiguous()
    y, recon, grad_sq = _row_major(y), _row_major(recon), grad_sq.contiguous()
    grad_recon = None if grad_recon is None else _row_major(grad_recon)
    (n, m), (d_sae, d), levels = indices.shape, W_dec.shape, len(widths)
    level = reference.matryoshka_levels(indices, widths)
    runs = reference.level_runs(values, indices, widths)
    suffix = y.new_zeros(n, levels, d)
    dy = y.new_zeros(n, d)
    dv_part = torch.zeros(_column_blocks(d), n, m, dtype=torch.float32, device=y.device)
    dW_dec = y.new_empty(d_sae, d)
    order, keys, offsets, part, _ = _segments(indices, d_sae, d, order, keys, offsets)
    by_level = reference.level_segments(reference.Segments(order, keys, offsets), level, levels)
    # the segment sum's weight for entry (n * L + l, j) of the re-addressed layout is values[n, j]
    weights = values[:, None, :].expand(n, levels, m).contiguous()
    with _device_guard(values):
        stream = _stream(values)
        _lib().matryoshka_decode_loss_backward(
            dv_part=dv_part.data_ptr(), suffix=suffix.data_ptr(), dy=dy.data_ptr(), dy_stride=dy.stride(0),
            recon=recon.data_ptr(), recon_stride=recon.stride(0),
            grad_recon=_ptr(grad_recon), grad_recon_stride=0 if grad_recon is None else grad_recon.stride(0),
            grad_sq=grad_sq.data_ptr(), grad_sq_stride=grad_sq.stride(0), n_levels=levels, stream=stream,
            **_matryoshka_args(runs, W_dec, y),
        )  # fmt: skip
        _lib().segment_sum_rows(
            dtype=FLOAT_CODES[values.dtype],
            out=dW_dec.data_ptr(), order=by_level.order.data_ptr(), keys=keys.data_ptr(), offsets=offsets.data_ptr(),
            n_entries=order.numel(), part=part.data_ptr(),
            weights=weights.data_ptr(), weights_stride=m, m=m,
            src=suffix.data_ptr(), src_stride=d,
            n_latents=d_sae, d=d, stream=stream,
        )  # fmt: skip
    db_dec = suffix[:, 0].sum(0, dtype=torch.float32).to(y.dtype)
    # the kernel wrote d values in each row's sorted slot order: back to the caller's slots
    d_values = torch.empty_like(values).scatter_(1, runs.perm, dv_part.sum(0).to(values.dtype))
    return d_values, dW_dec, db_dec, dy

"""One safetensors file written by several ranks, each from the slice it holds, without gathering any tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header (padded with spaces to a multiple of 8
bytes) giving each tensor's dtype, shape and byte range, then the raw little-endian bytes of the tensors, one
after another. Every rank computes the same header from the whole tensors' shapes, so each knows where its slice
lives: a latent slice of ``W_dec [d_sae, d_in]`` (rows) is one contiguous range, a slice of ``W_enc [d_in, d_sae]``
(columns) is one range per row of ``W_enc``, interleaved with the other ranks' ranges. Each rank writes its ranges
at their offsets into the same file (its folder must be on a filesystem every rank sees, as resuming already
needs), copying at most :data:`BLOCK_BYTES` to host memory at a time; the first rank writes the header and the
unsliced tensors. Memory on any rank stays O(its slice).

The header is the one ``safetensors.torch.save_file`` writes for the gathered tensors (same tensor order, same
JSON, same padding), so the file is byte for byte the one a single process writes; ``tests/test_sharding.py``
compares the two files, and :func:`safetensors_header` against the library's own output for every dtype.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BLOCK_BYTES", "SAFETENSORS_DTYPES", "SlicedTensor", "safetensors_header", "write_sliced_safetensors"]

# The safetensors name of each torch dtype, listed in the order the library stores tensors of different dtypes
# (the reverse of its Rust enum ``Dtype``; within one dtype, by name).
SAFETENSORS_DTYPES = {
    torch.int64: "I64",
    torch.float64: "F64",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ORDER = {dtype: i for i, dtype in enumerate(SAFETENSORS_DTYPES)}

# Host memory one write may copy (a block of rows of a slice): 64 MiB keeps a rank's extra memory during a save
# small next to its slice (a 4096 x 1M-latent fp32 slice of W_enc is 16 GiB) while each write stays large enough
# for the disk (a W_enc row of a 1M-latent fp32 slice is 4 MiB).
BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class SlicedTensor:
    """This rank's part of one tensor of a file: ``local`` is the whole tensor's slice ``[start, start + n)``
    along ``dim``, of a whole size ``full`` there. ``dim=None``: ``local`` is the whole tensor (replicated on
    every rank), written by the first rank only."""

    local: Tensor
    dim: int | None = None
    start: int = 0
    full: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole tensor's shape."""
        shape = list(self.local.shape)
        if self.dim is not None:
            shape[self.dim] = self.full
        return tuple(shape)


def safetensors_header(
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """What ``safetensors.torch.save_file`` writes before the tensors' bytes, for tensors of these dtypes and
    shapes: ``(prefix, offsets)`` with ``prefix`` the 8-byte length and the padded JSON header, and ``offsets``
    each tensor's first byte in the file. The file is ``len(prefix) + sum of the tensors' bytes`` long."""
    unknown = sorted(name for name, (dtype, _) in specs.items() if dtype not in SAFETENSORS_DTYPES)
    if unknown:
        raise ValueError(f"tensors {unknown} have a dtype the sharded safetensors writer does not handle")
    order = sorted(specs, key=lambda name: (_ORDER[specs[name][0]], name))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    starts, position = {}, 0
    for name in order:
        dtype, shape = specs[name]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [position, position + size],
        }
        starts[name] = position
        position += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the library pads the header so the tensors start 8-byte aligned
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {name: len(prefix) + start for name, start in starts.items()}


def _host_bytes(t: Tensor) -> memoryview:
    """The raw bytes of ``t`` (little-endian on every platform torch supports, as safetensors stores them)."""
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_part(f, offset: int, part: SlicedTensor) -> None:
    """Writes ``part`` into the file ``f`` whose tensor starts at byte ``offset``, copying a block at a time."""
    local, shape = part.local.detach(), part.shape
    esize = local.element_size()
    if part.dim is None:
        outer, width, start, full = 1, local.numel(), 0, local.numel()
    else:
        # the slice as [outer, width] rows: its row o is the whole tensor's row o (of `full` elements) from `start`
        inner = math.prod(shape[part.dim + 1 :])
        outer = math.prod(shape[: part.dim])
        width, start, full = local.shape[part.dim] * inner, part.start * inner, part.full * inner
    if outer * width == 0:
        return
    if width == full:  # one contiguous range of the file
        flat = local.reshape(-1)
        step = max(1, BLOCK_BYTES // esize)
        for i in range(0, flat.numel(), step):
            f.seek(offset + i * esize)
            f.write(_host_bytes(flat[i : i + step]))
        return
    rows = local.reshape(outer, width)
    line = width * esize
    step = max(1, BLOCK_BYTES // line)
    for first in range(0, outer, step):
        block = _host_bytes(rows[first : first + step])
        for r in range(block.nbytes // line):
            f.seek(offset + ((first + r) * full + start) * esize)
            f.write(block[r * line : (r + 1) * line])


def write_sliced_safetensors(path: str | os.PathLike[str], tensors: dict[str, SlicedTensor], first: bool) -> None:
    """Writes this rank's parts of the safetensors file ``path`` (every rank holding a slice calls it with the
    same names, dtypes and whole shapes; ``first`` on exactly one of them, which also writes the header and the
    unsliced tensors). The file is complete, and fsynced, once every rank has returned: the caller waits for all
    of them (a barrier) before using it. No rank truncates what another wrote, in whatever order they run."""
    if sys.byteorder != "little":  # pragma: no cover - torch's platforms are little-endian
        raise OSError("the sharded safetensors writer needs a little-endian host (safetensors is little-endian)")
    prefix, offsets = safetensors_header({name: (t.local.dtype, t.shape) for name, t in tensors.items()})
    total = len(prefix) + sum(math.prod(t.shape) * t.local.element_size() for t in tensors.values())
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as f:
        if first:
            f.write(prefix)
            f.truncate(total)  # only ever extends: every rank writes inside [0, total)
        for name, part in tensors.items():
            if part.dim is not None or first:
                _write_part(f, offsets[name], part)
        f.flush()
        os.fsync(f.fileno())

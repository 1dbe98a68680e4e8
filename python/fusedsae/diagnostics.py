"""Diagnostics for the training step: counting the operations that make the host wait for the GPU.

A host synchronisation stalls the CPU until the GPU has drained its queue: the next kernels cannot be queued ahead,
Triton's Python launch overhead (0.2-0.5 ms per step at 768 -> 32768) becomes exposed, and the step cannot be
captured in a CUDA graph. :class:`HostSyncCounter` counts, on any device (the CPU included, so a CPU test can prove a
GPU property), the ATen operations that synchronise when their tensors live on a CUDA device::

    with HostSyncCounter() as syncs:
        out = sae.training_forward(x, dead_mask=dead)
        out.loss.backward()
    assert syncs.count == 0, syncs.by_op

It sees inside fusedsae's registered ops (``torch.ops.fusedsae.*``) too: their implementations run below the
dispatcher's Python key, where a plain dispatch mode is switched off, so the counter re-enters itself around them.
``Tensor.tolist()`` and ``Tensor.numpy()`` of a CPU tensor dispatch no ATen op at all, so while the counter is
active it also wraps those two methods (a CUDA tensor's are seen as their device-to-host ``_to_copy``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ATen ops whose CUDA implementation reads a device value back to the host (or waits for the device):
# the scalar read behind .item()/int()/bool() (_local_scalar_dense, is_nonzero, item, equal), and ops whose output
# shape depends on the data (nonzero, masked_select, unique, bincount without minlength reads min/max, and
# repeat_interleave without output_size sums the repeats on the host).
SYNC_OPS: frozenset[str] = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.item",
        "aten.is_nonzero",
        "aten.equal",
        "aten.nonzero",
        "aten.masked_select",
        "aten.bincount",
        "aten.unique",
        "aten._unique",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.unique_dim_consecutive",
    }
)


def _tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    return [a for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]


def syncs_on_cuda(func: Any, args: tuple, kwargs: dict | None) -> bool:
    """Whether ATen op ``func`` called with ``args`` synchronises the host when its tensors are on a CUDA device."""
    name = str(func.overloadpacket)
    if name in SYNC_OPS:
        return True
    if name == "aten.repeat_interleave":  # the total length is summed on the host unless output_size is given
        return (kwargs or {}).get("output_size") is None and not (len(args) > 3 and args[3] is not None)
    if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        # boolean-mask indexing (x[mask], x[mask] = v) turns the mask into indices with nonzero
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name in ("aten._to_copy", "aten.copy_"):
        # a blocking device -> host copy (.cpu(), .tolist(), .numpy() after .cpu())
        tensors = _tensors(args, kwargs)
        src = tensors[-1] if name == "aten.copy_" else tensors[0] if tensors else None
        dst_cpu = (name == "aten.copy_" and tensors[0].device.type == "cpu") or (
            name == "aten._to_copy" and str((kwargs or {}).get("device", "")) == "cpu"
        )
        non_blocking = bool((kwargs or {}).get("non_blocking", False))
        return src is not None and src.device.type == "cuda" and dst_cpu and not non_blocking
    return False


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that counts the operations that would synchronise the host on CUDA.

    Attributes:
        count: number of synchronising operations seen.
        by_op: ``{op name: count}``, e.g. ``{"aten._local_scalar_dense": 2, "aten.bincount": 3}``.
    """

    # Tensor methods that read a tensor to the host without dispatching an ATen op when it is on the CPU
    _HOST_READS = ("tolist", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_op: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, Any] = {}
        self._depth = 0  # the mode re-enters itself around registered ops; the methods are restored at depth 0

    def _counted(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.device.type != "cuda":  # on CUDA the _to_copy inside is counted already
                self.count += 1
                self.by_op[f"Tensor.{name}"] += 1
            return method(tensor, *args, **kwargs)

        return read

    def __enter__(self) -> HostSyncCounter:
        if not self._saved:  # re-entered around registered ops: wrap once
            for name in self._HOST_READS:
                self._saved[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, self._counted(name, self._saved[name]))
        self._depth += 1
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:
            for name, method in self._saved.items():
                setattr(torch.Tensor, name, method)
            self._saved.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("aten", "prim", "prims"):
            if syncs_on_cuda(func, args, kwargs):
                self.count += 1
                self.by_op[str(func.overloadpacket)] += 1
            return func(*args, **kwargs)
        tensors = _tensors(args, kwargs)
        if not tensors:
            return func(*args, **kwargs)
        # A registered (custom) op: the mode is popped while this handler runs, so the ATen ops inside its
        # implementation would go uncounted. Re-enter the mode and send the op straight to its device kernel
        # (calling func again would come back here forever).
        key = torch._C.DispatchKey.CUDA if tensors[0].device.type == "cuda" else torch._C.DispatchKey.CPU
        with self:
            return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)

    def reset(self) -> None:
        self.count = 0
        self.by_op.clear()


def count_host_syncs(fn: Callable[[], Any]) -> HostSyncCounter:
    """Runs ``fn()`` once under a :class:`HostSyncCounter` and returns the counter (``.count``, ``.by_op``)."""
    with HostSyncCounter() as counter:
        fn()
    return counter

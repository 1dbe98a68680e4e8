"""Backends and the per-op dispatcher (docs/architecture.md#dispatch).

Three backends may serve each op: ``reference`` (pure PyTorch, any device), ``triton`` (CUDA tensors; CPU tensors
too when explicitly requested under ``TRITON_INTERPRET=1``) and ``cuda`` (the pybind11 extension ``fusedsae._C``).
A backend module registers one implementation per op it serves, where it is defined (``@register(backend, op,
supports=supports_<op>)``), with a ``supports_<op>(*args)`` check that returns why it cannot take given inputs (or
None); decisions that two backends make are made once in :mod:`fusedsae.backends.common`.

``FUSEDSAE_BACKEND=auto|reference|triton|cuda`` (or :func:`use`) chooses: ``auto`` takes, per op, the first backend
in :data:`AUTO_ORDER` that can run the inputs and falls back silently; a named backend that cannot run them raises
:class:`BackendError` with every reason. :func:`report` says what is usable here and why not.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

BACKEND_NAMES: tuple[str, ...] = ("reference", "triton", "cuda")
_MODULES = {name: f"fusedsae.backends.{name}" for name in BACKEND_NAMES}

# The op list, defined here once: ops.py defines ``torch.ops.fusedsae.<op>`` for each entry (tests/test_ops.py
# checks both ways), :func:`register` refuses any other name, and the reference backend registers
# ``fusedsae.reference.<op>`` for each. A new op starts here (docs/architecture.md#backends).
OPS: tuple[str, ...] = (
    "encode_dense",
    "topk_encode",
    "batchtopk_encode",
    "sparse_encode_backward",
    "sparse_decode",
    "sparse_decode_backward",
    "matryoshka_decode_loss",
    "matryoshka_decode_loss_backward",
    "row_topk",
    "jumprelu",
    "jumprelu_backward",
    "step",
    "step_backward",
    "head_partial_sums",
)

# auto's preference per op (first usable wins); ops not listed use DEFAULT_ORDER. triton serves every op on CUDA
# tensors (checked against the reference in the interpreter and compiled for sm_90 in CI). cuda, the alternative
# for the sparse ops, joins an op's order only where its GPU tests pass and benchmarks/results/ show it faster
# than triton; until then it runs only when asked for by name.
DEFAULT_ORDER: tuple[str, ...] = ("triton", "reference")
AUTO_ORDER: dict[str, tuple[str, ...]] = {}


class BackendError(RuntimeError):
    """A backend was requested explicitly but cannot run the given inputs."""


Supports = Callable[..., "str | None"]


@dataclass
class Implementation:
    fn: Callable[..., Any]
    supports: Supports | None = None


@dataclass
class Backend:
    """One backend: whether it can run here at all (``availability``), and its per-op implementations."""

    name: str
    availability: Callable[[], tuple[bool, str]]
    # Device types whose tensors the backend takes under ``auto``; an explicit request may add more (Triton's
    # interpreter runs CPU tensors).
    devices: tuple[str, ...] = ("cuda",)
    explicit_devices: tuple[str, ...] = ("cuda",)
    impls: dict[str, Implementation] = field(default_factory=dict)


_BACKENDS: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_OVERRIDE: list[str] = []


def define_backend(
    name: str,
    availability: Callable[[], tuple[bool, str]],
    devices: tuple[str, ...] = ("cuda",),
    explicit_devices: tuple[str, ...] | None = None,
) -> Backend:
    """Called once by each backend module."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; known: {BACKEND_NAMES}")
    backend = Backend(name, availability, devices, explicit_devices or devices)
    _BACKENDS[name] = backend
    return backend


def register(backend: str, op: str, supports: Supports | None = None) -> Callable[[Callable], Callable]:
    """Decorator: registers ``fn`` as ``backend``'s implementation of ``op``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")

    def decorator(fn: Callable) -> Callable:
        _BACKENDS[backend].impls[op] = Implementation(fn, supports)
        return fn

    return decorator


def _load(name: str) -> Backend | None:
    if name not in _BACKENDS and name not in _IMPORT_ERRORS:
        try:
            importlib.import_module(_MODULES[name])
        except Exception as exc:  # a backend that fails to import must not break fusedsae
            _IMPORT_ERRORS[name] = f"import of {_MODULES[name]} failed: {type(exc).__name__}: {exc}"
    return _BACKENDS.get(name)


def requested() -> str:
    """The backend asked for: the innermost :func:`use`, else ``$FUSEDSAE_BACKEND``, else ``auto``."""
    name = _OVERRIDE[-1] if _OVERRIDE else os.environ.get("FUSEDSAE_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKEND_NAMES:
        raise BackendError(f"FUSEDSAE_BACKEND={name!r} is not one of auto, {', '.join(BACKEND_NAMES)}")
    return name


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Context manager that forces a backend (``"auto"`` restores automatic choice) for the ops run inside."""
    if name != "auto" and name not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}; use auto or one of {BACKEND_NAMES}")
    _OVERRIDE.append(name)
    try:
        yield
    finally:
        _OVERRIDE.pop()


def _device_type(args: tuple[Any, ...]) -> str:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return "cpu"


def refusal(name: str, op: str, args: tuple[Any, ...], explicit: bool) -> str | None:
    """Why backend ``name`` cannot run ``op`` on ``args``, or None if it can."""
    backend = _load(name)
    if backend is None:
        return _IMPORT_ERRORS.get(name, "not loaded")
    ok, reason = backend.availability()
    if not ok:
        return reason
    impl = backend.impls.get(op)
    if impl is None:
        return f"no {name} implementation of {op}"
    device = _device_type(args)
    devices = backend.explicit_devices if explicit else backend.devices
    if device not in devices:
        return f"{name} runs on {'/'.join(devices)} tensors, got {device} tensors"
    return impl.supports(*args) if impl.supports is not None else None


def select(op: str, *args: Any) -> Callable[..., Any]:
    """The implementation of ``op`` that runs ``args`` under the requested backend."""
    name = requested()
    if name == "auto":
        for candidate in AUTO_ORDER.get(op, DEFAULT_ORDER):
            if refusal(candidate, op, args, explicit=False) is None:
                return _BACKENDS[candidate].impls[op].fn
        return _BACKENDS["reference"].impls[op].fn
    why = refusal(name, op, args, explicit=True)
    if why is not None:
        raise BackendError(f"FUSEDSAE_BACKEND={name} cannot run {op}: {why}")
    return _BACKENDS[name].impls[op].fn


def chosen(op: str, *args: Any) -> str:
    """Name of the backend :func:`select` would use (for logs and benchmarks)."""
    fn = select(op, *args)
    for name, backend in _BACKENDS.items():
        if op in backend.impls and backend.impls[op].fn is fn:
            return name
    return "unknown"


def call(op: str, *args: Any) -> Any:
    return select(op, *args)(*args)


def report() -> dict[str, dict[str, Any]]:
    """``{backend: {"available": bool, "reason": str, "ops": [op, ...]}}`` for this machine."""
    out: dict[str, dict[str, Any]] = {}
    for name in BACKEND_NAMES:
        backend = _load(name)
        if backend is None:
            out[name] = {"available": False, "reason": _IMPORT_ERRORS.get(name, "not loaded"), "ops": []}
            continue
        ok, reason = backend.availability()
        out[name] = {"available": ok, "reason": reason, "ops": sorted(backend.impls)}
    return out


_load("reference")

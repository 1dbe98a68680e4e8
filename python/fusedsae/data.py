"""Data sources for the trainer: an iterator of ``[batch_size, d_in]`` activation batches that can say where it is
(``state_dict``) and go back there (``load_state_dict``), so a resumed run sees exactly the batches it would have.

:func:`as_source` turns whatever the user has into a source: a source as it is, a ``[N, d_in]`` tensor, any iterable
of ``[n, d_in]`` tensors (a generator, a list, a torch ``DataLoader``), or a ``--data`` spec string
(:func:`from_spec`: ``toy:<kind>``, a ``.safetensors`` file, a cache folder, ``live:<model>:<layer>``). The CLI, the
:class:`~fusedsae.Trainer` and the tests all build their sources through it.

Under ``torch.distributed`` each rank reads its own share: batch ``i`` of rank ``r`` is global batch
``i * world + r``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fusedsae import toy
from fusedsae.toy import generator


class DataError(ValueError):
    """The data cannot give what training needs (missing or unreadable file, wrong shape, NaN, too few rows, a model
    that cannot be loaded). The message names the data and what to do; the CLI prints it as one line."""


class ResumeWarning(UserWarning):
    """A resumed run cannot continue its data exactly where the checkpoint left it."""


@runtime_checkable
class DataSource(Protocol):
    """What the trainer needs from a data source."""

    d_in: int
    batch_size: int

    def next_batch(self) -> Tensor:
        """The next ``[batch_size, d_in]`` batch (float, on the CPU or the training device)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ToySource:
    """Batches of a toy dataset (:mod:`fusedsae.toy`); exposes its ``ground_truth`` for MMCS."""

    def __init__(self, data: Any, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.data = data
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.index = 0

    @property
    def d_in(self) -> int:
        return int(self.data.d_in)

    @property
    def ground_truth(self) -> Tensor | None:
        return getattr(self.data, "ground_truth", None)

    def next_batch(self) -> Tensor:
        batch = self.data.sample(self.index * self.world_size + self.rank, self.batch_size)
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    def describe(self) -> dict[str, Any]:
        return self.data.describe() if hasattr(self.data, "describe") else {"kind": type(self.data).__name__}


def fingerprint(activations: Tensor, rows: int = 64) -> str:
    """A short hash of ``rows`` evenly spaced rows of ``[N, d]`` ``activations`` (as float32): which tensor a run
    trained on, cheap enough for every checkpoint (a whole-tensor hash would read gigabytes)."""
    picked = torch.linspace(0, activations.shape[0] - 1, min(rows, activations.shape[0]), dtype=torch.float64).long()
    data = activations[picked.to(activations.device)].detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class TensorSource:
    """Shuffled batches from an in-memory ``[N, d_in]`` tensor: each epoch is a fresh permutation drawn from
    ``(seed, epoch)``; the last incomplete batch of an epoch is dropped."""

    def __init__(
        self,
        activations: Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        ground_truth: Tensor | None = None,
    ) -> None:
        if activations.dim() != 2:
            raise DataError(f"activations must be [N, d_in], got shape {tuple(activations.shape)}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if activations.shape[0] < batch_size * world_size:
            raise DataError(
                f"{activations.shape[0]} activations cannot fill one batch of {batch_size} on {world_size} rank(s); "
                "give more rows or a smaller batch size"
            )
        self.activations = activations
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.ground_truth = ground_truth
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    @property
    def d_in(self) -> int:
        return int(self.activations.shape[1])

    def _permutation(self) -> Tensor:
        n = self.activations.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=generator(self.seed, self.epoch))

    def next_batch(self) -> Tensor:
        step = self.batch_size * self.world_size
        if self.position + step > self.activations.shape[0]:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation()
        start = self.position + self.rank * self.batch_size
        rows = self._order[start : start + self.batch_size]
        self.position += step
        return self.activations[rows.to(self.activations.device)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation()

    def describe(self) -> dict[str, Any]:
        n, order = int(self.activations.shape[0]), {"shuffle": self.shuffle, "seed": self.seed}
        return {"kind": "tensor", "n": n, "d_in": self.d_in, **order, "fingerprint": fingerprint(self.activations)}


def _as_batch(item: Any) -> Any:
    """A DataLoader over a ``TensorDataset`` yields ``[tensor]``: take the tensor out of a one-element sequence."""
    if isinstance(item, (list, tuple)) and len(item) == 1:
        return item[0]
    return item


class IterableSource:
    """Batches of exactly ``batch_size`` rows cut from any iterable of ``[n, d_in]`` float tensors: a generator, a
    list, a torch ``DataLoader`` (items may be one-element tuples or lists, as a DataLoader over a ``TensorDataset``
    yields). Rows are served in order; the rows at the end of a pass that cannot fill a batch are dropped.

    A re-iterable (a list, a DataLoader) starts a new pass when one ends; a one-shot iterator (a generator) that runs
    out is an error naming how many batches it gave. Under ``torch.distributed`` every rank must be given its own
    share.

    Resume: when the iterable has ``state_dict``/``load_state_dict`` (torchdata's ``StatefulDataLoader``), they are
    used (exact when its items have ``batch_size`` rows, so no rows are held over at a checkpoint). Without them
    :meth:`load_state_dict` says so with a :class:`ResumeWarning` and skips the batches the checkpoint had used,
    which is exact only when the iterable yields the same tensors in the same order every time.
    """

    def __init__(self, iterable: Iterable[Any], batch_size: int) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.iterable = iterable
        self.batch_size = batch_size
        self.one_shot = isinstance(iterable, Iterator)
        self.stateful = callable(getattr(iterable, "state_dict", None)) and callable(
            getattr(iterable, "load_state_dict", None)
        )
        self.batches = 0
        self.items = 0
        self._it = iter(iterable)
        self._pass_batches = 0
        self._pending: list[Tensor] = []
        self._pending_rows = 0
        self.d_in = 0
        first = self._pull()
        if first is None:
            raise DataError(f"the data ({type(iterable).__name__}) yielded no batches")
        self.d_in = int(first.shape[1])
        self._hold(first)

    def _pull(self) -> Tensor | None:
        """The next item of the iterable, checked; None at the end of a pass."""
        try:
            item = _as_batch(next(self._it))
        except StopIteration:
            return None
        self.items += 1
        where = f"item {self.items - 1} of the data ({type(self.iterable).__name__})"
        if not isinstance(item, Tensor):
            raise DataError(f"{where} is a {type(item).__name__}; each item must be a [n, d_in] tensor")
        if item.dim() != 2 or not item.is_floating_point():
            raise DataError(
                f"{where} is a {item.dtype} tensor of shape {tuple(item.shape)}; each item must be a float "
                "[n, d_in] tensor (reshape to [-1, d_in] first)"
            )
        if self.d_in and item.shape[1] != self.d_in:
            raise DataError(f"{where} has {item.shape[1]} columns but the first one had d_in={self.d_in}")
        return item

    def _hold(self, rows: Tensor) -> None:
        self._pending.append(rows)
        self._pending_rows += int(rows.shape[0])

    def _new_pass(self) -> None:
        if self.one_shot:
            raise DataError(
                f"the data ran out after {self.batches} batch(es) of {self.batch_size} rows: a one-shot iterator "
                "(a generator) cannot start again; give a re-iterable (a list, a DataLoader) or train fewer steps"
            )
        if self._pass_batches == 0:
            raise DataError(
                f"one pass over the data gives {self._pending_rows} rows, fewer than batch_size={self.batch_size}; "
                "give more data or a smaller batch size"
            )
        self._it = iter(self.iterable)
        self._pass_batches = 0
        self._pending, self._pending_rows = [], 0

    def next_batch(self) -> Tensor:
        while self._pending_rows < self.batch_size:
            item = self._pull()
            if item is None:
                self._new_pass()
            else:
                self._hold(item)
        rows = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        batch, rest = rows[: self.batch_size], rows[self.batch_size :]
        self._pending, self._pending_rows = ([rest], int(rest.shape[0])) if rest.shape[0] else ([], 0)
        self.batches += 1
        self._pass_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"batches": self.batches, "held_rows": self._pending_rows}
        if self.stateful:
            state["iterable"] = self.iterable.state_dict()  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = type(self.iterable).__name__
        if self.stateful and "iterable" in state:
            self.iterable.load_state_dict(state["iterable"])  # type: ignore[attr-defined]
            self._it = iter(self.iterable)
            self._pending, self._pending_rows = [], 0
            self.batches = self._pass_batches = int(state["batches"])
            if state.get("held_rows"):
                warnings.warn(
                    f"the checkpoint held {state['held_rows']} rows of {name} between batches; the resumed run "
                    "skips them (items of batch_size rows avoid this)",
                    ResumeWarning,
                    stacklevel=2,
                )
            return
        target = int(state["batches"])
        warnings.warn(
            f"the data ({name}) has no state_dict/load_state_dict: resuming skips the {target} batch(es) the "
            "checkpoint had used, which is exact only if it yields the same tensors in the same order every time",
            ResumeWarning,
            stacklevel=2,
        )
        if self.batches:
            if self.one_shot:
                raise DataError(f"cannot rewind a one-shot iterator that already gave {self.batches} batch(es)")
            self._it = iter(self.iterable)
            self._pending, self._pending_rows = [], 0
            self.batches = self._pass_batches = 0
        while self.batches < target:
            self.next_batch()

    def describe(self) -> dict[str, Any]:
        return {"kind": "iterable", "type": type(self.iterable).__name__, "d_in": self.d_in}


# -----------------------------------------------------------------------------------------------------------------
# building a source from what the user has
# -----------------------------------------------------------------------------------------------------------------

SPEC_HELP = (
    "toy:sparse, toy:superposition, toy:composed, a .safetensors file holding one [N, d_in] tensor, an activation "
    "cache folder (written by `fusedsae cache`) or live:<model>:<layer>"
)


def split_pair(batch: Tensor, d_in: int) -> tuple[Tensor, Tensor]:
    """A transcoder's training rows ``[..., d_in + d_out]`` (``[x | y]``, the one layout every data source gives)
    split into ``x [..., d_in]`` and ``y [..., d_out]`` (views, no copy)."""
    return batch[..., :d_in], batch[..., d_in:]


def as_source(
    data: Any,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    toy_options: dict[str, Any] | None = None,
) -> Any:
    """A data source of ``[batch_size, d_in]`` batches from ``data``:

    - a source (anything with ``next_batch``) is returned as it is, after checking that its ``batch_size`` (when it
      declares one) is ``batch_size``;
    - a string or path is a ``--data`` spec (:func:`from_spec`);
    - a ``[N, d_in]`` tensor becomes a shuffled :class:`TensorSource`;
    - a toy dataset of :mod:`fusedsae.toy` (anything with ``sample`` and ``d_in``) becomes a :class:`ToySource`;
    - any other iterable of ``[n, d_in]`` tensors becomes an :class:`IterableSource`.

    Raises :class:`DataError` with the reason and the fix when the data cannot fill a batch.
    """
    if isinstance(data, (str, os.PathLike)):
        return from_spec(
            os.fspath(data), batch_size, seed=seed, rank=rank, world_size=world_size, toy_options=toy_options
        )
    if isinstance(data, Tensor):
        return TensorSource(data, batch_size, seed=seed, rank=rank, world_size=world_size)
    if callable(getattr(data, "next_batch", None)):
        declared = getattr(data, "batch_size", None)
        if declared is not None and int(declared) != batch_size:
            raise DataError(
                f"the data source gives batches of {declared} rows but training asks for batch_size={batch_size}; "
                f"build the source with batch_size={batch_size} or train with batch_size={declared}"
            )
        return data
    if callable(getattr(data, "sample", None)) and hasattr(data, "d_in"):
        return ToySource(data, batch_size, rank, world_size)
    if isinstance(data, Iterable):
        return IterableSource(data, batch_size)
    raise DataError(
        f"cannot train on a {type(data).__name__}: give a data source, a [N, d_in] tensor, an iterable of [n, d_in] "
        f"tensors, or one of {SPEC_HELP}"
    )


def from_spec(
    spec: str,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    toy_options: dict[str, Any] | None = None,
) -> Any:
    """The data source a ``--data`` spec names (see :data:`SPEC_HELP`).

    ``toy:<kind>`` builds :func:`fusedsae.toy.make` ``(kind, **toy_options)`` (an option the kind does not take is an
    error); a file is read whole (one 2-D float tensor, finite) into a :class:`TensorSource` shuffled with ``seed``;
    a folder is an activation cache (:class:`fusedsae.cache.CacheSource`); ``live:<model>:<layer>`` captures that
    attention layer's z from the offline pydoc text while training (:class:`fusedsae.cache.LiveSource`).
    """
    if spec.startswith("toy:"):
        return ToySource(toy_data(spec, toy_options or {}), batch_size, rank, world_size)
    if spec.startswith("live:"):
        return _live_source(spec, batch_size, seed, rank, world_size)
    path = Path(spec)
    if path.is_dir():
        from fusedsae.cache import CacheError, CacheSource

        try:
            return CacheSource(path, batch_size, seed=seed, rank=rank, world_size=world_size)
        except (CacheError, ValueError) as exc:
            raise DataError(f"data {spec}: {exc}") from exc
    if path.is_file():
        activations = load_tensor_file(path)
        try:
            return TensorSource(activations, batch_size, seed=seed, rank=rank, world_size=world_size)
        except DataError as exc:
            raise DataError(f"data {spec}: {exc}") from exc
    raise DataError(f"data {spec!r}: no such file or folder; give {SPEC_HELP}")


def toy_data(spec: str, options: dict[str, Any]) -> Any:
    """The toy dataset of ``toy:<kind>``: :func:`fusedsae.toy.make` ``(kind, **options)``, its refusals (an unknown
    kind, an option the kind does not take, a value out of range) as :class:`DataError`."""
    try:
        return toy.make(spec.split(":", 1)[1], **options)
    except (TypeError, ValueError) as exc:
        raise DataError(f"data {spec!r}: {exc}") from exc


def load_tensor_file(path: str | os.PathLike[str]) -> Tensor:
    """The one 2-D tensor ``[N, d_in]`` of a ``.safetensors`` file, as float32, checked to be finite.

    Raises :class:`DataError` naming the file and what is wrong with it (not safetensors, unreadable, no or several
    2-D tensors, not floating point, NaN/Inf).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise DataError(f"data {str(path)!r} is not a .safetensors file; give {SPEC_HELP}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"data {path}: cannot read it as safetensors ({exc})") from exc
    matrices = {name: t for name, t in tensors.items() if t.dim() == 2}
    if len(matrices) != 1:
        shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in tensors.items()) or "no tensors"
        raise DataError(
            f"data {path}: expected exactly one 2-D tensor [N, d_in], found {len(matrices)} ({shapes}); "
            "save the activations as one [N, d_in] tensor (reshape [..., d_in] to [-1, d_in])"
        )
    name, matrix = next(iter(matrices.items()))
    if not matrix.is_floating_point():
        raise DataError(f"data {path}: tensor {name!r} is {matrix.dtype}; activations must be floating point")
    matrix = matrix.to(torch.float32)
    bad = ~torch.isfinite(matrix)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise DataError(
            f"data {path}: tensor {name!r} holds {int(bad.sum())} NaN/Inf value(s), first in row {row}; "
            "remove or fix those rows"
        )
    return matrix


def load_model(name: str, device: str = "cpu") -> tuple[Any, Any]:
    """:func:`fusedsae.capture.load_model`, with a model that cannot be loaded (no such folder; a hub id on a machine
    without network or cache) reported as one :class:`DataError` line."""
    from fusedsae import capture

    try:
        return capture.load_model(name, device=device)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load model {name!r} ({reason}); use 'minilm' (the offline MiniLM-L6) or a local model folder"
        ) from exc


def _live_source(spec: str, batch_size: int, seed: int, rank: int, world_size: int) -> Any:
    """``live:<model>:<layer>``: z of that attention layer, captured while training from the pydoc text."""
    from fusedsae.cache import LiveSource
    from fusedsae.capture import attention_hooks, offline_texts

    parts = spec.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise DataError(f"data {spec!r}: expected live:<model>:<layer>, e.g. live:minilm:3")
    model, tokenizer = load_model(parts[1])
    try:
        hooks = attention_hooks(model, int(parts[2]))
        return LiveSource(
            model,
            tokenizer,
            offline_texts("pydoc"),
            hooks.z,
            batch_size,
            n_heads=hooks.n_heads,
            seed=seed,
            rank=rank,
            world_size=world_size,
            info={"model": parts[1], "layer": int(parts[2]), "text": "pydoc"},
        )
    except ValueError as exc:
        raise DataError(f"data {spec}: {exc}") from exc

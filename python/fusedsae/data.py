"""Data sources for the trainer: an iterator of ``[batch_size, d_in]`` activation batches that can say where it is
(``state_dict``) and go back there (``load_state_dict``), so a resumed run sees exactly the batches it would have.

:func:`as_source` turns whatever the user has into a source: a source as it is, a ``[N, d_in]`` tensor, any iterable
of ``[n, d_in]`` tensors (a generator, a list, a torch ``DataLoader``), or a ``--data`` spec string
(:func:`from_spec`: ``toy:<kind>``, a ``.safetensors`` file, a cache folder, ``live:<model>:<layer>``). The CLI, the
:class:`~fusedsae.Trainer` and the tests all build their sources through it.

Transcoders (issue 13) read ``x [N, d_in]`` and reconstruct ``y [N, d_out]``. Their data are rows ``[x | y]`` of
width ``d_in + d_out`` (:func:`join_pair`, :func:`split_pair`), so every source, the shuffling, resuming and
data-parallel splitting work on them unchanged. A source of pairs says so with ``d_out`` (``d_in`` is then the width
of ``x``); a source of plain activations has ``d_out = None``. :func:`as_source` takes a pair ``(x, y)`` of tensors,
an iterable of ``(x, y)`` items, a ``x.safetensors,y.safetensors`` spec, a pair cache and a live capture of two hooks
(``--target-hook``); :func:`check_widths` says in one line when a plain SAE is given pairs or a transcoder plain rows.

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
    """What the trainer needs from a data source. A source of transcoder pairs also has ``d_out`` (an int; absent or
    None for plain activations) and its batches are ``[batch_size, d_in + d_out]`` rows ``[x | y]``."""

    d_in: int
    batch_size: int

    def next_batch(self) -> Tensor:
        """The next ``[batch_size, d_in]`` batch (``[batch_size, d_in + d_out]`` for pairs; float, on the CPU or the
        training device)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# -----------------------------------------------------------------------------------------------------------------
# transcoder pairs: rows [x | y]
# -----------------------------------------------------------------------------------------------------------------


def split_pair(batch: Tensor, d_in: int) -> tuple[Tensor, Tensor]:
    """A transcoder's training rows ``[..., d_in + d_out]`` (``[x | y]``, the one layout every data source gives)
    split into ``x [..., d_in]`` and ``y [..., d_out]`` (views, no copy)."""
    return batch[..., :d_in], batch[..., d_in:]


def join_pair(x: Tensor, y: Tensor, what: str = "the data") -> Tensor:
    """Rows ``[x | y]`` ``[N, d_in + d_out]`` of a transcoder's input ``x [N, d_in]`` and target ``y [N, d_out]``
    (float tensors on one device; the result has their promoted dtype). The inverse of :func:`split_pair`.

    Raises :class:`DataError` naming ``what`` when they are not two 2-D float tensors with one row of ``y`` per row
    of ``x``.
    """
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise DataError(f"{what}: {name} is a {type(t).__name__}; a transcoder pair is (x [N, d_in], y [N, d_out])")
        if t.dim() != 2 or not t.is_floating_point():
            raise DataError(
                f"{what}: {name} is a {t.dtype} tensor of shape {tuple(t.shape)}; a transcoder pair is two float "
                "tensors (x [N, d_in], y [N, d_out]) (reshape to [-1, width] first)"
            )
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{what}: x has {x.shape[0]} rows but y has {y.shape[0]}; a transcoder pair needs one y row per x row "
            "(the same tokens, in the same order)"
        )
    if x.device != y.device:
        raise DataError(f"{what}: x is on {x.device} but y is on {y.device}; put both on one device")
    return torch.cat([x, y], dim=1)


def _pair_of_tensors(item: Any) -> bool:
    """Whether ``item`` is an ``(x, y)`` pair: a tuple or list of exactly two tensors (a DataLoader over a
    ``TensorDataset(x, y)`` yields ``[x, y]`` lists)."""
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item)


def widths_text(d_in: int, d_out: int | None) -> str:
    """``"d_in=384"`` or ``"(x, y) pairs d_in=384, d_out=384"``: how errors name a row layout."""
    return f"d_in={d_in}" if d_out is None else f"(x, y) pairs d_in={d_in}, d_out={d_out}"


def check_widths(data: Any, d_in: int, d_out: int | None, model: str = "the SAE") -> None:
    """Refuses, with one :class:`DataError` line, data whose rows do not split as ``model`` reads them (``d_out``
    None: a plain SAE reading ``[N, d_in]``; an int: a transcoder reading rows ``[x | y]``). ``data`` is a source.

    Data that say they hold pairs (``data.d_out`` an int: a pair cache, a two-hook capture, ``(x, y)`` tensors) must
    have exactly ``d_in`` and ``d_out``, and are refused for a plain SAE. Data that do not (``d_out`` None or absent:
    a tensor, an iterable, a user's own source) are taken at their row width, which must be ``d_in + d_out``, so
    rows joined by hand train a transcoder; but a cache or live capture of one tensor (its ``describe()`` names the
    ``hook``) is known to hold plain activations and is refused for a transcoder, even at the right total width.
    """
    has_in, has_out = int(data.d_in), getattr(data, "d_out", None)
    kind = describe_kind(data)
    if has_out is None:
        width = d_in + (d_out or 0)
        if d_out is not None and _captured(data):
            raise DataError(
                f"{kind} holds plain activations of one tensor (d_in={has_in}) but {model} is a transcoder "
                f"(d_in={d_in}, d_out={d_out}) that needs (x, y) pairs: write a cache with --target-hook, or give live "
                "data a --target-hook"
            )
        if has_in == width:
            return
        if d_out is None:  # the message the trainer has always given
            raise DataError(f"the data has d_in={has_in} but {model} expects d_in={d_in}")
        raise DataError(
            f"the data has rows of width {has_in} but the transcoder trains on [x | y] rows of width d_in + d_out = "
            f"{d_in} + {d_out} = {width}"
        )
    if has_out == d_out and has_in == d_in:
        return
    if d_out is None:
        raise DataError(
            f"{kind} holds transcoder (x, y) pairs (d_in={has_in}, d_out={has_out}) but {model} is a plain SAE of "
            f"d_in={d_in}; train a transcoder (SAEConfig(d_out={has_out}); the CLI does so by itself) or give plain "
            "activations"
        )
    raise DataError(f"{kind} has {widths_text(has_in, has_out)} but {model} expects {widths_text(d_in, d_out)}")


def _captured(data: Any) -> bool:
    """Whether ``data`` was captured from a model's hook(s) (a cache or a live capture: its describe() says so)."""
    info = data.describe() if callable(getattr(data, "describe", None)) else {}
    return "hook" in info or "hooks" in info


def describe_kind(data: Any) -> str:
    """``"the data (cache runs/c)"``: a source named for an error message."""
    info = data.describe() if callable(getattr(data, "describe", None)) else {}
    where = info.get("path") or info.get("spec") or info.get("kind") or type(data).__name__
    return f"the data ({where})"


class ToySource:
    """Batches of a toy dataset (:mod:`fusedsae.toy`); exposes its ``ground_truth`` for MMCS."""

    def __init__(self, data: Any, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.data = data
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.index = 0
        if hasattr(data, "d_out"):  # toy transcoder pairs say how their rows split; others leave it unsaid
            self.d_out = data.d_out

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
    ``(seed, epoch)``; the last incomplete batch of an epoch is dropped.

    Transcoder pairs: ``activations`` may be a tuple ``(x [N, d_in], y [N, d_out])`` (joined into rows ``[x | y]``,
    one copy), or rows already joined ``[N, d_in + d_out]`` with ``d_out`` given; batches are then
    ``[batch_size, d_in + d_out]`` and ``d_out`` is set (None for plain activations).
    """

    def __init__(
        self,
        activations: Tensor | tuple[Tensor, Tensor],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        ground_truth: Tensor | None = None,
        d_out: int | None = None,
    ) -> None:
        if isinstance(activations, tuple):
            if len(activations) != 2 or d_out is not None:
                raise DataError(
                    f"a transcoder pair is a tuple (x [N, d_in], y [N, d_out]) without d_out, got a tuple of "
                    f"{len(activations)}" + (f" and d_out={d_out}" if d_out is not None else "")
                )
            x, y = activations
            activations = join_pair(x, y, "the (x, y) tensors")
            d_out = int(y.shape[1])
        if activations.dim() != 2:
            raise DataError(f"activations must be [N, d_in], got shape {tuple(activations.shape)}")
        if d_out is not None and not 1 <= d_out < activations.shape[1]:
            raise DataError(
                f"d_out={d_out} does not split rows of width {activations.shape[1]} into [x | y] with both parts "
                "non-empty"
            )
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
        self.d_out = d_out
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    @property
    def d_in(self) -> int:
        return int(self.activations.shape[1]) - (self.d_out or 0)

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
        pair = {} if self.d_out is None else {"d_out": self.d_out}
        return {
            "kind": "tensor",
            "n": n,
            "d_in": self.d_in,
            **pair,
            **order,
            "fingerprint": fingerprint(self.activations),
        }


def _as_batch(item: Any) -> Any:
    """A DataLoader over a ``TensorDataset`` yields ``[tensor]``: take the tensor out of a one-element sequence."""
    if isinstance(item, (list, tuple)) and len(item) == 1:
        return item[0]
    return item


class IterableSource:
    """Batches of exactly ``batch_size`` rows cut from any iterable of ``[n, d_in]`` float tensors: a generator, a
    list, a torch ``DataLoader`` (items may be one-element tuples or lists, as a DataLoader over a ``TensorDataset``
    yields). Rows are served in order; the rows at the end of a pass that cannot fill a batch are dropped.

    Transcoder pairs: items that are ``(x [n, d_in], y [n, d_out])`` tuples (or two-element lists, as a DataLoader
    over ``TensorDataset(x, y)`` yields) are joined into rows ``[x | y]``; the first item decides, every later one
    must be a pair of the same widths, and ``d_out`` is set (None for plain tensors).

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
        self.d_out: int | None = None
        self._pairs: bool | None = None  # decided by the first item
        first = self._pull()
        if first is None:
            raise DataError(f"the data ({type(iterable).__name__}) yielded no batches")
        self._hold(first)

    def _pull(self) -> Tensor | None:
        """The next item of the iterable, checked (pairs joined); None at the end of a pass."""
        try:
            item = _as_batch(next(self._it))
        except StopIteration:
            return None
        self.items += 1
        where = f"item {self.items - 1} of the data ({type(self.iterable).__name__})"
        pair = _pair_of_tensors(item)
        if self._pairs is None:
            self._pairs = pair
        elif pair != self._pairs:
            first, this = ("(x, y) pairs", "a single tensor") if self._pairs else ("single tensors", "an (x, y) pair")
            raise DataError(f"{where} is {this} but the first item was {first}; give one kind of item throughout")
        if pair:
            x, y = item
            joined = join_pair(x, y, where)
            if self.d_in and (x.shape[1], y.shape[1]) != (self.d_in, self.d_out):
                raise DataError(
                    f"{where} has d_in={x.shape[1]}, d_out={y.shape[1]} but the first one had d_in={self.d_in}, "
                    f"d_out={self.d_out}"
                )
            self.d_in, self.d_out = int(x.shape[1]), int(y.shape[1])
            return joined
        if not isinstance(item, Tensor):
            raise DataError(f"{where} is a {type(item).__name__}; each item must be a [n, d_in] tensor")
        if item.dim() != 2 or not item.is_floating_point():
            raise DataError(
                f"{where} is a {item.dtype} tensor of shape {tuple(item.shape)}; each item must be a float "
                "[n, d_in] tensor (reshape to [-1, d_in] first)"
            )
        if self.d_in and item.shape[1] != self.d_in:
            raise DataError(f"{where} has {item.shape[1]} columns but the first one had d_in={self.d_in}")
        self.d_in = int(item.shape[1])
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
        pair = {} if self.d_out is None else {"d_out": self.d_out}
        return {"kind": "iterable", "type": type(self.iterable).__name__, "d_in": self.d_in, **pair}


# -----------------------------------------------------------------------------------------------------------------
# building a source from what the user has
# -----------------------------------------------------------------------------------------------------------------

SPEC_HELP = (
    "toy:sparse, toy:superposition, toy:composed, a .safetensors file holding one [N, d_in] tensor, two such files "
    "X.safetensors,Y.safetensors (transcoder pairs: input x, target y), an activation cache folder (written by "
    "`fusedsae cache`) or live:<model>:<layer> / live:<model>:<module>[:input|:output]"
)
LIVE_HELP = (
    "expected live:<model>:<layer>, e.g. live:minilm:3 (attention z; live:minilm:1,3,5 for several layers), or "
    "live:<model>:<module>[:input|:output], e.g. live:minilm:encoder.layer.3.intermediate:input"
)


def parse_live_spec(spec: str) -> tuple[str, list[int] | None, Any]:
    """``live:<model>:<where>`` -> ``(model, layers, hook)``: ``<where>`` is attention layers (``3``, ``1,3,5``: their
    z, ``hook`` None) or a module path with an optional ``:input`` (the default) or ``:output``
    (:meth:`fusedsae.capture.HookSpec.parse`; ``layers`` None). The one parser of live specs (the data layer's and
    the CLI's). Raises :class:`DataError` with the expected forms."""
    from fusedsae.capture import HookSpec

    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] != "live" or not parts[1] or not parts[2]:
        raise DataError(f"data {spec!r}: {LIVE_HELP}")
    where = parts[2]
    if all(part.strip().isdigit() for part in where.split(",")):
        return parts[1], [int(part) for part in where.split(",")], None
    try:
        return parts[1], None, HookSpec.parse(where, io="input")
    except ValueError as exc:
        raise DataError(f"data {spec!r}: {exc}; {LIVE_HELP}") from exc


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
    - a tuple of two tensors ``(x [N, d_in], y [N, d_out])`` is transcoder pairs: a :class:`TensorSource` of rows
      ``[x | y]`` (a list of tensors stays an iterable of batches);
    - a toy dataset of :mod:`fusedsae.toy` (anything with ``sample`` and ``d_in``) becomes a :class:`ToySource`;
    - any other iterable of ``[n, d_in]`` tensors (or of ``(x, y)`` pairs) becomes an :class:`IterableSource`.

    Raises :class:`DataError` with the reason and the fix when the data cannot fill a batch.
    """
    if isinstance(data, (str, os.PathLike)):
        return from_spec(
            os.fspath(data), batch_size, seed=seed, rank=rank, world_size=world_size, toy_options=toy_options
        )
    if isinstance(data, Tensor) or (isinstance(data, tuple) and _pair_of_tensors(data)):
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
        f"cannot train on a {type(data).__name__}: give a data source, a [N, d_in] tensor, an (x, y) pair of tensors, "
        f"an iterable of [n, d_in] tensors, or one of {SPEC_HELP}"
    )


def from_spec(
    spec: str,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    toy_options: dict[str, Any] | None = None,
    target_hook: Any = None,
) -> Any:
    """The data source a ``--data`` spec names (see :data:`SPEC_HELP`).

    ``toy:<kind>`` builds :func:`fusedsae.toy.make` ``(kind, **toy_options)`` (an option the kind does not take is an
    error); a file is read whole (one 2-D float tensor, finite) into a :class:`TensorSource` shuffled with ``seed``,
    and ``X.safetensors,Y.safetensors`` two such files of the same rows into transcoder pairs; a folder is an
    activation cache (:class:`fusedsae.cache.CacheSource`); ``live:<model>:<layer>`` captures that attention layer's
    z (``live:<model>:<module>[:input|:output]`` that module's tensor) from the offline pydoc text while training
    (:class:`fusedsae.cache.LiveSource`).

    ``target_hook`` (a :class:`fusedsae.capture.HookSpec`, or its text for :meth:`~fusedsae.capture.HookSpec.parse`,
    default io ``output``): transcoder pairs whose ``y`` is that tensor of the same forward pass, for live data; for
    a cache it must be the cache's own target (the cache decides, this only checks).
    """
    if isinstance(target_hook, str):
        target_hook = parse_target_hook(target_hook)
    if spec.startswith("toy:"):
        _no_target(spec, target_hook, "toy data")
        return ToySource(toy_data(spec, toy_options or {}), batch_size, rank, world_size)
    if spec.startswith("live:"):
        return _live_source(spec, batch_size, seed, rank, world_size, target_hook)
    path = Path(spec)
    if not path.exists() and "," in spec:
        _no_target(spec, target_hook, "(x, y) files")
        return _file_pair(spec, batch_size, seed, rank, world_size)
    if path.is_dir():
        from fusedsae.cache import CacheError, CacheSource

        try:
            source = CacheSource(path, batch_size, seed=seed, rank=rank, world_size=world_size)
        except (CacheError, ValueError) as exc:
            raise DataError(f"data {spec}: {exc}") from exc
        if target_hook is not None:
            check_target(spec, source.describe(), target_hook)
        return source
    if path.is_file():
        _no_target(spec, target_hook, "a tensor file")
        activations = load_tensor_file(path)
        try:
            return TensorSource(activations, batch_size, seed=seed, rank=rank, world_size=world_size)
        except DataError as exc:
            raise DataError(f"data {spec}: {exc}") from exc
    raise DataError(f"data {spec!r}: no such file or folder; give {SPEC_HELP}")


def parse_target_hook(text: str) -> Any:
    """``--target-hook MODULE[:input|:output]`` as a :class:`fusedsae.capture.HookSpec` (io ``output`` unless given):
    the tensor a transcoder reconstructs. A malformed text is a :class:`DataError` line."""
    from fusedsae.capture import HookSpec

    try:
        return HookSpec.parse(text, io="output")
    except ValueError as exc:
        raise DataError(f"target hook {text!r}: {exc}") from exc


def _no_target(spec: str, target_hook: Any, kind: str) -> None:
    if target_hook is not None:
        raise DataError(
            f"data {spec!r} is {kind}: a target hook applies to data captured from a model (live:… or a cache "
            "written with --target-hook); give (x, y) pairs some other way, e.g. X.safetensors,Y.safetensors"
        )


def check_target(spec: str, info: dict[str, Any], target_hook: Any) -> None:
    """A target hook given with a cache must be the one the cache holds (``info``: the cache's describe())."""
    held = info.get("target_hook")
    if held is None:
        raise DataError(
            f"data {spec}: the cache holds plain activations, not (x, y) pairs; write a pair cache with "
            f"`fusedsae cache … --target-hook {target_hook.text()}` (or drop --target-hook)"
        )
    if held != target_hook.to_dict():
        from fusedsae.capture import HookSpec

        raise DataError(
            f"data {spec}: the cache's target is {HookSpec.from_dict(held).text()}, not {target_hook.text()}; "
            "drop --target-hook (the cache decides) or write another cache"
        )


def _file_pair(spec: str, batch_size: int, seed: int, rank: int, world_size: int) -> TensorSource:
    """``X.safetensors,Y.safetensors``: transcoder pairs, row i of x with row i of y."""
    names = [part.strip() for part in spec.split(",")]
    if len(names) != 2 or not all(names):
        raise DataError(
            f"data {spec!r}: a transcoder pair spec is two files X.safetensors,Y.safetensors (input x, target y)"
        )
    for name in names:
        if not Path(name).is_file():
            raise DataError(f"data {spec!r}: no such file {name!r}; give X.safetensors,Y.safetensors")
    x, y = (load_tensor_file(name) for name in names)
    try:
        return TensorSource((x, y), batch_size, seed=seed, rank=rank, world_size=world_size)
    except DataError as exc:
        raise DataError(f"data {spec}: {exc}") from exc


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


def _live_source(spec: str, batch_size: int, seed: int, rank: int, world_size: int, target_hook: Any = None) -> Any:
    """``live:<model>:<layer>`` (z of that attention layer) or ``live:<model>:<module>[:input|:output]``, captured
    while training from the pydoc text; with ``target_hook`` as (x, y) pairs of one forward pass."""
    from fusedsae.cache import LiveSource
    from fusedsae.capture import attention_hooks, offline_texts

    name, layers, hook = parse_live_spec(spec)
    if layers is not None and len(layers) > 1:
        raise DataError(f"data {spec!r}: one layer here (several layers side by side train from `fusedsae train`)")
    model, tokenizer = load_model(name)
    try:
        n_heads = None
        info: dict[str, Any] = {"model": name, "text": "pydoc"}
        if layers is not None:
            found = attention_hooks(model, layers[0])
            hook, n_heads = found.z, found.n_heads
            info["layer"] = layers[0]
        return LiveSource(
            model,
            tokenizer,
            offline_texts("pydoc"),
            hook,
            batch_size,
            n_heads=n_heads,
            seed=seed,
            rank=rank,
            world_size=world_size,
            info=info,
            target_hook=target_hook,
        )
    except ValueError as exc:
        raise DataError(f"data {spec}: {exc}") from exc

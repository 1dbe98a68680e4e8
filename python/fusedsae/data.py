"""Data sources for the trainer: an iterator of ``[batch_size, d_in]`` activation batches that can say where it is
(``state_dict``) and go back there (``load_state_dict``), so a resumed run sees exactly the batches it would have.

Under ``torch.distributed`` each rank reads its own share: batch ``i`` of rank ``r`` is global batch
``i * world + r``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fusedsae.toy import generator


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
            raise ValueError(f"activations must be [N, d_in], got shape {tuple(activations.shape)}")
        if activations.shape[0] < batch_size * world_size:
            raise ValueError(
                f"{activations.shape[0]} activations cannot fill one batch of {batch_size} on {world_size} rank(s)"
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
        return {"kind": "tensor", "n": int(self.activations.shape[0]), "d_in": self.d_in}

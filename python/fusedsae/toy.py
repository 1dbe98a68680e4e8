"""Toy models of superposition with known ground-truth features (docs/architecture.md#toy-models).

Each dataset draws batch ``i`` from its own seeded generator, so any batch can be regenerated from its index: a
resumed run sees exactly the data it would have seen. Each exposes ``d_in``, ``ground_truth [n, d_in]`` (unit
rows: the directions an SAE should recover) and ``sample(index, size) -> [size, d_in]``.

* :class:`SparseFeatureData` (Sharkey et al. 2022): random unit directions, a few active per sample.
* :class:`SuperpositionData` (Elhage et al. 2022): ``n`` sparse features squeezed into ``m < n`` dims by a trained
  ReLU-output toy model ``x' = ReLU(WᵀW x + b)``; the SAE sees the hidden ``h = W x``.
* :class:`ComposedFeatureData` (Anders et al. 2024): feature sets, one-hot within a set, one feature per set active
  together; amplitudes correlated or not; a fraction of one-hot samples.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

_GOLDEN = 0x9E3779B97F4A7C15


def generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for batch ``index`` of stream ``seed`` (distinct streams for distinct pairs)."""
    return torch.Generator().manual_seed((seed * _GOLDEN + index * 0x632BE59BD9B4E019 + 1) % (1 << 63))


def random_directions(n: int, d: int, seed: int, orthogonal: bool = False) -> Tensor:
    """``[n, d]`` unit rows: uniform on the sphere, or orthonormal when ``orthogonal`` and ``n <= d``."""
    g = generator(seed, -1)
    if orthogonal:
        if n > d:
            raise ValueError(f"cannot draw {n} orthogonal directions in {d} dims")
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        return q[:n].contiguous()
    w = torch.randn(n, d, generator=g)
    return w / w.norm(dim=1, keepdim=True)


@dataclass
class SparseFeatureData:
    """Sharkey-style data: ``x = sum_i c_i g_i`` with ``n_features`` random unit directions ``g_i`` in ``d_in``
    dims; feature i is active with probability ``p_i`` (mean ``mean_active`` per sample, optionally decaying as
    ``frequency_decay**i``), with amplitude U[0, 1]; optional Gaussian ``noise``."""

    d_in: int = 64
    n_features: int = 256
    mean_active: float = 4.0
    frequency_decay: float | None = None
    noise: float = 0.0
    seed: int = 0
    directions: Tensor = field(init=False, repr=False)
    probabilities: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.mean_active <= self.n_features:
            raise ValueError(f"mean_active must be in (0, n_features={self.n_features}], got {self.mean_active}")
        self.directions = random_directions(self.n_features, self.d_in, self.seed)
        weights = torch.ones(self.n_features)
        if self.frequency_decay is not None:
            weights = self.frequency_decay ** torch.arange(self.n_features, dtype=torch.float32)
        self.probabilities = (weights * self.mean_active / weights.sum()).clamp(max=1.0)

    @property
    def ground_truth(self) -> Tensor:
        return self.directions

    def sample(self, index: int, size: int) -> Tensor:
        g = generator(self.seed, index)
        active = torch.rand(size, self.n_features, generator=g) < self.probabilities
        amplitude = torch.rand(size, self.n_features, generator=g)
        x = (active * amplitude) @ self.directions
        if self.noise:
            x += self.noise * torch.randn(size, self.d_in, generator=g)
        return x

    def describe(self) -> dict[str, Any]:
        return {"kind": "sparse", **{k: v for k, v in asdict(self).items() if not isinstance(v, Tensor)}}


@dataclass
class ToyModel:
    """Elhage et al.'s ReLU-output model: ``h = W x`` (``W [d_hidden, n_features]``), ``x' = ReLU(Wᵀ h + b)``."""

    W: Tensor
    b: Tensor

    def hidden(self, x: Tensor) -> Tensor:
        return x @ self.W.t()

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.hidden(x) @ self.W + self.b)


def sample_features(n: int, size: int, sparsity: float, g: torch.Generator) -> Tensor:
    """Elhage feature vectors: each of ``n`` features is 0 with probability ``sparsity``, else U[0, 1]."""
    present = torch.rand(size, n, generator=g) >= sparsity
    return present * torch.rand(size, n, generator=g)


def train_toy_model(
    n_features: int,
    d_hidden: int,
    sparsity: float,
    importance: Tensor,
    steps: int = 3000,
    batch: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
) -> ToyModel:
    """Trains the ReLU-output toy model with importance-weighted MSE (Adam; deterministic given ``seed``)."""
    g = generator(seed, -2)
    W = (torch.randn(d_hidden, n_features, generator=g) * (2.0 / (n_features + d_hidden)) ** 0.5).requires_grad_()
    b = torch.zeros(n_features, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    for i in range(steps):
        x = sample_features(n_features, batch, sparsity, generator(seed, 1_000_000 + i))
        out = torch.relu(x @ W.t() @ W + b)
        loss = (importance * (x - out).pow(2)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return ToyModel(W.detach(), b.detach())


@dataclass
class SuperpositionData:
    """Hidden activations ``h = W x`` of a trained Elhage toy model (``n_features`` in ``d_hidden`` dims).

    ``ground_truth`` holds the directions of the features the toy model represents (``‖W_i‖ > 0.5``), unit-norm,
    ``[n_represented, d_hidden]``; ``model`` is the trained toy model."""

    n_features: int = 20
    d_hidden: int = 5
    sparsity: float = 0.9
    importance_decay: float = 0.9
    toy_steps: int = 3000
    seed: int = 0
    model: ToyModel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        importance = self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)
        self.model = train_toy_model(
            self.n_features, self.d_hidden, self.sparsity, importance, steps=self.toy_steps, seed=self.seed
        )

    @property
    def d_in(self) -> int:
        return self.d_hidden

    @property
    def feature_norms(self) -> Tensor:
        return self.model.W.norm(dim=0)

    @property
    def ground_truth(self) -> Tensor:
        cols = self.model.W.t()[self.feature_norms > 0.5]
        return cols / cols.norm(dim=1, keepdim=True)

    def sample(self, index: int, size: int) -> Tensor:
        x = sample_features(self.n_features, size, self.sparsity, generator(self.seed, index))
        return self.model.hidden(x)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "superposition",
            **{k: v for k, v in asdict(self).items() if k != "model"},
            "represented_features": int((self.feature_norms > 0.5).sum()),
        }


@dataclass
class ComposedFeatureData:
    """Anders et al.'s composed features: ``n_sets`` sets of ``set_size`` features with unit directions. A sample
    activates one feature of every set (one-hot within a set), with independent U[0, 1] amplitudes
    (``correlated=False``: ``[0, a, b, 0]``) or one shared amplitude (``A [0, 1, 1, 0]``); with probability
    ``one_hot_fraction`` only one set is active. Directions are orthonormal when they fit in ``d_in``."""

    n_sets: int = 2
    set_size: int = 4
    d_in: int = 16
    correlated: bool = False
    one_hot_fraction: float = 0.0
    seed: int = 0
    directions: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.n_sets * self.set_size
        self.directions = random_directions(n, self.d_in, self.seed, orthogonal=n <= self.d_in)

    @property
    def ground_truth(self) -> Tensor:
        return self.directions

    @property
    def composed_directions(self) -> Tensor:
        """Unit directions of every combination of one feature per set: ``[set_size**n_sets, d_in]``."""
        rows = []
        for combo in itertools.product(range(self.set_size), repeat=self.n_sets):
            v = sum(self.directions[s * self.set_size + i] for s, i in enumerate(combo))
            rows.append(v / v.norm())
        return torch.stack(rows)

    def sample(self, index: int, size: int) -> Tensor:
        g = generator(self.seed, index)
        choice = torch.randint(self.set_size, (size, self.n_sets), generator=g)
        if self.correlated:
            amplitude = torch.rand(size, 1, generator=g).expand(size, self.n_sets)
        else:
            amplitude = torch.rand(size, self.n_sets, generator=g)
        keep = torch.ones(size, self.n_sets)
        if self.one_hot_fraction:
            single = torch.rand(size, generator=g) < self.one_hot_fraction
            which = torch.randint(self.n_sets, (size,), generator=g)
            only = torch.nn.functional.one_hot(which, self.n_sets).float()
            keep = torch.where(single[:, None], only, keep)
        coeffs = torch.zeros(size, self.n_sets * self.set_size)
        cols = choice + torch.arange(self.n_sets) * self.set_size
        coeffs.scatter_(1, cols, amplitude * keep)
        return coeffs @ self.directions

    def describe(self) -> dict[str, Any]:
        return {"kind": "composed", **{k: v for k, v in asdict(self).items() if not isinstance(v, Tensor)}}


def make(kind: str, **kwargs: Any) -> SparseFeatureData | SuperpositionData | ComposedFeatureData:
    """Builds a toy dataset by name: ``"sparse"``, ``"superposition"`` or ``"composed"``."""
    kinds = {"sparse": SparseFeatureData, "superposition": SuperpositionData, "composed": ComposedFeatureData}
    if kind not in kinds:
        raise ValueError(f"unknown toy data {kind!r}; use one of {sorted(kinds)}")
    return kinds[kind](**kwargs)

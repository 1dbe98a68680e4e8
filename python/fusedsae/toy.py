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


# ---------------------------------------------------------------------------------------------------------------
# Anders et al. (2024): two sets of two features, {x1, x2} and {y1, y2}, in a two-dimensional hidden space
# ---------------------------------------------------------------------------------------------------------------

#: the four features, in the column order of every ``[..., 4]`` coefficient tensor and ``[2, 4]`` embedding here
COMPOSED_FEATURES = ("x1", "x2", "y1", "y2")


def plus_geometry() -> Tensor:
    """The idealised embedding ``[2, 4]`` (columns x1, x2, y1, y2): ``x1 = -x2`` on the first axis, ``y1 = -y2`` on
    the second, the "+" a ReLU-output toy model learns for two sets whose members never co-occur."""
    return torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])


def rotation(angle_degrees: float) -> Tensor:
    """The ``[2, 2]`` matrix that rotates a row vector by ``angle_degrees`` counter-clockwise (``h @ R``)."""
    t = torch.tensor(angle_degrees, dtype=torch.float64).deg2rad()
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([torch.stack([c, s]), torch.stack([-s, c])]).float()


def sample_composed(size: int, correlated: Tensor, one_hot_fraction: Tensor, g: torch.Generator) -> Tensor:
    """Feature coefficients ``[M, size, 4]`` (columns x1, x2, y1, y2) for ``M`` data streams at once.

    Every sample has one feature of each set (chosen uniformly), with amplitudes ``a, b ~ U[0, 1]`` independent, or
    ``b = a`` where ``correlated [M]`` (bool) is set; with probability ``one_hot_fraction [M]`` only one of the two
    features (either, uniformly) is kept."""
    m = correlated.shape[0]
    choice = torch.randint(2, (m, size, 2), generator=g)
    amplitude = torch.rand(m, size, 2, generator=g)
    amplitude = torch.where(correlated[:, None, None], amplitude[..., :1].expand(-1, -1, 2), amplitude)
    single = torch.rand(m, size, generator=g) < one_hot_fraction[:, None]
    which = torch.randint(2, (m, size), generator=g)
    keep = torch.where(single[..., None], torch.nn.functional.one_hot(which, 2).float(), torch.ones(m, size, 2))
    coeffs = torch.zeros(m, size, 4)
    coeffs.scatter_(2, choice + torch.tensor([0, 2]), amplitude * keep)
    return coeffs


def train_composed_toy_models(
    correlated: Tensor, one_hot_fraction: Tensor, steps: int = 4000, batch: int = 1024, lr: float = 1e-2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Trains ``M`` ReLU-output toy models ``f' = ReLU(Wᵀ W f + b)`` (``W [2, 4]``) at once, one per entry of
    ``correlated [M]`` and ``one_hot_fraction [M]``, with plain MSE (all four features equally important).
    Returns ``(W [M, 2, 4], b [M, 4])``. Four features in two dims: the model must superpose them, and features
    of one set never co-occur, so it can put them antipodal (the "+")."""
    m = correlated.shape[0]
    g = generator(seed, -3)
    W = (torch.randn(m, 2, 4, generator=g) * 0.5).requires_grad_()
    b = torch.zeros(m, 1, 4, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    for i in range(steps):
        f = sample_composed(batch, correlated, one_hot_fraction, generator(seed, 2_000_000 + i))
        out = torch.relu(f @ W.transpose(1, 2) @ W + b)
        loss = (f - out).pow(2).sum(-1).mean(-1).sum()  # a sum over models: each model's gradient is its own
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return W.detach(), b.detach()[:, 0]


def embedding_geometry(W: Tensor) -> dict[str, float]:
    """What a toy model's embedding ``W [2, 4]`` looks like: the features' norms (mean, min), the cosine of each
    set's pair (``-1``: antipodal), the largest ``|cos|`` across the sets (``0``: the sets are orthogonal), and
    whether it is a "+" (all four within 0.1 of those ideals and norms above 0.5)."""
    norms = W.norm(dim=0)
    unit = W / norms.clamp_min(1e-12)
    cos = unit.t() @ unit
    across = cos[:2, 2:].abs().max()
    pairs = (float(cos[0, 1]), float(cos[2, 3]))
    plus = bool(norms.min() > 0.5 and max(pairs) < -0.9 and across < 0.1)
    return {
        "norm_mean": float(norms.mean()),
        "norm_min": float(norms.min()),
        "cos_x1_x2": pairs[0],
        "cos_y1_y2": pairs[1],
        "max_abs_cos_x_y": float(across),
        "is_plus": plus,
    }


def composed_basis(W: Tensor) -> tuple[Tensor, Tensor]:
    """The two candidate bases of an embedding ``W [2, 4]`` (columns x1, x2, y1, y2), as unit rows ``[4, 2]``:
    the features themselves, and the four compositions ``x_i + y_j`` (the directions of the samples with
    ``a = b``; at 45° to the features in the "+")."""
    true = (W / W.norm(dim=0).clamp_min(1e-12)).t()
    sums = torch.stack([W[:, i] + W[:, 2 + j] for i in (0, 1) for j in (0, 1)])
    return true.contiguous(), sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class ComposedToyData:
    """Anders et al.'s composed toy data as the SAE sees it: hidden activations ``h = W f`` of four features in two
    dims, rotated by ``rotation_degrees``. ``embedding`` is ``"plus"`` (the idealised "+") or ``"trained"`` (a
    ReLU-output toy model trained on the data with ``one_hot_fraction = toy_one_hot_fraction``; ``None``: the same
    fraction as the data). ``ground_truth [4, 2]`` holds the features' unit directions, ``composed_directions
    [4, 2]`` the compositions'."""

    correlated: bool = False
    one_hot_fraction: float = 0.0
    embedding: str = "plus"
    toy_one_hot_fraction: float | None = 0.0
    rotation_degrees: float = 0.0
    toy_steps: int = 4000
    seed: int = 0
    W: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.one_hot_fraction <= 1.0:
            raise ValueError(f"one_hot_fraction must be in [0, 1], got {self.one_hot_fraction}")
        if self.embedding == "plus":
            W = plus_geometry()
        elif self.embedding == "trained":
            q = self.one_hot_fraction if self.toy_one_hot_fraction is None else self.toy_one_hot_fraction
            W = train_composed_toy_models(
                torch.tensor([self.correlated]), torch.tensor([q]), steps=self.toy_steps, seed=self.seed
            )[0][0]
        else:
            raise ValueError(f"embedding must be 'plus' or 'trained', got {self.embedding!r}")
        self.W = rotation(self.rotation_degrees).t() @ W  # columns rotate as rows do under h @ R

    @property
    def d_in(self) -> int:
        return 2

    @property
    def ground_truth(self) -> Tensor:
        return composed_basis(self.W)[0]

    @property
    def composed_directions(self) -> Tensor:
        return composed_basis(self.W)[1]

    def sample(self, index: int, size: int) -> Tensor:
        f = sample_composed(
            size, torch.tensor([self.correlated]), torch.tensor([self.one_hot_fraction]), generator(self.seed, index)
        )[0]
        return f @ self.W.t()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "composed2d",
            **{k: v for k, v in asdict(self).items() if not isinstance(v, Tensor)},
            **embedding_geometry(self.W),
        }


def expected_l1(angle_degrees: float, correlated: bool, one_hot_fraction: float) -> float:
    """The expected L1 norm of the exact code of a sample of the idealised "+" data in a dictionary of two
    orthonormal antipodal pairs (four unit directions) at ``angle_degrees`` to the features.

    With ``u = (c, s)``, ``v = (-s, c)`` and the sample ``h = ±a e₁ ± b e₂`` the code is ``|h·u|, |h·v|`` on the
    matching signs, and averaging over the signs (``|p + q| + |p - q| = 2 max(|p|, |q|)``) gives
    ``L1 = max(a|c|, b|s|) + max(a|s|, b|c|)``. Its expectation: a one-hot sample ``(|c| + |s|) / 2``; a composed
    one with ``b = a`` (correlated) ``max(|c|, |s|)``; with independent ``a, b ~ U[0, 1]``, from
    ``E max(αa, βb) = α/2 + β²/(6α)`` for ``α >= β``: ``max(|c|, |s|) + min(|c|, |s|)² / (3 max(|c|, |s|))``.
    At 0° (the features) composed samples cost 1 and one-hot ones 1/2; at 45° (the compositions) ``1/√2`` for
    both if correlated, ``2√2/3`` and ``1/√2`` if not."""
    t = torch.tensor(angle_degrees, dtype=torch.float64).deg2rad()
    c, s = float(t.cos().abs()), float(t.sin().abs())
    hi, lo = max(c, s), min(c, s)
    composed = hi if correlated else hi + lo * lo / (3 * hi)
    return (1 - one_hot_fraction) * composed + one_hot_fraction * (c + s) / 2


def l1_crossover(correlated: bool) -> float:
    """The one-hot fraction at which the features' dictionary (0°) and the compositions' (45°) have the same
    expected L1 (:func:`expected_l1`); below it the compositions are sparser. ``2 - √2 ≈ 0.586`` with correlated
    amplitudes, ``(1 - 2√2/3) / (1/2 - √2/6) ≈ 0.216`` with independent ones."""
    composed_gain = expected_l1(0.0, correlated, 0.0) - expected_l1(45.0, correlated, 0.0)  # > 0
    one_hot_loss = expected_l1(45.0, correlated, 1.0) - expected_l1(0.0, correlated, 1.0)  # > 0
    return composed_gain / (composed_gain + one_hot_loss)


def topk1_crossover(correlated: bool) -> float:
    """The one-hot fraction at which a k = 1 code loses as much squared error with the features' dictionary as
    with the compositions' (idealised "+", amplitudes U[0, 1]). One latent per sample: the features leave
    ``min(a, b)²`` of a composed sample (``E = 1/6``; ``a² -> 1/3`` if correlated) and nothing of a one-hot one;
    the compositions leave ``(a - b)² / 2`` (``1/12``; ``0`` if correlated) and ``a² / 2`` (``1/6``). Equal at
    ``q = 1/3`` (independent) and ``2/3`` (correlated)."""
    true_composed, comp_composed, comp_one_hot = (1 / 3, 0.0, 1 / 6) if correlated else (1 / 6, 1 / 12, 1 / 6)
    gain = true_composed - comp_composed
    return gain / (gain + comp_one_hot)


@dataclass
class CorrelatedFeatureData:
    """Features that fire together (Chanin et al. 2025, "Sparse but Wrong"): ``n_features`` orthonormal directions
    in ``d_in`` dims, feature i firing with probability linear from ``p_max`` down to ``p_min``, amplitude
    U[0.5, 1.5]. Firing is correlated through a Gaussian copula: latent normals ``z = L ε`` with the correlation
    ``C = D^-½ (F Fᵀ + I) D^-½`` of ``n_factors`` random factors ``F ~ N(0, factor_scale²)``; feature i fires when
    ``z_i`` exceeds its ``1 - p_i`` quantile. ``correlation [n, n]`` is ``C``; ``true_l0`` the expected L0."""

    n_features: int = 16
    d_in: int = 16
    p_max: float = 0.4
    p_min: float = 0.1
    n_factors: int = 2
    factor_scale: float = 0.8
    seed: int = 0
    directions: Tensor = field(init=False, repr=False)
    probabilities: Tensor = field(init=False, repr=False)
    correlation: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.p_min <= self.p_max < 1:
            raise ValueError(f"need 0 < p_min <= p_max < 1, got {self.p_min}, {self.p_max}")
        self.directions = random_directions(
            self.n_features, self.d_in, self.seed, orthogonal=self.n_features <= self.d_in
        )
        self.probabilities = torch.linspace(self.p_max, self.p_min, self.n_features)
        F = torch.randn(self.n_features, self.n_factors, generator=generator(self.seed, -5)) * self.factor_scale
        cov = F @ F.t() + torch.eye(self.n_features)
        d = cov.diagonal().rsqrt()
        self.correlation = d[:, None] * cov * d[None, :]

    @property
    def ground_truth(self) -> Tensor:
        return self.directions

    @property
    def true_l0(self) -> float:
        return float(self.probabilities.sum())

    def active(self, index: int, size: int) -> Tensor:
        """Which features fire in batch ``index``: ``[size, n_features]`` bool."""
        g = generator(self.seed, index)
        z = torch.randn(size, self.n_features, generator=g) @ torch.linalg.cholesky(self.correlation).t()
        cut = torch.distributions.Normal(0.0, 1.0).icdf(1 - self.probabilities)
        return z > cut

    def sample(self, index: int, size: int) -> Tensor:
        on = self.active(index, size)
        amplitude = 0.5 + torch.rand(size, self.n_features, generator=generator(self.seed, ~index))
        return (on * amplitude) @ self.directions

    def describe(self) -> dict[str, Any]:
        return {"kind": "correlated", **{k: v for k, v in asdict(self).items() if not isinstance(v, Tensor)}}


@dataclass
class HierarchicalFeatureData:
    """Parents and children (feature absorption, Chanin et al. 2024): ``n_parents`` parent features, each firing
    with probability ``p_parent``, and ``children`` children per parent, each firing only when its parent does
    (with probability ``p_child`` then, at most one child per parent). Orthonormal directions in ``d_in`` dims,
    amplitude U[0.5, 1.5]. Rows of ``ground_truth``: the parents, then each parent's children in order."""

    n_parents: int = 4
    children: int = 2
    p_parent: float = 0.25
    p_child: float = 0.8
    d_in: int = 16
    seed: int = 0
    directions: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.n_parents * (1 + self.children)
        self.directions = random_directions(n, self.d_in, self.seed, orthogonal=n <= self.d_in)

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.children)

    @property
    def ground_truth(self) -> Tensor:
        return self.directions

    def child_of(self, parent: int, child: int) -> int:
        """The row of ``ground_truth`` holding child ``child`` of parent ``parent``."""
        return self.n_parents + parent * self.children + child

    def sample(self, index: int, size: int) -> Tensor:
        g = generator(self.seed, index)
        parent = torch.rand(size, self.n_parents, generator=g) < self.p_parent
        has_child = parent & (torch.rand(size, self.n_parents, generator=g) < self.p_child)
        which = torch.randint(self.children, (size, self.n_parents), generator=g)
        child = torch.nn.functional.one_hot(which, self.children).bool() & has_child[..., None]
        on = torch.cat([parent, child.flatten(1)], 1)
        amplitude = 0.5 + torch.rand(size, self.n_features, generator=g)
        return (on * amplitude) @ self.directions

    def describe(self) -> dict[str, Any]:
        return {"kind": "hierarchical", **{k: v for k, v in asdict(self).items() if not isinstance(v, Tensor)}}

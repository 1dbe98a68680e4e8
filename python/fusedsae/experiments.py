"""Toy experiments: which feature bases a TopK SAE can and cannot recover (``fusedsae toy <experiment>``).

Each experiment trains a few small SAEs on toy data with known ground truth (:mod:`fusedsae.toy`) and reports, per case,
how well the decoder rows match each candidate basis (MMCS, docs/architecture.md#metrics) beside the usual metrics.
Nothing in a result is fixed in advance: the ``basis`` column is read off the measured cosines.

* ``composed`` (Anders et al. 2024): two sets of four features, one feature of each set active together. Does the
  SAE learn the 8 atomic features or the 16 combinations? It depends on the amplitudes (independent or shared) and
  on the SAE's budget (k, d_sae): with shared amplitudes the atomic basis is not identifiable (a vector can move
  between the sets' directions without changing any sample), and a k = 1 SAE learns the combinations.
* ``sparsity`` (Sharkey et al. 2022): 64 random directions in 32 dims, 3 active on average; k swept around the true
  L0. A too-small k still finds the directions but reconstructs badly; a too-large k splits and blends them.
* ``superposition`` (Elhage et al. 2022): hidden activations of trained ReLU-output toy models (20 features, 5
  dims) at rising feature sparsity. Sparser features are packed in superposition; an SAE recovers them only when
  they are sparse, not when they are dense (any rotation of dense codes reconstructs as well).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusedsae import metrics as M
from fusedsae import toy
from fusedsae.config import SAEConfig
from fusedsae.data import ToySource
from fusedsae.sae import SparseAutoencoder
from fusedsae.training import TrainConfig, Trainer

# A decoder matches a basis when its directions have decoder rows this close on average (MMCS); it has learned that
# basis rather than another when its MMCS also leads the other bases' by MARGIN.
MATCH_MMCS = 0.9
MARGIN = 0.05


@dataclass(frozen=True)
class Case:
    """One TopK SAE (``k``, ``d_sae``) trained on the toy dataset ``data()`` builds; ``settings`` are the columns
    that tell the cases apart in the results."""

    label: str
    data: Callable[[], Any]
    k: int
    d_sae: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentResult:
    """Rows of measurements, one per case: the case's settings, ``mmcs_<basis>`` and ``recovered_<basis>`` (the
    fraction of that basis's directions with a decoder row at cosine > 0.9), ``basis`` (see :func:`learned_basis`),
    ``l0``, ``fvu``, ``dead_fraction`` and ``seconds``."""

    name: str
    question: str
    bases: tuple[str, ...]
    rows: list[dict[str, Any]]

    def table(self) -> str:
        """The rows as a plain-text table."""
        measured = [f"{m}_{b}" for b in self.bases for m in ("mmcs", "recovered")]
        keys = [*settings(self.rows[0]), *measured, "basis", "l0", "fvu", "dead_fraction"]
        cells = [[_format(row[k]) for k in keys] for row in self.rows]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.name, "question": self.question, "bases": list(self.bases), "rows": self.rows}


_MEASURED = ("basis", "l0", "fvu", "dead_fraction", "seconds")


def settings(row: dict[str, Any]) -> dict[str, Any]:
    """The columns of a result row that describe its case (everything but the SAE's measurements)."""
    return {k: v for k, v in row.items() if k not in _MEASURED and not k.startswith(("mmcs_", "recovered_"))}


def learned_basis(mmcs: dict[str, float]) -> str:
    """The basis the decoder learned, read off its MMCS per basis: the best one when it reaches ``MATCH_MMCS`` and
    leads every other by ``MARGIN``; ``"mixed"`` when several reach ``MATCH_MMCS`` within the margin; else
    ``"neither"``."""
    ranked = sorted(mmcs.items(), key=lambda item: item[1], reverse=True)
    best, score = ranked[0]
    if score < MATCH_MMCS:
        return "neither"
    if len(ranked) > 1 and score - ranked[1][1] < MARGIN:
        return "mixed"
    return best


def _format(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Experiment:
    """A question, the bases it compares (name -> the data's unit directions ``[n, d_in]``), its cases, and
    ``describe``: columns measured on the data itself (e.g. how many features a toy model represents)."""

    question: str
    bases: dict[str, Callable[[Any], Tensor]]
    cases: Callable[[], list[Case]]
    describe: Callable[[Any], dict[str, Any]] = lambda data: {}


def _composed_cases() -> list[Case]:
    cases = []
    for correlated in (False, True):
        amplitudes = "shared" if correlated else "independent"
        for k, d_sae in ((2, 8), (1, 16), (2, 16), (2, 32)):
            cases.append(
                Case(
                    label=f"{amplitudes}-k{k}-d{d_sae}",
                    data=lambda c=correlated: toy.ComposedFeatureData(n_sets=2, set_size=4, d_in=16, correlated=c),
                    k=k,
                    d_sae=d_sae,
                    settings={"amplitudes": amplitudes, "k": k, "d_sae": d_sae},
                )
            )
    return cases


def _sparsity_cases() -> list[Case]:
    def data() -> toy.SparseFeatureData:
        return toy.SparseFeatureData(d_in=32, n_features=64, mean_active=3.0)

    return [Case(f"k{k}", data, k=k, d_sae=128, settings={"true_l0": 3.0, "k": k, "d_sae": 128}) for k in (1, 3, 6, 12)]


def _superposition_cases() -> list[Case]:
    cases = []
    for sparsity in (0.0, 0.7, 0.9, 0.97):
        # k: the expected number of active features among the 20 (at least 1, at most the 5 dims)
        k = min(5, max(1, round(20 * (1 - sparsity))))
        cases.append(
            Case(
                label=f"s{sparsity}",
                data=lambda s=sparsity: toy.SuperpositionData(n_features=20, d_hidden=5, sparsity=s),
                k=k,
                d_sae=40,
                settings={"feature_sparsity": sparsity, "k": k, "d_sae": 40},
            )
        )
    return cases


EXPERIMENTS: dict[str, Experiment] = {
    "composed": Experiment(
        question="atomic features or their combinations? (2 sets x 4 features, one per set active)",
        bases={"atomic": lambda d: d.ground_truth, "composed": lambda d: d.composed_directions},
        cases=_composed_cases,
    ),
    "sparsity": Experiment(
        question="how does recovery depend on k against the true L0? (64 directions in 32 dims, L0 = 3)",
        bases={"true": lambda d: d.ground_truth},
        cases=_sparsity_cases,
    ),
    "superposition": Experiment(
        question="can an SAE undo a toy model's superposition? (20 features in 5 dims, rising sparsity)",
        bases={"represented": lambda d: d.ground_truth},
        cases=_superposition_cases,
        describe=lambda d: {"represented": int(d.ground_truth.shape[0])},
    ),
}


def train_case(
    case: Case, steps: int, seed: int = 0, device: str = "cpu", batch_size: int = 1024
) -> tuple[Any, SparseAutoencoder, dict[str, Any]]:
    """Trains one case's TopK SAE; returns ``(data, sae, final metrics)``. Adam at 3e-3 with a linear decay over
    the last 20% of steps; a latent is dead after 50 batches without firing."""
    data = case.data()
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=data.d_in, d_sae=case.d_sae, activation="topk", k=case.k, device=device))
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=3e-3,
        lr_decay_steps=steps // 5,
        dead_tokens=50 * batch_size,
        checkpoint_every=0,
        log_every=steps,
        seed=seed,
        progress=False,
    )
    metrics = Trainer(sae, ToySource(data, batch_size), cfg).train()
    return data, sae, metrics


def run_experiment(
    name: str,
    steps: int = 600,
    seed: int = 0,
    device: str = "cpu",
    labels: Sequence[str] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Runs experiment ``name`` (a key of ``EXPERIMENTS``): every case, or those whose label is in ``labels``.
    ``on_row`` is called with each row as it is measured."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; use one of {sorted(EXPERIMENTS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    experiment = EXPERIMENTS[name]
    cases = experiment.cases()
    if labels is not None:
        unknown = set(labels) - {c.label for c in cases}
        if unknown:
            raise ValueError(f"{name} has no case {sorted(unknown)}; cases: {[c.label for c in cases]}")
        cases = [c for c in cases if c.label in labels]
    rows = []
    for case in cases:
        start = time.perf_counter()
        data, sae, metrics = train_case(case, steps, seed, device)
        row: dict[str, Any] = {**case.settings, **experiment.describe(data)}
        for basis, directions in experiment.bases.items():
            cosines = M.max_cosines(directions(data).to(sae.W_dec.device), sae.W_dec)
            row[f"mmcs_{basis}"] = float(cosines.mean())
            row[f"recovered_{basis}"] = float((cosines > 0.9).float().mean())
        row["basis"] = learned_basis({b: row[f"mmcs_{b}"] for b in experiment.bases})
        row.update({k: float(metrics[k]) for k in ("l0", "fvu", "dead_fraction")})
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return ExperimentResult(name, experiment.question, tuple(experiment.bases), rows)

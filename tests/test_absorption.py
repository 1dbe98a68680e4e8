"""The absorption metric (``fusedsae.experiments.absorption_rate``, Chanin et al. 2024) on dictionaries built by hand,
where the answer is known: a clean dictionary scores 0, a perfectly absorbed one 1, and the cases in between score
what the definition says. Seconds; the trained comparison is ``fusedsae toy absorption`` (docs/matryoshka.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fusedsae import toy
from fusedsae.experiments import ABSORB_COS, LabConfig, absorption_rate, lab_absorption, lab_figures

DATA = toy.HierarchicalFeatureData(n_parents=3, children=2, p_parent=0.5, p_child=0.6, d_in=12, seed=4)


def samples(n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, d_in], on [n, n_features])``: samples and which features are active in them."""
    x = DATA.sample(7, n)
    return x, (x @ DATA.ground_truth.t()) > 1e-4


def encode(on: torch.Tensor, route: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Activations ``[n, d_sae]`` of a hand-built dictionary: ``route(on) -> [n, d_sae]`` bool says which latents
    fire (value 1: the metric only asks whether a latent fires)."""
    return route(on).float()


def clean() -> tuple[torch.Tensor, Callable]:
    """One latent per feature, firing exactly when its feature is active."""
    return DATA.ground_truth.clone(), lambda on: on


def absorbed() -> tuple[torch.Tensor, Callable]:
    """Chanin et al.'s absorption: a parent latent that fires only when no child is active, and child latents
    whose decoder rows carry the parent's direction (``(parent + child) / sqrt(2)``)."""
    G = DATA.ground_truth
    W = G.clone()
    kids_of = [[DATA.child_of(p, c) for c in range(DATA.children)] for p in range(DATA.n_parents)]
    for p, kids in enumerate(kids_of):
        for c in kids:
            W[c] = (G[p] + G[c]) / 2**0.5

    def route(on):
        fires = on.clone()
        for p, kids in enumerate(kids_of):
            fires[:, p] &= ~on[:, kids].any(1)  # the hole in the parent latent
        return fires

    return W, route


def test_a_clean_dictionary_absorbs_nothing():
    x, on = samples()
    W, route = clean()
    got = absorption_rate(DATA, W, encode(on, route), x)
    assert got["absorption_rate"] == 0.0
    assert got["parent_cos"] == pytest.approx(1.0) and got["child_parent_cos"] == pytest.approx(0.0, abs=1e-6)
    assert got["parent_recall_with_child"] == 1.0 and got["parent_recall_alone"] == 1.0


def test_a_perfectly_absorbed_dictionary_scores_one():
    x, on = samples()
    W, route = absorbed()
    got = absorption_rate(DATA, W, encode(on, route), x)
    assert got["absorption_rate"] == 1.0
    assert got["parent_recall_with_child"] == 0.0 and got["parent_recall_alone"] == 1.0
    assert got["child_parent_cos"] == pytest.approx(2**-0.5)
    scaled = W * torch.linspace(0.2, 3.0, len(W))[:, None]  # decoder norms do not matter, only directions
    assert absorption_rate(DATA, scaled, encode(on, route), x) == pytest.approx(got)


def test_each_condition_of_the_definition_is_needed():
    x, on = samples()
    W, route = absorbed()
    # the parent latent firing as well (no hole): the parent is not lost, so nothing is absorbed
    assert absorption_rate(DATA, W, encode(on, lambda o: o), x)["absorption_rate"] == 0.0
    # a hole but child rows without the parent's direction: a missed parent, not absorption
    assert absorption_rate(DATA, DATA.ground_truth, encode(on, route), x)["absorption_rate"] == 0.0
    # child rows just below / above the cosine threshold
    G = DATA.ground_truth
    for cos, want in ((ABSORB_COS - 0.05, 0.0), (ABSORB_COS + 0.05, 1.0)):
        tilted = G.clone()
        for p in range(DATA.n_parents):
            for c in range(DATA.children):
                kid = DATA.child_of(p, c)
                tilted[kid] = cos * G[p] + (1 - cos**2) ** 0.5 * G[kid]
        assert absorption_rate(DATA, tilted, encode(on, route), x)["absorption_rate"] == want, cos


def test_absorbing_one_parent_of_three_scores_a_third():
    x, on = samples()
    W_abs, route_abs = absorbed()
    W, _ = clean()
    kids = [DATA.child_of(0, c) for c in range(DATA.children)]
    W[kids] = W_abs[kids]

    def route(on):
        fires = on.clone()
        fires[:, 0] = route_abs(on)[:, 0]
        return fires

    assert absorption_rate(DATA, W, encode(on, route), x)["absorption_rate"] == pytest.approx(1 / 3)


def test_absorption_rate_needs_orthonormal_directions():
    crowded = toy.HierarchicalFeatureData(n_parents=4, children=3, d_in=8)
    with pytest.raises(ValueError, match="orthonormal toy directions"):
        absorption_rate(crowded, torch.eye(8), torch.zeros(3, 8), torch.zeros(3, 8))


def test_absorption_lab_trains_plain_and_matryoshka_saes_and_summarises_them(tmp_path, one_thread):
    """The experiment's plumbing on a few steps (its findings need ~2000 steps: docs/matryoshka.md)."""
    from fusedsae.cli import main

    cfg = LabConfig(seeds=1, steps=15, batch_size=128, eval_size=512, progress=False)
    result = lab_absorption(cfg, cells=(("topk", 2), ("batchtopk", 1)))
    assert [(r["objective"], r["k"], r["matryoshka"]) for r in result.summary] == [
        ("topk", 2, "none"),
        ("topk", 2, "[4, 36]"),
        ("batchtopk", 1, "none"),
        ("batchtopk", 1, "[4, 36]"),
    ]
    for row in result.rows:
        assert 0.0 <= row["absorption_rate"] <= 1.0 and 0.0 < row["parent_cos"] <= 1.0 + 1e-6
    assert main(["toy", "absorption", "--seeds", "1", "--steps", "5", "--no-plots", "--out", str(tmp_path)]) == 0
    record = (tmp_path / "absorption.json").read_text()
    assert '"absorption_rate_sd"' in record and '"matryoshka": "[4, 36]"' in record
    (figure,) = lab_figures(result, tmp_path / "figures", seeds=1)
    assert figure.name == "absorption.png" and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Toy superposition data: ground truth, statistics, and batches that regenerate from their index."""

from __future__ import annotations

import pytest
import torch

from fusedsae import TensorSource, ToySource, metrics, toy


def test_sparse_feature_data_statistics_and_ground_truth():
    data = toy.SparseFeatureData(d_in=32, n_features=100, mean_active=5.0, seed=3)
    assert data.ground_truth.shape == (100, 32)
    torch.testing.assert_close(data.ground_truth.norm(dim=1), torch.ones(100))
    x = data.sample(0, 20000)
    assert x.shape == (20000, 32)
    # x = c @ G with c >= 0: recover c by least squares is not possible (n > d), but its mean is known
    expected_mean = (data.probabilities * 0.5) @ data.directions
    torch.testing.assert_close(x.mean(0), expected_mean, atol=0.03, rtol=0)
    assert torch.equal(data.sample(7, 10), data.sample(7, 10))  # batch i regenerates from i
    assert not torch.equal(data.sample(7, 10), data.sample(8, 10))
    decaying = toy.SparseFeatureData(n_features=50, mean_active=2.0, frequency_decay=0.9)
    assert decaying.probabilities.sum() == pytest.approx(2.0) and decaying.probabilities[0] > decaying.probabilities[-1]


def test_superposition_toy_model_represents_features_in_superposition():
    data = toy.SuperpositionData(n_features=8, d_hidden=3, sparsity=0.9, toy_steps=1500)
    norms = data.feature_norms
    represented = int((norms > 0.5).sum())
    assert represented > 3  # more features than dimensions: superposition
    assert data.ground_truth.shape == (represented, 3)
    x = data.sample(0, 4096)
    assert x.shape == (4096, 3)
    # the toy model reconstructs its sparse inputs well: it has learned something
    features = toy.sample_features(8, 4096, 0.9, toy.generator(0, 123))
    out = data.model.forward(features)
    assert ((out - features) ** 2).sum(-1).mean() < 0.5 * (features**2).sum(-1).mean()


@pytest.mark.parametrize("correlated", [False, True])
def test_composed_features(correlated):
    data = toy.ComposedFeatureData(n_sets=2, set_size=4, d_in=16, correlated=correlated, one_hot_fraction=0.25)
    G = data.ground_truth
    torch.testing.assert_close(G @ G.t(), torch.eye(8), atol=1e-5, rtol=0)  # orthonormal when they fit
    x = data.sample(0, 4000)
    coeffs = x @ G.t()  # exact thanks to orthonormality
    per_set = (coeffs.view(-1, 2, 4) > 1e-5).sum(-1)  # above float noise of the projection
    assert (per_set <= 1).all()  # one-hot within a set
    both = (per_set == 1).all(1).float().mean()
    assert 0.65 < both < 0.85  # 1 - one_hot_fraction (minus rare zero amplitudes)
    if correlated:
        mask = (per_set == 1).all(1)
        sums = coeffs.view(-1, 2, 4).sum(-1)[mask]
        torch.testing.assert_close(sums[:, 0], sums[:, 1], atol=1e-5, rtol=0)
    composed = data.composed_directions
    assert composed.shape == (16, 16)
    assert metrics.mmcs(composed, composed) == pytest.approx(1.0)


def test_make_and_sources():
    assert isinstance(toy.make("sparse", d_in=8, n_features=16), toy.SparseFeatureData)
    with pytest.raises(ValueError, match="unknown toy data"):
        toy.make("nope")
    data = toy.SparseFeatureData(d_in=8, n_features=16)
    a, b = ToySource(data, 4, rank=0, world_size=2), ToySource(data, 4, rank=1, world_size=2)
    assert torch.equal(a.next_batch(), data.sample(0, 4)) and torch.equal(b.next_batch(), data.sample(1, 4))
    acts = torch.randn(10, 3)
    src = TensorSource(acts, batch_size=4, seed=1)
    seen = torch.cat([src.next_batch(), src.next_batch()])
    assert len({tuple(r.tolist()) for r in seen}) == 8  # no repeats within an epoch
    state = src.state_dict()
    nxt = src.next_batch()
    again = TensorSource(acts, batch_size=4, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(), nxt)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        TensorSource(acts, batch_size=11)

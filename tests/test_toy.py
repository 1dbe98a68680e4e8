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


@pytest.mark.usefixtures("one_thread")
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


# ------------------------------------------------------------------------------------------------------------------
# Anders et al.'s composed toy in two hidden dims, and the analytic expectations of the lab
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("correlated", [False, True])
def test_sample_composed_one_feature_per_set_and_the_one_hot_fraction(correlated):
    q = torch.tensor([0.0, 0.3])
    f = toy.sample_composed(20000, torch.tensor([correlated, correlated]), q, toy.generator(0, 1))
    assert f.shape == (2, 20000, 4)
    per_set = (f.view(2, -1, 2, 2) > 0).sum(-1)  # amplitudes U[0, 1] are > 0 almost surely
    assert (per_set <= 1).all()  # x1 and x2 (y1 and y2) never together
    single = (per_set.sum(-1) == 1).float().mean(-1)
    assert single[0] == 0 and abs(single[1] - 0.3) < 0.015  # 4.6 standard errors
    if correlated:
        both = per_set[1].sum(-1) == 2
        amplitudes = f[1][both].view(-1, 2, 2).sum(-1)
        torch.testing.assert_close(amplitudes[:, 0], amplitudes[:, 1], rtol=0, atol=0)


def test_plus_geometry_bases_and_rotation():
    W = toy.plus_geometry()
    geometry = toy.embedding_geometry(W)
    assert geometry["is_plus"] and geometry["cos_x1_x2"] == -1 and geometry["max_abs_cos_x_y"] == 0
    true, composed = toy.composed_basis(W)
    torch.testing.assert_close(true, torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))
    r = 0.5**0.5
    torch.testing.assert_close(composed, torch.tensor([[r, r], [r, -r], [-r, r], [-r, -r]]))
    R = toy.rotation(30.0)
    torch.testing.assert_close(torch.tensor([[1.0, 0.0]]) @ R, torch.tensor([[3**0.5 / 2, 0.5]]))
    data = toy.ComposedToyData(rotation_degrees=30.0, one_hot_fraction=0.5)
    torch.testing.assert_close(data.ground_truth[0], torch.tensor([3**0.5 / 2, 0.5]))
    x = data.sample(0, 1000)
    coeffs = x @ data.ground_truth[[0, 2]].t()  # the rotated features' axes recover the amplitudes
    assert coeffs.abs().max() <= 1.0 + 1e-6 and x.shape == (1000, 2)
    assert not toy.embedding_geometry(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]]))["is_plus"]
    with pytest.raises(ValueError, match="one_hot_fraction"):
        toy.ComposedToyData(one_hot_fraction=1.5)
    with pytest.raises(ValueError, match="embedding"):
        toy.ComposedToyData(embedding="cross")


@pytest.mark.usefixtures("one_thread")
def test_relu_output_toy_model_learns_the_plus():
    W, _ = toy.train_composed_toy_models(torch.tensor([False, True]), torch.zeros(2), steps=150, batch=128)
    for w in W:
        geometry = toy.embedding_geometry(w)
        assert geometry["is_plus"], geometry  # antipodal within a set, orthogonal across: the idealised "+"
        assert abs(geometry["norm_mean"] - 1) < 0.1


def test_expected_l1_closed_forms():
    r2 = 2**0.5
    assert toy.expected_l1(0.0, False, 0.0) == pytest.approx(1.0)
    assert toy.expected_l1(45.0, False, 0.0) == pytest.approx(2 * r2 / 3)
    assert toy.expected_l1(45.0, True, 0.0) == pytest.approx(1 / r2)
    assert toy.expected_l1(0.0, True, 1.0) == pytest.approx(0.5)
    assert toy.expected_l1(45.0, False, 1.0) == pytest.approx(1 / r2)
    assert toy.expected_l1(90.0 + 20.0, False, 0.3) == pytest.approx(toy.expected_l1(20.0, False, 0.3))  # period 90
    assert toy.l1_crossover(True) == pytest.approx(2 - r2)
    assert toy.l1_crossover(False) == pytest.approx((1 - 2 * r2 / 3) / (0.5 - r2 / 6))
    for correlated in (False, True):
        q = toy.l1_crossover(correlated)
        assert toy.expected_l1(0.0, correlated, q) == pytest.approx(toy.expected_l1(45.0, correlated, q))
        below, above = q - 0.05, q + 0.05  # below the crossover the compositions are sparser, above the features
        assert toy.expected_l1(45.0, correlated, below) < toy.expected_l1(0.0, correlated, below)
        assert toy.expected_l1(0.0, correlated, above) < toy.expected_l1(45.0, correlated, above)
    assert toy.topk1_crossover(False) == pytest.approx(1 / 3) and toy.topk1_crossover(True) == pytest.approx(2 / 3)

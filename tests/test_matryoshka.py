"""Matryoshka SAEs: every prefix reconstruction from one pass over the active latents, checked against an
independent float64 computation by dense masking (values and every gradient), and the training loss's terms."""

from __future__ import annotations

import pytest
import torch

import fusedsae
from fusedsae import functional as F


def naive_levels(values, indices, W_dec, b_dec, widths):
    """Dense masking: scatter the code to [N, d_sae], keep the latents below each width, decode densely."""
    dense = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype).scatter_add(1, indices, values)
    return torch.stack([dense[:, :w] @ W_dec[:w] + b_dec for w in widths], dim=1)


@pytest.mark.parametrize(
    ("n", "d_sae", "k", "d_in", "widths"),
    [
        (37, 53, 5, 11, [7, 20, 33, 53]),  # no width a multiple of anything
        (16, 40, 1, 8, [1, 40]),  # k = 1, a one-latent prefix
        (9, 30, 30, 6, [3, 10, 30]),  # k = d_sae: every latent active
        (25, 64, 8, 16, [64]),  # one level: the plain decoder
    ],
)
def test_prefix_reconstructions_and_gradients_match_dense_masking(n, d_sae, k, d_in, widths):
    g = torch.Generator().manual_seed(n * d_sae + k)
    W_dec = torch.randn(d_sae, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    b_dec = torch.randn(d_in, dtype=torch.float64, generator=g, requires_grad=True)
    scores = torch.randn(n, d_sae, dtype=torch.float64, generator=g)
    v, indices = scores.topk(k, dim=1)  # sorted by value, as the encoders return them
    values = v.relu().requires_grad_()
    weights = torch.randn(n, len(widths), d_in, dtype=torch.float64, generator=g)  # a loss touching every level

    got = F.matryoshka_decode(values, indices, W_dec, b_dec, widths)
    grads = torch.autograd.grad((got * weights).sum(), (values, W_dec, b_dec))
    expected = naive_levels(values, indices, W_dec, b_dec, widths)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (values, W_dec, b_dec))

    torch.testing.assert_close(got, expected)
    for name, a, b in zip(("values", "W_dec", "b_dec"), grads, expected_grads):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d {name}: {m}")
    # the last level is the ordinary sparse decoder
    torch.testing.assert_close(got[:, -1], F.sparse_decode(values, indices, W_dec, b_dec))


def test_padded_batchtopk_codes_and_leading_dims():
    """Padding (value 0, index 0) adds nothing; leading dims are kept: [..., m] -> [..., L, d_in]."""
    W_dec = torch.randn(20, 4, dtype=torch.float64)
    values = torch.tensor([[[0.5, 0.0, 0.0], [1.0, 2.0, 0.0]]], dtype=torch.float64)
    indices = torch.tensor([[[15, 0, 0], [3, 12, 0]]])
    got = F.matryoshka_decode(values, indices, W_dec, None, [5, 20])
    assert got.shape == (1, 2, 2, 4)
    torch.testing.assert_close(got[0, 0, 0], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(got[0, 0, 1], 0.5 * W_dec[15])
    torch.testing.assert_close(got[0, 1, 0], W_dec[3])
    torch.testing.assert_close(got[0, 1, 1], W_dec[3] + 2 * W_dec[12])


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_training_loss_adds_one_mse_per_inner_width(activation):
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(
        d_in=12, d_sae=50, activation=activation, k=4, dtype="float64", matryoshka_widths=[5, 17]
    )
    assert sae.cfg.matryoshka_widths == [5, 17, 50]  # d_sae appended, as SAELens does
    x = torch.randn(30, 12, dtype=torch.float64)
    out = sae.training_forward(x, dead_mask=torch.arange(50) % 4 == 0)
    assert list(out.losses) == ["mse_loss", "inner_mse_loss_5", "inner_mse_loss_17", "auxiliary_reconstruction_loss"]
    dense = out.feature_acts
    for width in (5, 17):
        x_hat = dense[:, :width] @ sae.W_dec[:width] + sae.b_dec
        torch.testing.assert_close(out.losses[f"inner_mse_loss_{width}"], (x_hat - x).pow(2).sum(-1).mean())
    plain = fusedsae.SparseAutoencoder(sae.cfg.replace(matryoshka_widths=None))
    plain.load_state_dict(sae.state_dict())
    base = plain.training_forward(x, dead_mask=torch.arange(50) % 4 == 0)
    for name in ("mse_loss", "auxiliary_reconstruction_loss"):
        torch.testing.assert_close(out.losses[name], base.losses[name])
    total = sum(v for v in out.losses.values())
    torch.testing.assert_close(out.loss, total.float())


def test_config_refuses_bad_widths_and_files_keep_them(tmp_path):
    with pytest.raises(ValueError, match="increase strictly from >= 1 up to d_sae=10"):
        fusedsae.SAEConfig(d_in=4, d_sae=10, activation="topk", k=2, matryoshka_widths=[6, 3])
    with pytest.raises(ValueError, match="need a topk or batchtopk SAE"):
        fusedsae.SAEConfig(d_in=4, d_sae=10, activation="relu", matryoshka_widths=[5])
    sae = fusedsae.SparseAutoencoder(d_in=4, d_sae=10, activation="batchtopk", k=2, matryoshka_widths=[3, 6])
    sae.save(tmp_path / "m")
    assert fusedsae.load(tmp_path / "m").cfg.matryoshka_widths == [3, 6, 10]

"""Per-head attribution (docs/architecture.md#attribution) for the architectures beyond the four plain ones (issue 13
items 3-4): Matryoshka SAEs, whose prefixes shape training only, so every active latent, inner or outer, splits
exactly into per-head terms plus a constant; gated SAEs, whose active latents are their magnitude path's
(``GatedSAE.magnitude_path``) wherever the gate is open.

Tolerance: the float32 worst-case rounding bound of the sums (Higham's gamma_n times the sum of the magnitudes of
the terms, computed in float64), as tests/test_attribution.py; a wrong head, sign or bias moves a result by the size
of a term, orders of magnitude above it.
"""

from __future__ import annotations

import pytest
import torch

from fusedsae import SparseAutoencoder, TrainConfig, Trainer
from fusedsae.analysis import head_contributions
from fusedsae.data import TensorSource

pytestmark = pytest.mark.usefixtures("one_thread")

U = torch.finfo(torch.float32).eps / 2
H, DH = 4, 8
D_IN = H * DH


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def head_data(n: int, seed: int) -> torch.Tensor:
    """``[n, D_IN]`` head-major rows: per head a few sparse directions plus noise and an offset (so that the two
    conventions differ)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(H, 6, DH, generator=g)
    on = torch.rand(n, H, 6, generator=g) < 0.3
    z = torch.einsum("nhf,hfd->nhd", on * torch.rand(n, H, 6, generator=g), dirs)
    return (z + 0.05 * torch.randn(n, H, DH, generator=g) + 0.4).reshape(n, D_IN)


@pytest.fixture(scope="module", params=["topk", "batchtopk"])
def matryoshka(request) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        d_in=D_IN, d_sae=61, activation=request.param, k=4, n_heads=H, matryoshka_widths=[5, 23]
    )  # 61 and 23: widths that are no multiple of any block
    cfg = TrainConfig(steps=40, batch_size=256, lr=3e-3, checkpoint_every=0, log_every=40, progress=False)
    Trainer(sae, TensorSource(head_data(4096, 1), batch_size=256), cfg).train()
    return sae.eval()


@pytest.mark.parametrize("convention", ["raw", "centred"])
def test_matryoshka_contributions_reproduce_every_active_latent_of_every_level(matryoshka, convention):
    sae = matryoshka
    z = head_data(300, 2)
    hc = head_contributions(sae, z, convention=convention)
    dense = sae.encode(z)
    assert int(hc.active.sum()) == int((dense != 0).sum()) > 0
    fired = hc.indices[hc.active]
    # the identity is checked on latents of the innermost prefix, the middle level and the outer one alike
    assert (fired < 5).any() and ((fired >= 5) & (fired < 23)).any() and (fired >= 23).any()
    W = sae.W_enc.detach().double()
    b_dec = sae.b_dec.detach().double()
    zd = z.double()
    pre = (zd - b_dec) @ W + sae.b_enc.detach().double()
    mag = (zd.abs() + b_dec.abs()) @ W.abs() + sae.b_enc.detach().double().abs()
    exact = pre.gather(1, hc.indices)[hc.active]
    bound = gamma(D_IN + H + 4) * mag.gather(1, hc.indices)[hc.active]
    total = hc.total()[hc.active].double()
    assert ((total - exact).abs() <= bound).all()
    assert ((total - hc.activations[hc.active].double()).abs() <= 2 * bound).all()
    offset = b_dec if convention == "centred" else torch.zeros_like(b_dec)
    for h in range(H):
        cols = slice(h * DH, (h + 1) * DH)
        term = ((zd[:, cols] - offset[cols]) @ W[cols]).gather(1, hc.indices)[hc.active]
        term_mag = ((zd[:, cols].abs() + offset[cols].abs()) @ W[cols].abs()).gather(1, hc.indices)[hc.active]
        err = (hc.contributions[..., h][hc.active].double() - term).abs()
        assert (err <= gamma(DH + 2) * term_mag).all(), f"head {h}"


# ---------------------------------------------------------------------------------------------------------------
# gated SAEs (SAELens "gated"): attribution of the magnitude path, on the latents the gate opens
# ---------------------------------------------------------------------------------------------------------------


def gated_sae(d_in: int, d_sae: int):
    from fusedsae.compat import sae_lens as csl

    torch.manual_seed(3)
    sae = csl.GatedSAE(csl.GatedSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.normal_(0, 0.3)
        for name in ("b_gate", "b_mag", "r_mag"):
            getattr(sae, name).normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
    return sae


@pytest.mark.parametrize("convention", ["raw", "centred"])
def test_gated_sae_active_latents_split_exactly_into_head_terms(convention):
    sae = gated_sae(D_IN, 45)
    z = head_data(200, 4)
    gated = sae.encode(z)
    assert 0 < int((gated != 0).sum()) < gated.numel()  # the gate opens some latents, not all
    mag = sae.magnitude_path(n_heads=H)
    hc = head_contributions(mag, z, convention=convention)
    # every latent the gate opens is among the magnitude path's active ones, with the gated activation
    # (scatter_reduce: the padded form repeats feature 0 in its inactive slots)
    found = torch.zeros_like(gated).scatter_reduce(1, hc.indices, hc.active.float(), "amax") > 0
    assert found[gated != 0].all()
    acts = torch.zeros_like(gated).scatter_reduce(1, hc.indices, torch.where(hc.active, hc.activations, 0.0), "sum")
    torch.testing.assert_close(acts[gated != 0], gated[gated != 0])
    # the identity on the gated SAE's own active latents, against float64
    opened = (gated.gather(1, hc.indices) != 0) & hc.active
    W = mag.W_enc.detach().double()
    b_dec = sae.b_dec.detach().double()
    zd = z.double()
    pre = (zd - b_dec) @ W + sae.b_mag.detach().double()
    scale = (zd.abs() + b_dec.abs()) @ W.abs() + sae.b_mag.detach().double().abs()
    bound = gamma(D_IN + H + 4) * scale.gather(1, hc.indices)[opened]
    assert ((hc.total()[opened].double() - pre.gather(1, hc.indices)[opened]).abs() <= bound).all()
    assert ((hc.total()[opened] - gated.gather(1, hc.indices)[opened]).abs().double() <= 2 * bound).all()


def test_gated_fixture_written_by_sae_lens_attributes_its_own_outputs():
    from safetensors.torch import load_file

    from conftest import FIXTURES
    from fusedsae.compat import sae_lens as csl

    folder = FIXTURES / "saelens_gated"
    want = load_file(str(folder / "expected.safetensors"))
    sae = csl.SAE.load_from_disk(folder)
    hc = head_contributions(sae.magnitude_path(n_heads=2), want["x"])
    opened = (want["encode"].gather(1, hc.indices) != 0) & hc.active
    assert int(opened.sum()) == int((want["encode"] != 0).sum()) > 0
    torch.testing.assert_close(hc.total()[opened], want["encode"].gather(1, hc.indices)[opened])


def test_dictionary_learning_gated_autoencoder_loads_runs_and_attributes():
    """A GatedAutoEncoder folder written by dictionary_learning itself: its outputs, and exact attribution."""
    from safetensors.torch import load_file

    import fusedsae
    from conftest import FIXTURES
    from fusedsae.compat import sae_lens as csl

    folder = FIXTURES / "dictionary_learning_GatedAutoEncoder"
    want = load_file(str(folder / "expected.safetensors"))
    sae = fusedsae.load(folder)
    assert isinstance(sae, csl.GatedSAE) and sae.cfg.metadata["dict_class"] == "GatedAutoEncoder"
    torch.testing.assert_close(sae.encode(want["x"]), want["encode"])
    torch.testing.assert_close(sae(want["x"]), want["forward"])
    hc = head_contributions(sae.magnitude_path(n_heads=4), want["x"])
    opened = (want["encode"].gather(1, hc.indices) != 0) & hc.active
    assert int(opened.sum()) == int((want["encode"] != 0).sum()) > 0
    torch.testing.assert_close(hc.total()[opened], want["encode"].gather(1, hc.indices)[opened])

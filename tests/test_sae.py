"""The SparseAutoencoder layer: construction, inference API over leading dims, training losses against their
formulas written out independently, decoder-norm handling, folding, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

import naive
from fusedsae import SAEConfig, SparseAutoencoder
from fusedsae import functional as F

ACTIVATIONS = ["relu", "topk", "batchtopk", "jumprelu"]


def make_sae(activation: str, d_in: int = 12, d_sae: int = 40, k: int = 4, **kwargs) -> SparseAutoencoder:
    sae = SparseAutoencoder(
        d_in=d_in, d_sae=d_sae, activation=activation, k=k if activation in ("topk", "batchtopk") else None, **kwargs
    )
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)  # uneven row norms, so norm-weighted terms are visible
        if activation == "jumprelu":
            sae.threshold.uniform_(0.0, 0.2)
    return sae


def test_init_ties_encoder_to_unit_decoder_rows():
    sae = SparseAutoencoder(d_in=20, d_sae=50, activation="topk", k=5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(50))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    assert sae.W_enc.shape == (20, 50) and sae.W_dec.shape == (50, 20)


def test_config_defaults_and_errors():
    cfg = SAEConfig(d_in=8, d_sae=16, activation="topk", k=2)
    assert cfg.normalize_decoder and cfg.aux_k == 4
    assert not SAEConfig(d_in=8, d_sae=16, activation="relu").normalize_decoder
    with pytest.raises(ValueError, match="needs k"):
        SAEConfig(d_in=8, d_sae=16, activation="topk")
    with pytest.raises(ValueError, match=r"k must be in \[1, d_sae=16\]"):
        SAEConfig(d_in=8, d_sae=16, activation="topk", k=17)
    with pytest.raises(ValueError, match="n_heads=3 must divide d_in=8"):
        SAEConfig(d_in=8, d_sae=16, activation="relu", n_heads=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        SAEConfig(d_in=8, d_sae=16, activation="gelu")
    with pytest.raises(ValueError, match="unsupported dtype"):
        SAEConfig(d_in=8, d_sae=16, dtype="int8", activation="relu")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inference_api_shapes_and_consistency(activation):
    sae = make_sae(activation).eval()
    x = torch.randn(2, 3, 12)  # leading dims are flattened and restored
    acts = sae.encode(x)
    assert acts.shape == (2, 3, 40)
    values, indices = sae.encode_sparse(x)
    assert values.shape[:2] == (2, 3) and indices.shape == values.shape
    torch.testing.assert_close(F.to_dense(values, indices, 40), acts)
    torch.testing.assert_close(sae.decode_sparse(values, indices), sae.decode(acts))
    torch.testing.assert_close(sae(x), sae.decode(acts))
    if activation == "topk":
        assert values.shape[-1] == 4 and ((acts != 0).sum(-1) <= 4).all()


def test_encode_matches_saelens_maths_written_out():
    sae = make_sae("topk").eval()
    x = torch.randn(7, 12, dtype=torch.float64)
    sae = sae.double()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = torch.zeros_like(pre).scatter(1, pre.topk(4, dim=1).indices, pre.topk(4, dim=1).values).relu()
    torch.testing.assert_close(sae.encode(x), expected.detach())
    torch.testing.assert_close(sae(x), (expected @ sae.W_dec + sae.b_dec).detach())


def test_apply_b_dec_to_input_false():
    sae = make_sae("relu", apply_b_dec_to_input=False)
    x = torch.randn(5, 12)
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ sae.W_enc + sae.b_enc).detach())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n_dead", [14, 3])  # aux_k = d_in // 2 = 6: scale min(n_dead / aux_k, 1) is 1, then 1/2
def test_training_forward_losses_match_formulas(activation, n_dead):
    dt = torch.float64
    sae = make_sae(activation, l1_coefficient=0.3, l0_coefficient=0.2, jumprelu_bandwidth=0.05).to(dt).train()
    x = torch.randn(16, 12, dtype=dt)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40)[:n_dead]] = True
    out = sae.training_forward(x, dead_mask=dead, coefficient_scale=0.5)
    W_enc, b_enc, b_dec, W_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec))
    pre = naive.pre(x, W_enc, b_enc, b_dec)
    if activation == "relu":
        acts = torch.relu(pre)
    elif activation == "jumprelu":
        acts = pre * (pre > sae.threshold.detach())
    elif activation == "topk":
        acts = pre * naive.topk_mask(pre, 4)
        acts = torch.relu(acts)
    else:
        acts = pre * naive.batchtopk_mask(pre, 4)
    recon = acts @ W_dec + b_dec
    mse = ((recon - x) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse_loss"].detach(), mse)
    torch.testing.assert_close(out.sae_out.detach(), recon)
    total = mse
    if activation == "relu":
        l1 = 0.5 * 0.3 * (acts * W_dec.norm(dim=1)).sum(-1).mean()
        torch.testing.assert_close(out.losses["l1_loss"].detach(), l1)
        total = total + l1
    elif activation == "jumprelu":
        l0 = 0.5 * 0.2 * (pre > sae.threshold.detach()).sum(-1).double().mean()
        torch.testing.assert_close(out.losses["l0_loss"].detach(), l0)
        total = total + l0
    else:
        n_dead = int(dead.sum())
        aux_k = min(sae.cfg.aux_k, n_dead)
        residual = x - recon
        aux_acts = torch.relu(pre.masked_fill(~dead, float("-inf")))
        aux_acts = aux_acts * naive.topk_mask(pre.masked_fill(~dead, float("-inf")), aux_k)
        aux_recon = aux_acts.nan_to_num() @ W_dec
        variance = ((residual - residual.mean(0)) ** 2).sum(-1).mean()
        aux = min(n_dead / sae.cfg.aux_k, 1.0) * ((aux_recon - residual) ** 2).sum(-1).mean() / variance
        torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"].detach(), aux / 32)
        total = total + aux / 32
    torch.testing.assert_close(out.loss.double(), total.double())
    torch.testing.assert_close(out.feature_acts.detach(), acts)
    assert torch.equal(out.fired(), (acts != 0).any(0))


def test_aux_loss_trains_dead_latents_encoder_and_decoder():
    sae = make_sae("topk")
    dead = torch.zeros(40, dtype=torch.bool)
    dead[30:] = True
    out = sae.training_forward(torch.randn(32, 12), dead_mask=dead)
    aux = out.losses["auxiliary_reconstruction_loss"]
    g_enc, g_dec = torch.autograd.grad(aux, (sae.W_enc, sae.W_dec))
    assert g_enc[:, 30:].abs().sum() > 0 and g_dec[30:].abs().sum() > 0
    assert g_enc[:, :30].abs().sum() == 0 and g_dec[:30].abs().sum() == 0  # AuxK touches only dead latents


def test_jumprelu_threshold_gets_gradient_from_l0_and_reconstruction():
    sae = make_sae("jumprelu", jumprelu_bandwidth=0.5)
    out = sae.training_forward(torch.randn(32, 12))
    (g,) = torch.autograd.grad(out.loss, sae.threshold)
    assert g.abs().sum() > 0


def test_batchtopk_threshold_ema_and_eval_mode():
    sae = make_sae("batchtopk").train()
    x = torch.randn(64, 12)
    out = sae.training_forward(x)
    smallest = out.values[out.values > 0].min()
    torch.testing.assert_close(sae.threshold, smallest.expand(40))  # the first batch sets it
    out2 = sae.training_forward(torch.randn(64, 12))
    smallest2 = out2.values[out2.values > 0].min()
    ema = (1 - sae.cfg.topk_threshold_lr) * smallest + sae.cfg.topk_threshold_lr * smallest2
    torch.testing.assert_close(sae.threshold, ema.expand(40))  # then an EMA
    sae.eval()
    pre = sae.encode_pre(x)
    torch.testing.assert_close(sae.encode(x), (pre * (pre > sae.threshold)).detach())


def test_decoder_gradient_projection_and_renormalisation():
    sae = make_sae("topk")
    sae.training_forward(torch.randn(32, 12)).loss.backward()
    sae.remove_parallel_decoder_grad()
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    torch.testing.assert_close((sae.W_dec.grad * w).sum(1), torch.zeros(40), atol=1e-6, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_rows()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_fold_W_dec_norm_keeps_outputs(activation):
    sae = make_sae(activation).double().eval()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1, dtype=torch.float64) + 0.5)
    x = torch.randn(9, 12, dtype=torch.float64)
    before = sae(x)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40, dtype=torch.float64))
    if activation != "topk":  # TopK may select differently once norms are folded into the encoder
        torch.testing.assert_close(sae(x), before)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fold_activation_scale_keeps_latents(activation):
    sae = make_sae(activation).double().eval()
    x = torch.randn(9, 12, dtype=torch.float64)
    scale = 2.5
    acts_scaled, recon_scaled = sae.encode(scale * x), sae(scale * x)
    sae.fold_activation_norm_scaling_factor(scale)
    torch.testing.assert_close(sae.encode(x), acts_scaled)
    torch.testing.assert_close(sae(x), recon_scaled / scale)


@pytest.mark.parametrize("method", ["mean", "geometric_median", "zeros"])
def test_init_b_dec(method):
    sae = make_sae("topk")
    x = torch.randn(200, 12) + 3.0
    x[0] = 1e4  # an outlier: the geometric median barely moves, the mean does
    sae.init_b_dec(x, method)
    if method == "mean":
        torch.testing.assert_close(sae.b_dec, x.mean(0))
    elif method == "zeros":
        assert (sae.b_dec == 0).all()
    else:
        assert (sae.b_dec - 3.0).abs().max() < 0.5
        point = sae.b_dec.double()
        xs = x.double()
        cost = (xs - point).norm(dim=1).sum()
        for delta in torch.eye(12, dtype=torch.float64) * 1e-2:  # a local minimum of the sum of distances
            assert cost <= (xs - point - delta).norm(dim=1).sum() + 1e-6
            assert cost <= (xs - point + delta).norm(dim=1).sum() + 1e-6


def test_bf16_sae_runs_and_tracks_fp32():
    sae32 = make_sae("topk", d_in=32, d_sae=64, k=8)
    sae16 = make_sae("topk", d_in=32, d_sae=64, k=8, dtype="bfloat16")
    sae16.load_state_dict({k: v.to(torch.bfloat16) for k, v in sae32.state_dict().items()})
    x = torch.randn(16, 32)
    out16 = sae16.training_forward(x)
    out16.loss.backward()
    assert out16.sae_out.dtype == torch.bfloat16 and sae16.W_dec.grad.dtype == torch.bfloat16
    out32 = sae32.training_forward(x)
    rel = (out16.loss.float() - out32.loss).abs() / out32.loss
    assert rel < 16 * torch.finfo(torch.bfloat16).eps  # same maths, bf16 rounding only


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_wrong_width_names_the_problem():
    sae = make_sae("topk", d_in=12)
    with pytest.raises(ValueError, match=r"x has 11 features .* but the SAE expects d_in=12"):
        sae.encode(torch.randn(3, 11))
    with pytest.raises(ValueError, match="expects d_in=12"):
        sae.training_forward(torch.randn(3, 13))


def test_wrong_dtype_device_and_non_finite():
    sae = make_sae("topk", d_in=12)
    with pytest.raises(TypeError, match="floating point"):
        sae.encode(torch.ones(3, 12, dtype=torch.int64))
    x = torch.randn(4, 12)
    x[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"contains 1 non-finite value\(s\) .* first at index \(2, 5\)"):
        sae.encode(x)
    x[2, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        sae.training_forward(x)
    sae.check_finite = False  # opt-out for hot loops
    sae.encode(x)
    with pytest.raises(ValueError, match="is on meta but the SAE is on cpu"):
        sae.encode(torch.randn(3, 12, device="meta"))
    # float64 input is cast to the SAE's dtype, as SAELens does
    assert sae.encode(torch.randn(3, 12, dtype=torch.float64)).dtype == torch.float32


def test_functional_validation_messages():
    W_enc, b_enc = torch.randn(8, 20), torch.zeros(20)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"k=21 is out of range: it must be in \[1, d_sae=20\]"):
        F.topk_encode(x, W_enc, b_enc, k=21)
    with pytest.raises(ValueError, match="k=0 is out of range"):
        F.topk_encode(x, W_enc, b_enc, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        F.topk_encode(x, W_enc, b_enc, k=2.0)
    with pytest.raises(TypeError, match="W_enc has dtype torch.float64 but x has torch.float32"):
        F.topk_encode(x, W_enc.double(), b_enc, k=2)
    with pytest.raises(ValueError, match=r"b_enc must be \[d_sae=20\]"):
        F.topk_encode(x, W_enc, torch.zeros(19), k=2)
    with pytest.raises(ValueError, match="aux_k=5 but only 3 latents are eligible"):
        mask = torch.zeros(20, dtype=torch.bool)
        mask[:3] = True
        F.topk_encode(x, W_enc, b_enc, k=2, aux_k=5, aux_mask=mask)
    with pytest.raises(ValueError, match="needs aux_mask"):
        F.topk_encode(x, W_enc, b_enc, k=2, aux_k=1)
    W_dec = torch.randn(20, 8)
    with pytest.raises(ValueError, match=r"indices must be in \[0, d_sae=20\)"):
        F.sparse_decode(torch.ones(2, 3), torch.tensor([[0, 1, 20], [0, 1, 2]]), W_dec)
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        F.sparse_decode(torch.ones(2, 3), torch.zeros(2, 3), W_dec)
    with pytest.raises(ValueError, match="must have one shape"):
        F.sparse_decode(torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.long), W_dec)
    with pytest.raises(ValueError, match=r"BatchTopK selects over a batch: x must be \[N, d_in\]"):
        F.batchtopk_encode(torch.randn(2, 3, 8), W_enc, b_enc, k=2)


def test_extra_repr_mentions_shape():
    text = repr(make_sae("topk"))
    assert "d_in=12" in text and "d_sae=40" in text and "k=4" in text


def test_training_forward_validates_the_dead_mask():
    sae = make_sae("topk")
    x = torch.randn(6, sae.cfg.d_in)
    with pytest.raises(ValueError, match="aux_mask must be a bool tensor of shape"):
        sae.training_forward(x, dead_mask=torch.ones(sae.cfg.d_sae))
    with pytest.raises(ValueError, match="aux_mask must be a bool tensor of shape"):
        sae.training_forward(x, dead_mask=torch.ones(sae.cfg.d_sae + 1, dtype=torch.bool))

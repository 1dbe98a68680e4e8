"""Exact per-head attribution on MiniLM-L6's real layer-3 z (docs/architecture.md#attribution), for ReLU, JumpReLU, TopK
and BatchTopK SAEs trained on it: contributions + constant reproduce every active feature's activation to float32
rounding, each head's term matches a float64 recomputation, per-source sums equal per-head sums, zeroing a head moves
the pre-activation by exactly minus its contribution, and single-head ablations do not add up.

Tolerances are worst-case float32 rounding bounds (Higham's gamma_n = n u / (1 - n u) times the sum of the
magnitudes of the terms, computed in float64 from the same inputs), plus STYLE §10's rule that our error against
float64 is at most twice that of the SAE's own float32 pre-activation. A wrong head, sign, bias or convention moves
a result by the size of a term, thousands of times these bounds.
"""

from __future__ import annotations

import json

import pytest
import torch

import minilm
from conftest import assert_close_lowp, requires_cuda
from fusedsae import SparseAutoencoder, cli
from fusedsae import cache as K
from fusedsae import capture as C
from fusedsae.analysis import (
    feature_constant,
    head_contributions,
    single_head_ablations,
    source_contributions,
    weight_head_shares,
)
from fusedsae.analysis import report as cli_report

U = torch.finfo(torch.float32).eps / 2  # unit roundoff of float32 (round to nearest)
H, DH, D_IN = minilm.N_HEADS, minilm.D_HEAD, minilm.D_IN
ACTIVATIONS = ["relu", "jumprelu", "topk", "batchtopk"]


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _w(sae):
    W = sae.W_enc.detach().double()
    b_dec = sae.b_dec.detach().double() if sae.cfg.apply_b_dec_to_input else torch.zeros(D_IN, dtype=torch.float64)
    return W, sae.b_enc.detach().double(), b_dec


def exact_pre(sae, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre, mag) [N, d_sae]`` in float64 from the float32 inputs: the pre-activation and the sum of the absolute
    values of its terms, ``(|z| + |b_dec|) @ |W_enc| + |b_enc|``."""
    W, b_enc, b_dec = _w(sae)
    z = z.double()
    return (z - b_dec) @ W + b_enc, (z.abs() + b_dec.abs()) @ W.abs() + b_enc.abs()


def exact_heads(sae, z: torch.Tensor, indices: torch.Tensor, convention: str):
    """``(c, mag) [N, m, H]`` in float64: each head's term in ``convention`` and the magnitude of its terms."""
    W, _, b_dec = _w(sae)
    z = z.double()
    offset = b_dec if convention == "centred" else torch.zeros_like(b_dec)
    c = torch.empty(*indices.shape, H, dtype=torch.float64)
    mag = torch.empty_like(c)
    for h in range(H):
        cols = slice(h * DH, (h + 1) * DH)
        c[..., h] = ((z[:, cols] - offset[cols]) @ W[cols]).gather(1, indices)
        mag[..., h] = ((z[:, cols].abs() + offset[cols].abs()) @ W[cols].abs()).gather(1, indices)
    return c, mag


def source_magnitude(sae, attention, values, indices, convention):
    """``[S_dest, m, H]`` float64: ``sum_src A_h[dest, src] (|v_h[src]| + |o_h|) · |W_enc[h, f]|``, the magnitude of
    the terms of a per-source split (``attention [H, S_dest, S_src]``, ``values [S_src, d_in]``)."""
    W, _, b_dec = _w(sae)
    offset = b_dec if convention == "centred" else torch.zeros_like(b_dec)
    w = W.t()[indices].view(*indices.shape, H, DH).abs()
    v = (values.double().abs() + offset.abs()).view(-1, H, DH)
    return torch.einsum("djhi,shi,hds->djh", w, v, attention.double())


@pytest.fixture(scope="module", params=ACTIVATIONS)
def sae(request) -> SparseAutoencoder:
    sae = minilm.trained_sae(request.param)
    acts = sae.encode(minilm.tokens_z())
    l0 = float((acts != 0).sum(1).float().mean())
    alive = int((acts != 0).any(0).sum())
    # non-trivial activity: the exactness below is about features that really fire on real data
    assert 5 < l0 < 100 and alive > 500, f"{request.param}: L0 {l0:.1f}, {alive} alive latents"
    return sae


# ---------------------------------------------------------------------------------------------------------------
# per head
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["raw", "centred"])
def test_contributions_reproduce_every_active_feature(sae, convention):
    z = minilm.tokens_z()
    hc = head_contributions(sae, z, convention=convention)
    dense = sae.encode(z)
    n, m = hc.indices.shape
    assert hc.contributions.shape == (n, m, H) and hc.constant.shape == (n, m)
    assert hc.selection == "active" and hc.convention == convention
    # every active (token, feature) pair is reported once, with the SAE's own activation
    assert int(hc.active.sum()) == int((dense != 0).sum())
    assert torch.equal(dense.gather(1, hc.indices)[hc.active], hc.activations[hc.active])
    assert torch.equal(hc.pre_activations[hc.active], hc.activations[hc.active])
    active = hc.active
    exact, mag = (t.gather(1, hc.indices)[active] for t in exact_pre(sae, z))
    total = hc.total()[active]
    act = hc.activations[active]
    bound = gamma(D_IN + H + 4) * mag
    assert ((total.double() - exact).abs() <= bound).all()
    assert ((total - act).abs().double() <= 2 * bound).all(), "contributions + constant != activation"
    assert_close_lowp(total, act, exact, f"{sae.cfg.activation}/{convention}")
    # each head's own term, not only their sum (a permutation of heads would keep the sum)
    c_exact, c_mag = exact_heads(sae, z, hc.indices, convention)
    err = (hc.contributions.double() - c_exact).abs()[active]
    assert (err <= gamma(DH + 2) * c_mag[active]).all()
    assert hc.labels().count("activation") == int(active.sum())


def test_the_two_conventions_differ_by_the_bias_term(sae):
    z = minilm.tokens_z()[:200]
    raw = head_contributions(sae, z, "raw")
    centred = head_contributions(sae, z, "centred")
    assert torch.equal(raw.indices, centred.indices)
    W, _, b_dec = _w(sae)
    shift = torch.stack([(b_dec[h * DH : (h + 1) * DH] @ W[h * DH : (h + 1) * DH]) for h in range(H)], 1)
    expected = shift[raw.indices]  # raw - centred = b_dec_h · W_enc[h, f]
    diff = (raw.contributions - centred.contributions).double()
    _, mag = exact_heads(sae, z, raw.indices, "centred")
    assert ((diff - expected).abs() <= 2 * gamma(DH + 2) * mag).all()
    assert torch.equal(centred.constant, sae.b_enc.detach()[raw.indices])
    raw_constant = feature_constant(sae, "raw").double()
    constant_bound = gamma(D_IN + 1) * (b_dec.abs() @ W.abs() + sae.b_enc.double().abs())
    assert ((raw_constant - (sae.b_enc.double() - b_dec @ W)).abs() <= constant_bound).all()


def test_user_features_give_labelled_pre_activations(sae):
    z = minilm.tokens_z()
    dense = sae.encode(z)
    counts = (dense != 0).sum(0)
    order = torch.sort(counts, descending=True, stable=True).indices
    rare = int(order[(counts[order] > 0).sum() - 1])
    feats = [int(order[0]), rare, int(order[-1]), 0]
    hc = head_contributions(sae, z, features=feats)
    assert hc.selection == "features" and hc.indices.shape == (z.shape[0], 4)
    assert torch.equal(hc.activations, dense[:, feats])
    assert torch.equal(hc.active, dense[:, feats] != 0)
    assert hc.active.any() and (~hc.active).any()
    exact, mag = (t[:, feats] for t in exact_pre(sae, z))
    bound = gamma(D_IN + H + 4) * mag
    assert ((hc.pre_activations.double() - exact).abs() <= bound).all()
    assert ((hc.total().double() - exact).abs() <= bound).all()
    labels = hc.labels()
    assert "pre-activation (inactive)" in labels and "activation" in labels and "padding" not in labels


# ---------------------------------------------------------------------------------------------------------------
# per source position
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["raw", "centred"])
def test_per_source_terms_sum_to_the_per_head_terms(convention):
    """With A and v from the same forward pass as z, sum over sources of A_h (v_h - o_h) · W = c_h, checked on
    sequences of several lengths, and padded source positions contribute exactly 0."""
    cap = minilm.layer3()
    lengths = cap.mask.sum(1)
    for name in ("topk", "relu"):
        sae = minilm.trained_sae(name)
        for b in (int(lengths.argmin()), int(lengths.argmax()), 7):
            s = int(lengths[b])
            attention, values = cap.attention[b, :, :s, :s], cap.values[b, :s]
            hc = head_contributions(sae, cap.z[b, :s], convention)
            per_source = source_contributions(sae, attention, values, hc.indices, convention)
            assert per_source.shape == (s, hc.indices.shape[1], H, s)
            mag = source_magnitude(sae, attention, values, hc.indices, convention)
            err = (per_source.sum(-1) - hc.contributions).double().abs()
            assert (err <= 2 * gamma(2 * s + DH + 4) * mag)[hc.valid].all(), f"{name} sequence {b}"
        # the whole padded width: sources beyond the text add exactly nothing
        b = int(lengths.argmin())
        s = int(lengths[b])
        hc = head_contributions(sae, cap.z[b], convention)
        padded = source_contributions(sae, cap.attention[b], cap.values[b], hc.indices, convention)
        assert torch.equal(padded[:s, ..., s:].abs().max(), torch.tensor(0.0))


def test_source_contributions_checks_shapes():
    sae = minilm.trained_sae("topk")
    cap = minilm.layer3()
    idx = torch.zeros(10, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"values must be"):
        source_contributions(sae, cap.attention[0, :, :10, :10], cap.values[0, :9], idx)
    with pytest.raises(ValueError, match=r"n_heads=12"):
        source_contributions(sae, cap.attention[0, :6, :10, :10], cap.values[0, :10], idx)


# ---------------------------------------------------------------------------------------------------------------
# attribution is not ablation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["relu", "topk"])
def test_zeroing_a_head_moves_pre_by_minus_its_contribution(name):
    sae = minilm.trained_sae(name)
    z = minilm.tokens_z()[:300]
    counts = (sae.encode(z) != 0).sum(0)
    feats = torch.sort(counts, descending=True, stable=True).indices[:6].tolist()
    _, mag = exact_pre(sae, z)
    mag = mag[:, feats].unsqueeze(-1)
    bound = (2 * gamma(D_IN + 2) + gamma(DH + 2)) * mag
    for replacement, convention in (("zero", "raw"), ("b_dec", "centred")):
        d_pre, d_act = single_head_ablations(sae, z, feats, replacement=replacement)
        hc = head_contributions(sae, z, convention, features=feats)
        assert d_pre.shape == (300, 6, H)
        assert ((d_pre + hc.contributions).abs() <= bound).all(), replacement
    # on real data some single-head ablations switch a feature off: the activation then moves by less (ReLU) or
    # differently (TopK re-selects) than the pre-activation
    d_pre, d_act = single_head_ablations(sae, z, feats)
    assert ((d_act - d_pre).abs() > bound).any()


def test_single_head_ablations_do_not_add_up():
    """Two heads each contribute 2 to a feature with constant -3 (activation 1). Removing either head alone kills
    the feature (effect -1 each, not -2); the single effects sum to -2, neither the activation (1) nor the joint
    effect (-1). With a JumpReLU threshold of 1.5 and no constant, each head alone 'explains' the whole
    activation 2: the single effects sum to -4. Contributions + constant give the activation exactly in both."""
    z = torch.tensor([[2.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    relu = SparseAutoencoder(d_in=4, d_sae=1, activation="relu", n_heads=2, dtype="float64")
    jump = SparseAutoencoder(d_in=4, d_sae=1, activation="jumprelu", n_heads=2, dtype="float64")
    with torch.no_grad():
        for sae, bias in ((relu, -3.0), (jump, 0.0)):
            sae.W_enc.copy_(w[:, None])
            sae.b_enc.fill_(bias)
            sae.b_dec.zero_()
        jump.threshold.fill_(1.5)
    cases = [(relu, z, 1.0, [-1.0, -1.0], -1.0), (jump, z / 2, 2.0, [-2.0, -2.0], -2.0)]
    for sae, inputs, activation, single, joint in cases:
        hc = head_contributions(sae, inputs)
        assert hc.activations.item() == activation
        assert hc.total().item() == activation  # exact
        d_pre, d_act = single_head_ablations(sae, inputs, [0])
        assert d_act.view(-1).tolist() == single
        assert torch.equal(d_pre.view(-1), -hc.contributions.view(-1))
        assert sae.encode(torch.zeros_like(inputs)).item() - activation == joint
        assert sum(single) not in (activation, -activation, joint)


# ---------------------------------------------------------------------------------------------------------------
# data-free, errors, GPU
# ---------------------------------------------------------------------------------------------------------------


def test_decoder_head_shares():
    sae = SparseAutoencoder(d_in=12, d_sae=5, activation="relu", n_heads=3)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[0, 8:12] = torch.randn(4)  # feature 0 writes only through head 2
        sae.W_dec[1] = torch.randn(12)
        sae.W_enc.copy_(torch.randn(12, 5))
    shares = weight_head_shares(sae)
    assert shares.shape == (5, 3)
    assert torch.equal(shares[0], torch.tensor([0.0, 0.0, 1.0]))
    blocks = sae.W_dec.detach()[1].view(3, 4).pow(2).sum(1)
    torch.testing.assert_close(shares[1], blocks / blocks.sum())
    torch.testing.assert_close(shares[1:].sum(1)[:1], torch.ones(1))
    enc = weight_head_shares(sae, "encoder")
    torch.testing.assert_close(enc.sum(1), torch.ones(5))
    real = weight_head_shares(minilm.trained_sae("topk"))
    torch.testing.assert_close(real.sum(1), torch.ones(768))


def test_errors_name_the_problem():
    z = torch.randn(3, 12)
    plain = SparseAutoencoder(d_in=12, d_sae=8, activation="relu")
    with pytest.raises(ValueError, match="no n_heads"):
        head_contributions(plain, z)
    with pytest.raises(ValueError, match="must divide"):
        head_contributions(plain, z, n_heads=5)
    with pytest.raises(ValueError, match="convention must be"):
        head_contributions(plain, z, "centered", n_heads=3)
    with pytest.raises(ValueError, match=r"feature ids must be in \[0, d_sae=8\)"):
        head_contributions(plain, z, features=[9], n_heads=3)
    batch = SparseAutoencoder(d_in=12, d_sae=8, activation="batchtopk", k=2, n_heads=3)
    with pytest.raises(ValueError, match=r"sae\.eval\(\)"):
        head_contributions(batch.train(), z)
    with pytest.raises(ValueError, match="d_in=12"):
        head_contributions(plain, torch.randn(3, 11), n_heads=3)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("convention", ["raw", "centred"])
def test_gpu_matches_the_cpu(convention):
    """On a GPU the per-head terms come from the dispatched head_partial_sums kernels: same decomposition."""
    sae = minilm.trained_sae("topk")
    z = minilm.tokens_z()
    cpu = head_contributions(sae, z, convention)
    gpu = head_contributions(sae.cuda(), z.cuda(), convention)
    sae.cpu()
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    c_exact, c_mag = exact_heads(sae, z, cpu.indices, convention)
    assert ((gpu.contributions.cpu().double() - c_exact).abs() <= gamma(DH + 2) * c_mag).all()


# ---------------------------------------------------------------------------------------------------------------
# fusedsae attribute
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribute")
    minilm.trained_sae("topk").save(root / "sae")
    model, tok = minilm.model()
    K.write_cache(
        root / "cache",
        model,
        tok,
        list(minilm.texts(16)),
        minilm.hooks().z,
        n_heads=H,
        source={"model": "minilm", "layer": minilm.LAYER},
        batch_size=8,
    )
    return root


def test_attribute_command_from_a_cache(saved, monkeypatch, capsys):
    monkeypatch.setattr(C, "load_model", lambda name, device="cpu": minilm.model())
    out = saved / "out"
    args = ["attribute", "--sae", str(saved / "sae"), "--cache", str(saved / "cache"), "--out", str(out)]
    assert cli.main([*args, "--top", "2", "--contexts", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("feature ") >= 2 and "top sources:" in text
    reports = json.loads((out / "attribution.json").read_text())
    assert len(reports) == 2
    sae = minilm.trained_sae("topk")
    model, tok = minilm.model()
    for rep in reports:
        assert (out / f"feature_{rep['feature']}_heads.png").stat().st_size > 0
        assert (out / f"feature_{rep['feature']}_sources.png").stat().st_size > 0
        acts = [ctx["activation"] for ctx in rep["contexts"]]
        assert acts == sorted(acts, reverse=True) and acts[0] > 0
        assert abs(sum(rep["decoder_shares"]) - 1) < 1e-5
        ctx = rep["contexts"][0]
        text_ids = torch.tensor(
            [tok(list(minilm.texts(16))[ctx["text_index"]], truncation=True, max_length=128)["input_ids"]]
        )
        assert tok.convert_ids_to_tokens(text_ids[0]) == ctx["tokens"]
        cap = C.capture_attention(
            model, {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids)}, minilm.hooks()
        )
        z = cap.z[0, ctx["position"]].unsqueeze(0)
        exact, mag = (t[0, rep["feature"]].item() for t in exact_pre(sae, z))
        contributions = torch.tensor(ctx["contributions"], dtype=torch.float64)
        assert abs(contributions.sum().item() + ctx["constant"] - exact) <= gamma(D_IN + H + 4) * mag
        sources = torch.tensor(ctx["sources"], dtype=torch.float64)
        s = text_ids.shape[1]
        assert sources.shape == (H, s)
        pos = ctx["position"]
        feature = torch.tensor([[rep["feature"]]])
        mag = source_magnitude(sae, cap.attention[0, :, pos : pos + 1], cap.values[0], feature, "raw")[0, 0]
        assert ((sources.sum(1) - contributions).abs() <= 2 * gamma(2 * s + DH + 4) * mag).all()


def test_attribute_command_rejects_bad_features_before_scanning(saved, monkeypatch):
    def no_scan(*args, **kwargs):
        raise AssertionError("scanned before checking --features")

    monkeypatch.setattr(cli_report, "scan", no_scan)
    args = ["attribute", "--sae", str(saved / "sae"), "--cache", str(saved / "cache")]
    with pytest.raises(SystemExit, match=r"out of range: the SAE has d_sae="):
        cli.main([*args, "--features", "3,999999"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        cli.main([*args, "--features", "3,x"])

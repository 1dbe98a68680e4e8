"""Transcoders and skip-transcoders (issue 13 item 2, model side): ``SAEConfig(d_out=..., skip_connection=...)``.

Every path is checked against an independent dense float64 implementation (``naive_transcoder`` below, built on
tests/naive.py): losses, reconstructions and every gradient, for each activation, skip on and off, odd shapes,
k = 1 and ties, on the reference backend (float64) and the triton kernels in the interpreter (float32, compared
with the float64 result at float32 tolerances). Then the Trainer on ``[x | y]`` rows: a toy map ``y = D s`` from
``x = A s`` learnt far better than chance, input scales folded into the saved weights, resume, the finite check."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

import fusedsae
import naive
from conftest import FIXTURES
from fusedsae import SAEConfig, SparseAutoencoder, TrainConfig, Trainer, backends
from fusedsae import checkpoint as ckpt
from fusedsae.analysis import head_contributions, single_head_ablations, weight_head_shares
from fusedsae.analysis.report import build_reports, format_report, scan
from fusedsae.compat import sae_lens as csl
from fusedsae.compat import sparsify as csp
from fusedsae.data import DataError, split_pair
from fusedsae.toy import generator, random_directions
from fusedsae.training import NonFiniteInputs

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's own Triton decoder needs a GPU

ACTIVATIONS = ["topk", "batchtopk", "relu", "jumprelu"]
# (d_in, d_out, d_sae, k): no dimension a multiple of a block; k = 1; d_out below and above d_in
SHAPES = [(7, 5, 19, 1), (6, 11, 13, 3)]
N = 9


def make(activation: str, d_in: int, d_out: int, d_sae: int, k: int, skip: bool, dtype: str) -> SparseAutoencoder:
    sae = SparseAutoencoder(
        d_in=d_in,
        d_out=d_out,
        d_sae=d_sae,
        activation=activation,
        k=k if activation in ("topk", "batchtopk") else None,
        skip_connection=skip,
        aux_k=4 if activation in ("topk", "batchtopk") else None,
        l1_coefficient=0.3,
        l0_coefficient=0.2,
        jumprelu_bandwidth=0.5,
        dtype=dtype,
    )
    with torch.no_grad():  # non-trivial weights: biases, uneven decoder norms, a skip path, thresholds that split
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(d_sae, 1, dtype=sae.W_dec.dtype) + 0.5)
        if sae.W_skip is not None:
            sae.W_skip.normal_(0, 0.3)
        if activation == "jumprelu":
            sae.threshold.uniform_(0.05, 0.4)
    return sae


def naive_transcoder(sae: SparseAutoencoder, x: Tensor, y: Tensor, dead: Tensor | None) -> dict[str, Tensor]:
    """The transcoder's forward and loss terms written densely in float64 with plain autograd: ``acts`` is a leaf
    that carries the gradient back to the pre-activation through the activation's derivative (the selection
    masks are constants), so every weight gets its gradient. Returns the terms, ``out`` and the weights."""
    cfg = sae.cfg
    w = {name: p.detach().double().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    x, y = x.double(), y.double()
    p = naive.pre(x, w["W_enc"], w["b_enc"], None)  # a transcoder never centres its input by b_dec
    if cfg.activation == "topk":
        acts = torch.relu(p) * naive.topk_mask(p.detach(), cfg.k)
    elif cfg.activation == "batchtopk":
        acts = torch.relu(p) * naive.batchtopk_mask(p.detach(), cfg.k)
    elif cfg.activation == "relu":
        acts = torch.relu(p)
    else:
        acts = torch.relu(p) * (p.detach() > w["threshold"].detach())
    out = naive.decode(acts, w["W_dec"], w["b_dec"])
    if "W_skip" in w:
        out = out + x @ w["W_skip"].t()
    terms = {"mse_loss": ((out - y) ** 2).sum(-1).mean()}
    if cfg.activation == "relu":
        terms["l1_loss"] = cfg.l1_coefficient * (acts * w["W_dec"].norm(dim=1)).sum(-1).mean()
    if cfg.activation in ("topk", "batchtopk") and dead is not None:
        residual = (y - out).detach()
        scores = torch.where(dead, p, torch.full_like(p, -math.inf))
        aux_k = min(cfg.aux_k, int(dead.sum()))
        aux_acts = torch.relu(p) * naive.topk_mask(scores.detach(), aux_k)
        error = ((aux_acts @ w["W_dec"] - residual) ** 2).sum(-1).mean()
        variance = ((residual - residual.mean(0)) ** 2).sum(-1).mean()
        scale = min(int(dead.sum()) / cfg.aux_k, 1.0)
        terms["auxiliary_reconstruction_loss"] = cfg.aux_loss_coefficient * scale * error / variance
    return {"out": out, "terms": terms, "weights": w, "pre": p.detach(), "acts": acts}


def run_case(activation, shape, skip, backend, dtype):
    d_in, d_out, d_sae, k = shape
    sae = make(activation, d_in, d_out, d_sae, k, skip, dtype)
    x = torch.randn(N, d_in, dtype=sae.dtype)
    y = torch.randn(N, d_out, dtype=sae.dtype)
    dead = torch.rand(d_sae) < 0.5 if activation in ("topk", "batchtopk") else None
    with backends.use(backend):
        out = sae.training_forward(x, y, dead_mask=dead)
        out.loss.backward()
    expected = naive_transcoder(sae, x, y, dead)
    total = sum(expected["terms"].values())
    # the gradient reaching the activations, for the JumpReLU threshold's STE below
    expected["grad_acts"] = torch.autograd.grad(total, expected["acts"], retain_graph=True)[0]
    total.backward()
    if activation == "jumprelu":  # the step L0: no gradient to pre, the STE to the threshold (naive, elementwise)
        l0 = (expected["pre"] > expected["weights"]["threshold"].detach()).double().sum(-1).mean()
        expected["terms"]["l0_loss"] = sae.cfg.l0_coefficient * l0
    return sae, out, expected


def tolerance(dtype: str) -> dict[str, float]:
    # float64: the orders of summation differ, a few ulps; float32 against the float64 result: the defaults of
    # torch.testing for float32 (1.3e-6 relative, 1e-5 absolute) widened by sqrt(d_sae) for the summed products
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == "float64" else {"rtol": 2e-5, "atol": 5e-5}


@pytest.mark.parametrize("backend,dtype", [("reference", "float64"), ("triton", "float32")])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_training_forward_matches_naive(activation, shape, skip, backend, dtype):
    sae, out, expected = run_case(activation, shape, skip, backend, dtype)
    tol = tolerance(dtype)
    assert out.sae_out.shape == (N, shape[1]) and out.target.shape == (N, shape[1])
    torch.testing.assert_close(out.sae_out.double(), expected["out"].detach(), **tol)
    assert set(out.losses) == set(expected["terms"])
    for name, term in expected["terms"].items():
        torch.testing.assert_close(out.losses[name].double(), term.detach(), **tol, msg=name)
    for name, p in sae.named_parameters():
        if name == "threshold":
            continue  # below: the STE gradient is not autograd's
        torch.testing.assert_close(p.grad.double(), expected["weights"][name].grad, **tol, msg=name)
    if activation == "jumprelu":
        w, pre, grad_acts = expected["weights"], expected["pre"], expected["grad_acts"]
        bw = sae.cfg.jumprelu_bandwidth
        threshold = w["threshold"].detach()
        ones = torch.full_like(pre, sae.cfg.l0_coefficient / N)
        want = naive.jumprelu_threshold_grad(pre, threshold, bw, grad_acts, l0=False)
        want = want + naive.jumprelu_threshold_grad(pre, threshold, bw, ones, l0=True)
        torch.testing.assert_close(sae.threshold.grad.double(), want, **tol)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inference_matches_naive(activation, skip):
    d_in, d_out, d_sae, k = 6, 11, 13, 3
    sae = make(activation, d_in, d_out, d_sae, k, skip, "float64")
    sae.train(activation == "batchtopk")  # BatchTopK's eval mode reads a threshold this SAE has not learnt
    x = torch.randn(2, N, d_in, dtype=torch.float64)  # leading dims are kept
    expected = naive_transcoder(sae, x.reshape(-1, d_in), torch.zeros(2 * N, d_out), None)
    with torch.no_grad():
        torch.testing.assert_close(sae(x).reshape(-1, d_out), expected["out"].detach())
        torch.testing.assert_close(sae.encode(x).reshape(-1, d_sae), expected["acts"].detach())
        acts = sae.encode(x)
        skip_out = 0 if sae.W_skip is None else x @ sae.W_skip.t()
        torch.testing.assert_close(sae.decode(acts) + skip_out, sae(x))  # decode leaves the skip path out
        values, indices = sae.encode_sparse(x)
        torch.testing.assert_close(sae.decode_sparse(values, indices), sae.decode(acts))


def test_ties_go_to_the_lower_latent():
    """All encoder columns equal: every pre-activation of a row ties; TopK keeps latents 0..k-1 in every backend."""
    sae = make("topk", 5, 4, 9, 2, True, "float32")
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:, :1].expand(-1, 9))
        sae.b_enc.zero_()
    x = torch.rand(6, 5) + 0.1
    y = torch.randn(6, 4)
    expected = naive_transcoder(sae, x, y, None)
    for backend in ("reference", "triton"):
        with backends.use(backend):
            out = sae.training_forward(x, y)
        assert (out.indices.sort(-1).values == torch.tensor([0, 1])).all(), backend
        torch.testing.assert_close(out.sae_out.double(), expected["out"].detach(), rtol=2e-5, atol=5e-5)


def test_matryoshka_transcoder_prefixes_reconstruct_y():
    """Matryoshka composes with a (skip-)transcoder: each prefix's reconstruction (latents below the width, plus
    b_dec and the skip path) is compared with y, by dense masking in float64."""
    sae = SparseAutoencoder(
        d_in=7,
        d_out=5,
        d_sae=17,
        activation="topk",
        k=4,
        skip_connection=True,
        matryoshka_widths=[3, 8],
        dtype="float64",
    )
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.W_skip.normal_(0, 0.3)
    x, y = torch.randn(N, 7, dtype=torch.float64), torch.randn(N, 5, dtype=torch.float64)
    out = sae.training_forward(x, y)
    out.loss.backward()
    expected = naive_transcoder(sae, x, y, None)
    w, acts = expected["weights"], expected["acts"]
    total = expected["terms"]["mse_loss"]
    for width in (3, 8):
        prefix = acts[:, :width] @ w["W_dec"][:width] + w["b_dec"] + x @ w["W_skip"].t()
        inner = ((prefix - y) ** 2).sum(-1).mean()
        torch.testing.assert_close(out.losses[f"inner_mse_loss_{width}"], inner.detach())
        total = total + inner
    torch.testing.assert_close(out.sae_out, expected["out"].detach())
    total.backward()
    for name, param in sae.named_parameters():  # W_skip's gradient reaches it through every prefix's target
        torch.testing.assert_close(param.grad, w[name].grad, msg=name)


def test_config_and_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="apply_b_dec_to_input=True is not supported for a transcoder"):
        SAEConfig(d_in=4, d_out=3, d_sae=8, k=2, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="d_out must be a positive integer"):
        SAEConfig(d_in=4, d_out=0, d_sae=8, k=2)
    with pytest.raises(ValueError, match="skip_connection must be true or false"):
        SAEConfig(d_in=4, d_sae=8, k=2, skip_connection="yes")
    cfg = SAEConfig(d_in=4, d_out=3, d_sae=8, k=2)
    assert cfg.apply_b_dec_to_input is False and cfg.out_width == 3 and cfg.data_width == 7
    plain = SAEConfig(d_in=4, d_sae=8, k=2)
    assert plain.apply_b_dec_to_input is True and plain.out_width == 4 and plain.data_width == 4
    sae = SparseAutoencoder(cfg)
    assert sae.W_dec.shape == (8, 3) and sae.b_dec.shape == (3,) and sae.W_skip is None
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"needs its target: training_forward\(x, y\)"):
        sae.training_forward(x)
    with pytest.raises(ValueError, match="y has 4 features .* reconstructs d_out=3"):
        sae.training_forward(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="same leading dims"):
        sae.training_forward(x, torch.randn(6, 3))
    with pytest.raises(ValueError, match="y contains 5 non-finite"):
        sae.training_forward(x, torch.tensor([[0.0, math.nan, 0.0]]).expand(5, 3))
    with pytest.raises(ValueError, match="build a transcoder with SAEConfig"):
        SparseAutoencoder(plain).training_forward(x, x)
    with pytest.raises(TypeError, match="pass the dead mask as dead_mask="):
        sae.training_forward(x, torch.ones(8, dtype=torch.bool))


def test_skip_connection_on_an_sae_follows_sparsify():
    """sparsify allows a skip path on an SAE (d_out = d_in, input centred by b_dec): x_hat += x @ W_skip.T."""
    sae = SparseAutoencoder(d_in=6, d_sae=14, activation="topk", k=2, skip_connection=True, dtype="float64")
    assert sae.cfg.apply_b_dec_to_input and sae.W_skip.shape == (6, 6)
    with torch.no_grad():
        sae.W_skip.normal_()
        sae.b_dec.normal_()
    x = torch.randn(N, 6, dtype=torch.float64)
    pre = naive.pre(x, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach())
    acts = torch.relu(pre) * naive.topk_mask(pre, 2)
    want = acts @ sae.W_dec.detach() + sae.b_dec.detach() + x @ sae.W_skip.detach().t()
    torch.testing.assert_close(sae(x), want)
    torch.testing.assert_close(sae.training_forward(x).sae_out, want)


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_fold_two_scales(activation):
    """A transcoder trained on (sx * x, sy * y) folds into one on raw (x, y): same latents, output / sy."""
    sae = make(activation, 6, 4, 11, 3, True, "float64").eval()
    folded = SparseAutoencoder(sae.cfg.replace())
    folded.load_state_dict(sae.state_dict())
    sx, sy = 2.5, 0.3
    folded.fold_activation_norm_scaling_factor(sx, sy)
    x = torch.randn(N, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded.encode(x), sae.encode(sx * x))
        torch.testing.assert_close(folded(x), sae(sx * x) / sy)


# ---------------------------------------------------------------------------------------------------------------
# the Trainer on [x | y] rows
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PairData:
    """Toy transcoder data: sparse codes s (each of ``n`` features active with probability ``mean_active / n``,
    amplitude U[0, 1]) give ``x = s A`` (``A [n, d_in]``, random unit rows) and ``y = s D`` (``D [n, d_out]``);
    rows are ``[x | y]``. A transcoder with a latent per feature can map x to y exactly; ``ground_truth`` are the
    rows of D, which the trainer's MMCS compares with the decoder rows."""

    d_x: int = 16
    d_y: int = 12
    n: int = 16
    mean_active: float = 1.5
    y_scale: float = 1.0
    nan_at: int | None = None
    A: Tensor = field(init=False, repr=False)
    D: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.A = random_directions(self.n, self.d_x, 1)
        self.D = random_directions(self.n, self.d_y, 2)

    @property
    def d_in(self) -> int:
        return self.d_x + self.d_y

    @property
    def ground_truth(self) -> Tensor:
        return self.D

    def sample(self, index: int, size: int) -> Tensor:
        g = generator(7, index)
        s = (torch.rand(size, self.n, generator=g) < self.mean_active / self.n) * torch.rand(size, self.n, generator=g)
        rows = torch.cat([s @ self.A, self.y_scale * (s @ self.D)], dim=1)
        if index == self.nan_at:
            rows[0, -1] = math.nan
        return rows


def pair_trainer(data: PairData, run_dir=None, **overrides) -> Trainer:
    torch.manual_seed(0)
    sae_kwargs = {key: overrides.pop(key) for key in list(overrides) if key in SAEConfig.__dataclass_fields__}
    sae = SparseAutoencoder(
        **{"d_in": data.d_x, "d_out": data.d_y, "d_sae": 32, "activation": "topk", "k": 4, **sae_kwargs}
    )
    settings = dict(steps=150, batch_size=128, lr=1e-2, log_every=50, dead_tokens=2560, progress=False)
    cfg = TrainConfig(**{**settings, "run_dir": str(run_dir) if run_dir else None, **overrides})
    return Trainer(sae, data, cfg)


def test_split_pair():
    rows = torch.arange(14.0).reshape(2, 7)
    x, y = split_pair(rows, 4)
    assert torch.equal(x, rows[:, :4]) and torch.equal(y, rows[:, 4:])


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_learns_a_sparse_map(skip):
    """y = D s from x = A s: far better than chance (FVU 1 = predicting y's mean; the first step's is above 0.5).
    Without a skip path the decoder rows find D's rows; with one (16 features in 16 dims: A is invertible, so the
    map is linear) the skip path takes most of it and the fit is better still (measured: FVU 0.05 and 0.02)."""
    data = PairData()
    trainer = pair_trainer(data, skip_connection=skip)
    first = trainer.batch_metrics(trainer.train_step(trainer._prepare(trainer.data.next_batch())))
    metrics = trainer.train()
    assert first["fvu"] > 0.5, first
    assert metrics["fvu"] < 0.15, metrics
    assert metrics["explained_variance"] == pytest.approx(1 - metrics["fvu"])
    if not skip:
        assert metrics["mmcs"] > 0.8, metrics
    # the metrics compare the reconstruction with y, not x
    x, y = split_pair(data.sample(10_000, 256), data.d_x)
    with torch.no_grad():
        fvu = naive.fvu(y, trainer.sae.eval()(x))
    assert fvu < 0.2


def test_data_width_is_checked():
    data = PairData()
    sae = SparseAutoencoder(d_in=16, d_out=10, d_sae=32, activation="topk", k=3)
    with pytest.raises(DataError, match=r"rows of width 28 but the transcoder trains on \[x \| y\] rows of width"):
        Trainer(sae, data, TrainConfig(steps=1, batch_size=8, progress=False))
    with pytest.raises(ValueError, match=r"latent sharding does not support transcoders \(d_out=12\)"):
        Trainer(SparseAutoencoder(d_in=16, d_out=12, d_sae=32, k=3), data, TrainConfig(shard_latents=2))
    with pytest.raises(ValueError, match="latent sharding does not support skip connections"):
        Trainer(SparseAutoencoder(d_in=28, d_sae=32, k=3, skip_connection=True), data, TrainConfig(shard_latents=2))


def test_input_scales_fold_into_the_saved_transcoder(tmp_path):
    """expected_average_only_in: x and y each get their own scale (E‖x‖ = sqrt(d_in), E‖y‖ = sqrt(d_out)); the
    saved folder takes raw x and predicts raw y."""
    data = PairData(y_scale=40.0)
    trainer = pair_trainer(
        data, tmp_path, steps=20, normalize_activations="expected_average_only_in", skip_connection=True
    )
    trainer.train()
    x0, y0 = split_pair(data.sample(0, 128), data.d_x)
    assert trainer.act_scale == pytest.approx(16**0.5 / float(x0.norm(dim=1).mean()), rel=1e-5)
    assert trainer.out_scale == pytest.approx(12**0.5 / float(y0.norm(dim=1).mean()), rel=1e-5)
    saved = fusedsae.load(tmp_path / "sae").eval()
    assert saved.cfg.d_out == 12 and saved.cfg.skip_connection
    x = split_pair(data.sample(999, 32), data.d_x)[0]
    trained = trainer.sae.eval()
    with torch.no_grad():
        torch.testing.assert_close(saved.encode(x), trained.encode(x * trainer.act_scale), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            saved(x), trained(x * trainer.act_scale) / trainer.out_scale, rtol=1e-4, atol=1e-4 * 40
        )


def test_transcoder_run_resumes_to_the_same_weights(tmp_path):
    """Resumed from its step-6 checkpoint, a transcoder run (both input scales restored) ends bit for bit where the
    uninterrupted run ended."""
    settings = dict(steps=12, checkpoint_every=6, keep_checkpoints=2, normalize_activations="expected_average_only_in")
    full = pair_trainer(PairData(), tmp_path, **settings)
    full.train()
    final = {name: t.clone() for name, t in full.sae.state_dict().items()}
    resumed = pair_trainer(PairData(), tmp_path, **settings)
    assert resumed.resume(ckpt.list_checkpoints(tmp_path)[0])
    assert resumed.step == 6 and resumed.out_scale == full.out_scale is not None
    resumed.train()
    for name, tensor in final.items():
        assert torch.equal(resumed.sae.state_dict()[name], tensor), name


def test_nonfinite_targets_are_caught():
    """A NaN in y skips that step's update (the guard) and stops the run at the next log step, naming the input."""
    trainer = pair_trainer(PairData(nan_at=3), steps=10, log_every=5)
    with pytest.raises(NonFiniteInputs, match="non-finite"), pytest.warns(RuntimeWarning, match="skipped 1 update"):
        trainer.train()
    assert trainer.step == 5


# ---------------------------------------------------------------------------------------------------------------
# files: SAELens's transcoder folders and sparsify's (skip-)transcoders, both ways
# ---------------------------------------------------------------------------------------------------------------

SAE_LENS_TRANSCODERS = ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]


@pytest.mark.parametrize("architecture", SAE_LENS_TRANSCODERS)
def test_saelens_transcoder_folders_load_with_their_outputs(architecture):
    """Folders written by SAELens 6.54 itself (tests/fixtures/make_fixtures.py): same latents and outputs."""
    folder = FIXTURES / f"saelens_{architecture}"
    want = load_file(str(folder / "expected.safetensors"))
    sae = fusedsae.load(folder).eval()
    assert sae.cfg.d_out == 5 and sae.cfg.d_in == 8 and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.skip_connection == ("skip" in architecture)
    assert sae.cfg.activation == ("jumprelu" if architecture.startswith("jumprelu") else "relu")
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(want["x"]), want["encode"])
        torch.testing.assert_close(sae(want["x"]), want["forward"])


def test_sparsify_skip_transcoder_folder_loads_with_its_outputs():
    """A sparsify coder with transcode + skip_connection (d_out = d_in): fusedsae.load gives a skip-transcoder
    with sparsify's own reconstruction; the compat coder gives its FVU against y too."""
    folder = FIXTURES / "sparsify_skip_transcoder"
    want = load_file(str(folder / "expected.safetensors"))
    sae = fusedsae.load(folder)
    assert sae.cfg.d_out == sae.cfg.d_in == 8 and sae.cfg.skip_connection and not sae.cfg.apply_b_dec_to_input
    with torch.no_grad():
        torch.testing.assert_close(sae(want["x"]), want["forward"])
        assert torch.equal(sae.encode_sparse(want["x"])[1].sort(-1).values, want["top_indices"].sort(-1).values)
        out = csp.SparseCoder.load_from_disk(folder)(want["x"], want["y"])
        torch.testing.assert_close(out.sae_out, want["forward"])
        torch.testing.assert_close(out.fvu, want["fvu"])
        torch.testing.assert_close(naive.fvu(want["y"], sae(want["x"])), float(want["fvu"]), rtol=1e-5, atol=1e-6)


def random_transcoder(activation: str, skip: bool, d_in: int = 6, d_out: int = 5) -> SparseAutoencoder:
    sae = make(activation, d_in, d_out, 13, 3, skip, "float32")
    if activation == "batchtopk":
        with torch.no_grad():
            sae.threshold.fill_(0.2)
    return sae.eval()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saelens_format_round_trip(tmp_path, activation, skip):
    """Ours -> SAELens folder -> fusedsae.load: identical outputs; the architecture is SAELens's transcoder name
    (TopK, which SAELens has no transcoder for, gets a name SAELens refuses rather than other maths)."""
    sae = random_transcoder(activation, skip)
    sae.save(tmp_path / "tc")
    raw = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    base = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder"}
    name = base.get(activation, "topk_transcoder")
    assert raw["architecture"] == (name.replace("transcoder", "skip_transcoder") if skip else name)
    assert raw["d_out"] == 5 and raw["apply_b_dec_to_input"] is False
    x = torch.randn(N, 6)
    back = fusedsae.load(tmp_path / "tc").eval()
    with torch.no_grad():
        assert torch.equal(back(x), sae(x)) and torch.equal(back.encode(x), sae.encode(x))


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_saelens_loads_our_transcoders(tmp_path, activation, skip):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens not installed (the fixtures cover interop in CI)")
    sae = random_transcoder(activation, skip)
    sae.save(tmp_path / "tc")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"))
    assert (
        type(theirs).__name__ == ("" if activation == "relu" else "JumpReLU") + ("Skip" if skip else "") + "Transcoder"
    )
    x = torch.randn(N, 6)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), sae(x))
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))


def test_an_sae_with_a_skip_path_round_trips(tmp_path):
    """An SAE with sparsify's skip path has no SAELens class: written as "topk_skip" (refused by SAELens by name),
    read back by fusedsae from its own metadata with identical outputs."""
    sae = SparseAutoencoder(d_in=6, d_sae=13, k=3, skip_connection=True).eval()
    with torch.no_grad():
        sae.W_skip.normal_()
    sae.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["architecture"] == "topk_skip"
    x = torch.randn(N, 6)
    with torch.no_grad():
        assert torch.equal(fusedsae.load(tmp_path / "s")(x), sae(x))


@pytest.mark.parametrize("case", ["transcoder", "skip_transcoder", "skip_sae"])
def test_sparsify_format_round_trip(tmp_path, case):
    """Ours -> sparsify folder (transcode / skip_connection / W_skip) -> fusedsae.load and sparsify's own loader:
    identical outputs."""
    transcoder = case != "skip_sae"
    sae = SparseAutoencoder(
        d_in=6, d_out=6 if transcoder else None, d_sae=13, k=3, skip_connection=case != "transcoder"
    ).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    sae.save(tmp_path / "sp", format="sparsify")
    raw = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert raw["transcode"] is transcoder and raw["skip_connection"] is (case != "transcoder") and raw["d_in"] == 6
    x = torch.randn(N, 6)
    back = fusedsae.load(tmp_path / "sp").eval()
    with torch.no_grad():
        assert torch.equal(back(x), sae(x))
        torch.testing.assert_close(csp.SparseCoder.load_from_disk(tmp_path / "sp")(x).sae_out, sae(x))
    sparsify = pytest.importorskip("sparsify", reason="sparsify not installed (the fixtures cover interop in CI)")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "sp")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).sae_out, sae(x))


def test_sparsify_format_refuses_what_sparsify_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="maps d_in=6 to d_out=5"):
        random_transcoder("topk", False).save(tmp_path / "a", format="sparsify")
    with pytest.raises(ValueError, match="TopK coders only; this SAE is relu"):
        random_transcoder("relu", False).save(tmp_path / "b", format="sparsify")
    with pytest.raises(ValueError, match="unknown SAE file format 'hdf5'"):
        random_transcoder("topk", False).save(tmp_path / "c", format="hdf5")


# ---------------------------------------------------------------------------------------------------------------
# per-head attribution (docs/architecture.md#attribution): the identity holds for any active latent
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_head_attribution_of_a_transcoder(activation, skip):
    """A transcoder reading concatenated attention outputs z (4 heads of 5) and writing another activation: every
    active latent's activation is the sum of its per-head terms z_h · W_enc[h, f] plus b_enc[f] (its input is never
    centred, so both conventions agree), each head's term matches float64 einsum, and zeroing a head moves the
    pre-activation by exactly minus its term."""
    heads, d_head = 4, 5
    sae = make(activation, heads * d_head, 7, 23, 3, skip, "float64").eval()
    sae.cfg.n_heads = heads
    if activation == "batchtopk":
        with torch.no_grad():
            sae.threshold.fill_(0.1)
    z = torch.randn(2, N, heads * d_head, dtype=torch.float64)
    hc = head_contributions(sae, z, "raw")
    centred = head_contributions(sae, z, "centred")
    assert torch.equal(hc.contributions, centred.contributions) and torch.equal(hc.constant, centred.constant)
    dense = sae.encode(z)
    assert int(hc.active.sum()) == int((dense != 0).sum()) > 0
    torch.testing.assert_close(hc.total()[hc.active], hc.activations[hc.active], rtol=1e-12, atol=1e-12)
    W = sae.W_enc.detach()
    terms = torch.einsum("bnhd,hdf->bnhf", z.view(2, N, heads, d_head), W.view(heads, d_head, -1))
    want = terms.gather(3, hc.indices[..., None, :].expand(-1, -1, heads, -1)).transpose(-1, -2)
    torch.testing.assert_close(hc.contributions, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hc.constant, sae.b_enc.detach()[hc.indices])
    features = [0, 5, 22]
    d_pre, _ = single_head_ablations(sae, z, features)
    contributions = head_contributions(sae, z, "raw", features=features).contributions
    torch.testing.assert_close(d_pre, -contributions, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="writes its output y .* use which='encoder'"):
        weight_head_shares(sae, "decoder")
    assert weight_head_shares(sae, "encoder").shape == (23, heads)
    with pytest.raises(ValueError, match="b_dec lives in its output space"):
        single_head_ablations(sae, z, features, replacement="b_dec")


# ---------------------------------------------------------------------------------------------------------------
# data parallelism (gloo, two processes): two ranks on [x | y] batches of B train one process's weights on 2B
# ---------------------------------------------------------------------------------------------------------------

DP_STEPS, DP_BATCH = 8, 32
DP_SAE = dict(d_in=16, d_out=12, d_sae=32, activation="topk", k=4, dtype="float64", aux_k=6, skip_connection=True)
DP_RANK_SCRIPT = f"""
import sys, torch, torch.distributed as dist, fusedsae
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_transcoder import PairData
from safetensors.torch import save_file
torch.set_num_threads(1)
dist.init_process_group("gloo")
torch.manual_seed(0)
sae = fusedsae.SparseAutoencoder(**{DP_SAE!r})
source = fusedsae.ToySource(PairData(), {DP_BATCH}, rank=dist.get_rank(), world_size=dist.get_world_size())
cfg = fusedsae.TrainConfig(steps={DP_STEPS}, batch_size={DP_BATCH}, lr=3e-3, b_dec_init="mean", dead_tokens=128,
                           progress=False, log_every=4)
fusedsae.Trainer(sae, source, cfg).train()
if dist.get_rank() == 0:
    save_file(dict(sae.state_dict()), sys.argv[1])
dist.barrier()
dist.destroy_process_group()
"""


def test_two_ranks_train_the_transcoder_of_one_process(tmp_path):
    """AuxK on (latents die after 128 tokens), normalised by the global batch's residual y - ŷ; b_dec from the
    mean of rank 0's first y (what the ranks broadcast)."""
    script = tmp_path / "rank.py"
    script.write_text(DP_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(fusedsae.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    result = subprocess.run(
        [*cmd, str(tmp_path / "ddp.safetensors")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = load_file(str(tmp_path / "ddp.safetensors"))

    data = PairData()

    class Concatenated:  # global batch i = rank 0's share, then rank 1's
        d_in, index = data.d_in, 0

        def next_batch(self):
            i, self.index = self.index, self.index + 1
            return torch.cat([data.sample(2 * i, DP_BATCH), data.sample(2 * i + 1, DP_BATCH)])

    torch.manual_seed(0)
    sae = SparseAutoencoder(**DP_SAE)
    sae.init_b_dec(split_pair(data.sample(0, DP_BATCH), 16)[1], "mean")
    cfg = TrainConfig(
        steps=DP_STEPS, batch_size=2 * DP_BATCH, lr=3e-3, b_dec_init="keep", dead_tokens=128, progress=False
    )
    Trainer(sae, Concatenated(), cfg).train()
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-12, atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(ddp["W_skip"], torch.zeros_like(ddp["W_skip"]))


# ---------------------------------------------------------------------------------------------------------------
# fusedsae.compat.sae_lens: SAELens's four transcoder classes on our ops
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", SAE_LENS_TRANSCODERS)
def test_compat_sae_lens_transcoders(tmp_path, architecture):
    """SAE.load_from_disk builds SAELens's class for the folder with SAELens's outputs; save_model writes a folder
    both loaders read back identically; to_fusedsae gives the same maths as a SparseAutoencoder."""
    folder = FIXTURES / f"saelens_{architecture}"
    want = load_file(str(folder / "expected.safetensors"))
    sae = csl.SAE.load_from_disk(folder)
    assert (
        type(sae).__name__
        == {
            "transcoder": "Transcoder",
            "skip_transcoder": "SkipTranscoder",
            "jumprelu_transcoder": "JumpReLUTranscoder",
            "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder",
        }[architecture]
    )
    assert sae.cfg.architecture() == architecture and sae.cfg.d_out == 5 and sae.W_dec.shape == (16, 5)
    x = want["x"]
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), want["encode"])
        torch.testing.assert_close(sae(x), want["forward"])
        torch.testing.assert_close(sae.to_fusedsae()(x), want["forward"])
    sae.save_model(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(csl.SAE.load_from_disk(tmp_path / "again")(x), want["forward"])
        torch.testing.assert_close(fusedsae.load(tmp_path / "again")(x), want["forward"])
    fresh = csl.SAE(csl.SAE.load_from_disk(folder).cfg)  # a fresh one: SAELens's init, zero skip path
    assert fresh.W_enc.shape == (8, 16) and fresh.b_dec.shape == (5,)
    if "skip" in architecture:
        assert torch.equal(fresh.W_skip, torch.zeros(5, 8))
    with pytest.raises(ValueError, match="apply_b_dec_to_input is not supported for transcoders"):
        csl.TranscoderConfig(d_in=8, d_sae=16, d_out=5)


def test_feature_reports_of_a_transcoder_use_encoder_head_shares():
    """`fusedsae attribute`'s reports: a transcoder's decoder has no head blocks, so the data-free shares are the
    encoder's (labelled so); the per-context contributions still add up to the activation."""
    heads, d_head = 4, 5
    sae = make("topk", heads * d_head, 7, 23, 3, True, "float32").eval()
    sae.cfg.n_heads = heads
    z = torch.randn(30, heads * d_head)
    found = scan(sae, [(z, torch.zeros(30, dtype=torch.int64), torch.arange(30))], n_contexts=2)
    feature = int(found.counts.argmax())
    (rep,) = build_reports(sae, found, [feature], lambda i: [0] * 30, FakeTokenizer(), z_of_row=lambda r: z[r])
    assert rep.shares_of == "encoder"
    torch.testing.assert_close(torch.tensor(rep.decoder_shares), weight_head_shares(sae, "encoder")[feature])
    assert "encoder head shares" in format_report(rep)
    for ctx in rep.contexts:
        assert ctx.activation == pytest.approx(ctx.constant + sum(ctx.contributions), rel=1e-5, abs=1e-5)


class FakeTokenizer:
    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]

"""Matryoshka SAEs: every prefix reconstruction from one pass over the active latents, and the fused op
``matryoshka_decode_loss`` (the reconstruction and every prefix's squared error without the prefixes, and its
one-pass backward) in every backend, checked against an independent float64 computation by dense masking (values
and every gradient); the training loss's terms.

Codes cover what the encoders produce and what the op must survive: TopK rows sorted by value, BatchTopK rows with
padding (value 0, index 0), repeated indices, rows whose entries all sit in one level (other levels empty), k = 1,
k = d_sae, widths and d_out that are no multiple of any block. Float32 and bfloat16 follow the STYLE §10 rule: the
error against float64 may be at most twice that of the current PyTorch path at the same precision
(``matryoshka_decode`` + the losses in PyTorch, autograd through ``embedding_bag``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fusedsae
from conftest import assert_close_lowp, requires_cuda
from fusedsae import backends, reference
from fusedsae import functional as F
from fusedsae.diagnostics import HostSyncCounter


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


# ---------------------------------------------------------------------------------------------------------------
# matryoshka_decode_loss: the fused reconstruction + prefix losses, forward and backward
# ---------------------------------------------------------------------------------------------------------------


def naive_decode_loss(values, indices, W_dec, b_dec, y, widths):
    """float64 dense masking: scatter the code to [N, d_sae] (repeats add up), decode each prefix densely."""
    dense = torch.zeros(values.shape[0], W_dec.shape[0], dtype=torch.float64).scatter_add(
        1, indices.long(), values.double()
    )
    W, b = W_dec.double(), 0 if b_dec is None else b_dec.double()
    prefixes = torch.stack([dense[:, :w] @ W[:w] + b for w in widths], dim=1)
    return prefixes[:, -1], (prefixes - y.double()[:, None]).pow(2).sum(-1)


def current_decode_loss(values, indices, W_dec, b_dec, y, widths):
    """The path the fused op replaces, at the inputs' precision: every prefix from ``matryoshka_decode``, then the
    squared errors in PyTorch."""
    prefixes = F.matryoshka_decode(values, indices, W_dec, b_dec, widths)
    return prefixes[:, -1], (prefixes - y[:, None]).pow(2).sum(-1)


def make_code(n, d_sae, k, widths, kind, dtype):
    """``(values, indices)`` of shape [n, k]; see the module docstring for the kinds."""
    if kind == "topk":
        values, indices = torch.randn(n, d_sae).topk(k, dim=1)
        return values.relu().to(dtype), indices
    if kind == "padded":  # BatchTopK: 0..k active latents per row in latent order, then value 0 / index 0
        indices = torch.zeros(n, k, dtype=torch.int64)
        values = torch.zeros(n, k)
        for row in range(n):
            count = int(torch.randint(0, k + 1, ()))
            indices[row, :count] = torch.randperm(d_sae)[:count].sort().values
            values[row, :count] = torch.rand(count) + 0.1
        return values.to(dtype), indices
    if kind == "repeated":
        return torch.randn(n, k).to(dtype), torch.randint(0, d_sae, (n, k), dtype=torch.int32)  # int32 too
    if kind == "one level":  # every entry in the second level: the first is empty, the last adds nothing
        lo, hi = widths[0], widths[1]
        return torch.rand(n, k).to(dtype), torch.stack([torch.randperm(hi - lo)[:k] + lo for _ in range(n)])
    raise ValueError(kind)


# (N, d_sae, k, d_out, widths, kind): 37/53/11/[7, 20, 33] are no multiple of any block (the interpreter's 8-token
# and 16-column tiles, the GPU's 4 x 256); k = 1 with a one-latent prefix; k = d_sae; padding; repeats; one level.
CASES = [
    (37, 53, 5, 11, [7, 20, 33, 53], "topk"),
    (16, 40, 1, 8, [1, 40], "topk"),
    (9, 30, 30, 6, [3, 10, 30], "topk"),
    (13, 50, 6, 17, [5, 17, 50], "padded"),
    (11, 24, 7, 9, [4, 24], "repeated"),
    (10, 45, 4, 10, [9, 21, 45], "one level"),
]


def _inputs(n, d_sae, k, d_out, widths, kind, dtype, bias=True):
    values, indices = make_code(n, d_sae, k, widths, kind, dtype)
    W_dec = (torch.randn(d_sae, d_out) / d_out**0.5).to(dtype)
    b_dec = (0.3 * torch.randn(d_out)).to(dtype) if bias else None
    y = torch.randn(n, d_out).to(dtype)
    return values, indices, W_dec, b_dec, y


def _grads(fn, values, indices, W_dec, b_dec, y, widths, grad_sq, grad_recon):
    """The op's outputs and the gradients of ``sum(sq * grad_sq) + sum(recon * grad_recon)`` (a loss touching
    every level and the reconstruction) for values, W_dec, b_dec and y."""
    leaves = [t.detach().clone().requires_grad_() for t in (values, W_dec, y)]
    b = None if b_dec is None else b_dec.detach().clone().requires_grad_()
    recon, sq = fn(leaves[0], indices, leaves[1], b, leaves[2], widths)
    loss = (sq * grad_sq.to(sq.dtype)).sum()
    if grad_recon is not None:
        loss = loss + (recon * grad_recon.to(recon.dtype)).sum()
    wrt = [leaves[0], leaves[1], leaves[2]] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    return (recon.detach(), sq.detach(), *grads)


NAMES = ("recon", "sq_errors", "d values", "d W_dec", "d y", "d b_dec")


def _fused(values, indices, W_dec, b_dec, y, widths):
    return F.matryoshka_decode_loss(values, indices, W_dec, b_dec, y, widths)


@pytest.mark.parametrize("case", CASES, ids=[c[-1] + f"-{c[0]}x{c[1]}" for c in CASES])
def test_reference_decode_loss_and_gradients_match_dense_masking(case):
    *shape, widths, kind = case
    inputs = _inputs(*shape, widths, kind, torch.float64)
    n, levels = shape[0], len(widths)
    grad_sq, grad_recon = torch.randn(n, levels, dtype=torch.float64), torch.randn(n, shape[3], dtype=torch.float64)
    with backends.use("reference"):
        got = _grads(_fused, *inputs, widths, grad_sq, grad_recon)
    expected = _grads(naive_decode_loss, *inputs, widths, grad_sq, grad_recon)
    for name, a, b in zip(NAMES, got, expected):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_reference_without_host_reads_matches(monkeypatch):
    """Where the host may not read the level boundaries (an accelerator), the reference sums every level's bags in
    one ``embedding_bag`` instead of one per level: the same results."""
    *shape, widths, kind = CASES[3]
    inputs = _inputs(*shape, widths, kind, torch.float64)
    grad_sq = torch.randn(shape[0], len(widths), dtype=torch.float64)
    with backends.use("reference"):
        per_level = _grads(_fused, *inputs, widths, grad_sq, None)
        monkeypatch.setattr(reference, "CPU_HOST_READS", False)
        at_once = _grads(_fused, *inputs, widths, grad_sq, None)
    for name, a, b in zip(NAMES, at_once, per_level):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_matryoshka_training_step_issues_no_host_sync(monkeypatch, backend):
    """docs/architecture.md#sync holds for Matryoshka TopK too: forward, loss and backward read nothing back to the
    host (the reference as it runs on a GPU; triton in the interpreter)."""
    monkeypatch.setattr(reference, "CPU_HOST_READS", False)
    if backend == "triton":
        _triton()
    sae = fusedsae.SparseAutoencoder(d_in=16, d_sae=64, activation="topk", k=3, matryoshka_widths=[8, 24])
    x = torch.randn(24, 16)
    with backends.use(backend), HostSyncCounter() as counter:
        out = sae.training_forward(x, dead_mask=torch.arange(64) % 3 == 0, dead_capacity=22, defer_checks=True)
        out.loss.backward()
    assert "inner_mse_loss_24" in out.losses
    assert dict(counter.by_op) == {}


def test_loss_only_gradient_and_no_bias():
    """Only the squared errors carry a gradient (the training loss; the reconstruction feeds AuxK detached), and an
    SAE without b_dec."""
    inputs = _inputs(15, 33, 4, 7, [2, 9, 33], "topk", torch.float64, bias=False)
    grad_sq = torch.rand(15, 3, dtype=torch.float64)
    got = _grads(_fused, *inputs, [2, 9, 33], grad_sq, None)
    expected = _grads(naive_decode_loss, *inputs, [2, 9, 33], grad_sq, None)
    for name, a, b in zip(NAMES, got, expected):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_decode_loss_keeps_leading_dims_and_refuses_a_wrong_target():
    W_dec = torch.randn(20, 4, dtype=torch.float64)
    values = torch.rand(2, 3, 5, dtype=torch.float64)
    indices = torch.randint(0, 20, (2, 3, 5))
    y = torch.randn(2, 3, 4, dtype=torch.float64)
    out = F.matryoshka_decode_loss(values, indices, W_dec, None, y, [6, 20])
    assert out.recon.shape == (2, 3, 4) and out.sq_errors.shape == (2, 3, 2)
    torch.testing.assert_close(out.recon, F.sparse_decode(values, indices, W_dec))
    with pytest.raises(ValueError, match=r"y must be \[..., d_out\] = \[2, 3, 4\]"):
        F.matryoshka_decode_loss(values, indices, W_dec, None, y[..., :3], [6, 20])
    with pytest.raises(TypeError, match="y has dtype torch.float32"):
        F.matryoshka_decode_loss(values, indices, W_dec, None, y.float(), [6, 20])
    with pytest.raises(ValueError, match="increase strictly"):
        F.matryoshka_decode_loss(values, indices, W_dec, None, y, [6, 3])


def test_training_step_gradients_match_dense_masking():
    """The SAE's Matryoshka loss (sum of the prefix MSEs, no AuxK) and every parameter's gradient through the fused
    op equal the same loss written densely in float64."""
    sae = fusedsae.SparseAutoencoder(
        d_in=13, d_sae=41, activation="topk", k=5, dtype="float64", matryoshka_widths=[3, 11, 26]
    )
    x = torch.randn(23, 13, dtype=torch.float64)
    out = sae.training_forward(x)
    got = torch.autograd.grad(out.loss, list(sae.parameters()), allow_unused=True)
    code = F.topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, k=5)
    _, sq = naive_decode_loss(code.values, code.indices, sae.W_dec, sae.b_dec, x, sae.cfg.matryoshka_widths)
    expected = torch.autograd.grad(sq.mean(0).sum(), list(sae.parameters()), allow_unused=True)
    torch.testing.assert_close(out.loss, sq.mean(0).sum().float())
    for (name, _), a, b in zip(sae.named_parameters(), got, expected):
        if b is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d {name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# the kernels: triton (the interpreter without a GPU) and cuda (GPU only)
# ---------------------------------------------------------------------------------------------------------------


def _backend_available(name):
    entry = backends.report()[name]
    return entry["available"], entry["reason"]


def _check_backend(name, case, dtype, device, grad_recon=True):
    *shape, widths, kind = case
    inputs = [None if t is None else t.to(device) for t in _inputs(*shape, widths, kind, dtype)]
    n, levels = shape[0], len(widths)
    grad_sq = torch.randn(n, levels, device=device)
    g_recon = torch.randn(n, shape[3], device=device) if grad_recon else None
    with backends.use(name):
        got = _grads(_fused, *inputs, widths, grad_sq, g_recon)
    with backends.use("reference"):
        baseline = _grads(current_decode_loss, *inputs, widths, grad_sq, g_recon)
    exact = _grads(
        naive_decode_loss,
        *[None if t is None else t.cpu().double() for t in inputs],
        widths,
        grad_sq.cpu(),
        None if g_recon is None else g_recon.cpu(),
    )
    for label, a, b, e in zip(NAMES, got, baseline, exact):
        assert a.dtype == dtype and a.shape == e.shape, label
        assert_close_lowp(a.cpu(), b.cpu(), e, f"{name} {dtype} {kind} {label}")


def _triton():
    ok, why = _backend_available("triton")
    if not ok:
        pytest.skip(f"triton backend: {why}")
    return "cuda" if torch.cuda.is_available() else "cpu"


TRITON_CASES = [CASES[0], CASES[1], CASES[3], CASES[4], CASES[5]]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[-1] + f"-{c[0]}x{c[1]}" for c in TRITON_CASES])
def test_triton_decode_loss_matches_dense_masking(case):
    _check_backend("triton", case, torch.float32, _triton())


def test_triton_decode_loss_bfloat16_and_loss_only_gradient():
    _check_backend("triton", CASES[0], torch.bfloat16, _triton(), grad_recon=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests run the GPU blocks compiled")
def test_triton_gpu_blocks_in_the_interpreter():
    """The launchers' GPU tiles (4 tokens x 256 columns) through the interpreter: a partial last token block,
    masked columns, and at d_out = 300 two column blocks whose partial squared errors and d values are summed."""
    _triton()
    from fusedsae.backends import triton as tt

    tt.assume_gpu(2)
    try:
        _check_backend("triton", (13, 50, 6, 300, [5, 17, 50], "padded"), torch.float32, "cpu")
    finally:
        tt.assume_gpu(None)


@contextlib.contextmanager
def _deterministic(flag):
    from fusedsae.backends import triton as tt

    tt.set_deterministic(flag)
    try:
        yield
    finally:
        tt.set_deterministic(None)


def test_triton_backward_is_bitwise_repeatable_and_atomic_mode_agrees():
    """d W_dec goes through the sorted segment sum re-addressed to (token, level) rows: two runs agree bit for bit;
    the opt-in float32-atomic path (the [N * L, m] layout, values 0 off-level) gives the same sums to rounding."""
    device = _triton()
    *shape, widths, kind = CASES[3]
    values, indices, W_dec, b_dec, y = [t.to(device) for t in _inputs(*shape, widths, kind, torch.float32)]
    grad_sq = torch.randn(shape[0], len(widths), device=device)
    with backends.use("triton"):
        recon, _ = torch.ops.fusedsae.matryoshka_decode_loss(values, indices, W_dec, b_dec, y, widths)
        args = (None, grad_sq, values, indices, W_dec, y, recon, widths)
        first = torch.ops.fusedsae.matryoshka_decode_loss_backward(*args)
        second = torch.ops.fusedsae.matryoshka_decode_loss_backward(*args)
        with _deterministic(False):
            atomic = torch.ops.fusedsae.matryoshka_decode_loss_backward(*args)
    expected = reference.matryoshka_decode_loss_backward(*args)
    for a, b, c, e in zip(first, second, atomic, expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, e)
        torch.testing.assert_close(a, e)


# On a GPU: both kernels, compiled, on the small cases and one at the DESIGN's width (768 -> 32768, k = 32, five
# nested widths as benchmarks/matryoshka_step.py), 512 rows so that the float64 oracle stays quick.
GPU_CASES = [CASES[0], CASES[3], CASES[4], (512, 32768, 32, 768, [128, 512, 2048, 8192, 32768], "topk")]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=["topk", "padded", "repeated", "768x32768"])
def test_gpu_decode_loss_matches_dense_masking(backend, case, dtype):
    ok, why = _backend_available(backend)
    if not ok:
        pytest.skip(f"{backend} backend: {why}")
    _check_backend(backend, case, dtype, "cuda")

"""The ``triton`` backend against the reference and the naive oracle: every registered op, forward and every
gradient, under ``backends.use("triton")``.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) on CPU tensors at small
shapes chosen to hit every edge: d_in and d_sae that are no multiple of any block, k = 1, k = the interpreter's
16-wide tile, k = d_sae, k beyond the fused limit (two-pass path), ties, all-negative rows, AuxK (fused and over
the dead columns), BatchTopK's refinement, int32 and int64 indices, float32 exactly and bfloat16/float16 by the
STYLE §10 rule. With a GPU the same tests run compiled, plus real-size shapes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import conftest
import naive
from conftest import assert_close_lowp, opcheck_cases
from fusedsae import backends, reference
from fusedsae import functional as F

triton_backend = pytest.importorskip("fusedsae.backends.triton")
tt = triton_backend

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

pytestmark = pytest.mark.skipif(
    not backends.report()["triton"]["available"], reason=f"triton backend: {backends.report()['triton']['reason']}"
)

# (N, d_in, d_sae, k): d_in 13 and 33 and d_sae 65 are no multiple of any block; k = 1; k = d_sae; k = 16, the
# interpreter's tile width; N = 20 spans two 16-row blocks. With a GPU: real sizes as well.
SHAPES = [(5, 16, 32, 4), (7, 13, 40, 1), (4, 13, 24, 24), (9, 33, 65, 16), (20, 24, 48, 3)]
if GPU:
    SHAPES += [(4096, 768, 32768, 32), (1000, 333, 5000, 64), (512, 128, 4096, 128)]
LOWP = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def _fast_interpreted_sort():
    """Makes the interpreter's ``xor_sum`` (the partner lookup in every compare-exchange of ``tl.sort``/``tl.topk``)
    one numpy reduction instead of a Python loop over elements: the same result, but the GPU-sized 64 x 128 key
    tiles sort in milliseconds instead of seconds. Only the interpreter's speed changes; nothing compiled does."""
    if not tt.INTERPRETED:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    reduce_ops = interpreter.ReduceOps
    generic = reduce_ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn == tl.standard._xor_combine and self.axis is not None:
            data = np.bitwise_xor.reduce(input[0].handle.data, axis=self.axis, keepdims=self.keep_dims)
            return self.to_tensor(data, input[0].dtype)
        return generic(self, input)

    reduce_ops.apply_impl = apply_impl
    yield
    reduce_ops.apply_impl = generic


@contextlib.contextmanager
def on_triton():
    with backends.use("triton"):
        yield


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def make_weights(d_in, d_sae, dtype=torch.float32, bias=0.3):
    return conftest.make_weights(d_in, d_sae, dtype, bias, DEVICE)


def assert_same_topk(ours, expected):
    """``topk_encode`` outputs: the same TopK and AuxK indices, values to torch.testing's defaults."""
    assert torch.equal(ours[1], expected[1]) and torch.equal(ours[3], expected[3])
    torch.testing.assert_close(ours[0], expected[0])
    torch.testing.assert_close(ours[2], expected[2])


def aux_mask_for(d_sae, aux_k):
    mask = torch.rand(d_sae, device=DEVICE) < 0.5
    mask[:aux_k] = True
    return mask


def assert_selection_within(exact_scores, indices, tol):
    """``indices`` hold the k largest of ``exact_scores`` up to ``tol`` around the cut-off (low precision may swap
    entries whose exact scores are closer than its rounding), each row in descending order up to ``tol``."""
    k = indices.shape[1]
    chosen = exact_scores.gather(1, indices)
    kth = torch.sort(exact_scores, dim=1, descending=True).values[:, k - 1 : k]
    assert (chosen >= kth - tol).all()
    mask = torch.zeros_like(exact_scores, dtype=torch.bool).scatter_(1, indices, True)
    assert (exact_scores[~mask] <= kth.expand_as(exact_scores)[~mask] + tol).all()
    assert (chosen[:, 1:] <= chosen[:, :-1] + tol).all()


def assert_as_accurate_as_reference(actual, op, args, name=""):
    """STYLE §10 for results that are long float32 sums (``d b_dec`` adds d_sae products, ``d b_enc`` all uses of a
    latent), where the summation order shows beyond torch.testing's float32 defaults: each float output's error
    against the reference in float64 is at most twice the reference's own error at the input precision."""
    baseline = getattr(reference, op)(*args)
    exact = getattr(reference, op)(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
    for i, (a, b, e) in enumerate(zip(actual, baseline, exact)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}[{i}]"
        if a.numel():
            assert_close_lowp(a, b, e, f"{name}[{i}]")


def rounding_tolerance(x, W_enc, b_dec):
    """How far two float32 evaluations of the same pre-activation may be apart: the worst-case float32 rounding of
    a d_in-term dot product, ``d_in * eps * sum_i |x_i - b_dec_i| |W_i,j|``, twice (ours and the reference's)."""
    xc = (x if b_dec is None else x - b_dec).double().abs()
    bound = (xc @ W_enc.double().abs()).max().item()
    return 2 * x.shape[1] * torch.finfo(torch.float32).eps * max(1.0, bound)


def assert_topk_like_reference(values, indices, expected_indices, exact, tol, name):
    """The selection is the exact one up to ``tol`` (entries closer than the two GEMMs' rounding may swap; they
    do at real sizes, where some of thousands of rows hold a near-tie), it equals the reference's exactly in
    every row without such a near-tie, and the values are the pre-activations at the selected indices."""
    k = indices.shape[1]
    assert_selection_within(exact, indices, tol)
    torch.testing.assert_close(values.double(), exact.gather(1, indices), rtol=0, atol=tol, msg=name)
    top = torch.sort(exact, dim=1, descending=True).values[:, : k + 1]
    separated = (top[:, :-1] - top[:, 1:] > tol).all(dim=1)  # the top k + 1 (k if k = width) all apart
    assert torch.equal(indices[separated], expected_indices[separated]), name


# ---------------------------------------------------------------------------------------------------------------
# the backend itself: availability, dispatch
# ---------------------------------------------------------------------------------------------------------------


def test_triton_serves_every_op_and_explains_its_state():
    entry = backends.report()["triton"]
    assert entry["available"] and set(entry["ops"]) == set(backends.OPS)
    assert ("interpreter" in entry["reason"]) == tt.INTERPRETED
    if not GPU:
        assert "TRITON_INTERPRET=1" in entry["reason"]


def test_launcher_modules_mirror_the_kernel_modules_and_name_each_launcher_after_its_op():
    # docs/architecture.md#backends: backends/triton/<file>.py launches kernels/<file>.py, plus launch.py (shared)
    import pkgutil

    import fusedsae.kernels

    kernel_files = {m.name for m in pkgutil.iter_modules(fusedsae.kernels.__path__)}
    launcher_files = {m.name for m in pkgutil.iter_modules(tt.__path__)} - {"launch"}
    assert launcher_files == kernel_files
    for op in backends.OPS:
        defined_in = [name for name in sorted(launcher_files) if callable(getattr(getattr(tt, name), op, None))]
        assert len(defined_in) == 1, f"{op} is defined in {defined_in or 'no launcher module'}"


def test_availability_names_why_not(monkeypatch):
    monkeypatch.setattr(tt.launch, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tt.availability() == (False, "no CUDA device and TRITON_INTERPRET is not set")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, reason = tt.availability()
    assert not ok and "set it before importing fusedsae" in reason
    monkeypatch.setattr(tt.launch, "IMPORT_ERROR", "triton is not installed (test)")
    assert tt.availability() == (False, "triton is not installed (test)")


def test_auto_uses_reference_on_cpu_tensors_and_triton_on_cuda():
    x = torch.randn(3, 4)
    W, b = torch.randn(4, 6), torch.zeros(6)
    assert backends.chosen("topk_encode", x, W, b, None, 2, 0, None) == "reference"
    assert backends.chosen("sparse_decode", x, torch.zeros(3, 4, dtype=torch.int64), W.t(), None) == "reference"
    if GPU:
        xc, Wc, bc = x.cuda(), W.cuda(), b.cuda()
        assert backends.chosen("topk_encode", xc, Wc, bc, None, 2, 0, None) == "triton"


def test_explicit_triton_refuses_float64_with_the_reason():
    x = randn(3, 4, dtype=torch.float64)
    W, b = randn(4, 6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64, device=DEVICE)
    with on_triton(), pytest.raises(backends.BackendError, match="float32, bfloat16 or float16 tensors, got"):
        F.topk_encode(x, W, b, k=2)
    with on_triton(), pytest.raises(backends.BackendError, match="indices must be int32 or int64"):
        backends.call(
            "sparse_decode", randn(3, 2), torch.zeros(3, 2, dtype=torch.int16, device=DEVICE), W.float().t(), None
        )
    F.topk_encode(x, W, b, k=2)  # auto falls back to the reference
    indices = torch.zeros(3, 2, dtype=torch.int64, device=DEVICE)
    with on_triton(), pytest.raises(backends.BackendError, match="n_heads=5 must divide d_in=4"):
        backends.call("head_partial_sums", x.float(), W.float(), None, indices, 5)


# ---------------------------------------------------------------------------------------------------------------
# TopK encoder (+ AuxK)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("center", [True, False])
def test_topk_encode_matches_reference(shape, center):
    n, d_in, d_sae, k = shape
    x = randn(n, d_in)
    W_enc, b_enc, b_dec, _ = make_weights(d_in, d_sae)
    b = b_dec if center else None
    aux_k = min(3, d_sae)
    mask = aux_mask_for(d_sae, aux_k)
    with on_triton():
        values, indices, aux_values, aux_indices = torch.ops.fusedsae.topk_encode(x, W_enc, b_enc, b, k, aux_k, mask)
    expected = reference.topk_encode(x, W_enc, b_enc, b, k, aux_k, mask)
    exact = naive.pre(x.double(), W_enc.double(), b_enc.double(), None if b is None else b.double())
    tol = rounding_tolerance(x, W_enc, b)
    assert_topk_like_reference(values, indices, expected[1], exact, tol, "topk")
    dead = exact.masked_fill(~mask, float("-inf"))
    assert_topk_like_reference(aux_values, aux_indices, expected[3], dead, tol, "auxk")
    if not GPU:  # small shapes hold no near-tie: the interpreter's results are the reference's, index for index
        assert torch.equal(indices, expected[1]) and torch.equal(aux_indices, expected[3])


@pytest.mark.parametrize(
    ("shape", "k", "aux_k"),
    [
        ((5, 20, 150, 130), 130, 3),  # k beyond the fused limit: two-pass selection for both
        ((6, 20, 300, 5), 5, 130),  # wide AuxK: fused main selection, AuxK from a GEMM over the dead columns
        ((4, 13, 200, 200), 200, 140),  # k = d_sae, two-pass
    ],
)
def test_topk_encode_beyond_the_fused_limit(shape, k, aux_k):
    n, d_in, d_sae, _ = shape
    x = randn(n, d_in)
    W_enc, b_enc, b_dec, _ = make_weights(d_in, d_sae)
    mask = aux_mask_for(d_sae, aux_k)
    mask[: min(d_sae, 2 * aux_k)] = True
    with on_triton():
        ours = torch.ops.fusedsae.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    expected = reference.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    assert_same_topk(ours, expected)


@pytest.mark.parametrize("aux_k", [0, 4])
def test_topk_encode_candidate_overflow_falls_back_exactly(monkeypatch, aux_k):
    # Pre-activations that increase along the latents beat every running bound, so each row appends every entry
    # and overflows a one-tile candidate buffer; those rows are recomputed exactly by the redo kernel.
    monkeypatch.setattr(tt.topk, "candidate_capacity", lambda kp, columns, block_n: block_n)
    n, d_in, d_sae, k = 6, 8, 100, 3
    x = 0.01 * randn(n, d_in)
    W_enc, _, b_dec, _ = make_weights(d_in, d_sae)
    b_enc = torch.linspace(-1, 1, d_sae, device=DEVICE)
    b_enc[40:60] = torch.linspace(2, 3, 20, device=DEVICE)
    mask = aux_mask_for(d_sae, aux_k) if aux_k else None
    with on_triton():
        ours = torch.ops.fusedsae.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    expected = reference.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    assert_same_topk(ours, expected)
    scores = torch.linspace(-1, 1, d_sae, device=DEVICE).expand(4, d_sae).contiguous()
    scores[1] = scores[1].flip(0)  # decreasing: this row fits its buffer, the increasing ones overflow
    with on_triton():
        values, indices = F.row_topk(scores, 7)
    expected_values, expected_indices = reference.row_topk(scores, 7)
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)


@pytest.mark.parametrize("k", [1, 5, 16, 20])
def test_topk_ties_break_by_lower_index(k):
    # Small integers: every product is exact, so ties are real ties. Rows: mixed, all-equal, all-negative.
    d_in, d_sae = 6, 20
    W_enc = torch.randint(-2, 3, (d_in, d_sae), device=DEVICE).float()
    b_enc = torch.randint(-1, 2, (d_sae,), device=DEVICE).float()
    x = torch.randint(-2, 3, (8, d_in), device=DEVICE).float()
    x[1] = 0  # pre-activation = b_enc: three values for 20 latents
    mask = torch.zeros(d_sae, dtype=torch.bool, device=DEVICE)
    mask[::2] = True
    aux_k = min(k, 10)
    with on_triton():
        code = F.topk_encode(x, W_enc, b_enc, k=k, aux_k=aux_k, aux_mask=mask)
        flat = F.topk_encode(
            torch.zeros(2, d_in, device=DEVICE), torch.zeros(d_in, d_sae, device=DEVICE), 0 * b_enc, k=k
        )
        negative_b = -1.0 - torch.rand(d_sae, device=DEVICE)
        negative = F.topk_encode(torch.zeros(3, d_in, device=DEVICE), 0 * W_enc, negative_b, k=k)
    p = naive.pre(x.cpu(), W_enc.cpu(), b_enc.cpu(), None)
    _, expected = naive.topk_select(p, k)
    assert torch.equal(code.indices.cpu(), expected)
    _, expected_aux = naive.topk_select(p.masked_fill(~mask.cpu(), float("-inf")), aux_k)
    assert torch.equal(code.aux_indices.cpu(), expected_aux)
    assert flat.indices.tolist() == [list(range(k))] * 2
    assert (negative.values == 0).all()  # all-negative rows still select k latents, ReLU'd to 0
    _, expected_negative = naive.topk_select(negative_b.cpu().expand(3, d_sae), k)
    assert torch.equal(negative.indices.cpu(), expected_negative)


@pytest.mark.parametrize("dtype", LOWP)
def test_topk_encode_low_precision(dtype):
    n, d_in, d_sae, k = 16, 40, 64, 6
    lp = [t.to(dtype) for t in (randn(n, d_in), *make_weights(d_in, d_sae)[:3])]
    mask = aux_mask_for(d_sae, 4)
    with on_triton():
        values, indices, aux_values, aux_indices = torch.ops.fusedsae.topk_encode(*lp, k, 4, mask)
    exact = naive.pre(*[t.double() for t in lp])
    baseline = (lp[0] - lp[3]) @ lp[1] + lp[2]
    # the selection may differ from the exact one only between entries closer than the output's rounding
    tol = 4 * torch.finfo(dtype).eps * exact.abs().max().item()
    assert_selection_within(exact, indices, tol)
    assert_selection_within(exact.masked_fill(~mask, float("-inf")), aux_indices, tol)
    assert_close_lowp(values, baseline.gather(1, indices), exact.gather(1, indices), "topk values")
    assert_close_lowp(aux_values, baseline.gather(1, aux_indices), exact.gather(1, aux_indices), "aux values")


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_topk_encode_gradients_match_naive(shape):
    n, d_in, d_sae, k = shape
    x = randn(n, d_in)
    W_enc, b_enc, b_dec, _ = make_weights(d_in, d_sae)
    aux_k = min(2, d_sae)
    mask = aux_mask_for(d_sae, aux_k)
    gv, ga = randn(n, k), randn(n, aux_k)
    inputs = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
    with on_triton():
        code = F.topk_encode(*inputs, k=k, aux_k=aux_k, aux_mask=mask)
        ours = torch.autograd.grad((code.values * gv).sum() + (code.aux_values * ga).sum(), inputs)
    ref = [t.detach().double().requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
    p = naive.pre(*ref)
    loss = (torch.relu(p.gather(1, code.indices)) * gv.double()).sum()
    loss = loss + (torch.relu(p.gather(1, code.aux_indices)) * ga.double()).sum()
    expected = torch.autograd.grad(loss, ref)
    for name, a, e in zip(["x", "W_enc", "b_enc", "b_dec"], ours, expected):
        torch.testing.assert_close(a, e.float(), msg=f"d{name}")


# ---------------------------------------------------------------------------------------------------------------
# BatchTopK
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_batchtopk_matches_reference(shape):
    n, d_in, d_sae, k = shape
    x = randn(n, d_in)
    W_enc, b_enc, b_dec, _ = make_weights(d_in, d_sae)
    aux_k = min(2, d_sae)
    mask = aux_mask_for(d_sae, aux_k)
    with on_triton():
        ours = torch.ops.fusedsae.batchtopk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    expected = reference.batchtopk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    exact = naive.pre(x.double(), W_enc.double(), b_enc.double(), b_dec.double())
    tol = rounding_tolerance(x, W_enc, b_dec)
    # padded form: each row's active latents in increasing order, then value 0 / index 0
    counts = (ours[0] != 0).sum(1)
    slots = torch.arange(ours[0].shape[1], device=DEVICE)
    live = slots[None, :] < counts[:, None]
    assert ours[0].shape[1] == max(1, int(counts.max()))
    assert (ours[1][~live] == 0).all() and (ours[0][~live] == 0).all() and (ours[0][live] > 0).all()
    assert (ours[1][:, 1:] > ours[1][:, :-1])[live[:, 1:]].all()
    dense = F.to_dense(ours[0], ours[1], d_sae).double()
    active = dense != 0
    # the k*N largest positive entries up to the rounding tolerance around the batch cut-off
    assert int(active.sum()) <= k * n
    cutoff = torch.sort(exact.reshape(-1), descending=True).values[k * n - 1] if k * n < exact.numel() else 0.0
    assert (exact[active] >= cutoff - tol).all()
    assert (exact[~active & (exact > tol)] <= cutoff + tol).all()
    torch.testing.assert_close(dense[active], exact[active], rtol=0, atol=tol)
    assert_topk_like_reference(ours[2], ours[3], expected[3], exact.masked_fill(~mask, float("-inf")), tol, "auxk")
    if not GPU:  # no near-tie at the cut-off at these sizes: the reference's result exactly
        for name, a, e in zip(["values", "indices"], ours, expected):
            assert a.shape == e.shape and (torch.equal(a, e) if name == "indices" else torch.allclose(a, e)), name


def test_batchtopk_refines_rows_that_take_more_than_their_candidates():
    # One row with a large norm takes most of the batch's k*N budget: its candidates saturate and it is selected
    # again with wider lists, the last one beyond the fused limit (two-pass).
    n, d_in, d_sae, k = 6, 12, 300, 30
    x = randn(n, d_in)
    x[2] = 40 * x[2].abs()
    W_enc, b_enc, b_dec, _ = make_weights(d_in, d_sae)
    W_enc = W_enc.abs()  # row 2's pre-activations are all large and positive
    with on_triton():
        ours = torch.ops.fusedsae.batchtopk_encode(x, W_enc, b_enc, b_dec, k, 0, None)
    expected = reference.batchtopk_encode(x, W_enc, b_enc, b_dec, k, 0, None)
    assert ours[1].shape[1] > 128  # row 2 holds more than the first (64) and the fused (128) candidate widths
    assert torch.equal(ours[1], expected[1])
    torch.testing.assert_close(ours[0], expected[0])


def test_batchtopk_ties_and_few_positives():
    d_in, d_sae = 4, 10
    W = torch.zeros(d_in, d_sae, device=DEVICE)
    b_enc = torch.tensor([1.0, 2, 2, 2, 0.5, -1, 2, 0, 0, 3], device=DEVICE)
    with on_triton():
        code = F.batchtopk_encode(torch.zeros(2, d_in, device=DEVICE), W, b_enc, k=2)  # budget 4; ties at 2
        few = F.batchtopk_encode(
            torch.zeros(3, d_in, device=DEVICE), W, torch.tensor([-1.0] * 9 + [0.5]).to(DEVICE), k=2
        )
    dense = F.to_dense(code.values, code.indices, d_sae)
    assert dense[0].nonzero().squeeze(1).tolist() == [1, 2, 9]
    assert dense[1].nonzero().squeeze(1).tolist() == [9]
    assert torch.equal(F.to_dense(few.values, few.indices, d_sae)[:, 9].cpu(), torch.full((3,), 0.5))
    assert few.values.shape == (3, 1)


def test_batchtopk_gradients_match_naive():
    n, d_in, d_sae, k = 6, 13, 30, 3
    x = randn(n, d_in)
    W_enc, b_enc, b_dec, W_dec = make_weights(d_in, d_sae)
    target = randn(n, d_in)
    inputs = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
    with on_triton():
        code = F.batchtopk_encode(*inputs[:4], k=k)
        out = F.sparse_decode(code.values, code.indices, inputs[4], inputs[3])
        ours = torch.autograd.grad((out - target).pow(2).sum(), inputs)
    ref = [t.detach().double().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
    p = naive.pre(*ref[:4])
    acts = p * naive.batchtopk_mask(p.detach().cpu(), k).to(DEVICE)
    expected = torch.autograd.grad((naive.decode(acts, ref[4], ref[3]) - target.double()).pow(2).sum(), ref)
    for name, a, e in zip(["x", "W_enc", "b_enc", "b_dec", "W_dec"], ours, expected):
        torch.testing.assert_close(a, e.float(), msg=f"d{name}")


# ---------------------------------------------------------------------------------------------------------------
# sparse decoder and sparse encoder backward
# ---------------------------------------------------------------------------------------------------------------


def sparse_inputs(n, d_sae, m, index_dtype):
    values = randn(n, m)
    if m <= d_sae:
        indices = torch.stack([torch.randperm(d_sae, device=DEVICE)[:m] for _ in range(n)])
    else:
        indices = torch.randint(0, d_sae, (n, m), device=DEVICE)
    indices[0, 0] = indices[0, -1]  # a repeated latent in one row adds up
    values[1, 0] = 0  # a padding-like zero skips its row load and still gets its gradient
    return values, indices.to(index_dtype)


@pytest.fixture(params=["deterministic", "atomic"])
def reduction_mode(request):
    tt.set_deterministic(request.param == "deterministic")
    yield request.param
    tt.set_deterministic(None)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sparse_decode_and_gradients(shape, index_dtype, reduction_mode):
    n, d_in, d_sae, k = shape
    values, indices = sparse_inputs(n, d_sae, k, index_dtype)
    _, _, b_dec, W_dec = make_weights(d_in, d_sae)
    g = randn(n, d_in)
    inputs = [values.clone().requires_grad_(), W_dec.clone().requires_grad_(), b_dec.clone().requires_grad_()]
    with on_triton():
        out = F.sparse_decode(inputs[0], indices, inputs[1], inputs[2])
        ours = torch.autograd.grad((out * g).sum(), inputs)
    ref = [t.detach().double().requires_grad_() for t in (values, W_dec, b_dec)]
    dense = torch.zeros(n, d_sae, dtype=torch.float64, device=DEVICE).scatter_add(1, indices.long(), ref[0])
    expected_out = naive.decode(dense, ref[1], ref[2])
    expected = torch.autograd.grad((expected_out * g.double()).sum(), ref)
    torch.testing.assert_close(out, expected_out.float())
    for name, a, e in zip(["values", "W_dec", "b_dec"], ours, expected):
        torch.testing.assert_close(a, e.float(), msg=f"d{name}")


@pytest.mark.parametrize("dtype", LOWP)
def test_sparse_decode_low_precision(dtype):
    n, d_in, d_sae, k = 24, 40, 64, 6
    values, indices = sparse_inputs(n, d_sae, k, torch.int64)
    _, _, b_dec, W_dec = make_weights(d_in, d_sae)
    values, b_dec, W_dec, g = (t.to(dtype) for t in (values, b_dec, W_dec, randn(n, d_in)))
    with on_triton():
        out = torch.ops.fusedsae.sparse_decode(values, indices, W_dec, b_dec)
        d_values, dW_dec = torch.ops.fusedsae.sparse_decode_backward(g, values, indices, W_dec)
    dense = torch.zeros(n, d_sae, dtype=dtype, device=DEVICE).scatter_add(1, indices, values)
    exact_dense = dense.double()
    assert_close_lowp(out, dense @ W_dec + b_dec, exact_dense @ W_dec.double() + b_dec.double(), "decode")
    assert_close_lowp(
        d_values, (g @ W_dec.t()).gather(1, indices), (g.double() @ W_dec.double().t()).gather(1, indices), "d values"
    )
    assert_close_lowp(dW_dec, dense.t() @ g, exact_dense.t() @ g.double(), "dW_dec")


def test_sparse_decoder_backward_is_deterministic():
    n, d_in, d_sae, k = 64, 24, 16, 8  # 32 uses per latent: the summation order shows in fp32
    values, indices = randn(n, k), torch.randint(0, d_sae, (n, k), device=DEVICE)
    W_dec, g = randn(d_sae, d_in), randn(n, d_in)
    with on_triton():
        first = torch.ops.fusedsae.sparse_decode_backward(g, values, indices, W_dec)
        again = torch.ops.fusedsae.sparse_decode_backward(g, values, indices, W_dec)
        encoder_first = torch.ops.fusedsae.sparse_encode_backward(values, indices, g, W_dec.t(), g[0], True)
        encoder_again = torch.ops.fusedsae.sparse_encode_backward(values, indices, g, W_dec.t(), g[0], True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(encoder_first, encoder_again))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("center", [True, False])
def test_sparse_encode_backward_matches_reference(shape, center, reduction_mode):
    n, d_in, d_sae, k = shape
    grad, indices = sparse_inputs(n, d_sae, k + 2, torch.int64)
    x = randn(n, d_in)
    W_enc, _, b_dec, _ = make_weights(d_in, d_sae)
    b = b_dec if center else None
    with on_triton():
        ours = torch.ops.fusedsae.sparse_encode_backward(grad, indices, x, W_enc, b, True)
        no_dx = torch.ops.fusedsae.sparse_encode_backward(grad, indices.int(), x, W_enc, b, False)
    assert_as_accurate_as_reference(ours, "sparse_encode_backward", (grad, indices, x, W_enc, b, True), "dx dW db db")
    assert no_dx[0].numel() == 0
    for name, a, e in zip(["dW_enc", "db_enc", "db_dec"], no_dx[1:], ours[1:]):
        assert torch.equal(a, e) if reduction_mode == "deterministic" else torch.allclose(a, e), name


@pytest.mark.parametrize("layout", ["strided", "transposed view"])
def test_kernels_take_any_encoder_layout(layout):
    # Few gathers for many latents read W_enc's columns in place (no transposed copy); a W_enc that is a view of a
    # [d_sae, d_in] tensor has contiguous columns already; the GEMMs take any strides (here also a column-major x).
    n, d_in, d_sae, m = 2, 21, 130, 3
    grad, indices = sparse_inputs(n, d_sae, m, torch.int64)
    x = randn(n, d_in)
    W_enc, _, b_dec, _ = make_weights(d_in, d_sae)
    if layout == "transposed view":
        W_enc = W_enc.t().contiguous().t()
    b_enc = 0.3 * randn(d_sae)
    with on_triton():
        ours = torch.ops.fusedsae.sparse_encode_backward(grad, indices, x, W_enc, b_dec, True)
        parts = torch.ops.fusedsae.head_partial_sums(x, W_enc, b_dec, indices, 3)
        code = torch.ops.fusedsae.topk_encode(x, W_enc, b_enc, b_dec, 4, 0, None)
        pre = torch.ops.fusedsae.encode_dense(x.t().contiguous().t(), W_enc, b_enc, b_dec, None, "none")
    expected_code = reference.topk_encode(x, W_enc, b_enc, b_dec, 4, 0, None)
    assert torch.equal(code[1], expected_code[1])
    torch.testing.assert_close(code[0], expected_code[0])
    torch.testing.assert_close(pre, reference.encode_dense(x, W_enc, b_enc, b_dec, None, "none"))
    expected = reference.sparse_encode_backward(grad, indices, x, W_enc, b_dec, True)
    for name, a, e in zip(["dx", "dW_enc", "db_enc", "db_dec"], ours, expected):
        torch.testing.assert_close(a, e, msg=name)
    torch.testing.assert_close(parts, reference.head_partial_sums(x, W_enc, b_dec, indices, 3))


@pytest.mark.parametrize("dtype", LOWP)
def test_sparse_encode_backward_low_precision(dtype):
    n, d_in, d_sae, k = 24, 40, 64, 6
    grad, indices = sparse_inputs(n, d_sae, k, torch.int64)
    W_enc, _, b_dec, _ = make_weights(d_in, d_sae)
    grad, x, W_enc, b_dec = (t.to(dtype) for t in (grad, randn(n, d_in), W_enc, b_dec))
    with on_triton():
        dx, dW_enc, db_enc, db_dec = torch.ops.fusedsae.sparse_encode_backward(grad, indices, x, W_enc, b_dec, True)
    base = reference.sparse_encode_backward(grad, indices, x, W_enc, b_dec, True)
    exact = reference.sparse_encode_backward(grad.double(), indices, x.double(), W_enc.double(), b_dec.double(), True)
    for name, a, b, e in zip(["dx", "dW_enc", "db_enc", "db_dec"], (dx, dW_enc, db_enc, db_dec), base, exact):
        assert_close_lowp(a, b, e, name)


# ---------------------------------------------------------------------------------------------------------------
# dense encoder, row TopK, JumpReLU, head partial sums
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["none", "relu", "jumprelu"])
@pytest.mark.parametrize("center", [True, False])
def test_encode_dense_and_gradients(activation, center):
    n, d_in, d_sae = 20, 13, 37
    x = randn(n, d_in)
    W_enc, b_enc, b_dec, _ = make_weights(d_in, d_sae)
    threshold = 0.4 * torch.rand(d_sae, device=DEVICE) - 0.1  # partly negative: the ReLU in JumpReLU matters
    g = randn(n, d_sae)
    b = b_dec if center else None
    inputs = [t.clone().requires_grad_() for t in (x, W_enc, b_enc)] + ([b.clone().requires_grad_()] if center else [])
    with on_triton():
        out = torch.ops.fusedsae.encode_dense(
            inputs[0], inputs[1], inputs[2], inputs[3] if center else None, threshold, activation
        )
        ours = torch.autograd.grad((out * g).sum(), inputs)
    torch.testing.assert_close(out, reference.encode_dense(x, W_enc, b_enc, b, threshold, activation))
    ref = [t.detach().double().requires_grad_() for t in inputs]
    p = naive.pre(ref[0], ref[1], ref[2], ref[3] if center else None)
    expected_out = {"none": p, "relu": torch.relu(p), "jumprelu": torch.relu(p) * (p > threshold)}[activation]
    expected = torch.autograd.grad((expected_out * g.double()).sum(), ref)
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e.float())


@pytest.mark.parametrize("dtype", LOWP)
def test_encode_dense_low_precision(dtype):
    n, d_in, d_sae = 20, 40, 48
    x, W_enc, b_enc, b_dec = (t.to(dtype) for t in (randn(n, d_in), *make_weights(d_in, d_sae)[:3]))
    with on_triton():
        out = torch.ops.fusedsae.encode_dense(x, W_enc, b_enc, b_dec, None, "relu")
    baseline = torch.relu((x - b_dec) @ W_enc + b_enc)
    exact = torch.relu(naive.pre(x.double(), W_enc.double(), b_enc.double(), b_dec.double()))
    assert_close_lowp(out, baseline, exact, "relu encoder")


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
def test_row_topk_matches_reference_with_ties(dtype):
    scores = torch.randint(-3, 4, (12, 150), device=DEVICE).to(dtype)
    scores[3] = 1.0  # one all-equal row
    for k in (1, 5, 16, 150, 140):  # 140 and 150: beyond the fused limit
        with on_triton():
            values, indices = F.row_topk(scores, k)
        expected_v, expected_i = reference.row_topk(scores, k)
        assert torch.equal(indices, expected_i), k
        assert torch.equal(values, expected_v), k


def test_row_topk_gradient_and_float_scores():
    scores = randn(9, 70).requires_grad_()
    with on_triton():
        values, indices = F.row_topk(scores, 7)
        (grad,) = torch.autograd.grad((values * torch.arange(7.0, device=DEVICE)).sum(), scores)
    expected_v, expected_i = reference.row_topk(scores.detach(), 7)
    assert torch.equal(indices, expected_i)
    torch.testing.assert_close(values, expected_v)
    expected_grad = torch.zeros_like(scores).scatter_(1, expected_i, torch.arange(7.0, device=DEVICE).expand(9, 7))
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("op", ["jumprelu", "step"])
def test_jumprelu_forward_and_straight_through_gradient(op):
    n, d_sae, bandwidth = 37, 45, 0.5
    p, threshold, g = randn(n, d_sae), torch.rand(d_sae, device=DEVICE) - 0.4, randn(n, d_sae)  # partly < 0
    pre, thr = p.clone().requires_grad_(), threshold.clone().requires_grad_()
    fn = F.jumprelu if op == "jumprelu" else F.step
    with on_triton():
        out = fn(pre, thr, bandwidth)
        d_pre, d_thr = torch.autograd.grad((out * g).sum(), (pre, thr), allow_unused=True)
    expected_out = naive.jumprelu(p.cpu(), threshold.cpu()) if op == "jumprelu" else (p > threshold).float().cpu()
    assert torch.equal(out.cpu(), expected_out)
    expected_thr = naive.jumprelu_threshold_grad(p.cpu(), threshold.cpu(), bandwidth, g.cpu(), l0=op == "step")
    torch.testing.assert_close(d_thr.cpu(), expected_thr)
    if op == "jumprelu":
        assert torch.equal(d_pre, g * ((p > threshold) & (p > 0)))
    else:
        assert d_pre is None or (d_pre == 0).all()


@pytest.mark.parametrize("dtype", LOWP)
def test_jumprelu_backward_low_precision(dtype):
    n, d_sae, bandwidth = 40, 33, 0.25
    p, threshold, g = (t.to(dtype) for t in (randn(n, d_sae), torch.rand(d_sae, device=DEVICE) - 0.3, randn(n, d_sae)))
    with on_triton():
        out = torch.ops.fusedsae.jumprelu(p, threshold, bandwidth)
        d_pre, d_thr = backends.call("jumprelu_backward", g, p, threshold, bandwidth)
        d_thr_l0 = backends.call("step_backward", g, p, threshold, bandwidth)
    assert torch.equal(out, reference.jumprelu(p, threshold))
    assert torch.equal(d_pre, reference.jumprelu_backward(g, p, threshold, bandwidth)[0])
    # the rectangle's membership is computed at the input precision, so the baseline and exact sums differ only
    # by the per-product rounding
    inside = reference.rectangle(p, threshold, bandwidth).double()
    exact = (-(threshold.double().clamp_min(0) / bandwidth) * inside * g.double()).sum(0)
    exact_l0 = (-(1.0 / bandwidth) * inside * g.double()).sum(0)
    assert_close_lowp(d_thr, reference.jumprelu_backward(g, p, threshold, bandwidth)[1], exact, "d threshold")
    assert_close_lowp(d_thr_l0, reference.step_backward(g, p, threshold, bandwidth), exact_l0, "d threshold (L0)")


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_head_partial_sums_match_reference(center, index_dtype):
    n, n_heads, d_head, d_sae, k = 9, 3, 7, 40, 5
    d_in = n_heads * d_head
    z = randn(n, d_in)
    W_enc, b_enc, b_dec, _ = make_weights(d_in, d_sae)
    with on_triton():
        code = F.topk_encode(z, W_enc, b_enc, b_dec, k=k)
        parts = F.head_partial_sums(z, W_enc, code.indices.to(index_dtype), n_heads, b_dec=b_dec if center else None)
    b = b_dec if center else None
    torch.testing.assert_close(parts, reference.head_partial_sums(z, W_enc, b, code.indices, n_heads))
    constant = b_enc if center else b_enc - b_dec @ W_enc
    p = reference.encode_pre(z, W_enc, b_enc, b_dec)
    torch.testing.assert_close(parts.sum(-1) + constant[code.indices], p.gather(1, code.indices))


@pytest.mark.parametrize("dtype", LOWP)
def test_head_partial_sums_low_precision(dtype):
    n, n_heads, d_sae, k = 12, 4, 48, 6
    z, W_enc, _, b_dec = (t.to(dtype) for t in (randn(n, 32), *make_weights(32, d_sae)[:3]))
    indices = torch.randint(0, d_sae, (n, k), device=DEVICE)
    with on_triton():
        parts = torch.ops.fusedsae.head_partial_sums(z, W_enc, b_dec, indices, n_heads)
    base = reference.head_partial_sums(z, W_enc, b_dec, indices, n_heads)
    exact = reference.head_partial_sums(z.double(), W_enc.double(), b_dec.double(), indices, n_heads)
    assert_close_lowp(parts, base, exact, "head partial sums")


# ---------------------------------------------------------------------------------------------------------------
# determinism switch, block configurations, opcheck
# ---------------------------------------------------------------------------------------------------------------


def test_determinism_switch(monkeypatch):
    monkeypatch.delenv("FUSEDSAE_DETERMINISTIC", raising=False)
    assert tt.deterministic()
    monkeypatch.setenv("FUSEDSAE_DETERMINISTIC", "0")
    assert not tt.deterministic()
    tt.set_deterministic(True)
    try:
        assert tt.deterministic()
        tt.set_deterministic(False)
        assert not tt.deterministic()
        torch.use_deterministic_algorithms(True)
        assert tt.deterministic()  # torch's switch wins
    finally:
        torch.use_deterministic_algorithms(False)
        tt.set_deterministic(None)


@pytest.fixture
def assumed_gpu():
    """The launchers' GPU block sizes and program counts, for a GPU of 2 SMs (so that splits and persistent loops
    occur at test sizes), run by the interpreter."""
    tt.assume_gpu(2)
    yield
    tt.assume_gpu(None)


@pytest.mark.skipif(GPU, reason="on a GPU the other tests run the GPU configurations compiled")
@pytest.mark.parametrize(("n", "k", "aux_k"), [(70, 5, 3), (40, 40, 3), (20, 100, 70)])
def test_gpu_block_configurations_in_the_interpreter(assumed_gpu, n, k, aux_k):
    """The launchers' GPU block sizes and split counts, run through the interpreter so that nothing depends on the
    interpreter's small blocks: 64-, 32- and 16-row blocks (by k), each with a partial last block, 128-wide tiles
    with masked columns, and splits of which the last ends past d_sae."""
    d_in, d_sae = 40, 300
    x = randn(n, d_in)
    W_enc, b_enc, b_dec, W_dec = make_weights(d_in, d_sae)
    mask = aux_mask_for(d_sae, aux_k)
    with on_triton():
        ours = torch.ops.fusedsae.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
        batch = torch.ops.fusedsae.batchtopk_encode(x, W_enc, b_enc, b_dec, k, 0, None)
        dense = torch.ops.fusedsae.encode_dense(x, W_enc, b_enc, b_dec, None, "relu")
        values, indices = ours[0], ours[1]
        decoded = torch.ops.fusedsae.sparse_decode(values, indices, W_dec, b_dec)
        g = randn(n, d_in)
        d_dec = torch.ops.fusedsae.sparse_decode_backward(g, values, indices, W_dec)
        d_enc = torch.ops.fusedsae.sparse_encode_backward(values, indices, x, W_enc, b_dec, True)
        top = torch.ops.fusedsae.row_topk(dense, 40)
        parts = torch.ops.fusedsae.head_partial_sums(x, W_enc, b_dec, indices, 4)
        thr, g_jump = torch.rand(d_sae, device=DEVICE), randn(n, d_sae)
        d_jump = backends.call("jumprelu_backward", g_jump, dense, thr, 0.5)
    expected = reference.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    assert_same_topk(ours, expected)
    expected_batch = reference.batchtopk_encode(x, W_enc, b_enc, b_dec, k, 0, None)
    assert torch.equal(batch[1], expected_batch[1])
    torch.testing.assert_close(dense, reference.encode_dense(x, W_enc, b_enc, b_dec, None, "relu"))
    torch.testing.assert_close(decoded, reference.sparse_decode(values, indices, W_dec, b_dec))
    assert_as_accurate_as_reference(d_dec, "sparse_decode_backward", (g, values, indices, W_dec), "decoder bwd")
    assert_as_accurate_as_reference(
        d_enc, "sparse_encode_backward", (values, indices, x, W_enc, b_dec, True), "encoder bwd"
    )
    assert torch.equal(top[1], reference.row_topk(dense, 40)[1])
    torch.testing.assert_close(parts, reference.head_partial_sums(x, W_enc, b_dec, indices, 4))
    assert torch.equal(d_jump[0], reference.jumprelu_backward(g_jump, dense, thr, 0.5)[0])
    assert_as_accurate_as_reference(d_jump, "jumprelu_backward", (g_jump, dense, thr, 0.5), "jumprelu bwd")


@pytest.mark.parametrize("op", sorted(backends.OPS))
def test_opcheck(op):
    """Schema, fake (shapes, dtypes, strides of the real outputs) and autograd registration with triton serving."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    with on_triton():
        torch.library.opcheck(
            getattr(torch.ops.fusedsae, op).default,
            opcheck_cases(torch.float32, DEVICE, "jumprelu")[op],
            test_utils=checks,
        )


@pytest.mark.parametrize("layout", ["hot latent", "uniform"])
def test_latent_sums_hot_latent_match_reference_and_repeat_bitwise(layout):
    # A latent that fires on every token spans several chunks of the sorted entry list (16 entries per chunk in
    # the interpreter): its pieces go through the combine pass. The uniform layout spreads the entries evenly.
    n, d_in, d_sae, k = 72, 19, 37, 4
    if layout == "hot latent":
        indices = torch.stack([torch.randperm(d_sae - 1, device=DEVICE)[: k - 1] + 1 for _ in range(n)])
        indices = torch.cat([torch.zeros(n, 1, dtype=torch.int64, device=DEVICE), indices], dim=1)
        indices = indices[:, torch.randperm(k, device=DEVICE)]
    else:
        indices = torch.stack([torch.randperm(d_sae, device=DEVICE)[:k] for _ in range(n)])
    grad, x, g = randn(n, k), randn(n, d_in), randn(n, d_in)
    W_enc, _, b_dec, W_dec = make_weights(d_in, d_sae)
    with on_triton():
        runs = [
            (
                torch.ops.fusedsae.sparse_encode_backward(grad, indices, x, W_enc, b_dec, False),
                torch.ops.fusedsae.sparse_decode_backward(g, grad, indices, W_dec),
            )
            for _ in range(2)
        ]
    expected_enc = reference.sparse_encode_backward(grad, indices, x, W_enc, b_dec, False)
    expected_dec = reference.sparse_decode_backward(g, grad, indices, W_dec)
    for name, a, e in zip(["dW_enc", "db_enc", "db_dec"], runs[0][0][1:], expected_enc[1:]):
        torch.testing.assert_close(a, e, msg=name)
    torch.testing.assert_close(runs[0][1][1], expected_dec[1], msg="dW_dec")
    first, again = (torch.cat([t.reshape(-1) for t in (*enc[1:], dec[1])]) for enc, dec in runs)
    assert torch.equal(first, again)


@pytest.mark.parametrize("path", ["fused", "wide"])
def test_auxk_with_fewer_eligible_latents_than_aux_k_matches_reference(monkeypatch, path):
    # Training asks for a fixed aux_k whatever the dead count (a static shape, no host read): the slots beyond the
    # eligible latents hold -inf at the lowest other indices, as the reference's masked fill ranks them. The fused
    # filter cannot find them (nothing beats -inf), so those rows go through the redo kernel.
    if path == "wide":
        monkeypatch.setattr(tt.topk, "FUSED_K_MAX", 4)  # aux_k = 5 then takes the two-pass path
    n, d_in, d_sae, k, aux_k = 9, 8, 40, 3, 5
    x = randn(n, d_in)
    W_enc, b_enc, b_dec, _ = make_weights(d_in, d_sae)
    mask = torch.zeros(d_sae, dtype=torch.bool, device=DEVICE)
    mask[[7, 30]] = True
    with on_triton():
        ours = torch.ops.fusedsae.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    expected = reference.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k, mask)
    assert torch.equal(ours[3], expected[3]) and torch.equal(ours[1], expected[1])
    torch.testing.assert_close(ours[2], expected[2])
    assert torch.isinf(ours[2][:, 2:]).all()

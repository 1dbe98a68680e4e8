"""Shared test configuration: deterministic per-test seeds, CPU threads, the tolerance rule, and GPU skips."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Without a GPU, the Triton kernels run in Triton's interpreter. triton 3.6 reads TRITON_INTERPRET when @triton.jit
# decorates a kernel, i.e. when fusedsae.kernels is first imported (lazily, by the dispatcher), so it is set here,
# before any test imports it. With a GPU the kernels are compiled and run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two threads, as on CI; tests that compare runs bit for bit must not depend on the machine's core count.
torch.set_num_threads(2)

FIXTURES = Path(__file__).resolve().parent / "fixtures"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> int:
    """Each test draws fresh random inputs from its own seed (its node id hashed, or FUSEDSAE_TEST_SEED mixed in
    for exploratory runs), so failures reproduce and different tests never share inputs."""
    salt = os.environ.get("FUSEDSAE_TEST_SEED", "0")
    seed = int(hashlib.sha256(f"{request.node.nodeid}:{salt}".encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    return seed


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their backend explicitly; an exported FUSEDSAE_BACKEND must not leak into them."""
    monkeypatch.delenv("FUSEDSAE_BACKEND", raising=False)


EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}


def assert_close_lowp(actual: torch.Tensor, baseline: torch.Tensor, exact: torch.Tensor, name: str = "") -> None:
    """STYLE §10 for low precision: the error of ``actual`` against the float64 ``exact`` result may be at most
    twice the error of ``baseline`` (the same computation done by plain PyTorch at the same precision), plus a
    floor of a few units in the last place of the result's scale, since the baseline can be exact by luck."""
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item()
    base = (baseline.double() - exact).abs().max().item()
    floor = 4 * EPS[actual.dtype] * max(1.0, exact.abs().max().item())
    assert err <= 2 * base + floor, f"{name}: error {err:.3e} > 2 x baseline error {base:.3e} + floor {floor:.1e}"


def make_weights(d_in: int, d_sae: int, dtype: torch.dtype = torch.float32, bias: float = 0.3, device="cpu"):
    """Random SAE weights ``(W_enc [d_in, d_sae], b_enc, b_dec, W_dec [d_sae, d_in])`` at the init's scale."""
    return (
        torch.randn(d_in, d_sae, dtype=dtype, device=device) / d_in**0.5,
        bias * torch.randn(d_sae, dtype=dtype, device=device),
        bias * torch.randn(d_in, dtype=dtype, device=device),
        torch.randn(d_sae, d_in, dtype=dtype, device=device) / d_in**0.5,
    )


def opcheck_cases(dtype: torch.dtype, device="cpu", activation: str = "relu") -> dict[str, tuple]:
    """Small arguments for ``torch.library.opcheck`` of every fusedsae op (inputs that carry gradients require
    them), shared by the reference, triton and cuda backends' tests."""
    x = torch.randn(4, 8, dtype=dtype, device=device)
    W_enc, b_enc, b_dec, W_dec = make_weights(8, 12, dtype, device=device)
    mask = torch.ones(12, dtype=torch.bool, device=device)
    values = torch.randn(4, 3, dtype=dtype, device=device)
    indices = torch.randint(0, 12, (4, 3), device=device)
    pre = torch.randn(4, 12, dtype=dtype, device=device)
    thr = torch.rand(12, dtype=dtype, device=device)
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    return {
        "encode_dense": (rg(x), rg(W_enc), rg(b_enc), rg(b_dec), thr, activation),
        "topk_encode": (rg(x), rg(W_enc), rg(b_enc), rg(b_dec), 3, 2, mask),
        "batchtopk_encode": (rg(x), rg(W_enc), rg(b_enc), rg(b_dec), 3, 2, mask),
        "sparse_encode_backward": (values, indices, x, W_enc, b_dec, True),
        "sparse_decode": (rg(values), indices, rg(W_dec), rg(b_dec)),
        "sparse_decode_backward": (torch.randn(4, 8, dtype=dtype, device=device), values, indices, W_dec),
        "row_topk": (rg(pre), 3),
        "jumprelu": (rg(pre), rg(thr), 0.3),
        "step": (rg(pre), rg(thr), 0.3),
        "jumprelu_backward": (pre, pre, thr, 0.3),
        "step_backward": (pre, pre, thr, 0.3),
        "head_partial_sums": (x, W_enc, b_dec, indices, 2),
        "matryoshka_decode_loss": (rg(values), indices, rg(W_dec), rg(b_dec), rg(x), [5, 12]),
        "matryoshka_decode_loss_backward": (
            torch.randn(4, 8, dtype=dtype, device=device),
            torch.randn(4, 2, dtype=dtype, device=device),
            values,
            indices,
            W_dec,
            x,
            torch.randn(4, 8, dtype=dtype, device=device),
            [5, 12],
        ),
    }


@pytest.fixture
def one_thread():
    """Torch on one CPU thread for the test: tiny models (the toy lab's) only pay for a second thread's
    synchronisation (9x slower on a loaded 2-core CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

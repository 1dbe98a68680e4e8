"""What the benchmarks time: the same SAE work done by each provider, built from one set of random inputs.

Providers: ``reference``, ``triton``, ``cuda`` (fusedsae under that backend), ``torch-unfused`` (the plain PyTorch
TopK SAE most codebases write: dense pre-activation, ``torch.topk``, dense decoder, dense backward), ``sae-lens`` and
``sparsify`` (the peer libraries' own TopK SAEs, when installed), and the floors ``gemm`` (one matrix product of the
encoder's shape) and ``copy`` (a device-to-device copy, for bandwidth).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from fusedsae import SparseAutoencoder, backends
from fusedsae import functional as F

FUSEDSAE_PROVIDERS = ("reference", "triton", "cuda")


@dataclass(frozen=True)
class Case:
    """One benchmark shape: N tokens, d_in, d_sae, k, dtype, device."""

    name: str
    n: int
    d_in: int
    d_sae: int
    k: int
    dtype: torch.dtype
    device: str

    @property
    def gemm_flops(self) -> float:
        return 2.0 * self.n * self.d_in * self.d_sae

    def describe(self) -> dict:
        return {
            "n": self.n,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
        }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def require_backend(name: str, op: str, *args) -> None:
    why = backends.refusal(name, op, args, explicit=True)
    if why is not None:
        pytest.skip(f"{name} cannot run {op} here: {why}")


def make_sae(case: Case) -> SparseAutoencoder:
    sae = SparseAutoencoder(
        d_in=case.d_in,
        d_sae=case.d_sae,
        activation="topk",
        k=case.k,
        aux_k=0,
        normalize_decoder=False,
        dtype=case.dtype,
        device=case.device,
    )
    sae.check_finite = False  # the peers do not check either; this is a speed comparison
    return sae


def inputs(case: Case) -> torch.Tensor:
    g = torch.Generator(device=case.device).manual_seed(0)
    return torch.randn(case.n, case.d_in, generator=g, device=case.device).to(case.dtype)


# ---------------------------------------------------------------------------------------------------------------
# full training step: forward, MSE loss, backward, Adam
# ---------------------------------------------------------------------------------------------------------------


class UnfusedTopK(torch.nn.Module):
    """The straightforward PyTorch TopK SAE (SAELens-style maths): every tensor dense."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        super().__init__()
        self.k = sae.cfg.k
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, torch.nn.Parameter(getattr(sae, name).detach().clone()))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        x_hat = acts @ self.W_dec + self.b_dec
        return (x_hat - x).pow(2).sum(-1).mean()


def _adam(params, device: str) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-4, fused=device.split(":")[0] in ("cpu", "cuda"))


def train_step(provider: str, case: Case) -> Callable[[], None]:
    """A closure running one training step of ``provider`` on ``case`` (and waiting for the device)."""
    x = inputs(case)
    sae = make_sae(case)
    if provider in FUSEDSAE_PROVIDERS:
        require_backend(provider, "topk_encode", x, sae.W_enc, sae.b_enc, sae.b_dec, case.k, 0, None)
        opt = _adam(sae.parameters(), case.device)

        def step() -> None:
            with backends.use(provider):
                out = sae.training_forward(x)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
            synchronize(case.device)

        return step
    if provider == "torch-unfused":
        model = UnfusedTopK(sae)
        opt = _adam(model.parameters(), case.device)

        def step() -> None:
            loss = model.loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            synchronize(case.device)

        return step
    if provider == "sae-lens":
        return _sae_lens_step(case, x)
    if provider == "sparsify":
        return _sparsify_step(case, x)
    raise ValueError(provider)


def _sae_lens_step(case: Case, x: torch.Tensor) -> Callable[[], None]:
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed")
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(
        d_in=case.d_in, d_sae=case.d_sae, k=case.k, dtype=str(case.dtype).split(".")[-1], device=case.device
    )
    model = TopKTrainingSAE(cfg)
    opt = _adam(model.parameters(), case.device)
    dead = torch.zeros(case.d_sae, dtype=torch.bool, device=case.device)
    del sae_lens

    def step() -> None:
        step_input = TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
        )
        out = model.training_forward_pass(step_input)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        synchronize(case.device)

    return step


def _sparsify_step(case: Case, x: torch.Tensor) -> Callable[[], None]:
    if case.device == "cpu":
        # sparsify takes its Triton decoder whenever triton imports, which fails without a GPU; its own switch
        # selects the eager embedding_bag path. It is read at import.
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    sparsify = pytest.importorskip("sparsify", reason="sparsify (eai-sparsify) is not installed")
    model = sparsify.SparseCoder(
        case.d_in, sparsify.SparseCoderConfig(num_latents=case.d_sae, k=case.k), device=case.device, dtype=case.dtype
    )
    opt = _adam(model.parameters(), case.device)

    def step() -> None:
        out = model(x)
        loss = out.fvu
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(case.device)

    return step


# ---------------------------------------------------------------------------------------------------------------
# single ops
# ---------------------------------------------------------------------------------------------------------------


def gemm(case: Case) -> Callable[[], None]:
    """The floor every encoder is compared with: ``x @ W_enc`` of the encoder's shape (cuBLAS / MKL)."""
    x = inputs(case)
    W = make_sae(case).W_enc.detach()

    def run() -> None:
        torch.mm(x, W)
        synchronize(case.device)

    return run


def encoder_topk(provider: str, case: Case) -> Callable[[], None]:
    x = inputs(case)
    sae = make_sae(case)
    W_enc, b_enc, b_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    if provider == "torch-unfused":

        def run() -> None:
            ((x - b_dec) @ W_enc + b_enc).topk(case.k, dim=-1)
            synchronize(case.device)

        return run
    require_backend(provider, "topk_encode", x, W_enc, b_enc, b_dec, case.k, 0, None)

    def run() -> None:
        with backends.use(provider):
            torch.ops.fusedsae.topk_encode(x, W_enc, b_enc, b_dec, case.k, 0, None)
        synchronize(case.device)

    return run


def decoder_fwd_bwd(provider: str, case: Case) -> Callable[[], None]:
    """Sparse decoder forward and backward (gradients of the values, W_dec and b_dec). ``autograd.grad`` returns
    fresh gradients each round; ``.backward()`` would add into ``.grad``, a dense extra pass over ``W_dec``."""
    g = torch.Generator(device=case.device).manual_seed(1)
    values = torch.rand(case.n, case.k, generator=g, device=case.device).to(case.dtype).requires_grad_()
    indices = torch.randint(0, case.d_sae, (case.n, case.k), generator=g, device=case.device)
    sae = make_sae(case)
    grad = inputs(case)
    if provider == "torch-unfused":

        def run() -> None:
            acts = torch.zeros(case.n, case.d_sae, device=case.device, dtype=case.dtype).scatter(-1, indices, values)
            out = acts @ sae.W_dec + sae.b_dec
            torch.autograd.grad(out, (values, sae.W_dec, sae.b_dec), grad)
            synchronize(case.device)

        return run
    require_backend(provider, "sparse_decode", values, indices, sae.W_dec, sae.b_dec)

    def run() -> None:
        with backends.use(provider):
            out = F.sparse_decode(values, indices, sae.W_dec, sae.b_dec)
            torch.autograd.grad(out, (values, sae.W_dec, sae.b_dec), grad)
        synchronize(case.device)

    return run


def encoder_backward(provider: str, case: Case) -> Callable[[], None]:
    """The encoder's backward in a training step (x needs no gradient): ``d W_enc``, ``d b_enc``, ``d b_dec`` from
    the gradient at the k active pre-activations per token. torch-unfused scatters it into a dense ``[N, d_sae]``
    gradient and runs a GEMM; fusedsae's sparse backward touches only the ``N*k`` active columns."""
    g = torch.Generator(device=case.device).manual_seed(2)
    grad = torch.randn(case.n, case.k, generator=g, device=case.device).to(case.dtype)
    indices = torch.randint(0, case.d_sae, (case.n, case.k), generator=g, device=case.device)
    x = inputs(case)
    sae = make_sae(case)
    W_enc, b_dec = sae.W_enc.detach(), sae.b_dec.detach()
    if provider == "torch-unfused":

        def run() -> None:
            dense = torch.zeros(case.n, case.d_sae, device=case.device, dtype=case.dtype).scatter(-1, indices, grad)
            (x - b_dec).t() @ dense
            db_enc = dense.sum(0)
            W_enc @ db_enc
            synchronize(case.device)

        return run
    require_backend(provider, "sparse_encode_backward", grad, indices, x, W_enc, b_dec, False)

    def run() -> None:
        with backends.use(provider):
            torch.ops.fusedsae.sparse_encode_backward(grad, indices, x, W_enc, b_dec, False)
        synchronize(case.device)

    return run


def decoder_bytes(case: Case) -> float:
    """Bytes a sparse decoder forward + backward must move at least: the active W_dec rows gathered twice (the
    forward, and d values) and the output gradient's rows gathered once more (dW_dec's per-latent sums), the dense
    dW_dec written, the output and its gradient, values and indices."""
    elt = torch.finfo(case.dtype).bits // 8
    rows = case.n * case.k * case.d_in * elt
    return 3 * rows + case.d_sae * case.d_in * elt + 2 * case.n * case.d_in * elt + case.n * case.k * (elt + 8)


def copy(case: Case) -> Callable[[], None]:
    """Device-to-device copy of a 1 GiB buffer (256 MiB on the CPU): the measured bandwidth ceiling."""
    size = (1 << 28) if case.device.startswith("cuda") else (1 << 26)
    src = torch.empty(size, dtype=torch.float32, device=case.device)
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)
        synchronize(case.device)

    run.bytes = 2 * src.numel() * 4  # type: ignore[attr-defined]
    return run

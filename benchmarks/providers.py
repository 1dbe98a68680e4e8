"""What the benchmarks time: the same SAE work done by each provider, built from one set of random inputs.

Providers: ``reference``, ``triton``, ``cuda`` (fusedsae under that backend), ``torch-unfused`` (the plain PyTorch
TopK SAE most codebases write: dense pre-activation, ``torch.topk``, dense decoder, dense backward), ``sae-lens`` and
``sparsify`` (the peer libraries' own TopK SAEs, when installed), and the floors ``gemm`` (one matrix product of the
encoder's shape) and ``copy`` (a device-to-device copy, for bandwidth).

Workloads are what users run (issue 8 item 8): the fusedsae training step is :class:`fusedsae.Trainer`'s own
``train_step`` with the Trainer's settings (AuxK at its default ``aux_k = d_in // 2``, normalised decoder, finite
check on, fused Adam, gradient clipping), and the activations have a realistic spread: a few hot latents and a long
tail, from a power law of firing rates (:func:`realistic`), whose measured profile is reported with the results.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from fusedsae import SparseAutoencoder, TrainConfig, Trainer, backends, reference
from fusedsae import functional as F
from fusedsae.diagnostics import count_host_syncs

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


@functools.lru_cache(maxsize=1)
def _base_sae(case: Case) -> SparseAutoencoder:
    """The case's SAE with the default (Trainer) settings and seeded weights: every provider and the realistic
    inputs start from the same weights (one copy cached: 2 GiB of bf16 weights at 4096 -> 131072)."""
    sae = SparseAutoencoder(
        d_in=case.d_in, d_sae=case.d_sae, activation="topk", k=case.k, dtype=case.dtype, device=case.device
    )
    sae.reset_parameters(generator=torch.Generator().manual_seed(0))
    return sae


def make_sae(case: Case) -> SparseAutoencoder:
    """A fresh copy of the case's SAE as the Trainer builds it: ``aux_k = d_in // 2``, normalised decoder, finite
    check on (unless ``FUSEDSAE_CHECK_FINITE=0``)."""
    return _copy.deepcopy(_base_sae(case))


def release() -> None:
    """Drops the cached SAE and realistic batch (a few GiB at the large shape) before the next case."""
    _base_sae.cache_clear()
    realistic.cache_clear()


def inputs(case: Case) -> torch.Tensor:
    """Gaussian inputs: no latent prefers any token (the uniform-firing control)."""
    g = torch.Generator(device=case.device).manual_seed(0)
    return torch.randn(case.n, case.d_in, generator=g, device=case.device).to(case.dtype)


# ---------------------------------------------------------------------------------------------------------------
# realistic activations: a power law of firing rates
# ---------------------------------------------------------------------------------------------------------------

ALPHA = 0.8  # firing probability of the latent of rank r ~ r^-ALPHA (a few hot latents, a long tail)


@dataclass
class Realistic:
    """A batch whose latents fire with power-law rates, and the case SAE's own TopK selection on it.

    Attributes:
        x: ``[n, d_in]`` inputs in the case's dtype.
        indices: ``[n, k]`` int64, the latents the SAE selects on ``x`` (what its backwards see).
        profile: the measured firing distribution (:func:`firing_profile`).
    """

    x: torch.Tensor
    indices: torch.Tensor
    profile: dict = field(default_factory=dict)


def power_law_draws(n: int, d_sae: int, k: int, alpha: float, device: str, seed: int = 0) -> torch.Tensor:
    """``[n, k]`` latent ids drawn with replacement with probability ~ rank^-alpha, the ranks a random
    permutation of the latents (hot latents sit anywhere, as in a trained SAE, not at the first columns)."""
    g = torch.Generator(device=device).manual_seed(seed)
    ranks = torch.arange(1, d_sae + 1, device=device, dtype=torch.float64)
    p = ranks.pow(-alpha)
    p = p[torch.randperm(d_sae, generator=g, device=device)]
    return torch.multinomial(p.float(), n * k, replacement=True, generator=g).reshape(n, k)


def firing_profile(indices: torch.Tensor, values: torch.Tensor | None, d_sae: int) -> dict:
    """The firing distribution of a sparse code ``indices [n, k]`` (entries with ``values <= 0`` do not fire):
    the hottest rates, how many latents fire on >10% / >1% of tokens, the share that never fires, and the slope of
    log(rate) against log(rank) over ranks 10..d_sae/10 (a power law r^-a has slope -a)."""
    n = indices.shape[0]
    fired = indices.reshape(-1) if values is None else indices.reshape(-1)[values.reshape(-1) > 0]
    counts = torch.zeros(d_sae, dtype=torch.float64, device=indices.device)
    counts.index_add_(0, fired, torch.ones_like(fired, dtype=torch.float64))
    rates = (counts / n).sort(descending=True).values.cpu()
    lo, hi = 10, max(11, min(d_sae // 10, int((rates > 0).sum())))
    slope = float("nan")
    if hi - lo >= 4:
        r = torch.arange(lo, hi, dtype=torch.float64)
        y = rates[lo - 1 : hi - 1].clamp_min(1e-12).log()
        lx = r.log()
        slope = float(((lx - lx.mean()) * (y - y.mean())).sum() / (lx - lx.mean()).pow(2).sum())
    return {
        "top_rates": [round(float(v), 4) for v in rates[:5]],
        "latents_over_10pct": int((rates > 0.10).sum()),
        "latents_over_1pct": int((rates > 0.01).sum()),
        "never_fired_frac": round(float((rates == 0).double().mean()), 4),
        "loglog_slope": round(slope, 3),
    }


@functools.lru_cache(maxsize=1)
def realistic(case: Case, alpha: float = ALPHA) -> Realistic:
    """Inputs built from the case SAE's own decoder rows: each token is the sum of k rows drawn by the power law,
    with amplitudes U(1, 2), plus Gaussian noise at 5% of the signal's scale. Since ``W_enc = W_dec^T`` at init,
    the drawn latents are the ones the SAE selects, so its firing rates follow the power law (checked: the profile
    is measured on the SAE's actual selection)."""
    sae = _base_sae(case)
    g = torch.Generator(device=case.device).manual_seed(1)
    draws = power_law_draws(case.n, case.d_sae, case.k, alpha, case.device)
    amp = 1.0 + torch.rand(case.n, case.k, generator=g, device=case.device)
    with torch.no_grad():
        W = sae.W_dec.detach().float()
        x = torch.nn.functional.embedding_bag(draws, W, per_sample_weights=amp, mode="sum")
        x += 0.05 * math.sqrt(case.k) * torch.randn(x.shape, generator=g, device=case.device) / math.sqrt(case.d_in)
        x = x.to(case.dtype)
        del W
        # the reference backend selects (the oracle: a broken kernel under test must not change the workload), in
        # chunks of 1 GiB of fp32 pre-activations
        rows = max(1, (1 << 28) // (4 * case.d_sae))
        with backends.use("reference"):
            W_enc, b_enc, b_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()
            code = [F.topk_encode(x[i : i + rows], W_enc, b_enc, b_dec, k=case.k) for i in range(0, case.n, rows)]
    values = torch.cat([c.values for c in code])
    indices = torch.cat([c.indices for c in code])
    return Realistic(x, indices, {"alpha": alpha, **firing_profile(indices, values, case.d_sae)})


def dead_mask(case: Case, fraction: float) -> torch.Tensor:
    """``[d_sae]`` bool: the ``fraction`` of latents that fire least on the realistic batch (dead latents are the
    tail's, in a real run), ties broken at random."""
    idx = realistic(case).indices.reshape(-1)
    counts = torch.zeros(case.d_sae, device=case.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float))
    g = torch.Generator(device=case.device).manual_seed(3)
    order = torch.argsort(counts + 0.5 * torch.rand(case.d_sae, generator=g, device=case.device))
    mask = torch.zeros(case.d_sae, dtype=torch.bool, device=case.device)
    mask[order[: round(fraction * case.d_sae)]] = True
    return mask


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


class _Batches:
    """The data source a Trainer needs: the realistic batch, every step."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.d_in = x.shape[1]

    def next_batch(self) -> torch.Tensor:
        return self.x


def trainer(case: Case, x: torch.Tensor | None = None) -> Trainer:
    """A :class:`fusedsae.Trainer` on the case SAE with the default TrainConfig (only ``b_dec_init="keep"``: the
    geometric median of the first batch is a one-off, and the benchmark's first step is a warm-up anyway)."""
    x = realistic(case).x if x is None else x
    cfg = TrainConfig(batch_size=case.n, b_dec_init="keep", progress=False, log_every=10**9, checkpoint_every=0)
    return Trainer(make_sae(case), _Batches(x), cfg)


def train_step(provider: str, case: Case, dead_fraction: float = 0.0) -> Callable[[], None]:
    """A closure running one training step of ``provider`` on the realistic batch (and waiting for the device).

    fusedsae providers run ``Trainer.train_step`` under that backend; ``dead_fraction`` of the latents (the tail's)
    are kept dead before every step, so AuxK runs at its default ``aux_k`` over them."""
    x = realistic(case).x
    if provider in FUSEDSAE_PROVIDERS:
        tr = trainer(case, x)
        sae = tr.sae
        require_backend(provider, "topk_encode", x, sae.W_enc, sae.b_enc, sae.b_dec, case.k, 0, None)
        if dead_fraction:
            dead = dead_mask(case, dead_fraction)
            require_backend(provider, "topk_encode", x, sae.W_enc, sae.b_enc, sae.b_dec, case.k, sae.cfg.aux_k, dead)
        # tokens since each latent last fired: the dead ones at the Trainer's threshold, the others at 0
        since = dead_mask(case, dead_fraction).long() * tr.cfg.dead_tokens

        def step() -> None:
            tr.tokens_since_fired = since.clone()
            with backends.use(provider):
                out = tr.train_step(x)
            # what ran, for tests: the loss terms as device scalars (reading them here would be a host sync)
            step.losses = {k: v.detach() for k, v in out.losses.items()}  # type: ignore[attr-defined]
            synchronize(case.device)

        return step
    if provider == "torch-unfused":
        model = UnfusedTopK(make_sae(case))
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


@contextlib.contextmanager
def as_on_a_gpu() -> Iterator[None]:
    """The reference backend reads CPU tensors on the host where that saves work (``reference.CPU_HOST_READS``,
    where it exists): free on the CPU, a stall on a GPU. Sync counts on the CPU are taken with it off, so they
    report what the same step does on a GPU."""
    saved = getattr(reference, "CPU_HOST_READS", None)
    if saved is not None:
        reference.CPU_HOST_READS = False
    try:
        yield
    finally:
        if saved is not None:
            reference.CPU_HOST_READS = saved


def step_profile(step: Callable[[], None], device: str) -> dict:
    """What one (already warmed-up) call of ``step`` costs besides time: the operations that synchronise the host
    on CUDA (:class:`fusedsae.diagnostics.HostSyncCounter`, counted as on a GPU) and, on CUDA, the peak memory
    allocated."""
    with as_on_a_gpu():
        syncs = count_host_syncs(step)
    out: dict = {"host_syncs": syncs.count, "sync_ops": dict(syncs.by_op)}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return out


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
    W = _base_sae(case).W_enc.detach()

    def run() -> None:
        torch.mm(x, W)
        synchronize(case.device)

    return run


def encoder_topk(provider: str, case: Case, aux: bool = False) -> Callable[[], None]:
    """The encoder with TopK selection on the realistic batch; with ``aux`` also the AuxK selection at the default
    ``aux_k`` among 20% dead latents (what the Trainer's step asks of the encoder once latents die)."""
    x = realistic(case).x
    sae = make_sae(case)
    W_enc, b_enc, b_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    dead = dead_mask(case, 0.2) if aux else None
    aux_k = min(sae.cfg.aux_k, int(dead.sum())) if dead is not None else 0
    if provider == "torch-unfused":

        def run() -> None:
            pre = (x - b_dec) @ W_enc + b_enc
            pre.topk(case.k, dim=-1)
            if aux_k:
                pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1)
            synchronize(case.device)

        return run
    require_backend(provider, "topk_encode", x, W_enc, b_enc, b_dec, case.k, aux_k, dead)

    def run() -> None:
        with backends.use(provider):
            F.topk_encode(x, W_enc, b_enc, b_dec, k=case.k, aux_k=aux_k, aux_mask=dead)
        synchronize(case.device)

    return run


def _latents(case: Case, latents: str, seed: int) -> torch.Tensor:
    """``[n, k]`` active latents: ``"uniform"`` (each latent equally likely) or ``"power-law"`` (the case SAE's
    selection on the realistic batch: a few latents in a large share of the rows)."""
    if latents == "power-law":
        return realistic(case).indices
    if latents != "uniform":
        raise ValueError(latents)
    g = torch.Generator(device=case.device).manual_seed(seed)
    return torch.randint(0, case.d_sae, (case.n, case.k), generator=g, device=case.device)


def decoder_fwd_bwd(provider: str, case: Case, latents: str = "uniform") -> Callable[[], None]:
    """Sparse decoder forward and backward (gradients of the values, W_dec and b_dec). ``autograd.grad`` returns
    fresh gradients each round; ``.backward()`` would add into ``.grad``, a dense extra pass over ``W_dec``."""
    g = torch.Generator(device=case.device).manual_seed(1)
    values = torch.rand(case.n, case.k, generator=g, device=case.device).to(case.dtype).requires_grad_()
    indices = _latents(case, latents, seed=1)
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


def encoder_backward(provider: str, case: Case, latents: str = "uniform") -> Callable[[], None]:
    """The encoder's backward in a training step (x needs no gradient): ``d W_enc``, ``d b_enc``, ``d b_dec`` from
    the gradient at the k active pre-activations per token. torch-unfused scatters it into a dense ``[N, d_sae]``
    gradient and runs a GEMM; fusedsae's sparse backward touches only the ``N*k`` active columns. With
    ``latents="power-law"`` a few latents own a large share of the entries: a per-latent sum that one program
    walks serially shows up here."""
    g = torch.Generator(device=case.device).manual_seed(2)
    grad = torch.randn(case.n, case.k, generator=g, device=case.device).to(case.dtype)
    indices = _latents(case, latents, seed=2)
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

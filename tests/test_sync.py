"""A TopK training step reads nothing back to the host (docs/architecture.md#sync): every op that would make the CPU
wait for a CUDA stream is counted while a Trainer step runs, on the CPU, with the reference backend and with the triton
backend in the interpreter. The count must be zero. On a GPU the step is also captured in a CUDA graph and replayed,
which fails outright on any synchronisation, and must reproduce the eager step."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedsae
from conftest import requires_cuda
from fusedsae import backends, reference
from fusedsae.data import TensorSource
from fusedsae.diagnostics import HostSyncCounter
from fusedsae.functional import auxk_reconstruction


def test_counter_sees_what_syncs():
    x = torch.randn(8)
    with HostSyncCounter() as counter:
        float(x.sum())
        x[x > 0] = 0
        torch.bincount(torch.tensor([1, 2]))
        torch.topk(x, 3)
        x[torch.tensor([1, 2])] = 1.0
    assert counter.by_op == Counter({"aten._local_scalar_dense": 1, "aten.index_put_": 1, "aten.bincount": 1})


def _trainer(activation: str, aux_k: int, k: int = 3) -> fusedsae.Trainer:
    """A Trainer whose every third latent has been idle for long (dead), with a dead window of 8 steps: its dead
    bound is refreshed every 2 steps (steps 0, 2, ...), so step 1 runs on the bound of step 0."""
    d_in, d_sae, batch = 16, 64, 24
    sae = fusedsae.SparseAutoencoder(d_in=d_in, d_sae=d_sae, activation=activation, k=k, aux_k=aux_k)
    data = TensorSource(torch.randn(4 * batch, d_in), batch)
    cfg = fusedsae.TrainConfig(steps=4, batch_size=batch, log_every=4, dead_tokens=8 * batch, progress=False)
    trainer = fusedsae.Trainer(sae, data, cfg)
    trainer.tokens_since_fired[::3] = 10**6
    return trainer


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_topk_trainer_step_issues_no_host_sync(monkeypatch, backend):
    # The Trainer's settings: AuxK at its default width (d_in / 2), normalised decoder, the finite check, Adam,
    # gradient clipping, dead latents.
    monkeypatch.setattr(reference, "CPU_HOST_READS", False)  # what the reference runs on a GPU
    if backend == "triton":
        pytest.importorskip("triton")
    trainer = _trainer("topk", aux_k=8)
    sae = trainer.sae
    assert sae.cfg.normalize_decoder and sae.check_finite
    with backends.use(backend):
        trainer.train_step(trainer.data.next_batch())  # the first step sets b_dec and the dead bound: host reads
        assert bool(trainer.dead_mask().any())
        x = trainer.data.next_batch()
        with HostSyncCounter() as counter:
            out = trainer.train_step(x)
    assert "auxiliary_reconstruction_loss" in out.losses and float(out.n_dead) > 0
    assert dict(counter.by_op) == {}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_batchtopk_trainer_step_reads_the_host_once(monkeypatch, backend):
    # BatchTopK's output width is the largest number of active latents in a row: one read (docs/architecture.md#sync).
    # (The triton backend's per-row candidates, 2k wide, cover all 64 latents at k = 32: no row needs refining, which
    # would cost two more reads per round.)
    monkeypatch.setattr(reference, "CPU_HOST_READS", False)
    if backend == "triton":
        pytest.importorskip("triton")
    trainer = _trainer("batchtopk", aux_k=8, k=32)
    with backends.use(backend):
        trainer.train_step(trainer.data.next_batch())
        x = trainer.data.next_batch()
        with HostSyncCounter() as counter:
            trainer.train_step(x)
    assert sum(counter.by_op.values()) == 1, counter.by_op  # int(tensor): aten.item


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("capacity", [None, 64, 4])  # sparse (width 64 > 16 x aux_k 2), dense with selection, dense
def test_auxk_paths_issue_no_host_sync(monkeypatch, backend, capacity):
    monkeypatch.setattr(reference, "CPU_HOST_READS", False)
    if backend == "triton":
        pytest.importorskip("triton")
    d_in, d_sae, n = 12, 64, 10
    sae = fusedsae.SparseAutoencoder(d_in=d_in, d_sae=d_sae, activation="topk", k=2, aux_k=2)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[[3, 40, 41]] = True
    with backends.use(backend), HostSyncCounter() as counter:
        out = sae.training_forward(torch.randn(n, d_in), dead_mask=dead, dead_capacity=capacity, defer_checks=True)
        out.loss.backward()
    assert dict(counter.by_op) == {}


def test_nonfinite_inputs_are_counted_on_the_device_and_raised_at_the_log_step(monkeypatch):
    monkeypatch.setattr(reference, "CPU_HOST_READS", False)
    trainer = _trainer("topk", aux_k=8)
    x = trainer.data.next_batch()
    trainer.train_step(x)
    x = trainer.data.next_batch().clone()
    x[3, 5] = float("nan")
    x[4, 1] = float("inf")
    with HostSyncCounter() as counter:
        out = trainer.train_step(x)
    assert dict(counter.by_op) == {} and int(out.nonfinite) == 2
    with pytest.raises(ValueError, match=r"held 2 non-finite value\(s\) .* up to step 2"):
        trainer.check_inputs_finite()
    trainer.check_inputs_finite()  # counted once


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("capacity", [None, 64, 8, 3])
def test_auxk_reconstruction_matches_the_reference_selection_with_gradients(backend, capacity):
    # dense with no selection (width 3 = dead count = aux_k), dense with selection (8, 64) and sparse (None: width
    # 64 > 16 x aux_k): all equal relu(top aux_k among dead) @ W_dec, in value and in every gradient. float64 on
    # the reference; float32 on triton (which takes no float64), against the same maths in float64.
    if backend == "triton":
        pytest.importorskip("triton")
    d_in, d_sae, n, aux_k = 10, 64, 14, 3
    dt = torch.float64 if backend == "reference" else torch.float32
    W_enc, b_enc, b_dec = torch.randn(d_in, d_sae, dtype=dt), torch.randn(d_sae, dtype=dt), torch.randn(d_in, dtype=dt)
    W_dec, x = torch.randn(d_sae, d_in, dtype=dt), torch.randn(n, d_in, dtype=dt)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[[5, 17, 60]] = True
    if capacity is None or capacity > 3:
        dead[torch.randperm(d_sae)[:2]] = True  # up to 5 dead: the selection matters
    params = [t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec, W_dec)]
    cap = capacity if capacity is None or capacity >= int(dead.sum()) else int(dead.sum())
    with backends.use(backend):
        out = auxk_reconstruction(x, *params[:3], params[3], dead, aux_k, cap)
        g = torch.randn_like(out)
        grads = torch.autograd.grad((out * g).sum(), params)
    x, g = x.double(), g.double()
    ref = [t.double().requires_grad_() for t in (W_enc, b_enc, b_dec, W_dec)]
    pre = (x - ref[2]) @ ref[0] + ref[1]
    masked = pre.masked_fill(~dead, float("-inf"))
    _, chosen = reference.row_topk(masked.detach(), min(aux_k, int(dead.sum())))
    acts = torch.zeros_like(pre).scatter(1, chosen, torch.relu(masked.gather(1, chosen)))
    expected = acts @ ref[3]
    expected_grads = torch.autograd.grad((expected * g).sum(), ref)
    torch.testing.assert_close(out, expected.to(dt))
    for name, a, e in zip(["W_enc", "b_enc", "b_dec", "W_dec"], grads, expected_grads):
        torch.testing.assert_close(a, e.to(dt), msg=name)
        if name in ("W_enc", "W_dec"):  # AuxK trains the dead latents only
            live = ~dead
            assert (a[:, live] if name == "W_enc" else a[live]).abs().sum() == 0


@requires_cuda
def test_topk_step_replays_in_a_cuda_graph_like_eager():
    torch.manual_seed(0)
    d_in, d_sae, n = 64, 1024, 256
    sae = fusedsae.SparseAutoencoder(d_in=d_in, d_sae=d_sae, activation="topk", k=8, device="cuda")
    params = list(sae.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, fused=True, capturable=True)
    dead = torch.zeros(d_sae, dtype=torch.bool, device="cuda")
    dead[::7] = True
    x = torch.randn(n, d_in, device="cuda")

    def step() -> torch.Tensor:
        out = sae.training_forward(x, dead_mask=dead, dead_capacity=256, defer_checks=True)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sae.normalize_decoder_rows()
        return out.loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up: kernels compiled, optimizer state allocated
            step()
    torch.cuda.current_stream().wait_stream(side)
    start = {k: v.clone() for k, v in sae.state_dict().items()}
    opt_start = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss = step()
    # eager from the same state
    sae.load_state_dict(start)
    for p in params:
        for k, v in opt_start[id(p)].items():
            opt.state[p][k].copy_(v)
    eager_loss = step()
    eager = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.load_state_dict(start)
    for p in params:
        for k, v in opt_start[id(p)].items():
            opt.state[p][k].copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_loss, eager_loss)
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(v, eager[k], msg=k)


class SortCounter(TorchDispatchMode):
    """Counts sorts of a 1-D int32 tensor: the grouping of entries by latent (reference.latent_segments)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fusedsae":
            with self:
                return backends.call(func.overloadpacket.__name__, *args, *kwargs.values())
        if func.overloadpacket.__name__ == "sort" and args[0].dim() == 1 and args[0].dtype == torch.int32:
            self.sizes.append(args[0].numel())
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decoder_and_encoder_backward_share_one_sort(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    trainer = _trainer("topk", aux_k=8)
    with backends.use(backend):
        trainer.train_step(trainer.data.next_batch())
        with SortCounter() as counter:
            trainer.train_step(trainer.data.next_batch())
    assert counter.sizes == [24 * 3]  # batch x k entries, grouped once for dW_dec, dW_enc and db_enc

"""The host-sync counter (fusedsae.diagnostics): each op that waits for the GPU is counted once, ops that do not are
not, and ops inside fusedsae's registered ops are seen."""

from __future__ import annotations

import pytest
import torch

from fusedsae import backends, ops
from fusedsae.diagnostics import HostSyncCounter, count_host_syncs

x = torch.randn(10)
mask = torch.tensor([True, False] * 5)
counts = torch.tensor([1, 2])

SYNCING = {
    "item": lambda: x.sum().item(),
    "bool": lambda: bool(x.sum() > 0),
    "int": lambda: int(x.argmax()),
    "nonzero": lambda: x.nonzero(),
    "mask index": lambda: x[mask],
    "mask assign": lambda: x.clone().__setitem__(mask, 0.0),
    "masked_select": lambda: x.masked_select(mask),
    "bincount": lambda: torch.bincount(counts),
    "repeat_interleave": lambda: torch.repeat_interleave(counts),
    "unique": lambda: torch.unique(x),
    "equal": lambda: torch.equal(x, x),
}

SYNC_FREE = {
    "topk": lambda: x.topk(3),
    "index with ints": lambda: x[counts],
    "repeat_interleave with output_size": lambda: torch.repeat_interleave(counts, output_size=3),
    "where": lambda: torch.where(mask, x, 0.0),
    "searchsorted": lambda: torch.searchsorted(counts, counts),
}


@pytest.mark.parametrize("name", SYNCING)
def test_counts_each_syncing_op_once(name):
    counter = count_host_syncs(SYNCING[name])
    assert counter.count == 1, (name, dict(counter.by_op))


@pytest.mark.parametrize("name", SYNC_FREE)
def test_sync_free_ops_are_not_counted(name):
    counter = count_host_syncs(SYNC_FREE[name])
    assert counter.count == 0, (name, dict(counter.by_op))


@torch.library.custom_op("fusedsae_test::scale_by_max", mutates_args=())
def _scale_by_max(t: torch.Tensor) -> torch.Tensor:
    """A registered op that reads a value back to the host inside its implementation, as a launcher might."""
    return t / float(t.abs().max())


@_scale_by_max.register_fake
def _(t):
    return torch.empty_like(t)


def test_sees_inside_registered_ops():
    """A plain dispatch mode is switched off while it handles an op, so it would see ``fusedsae_test::scale_by_max``
    but not the scalar read inside it; the counter re-enters itself around registered ops."""
    counter = count_host_syncs(lambda: _scale_by_max(x))
    assert counter.count == 1, dict(counter.by_op)  # item or _local_scalar_dense, as the dispatcher routes it
    # and a real fusedsae op still computes its result under the counter
    with backends.use("reference"), HostSyncCounter():
        got = ops.sparse_decode(x.reshape(5, 2), counts.repeat(5, 1), torch.eye(3), None)
    torch.testing.assert_close(got, ops.sparse_decode(x.reshape(5, 2), counts.repeat(5, 1), torch.eye(3), None))


def test_reset_and_reuse():
    counter = HostSyncCounter()
    with counter:
        x.sum().item()
    assert counter.count == 1
    counter.reset()
    with counter:
        x.topk(2)
    assert counter.count == 0 and not counter.by_op


def test_counts_host_reads_that_dispatch_nothing_on_the_cpu():
    """``tolist()``/``numpy()`` of a CPU tensor dispatch no ATen op (a plain dispatch mode misses them); on a GPU
    they are device-to-host copies. The counter wraps them while active and puts the methods back afterwards."""
    methods = torch.Tensor.tolist, torch.Tensor.numpy
    counter = count_host_syncs(lambda: (x.tolist(), x.numpy(), x[:2].tolist()))
    assert dict(counter.by_op) == {"Tensor.tolist": 2, "Tensor.numpy": 1}
    assert (torch.Tensor.tolist, torch.Tensor.numpy) == methods
    assert count_host_syncs(lambda: x.sum()).count == 0

"""Data sources: any iterable of [n, d_in] tensors trains, --data specs are built by the data layer, a batch the
source cannot fill is an error, and resuming without a state_dict says so."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import fusedsae
from fusedsae import toy
from fusedsae.data import (
    DataError,
    IterableSource,
    ResumeWarning,
    TensorSource,
    ToySource,
    as_source,
    from_spec,
)

D_IN = 8


def _sae(d_in: int = D_IN) -> fusedsae.SparseAutoencoder:
    return fusedsae.SparseAutoencoder(d_in=d_in, d_sae=32, activation="topk", k=2)


def _cfg(**kwargs) -> fusedsae.TrainConfig:
    settings = {"steps": 3, "batch_size": 16, "progress": False, "log_every": 1} | kwargs
    return fusedsae.TrainConfig(**settings)


def test_iterable_source_recuts_items_into_exact_batches_in_order():
    items = [torch.randn(n, D_IN) for n in (5, 11, 3, 16, 7)]  # 42 rows: two batches of 16, 10 rows left over
    source = IterableSource(items, 16)
    assert source.d_in == D_IN
    rows = torch.cat(items)
    first, second = source.next_batch(), source.next_batch()
    assert torch.equal(first, rows[:16]) and torch.equal(second, rows[16:32])
    # the pass's last 10 rows cannot fill a batch: a re-iterable list starts its next pass
    assert torch.equal(source.next_batch(), rows[:16])


def test_a_generator_and_a_dataloader_train():
    def generator():
        while True:
            yield torch.randn(16, D_IN)

    trainer = fusedsae.Trainer(_sae(), generator(), _cfg())
    assert trainer.train()["step"] == 3
    dataset = torch.utils.data.TensorDataset(torch.randn(100, D_IN))  # yields [tensor] items
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
    metrics = fusedsae.Trainer(_sae(), loader, _cfg(steps=20)).train()  # 6 batches of 16 per pass: 3 passes
    assert metrics["step"] == 20 and metrics["tokens"] == 20 * 16


def test_a_batch_the_source_cannot_fill_is_an_error():
    with pytest.raises(DataError, match="256 activations cannot fill one batch of 512"):
        fusedsae.Trainer(_sae(), torch.randn(256, D_IN), _cfg(batch_size=512))
    data = toy.SparseFeatureData(d_in=D_IN, n_features=16, mean_active=2.0)
    with pytest.raises(DataError, match="batches of 256 rows but training asks for batch_size=512"):
        fusedsae.Trainer(_sae(), ToySource(data, 256), _cfg(batch_size=512))
    with pytest.raises(DataError, match="one pass over the data gives 10 rows, fewer than batch_size=16"):
        fusedsae.Trainer(_sae(), [torch.randn(10, D_IN)], _cfg()).train()
    one_shot = (torch.randn(16, D_IN) for _ in range(2))
    with pytest.raises(DataError, match="ran out after 2 batch"):
        fusedsae.Trainer(_sae(), one_shot, _cfg()).train()

    class Short(ToySource):  # declares 16 rows, delivers fewer at its third batch
        def next_batch(self):
            batch = super().next_batch()
            return batch[:9] if self.index == 3 else batch

    with pytest.raises(DataError, match=r"batch of shape \(9, 8\) at step 2"):
        fusedsae.Trainer(_sae(), Short(data, 16), _cfg()).train()


def test_bad_items_name_what_is_wrong():
    with pytest.raises(DataError, match="yielded no batches"):
        IterableSource([], 4)
    with pytest.raises(DataError, match=r"item 0 .* shape \(2, 3, 8\)"):
        IterableSource([torch.randn(2, 3, D_IN)], 4)
    with pytest.raises(DataError, match="item 1 .* has 5 columns but the first one had d_in=8"):
        IterableSource([torch.randn(2, D_IN), torch.randn(2, 5)], 4).next_batch()
    with pytest.raises(DataError, match="is a str"):
        IterableSource(["text"], 4)
    with pytest.raises(DataError, match="cannot train on a int"):
        as_source(3, 4)
    with pytest.raises(DataError, match="the data has d_in=8 but the SAE expects d_in=6"):
        fusedsae.Trainer(_sae(6), torch.randn(64, D_IN), _cfg())


def test_resume_without_a_state_dict_is_stated_and_skips_the_used_batches():
    items = [torch.randn(16, D_IN) for _ in range(6)]
    source = IterableSource(items, 16)
    for _ in range(4):
        source.next_batch()
    state = source.state_dict()
    fresh = IterableSource(items, 16)
    with pytest.warns(ResumeWarning, match="no state_dict/load_state_dict: resuming skips the 4 batch"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch(), items[4])


def test_resume_uses_the_iterables_own_state_dict():
    class Stateful:
        """An iterable that knows where it is (as torchdata's StatefulDataLoader)."""

        def __init__(self, items):
            self.items, self.start = items, 0

        def __iter__(self):
            for i in range(self.start, len(self.items)):
                self.start = i + 1
                yield self.items[i]
            self.start = 0

        def state_dict(self):
            return {"start": self.start}

        def load_state_dict(self, state):
            self.start = state["start"]

    items = [torch.randn(16, D_IN) for _ in range(6)]
    source = IterableSource(Stateful(items), 16)
    for _ in range(3):
        source.next_batch()
    state = source.state_dict()
    assert state["iterable"] == {"start": 3}
    fresh = IterableSource(Stateful(items), 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: the iterable restores its own position
        fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch(), items[3])


def test_a_trainer_resumes_an_iterable_run_exactly(tmp_path):
    """A deterministic list without a state_dict: the resumed run (with the warning) matches an uninterrupted one."""
    items = [torch.randn(16, D_IN) for _ in range(5)]
    cfg = _cfg(steps=6, run_dir=str(tmp_path / "a"), checkpoint_every=3, b_dec_init="mean")
    torch.manual_seed(0)
    whole = fusedsae.Trainer(_sae(), items, cfg)
    whole.train()
    cfg_b = _cfg(steps=3, run_dir=str(tmp_path / "b"), checkpoint_every=3, b_dec_init="mean")
    torch.manual_seed(0)
    fusedsae.Trainer(_sae(), items, cfg_b).train()
    torch.manual_seed(0)
    resumed = fusedsae.Trainer(_sae(), items, _cfg(**{**cfg_b.__dict__, "steps": 6}))
    with pytest.warns(ResumeWarning):
        assert resumed.resume()
    resumed.train()
    for name, tensor in whole.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_specs_are_built_by_the_data_layer(tmp_path):
    source = from_spec("toy:sparse", 32, toy_options={"d_in": 12, "n_features": 20, "seed": 3})
    assert isinstance(source, ToySource) and source.d_in == 12 and source.ground_truth.shape == (20, 12)
    assert torch.equal(source.data.directions, toy.make("sparse", d_in=12, n_features=20, seed=3).directions)
    with pytest.raises(DataError, match="unexpected keyword argument 'd_in'"):
        from_spec("toy:superposition", 32, toy_options={"d_in": 12})
    acts = torch.randn(300, D_IN)
    save_file({"x": acts}, str(tmp_path / "acts.safetensors"))
    source = as_source(tmp_path / "acts.safetensors", 100, seed=1)
    assert isinstance(source, TensorSource) and torch.equal(source.activations, acts)
    # the Trainer takes the same spec strings as the command line
    trainer = fusedsae.Trainer(_sae(), str(tmp_path / "acts.safetensors"), _cfg(batch_size=100))
    assert trainer.train()["tokens"] == 300
    save_file({"x": acts.to(torch.int32)}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(DataError, match="is torch.int32; activations must be floating point"):
        from_spec(str(tmp_path / "ints.safetensors"), 10)

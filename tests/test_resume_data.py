"""A resumed Trainer refuses data other than the data its checkpoint was taken on (the checkpoint records the
source's ``describe()``); a checkpoint written before that record existed resumes with a warning."""

from __future__ import annotations

import pytest
import torch

from fusedsae import SparseAutoencoder, TrainConfig, Trainer, toy
from fusedsae import checkpoint as ckpt
from fusedsae.checkpoint import CheckpointError, CheckpointMismatch
from fusedsae.data import ResumeWarning, fingerprint
from fusedsae.training import data_differences

D_IN = 8


def activations(seed: int, n: int = 256) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def trainer(run_dir, data, steps: int = 4, **kwargs) -> Trainer:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=D_IN, d_sae=16, activation="topk", k=2)
    settings = dict(steps=steps, batch_size=32, checkpoint_every=2, log_every=2, run_dir=str(run_dir), progress=False)
    return Trainer(sae, data, TrainConfig(**{**settings, **kwargs}))


def test_resume_on_the_same_tensor_continues(tmp_path):
    trainer(tmp_path, activations(0)).train()
    resumed = trainer(tmp_path, activations(0), steps=6)  # an equal tensor, built again as a resuming script would
    assert resumed.resume() and resumed.step == 4
    resumed.close()


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (activations(1), r"fingerprint='[0-9a-f]{16}' then, '[0-9a-f]{16}' now"),  # same shape, other values
        (activations(0, n=320), r"n=256 then, 320 now; fingerprint="),
    ],
)
def test_resume_on_another_tensor_is_refused_naming_the_fields(tmp_path, data, named):
    trainer(tmp_path, activations(0)).train()
    with pytest.raises(CheckpointMismatch, match=rf"step-000000004 was trained on other data \({named}"):
        trainer(tmp_path, data, steps=6).resume()


def test_resume_with_another_shuffle_seed_is_refused(tmp_path):
    """The data order is part of the data: a source built by the user with another seed is other data."""
    from fusedsae.data import TensorSource

    trainer(tmp_path, TensorSource(activations(0), 32, seed=0)).train()
    with pytest.raises(CheckpointMismatch, match=r"other data \(seed=0 then, 3 now\)"):
        trainer(tmp_path, TensorSource(activations(0), 32, seed=3), steps=6).resume()


def test_resume_on_a_cache_with_another_shuffle_seed_is_refused(tmp_path):
    """A cache source's batches depend on its shuffle settings as much as on its rows (its describe() records them)."""
    from fusedsae import cache as K

    writer = K.CacheWriter(tmp_path / "cache", d_in=D_IN, n_texts=2, source={"kind": "test"}, shard_tokens=128)
    for text in range(2):
        tokens = torch.stack([torch.full((128,), text), torch.arange(128), torch.zeros(128, dtype=torch.long)], 1)
        writer.add(text, text + 1, activations(text, 128), tokens)
    writer.finish()
    trainer(tmp_path / "run", K.CacheSource(tmp_path / "cache", 32, seed=1)).train()
    resumed = trainer(tmp_path / "run", K.CacheSource(tmp_path / "cache", 32, seed=1), steps=6)
    assert resumed.resume() and resumed.step == 4
    resumed.close()
    with pytest.raises(CheckpointMismatch, match=r"other data \(seed=1 then, 2 now\)"):
        trainer(tmp_path / "run", K.CacheSource(tmp_path / "cache", 32, seed=2), steps=6).resume()


def test_resume_on_other_toy_data_is_refused(tmp_path):
    trainer(tmp_path, toy.SparseFeatureData(d_in=D_IN, n_features=16, seed=0)).train()
    with pytest.raises(CheckpointMismatch, match=r"other data \(mean_active=4\.0 then, 2\.0 now; seed=0 then, 1 now\)"):
        trainer(tmp_path, toy.SparseFeatureData(d_in=D_IN, n_features=16, mean_active=2.0, seed=1), steps=6).resume()


def test_resume_from_a_tensor_onto_an_iterable_is_refused(tmp_path):
    trainer(tmp_path, activations(0)).train()
    with pytest.raises(CheckpointMismatch, match=r"other data \(kind='tensor' then, 'iterable' now\)"):
        trainer(tmp_path, list(activations(0).split(32)), steps=6).resume()


def test_a_checkpoint_without_the_record_resumes_with_a_warning(tmp_path):
    first = trainer(tmp_path, activations(0))
    first.train()
    contents = first.state_contents()
    del contents["trainer.json"]["data_source"]  # as fusedsae wrote checkpoints before the record
    ckpt.write_checkpoint(tmp_path, 6, contents, keep=5, run_id=first.run_id)
    with pytest.warns(ResumeWarning, match=r"step-000000006 does not record which data it was trained on"):
        resumed = trainer(tmp_path, activations(1), steps=8)
        assert resumed.resume() and resumed.step == 4  # the step counter of the state written at "step 6"
    resumed.close()


def test_a_damaged_record_is_a_checkpoint_error(tmp_path):
    first = trainer(tmp_path, activations(0))
    first.train()
    contents = first.state_contents()
    contents["trainer.json"]["data_source"] = "tensor"
    folder = ckpt.write_checkpoint(tmp_path, 6, contents, keep=5, run_id=first.run_id)
    resumed = trainer(tmp_path, activations(0), steps=8)
    with pytest.raises(CheckpointError, match=r"field 'data_source' is 'tensor', expected an object"):
        resumed.resume(folder)


def test_where_a_cache_lies_is_not_what_it_holds():
    cache = {"kind": "cache", "path": "/old/cache", "rows": 4096, "d_in": 384, "model": "minilm"}
    assert data_differences(cache, {**cache, "path": "/new/cache"}) == []
    assert data_differences(cache, {**cache, "rows": 2048}) == ["rows=4096 then, 2048 now"]
    assert data_differences({"kind": "tensor"}, {"kind": "tensor", "added_later": 1}) == []


def test_fingerprint_reads_evenly_spaced_rows_only():
    x = activations(0, n=1000)
    assert fingerprint(x) == fingerprint(x.clone())
    changed = x.clone()
    changed[999] += 1  # the last row is always read
    assert fingerprint(changed) != fingerprint(x)
    assert fingerprint(x[:3]) != fingerprint(x[:4])  # fewer rows than the sample: all of them

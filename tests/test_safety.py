"""Runs that go wrong end with one clear error, never in silent garbage (issue 9): the divergence guard, run identity
and the folder lock, validated files with named errors and fallbacks, small batches, and torchrun error reporting.
Each test reproduces one failure the issue lists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fusedsae
from faults import failing_fsync
from fusedsae import SAEFormatError, SparseAutoencoder, ToySource, TrainConfig, Trainer, toy
from fusedsae import cache as K
from fusedsae import checkpoint as ckpt
from fusedsae import metrics as M
from fusedsae.checkpoint import CheckpointError, CheckpointMismatch, RunFolderError
from fusedsae.cli import main
from fusedsae.formats import atomic_write, manifest_digest, read_json
from fusedsae.training import TrainingDiverged

ROOT = Path(__file__).resolve().parent.parent
DATA = toy.SparseFeatureData(d_in=16, n_features=32, mean_active=3.0)


class Poisoned(ToySource):
    """Toy batches; batch ``at`` (0-based, or every batch from ``at`` on with ``every``) is transformed by ``fn``."""

    def __init__(self, at: int, fn, every: bool = False) -> None:
        super().__init__(DATA, 64)
        self.at, self.fn, self.every = at, fn, every

    def next_batch(self) -> torch.Tensor:
        index = self.index
        batch = super().next_batch()
        return self.fn(batch) if index == self.at or (self.every and index > self.at) else batch


def trainer(run_dir=None, data=None, dtype="float32", **kwargs) -> Trainer:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=16, d_sae=64, activation="topk", k=3, dtype=dtype)
    settings = dict(steps=20, batch_size=64, lr=2e-3, log_every=5, checkpoint_every=0, dead_tokens=640, progress=False)
    settings.update(run_dir=str(run_dir) if run_dir else None, **kwargs)
    return Trainer(sae, data if data is not None else ToySource(DATA, 64), TrainConfig(**settings))


def huge_value(batch: torch.Tensor) -> torch.Tensor:
    batch = batch.clone()
    batch[5, 3] = 3e37  # finite, but its square overflows float32: the loss becomes inf
    return batch


# ---------------------------------------------------------------------------------------------------------------
# divergence guard
# ---------------------------------------------------------------------------------------------------------------


def test_one_huge_input_value_skips_that_update_and_nothing_else(tmp_path):
    t = trainer(tmp_path, data=Poisoned(6, huge_value))
    for _ in range(6):
        t.train_step(t._prepare(t.data.next_batch()))
    before = {k: v.clone() for k, v in t.sae.state_dict().items()}
    moments = [s["exp_avg_sq"].clone() for s in t.optimizer.state.values()]
    since_fired = t.tokens_since_fired.clone()
    out = t.train_step(t._prepare(t.data.next_batch()))  # step 7 sees the huge value
    assert not torch.isfinite(out.loss)
    for name, tensor in t.sae.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(torch.equal(s["exp_avg_sq"], m) for s, m in zip(t.optimizer.state.values(), moments))
    assert torch.equal(t.tokens_since_fired, since_fired)
    with pytest.warns(
        RuntimeWarning, match=r"skipped 1 update\(s\) whose mse_loss was non-finite, the latest at step 7"
    ):
        metrics = t.train()  # the run goes on and ends well: one bad value costs one update, not the run
    assert metrics["skipped_steps"] == 1 and metrics["fvu"] < 1
    sae = fusedsae.load(tmp_path / "sae")
    assert all(torch.isfinite(p).all() for p in sae.state_dict().values())


def test_a_loss_that_stays_non_finite_stops_training_with_one_line(tmp_path):
    t = trainer(tmp_path, data=Poisoned(7, lambda b: b * 1e20, every=True), max_bad_steps=3, checkpoint_every=5)
    match = r"mse_loss( and \w+)? was non-finite \(NaN/Inf\) in 3 consecutive steps.*largest \|x\| \d\.\d+e\+20"
    with pytest.raises(TrainingDiverged, match=match) as info:
        t.train()
    message = str(info.value)
    assert "\n" not in message and message.startswith("training diverged at step 10:")
    assert "last good checkpoint" in message and "step-000000005" in message
    assert info.value.checkpoint == tmp_path / "checkpoints" / "step-000000005"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000000005"]  # none written after it
    assert not (tmp_path / "sae").exists()


def test_float16_overflow_stops_training(tmp_path):
    # pure float16 Adam: squared gradients underflow to 0, the next update overflows, the loss is inf from step 3
    t = trainer(tmp_path, dtype="float16", max_bad_steps=3, checkpoint_every=5)
    with pytest.raises(TrainingDiverged, match=r"step 5: .*no checkpoint was written; try: float16 overflowed"):
        t.train()
    assert not ckpt.list_checkpoints(tmp_path) and not (tmp_path / "sae").exists()


def test_a_non_finite_weight_stops_training_and_is_never_written(tmp_path):
    t = trainer(tmp_path, checkpoint_every=4)
    t.callbacks.append(lambda m: t.sae.b_dec.data.fill_(float("nan")) if m["step"] == 5 else None)
    match = r"step 8: the weights became non-finite \(b_dec\) by step 8; last good checkpoint .*step-000000004"
    with pytest.raises(TrainingDiverged, match=match):
        t.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000000004"]
    with pytest.raises(TrainingDiverged, match="refusing to write the step 8 checkpoint: b_dec hold NaN/Inf"):
        t.save_checkpoint()
    with pytest.raises(TrainingDiverged, match="refusing to write .*sae: b_dec hold NaN/Inf"):
        t.save_final()


def test_an_exploding_fvu_is_warned_about():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = trainer(lr=10.0, steps=20).train()
    assert metrics["fvu"] > 1e3
    assert any("fvu has been above 1000 for 3 logs" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_cli_exits_non_zero_with_one_line_on_divergence(tmp_path):
    save_file({"acts": torch.randn(1024, 8) * 1e20}, str(tmp_path / "huge.safetensors"))
    args = ["train", "--data", str(tmp_path / "huge.safetensors"), "--out", str(tmp_path / "run"), "--steps", "30"]
    args += ["--batch-size", "64", "--log-every", "2", "--max-bad-steps", "4", "--no-plots", "--no-progress"]
    with pytest.warns(RuntimeWarning, match="skipped 2 update"), pytest.raises(SystemExit) as info:
        main(args)
    assert isinstance(info.value.code, str) and "\n" not in info.value.code
    assert info.value.code.startswith("fusedsae train: error: training diverged at step 4: mse_loss was non-finite")
    assert not (tmp_path / "run" / "sae").exists()


def _small_cache(path: Path) -> K.ActivationCache:
    writer = K.CacheWriter(path, d_in=16, n_texts=4, source={"kind": "test"}, shard_tokens=128)
    for text in range(4):
        acts = DATA.sample(text, 128)
        tokens = torch.stack([torch.full((128,), text), torch.arange(128), torch.zeros(128, dtype=torch.long)], 1)
        writer.add(text, text + 1, acts, tokens)
    return writer.finish()


def test_a_bit_flipped_cache_shard_stops_training_with_its_name(tmp_path):
    cache = _small_cache(tmp_path / "cache")
    shard = tmp_path / "cache" / "shard-000002.acts.npy"
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x40  # an exponent bit of the last float32: 1e-1 becomes ~1e37, the size is unchanged
    shard.write_bytes(bytes(data))
    source = K.CacheSource(cache.path, 64, seed=1)
    t = Trainer(
        SparseAutoencoder(d_in=16, d_sae=64, activation="topk", k=3),
        source,
        TrainConfig(steps=10, batch_size=64, progress=False),
    )
    with pytest.raises(
        K.CacheError, match=r"shard shard-000002 file shard-000002\.acts\.npy does not match its SHA-256"
    ):
        t.train()


# ---------------------------------------------------------------------------------------------------------------
# run identity, the folder lock, resume
# ---------------------------------------------------------------------------------------------------------------


def test_resume_at_the_final_step_writes_the_sae_and_summary(tmp_path):
    trainer(tmp_path, steps=10, checkpoint_every=5).train()
    # killed after the final checkpoint, during the SAE write: no sae/, no summary, a temporary folder
    for name in ("sae", "summary.json"):
        os.system(f"rm -rf {tmp_path / name}")
    (tmp_path / ".sae.tmp-abc123").mkdir()
    (tmp_path / ".sae.tmp-abc123" / "cfg.json").write_text("{")
    resumed = trainer(tmp_path, steps=10, checkpoint_every=5)
    assert resumed.resume() and resumed.step == 10
    resumed.train()
    assert fusedsae.load(tmp_path / "sae").cfg.d_sae == 64
    assert json.loads((tmp_path / "summary.json").read_text())["run_id"] == resumed.run_id
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path):
    first = trainer(tmp_path, steps=10, checkpoint_every=5)
    first.train()
    with pytest.raises(RunFolderError, match=rf"holds another run \(run {first.run_id}: .*--overwrite"):
        trainer(tmp_path, steps=10, checkpoint_every=5).train()
    second = trainer(tmp_path, steps=10, checkpoint_every=5, overwrite=True)
    second.train()
    owners = {n: o for n, o in ckpt.folder_run_ids(tmp_path).items() if n not in ("sae", "metrics.jsonl")}
    assert set(owners.values()) == {second.run_id} and second.run_id != first.run_id
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000000005", "step-000000010"]


def test_pruning_keeps_this_runs_newest_checkpoints(tmp_path):
    t = trainer(tmp_path)
    contents = t.state_contents()
    ckpt.write_checkpoint(tmp_path, 750, contents, keep=2, run_id="oldrun")  # another run's, sorting last
    for step in (50, 100, 150):
        ckpt.write_checkpoint(tmp_path, step, contents, keep=2, run_id="newrun")
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-000000100", "step-000000150", "step-000000750"]


def _three_checkpoints(tmp_path: Path) -> list[Path]:
    trainer(tmp_path, steps=15, checkpoint_every=5, keep_checkpoints=5).train()
    return ckpt.list_checkpoints(tmp_path)


def test_a_manifest_with_a_renamed_key_falls_back_to_the_older_checkpoint(tmp_path):
    paths = _three_checkpoints(tmp_path)
    manifest_path = paths[-1] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["files"]["model.safetensors"]
    entry["size"] = entry.pop("bytes")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="field 'manifest_sha256' does not match"):
        t = trainer(tmp_path, steps=15)
        assert t.resume() and t.step == 10
    t.close()
    # with the manifest's own checksum recomputed, the field check names the field
    manifest["manifest_sha256"] = manifest_digest(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"field 'files\.model\.safetensors\.bytes' must be a non-negative"):
        ckpt.read_manifest(paths[-1])


def test_when_no_checkpoint_is_usable_resume_names_each_one(tmp_path, capsys):
    paths = _three_checkpoints(tmp_path)
    (paths[0] / "trainer.json").write_text("{}")
    (paths[1] / "manifest.json").unlink()
    weights = paths[2] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as info:
        trainer(tmp_path, steps=15).resume()
    message = str(info.value)
    assert "no usable checkpoint" in message and "(3 tried)" in message
    assert "step-000000015: model.safetensors has" in message
    assert "step-000000010 has no manifest.json" in message
    assert "step-000000005: trainer.json has 2 bytes" in message


def test_resume_refuses_another_runs_checkpoint_and_changed_settings(tmp_path):
    first = trainer(tmp_path, steps=10, checkpoint_every=5)
    first.train()
    with pytest.raises(CheckpointMismatch, match=rf"belongs to run {first.run_id}, not to this run intruder"):
        trainer(tmp_path, steps=10, run_id="intruder").resume()
    changed = (
        r"written for batch_size=64, but this run has batch_size=32; max_grad_norm=1\.0, but this run has "
        r"max_grad_norm=0\.5"
    )
    with pytest.raises(CheckpointMismatch, match=changed):
        trainer(tmp_path, ToySource(DATA, 32), steps=10, max_grad_norm=0.5, batch_size=32).resume()
    resumed = trainer(tmp_path, steps=12, log_every=3, lr=0.01)  # length, step size and bookkeeping may change
    assert resumed.resume() and resumed.run_id == first.run_id
    resumed.close()


def test_a_non_finite_checkpoint_is_skipped_on_resume(tmp_path):
    t = trainer(tmp_path, steps=10, checkpoint_every=5)
    t.train()
    contents = t.state_contents()
    contents["model.safetensors"]["W_dec"] = contents["model.safetensors"]["W_dec"].clone().fill_(float("nan"))
    ckpt.write_checkpoint(tmp_path, 15, contents, keep=5, run_id=t.run_id)  # as an older fusedsae could have
    with pytest.warns(UserWarning, match=r"step-000000015 holds NaN/Inf \(model\.safetensors: W_dec"):
        resumed = trainer(tmp_path, steps=10)
        assert resumed.resume() and resumed.step == 10
    resumed.close()


def test_a_second_trainer_on_a_locked_folder_is_refused(tmp_path):
    first = trainer(tmp_path, steps=10)
    first.start_run()
    second = trainer(tmp_path, steps=10)
    with pytest.raises(RunFolderError, match=rf"being written by another trainer \(pid {os.getpid()} on "):
        second.resume()
    with pytest.raises(RunFolderError, match="being written by another trainer"):
        second.train()
    first.close()
    assert second.resume() is False  # the lock is free again (and there is no checkpoint yet)
    second.close()


HOLDER = """
import sys, time, torch, fusedsae
data = fusedsae.toy.SparseFeatureData(d_in=16, n_features=32, mean_active=3.0)
sae = fusedsae.SparseAutoencoder(d_in=16, d_sae=64, activation="topk", k=3)
cfg = fusedsae.TrainConfig(run_dir=sys.argv[1], batch_size=64, progress=False)
trainer = fusedsae.Trainer(sae, fusedsae.ToySource(data, 64), cfg)
trainer.start_run()
print("locked", flush=True)
time.sleep(120)
"""


def test_another_process_holding_the_folder_is_named_and_a_killed_one_frees_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"being written by another trainer \(pid {holder.pid} on "):
            trainer(tmp_path).train()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, yet the OS drops the flock with the process
        holder.wait()
    assert trainer(tmp_path).resume() is False


def test_cli_run_identity_and_files(tmp_path):
    out = tmp_path / "run"
    fast = ["--out", str(out), "--steps", "10", "--batch-size", "64", "--checkpoint-every", "5", "--no-plots"]
    fast += ["--no-progress", "--d-in", "16", "--n-features", "32"]
    assert main(["train", *fast]) == 0
    run_id = json.loads((out / "run_config.json").read_text())["run_id"]
    assert ckpt.read_manifest(ckpt.list_checkpoints(out)[-1])["run_id"] == run_id
    with pytest.raises(SystemExit, match=rf"holds another run \(run {run_id}"):
        main(["train", *fast])
    assert main(["train", *fast, "--overwrite"]) == 0
    assert json.loads((out / "run_config.json").read_text())["run_id"] != run_id
    (out / "run_config.json").write_text('{"data": "toy:sp')  # truncated
    with pytest.raises(SystemExit, match=r"run_config\.json is not valid JSON"):
        main(["train", *fast, "--resume"])
    for path in ckpt.list_checkpoints(out):
        (path / "manifest.json").write_text("{}")
    (out / "run_config.json").unlink()
    with pytest.raises(SystemExit, match=r"no usable checkpoint .*\(2 tried\)"), pytest.warns(UserWarning):
        main(["train", *fast, "--resume"])


# ---------------------------------------------------------------------------------------------------------------
# files: atomic writes, size limits, validated SAE folders and cache manifests
# ---------------------------------------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run_config.json"
    atomic_write(target, '{"old": true}\n')
    failing_fsync(monkeypatch, after=0)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, '{"new": true}\n')
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run_config.json"]


def _saved_topk(tmp_path: Path) -> Path:
    sae = SparseAutoencoder(d_in=8, d_sae=24, activation="topk", k=3)
    return sae.save(tmp_path / "sae")


def _edit_cfg(folder: Path, edit) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    edit(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _no_fused(cfg):
    cfg["metadata"].pop("fusedsae")


BAD_SAE_FOLDERS = {
    "topk without k": (lambda c: (_no_fused(c), c.pop("k")), r"field 'k' is missing: a topk SAE needs k"),
    "k is a word": (lambda c: (_no_fused(c), c.update(k="six")), r"field 'k' must be a positive integer, got 'six'"),
    "fusedsae k out of range": (
        lambda c: c["metadata"]["fusedsae"].update(k=1000),
        r"field 'metadata\.fusedsae' is not a valid fusedsae config \(k must be in \[1, d_sae=24\]",
    ),
    "dtype int64": (lambda c: c.update(dtype="int64"), r"field 'dtype' must be one of float32, .*got 'int64'"),
    "metadata a string": (lambda c: c.update(metadata="oops"), r"field 'metadata' must be an object, got str"),
    "edited d_sae": (lambda c: c.update(d_sae=100), r"field 'd_sae' is 100 but metadata\.fusedsae\.d_sae is 24"),
    "b_dec flag a string": (
        lambda c: c.update(apply_b_dec_to_input="false"),
        r"field 'apply_b_dec_to_input' must be true or false",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SAE_FOLDERS))
def test_each_malformed_sae_folder_gives_a_named_error(tmp_path, case):
    edit, match = BAD_SAE_FOLDERS[case]
    folder = _saved_topk(tmp_path)
    _edit_cfg(folder, edit)
    with pytest.raises(SAEFormatError, match=r"cfg\.json: " + match):
        fusedsae.load(folder)


def test_sparsify_folder_without_encoder_bias_and_a_huge_cfg(tmp_path):
    from safetensors.torch import load_file

    from conftest import FIXTURES

    folder = tmp_path / "sparsify"
    folder.mkdir()
    (folder / "cfg.json").write_text((FIXTURES / "sparsify_topk" / "cfg.json").read_text())
    weights = load_file(str(FIXTURES / "sparsify_topk" / "sae.safetensors"))
    weights.pop("encoder.bias")
    save_file(weights, str(folder / "sae.safetensors"))
    with pytest.raises(SAEFormatError, match=r"sae\.safetensors lacks encoder\.bias"):
        fusedsae.load(folder)
    with open(folder / "cfg.json", "wb") as f:  # 2 GiB, sparse: refused from its size, never read
        f.truncate(2 << 30)
    with pytest.raises(SAEFormatError, match=r"cfg\.json is 2,147,483,648 bytes, more than the 67,108,864"):
        fusedsae.load(folder)
    with pytest.raises(CheckpointError, match="more than"):
        read_json(folder / "cfg.json", error=CheckpointError)


def test_cache_manifest_fields_and_shard_paths_are_checked(tmp_path):
    cache = _small_cache(tmp_path / "cache")
    manifest_path = cache.path / "manifest.json"
    original = json.loads(manifest_path.read_text())

    def write(edit, digest=True):
        manifest = json.loads(json.dumps(original))
        edit(manifest)
        if digest:
            manifest["manifest_sha256"] = manifest_digest(manifest)
        manifest_path.write_text(json.dumps(manifest))

    write(lambda m: m["shards"][0]["files"]["shard-000000.acts.npy"].update(size=1), digest=False)
    with pytest.raises(K.CacheError, match="field 'manifest_sha256' does not match"):
        K.ActivationCache(cache.path)
    write(lambda m: m["shards"][0]["files"]["shard-000000.acts.npy"].pop("bytes"))
    with pytest.raises(K.CacheError, match=r"field 'shards\[0\]\.files\.shard-000000\.acts\.npy\.bytes'"):
        K.ActivationCache(cache.path)
    write(lambda m: m["shards"][1].update(name="../shard-000001"))
    with pytest.raises(K.CacheError, match=r"field 'shards\[1\]\.name' must be shard-NNNNNN"):
        K.ActivationCache(cache.path)
    manifest_path.write_text(json.dumps(original))
    outside = tmp_path / "elsewhere.npy"  # a link to a file outside the folder, with the very bytes listed
    outside.write_bytes((cache.path / "shard-000001.acts.npy").read_bytes())
    (cache.path / "shard-000001.acts.npy").unlink()
    (cache.path / "shard-000001.acts.npy").symlink_to(outside)
    with pytest.raises(K.CacheError, match=r"shard-000001\.acts\.npy is a link to .*elsewhere\.npy, outside"):
        K.ActivationCache(cache.path)


# ---------------------------------------------------------------------------------------------------------------
# small batches
# ---------------------------------------------------------------------------------------------------------------


def test_batch_size_one():
    x = torch.randn(1, 8)
    assert torch.isnan(M.fvu(x, x * 0.5)) and torch.isnan(M.explained_variance_legacy(x, x * 0.5))
    assert float(M.fvu(torch.randn(2, 8), torch.zeros(2, 8))) < 10  # two tokens have a variance
    with pytest.raises(ValueError, match="batch size 1 is too small for the AuxK loss of a topk SAE: .*at least 2"):
        Trainer(
            SparseAutoencoder(d_in=16, d_sae=64, activation="topk", k=3), ToySource(DATA, 1), TrainConfig(batch_size=1)
        )
    sae = SparseAutoencoder(d_in=16, d_sae=64, activation="topk", k=3)
    dead = torch.ones(64, dtype=torch.bool)
    out = sae.training_forward(DATA.sample(0, 1), dead_mask=dead)
    assert float(out.losses["auxiliary_reconstruction_loss"].detach()) == 0.0  # was 6e10: error / clamp(0, 1e-12)
    relu = SparseAutoencoder(d_in=16, d_sae=64, activation="relu")
    cfg = TrainConfig(steps=5, batch_size=1, log_every=5, progress=False)
    metrics = Trainer(relu, ToySource(DATA, 1), cfg).train()
    assert metrics["mse"] < 10 and metrics["fvu"] != metrics["fvu"]  # NaN, not 8e37


# ---------------------------------------------------------------------------------------------------------------
# torchrun: the failing rank's own error, and no orphaned workers
# ---------------------------------------------------------------------------------------------------------------

TORCHRUN_ARGS = ["--steps", "400", "--batch-size", "32", "--no-progress", "--no-plots", "--d-in", "16"]


def _torchrun(tmp_path: Path, faults: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "tests" / "faults.py"),
        *faults,
        "--",
        "train",
        "--out",
        str(tmp_path / "run"),
        *TORCHRUN_ARGS,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1", "FUSEDSAE_DIST_TIMEOUT": "60"}


def test_torchrun_prints_the_failing_ranks_own_error(tmp_path):
    result = subprocess.run(
        _torchrun(tmp_path, ["--raise-rank", "1", "--at-batch", "3"]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    # the agent's summary names the failing rank and quotes its own error (read from the rank's error file), not
    # only "To enable traceback see …" beside the other rank's "Connection closed by peer"
    root_cause = result.stderr.split("Root Cause (first observed failure)")[-1]
    assert "rank      : 1" in root_cause and "RuntimeError: injected fault on rank 1" in root_cause, root_cause


def test_workers_exit_when_the_torchrun_agent_dies(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    agent = subprocess.Popen(
        _torchrun(tmp_path, ["--pid-dir", str(pids), "--stall-rank", "1", "--at-batch", "2"]),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(list(pids.iterdir())) < 2:
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in pids.iterdir()]
        assert len(workers) == 2, "the workers did not start"
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a zombie (exited, not yet reaped by its new parent) counts as gone
        status = Path(f"/proc/{pid}/stat")
        return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")

    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in workers):
        time.sleep(0.2)
    left = [p for p in workers if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} kept running after their agent died"

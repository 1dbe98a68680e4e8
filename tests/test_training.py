"""The trainer: toy recovery, determinism, schedules, dead-latent counting in tokens, input-scale folding, the
metrics log, and checkpoints: a run killed mid-training resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fusedsae
from fusedsae import CheckpointError, SparseAutoencoder, ToySource, TrainConfig, Trainer, toy
from fusedsae import checkpoint as ckpt
from fusedsae import functional as F

ROOT = Path(__file__).resolve().parent.parent


def small_run(run_dir=None, steps=40, activation="topk", **train_kwargs) -> Trainer:
    data = toy.SparseFeatureData(d_in=16, n_features=32, mean_active=3.0)
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        d_in=16, d_sae=64, activation=activation, k=3 if activation in ("topk", "batchtopk") else None
    )
    settings = dict(
        steps=steps,
        batch_size=64,
        lr=2e-3,
        log_every=5,
        checkpoint_every=0,
        dead_tokens=640,
        run_dir=str(run_dir) if run_dir else None,
        progress=False,
    )
    cfg = TrainConfig(**{**settings, **train_kwargs})
    return Trainer(sae, ToySource(data, 64), cfg)


@pytest.mark.usefixtures("one_thread")
def test_toy_run_recovers_ground_truth_features():
    """The acceptance test of the foundation issue: MMCS >= 0.95 in well under a minute on two cores."""
    data = toy.SparseFeatureData(d_in=64, n_features=256, mean_active=4.0)
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=64, d_sae=512, activation="topk", k=6)
    cfg = TrainConfig(
        steps=600, batch_size=1024, lr=2e-3, lr_decay_steps=120, log_every=100, dead_tokens=51200, progress=False
    )
    # The bound is on the work done, so the machine's other load must not count. Wall time counts it, and so does the
    # CPU time of two torch threads: the idle one spins at each barrier while the other is descheduled (105 CPU-s
    # for this run at load average 16, against 7.7 single-threaded). On one thread (the one_thread fixture) nothing
    # spins, so this process's CPU time is its work. A minute on two cores is 120 CPU-s of work; the bound of 60 (one
    # core for a minute) is half of that and about 8x the 7.7 s measured under load, so only slower code trips it.
    start = time.process_time()
    metrics = Trainer(sae, ToySource(data, 1024), cfg).train()
    cpu_seconds = time.process_time() - start
    assert metrics["mmcs"] >= 0.95, metrics
    assert metrics["fvu"] < 0.2 and metrics["dead_fraction"] < 0.1, metrics
    assert metrics["skipped_steps"] == 0, metrics  # all 600 steps of 1024 tokens did their work
    assert cpu_seconds < 60, f"took {cpu_seconds:.1f} s of CPU time on one thread"


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_every_architecture_trains(activation):
    trainer = small_run(steps=60, activation=activation)
    first = trainer.batch_metrics(trainer.train_step(trainer._prepare(trainer.data.next_batch())))
    last = trainer.train()
    assert last["mse"] < 0.7 * first["mse"], (first, last)


def test_same_seed_gives_identical_runs():
    a, b = small_run(steps=25), small_run(steps=25)
    a.train()
    b.train()
    for (name, pa), pb in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_schedules():
    trainer = small_run(steps=100, lr_warm_up_steps=10, lr_decay_steps=20, lr_end=1e-4, sparsity_warm_up_steps=4)
    lr = trainer.cfg.lr
    assert trainer.lr_at(0) == pytest.approx(lr / 10)
    assert trainer.lr_at(9) == pytest.approx(lr)
    assert trainer.lr_at(50) == pytest.approx(lr)
    assert trainer.lr_at(80) == pytest.approx(lr + (1e-4 - lr) / 20)
    assert trainer.lr_at(99) == pytest.approx(1e-4)
    assert [trainer.coefficient_scale(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_b_dec_keep_leaves_a_loaded_sae_alone():
    trainer = small_run(steps=1, b_dec_init="keep")
    with torch.no_grad():
        trainer.sae.b_dec.fill_(0.25)
    before = trainer.sae.b_dec.detach().clone()
    trainer.cfg.lr = 1e-12  # the one step barely moves it; initialisation would have replaced it
    trainer.train()
    torch.testing.assert_close(trainer.sae.b_dec.detach(), before, atol=1e-9, rtol=0)


def test_dead_latents_are_counted_in_tokens():
    trainer = small_run(steps=12)
    with torch.no_grad():  # latents 0..9 can never fire: zero encoder column, very negative bias
        trainer.sae.W_enc[:, :10] = 0
        trainer.sae.b_enc[:10] = -100
    trainer.sae.cfg.aux_k = 0  # AuxK would revive them; here we only count
    for _ in range(12):
        trainer.train_step(trainer._prepare(trainer.data.next_batch()))
    assert (trainer.tokens_since_fired[:10] == 12 * 64).all()
    dead = trainer.dead_mask()
    assert dead[:10].all()  # 768 tokens >= dead_tokens = 640
    assert (
        trainer.batch_metrics(trainer.train_step(trainer._prepare(trainer.data.next_batch())))["dead_fraction"]
        >= 10 / 64
    )


def test_input_scale_is_folded_into_the_saved_sae(tmp_path):
    data = toy.SparseFeatureData(d_in=16, n_features=32, mean_active=3.0)
    sae = SparseAutoencoder(d_in=16, d_sae=64, activation="topk", k=3, normalize_activations="expected_average_only_in")
    source = ToySource(data, 64)
    trainer = Trainer(sae, source, TrainConfig(steps=10, batch_size=64, run_dir=str(tmp_path), progress=False))
    trainer.train()
    first = data.sample(0, 64)
    assert trainer.act_scale == pytest.approx(16**0.5 / float(first.norm(dim=1).mean()), rel=1e-5)
    saved = fusedsae.load(tmp_path / "sae").eval()
    x = data.sample(999, 32)
    trained = trainer.sae.eval()
    torch.testing.assert_close(saved.encode(x), trained.encode(x * trainer.act_scale), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(saved(x), trained(x * trainer.act_scale) / trainer.act_scale, rtol=1e-4, atol=1e-5)


def test_metrics_log_and_summary(tmp_path):
    small_run(tmp_path, steps=20).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for key in (
        "l0",
        "mse",
        "fvu",
        "explained_variance",
        "explained_variance_legacy",
        "dead_fraction",
        "mmcs",
        "loss",
        "mse_loss",
        "lr",
        "tokens",
        "tokens_per_s",
    ):
        assert key in rows[-1], key
    assert rows[-1]["explained_variance"] == pytest.approx(1 - rows[-1]["fvu"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["step"] == 20 and summary["sae"]["d_sae"] == 64


@pytest.mark.parametrize("steps", [20, 24])  # the run ends exactly at a window boundary, and inside a window
def test_sparsity_file_holds_per_token_firing_frequencies(tmp_path, steps):
    trainer = small_run(tmp_path, steps=steps, sparsity_window_steps=10)
    counts, tokens = torch.zeros(64, dtype=torch.int64), 0
    original = trainer.train_step

    def counting_step(x):
        nonlocal counts, tokens
        if trainer.window_steps == 0:  # the trainer has just started a window
            counts, tokens = torch.zeros(64, dtype=torch.int64), 0
        out = original(x)
        counts += (F.to_dense(out.values, out.indices, 64) > 0).sum(0)
        tokens += x.shape[0]
        return out

    trainer.train_step = counting_step
    trainer.train()
    assert tokens == 64 * (10 if steps == 20 else 4)
    sparsity = load_file(str(tmp_path / "sae" / "sparsity.safetensors"))["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(counts / tokens + 1e-10).float())
    # TopK with k=3: each token fires 3 latents (all positive here), so densities sum to 3
    assert (10**sparsity - 1e-10).sum() == pytest.approx(3.0, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------

TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, fusedsae
    torch.set_num_threads(1)
    run_dir, steps, crash_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class Source(fusedsae.ToySource):
        def next_batch(self):
            if self.index == crash_at:
                os._exit(3)  # a hard kill: no cleanup, no atexit, no flush
            return super().next_batch()

    data = fusedsae.toy.SparseFeatureData(d_in=16, n_features=32, mean_active=3.0)
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(d_in=16, d_sae=64, activation="topk", k=3)
    cfg = fusedsae.TrainConfig(steps=steps, batch_size=64, lr=2e-3, log_every=5, checkpoint_every=7,
                               dead_tokens=128, run_dir=run_dir, progress=False)  # AuxK active at resume
    trainer = fusedsae.Trainer(sae, Source(data, 64), cfg)
    trainer.resume()
    trainer.train()
    """
)


def run_script(run_dir: Path, steps: int, crash_at: int = -1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    return subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(run_dir), str(steps), str(crash_at)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(str(a / "sae" / "sae_weights.safetensors")),
        load_file(str(b / "sae" / "sae_weights.safetensors")),
    )
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    oa = load_file(str(ckpt.list_checkpoints(a)[-1] / "optimizer.safetensors"))
    ob = load_file(str(ckpt.list_checkpoints(b)[-1] / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)

    def log_without_timing(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]

    assert log_without_timing(a) == log_without_timing(b)


def test_hard_killed_run_resumes_to_the_same_weights(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert run_script(full, 30).returncode == 0
    died = run_script(crashed, 30, crash_at=17)
    assert died.returncode == 3, died.stderr
    assert [p.name for p in ckpt.list_checkpoints(crashed)] == ["step-000000007", "step-000000014"]
    resumed = run_script(crashed, 30)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(full, crashed)


def test_sigkill_at_a_random_moment_resumes_to_the_same_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = 400
    assert run_script(full, steps).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(killed), str(steps), "-1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(ckpt.list_checkpoints(killed)) < 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-log, mid-checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert run_script(killed, steps).returncode == 0
    assert_same_run(full, killed)


def test_resume_skips_corrupt_and_partial_checkpoints(tmp_path):
    trainer = small_run(tmp_path, steps=21, checkpoint_every=7, keep_checkpoints=5)
    trainer.train()
    checkpoints = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in checkpoints] == ["step-000000007", "step-000000014", "step-000000021"]
    weights = checkpoints[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated newest checkpoint
    partial = tmp_path / "checkpoints" / ".step-000000028.tmp-abc"  # a write cut off by a crash
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"junk")
    fresh = small_run(tmp_path, steps=21)
    with pytest.warns(UserWarning, match="step-000000021: model.safetensors has .* bytes, the manifest says"):
        assert fresh.resume()
    assert fresh.step == 14 and not partial.exists()


def test_checkpoint_errors_name_the_problem(tmp_path):
    trainer = small_run(tmp_path, steps=7, checkpoint_every=7)
    trainer.train()
    path = ckpt.list_checkpoints(tmp_path)[-1]
    other = SparseAutoencoder(d_in=16, d_sae=32, activation="topk", k=3)
    with pytest.raises(CheckpointError, match="written for an SAE with d_sae=64, but this SAE has d_sae=32"):
        Trainer(other, trainer.data, trainer.cfg).resume(path)
    (path / "counters.safetensors").write_bytes(b"x" * (path / "counters.safetensors").stat().st_size)
    with pytest.raises(CheckpointError, match="counters.safetensors does not match its SHA-256"):
        small_run(tmp_path).resume(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        small_run(tmp_path).resume(path)
    assert small_run(tmp_path / "elsewhere").resume() is False


def test_checkpoints_hold_no_pickle(tmp_path):
    small_run(tmp_path, steps=7, checkpoint_every=7).train()
    names = sorted(os.listdir(ckpt.list_checkpoints(tmp_path)[-1]))
    assert names == [
        "counters.safetensors",
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer.json",
    ]

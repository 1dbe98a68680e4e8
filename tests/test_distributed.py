"""Data parallelism over torch.distributed (gloo, two processes on this machine): two ranks on batches of B train
the same weights as one process on the concatenated 2B batch; `torchrun -m fusedsae train` works.

AuxK is on (latents die after 128 tokens): the ranks normalise it by the global batch's residual variance
(fusedsae.metrics.batch_variance), so the equivalence holds for it too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

import fusedsae
from fusedsae import SparseAutoencoder, TrainConfig, Trainer, toy

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH = 12, 32

RANK_SCRIPT = textwrap.dedent(
    f"""
    import sys, torch, torch.distributed as dist, fusedsae
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    data = fusedsae.toy.SparseFeatureData(d_in=16, n_features=32, mean_active=3.0)
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(d_in=16, d_sae=48, activation="topk", k=3, dtype="float64", aux_k=8)
    source = fusedsae.ToySource(data, {BATCH}, rank=dist.get_rank(), world_size=dist.get_world_size())
    cfg = fusedsae.TrainConfig(steps={STEPS}, batch_size={BATCH}, lr=3e-3, b_dec_init="mean", dead_tokens=128,
                               progress=False, log_every=4)
    trainer = fusedsae.Trainer(sae, source, cfg)
    trainer.train()
    if dist.get_rank() == 0:
        save_file(dict(sae.state_dict()), sys.argv[1])
    dist.barrier()  # tear gloo down together: a rank leaving while the other still works aborted once under load
    dist.destroy_process_group()
    """
)


class Concatenated:
    """One process seeing both ranks' batches: global batch i = rank 0's then rank 1's share."""

    def __init__(self, data):
        self.data, self.index, self.batch_size, self.d_in = data, 0, 2 * BATCH, data.d_in
        self.ground_truth = data.ground_truth

    def next_batch(self):
        batch = torch.cat([self.data.sample(2 * self.index, BATCH), self.data.sample(2 * self.index + 1, BATCH)])
        self.index += 1
        return batch


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    result = torchrun(str(script), str(tmp_path / "ddp.safetensors"))
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = load_file(str(tmp_path / "ddp.safetensors"))

    data = toy.SparseFeatureData(d_in=16, n_features=32, mean_active=3.0)
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=16, d_sae=48, activation="topk", k=3, dtype="float64", aux_k=8)
    # b_dec from the mean of rank 0's first batch (what the ranks broadcast), not of the concatenated one
    sae.init_b_dec(data.sample(0, BATCH), "mean")
    cfg = TrainConfig(steps=STEPS, batch_size=2 * BATCH, lr=3e-3, b_dec_init="keep", dead_tokens=128, progress=False)
    Trainer(sae, Concatenated(data), cfg).train()
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-12, atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(ddp["W_dec"], SparseAutoencoder(d_in=16, d_sae=48, activation="topk", k=3).W_dec.double())


def test_torchrun_cli(tmp_path):
    result = torchrun(
        "-m",
        "fusedsae",
        "train",
        "--steps",
        "20",
        "--batch-size",
        "128",
        "--no-progress",
        "--no-plots",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world=2" in result.stdout
    assert fusedsae.load(tmp_path / "sae").cfg.d_sae == 512


def two_hook_cache(path: Path, rows: int = 512) -> None:
    """An activation cache of two hooks side by side (widths 16 and 24) in 4 shards, as `fusedsae cache --layer 2,3`
    writes one (random activations: no model needed)."""
    from fusedsae.cache import CacheWriter

    hooks = [
        {"module": f"layers.{i}.out", "io": "output", "index": 0, "layout": "flat", "columns": None} for i in (2, 3)
    ]
    source = {"hooks": hooks, "widths": [16, 24], "layer": [2, 3]}
    writer = CacheWriter(path, d_in=40, n_texts=4, source=source, shard_tokens=rows // 4)
    g = torch.Generator().manual_seed(3)
    for text in range(4):
        n = rows // 4
        tokens = torch.stack([torch.full((n,), text), torch.arange(n), torch.randint(0, 99, (n,), generator=g)], 1)
        writer.add(text, text + 1, torch.randn(n, 40, generator=g), tokens)
    writer.finish()


def test_torchrun_several_hooks_and_a_sweep_match_one_process_on_the_whole_batch(tmp_path):
    """`fusedsae train` on a two-hook cache with a k sweep (four SAEs from one pass, fusedsae.multi) on two ranks
    trains each SAE to the weights one process gets on the concatenated batches, as the first test shows for one
    SAE; `--resume` under torchrun finds the SAEs' common checkpoint."""
    import json

    from fusedsae import cli
    from fusedsae.cache import CacheSource
    from fusedsae.multi import MultiTrainer, SharedView, plan_runs

    two_hook_cache(tmp_path / "cache")
    args = ["train", "--data", str(tmp_path / "cache"), "--d-sae", "32", "--k", "2,3", "--steps", "10"]
    args += ["--dtype", "float64", "--log-every", "5", "--checkpoint-every", "5", "--seed", "7", "--no-progress"]
    args += ["--no-plots", "--batch-size", str(BATCH), "--out", str(tmp_path / "ddp")]
    result = torchrun("-m", "fusedsae", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 SAEs from one pass" in result.stdout and "world=2" in result.stdout

    # one process, batches of 2 × BATCH: rank 0's rows then rank 1's (how the sources split a global batch), each
    # SAE built by the CLI's own make_trainer; b_dec from rank 0's first batch, which the ranks broadcast
    settings = {**json.loads((tmp_path / "ddp" / cli.RUN_CONFIG).read_text()), "batch_size": 2 * BATCH}
    source = CacheSource(tmp_path / "cache", 2 * BATCH, seed=7)
    first = CacheSource(tmp_path / "cache", BATCH, seed=7, rank=0, world_size=2).next_batch()
    trainers = []
    for run in plan_runs(settings, source):
        one = {**settings, "d_sae": run["d_sae"], "k": run["k"], "run_id": None}
        view = SharedView(source, run["columns"], run["info"])
        t = cli.make_trainer(one, view, tmp_path / "one" / run["name"], "cpu", 1, False, False)
        t.sae.init_b_dec(view.take(first), t.cfg.b_dec_init)
        t.cfg.b_dec_init = "keep"
        trainers.append(t)
    MultiTrainer(trainers, source).train()
    assert sorted(t.run_dir.name for t in trainers) == ["layer2-k2", "layer2-k3", "layer3-k2", "layer3-k3"]
    for t in trainers:
        ddp = fusedsae.load(tmp_path / "ddp" / t.run_dir.name / "sae").state_dict()
        for name, tensor in fusedsae.load(t.run_dir / "sae").state_dict().items():
            torch.testing.assert_close(ddp[name], tensor, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")

    resumed = torchrun("-m", "fusedsae", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed 4 SAEs at step 10" in resumed.stdout

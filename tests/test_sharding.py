"""Latent sharding (fusedsae.sharding): the exact distributed TopK and a latent-sharded (and 2-D) Trainer run
against one process on the same data, over gloo with several processes on this machine.

Sums are taken in another order when the latents are split (each rank's partial decoder sum, then the all-reduce),
so float64 runs agree to rounding (see RTOL), not bit for bit; the *selections* are compared exactly, ties across
shard boundaries included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fusedsae
from fusedsae import reference, sharded_files
from fusedsae.sharding import ProcessGrid, ShardedAutoencoder, merge_candidates, shard_bounds

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, D_IN, D_SAE = 10, 24, 12, 41  # 41 latents: slices of unequal size
# Float64 weights after STEPS Adam steps. Adam divides each gradient entry by its own running RMS, so an entry
# whose gradient is mostly rounding noise (1e-16 relative from the other summation order) can step differently:
# ten steps leave ~1e-9 relative on the odd entry; 1e-8 bounds that with margin, while a wrong selection or a
# missed reduction is off by 1e-3 or more.
RTOL, ATOL = 1e-8, 1e-11

# One script per launch: every rank checks the sharded selections against the whole-dictionary reference, then
# trains with --shard-latents and saves; rank 0 writes the SAE's state and the metric log.
RANK_SCRIPT = textwrap.dedent(
    f"""
    import json, sys, torch, torch.distributed as dist, fusedsae
    from safetensors.torch import save_file
    from fusedsae.sharding import ProcessGrid, ShardedAutoencoder
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    shards, activation, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    widths = [int(w) for w in sys.argv[4].split(",")] + [{D_SAE}] if len(sys.argv) > 4 else None  # Matryoshka
    grid = ProcessGrid(shards)

    # 1. selections equal the single-device ones exactly, on integer-valued inputs full of ties
    torch.manual_seed(1)
    sae = fusedsae.SparseAutoencoder(d_in={D_IN}, d_sae={D_SAE}, activation=activation, k=4, dtype="float64", aux_k=6,
                                     matryoshka_widths=widths)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-2, 3, sae.W_enc.shape).double())
        sae.b_enc.zero_(); sae.b_dec.zero_()
    x = torch.randint(-2, 3, (30, {D_IN})).double()
    dead = torch.arange({D_SAE}) % 3 == 0
    whole = sae.training_forward(x, dead_mask=dead)  # AuxK on, for TopK and BatchTopK
    part = ShardedAutoencoder.from_full(sae, grid)
    mine = part.training_forward(x, dead_mask=part.slice_tensor("b_enc", dead))
    got = torch.zeros(30, {D_SAE}, dtype=torch.float64)
    acts = mine.feature_acts
    got[:, part.start:part.stop] = acts
    got = grid.sum_over_shards(got)
    assert torch.equal(got != 0, whole.feature_acts != 0), "selection differs"
    torch.testing.assert_close(got, whole.feature_acts, rtol=0, atol=0)
    torch.testing.assert_close(mine.loss, whole.loss)
    assert set(mine.losses) == set(whole.losses) and "auxiliary_reconstruction_loss" in mine.losses
    for name, term in whole.losses.items():
        torch.testing.assert_close(mine.losses[name], term, msg=name)

    # 2. training: each replica its own share of the data, the shard ranks of a replica the same batches
    data = fusedsae.toy.SparseFeatureData(d_in={D_IN}, n_features=30, mean_active=3.0)
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(d_in={D_IN}, d_sae={D_SAE}, activation=activation, k=3, dtype="float64",
                                     aux_k=6, matryoshka_widths=widths)
    source = fusedsae.ToySource(data, {BATCH}, rank=grid.replica_rank, world_size=grid.replicas)
    cfg = fusedsae.TrainConfig(steps={STEPS}, batch_size={BATCH}, lr=3e-3, b_dec_init="mean", dead_tokens=48,
                               progress=False, log_every=2, shard_latents=shards)
    trainer = fusedsae.Trainer(sae, source, cfg)
    logs = []
    trainer.callbacks.append(logs.append)
    trainer.train()
    state = trainer.full_sae().state_dict()
    if dist.get_rank() == 0:
        save_file(dict(state), out)
        open(out + ".json", "w").write(json.dumps(logs))
    dist.barrier()
    dist.destroy_process_group()
    """
)


# Checkpoints hold the whole dictionary: a run checkpointed under one layout resumes under another.
RESUME_SCRIPT = textwrap.dedent(
    f"""
    import os, sys, torch, torch.distributed as dist, fusedsae
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ  # under torchrun
    if distributed:
        dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    shards, run_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    data = fusedsae.toy.SparseFeatureData(d_in={D_IN}, n_features=30, mean_active=3.0)
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(d_in={D_IN}, d_sae={D_SAE}, activation="topk", k=3, dtype="float64", aux_k=6)
    cfg = fusedsae.TrainConfig(steps={STEPS}, batch_size={BATCH}, lr=3e-3, b_dec_init="mean", dead_tokens=48,
                               progress=False, log_every=5, checkpoint_every={STEPS // 2}, run_dir=run_dir,
                               shard_latents=shards)
    trainer = fusedsae.Trainer(sae, fusedsae.ToySource(data, {BATCH}), cfg)
    if sys.argv[-1] == "resume":
        trainer.resume(fusedsae.checkpoint.checkpoint_root(run_dir) / "step-{STEPS // 2:09d}")
    trainer.train()
    state = trainer.full_sae().state_dict()
    if not distributed or dist.get_rank() == 0:
        save_file(dict(state), out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    """
)


# The sharded save path against the gathered one: every rank writes its slice of the files (sae/ and the
# checkpoints); then the gathered state is written the single-process way, for the test to compare byte for byte.
SAVE_SCRIPT = textwrap.dedent(
    f"""
    import sys, torch, torch.distributed as dist, fusedsae
    from pathlib import Path
    from fusedsae import checkpoint as ckpt
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    shards, activation, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    replicas = dist.get_world_size() // shards
    data = fusedsae.toy.SparseFeatureData(d_in={D_IN}, n_features=30, mean_active=3.0)
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(d_in={D_IN}, d_sae={D_SAE}, activation=activation, k=3, aux_k=6,
                                     normalize_activations="expected_average_only_in")
    source = fusedsae.ToySource(data, {BATCH}, rank=dist.get_rank() // shards, world_size=replicas)
    cfg = fusedsae.TrainConfig(steps=6, batch_size={BATCH}, lr=3e-3, dead_tokens=48, progress=False,
                               checkpoint_every=3, run_dir=str(out / "run"), shard_latents=shards)
    trainer = fusedsae.Trainer(sae, source, cfg)
    trainer.train()
    contents = trainer.state_contents()  # first: building the whole SAE below draws from the RNG it holds
    whole = trainer.inference_sae()
    density = trainer.grid.gather_slices(trainer.feature_density(), 0, {D_SAE})
    if dist.get_rank() == 0:
        whole.save(out / "gathered", sparsity=torch.log10(density + 1e-10).float())
        ckpt.write_checkpoint(out / "gathered-run", trainer.step, contents, run_id=trainer.run_id)
    dist.barrier()
    dist.destroy_process_group()
    """
)


# Two user mistakes and a failure: each must end every rank with a non-zero exit, quickly and with the reason.
FAULT_SCRIPT = textwrap.dedent(
    f"""
    import sys, time, datetime, torch, torch.distributed as dist, fusedsae
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    mode, rank = sys.argv[1], dist.get_rank()
    data = fusedsae.toy.SparseFeatureData(d_in={D_IN}, n_features=30, mean_active=3.0)
    sae = fusedsae.SparseAutoencoder(d_in={D_IN}, d_sae={D_SAE}, activation="topk", k=3 + (mode == "config") * rank)
    # "data": the data split over all ranks although the two ranks share the latents (and so must share batches)
    split = mode == "data"
    source = fusedsae.ToySource(data, {BATCH}, rank=rank if split else 0, world_size=2 if split else 1)
    cfg = fusedsae.TrainConfig(steps=50, batch_size={BATCH}, progress=False, shard_latents=2)
    trainer = fusedsae.Trainer(sae, source, cfg)
    if mode == "raise" and rank == 1:  # rank 0 is then left waiting in the next step's all-gather
        step = trainer.train_step
        def failing_step(x):
            if trainer.step == 3:
                raise RuntimeError("rank 1 fails on purpose")
            return step(x)
        trainer.train_step = failing_step
    trainer.train()
    """
)


class Concatenated:
    """One process seeing every replica's batch: global batch i = replica 0's share, then replica 1's, …"""

    def __init__(self, data, replicas):
        self.data, self.replicas, self.index = data, replicas, 0
        self.batch_size, self.d_in, self.ground_truth = replicas * BATCH, data.d_in, data.ground_truth

    def next_batch(self):
        parts = [self.data.sample(self.index * self.replicas + r, BATCH) for r in range(self.replicas)]
        self.index += 1
        return torch.cat(parts)


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def single_process(activation: str, replicas: int, widths: list[int] | None = None):
    data = fusedsae.toy.SparseFeatureData(d_in=D_IN, n_features=30, mean_active=3.0)
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(
        d_in=D_IN, d_sae=D_SAE, activation=activation, k=3, dtype="float64", aux_k=6, matryoshka_widths=widths
    )
    sae.init_b_dec(data.sample(0, BATCH), "mean")  # what replica 0 computes and broadcasts
    cfg = fusedsae.TrainConfig(
        steps=STEPS,
        batch_size=replicas * BATCH,
        lr=3e-3,
        b_dec_init="keep",
        dead_tokens=48,
        progress=False,
        log_every=2,
    )
    logs: list[dict] = []
    fusedsae.Trainer(sae, Concatenated(data, replicas), cfg, callbacks=[logs.append]).train()
    return sae, logs


@pytest.mark.parametrize(
    ("nproc", "shards", "activation", "widths"),
    [
        (2, 2, "topk", None),
        (4, 4, "batchtopk", None),
        (4, 2, "topk", None),
        (3, 3, "topk", [5, 13, 20]),
        (2, 2, "batchtopk", [5, 13, 27]),
    ],
    # Matryoshka: slices [0,13) [13,27) [27,41) and [0,20) [20,41); widths end inside a slice, on its boundary
    # (13 with 3 shards, 20 with 2) and below whole slices
    ids=["2-shards-topk", "4-shards-batchtopk", "2x2-grid-topk", "3-shards-matryoshka-topk", "2-shards-matryoshka-btk"],
)
def test_sharded_training_matches_one_process(tmp_path, nproc, shards, activation, widths):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "sharded.safetensors"
    extra = [",".join(map(str, widths))] if widths else []
    result = torchrun(nproc, str(script), str(shards), activation, str(out), *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    sharded = load_file(str(out))
    sharded_logs = json.loads(Path(str(out) + ".json").read_text())
    sae, logs = single_process(activation, nproc // shards, widths and [*widths, D_SAE])
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(sharded[name], tensor, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    assert [m["step"] for m in sharded_logs] == [m["step"] for m in logs]
    for a, b in zip(sharded_logs, logs):
        for key in (
            "loss",
            "mse_loss",
            "l0",
            "fvu",
            "dead_fraction",
            "mmcs",
            *(f"inner_mse_loss_{w}" for w in widths or []),
        ):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert not torch.equal(
        sharded["W_dec"], fusedsae.SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, activation="relu").W_dec.double()
    )


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_merged_local_topks_are_the_global_topk_with_ties(shards):
    scores = torch.randint(0, 4, (200, 37)).double()  # four distinct values: ties everywhere, across boundaries
    values, indices = [], []
    for s in range(shards):
        start, stop = shard_bounds(37, shards, s)
        v, i = reference.row_topk(scores[:, start:stop], min(6, stop - start))
        values.append(v)
        indices.append(i + start)
    v, i = torch.cat(values, 1), torch.cat(indices, 1)
    winners = merge_candidates(v, i, 6)
    expected_values, expected_indices = reference.row_topk(scores, 6)
    assert torch.equal(v.gather(1, winners), expected_values)
    assert torch.equal(i.gather(1, winners), expected_indices)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_one_shard_is_the_plain_sae(activation):
    """The sharded code path with a world of one gives the unsharded loss and gradients."""
    torch.manual_seed(0)
    sparse = activation in ("topk", "batchtopk")
    sae = fusedsae.SparseAutoencoder(
        d_in=16, d_sae=40, activation=activation, k=3 if sparse else None, dtype="float64", aux_k=8
    )
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    part = ShardedAutoencoder.from_full(sae, ProcessGrid(1))
    x = torch.randn(50, 16, dtype=torch.float64)
    dead = (torch.rand(40) < 0.5) if sparse else None
    a = sae.training_forward(x, dead_mask=dead)
    b = part.training_forward(x, dead_mask=dead)
    a.loss.backward()
    b.loss.backward()
    assert set(a.losses) == set(b.losses)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    for (name, p), (_, q) in zip(sae.named_parameters(), part.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-13, atol=1e-13, msg=lambda m, n=name: f"{n}: {m}")


def test_grid_refuses_a_shard_count_that_does_not_divide_the_world():
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        ProcessGrid(2)
    with pytest.raises(ValueError, match="slice 3 does not exist"):
        shard_bounds(10, 3, 3)


def test_checkpoints_resume_under_another_layout(tmp_path):
    """2 shards write the checkpoints; 1 process and 4 shards resume from the middle one; both end where an
    uninterrupted single-process run ends."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    run = tmp_path / "run"
    result = torchrun(2, str(script), "2", str(run), str(tmp_path / "two.safetensors"), "fresh")
    assert result.returncode == 0, result.stderr[-4000:]
    alone = tmp_path / "alone"
    subprocess.run(
        [sys.executable, str(script), "1", str(alone), str(tmp_path / "alone.safetensors")],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "python")},
        timeout=120,
    )
    expected = load_file(str(tmp_path / "alone.safetensors"))
    resumed = {}
    for name, nproc in (("one", 1), ("four", 4)):
        copy = tmp_path / f"run-{name}"
        shutil.copytree(run, copy)
        out = tmp_path / f"{name}.safetensors"
        if nproc == 1:
            cmd = [sys.executable, str(script), "1", str(copy), str(out), "resume"]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "python")}, timeout=120)
        else:
            result = torchrun(nproc, str(script), str(nproc), str(copy), str(out), "resume")
            assert result.returncode == 0, result.stderr[-4000:]
        resumed[name] = load_file(str(out))
    for run_name, tensors in (("2 shards", load_file(str(tmp_path / "two.safetensors"))), *resumed.items()):
        for key, tensor in expected.items():
            torch.testing.assert_close(
                tensors[key], tensor, rtol=RTOL, atol=ATOL, msg=lambda m, n=key, r=run_name: f"{r}, {n}: {m}"
            )


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("config", "the SAE or training config differs across all ranks"),
        ("data", "the first batch differs across the ranks of a latent-shard group"),
        ("raise", "rank 1 fails on purpose"),
    ],
)
def test_mismatches_and_failures_end_every_rank(tmp_path, mode, message):
    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    start = time.monotonic()
    result = torchrun(2, str(script), mode)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - start < 60


def test_slices_initialise_the_same_dictionary_whatever_the_layout():
    """Each slice draws only its own latents, in seeded blocks: 1, 3 or 4 shards build the same whole SAE."""
    cfg = fusedsae.SAEConfig(d_in=6, d_sae=10_000, activation="topk", k=4)  # blocks of 4096 straddle the slices

    class Grid:  # a layout without processes: which slice this "rank" holds
        def __init__(self, shards, index):
            self.shards, self.shard_rank = shards, index

    whole = {}
    for shards in (1, 3, 4):
        parts = []
        for index in range(shards):
            torch.manual_seed(7)
            parts.append(ShardedAutoencoder(cfg, Grid(shards, index)).W_dec)
        whole[shards] = torch.cat(parts)
    assert torch.equal(whole[1], whole[3]) and torch.equal(whole[1], whole[4])
    torch.testing.assert_close(whole[1].norm(dim=1), torch.ones(10_000))


def test_cli_trains_sharded_and_resumes_on_one_process(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "fusedsae", "train", "--steps", "8", "--batch-size", "64", "--no-progress", "--no-plots"]
    result = torchrun(2, *args, "--checkpoint-every", "4", "--shard-latents", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 latent shard(s) × 1 data-parallel replica(s)" in result.stdout
    sharded = fusedsae.load(out / "sae")
    assert sharded.cfg.d_sae == 512
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    # the layout is not a saved setting: resuming on another one names it (here: one process, no sharding)
    more = [sys.executable, *args[:4], "12", *args[5:], "--resume", "--shard-latents", "1", "--out", str(out)]
    result = subprocess.run(more, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed" in result.stdout and "step 8/12" in result.stdout
    assert not torch.equal(fusedsae.load(out / "sae").W_dec, sharded.W_dec)


@pytest.mark.parametrize(
    ("nproc", "shards", "activation"), [(2, 2, "topk"), (4, 2, "batchtopk")], ids=["2-shards-topk", "2x2-batchtopk"]
)
def test_sliced_saves_are_the_gathered_files_byte_for_byte(tmp_path, nproc, shards, activation):
    """Each rank writes its slice of sae/ and of the checkpoints; the files equal the gathered ones byte for byte
    (W_enc's column slices interleave in the file; BatchTopK adds the threshold; the input scale is folded in)."""
    script = tmp_path / "save.py"
    script.write_text(SAVE_SCRIPT)
    result = torchrun(nproc, str(script), str(shards), activation, str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "run"
    for name in ("sae_weights.safetensors", "sparsity.safetensors", "cfg.json"):
        written, gathered = (run / "sae" / name).read_bytes(), (tmp_path / "gathered" / name).read_bytes()
        assert written == gathered, name
    weights = load_file(str(run / "sae" / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (D_IN, D_SAE) and ("threshold" in weights) == (activation == "batchtopk")
    assert fusedsae.load(run / "sae").cfg.d_sae == D_SAE
    step = fusedsae.checkpoint.checkpoint_root(run) / "step-000000006"
    manifest = fusedsae.checkpoint.verify_checkpoint(step)
    gathered = fusedsae.checkpoint.checkpoint_root(tmp_path / "gathered-run") / "step-000000006"
    for name in manifest["files"]:
        assert (step / name).read_bytes() == (gathered / name).read_bytes(), name
    leftovers = [
        p.name for p in (*run.iterdir(), *step.parent.iterdir()) if p.name.startswith(".step") or ".tmp-" in p.name
    ]
    assert leftovers == []


def test_sliced_save_of_one_shard_is_the_plain_save_and_atomic(tmp_path, monkeypatch):
    """A world of one through the sliced writer gives the plain folder; a failure mid-write leaves the previous
    folder whole and no temporary folder behind."""
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, activation="jumprelu")
    with torch.no_grad():
        sae.threshold.uniform_(0, 1)
    part = ShardedAutoencoder.from_full(sae, ProcessGrid(1))
    sparsity = torch.randn(D_SAE)
    sae.save(tmp_path / "plain", sparsity=sparsity)
    part.save(tmp_path / "sliced", sparsity=sparsity)
    for name in ("sae_weights.safetensors", "sparsity.safetensors", "cfg.json"):
        assert (tmp_path / "sliced" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    before = (tmp_path / "sliced" / "sae_weights.safetensors").read_bytes()

    def fail_midway(path, tensors, first):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fusedsae.sharding, "write_sliced_safetensors", fail_midway)
    with torch.no_grad():
        part.W_dec.mul_(2)
    with pytest.raises(OSError, match="disk full"):
        part.save(tmp_path / "sliced")
    assert (tmp_path / "sliced" / "sae_weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "sliced"]


def test_safetensors_header_is_the_librarys_for_every_dtype():
    """The sharded writer's header (tensor order by dtype then name, offsets, padding) is safetensors' own."""
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{name}{i}": (torch.randn(3, 5, generator=g) * 10).to(dtype)
        for i, dtype in enumerate(sharded_files.SAFETENSORS_DTYPES)
        for name in ("zz", "a", "W_enc")
    }
    tensors.update(scalar=torch.tensor(3.0), empty=torch.zeros(0, 4), odd=torch.ones(3, dtype=torch.uint8))
    prefix, offsets = sharded_files.safetensors_header({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    whole = save(tensors)
    assert whole[: len(prefix)] == prefix
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert whole[offsets[name] : offsets[name] + len(raw)] == raw, name


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_sliced_writer_assembles_the_file_in_any_order(tmp_path, monkeypatch, shards):
    """Slices of every tensor kind written by "ranks" in reverse order, with blocks smaller than one row, give the
    library's file for the whole tensors."""
    from safetensors.torch import save

    monkeypatch.setattr(sharded_files, "BLOCK_BYTES", 24)
    g = torch.Generator().manual_seed(1)
    W_enc, W_dec = torch.randn(5, 13, generator=g).bfloat16(), torch.randn(13, 5, generator=g, dtype=torch.float64)
    b_enc, b_dec, step = torch.randn(13, generator=g), torch.randn(5, generator=g), torch.tensor(4.0)
    path = tmp_path / "sliced.safetensors"
    for s in reversed(range(shards)):
        a, z = shard_bounds(13, shards, s)
        parts = {
            "W_enc": sharded_files.SlicedTensor(W_enc[:, a:z].contiguous(), 1, a, 13),
            "W_dec": sharded_files.SlicedTensor(W_dec[a:z], 0, a, 13),
            "b_enc": sharded_files.SlicedTensor(b_enc[a:z], 0, a, 13),
            "b_dec": sharded_files.SlicedTensor(b_dec),
            "state.0.step": sharded_files.SlicedTensor(step),
        }
        sharded_files.write_sliced_safetensors(path, parts, first=s == 0)
    whole = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "state.0.step": step}
    assert path.read_bytes() == save(whole)


def test_read_slices_reads_this_slice_of_each_tensor(tmp_path):
    """A resuming rank reads only its slice of each checkpoint tensor: W_enc's columns, W_dec's rows, an optimizer
    state laid out as its parameter; replicated tensors and another dictionary's (other d_sae) whole."""
    from safetensors.torch import save_file

    class Grid:  # slice 1 of 3 without processes
        shards, shard_rank = 3, 1

    torch.manual_seed(0)
    whole = fusedsae.SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, activation="topk", k=3)
    tensors = {**whole.state_dict(), "state.2.exp_avg": torch.randn(D_SAE, D_IN), "state.2.step": torch.tensor(3.0)}
    tensors["other"] = torch.randn(D_IN, D_SAE + 1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    part = ShardedAutoencoder(whole.cfg, Grid())
    layout = {"state.2.exp_avg": "W_dec", "state.2.step": "W_dec", "other": "W_enc"}
    got = part.read_slices(tmp_path / "model.safetensors", lambda key: layout.get(key, key))
    assert set(got) == set(tensors)
    for key, t in tensors.items():
        expected = t if key == "other" or t.dim() == 0 else part.slice_tensor(layout.get(key, key), t)
        assert torch.equal(got[key], expected), key
    assert got["W_enc"].shape == (D_IN, part.stop - part.start) and got["W_enc"].is_contiguous()
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        part.read_slices(tmp_path / "bad.safetensors", str)


def test_sliced_checkpoint_in_one_process_is_the_gathered_one_and_atomic(tmp_path, monkeypatch):
    """The Trainer's sliced checkpoint path with a world of one writes the files of the gathered path; a failure
    while writing leaves the previous checkpoint as the newest and no temporary folder."""
    data = fusedsae.toy.SparseFeatureData(d_in=D_IN, n_features=30, mean_active=3.0)
    torch.manual_seed(0)
    sae = fusedsae.SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, activation="topk", k=3, aux_k=6)
    part = ShardedAutoencoder.from_full(sae, ProcessGrid(1))
    cfg = fusedsae.TrainConfig(steps=4, batch_size=BATCH, dead_tokens=48, progress=False, run_dir=str(tmp_path / "run"))
    trainer = fusedsae.Trainer(part, fusedsae.ToySource(data, BATCH), cfg)
    trainer.train()
    written = fusedsae.checkpoint.checkpoint_root(tmp_path / "run") / "step-000000004"
    gathered = fusedsae.checkpoint.write_checkpoint(tmp_path / "gathered", 4, trainer.state_contents())
    for name in fusedsae.checkpoint.verify_checkpoint(written)["files"]:
        assert (written / name).read_bytes() == (gathered / name).read_bytes(), name

    def fail(path, tensors, first):
        raise OSError("disk full")

    monkeypatch.setattr(fusedsae.training, "write_sliced_safetensors", fail)
    trainer.step = 5
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    root = fusedsae.checkpoint.checkpoint_root(tmp_path / "run")
    assert [p.name for p in root.iterdir()] == ["step-000000004"]


def test_the_blockwise_finite_check_finds_a_nan_or_inf_in_any_block(monkeypatch):
    """Saves check finiteness in blocks (no whole-tensor temporaries); a bad value in the last, partial block counts."""
    monkeypatch.setattr(fusedsae.checkpoint, "FINITE_BLOCK", 7)
    clean = torch.randn(5, 10)
    last, first = clean.clone(), clean.clone()
    last[4, 9] = float("nan")
    first[0, 0] = float("-inf")
    tensors = {"clean": clean, "last": last, "first": first, "ints": torch.arange(3), "scalar": torch.tensor(1.0)}
    assert fusedsae.checkpoint.nonfinite_tensors(tensors) == ["last", "first"]
